"""coco-inr under nerfstudio's DistributedDataParallel path: 2 CPU processes (gloo) train the tiny scene.

One module-scoped run does what ``ns-train coco-inr --machine.num-devices 2`` does (the registered
config, ``train_loop``, ``Trainer``, ``VanillaPipeline``'s DDP wrapper, rank-0 checkpointing) on CPU,
with ``RecordingTrainLoop`` saving each rank's parameters, gradients and DDP traffic; the tests
below check that record and the checkpoint.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import tyro
import yaml
from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.utils.eval_utils import eval_setup

from cocoinr_nerfstudio.benchmarks.ddp import RecordingTrainLoop, launch, load_records
from cocoinr_nerfstudio.codebook import random_codebook
from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings
from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig
from cocoinr_nerfstudio.method_configs import coco_inr
from cocoinr_nerfstudio.models.coco_inr import PRIOR_HEADS

WORLD_SIZE = 2
STEPS = 3
RAYS = 64
CODEBOOK_SHAPE = (64, 16)
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # real (tiny) training runs: about 40 s for the whole file on 2 CPU cores


def tiny_trainer_config(scene: Path, output_dir: Path) -> TrainerConfig:
    """The registered ``coco-inr`` config, as ``--machine.num-devices 2 --machine.device-type cpu`` sets it,
    with a narrowed model so a CPU step takes a fraction of a second."""
    config = copy.deepcopy(coco_inr.config)
    config.output_dir = output_dir
    config.experiment_name = "ddp"
    config.timestamp = "run"
    config.vis = "tensorboard"  # no viewer server; evaluation steps are pushed past the run below
    config.max_num_iterations = STEPS
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10_000
    config.machine.num_devices = WORLD_SIZE
    config.machine.device_type = "cpu"
    datamanager = config.pipeline.datamanager
    datamanager.dataparser.data = scene
    datamanager.dataparser.num_views = 4
    datamanager.train_num_rays_per_batch = RAYS
    datamanager.eval_num_rays_per_batch = RAYS
    model = config.pipeline.model
    model.codebook_source = "random"
    model.random_codebook_shape = CODEBOOK_SHAPE
    model.codebook_attention = CodebookAttentionSettings(num_latents=8, latent_dim=16, depth=1, ff_mult=2)
    model.sdf_field = CocoFieldConfig(geometry_hidden_dims=(32, 32), feature_dim=16)
    model.background_field.hidden_dims = (32,)
    model.background_field.feature_dim = 16
    model.num_samples = 8
    model.num_samples_eval = 16
    model.num_samples_extra = 4
    model.num_samples_outside = 4
    model.max_total_iters = 3
    return config


@pytest.fixture(scope="module")
def ddp_run(tiny_scene, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    config = tiny_trainer_config(tiny_scene.path, root / "outputs")
    config.save_config()  # as ns-train does before launching the workers
    records_dir = root / "records"
    # forkserver: spawn's pickled hand-over without re-importing nerfstudio in every worker
    launch(
        RecordingTrainLoop(records_dir, gradient_steps=STEPS),
        config,
        WORLD_SIZE,
        "cpu",
        cpu_start_method="forkserver",
    )
    return SimpleNamespace(config=config, records=load_records(records_dir, WORLD_SIZE))


def trainable(record: dict) -> list[str]:
    return sorted(record["steps"][0]["synced_gradients"])


def test_ddp_config_survives_the_pickling_of_spawned_workers(tiny_scene, tmp_path):
    config = tiny_trainer_config(tiny_scene.path, tmp_path)
    assert pickle.loads(pickle.dumps(config)) == config


def test_ddp_wraps_the_model_and_trains_every_step_on_both_ranks(ddp_run):
    for record in ddp_run.records:
        assert record["world_size"] == WORLD_SIZE
        assert record["ddp"] is not None and record["ddp"]["find_unused_parameters"]
        assert record["rays_per_batch"] == RAYS
        assert [s["step"] for s in record["steps"]] == list(range(STEPS))
        assert all(torch.isfinite(torch.tensor(s["loss"])) for s in record["steps"])


def test_ddp_ranks_start_from_rank0_weights_and_end_with_identical_trained_parameters(ddp_run):
    rank0, rank1 = ddp_run.records
    # each rank seeds its own initialisation (seed + rank); DDP's initial broadcast replaces rank 1's with rank 0's
    setup = [[b for b in r["broadcasts"] if b["step"] == "setup"] for r in ddp_run.records]
    assert len(setup[0]) == len(setup[1]) == 1
    assert setup[0][0]["sums_before"] != setup[1][0]["sums_before"]
    assert setup[0][0]["sums_after"] == setup[1][0]["sums_after"] == setup[0][0]["sums_before"]
    assert rank0["initial_state"].keys() == rank1["final_state"].keys()
    for name in rank0["initial_state"]:
        torch.testing.assert_close(rank0["initial_state"][name], rank1["initial_state"][name], rtol=0, atol=0)
        torch.testing.assert_close(rank0["final_state"][name], rank1["final_state"][name], rtol=0, atol=0)
    names = trainable(rank0)
    changed = [n for n in names if not torch.equal(rank0["final_state"][n], rank0["initial_state"][n])]
    assert changed == names  # Adam moved every parameter that received a gradient


def test_ddp_gradients_are_the_average_of_the_ranks_local_gradients(ddp_run):
    rank0, rank1 = ddp_run.records
    names = trainable(rank0)
    assert names == trainable(rank1)
    for step in range(STEPS):
        s0, s1 = rank0["steps"][step], rank1["steps"][step]
        assert sorted(s0["local_gradients"]) == names
        # the ranks drew different rays, so they computed different gradients ...
        differing = [n for n in names if not torch.equal(s0["local_gradients"][n], s1["local_gradients"][n])]
        assert len(differing) > len(names) // 2
        assert s0["loss"] != s1["loss"]
        for name in names:
            # ... and both stepped with their mean
            torch.testing.assert_close(s0["synced_gradients"][name], s1["synced_gradients"][name], rtol=0, atol=0)
            mean = (s0["local_gradients"][name] + s1["local_gradients"][name]) / 2
            torch.testing.assert_close(s0["synced_gradients"][name], mean, rtol=1e-6, atol=1e-9)


def test_ddp_model_has_no_unused_parameters(ddp_run):
    """Only nerfstudio's empty ``device_indicator_param`` gets no gradient; every prior head is trained."""
    record = ddp_run.records[0]
    buffers = ("prior.codebook", "_extra_state")  # the state dict's non-parameters (the latter: training state)
    parameters = {n for n in record["initial_state"] if n not in buffers and "encoding.freqs" not in n}
    assert parameters - set(trainable(record)) == {"device_indicator_param"}
    for head in PRIOR_HEADS:
        assert any(n.startswith(f"prior.attentions.{head}.") for n in trainable(record))
    # (the geometric initialisation zeroes the SDF's attended inputs, so the geometry head starts at step 1)
    for name in trainable(record):
        assert any(s["synced_gradients"][name].abs().sum() > 0 for s in record["steps"]), name


