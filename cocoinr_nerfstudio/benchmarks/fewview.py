"""Few-view benchmark: ``coco-inr`` against its prior-free baseline ``volsdf`` at 3 and 8 training views.

For every method x view count it trains through the real CLI (an ``ns-train`` subprocess, ``idr-data
--num-views V``), then, in this process, reloads the run with nerfstudio's ``eval_setup`` and measures held-out
PSNR / SSIM / masked PSNR with the pipeline's ``get_average_eval_image_metrics`` (what ``ns-eval`` computes),
extracts a world-unit mesh with ``cocoinr-extract-mesh``'s code and scores it against the scene's
``gt_mesh.ply`` (``cocoinr-eval-mesh --gt``'s code). Writes ``results.md`` (a Markdown table whose header states
the device and every setting), ``results.json`` and ``fewview.png`` (per run: a held-out rendering, its normal
map and the mesh seen from the same camera, under a ground-truth row).

The mesh panels come from :func:`render_mesh`, a small numpy z-buffer rasteriser (CPU only, no GPU renderer).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

METHODS = ("coco-inr", "volsdf")

TINY_MODEL_ARGS: tuple[str, ...] = (
    "--pipeline.model.codebook-attention.num-latents", "8",
    "--pipeline.model.codebook-attention.latent-dim", "16",
    "--pipeline.model.codebook-attention.depth", "1",
    "--pipeline.model.codebook-attention.ff-mult", "2",
    "--pipeline.model.sdf-field.geometry-hidden-dims", "32", "32",
    "--pipeline.model.sdf-field.feature-dim", "16",
    "--pipeline.model.background-field.hidden-dims", "32",
    "--pipeline.model.background-field.feature-dim", "16",
    "--pipeline.model.num-samples", "8",
    "--pipeline.model.num-samples-eval", "16",
    "--pipeline.model.num-samples-extra", "4",
    "--pipeline.model.num-samples-outside", "4",
    "--pipeline.model.max-total-iters", "3",
)  # fmt: skip
"""``ns-train`` flags that keep the architecture (every code path) but shrink its widths and sample counts so a
CPU runs a step in ~0.1 s. Shared by ``--tiny`` and the end-to-end tests."""

TINY_RANDOM_CODEBOOK = (64, 16)
PAPER_RANDOM_CODEBOOK = (16384, 256)


class BenchmarkError(RuntimeError):
    """A user-facing failure (bad options, a training run that failed); printed without a traceback."""


# --------------------------------------------------------------------------------------------- options
@dataclass
class Settings:
    """Everything that defines a benchmark run; every field ends up in the table header or results.json."""

    output_dir: Path
    steps: int
    views: tuple[int, ...]
    methods: tuple[str, ...]
    device: str
    tiny: bool
    codebook: Path | None
    random_codebook: bool
    random_codebook_shape: tuple[int, int]
    scene_dir: Path | None
    scene_views: int
    width: int
    height: int
    scene_seed: int
    split: str
    eval_stride: int
    rays: int | None
    mesh_resolution: int
    mesh_samples: int
    cull_by_masks: bool
    seed: int
    reuse_runs: bool
    jobs: int
    train_args: tuple[str, ...] = ()
    argv: tuple[str, ...] = field(default_factory=tuple)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark_fewview.py",
        description="Few-view benchmark of coco-inr vs volsdf: held-out PSNR/SSIM and mesh Chamfer at 3 and 8 views.",
        epilog="Full scale on a GPU: python scripts/benchmark_fewview.py --device cuda --steps 2000 "
        "--output-dir outputs/fewview ; CI scale on CPU: python scripts/benchmark_fewview.py --tiny "
        "--random-codebook --device cpu --output-dir /tmp/fewview",
    )
    parser.add_argument("--steps", type=int, default=None, help="training iterations per run (default 2000; --tiny: 4)")
    parser.add_argument("--views", type=int, nargs="+", default=[3, 8], help="training view counts (default: 3 8)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--codebook",
        type=Path,
        default=None,
        help="VQGAN codebook for coco-inr (default: the one cocoinr_nerfstudio.codebook.locate_codebook finds)",
    )
    parser.add_argument(
        "--random-codebook",
        action="store_true",
        help="use a random N(0,1) codebook: the prior-free ablation, not the paper's method (required when no "
        "codebook is found)",
    )
    parser.add_argument(
        "--random-codebook-shape",
        type=int,
        nargs=2,
        default=None,
        metavar=("CODES", "DIM"),
        help="shape of the random codebook (default 16384 256, VQGAN's; --tiny: 64 16)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny scene and shrunk model: the CPU smoke/CI scale")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/benchmark_fewview"))
    parser.add_argument("--scene-dir", type=Path, default=None, help="an existing IDR scene (default: generate one)")
    parser.add_argument(
        "--scene-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("VIEWS", "W", "H"),
        help="generated scene (default 49 400 300; --tiny: 12 64 48)",
    )
    parser.add_argument("--scene-seed", type=int, default=0, help="seed of the generated scene")
    parser.add_argument(
        "--split",
        choices=["auto", "paper", "even"],
        default=None,
        help="idr-data --split (default: even for the generated scene, auto for --scene-dir)",
    )
    parser.add_argument("--eval-stride", type=int, default=None, help="every n-th held-out view (default 4; tiny 3)")
    parser.add_argument("--rays", type=int, default=None, help="rays per step (default: the method's 1024; tiny 128)")
    parser.add_argument("--mesh-resolution", type=int, default=None, help="marching cubes grid (default 512; tiny 32)")
    parser.add_argument("--mesh-samples", type=int, default=None, help="surface samples per mesh (200000; tiny 20000)")
    parser.add_argument(
        "--cull-by-masks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cull meshes by the training masks before scoring, the usual few-view protocol (default: on)",
    )
    parser.add_argument("--seed", type=int, default=42, help="ns-train --machine.seed")
    parser.add_argument("--reuse-runs", action="store_true", help="skip training where the final checkpoint exists")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="ns-train runs at a time (default 1; more overlaps start-up on CPU but skews the train times)",
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="extra ns-train flags for every run, placed before the dataparser (one shell-quoted string)",
    )
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    tiny = bool(args.tiny)
    views, width, height = args.scene_size or ((12, 64, 48) if tiny else (49, 400, 300))
    settings = Settings(
        output_dir=args.output_dir,
        steps=args.steps if args.steps is not None else (4 if tiny else 2000),
        views=tuple(args.views),
        methods=tuple(dict.fromkeys(args.methods)),
        device=args.device,
        tiny=tiny,
        codebook=args.codebook,
        random_codebook=bool(args.random_codebook),
        random_codebook_shape=tuple(
            args.random_codebook_shape or (TINY_RANDOM_CODEBOOK if tiny else PAPER_RANDOM_CODEBOOK)
        ),  # type: ignore[arg-type]
        scene_dir=args.scene_dir,
        scene_views=views,
        width=width,
        height=height,
        scene_seed=args.scene_seed,
        split=args.split or ("auto" if args.scene_dir is not None else "even"),
        eval_stride=args.eval_stride or (3 if tiny else 4),
        rays=args.rays if args.rays is not None else (128 if tiny else None),
        mesh_resolution=args.mesh_resolution or (32 if tiny else 512),
        mesh_samples=args.mesh_samples or (20_000 if tiny else 200_000),
        cull_by_masks=bool(args.cull_by_masks),
        seed=args.seed,
        reuse_runs=bool(args.reuse_runs),
        jobs=args.jobs,
        train_args=tuple(shlex.split(args.train_args)),
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )
    if settings.steps < 1:
        parser.error("--steps must be >= 1")
    if settings.jobs < 1:
        parser.error("--jobs must be >= 1")
    if any(v < 1 for v in settings.views):
        parser.error("--views must be positive")
    if settings.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu)")
    if settings.codebook is not None and settings.random_codebook:
        parser.error("give --codebook PATH or --random-codebook, not both")
    return settings


# --------------------------------------------------------------------------------------------- codebook
def codebook_flags(settings: Settings) -> tuple[list[str], str]:
    """``ns-train`` flags selecting coco-inr's codebook, and a sentence for the report.

    A real codebook is used when given or found; otherwise ``--random-codebook`` must be explicit, because a
    random codebook measures the prior-free ablation, not CoCo-INR.
    """
    from cocoinr_nerfstudio.codebook import CodebookError, locate_codebook

    if settings.random_codebook:
        codes, dim = settings.random_codebook_shape
        return (
            [
                "--pipeline.model.codebook-source",
                "random",
                "--pipeline.model.random-codebook-shape",
                str(codes),
                str(dim),
            ],
            f"random N(0,1) {codes}x{dim} codebook: the PRIOR-FREE ABLATION, not the VQGAN prior of the paper",
        )
    try:
        path = locate_codebook(settings.codebook).resolve()
    except CodebookError as err:
        raise BenchmarkError(
            f"{err}\nTo benchmark the prior-free ablation instead, pass --random-codebook explicitly."
        ) from err
    return ["--pipeline.model.codebook-path", str(path)], f"VQGAN codebook {path}"


# --------------------------------------------------------------------------------------------- scene
def prepare_scene(settings: Settings) -> tuple[Path, str]:
    """The scene folder (generated under the output folder unless --scene-dir) and a description of it."""
    if settings.scene_dir is not None:
        scene = settings.scene_dir
        if not (scene / "image").is_dir() or not (scene / "cameras.npz").is_file():
            raise BenchmarkError(f"--scene-dir {scene} is not an IDR scene (needs image/ and cameras.npz)")
        return scene, f"{scene} (IDR layout)"
    from cocoinr_nerfstudio.data.scene_generator import generate_scene

    scene = settings.output_dir / "scene"
    wanted = {
        "num_views": settings.scene_views,
        "width": settings.width,
        "height": settings.height,
        "seed": settings.scene_seed,
    }
    meta_path = scene / "scene.json"
    current = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if any(current.get(k) != v for k, v in wanted.items()) or not (scene / "gt_mesh.ply").is_file():
        print(f"Generating the scene: {settings.scene_views} views at {settings.width}x{settings.height} in {scene}")
        generate_scene(
            scene,
            num_views=settings.scene_views,
            width=settings.width,
            height=settings.height,
            seed=settings.scene_seed,
            mesh_resolution=64 if settings.tiny else 128,
            overwrite=True,
        )
    return scene, (
        f"generated (cocoinr_nerfstudio.data.scene_generator, seed {settings.scene_seed}): "
        f"{settings.scene_views} views at {settings.width}x{settings.height}, world units ~200 per normalised unit"
    )


# --------------------------------------------------------------------------------------------- training
def run_name(method: str, views: int) -> str:
    return f"{method}-{views}v"


def config_path(settings: Settings, method: str, views: int) -> Path:
    """Where ``ns-train`` writes the run: output-dir / experiment-name / method / timestamp / config.yml."""
    return settings.output_dir / "runs" / run_name(method, views) / method / "bench" / "config.yml"


def ns_train_executable() -> str:
    beside = Path(sys.executable).parent / "ns-train"
    found = str(beside) if beside.is_file() else shutil.which("ns-train")
    if found is None:
        raise BenchmarkError("ns-train not found: install nerfstudio in this environment")
    return found


def train_command(settings: Settings, scene: Path, method: str, views: int, codebook: Sequence[str] = ()) -> list[str]:
    """The ``ns-train`` command line of one run (model/trainer flags first, then ``idr-data`` and its flags)."""
    cmd = [
        ns_train_executable(),
        method,
        "--data",
        str(scene),
        "--output-dir",
        str(settings.output_dir / "runs"),
        "--experiment-name",
        run_name(method, views),
        "--timestamp",
        "bench",
        "--machine.device-type",
        settings.device,
        "--machine.seed",
        str(settings.seed),
        "--vis",
        "tensorboard",
        "--max-num-iterations",
        str(settings.steps),
        "--steps-per-save",
        str(settings.steps),
        "--steps-per-eval-batch",
        "0",
        "--steps-per-eval-image",
        "0",
        "--steps-per-eval-all-images",
        "0",
    ]
    if settings.rays is not None:
        cmd += ["--pipeline.datamanager.train-num-rays-per-batch", str(settings.rays)]
    if method == "coco-inr":
        cmd += list(codebook)
    if settings.tiny:
        cmd += list(TINY_MODEL_ARGS)
    cmd += list(settings.train_args)
    return [*cmd, "idr-data", "--num-views", str(views), *dataparser_args(settings)]


def dataparser_args(settings: Settings) -> list[str]:
    """``idr-data`` flags shared by every run (the generated scene is a custom scene whatever its folder is called:
    no paper split table applies to it)."""
    args = ["--split", settings.split, "--eval-stride", str(settings.eval_stride)]
    return args if settings.scene_dir is not None else [*args, "--dataset", "custom"]


def final_checkpoint(config: Path, steps: int) -> Path:
    return config.parent / "nerfstudio_models" / f"step-{steps - 1:09d}.ckpt"


def train(settings: Settings, scene: Path, method: str, views: int, codebook: Sequence[str]) -> tuple[Path, str, float]:
    """Runs (or, with --reuse-runs, reuses) one ``ns-train``; returns its config.yml, command line and wall time."""
    cmd = train_command(settings, scene, method, views, codebook)
    config = config_path(settings, method, views)
    printable = shlex.join(["ns-train", *cmd[1:]])
    if settings.reuse_runs and config.is_file() and final_checkpoint(config, settings.steps).is_file():
        print(f"[{run_name(method, views)}] reusing {config}")
        return config, printable, math.nan
    log = settings.output_dir / "runs" / f"{run_name(method, views)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{run_name(method, views)}] training: {printable}", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not config.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise BenchmarkError(
            f"ns-train failed for {run_name(method, views)} (exit {done.returncode}); log {log}:\n{tail}"
        )
    print(f"[{run_name(method, views)}] trained in {seconds:.0f} s (log {log})", flush=True)
    return config, printable, seconds


def training_summary(config: Path, steps: int) -> dict[str, float]:
    """Training time of a finished run, from its files: nerfstudio's ``Trainer.train`` writes
    ``dataparser_transforms.json`` just before the first iteration and the final checkpoint after the last, so
    the difference of their modification times is the time of the iterations (plus one checkpoint save), without
    the process start-up and setup. (The tensorboard events are not used: nerfstudio never closes its writer, so
    the last events may not reach the disk.)"""
    start, end = config.parent / "dataparser_transforms.json", final_checkpoint(config, steps)
    if not (start.is_file() and end.is_file()):
        return {"train_seconds": math.nan, "iterations_per_second": math.nan}
    seconds = end.stat().st_mtime - start.stat().st_mtime
    return {"train_seconds": seconds, "iterations_per_second": steps / seconds if seconds > 0 else math.nan}


# --------------------------------------------------------------------------------------------- mesh rendering
@dataclass
class MeshRender:
    """A rasterised mesh: shaded grey image, normal map and coverage, all [H, W(, 3)]."""

    shaded: np.ndarray
    normals: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    """Camera z-depth of the visible surface (inf where empty)."""


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    world_mat: np.ndarray,
    width: int,
    height: int,
    normal_frame: np.ndarray | None = None,
    max_candidates: int = 4_000_000,
) -> MeshRender:
    """Z-buffer rasterisation of a triangle mesh through an IDR camera ``world_mat`` (``K [R|t]``, 3x4 or 4x4).

    Pixel (i, j) is sampled at image coordinates (i, j) (IDR/OpenCV centres), depth is interpolated
    perspective-correctly (1/z), faces are two-sided and lit by a headlight: grey x (0.25 + 0.75 |cos|).
    ``normals`` shows unit normals turned towards the camera, mapped by ``normal_frame`` (3x3; e.g.
    ``scale_mat[:3, :3].T`` gives the model's normalised frame) and displayed as (n + 1) / 2, like nerfstudio's
    ``normals`` output. Empty pixels are white.
    """
    from cocoinr_nerfstudio.data.idr_dataparser import decompose_projection

    K, c2w = decompose_projection(np.asarray(world_mat, np.float64)[:3, :4])
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64).reshape(-1, 3)
    cam = (vertices - c2w[:3, 3]) @ c2w[:3, :3]  # OpenCV camera frame: x right, y down, z forward
    z = cam[:, 2]
    inv_z = np.where(z > 1e-9, 1.0 / np.maximum(z, 1e-9), 0.0)
    u = (K[0, 0] * cam[:, 0] + K[0, 1] * cam[:, 1]) * inv_z + K[0, 2]
    v = K[1, 1] * cam[:, 1] * inv_z + K[1, 2]

    best = np.zeros(width * height)  # 1/z of the nearest surface so far (0: empty)
    face_at = np.full(width * height, -1, np.int64)
    if len(faces):
        tu, tv, tiz = u[faces], v[faces], inv_z[faces]
        in_front = (tiz > 0).all(axis=1)
        u0 = np.clip(np.ceil(tu.min(axis=1)), 0, width)
        u1 = np.clip(np.floor(tu.max(axis=1)), -1, width - 1)
        v0 = np.clip(np.ceil(tv.min(axis=1)), 0, height)
        v1 = np.clip(np.floor(tv.max(axis=1)), -1, height - 1)
        nx, ny = (u1 - u0 + 1).astype(np.int64), (v1 - v0 + 1).astype(np.int64)
        counts = np.where(in_front & (nx > 0) & (ny > 0), nx * ny, 0)
        ids = np.flatnonzero(counts)
        start = 0
        while start < len(ids):
            stop = start + max(1, int(np.searchsorted(np.cumsum(counts[ids[start:]]), max_candidates)))
            chunk = ids[start:stop]
            _rasterize_chunk(chunk, counts, u0, v0, nx, tu, tv, tiz, width, best, face_at)
            start = stop

    mask = face_at >= 0
    shaded = np.ones((width * height, 3))
    normals = np.ones((width * height, 3))
    if mask.any():
        tri = vertices[faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-30)
        view = tri.mean(axis=1) - c2w[:3, 3]
        view /= np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-30)
        cos = np.sum(n * view, axis=1)
        visible = face_at[mask]
        grey = np.array([0.82, 0.82, 0.85])
        shaded[mask] = grey * (0.25 + 0.75 * np.abs(cos[visible]))[:, None]
        towards = -np.sign(cos[visible])[:, None] * n[visible]  # facing the camera
        towards[cos[visible] == 0] = n[visible][cos[visible] == 0]
        if normal_frame is not None:
            towards = towards @ np.asarray(normal_frame, np.float64).T
            towards /= np.maximum(np.linalg.norm(towards, axis=1, keepdims=True), 1e-30)
        normals[mask] = (towards + 1.0) / 2.0
    depth = np.where(mask, 1.0 / np.where(mask, best, 1.0), np.inf)
    return MeshRender(
        shaded.reshape(height, width, 3),
        normals.reshape(height, width, 3),
        mask.reshape(height, width),
        depth.reshape(height, width),
    )


def _rasterize_chunk(chunk, counts, u0, v0, nx, tu, tv, tiz, width, best, face_at) -> None:
    """Candidate pixels of the faces in ``chunk`` (their bounding boxes), inside test, z-test into the buffers."""
    owner = np.repeat(chunk, counts[chunk])
    local = np.arange(len(owner)) - np.repeat(np.cumsum(counts[chunk]) - counts[chunk], counts[chunk])
    px = u0[owner] + local % nx[owner]
    py = v0[owner] + local // nx[owner]
    ax, ay = tu[owner, 0], tv[owner, 0]
    bx, by = tu[owner, 1], tv[owner, 1]
    cx, cy = tu[owner, 2], tv[owner, 2]
    area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    safe = np.where(area == 0, 1.0, area)
    w0 = ((bx - px) * (cy - py) - (by - py) * (cx - px)) / safe  # weight of vertex a: area (p, b, c)
    w1 = ((cx - px) * (ay - py) - (cy - py) * (ax - px)) / safe  # vertex b: area (p, c, a)
    w2 = 1.0 - w0 - w1
    eps = -1e-9
    inside = (area != 0) & (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
    if not inside.any():
        return
    owner, px, py = owner[inside], px[inside], py[inside]
    iz = w0[inside] * tiz[owner, 0] + w1[inside] * tiz[owner, 1] + w2[inside] * tiz[owner, 2]
    pixel = (py * width + px).astype(np.int64)
    order = np.lexsort((-iz, pixel))  # per pixel, nearest (largest 1/z) first
    pixel, iz, owner = pixel[order], iz[order], owner[order]
    first = np.ones(len(pixel), dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    pixel, iz, owner = pixel[first], iz[first], owner[first]
    nearer = iz > best[pixel]
    best[pixel[nearer]] = iz[nearer]
    face_at[pixel[nearer]] = owner[nearer]


# --------------------------------------------------------------------------------------------- evaluation
@dataclass
class RunResult:
    method: str
    views: int
    train_indices: list[int]
    num_eval_views: int
    image_metrics: dict[str, float]
    mesh_metrics: dict[str, float]
    mesh_path: str | None
    mesh_note: str
    training: dict[str, float]
    train_wall_seconds: float
    """ns-train subprocess, start-up included (NaN when reused)."""
    command: str
    figure_rgb: np.ndarray | None = None
    figure_normals: np.ndarray | None = None
    figure_mesh: np.ndarray | None = None

    def to_json(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("figure_")}
        return _finite_or_none(data)


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def view_camera(config, view: int):
    """nerfstudio camera of scene view ``view``, parsed by the run's own idr-data settings."""
    datamanager = config.pipeline.datamanager
    data = datamanager.data if datamanager.data is not None else datamanager.dataparser.data  # ns-train --data
    dataparser = dataclasses.replace(datamanager.dataparser, data=data, train_views=(view,), load_masks=False)
    return dataparser.setup().get_dataparser_outputs("train").cameras[0:1]


def evaluate_images(config_file: Path, renders_dir: Path, figure_view: int | None) -> tuple[dict, dict]:
    """Held-out metrics as ns-eval computes them, plus the run's split and (optionally) one rendered view."""
    from nerfstudio.utils.eval_utils import eval_setup

    config, pipeline, _, step = eval_setup(config_file, test_mode="test")
    metrics = pipeline.get_average_eval_image_metrics(output_path=renders_dir, get_std=True)
    metadata = pipeline.datamanager.train_dataparser_outputs.metadata
    info = {
        "step": int(step),
        "train_indices": [int(i) for i in metadata.get("train_indices", [])],
        "num_eval_views": len(pipeline.datamanager.eval_dataset),
    }
    if figure_view is not None:
        camera = view_camera(config, figure_view).to(pipeline.device)
        pipeline.eval()
        with torch.no_grad():
            outputs = pipeline.model.get_outputs_for_camera(camera)
        accumulation = outputs["accumulation"].clamp(0, 1)
        info["rgb"] = outputs["rgb"].clamp(0, 1).cpu().numpy()
        # normals over white, weighted by the foreground opacity (background pixels carry no surface)
        info["normals"] = (outputs["normals"].clamp(0, 1) * accumulation + 1 - accumulation).cpu().numpy()
    del pipeline
    _free_memory()
    return metrics, info


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def extract_and_score(
    config_file: Path, mesh_path: Path, gt_mesh: Path | None, settings: Settings
) -> tuple[dict[str, float], str]:
    """cocoinr-extract-mesh (world units, optionally mask-culled) then cocoinr-eval-mesh --gt's metrics."""
    import trimesh

    from cocoinr_nerfstudio.mesh.evaluation import MeshEvaluationError, mesh_distances
    from cocoinr_nerfstudio.scripts.cli_errors import CLIError
    from cocoinr_nerfstudio.scripts.extract_mesh import ExtractMesh

    nan = {"chamfer": math.nan, "accuracy": math.nan, "completeness": math.nan, "hausdorff": math.nan}
    try:
        ExtractMesh(
            load_config=config_file,
            output_path=mesh_path,
            resolution=settings.mesh_resolution,
            cull_by_masks=settings.cull_by_masks,
            overwrite=True,
        ).run()
    except CLIError as err:
        return nan, f"no mesh: {err}"
    finally:
        _free_memory()
    if gt_mesh is None:
        return nan, "no gt_mesh.ply in the scene: mesh not scored"
    try:
        metrics = mesh_distances(
            trimesh.load(mesh_path, process=False), trimesh.load(gt_mesh, process=False), settings.mesh_samples
        )
    except MeshEvaluationError as err:
        return nan, f"not scored: {err}"
    keys = ("chamfer", "accuracy", "completeness", "hausdorff")
    return {k: float(getattr(metrics, k)) for k in keys}, ""


# --------------------------------------------------------------------------------------------- report
def device_name(settings: Settings) -> str:
    if settings.device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_report(settings: Settings, results: list[RunResult], header: dict[str, str]) -> str:
    lines = ["# Few-view benchmark: coco-inr vs volsdf", ""]
    lines += [f"- **{key}**: {value}" for key, value in header.items()]
    lines += [
        "",
        "| Method | Views | PSNR (dB) ↑ | SSIM ↑ | Masked PSNR (dB) ↑ | Chamfer ↓ | Accuracy ↓ | Completeness ↓ "
        "| Hausdorff ↓ | Eval views | Train time (s) | it/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        im, me = r.image_metrics, r.mesh_metrics
        lines.append(
            f"| {r.method} | {r.views} | {_fmt(im.get('psnr'), 2)} | {_fmt(im.get('ssim'), 3)} "
            f"| {_fmt(im.get('psnr_masked'), 2)} | {_fmt(me.get('chamfer'), 3)} | {_fmt(me.get('accuracy'), 3)} "
            f"| {_fmt(me.get('completeness'), 3)} | {_fmt(me.get('hausdorff'), 3)} | {r.num_eval_views} "
            f"| {_fmt(r.training.get('train_seconds'), 1)} | {_fmt(r.training.get('iterations_per_second'), 2)} |"
        )
    notes = [f"{r.method} {r.views} views: {r.mesh_note}" for r in results if r.mesh_note]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    lines += ["", "## Commands", "", "```bash"]
    lines += [f"python scripts/benchmark_fewview.py {shlex.join(settings.argv)}".rstrip()]
    lines += [r.command for r in results]
    lines += ["```", ""]
    return "\n".join(lines)


def write_figure(
    path: Path,
    results: list[RunResult],
    gt_image: np.ndarray,
    gt_render: MeshRender | None,
    view: int,
    device_label: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = gt_image.shape[:2]
    rows = 1 + len(results)
    panel = 3.0
    fig, axes = plt.subplots(rows, 3, figsize=(3 * panel, rows * panel * height / width + 0.6), squeeze=False)
    blank = np.ones_like(gt_image)
    gt_row = [
        (gt_image, f"ground truth, view {view}"),
        (gt_render.normals if gt_render else blank, "GT mesh normals"),
        (gt_render.shaded if gt_render else blank, "GT mesh"),
    ]
    grid = [gt_row]
    for r in results:
        psnr = r.image_metrics.get("psnr", math.nan)
        grid.append(
            [
                (
                    r.figure_rgb if r.figure_rgb is not None else blank,
                    f"{r.method}, {r.views} views (avg {psnr:.1f} dB)",
                ),
                (r.figure_normals if r.figure_normals is not None else blank, "normals"),
                (
                    r.figure_mesh if r.figure_mesh is not None else blank,
                    f"mesh (Chamfer {r.mesh_metrics.get('chamfer', math.nan):.2f})",
                ),
            ]
        )
    for row_axes, row in zip(axes, grid, strict=True):
        for ax, (image, title) in zip(row_axes, row, strict=True):
            ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"Held-out view {view} ({device_label})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def choose_figure_view(num_images: int, train_splits: Sequence[Sequence[int]]) -> int:
    """A view held out by every run (the one nearest the middle of the sequence)."""
    used = set().union(*map(set, train_splits)) if train_splits else set()
    free = [i for i in range(num_images) if i not in used]
    if not free:
        raise BenchmarkError("every view is a training view of some run: no common held-out view for the figure")
    return min(free, key=lambda i: (abs(i - num_images // 2), i))


def split_of(settings: Settings, scene: Path, views: int) -> list[int]:
    """Training views idr-data picks for ``views`` (the same call ns-train makes)."""
    from cocoinr_nerfstudio.data.idr_dataparser import IDRDataParserConfig

    dataset = "auto" if settings.scene_dir is not None else "custom"
    config = IDRDataParserConfig(data=scene, num_views=views, split=settings.split, dataset=dataset, load_masks=False)
    parser = config.setup()
    return [int(i) for i in parser.get_dataparser_outputs("train").metadata["train_indices"]]


# --------------------------------------------------------------------------------------------- main
def run(settings: Settings) -> dict:
    """The whole benchmark; returns the results.json content."""
    from PIL import Image

    from cocoinr_nerfstudio.data.idr_dataparser import list_images, load_cameras_npz

    settings.output_dir.mkdir(parents=True, exist_ok=True)
    scene, scene_text = prepare_scene(settings)
    images = list_images(scene / "image")
    world_mats, scale_mats = load_cameras_npz(scene / "cameras.npz", len(images))
    gt_mesh = scene / "gt_mesh.ply" if (scene / "gt_mesh.ply").is_file() else None

    codebook, codebook_text = ([], "not used (volsdf only)")
    if "coco-inr" in settings.methods:
        codebook, codebook_text = codebook_flags(settings)
        print(f"coco-inr prior: {codebook_text}")

    splits = {v: split_of(settings, scene, v) for v in settings.views}
    view = choose_figure_view(len(images), list(splits.values()))
    gt_image = np.asarray(Image.open(images[view]).convert("RGB"), np.float64) / 255.0
    height, width = gt_image.shape[:2]
    normal_frame = scale_mats[0][:3, :3].T  # world normals -> the model's normalised frame
    gt_render = None
    if gt_mesh is not None:
        import trimesh

        gt = trimesh.load(gt_mesh, process=False)
        gt_render = render_mesh(gt.vertices, gt.faces, world_mats[view], width, height, normal_frame)

    plan = [(method, views) for method in settings.methods for views in settings.views]
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        futures = [pool.submit(train, settings, scene, method, views, codebook) for method, views in plan]
        trained = [future.result() for future in futures]

    results: list[RunResult] = []
    for (method, views), (config, command, train_wall) in zip(plan, trained, strict=True):
        name = run_name(method, views)
        print(f"[{name}] evaluating held-out views", flush=True)
        metrics, info = evaluate_images(config, settings.output_dir / "renders" / name, view)
        if info["step"] != settings.steps - 1:
            raise BenchmarkError(f"{config}: loaded step {info['step']}, expected {settings.steps - 1}")
        print(f"[{name}] extracting and scoring the mesh", flush=True)
        mesh_path: Path | None = settings.output_dir / "meshes" / f"{name}.ply"
        mesh_metrics, note = extract_and_score(config, mesh_path, gt_mesh, settings)
        figure_mesh = None
        if note.startswith("no mesh"):
            mesh_path = None
        else:
            import trimesh

            mesh = trimesh.load(mesh_path, process=False)
            figure_mesh = render_mesh(mesh.vertices, mesh.faces, world_mats[view], width, height).shaded
        result = RunResult(
            method=method,
            views=views,
            train_indices=info["train_indices"],
            num_eval_views=info["num_eval_views"],
            image_metrics={k: float(v) for k, v in metrics.items()},
            mesh_metrics=mesh_metrics,
            mesh_path=None if mesh_path is None else str(mesh_path),
            mesh_note=note,
            training=training_summary(config, settings.steps),
            train_wall_seconds=train_wall,
            command=command,
            figure_rgb=info.get("rgb"),
            figure_normals=info.get("normals"),
            figure_mesh=figure_mesh,
        )
        results.append(result)
        print(
            f"[{name}] PSNR {_fmt(result.image_metrics.get('psnr'), 2)} dB, Chamfer {_fmt(mesh_metrics['chamfer'], 3)}",
            flush=True,
        )

    device_label = device_name(settings)
    eval_device = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "CPU"
    header = {
        "Device": f"{device_label} (training: ns-train --machine.device-type {settings.device}; "
        f"evaluation: {eval_device})",
        "Scene": scene_text,
        "Training": f"{settings.steps} iterations per run, "
        f"{settings.rays if settings.rays is not None else 'the method default (1024)'} rays/step, "
        f"idr-data --num-views {' / '.join(map(str, settings.views))} {' '.join(dataparser_args(settings))} "
        f"(train views: {'; '.join(f'{v}: {splits[v]}' for v in settings.views)}), --machine.seed {settings.seed}"
        + (", tiny model (--tiny)" if settings.tiny else ", full model")
        + "; train time = first to last iteration (from the run's files), start-up excluded",
        "Codebook (coco-inr)": codebook_text,
        "Held-out images": f"held-out views (not in the training split) with idr-data --eval-stride "
        f"{settings.eval_stride}; PSNR/SSIM/masked PSNR (object pixels) as ns-eval computes them",
        "Meshes": f"cocoinr-extract-mesh --resolution {settings.mesh_resolution}, world units"
        + (", culled by the training masks" if settings.cull_by_masks else ", not culled")
        + f"; scored against gt_mesh.ply with {settings.mesh_samples} surface samples each "
        "(cocoinr-eval-mesh --gt: accuracy = mesh->GT, completeness = GT->mesh, Chamfer = mean, "
        "Hausdorff = worst; world units)",
        "Versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"nerfstudio {_version('nerfstudio')}, cocoinr-nerfstudio {_version('cocoinr-nerfstudio')} "
        f"(git {_git_revision()})",
        "Date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    report = markdown_report(settings, results, header)
    (settings.output_dir / "results.md").write_text(report)
    data = {
        "header": header,
        "settings": _finite_or_none(json.loads(json.dumps(dataclasses.asdict(settings), default=str))),
        "figure_view": view,
        "runs": [r.to_json() for r in results],
    }
    (settings.output_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    write_figure(settings.output_dir / "fewview.png", results, gt_image, gt_render, view, device_label)
    print(report)
    print(f"Wrote {settings.output_dir / 'results.md'}, results.json and fewview.png")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    try:
        run(settings)
    except BenchmarkError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0
