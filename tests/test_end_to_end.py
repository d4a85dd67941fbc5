"""The user's whole path on CPU, through the real command-line tools, on the tiny generated scene.

One ``ns-train coco-inr`` run (shrunk model, random codebook) is shared by the module: reload with ``eval_setup``
(torch >= 2.6 ``weights_only`` checkpoints) and render a held-out view, ``ns-eval`` with renders,
``cocoinr-extract-mesh`` + ``cocoinr-eval-mesh`` against the scene's ground truth, ``ns-export poisson`` and
resuming with ``--load-dir``. A last test runs the trainer in-process and checks that the loss goes down.

Every subprocess runs in a scratch folder with an empty ``TORCH_HOME`` (no cached AlexNet: LPIPS must be skipped
as it is offline) and an empty ``XDG_CACHE_HOME`` (no codebook found by accident).
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from cocoinr_nerfstudio.benchmarks.fewview import TINY_MODEL_ARGS
from cocoinr_nerfstudio.data.scene_generator import SceneInfo
from cocoinr_nerfstudio.model_components.extra_state import decode_extra_state

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ITERATIONS = 4  # first run: steps 0..3, checkpoint step-000000003.ckpt
MORE_ITERATIONS = 3  # resumed run: nerfstudio 1.1.5 counts --max-num-iterations from the loaded step
TRAIN_VIEWS = [0, 4, 7]  # idr-data --num-views 3 on 8 views (even split)
EVAL_VIEWS = [1, 2, 3, 5, 6]


def _model_args() -> list[str]:
    return [
        "--machine.device-type",
        "cpu",
        "--vis",
        "tensorboard",
        "--machine.seed",
        "0",
        "--steps-per-eval-batch",
        "0",
        "--steps-per-eval-image",
        "0",
        "--steps-per-eval-all-images",
        "0",
        "--pipeline.datamanager.train-num-rays-per-batch",
        "128",
        "--pipeline.model.codebook-source",
        "random",
        "--pipeline.model.random-codebook-shape",
        "64",
        "16",
        *TINY_MODEL_ARGS,
    ]


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    scene: SceneInfo

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Runs a console script of this environment; fails the test with its output if it fails."""
        proc = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert proc.returncode == 0, (
            f"{' '.join(args)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-4000:]}"
        )
        return proc

    def train(self, timestamp: str, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
        """``ns-train coco-inr`` on the tiny scene; returns the run folder (holding config.yml)."""
        proc = self.run(
            "ns-train",
            "coco-inr",
            "--data",
            str(self.scene.path),
            "--output-dir",
            str(self.root / "outputs"),  # absolute: the in-process eval_setup runs from another folder
            "--experiment-name",
            "e2e",
            "--timestamp",
            timestamp,
            *_model_args(),
            *extra,
            "idr-data",
            "--num-views",
            "3",
        )
        return self.root / "outputs" / "e2e" / "coco-inr" / timestamp, proc


@pytest.fixture(scope="module")
def workspace(tiny_scene: SceneInfo, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("e2e")
    (root / "torch_home").mkdir()
    (root / "cache").mkdir()
    env = dict(os.environ, TORCH_HOME=str(root / "torch_home"), XDG_CACHE_HOME=str(root / "cache"), COLUMNS="200")
    return Workspace(root, env, tiny_scene)


@pytest.fixture(scope="module")
def trained(workspace: Workspace) -> tuple[Path, subprocess.CompletedProcess]:
    """(a) ns-train coco-inr --max-num-iterations 4 --steps-per-save 4 ... idr-data --num-views 3."""
    return workspace.train("first", "--max-num-iterations", str(ITERATIONS), "--steps-per-save", str(ITERATIONS))


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))


@pytest.fixture(scope="module")
def loaded(trained):
    """(b) nerfstudio's eval_setup on the run's config.yml, as ns-eval / ns-export / the viewer load it."""
    from nerfstudio.utils.eval_utils import eval_setup

    run_dir, _ = trained
    _, pipeline, path, step = eval_setup(run_dir / "config.yml", test_mode="test")
    return pipeline, Path(path), step