def test_ddp_prototypes_are_recomputed_once_per_step_on_each_rank(ddp_run):
    for record in ddp_run.records:
        assert [s["codebook_attention_calls"] for s in record["steps"]] == [len(PRIOR_HEADS)] * STEPS


def test_ddp_never_broadcasts_the_codebook(ddp_run):
    expected = random_codebook(CODEBOOK_SHAPE, seed=0)
    for record in ddp_run.records:
        ddp = record["ddp"]
        assert "prior.codebook" in ddp["parameters_to_ignore"]
        assert "prior.codebook" not in ddp["synced_buffers"]
        codebook_storage = record["buffer_storages"]["prior.codebook"]
        assert record["broadcasts"], "DDP broadcast nothing at all: the check below would be vacuous"
        assert all(codebook_storage not in b["storages"] for b in record["broadcasts"])
        # before each forward, only the remaining (tiny, constant) buffers travel, if any remain
        synced_bytes = sum(record["buffer_bytes"][n] for n in ddp["synced_buffers"])
        per_step = [b["bytes"] for b in record["broadcasts"] if b["step"] != "setup"]
        assert per_step == ([synced_bytes] * STEPS if ddp["syncs_buffers_each_forward"] else [])
        assert synced_bytes < record["buffer_bytes"]["prior.codebook"]
        # every rank built the same codebook itself
        torch.testing.assert_close(record["final_state"]["prior.codebook"], expected, rtol=0, atol=0)


