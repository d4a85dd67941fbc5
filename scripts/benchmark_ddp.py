"""Data-parallel scaling of coco-inr: 1 vs N processes at the same rays per process, through nerfstudio's DDP.

Each configuration trains ``coco-inr`` exactly as ``ns-train coco-inr --machine.num-devices N`` does:
the method's registered TrainerConfig, nerfstudio's ``launch`` (on CUDA: its own spawn +
``_distributed_worker`` + nccl; on CPU: the gloo equivalent in ``cocoinr_nerfstudio.benchmarks.ddp``),
``train_loop``, ``Trainer`` and ``VanillaPipeline``'s DistributedDataParallel. Every rank records the
duration and loss of each ``Trainer.train_iteration`` (forward, backward with the gradient all-reduce,
optimizer step; CUDA-synchronised), nothing else is changed.

GPU host (paper model, random 16384x256 codebook since VQGAN's is not bundled; scene generated once):

    python scripts/benchmark_ddp.py --device cuda --world-sizes 1 2 --rays 1024 --steps 300

CPU smoke check (tiny model and scene; its throughput numbers mean nothing, a single CPU process
uses every core while each of N processes gets 1/N of them):

    python scripts/benchmark_ddp.py --device cpu --steps 3 --rays 64 --tiny

Prints a Markdown table and writes ``results.json`` (summary, environment, per-step records) and
``loss_curves.csv`` (world_size, rank, step, seconds, loss and its terms) to ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import cocoinr_nerfstudio  # noqa: F401
except ImportError:  # run from a checkout that is not installed: the package sits next to scripts/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nerfstudio.engine.trainer import TrainerConfig

from cocoinr_nerfstudio.benchmarks.ddp import RecordingTrainLoop, launch, load_records
from cocoinr_nerfstudio.data.scene_generator import generate_scene
from cocoinr_nerfstudio.method_configs import coco_inr

FINAL_LOSS_STEPS = 10
"""The reported final loss averages this many last steps over all ranks (one step's loss is noisy)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="processes (GPUs) per run")
    parser.add_argument("--rays", type=int, default=1024, help="rays per step per process (GPU)")
    parser.add_argument("--steps", type=int, default=300, help="training iterations per run")
    parser.add_argument("--warmup", type=int, default=30, help="first steps left out of the timing median")
    parser.add_argument("--tiny", action="store_true", help="tiny model and 8-view 64x48 scene (smoke check)")
    parser.add_argument("--scene", type=Path, default=None, help="existing IDR scene (default: generate one)")
    parser.add_argument("--views", type=int, default=49, help="views of the generated scene")
    parser.add_argument("--width", type=int, default=400, help="width of the generated scene")
    parser.add_argument("--height", type=int, default=300, help="height of the generated scene")
    parser.add_argument(
        "--codebook-shape", type=int, nargs=2, default=None, help="random codebook (default 16384 256; tiny: 64 16)"
    )
    parser.add_argument("--output", type=Path, default=None, help="default: outputs/benchmark_ddp/<time>")
    parser.add_argument(
        "--start-method",
        choices=("spawn", "forkserver"),
        default="spawn",
        help="CPU multi-process start (CUDA always uses nerfstudio's spawn)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rays < 1 or min(args.world_sizes) < 1:
        parser.error("--steps, --rays and --world-sizes must be positive")
    if args.codebook_shape is None:
        args.codebook_shape = [64, 16] if args.tiny else [16384, 256]
    if args.output is None:
        args.output = Path("outputs/benchmark_ddp") / time.strftime("%Y-%m-%d_%H%M%S")
    return args


TINY_MODEL = {
    "codebook_attention.num_latents": 8,
    "codebook_attention.latent_dim": 16,
    "codebook_attention.depth": 1,
    "codebook_attention.ff_mult": 2,
    "sdf_field.geometry_hidden_dims": (32, 32),
    "sdf_field.feature_dim": 16,
    "background_field.hidden_dims": (32,),
    "background_field.feature_dim": 16,
    "num_samples": 8,
    "num_samples_eval": 16,
    "num_samples_extra": 4,
    "num_samples_outside": 4,
    "max_total_iters": 3,
}
"""``--tiny``: the real architecture, narrowed so a CPU step takes a fraction of a second (model config paths)."""


def shrink_model(config: TrainerConfig) -> None:
    for path, value in TINY_MODEL.items():
        *parents, name = path.split(".")
        target = config.pipeline.model
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)


def make_config(args: argparse.Namespace, scene: Path, world_size: int) -> TrainerConfig:
    """``ns-train coco-inr`` with the overrides of :func:`ns_train_command`."""
    config = copy.deepcopy(coco_inr.config)
    config.output_dir = args.output / "runs"
    config.experiment_name = f"world_size_{world_size}"
    config.timestamp = "benchmark"
    config.vis = "tensorboard"
    config.max_num_iterations = args.steps
    never = args.steps + 1  # no evaluation and no intermediate checkpoint inside the timed run
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = never
    config.steps_per_save = never
    config.machine.num_devices = world_size
    config.machine.device_type = args.device
    datamanager = config.pipeline.datamanager
    datamanager.dataparser.data = scene
    datamanager.train_num_rays_per_batch = args.rays
    datamanager.eval_num_rays_per_batch = args.rays
    model = config.pipeline.model
    model.codebook_source = "random"
    model.random_codebook_shape = tuple(args.codebook_shape)
    if args.tiny:
        shrink_model(config)
    return config


def ns_train_command(args: argparse.Namespace, scene: Path, world_size: int) -> str:
    """The ``ns-train`` command line that builds the same TrainerConfig as :func:`make_config`."""

    def flag(path: str, value: Any) -> str:
        text = " ".join(str(v) for v in value) if isinstance(value, tuple | list) else str(value)
        return f"--{path.replace('_', '-')} {text}"

    never = args.steps + 1
    flags = {
        "machine.num_devices": world_size,
        "machine.device_type": args.device,
        "max_num_iterations": args.steps,
        "steps_per_eval_batch": never,
        "steps_per_eval_image": never,
        "steps_per_eval_all_images": never,
        "steps_per_save": never,
        "vis": "tensorboard",
        "pipeline.datamanager.train_num_rays_per_batch": args.rays,
        "pipeline.datamanager.eval_num_rays_per_batch": args.rays,
        "pipeline.model.codebook_source": "random",
        "pipeline.model.random_codebook_shape": tuple(args.codebook_shape),
    }
    if args.tiny:
        flags.update({f"pipeline.model.{path}": value for path, value in TINY_MODEL.items()})
    return " ".join(["ns-train coco-inr", *(flag(k, v) for k, v in flags.items()), f"idr-data --data {scene}"])


def summarise(records: list[dict[str, Any]], rays: int, warmup: int) -> dict[str, Any]:
    """Median step time after warm-up (slowest rank per step) and the mean loss of the last steps."""
    world_size = len(records)
    num_steps = min(len(r["steps"]) for r in records)
    seconds = [max(r["steps"][i]["seconds"] for r in records) for i in range(num_steps)]
    warmup = min(warmup, num_steps - 1)  # a short smoke run still times its last step
    timed = seconds[warmup:]
    median = statistics.median(timed)
    last = range(max(0, num_steps - FINAL_LOSS_STEPS), num_steps)
    return {
        "world_size": world_size,
        "rays_per_process": rays,
        "rays_per_step": rays * world_size,
        "warmup_steps": warmup,
        "timed_steps": len(timed),
        "median_step_seconds": median,
        "iterations_per_second": 1.0 / median,
        "rays_per_second": rays * world_size / median,
        "final_loss": statistics.fmean(r["steps"][i]["loss"] for r in records for i in last),
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def markdown_table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        "| device | world size | rays/step (total) | it/s | rays/s | scaling efficiency | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {name} | {row['world_size']} | {row['rays_per_step']} | {row['iterations_per_second']:.2f} | "
            f"{row['rays_per_second']:,.0f} | {100 * row['scaling_efficiency']:.1f}% | {row['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def write_loss_curves(path: Path, runs: dict[int, list[dict[str, Any]]]) -> None:
    terms = sorted({k for records in runs.values() for r in records for s in r["steps"] for k in s["losses"]})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["world_size", "rank", "step", "seconds", "loss", *terms])
        for world_size, records in runs.items():
            for record in records:
                for s in record["steps"]:
                    losses = [s["losses"].get(k, "") for k in terms]
                    writer.writerow([world_size, record["rank"], s["step"], s["seconds"], s["loss"], *losses])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.world_sizes):
        raise SystemExit(
            f"--world-sizes {max(args.world_sizes)} needs that many GPUs; {torch.cuda.device_count()} visible."
        )
    args.output.mkdir(parents=True, exist_ok=True)
    scene = args.scene
    if scene is None:
        views, width, height = (8, 64, 48) if args.tiny else (args.views, args.width, args.height)
        scene = args.output.parent / f"scene_{views}x{width}x{height}"
        if not (scene / "cameras.npz").is_file():
            print(f"Generating a {views}-view {width}x{height} scene in {scene}", flush=True)
            generate_scene(scene, num_views=views, width=width, height=height, mesh_resolution=64, overwrite=True)
    scene = scene.resolve()

    runs: dict[int, list[dict[str, Any]]] = {}
    rows = []
    # largest first: the in-process single-GPU run comes last, so no model of it lingers on GPU 0 meanwhile
    for world_size in sorted(set(args.world_sizes), reverse=True):
        config = make_config(args, scene, world_size)
        config.save_config()
        record_dir = args.output / "records" / f"world_size_{world_size}"
        print(f"\n=== world size {world_size}: {ns_train_command(args, scene, world_size)}", flush=True)
        launch(
            RecordingTrainLoop(record_dir, save_parameters=False),
            config,
            world_size,
            args.device,
            cpu_start_method=args.start_method,
        )
        runs[world_size] = load_records(record_dir, world_size)
        rows.append(summarise(runs[world_size], args.rays, args.warmup))
        rows[-1]["ns_train_command"] = ns_train_command(args, scene, world_size)
        rows[-1]["config"] = str(config.get_base_dir() / "config.yml")
    rows.sort(key=lambda row: row["world_size"])
    base = rows[0]
    per_process = base["rays_per_second"] / base["world_size"]
    for row in rows:
        row["scaling_efficiency"] = row["rays_per_second"] / (row["world_size"] * per_process)

    name = device_name(args.device)
    table = markdown_table(name, rows)
    print(f"\n{table}\n")
    print(
        f"rays/s = world size x rays per process / median step time over {base['timed_steps']} steps after "
        f"{base['warmup_steps']} warm-up steps (slowest rank per step); efficiency relative to world size "
        f"{base['world_size']}; final loss = mean over ranks of the last {FINAL_LOSS_STEPS} steps."
    )
    write_loss_curves(args.output / "loss_curves.csv", runs)
    results = {
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scene": str(scene),
        "summary": rows,
        "markdown": table,
        "rank0_steps": {
            str(ws): [{k: s[k] for k in ("step", "seconds", "loss", "losses")} for s in records[0]["steps"]]
            for ws, records in runs.items()
        },
    }
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Wrote {args.output / 'results.json'} and {args.output / 'loss_curves.csv'}")
    return results


if __name__ == "__main__":
    main()