def _sdf_and_normal(pipeline, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The trained SDF and its unit gradient at points of the model's (normalised) frame."""
    x = torch.as_tensor(points, dtype=torch.float32, device=pipeline.device)
    sdf, _, gradient = pipeline.model.field.sdf_and_gradient(x, False)
    normal = torch.nn.functional.normalize(gradient.detach(), dim=-1)
    return sdf.detach().reshape(-1).cpu().numpy(), normal.cpu().numpy()


def test_ns_train_writes_config_and_checkpoint(trained):
    run_dir, proc = trained
    output = proc.stdout + proc.stderr
    assert (run_dir / "config.yml").is_file()
    assert (run_dir / "dataparser_transforms.json").is_file()
    assert [p.name for p in _checkpoints(run_dir)] == [f"step-{ITERATIONS - 1:09d}.ckpt"]
    assert f"train views {TRAIN_VIEWS}, {len(EVAL_VIEWS)} eval views" in output
    assert "Prior-free ablation: using a random N(0,1) codebook of shape (64, 16)" in output
    assert list(run_dir.glob("events.out.tfevents.*")), "--vis tensorboard wrote no event file"


def test_eval_setup_reloads_weights_only_checkpoint_and_renders_held_out_view(trained, loaded, tiny_scene):
    """(b) the checkpoint loads with torch's weights_only loader, and eval_setup restores exactly those weights."""
    run_dir, _ = trained
    checkpoint = _checkpoints(run_dir)[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["step"] == ITERATIONS - 1

    pipeline, path, step = loaded
    assert (path, step) == (checkpoint, ITERATIONS - 1)
    model = pipeline.model
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value.cpu(), state["pipeline"][f"_model.{name}"], rtol=0, atol=0, msg=name)
    metadata = pipeline.datamanager.train_dataparser_outputs.metadata
    assert (metadata["train_indices"], metadata["eval_indices"]) == (TRAIN_VIEWS, EVAL_VIEWS)

    cameras = pipeline.datamanager.eval_dataset.cameras
    assert len(cameras) == len(EVAL_VIEWS)
    with torch.no_grad():
        outputs = model.get_outputs_for_camera(cameras[0:1].to(pipeline.device))
    assert outputs["rgb"].shape == (tiny_scene.height, tiny_scene.width, 3)
    for key in ("rgb", "accumulation", "normals"):
        value = outputs[key]
        assert torch.isfinite(value).all() and value.min() >= 0 and value.max() <= 1 + 1e-5, key  # sums of weights
    assert (outputs["depth"] > 0).all()
    # the initial SDF is a rough sphere of radius ~0.6 around the object: the object's pixels are mostly opaque
    mask = np.asarray(Image.open(tiny_scene.path / "mask" / f"{EVAL_VIEWS[0]:06d}.png")) > 127
    accumulation = outputs["accumulation"][..., 0].cpu().numpy()
    assert accumulation[mask].mean() > 0.5


def test_ns_eval_writes_metrics_and_renders_every_held_out_view(workspace, trained, tiny_scene):
    """(c) psnr, ssim, psnr_masked; LPIPS skipped offline with one warning; rgb + normal PNGs of every eval view."""
    run_dir, _ = trained
    proc = workspace.run(
        "ns-eval",
        "--load-config",
        str(run_dir / "config.yml"),
        "--output-path",
        "m.json",
        "--render-output-path",
        "renders",
    )
    results = json.loads((workspace.root / "m.json").read_text())["results"]
    for key in ("psnr", "ssim", "psnr_masked"):
        assert np.isfinite(results[key]), key
    assert 5 < results["psnr"] < 40 and 0 < results["ssim"] <= 1
    assert "lpips" not in results
    assert (proc.stdout + proc.stderr).count("LPIPS skipped") == 1
    renders = workspace.root / "renders"
    for i in range(len(EVAL_VIEWS)):
        for kind in ("rgb", "normal"):
            image = Image.open(renders / f"eval_{kind}_{i:04d}.png")
            assert image.size == (tiny_scene.width, tiny_scene.height), (kind, i)
    assert not (renders / f"eval_rgb_{len(EVAL_VIEWS):04d}.png").exists()


def test_held_out_average_skips_a_view_without_mask_pixels(loaded, monkeypatch, capsys):
    """A held-out view whose mask is empty has no masked PSNR: the average is over the other views, not NaN."""
    import cocoinr_nerfstudio.models.coco_inr as coco_module

    pipeline, _, _ = loaded
    calls, original = [], coco_module.masked_psnr

    def first_view_empty(rgb, image, mask):
        calls.append(1)
        return None if len(calls) == 1 else original(rgb, image, mask)

    monkeypatch.setattr(coco_module, "masked_psnr", first_view_empty)
    results = pipeline.get_average_eval_image_metrics(get_std=True)
    assert len(calls) == len(EVAL_VIEWS) and np.isfinite(results["psnr_masked"]), results
    assert "psnr_masked: undefined on 1 image(s)" in " ".join(capsys.readouterr().out.split())
    assert pipeline.model.image_metrics_log is None


def test_extract_mesh_in_world_units_and_eval_mesh(workspace, trained, loaded, tiny_scene):
    """(d) cocoinr-extract-mesh writes world units overlapping the GT; cocoinr-eval-mesh prints JSON."""
    run_dir, _ = trained
    workspace.run(
        "cocoinr-extract-mesh",
        "--load-config",
        str(run_dir / "config.yml"),
        "--resolution",
        "64",
        "--output-path",
        "mesh.ply",
    )
    mesh = trimesh.load(workspace.root / "mesh.ply", process=False)
    gt = trimesh.load(tiny_scene.mesh_path, process=False)
    assert len(mesh.faces) > 100
    lo, hi = np.maximum(mesh.bounds[0], gt.bounds[0]), np.minimum(mesh.bounds[1], gt.bounds[1])
    overlap = np.prod(np.clip(hi - lo, 0, None))
    union = np.prod(np.ptp(mesh.bounds, axis=0)) + np.prod(np.ptp(gt.bounds, axis=0)) - overlap
    assert overlap / union > 0.2, (mesh.bounds, gt.bounds)
    # world units exactly: mapped back by scale_mat^-1, the vertices are on the model's zero level set, in the box
    normalised = tiny_scene.to_normalised(np.asarray(mesh.vertices))
    assert np.abs(normalised).max() <= 1 + 1e-6
    with torch.no_grad():
        x = torch.as_tensor(normalised, dtype=torch.float32, device=loaded[0].device)
        sdf = loaded[0].model.field.forward_geonetwork(x)[:, 0]
    assert sdf.abs().max() < 0.01

    proc = workspace.run(
        "cocoinr-eval-mesh", "--mesh", "mesh.ply", "--gt", str(tiny_scene.mesh_path), "--num-samples", "20000"
    )
    metrics = json.loads(proc.stdout)
    for key in ("accuracy", "completeness", "chamfer", "hausdorff"):
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["chamfer"] == pytest.approx((metrics["accuracy"] + metrics["completeness"]) / 2)
    assert metrics["hausdorff"] >= max(metrics["accuracy"], metrics["completeness"])


def test_ns_export_poisson_on_cpu(workspace, trained, loaded, tiny_scene):
    """(e) ns-export poisson: rgb, ray-distance depth and [0, 1] normals give a point cloud on the SDF's surface.

    Fast flags: few points, small ray batches (nerfstudio's default is 32768 rays at a time) and a small texture
    (the default NeRF texturing renders a 2048^2 texture of a 50k-face mesh through the model: long on a CPU).
    The exported files are in the model's normalised frame (ns-export does not apply scale_mat).
    """
    run_dir, _ = trained
    workspace.run(
        "ns-export",
        "poisson",
        "--load-config",
        str(run_dir / "config.yml"),
        "--output-dir",
        "poisson",
        "--num-points",
        "2000",
        "--num-rays-per-batch",
        "1024",
        "--num-pixels-per-side",
        "128",
        "--target-num-faces",
        "2000",
        "--save-point-cloud",
        "True",
    )
    import open3d as o3d

    cloud = o3d.io.read_point_cloud(str(workspace.root / "poisson" / "point_cloud.ply"))
    points, normals = np.asarray(cloud.points), np.asarray(cloud.normals)
    assert len(points) >= 1000 and normals.shape == points.shape
    # points sit near the SDF's zero level (depth is the distance along the ray; the Laplace density with beta 0.1
    # still blurs it a few iterations in) and carry the SDF's normals (the [0, 1] encoding decoded correctly)
    sdf, sdf_normals = _sdf_and_normal(loaded[0], points)
    assert np.median(np.abs(sdf)) < 0.2, np.percentile(np.abs(sdf), [50, 90])
    cosine = np.abs(np.sum(normals * sdf_normals, axis=1))
    assert np.median(cosine) > 0.95 and np.percentile(cosine, 10) > 0.8, np.percentile(cosine, [10, 50])
    mesh = o3d.io.read_triangle_mesh(str(workspace.root / "poisson" / "poisson_mesh.ply"))
    assert len(mesh.triangles) > 100
    # the poisson mesh to world units (scale_mat), as cocoinr-extract-mesh writes its own
    workspace.run(
        "cocoinr-extract-mesh",
        "--load-config",
        str(run_dir / "config.yml"),
        "--input-mesh",
        "poisson/poisson_mesh.ply",
        "--output-path",
        "poisson_world.ply",
    )
    world = trimesh.load(workspace.root / "poisson_world.ply", process=False)
    assert len(world.faces) == len(mesh.triangles)
    np.testing.assert_allclose(
        tiny_scene.to_normalised(np.asarray(world.vertices)), np.asarray(mesh.vertices), atol=1e-4
    )
    textured = trimesh.load(workspace.root / "poisson" / "mesh.obj", process=False)  # xatlas + NeRF texture
    assert len(textured.faces) > 100 and textured.visual.uv.shape == (len(textured.vertices), 2)
    assert Image.open(workspace.root / "poisson" / "material_0.png").size == (128, 128)


def test_resume_continues_from_the_saved_step(workspace, trained):
    """(f) --load-dir restores weights, optimiser and scheduler: Adam has taken ITERATIONS + MORE_ITERATIONS steps."""
    run_dir, _ = trained
    resumed_dir, proc = workspace.train(
        "resumed",
        "--load-dir",
        str(run_dir / "nerfstudio_models"),
        "--max-num-iterations",
        str(MORE_ITERATIONS),
        "--steps-per-save",
        "1000",
    )
    output = "".join((proc.stdout + proc.stderr).split())  # rich may wrap the path
    assert f"DoneloadingNerfstudiocheckpointfrom{run_dir}/nerfstudio_models/step-{ITERATIONS - 1:09d}.ckpt" in output
    last = ITERATIONS - 1 + MORE_ITERATIONS
    assert [p.name for p in _checkpoints(resumed_dir)] == [f"step-{last:09d}.ckpt"]
    state = torch.load(_checkpoints(resumed_dir)[0], map_location="cpu", weights_only=True)
    assert state["step"] == last
    adam_steps = {float(s["step"]) for s in state["optimizers"]["fields"]["state"].values()}
    assert adam_steps == {float(ITERATIONS + MORE_ITERATIONS)}
    assert state["schedulers"]["fields"]["last_epoch"] == ITERATIONS + MORE_ITERATIONS
    # the model's training state outside its weights rides along (tests/models/test_resume_state.py)
    assert decode_extra_state(state["pipeline"]["_model._extra_state"], "checkpoint") == {"version": 1}
    first = torch.load(_checkpoints(run_dir)[0], map_location="cpu", weights_only=True)
    changed = [
        k for k, v in state["pipeline"].items() if v.is_floating_point() and not torch.equal(v, first["pipeline"][k])
    ]
    assert changed, "the resumed run did not train"


def test_resume_keeps_the_sampler_precision_it_switched_to(workspace):
    """(f') A run whose float16 sampler queries switched to float32 at step 0 (an error limit of 0 x beta) resumes in
    float32: no new check, no new switch. Without the checkpoint's training state the resumed run would check again
    at its first step and record a switch there."""
    half = ["--pipeline.model.sampler-autocast", "float16", "--pipeline.model.sampler-autocast-max-error", "0"]
    first_dir, first = workspace.train("half", *half, "--max-num-iterations", "2", "--steps-per-save", "2")
    switched = "Sampler: float16 SDF queries err by"
    assert switched in first.stdout and "at step 0: they run in float32 from now on" in " ".join(first.stdout.split())
    saved = torch.load(_checkpoints(first_dir)[-1], map_location="cpu", weights_only=True)
    state = decode_extra_state(saved["pipeline"]["_model._extra_state"], "checkpoint")
    assert (state["sampler_precision"]["half"], state["sampler_precision"]["switches"]) == (False, [[0, False]])

    resumed_dir, resumed = workspace.train(
        "half-resumed", *half, "--load-dir", str(first_dir / "nerfstudio_models"), "--max-num-iterations", "2"
    )
    assert switched not in resumed.stdout
    final = torch.load(_checkpoints(resumed_dir)[-1], map_location="cpu", weights_only=True)
    assert final["step"] == 3
    state = decode_extra_state(final["pipeline"]["_model._extra_state"], "checkpoint")
    assert (state["sampler_precision"]["half"], state["sampler_precision"]["switches"]) == (False, [[0, False]])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("device", "cuda_graph", "hash_grid"),
    [
        ("cpu", False, False),
        ("cpu", True, False),
        ("cpu", False, True),
        pytest.param("cuda", True, False, marks=ON_GPU),
        pytest.param("cuda", True, True, marks=ON_GPU),
    ],
)
def test_in_process_training_decreases_the_loss(tiny_scene, tmp_path, device, cuda_graph, hash_grid, capsys):
    """(g) nerfstudio's Trainer on coco-inr's registered config, shrunk: 15 steps on one fixed batch of rays.
    With ``cuda_graph`` on a CPU the trainer says why it cannot capture and trains eagerly (static sampler); on a
    GPU it captures once and replays, with the optimizer and scheduler stepping between replays. ``hash_grid``
    adds the grid features and their own optimizer group."""
    from nerfstudio.configs import base_config  # noqa: F401  (before writer: importing writer first is circular)
    from nerfstudio.utils import writer

    from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings
    from cocoinr_nerfstudio.method_configs import coco_inr

    config = copy.deepcopy(coco_inr.config)
    config.output_dir = tmp_path
    config.experiment_name, config.timestamp = "in-process", "run"
    config.vis = "tensorboard"
    config.machine.device_type = device
    config.max_num_iterations = 15
    datamanager = config.pipeline.datamanager
    datamanager.data = tiny_scene.path
    datamanager.dataparser.num_views = 3
    datamanager.train_num_rays_per_batch = 256
    model = config.pipeline.model
    model.codebook_source, model.random_codebook_shape = "random", (64, 16)
    model.codebook_attention = CodebookAttentionSettings(num_latents=8, latent_dim=16, depth=1, ff_mult=2)
    model.sdf_field.geometry_hidden_dims, model.sdf_field.feature_dim = (32, 32), 16
    model.background_field.hidden_dims, model.background_field.feature_dim = (32,), 16
    model.num_samples, model.num_samples_eval, model.num_samples_extra = 8, 16, 4
    model.num_samples_outside, model.max_total_iters = 4, 3
    model.cuda_graph = cuda_graph
    model.sdf_field.use_hash_grid = hash_grid
    model.sdf_field.hash_grid.log2_hashmap_size, model.sdf_field.hash_grid.max_res = 12, 128

    writers_before = list(writer.EVENT_WRITERS)
    try:
        _seed_everything(0)
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        ray_bundle, batch = trainer.pipeline.datamanager.next_train(0)
        trainer.pipeline.datamanager.next_train = lambda step: (ray_bundle, batch)  # one fixed batch
        losses = []
        for step in range(15):
            loss, loss_dict, metrics = trainer.train_iteration(step)
            assert set(loss_dict) >= {"rgb_loss", "eikonal_loss"} and "psnr" in metrics
            losses.append(float(loss))
    finally:
        writer.EVENT_WRITERS[:] = writers_before
    assert all(np.isfinite(losses))
    assert trainer.pipeline.model.sampler.static_shapes is cuda_graph
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert ("not used because the device is cpu, not CUDA" in printed) is (cuda_graph and device == "cpu")
    if device == "cuda":
        assert trainer._graph_step is not None and trainer._graph_step.graph is not None
    if hash_grid:
        table = trainer.pipeline.model.field.hash_grid.table
        assert "hash_grid" in trainer.optimizers.optimizers and table.abs().max() > model.sdf_field.hash_grid.init_scale
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.85 * first, losses