def test_ddp_checkpoint_is_written_once_by_rank0_and_loads_in_eval_setup(ddp_run):
    rank0, rank1 = ddp_run.records
    checkpoints = sorted(ddp_run.config.get_checkpoint_dir().glob("*.ckpt"))
    assert [p.name for p in checkpoints] == [f"step-{STEPS - 1:09d}.ckpt"]
    assert rank0["checkpoints_written"] == [str(checkpoints[0])]
    assert rank1["checkpoints_written"] == []

    _, pipeline, path, step = eval_setup(ddp_run.config.get_base_dir() / "config.yml", test_mode="test")
    assert path == checkpoints[0] and step == STEPS - 1
    state = pipeline.model.state_dict()
    assert state.keys() == rank0["final_state"].keys()
    for name, value in state.items():
        torch.testing.assert_close(value, rank0["final_state"][name], rtol=0, atol=0)
    camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    camera.rescale_output_resolution(0.25)
    with torch.no_grad():
        outputs = pipeline.model.get_outputs_for_camera(camera)
    assert outputs["rgb"].shape == (12, 16, 3) and torch.isfinite(outputs["rgb"]).all()


def test_ddp_benchmark_script_tiny_cpu_mode(tiny_scene, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_ddp", REPO / "scripts" / "benchmark_ddp.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    args = ["--device", "cpu", "--steps", "3", "--rays", "64", "--tiny", "--start-method", "forkserver"]
    results = benchmark.main([*args, "--scene", str(tiny_scene.path), "--output", str(tmp_path)])

    rows = results["summary"]
    assert [row["world_size"] for row in rows] == [1, 2]
    assert [row["rays_per_step"] for row in rows] == [64, 128]
    assert rows[0]["scaling_efficiency"] == 1.0
    for row in rows:
        assert row["rays_per_second"] > 0 and row["final_loss"] > 0
        assert row["rays_per_second"] == pytest.approx(row["rays_per_step"] * row["iterations_per_second"])
    table = capsys.readouterr().out
    assert "| world size | rays/step (total) | it/s | rays/s | scaling efficiency | final loss |" in table
    assert table.count("| CPU (") == 2
    lines = (tmp_path / "loss_curves.csv").read_text().splitlines()
    assert lines[0].startswith("world_size,rank,step,seconds,loss")
    assert len(lines) == 1 + 3 * (1 + 2)  # steps x (1 rank + 2 ranks)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == rows

    # what it ran is what the ns-train command it prints for each run builds (paths aside)
    cli = benchmark.parse_args([*args, "--scene", str(tiny_scene.path), "--output", str(tmp_path)])
    for row in rows:
        assert row["ns_train_command"].startswith(f"ns-train coco-inr --machine.num-devices {row['world_size']} ")
        parsed = tyro.cli(AnnotatedBaseConfigUnion, args=shlex.split(row["ns_train_command"])[1:])
        ran = yaml.load(Path(row["config"]).read_text(), Loader=yaml.Loader)
        for attr in ("output_dir", "experiment_name", "timestamp"):
            setattr(parsed, attr, getattr(ran, attr))
        assert parsed == ran == benchmark.make_config(cli, tiny_scene.path, row["world_size"])
