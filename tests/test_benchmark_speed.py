"""scripts/benchmark_speed.py runs anywhere: the issue's CPU smoke command, with the reference and a graph config."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str, monkeypatch):
    """A script of scripts/ as a module (they are files, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def run_main(module, argv: list[str]) -> str:
    """``module.main(argv)`` with no compiled code carried in or out, and TF32 (which the scripts switch on
    process-wide) as it was."""
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch._dynamo.reset()
    try:
        return module.main(argv)
    finally:
        torch._dynamo.reset()
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_every_script_starts_in_a_fresh_interpreter():
    """``python scripts/X.py --help`` for every script: in-process tests import nerfstudio before a script, which
    hid an import order that failed on its own (nerfstudio's writer module imported before its configs)."""
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert len(scripts) >= 11
    failed = {}
    for first in range(0, len(scripts), 2):  # two at a time: each imports torch and nerfstudio
        runs = {
            script.name: subprocess.Popen(
                [sys.executable, str(script), "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            for script in scripts[first : first + 2]
        }
        try:
            for name, run in runs.items():
                error = run.communicate(timeout=300)[1]
                if run.returncode != 0:
                    failed[name] = error.strip().splitlines()[-1:]
        finally:
            for run in runs.values():
                run.kill()  # a no-op for those that exited
    assert failed == {}


def test_speed_benchmark_on_cpu(tmp_path):
    out = tmp_path / "speed"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), TORCH_HOME=str(tmp_path / "torch"))
    command = [sys.executable, str(REPO / "scripts" / "benchmark_speed.py"), "--device", "cpu", "--steps", "3"]
    command += ["--rays", "64", "--configs", "reference", "graph", "--scene-size", "8", "32", "24"]
    command += ["--eval-stride", "4", "--no-mesh", "--curve-every", "3", "--output", str(out)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {row["name"]: row for row in json.loads(out.with_suffix(".json").read_text())}
    assert set(results) == {"reference", "graph"}, proc.stdout[-4000:] + proc.stderr[-4000:]
    for row in results.values():
        assert row["device"] == "CPU" and row["iters_per_sec"] > 0 and math.isfinite(row["final_loss"])
        curve = row["training_curve"]  # 1 warm-up step and 3 timed ones, in windows of 3
        assert list(curve) == ["step", "loss", "psnr", "beta", "eikonal", "sampler_refined"]
        assert curve["step"] == [3, 4] and all(len(values) == 2 for values in curve.values())
        assert all(math.isfinite(value) for values in curve.values() for value in values)
        assert curve["beta"][0] == pytest.approx(0.1, rel=0.05)  # the default beta at the start
        assert 5.0 < row["psnr"] < 60.0
        assert 0.0 <= row["sampler_refined"] <= 1.0 and row["sampler_truncated"] == 0.0  # no budget in these
        assert row["sampler_queries"] == "float32"  # neither config queries in half precision
    table = out.with_suffix(".md").read_text()
    assert table.startswith("Device: CPU; 64 rays/step; 3 timed steps") and "| graph |" in table
    printed = " ".join(proc.stdout.split())
    assert "--pipeline.model.cuda-graph: not used because the device is cpu, not CUDA" in printed
    before = out.with_suffix(".json").read_text()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode != 0 and f"benchmark_speed.py: {out.with_suffix('.md')} exists" in again.stderr
    assert out.with_suffix(".json").read_text() == before  # the earlier results are left as they were


def test_training_curve_averages_each_window_of_steps(monkeypatch):
    """Window means of the loss and the metrics the steps have; the last window keeps the steps left over; a metric
    some steps lack is averaged over those that have it."""
    module = load_script("benchmark_speed", monkeypatch)
    steps = [
        {"loss": 1.0, "beta": 0.1, "psnr": 10.0},
        {"loss": 3.0, "beta": 0.3, "psnr": 12.0, "eikonal": 0.5},
        {"loss": 5.0, "beta": 0.5, "psnr": 14.0},
        {"loss": 7.0, "beta": 0.7, "psnr": 16.0},
        {"loss": 9.0, "beta": 0.9, "psnr": 18.0},
    ]
    curve = module.training_curve(steps, every=2)
    assert curve["step"] == [2, 4, 5]
    assert curve["loss"] == [2.0, 6.0, 9.0] and curve["psnr"] == [11.0, 15.0, 18.0]
    assert curve["beta"] == pytest.approx([0.2, 0.6, 0.9])
    assert curve["eikonal"][0] == 0.5 and all(math.isnan(value) for value in curve["eikonal"][1:])
    assert "sampler_refined" not in curve  # no step had it
    assert module.training_curve(steps, every=10)["loss"] == [5.0]
    assert module.training_curve([], every=3) == {"step": []}
    with pytest.raises(ValueError, match="at least one step"):
        module.training_curve(steps, every=0)


def test_curve_every_refuses_a_window_of_no_steps(monkeypatch, capsys):
    module = load_script("benchmark_speed", monkeypatch)
    assert module.parse_args(["--device", "cpu"]).curve_every == 50
    with pytest.raises(SystemExit):
        module.parse_args(["--device", "cpu", "--curve-every", "0"])
    assert "--curve-every must be at least 1, got 0" in capsys.readouterr().err


def test_surface_metrics_tell_extra_surface_from_missing_surface(monkeypatch, tmp_path):
    """The extracted surface against the truth (a sphere of radius 0.5, world = twice the SDF's frame): the same
    sphere scores about 0, one piece, the same area; a second, smaller sphere beside it is extra surface: two pieces,
    the area of both, accuracy (surface to truth) far above completeness (truth to surface), which stays about 0."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    import trimesh

    module = load_script("benchmark_speed", monkeypatch)
    truth = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    truth.export(tmp_path / "gt_mesh.ply")
    scale = np.diag([2.0, 2.0, 2.0, 1.0])

    def pipeline(sdf):
        model = SimpleNamespace(field=SimpleNamespace(forward_geonetwork=lambda x: sdf(x)[:, None]))
        model.eval = model.train = lambda: None
        outputs = SimpleNamespace(metadata={"scale_mat": scale})
        return SimpleNamespace(model=model, datamanager=SimpleNamespace(train_dataparser_outputs=outputs))

    def sphere(x, centre=(0.0, 0.0, 0.0), radius=0.25):
        return (x - torch.tensor(centre)).norm(dim=-1) - radius

    same = module.surface_metrics(pipeline(sphere), tmp_path / "gt_mesh.ply", resolution=64, device="cpu")
    assert same["chamfer"] < 0.01 and same["mesh_components"] == 1
    assert same["mesh_area_ratio"] == pytest.approx(1.0, abs=0.02)
    extra = module.surface_metrics(
        pipeline(lambda x: torch.minimum(sphere(x), sphere(x, (0.6, 0.0, 0.0), 0.125))),
        tmp_path / "gt_mesh.ply",
        resolution=64,
        device="cpu",
    )
    assert extra["mesh_components"] == 2 and extra["mesh_area_ratio"] == pytest.approx(1.25, abs=0.03)
    assert extra["completeness"] < 0.01 and extra["accuracy"] > 0.05  # the small sphere is 0.45-0.95 from the truth
    assert extra["chamfer"] == pytest.approx((extra["accuracy"] + extra["completeness"]) / 2)
    nothing = module.surface_metrics(pipeline(lambda x: sphere(x) + 10.0), tmp_path / "gt_mesh.ply", 16, "cpu")
    assert math.isnan(nothing["chamfer"]) and nothing["mesh_components"] == 0


def test_the_sampler_queries_precision_a_run_reports(monkeypatch):
    """benchmark_speed.py's ``sampler_queries``: float32, a half precision throughout, or the check's switches."""
    from types import SimpleNamespace

    module = load_script("benchmark_speed", monkeypatch)

    def reported(half: str, switches: list[tuple[int, bool]]) -> str:
        config = SimpleNamespace(sampler_autocast=half)
        return module.sampler_query_precision(SimpleNamespace(config=config, training_query_switches=switches))

    assert reported("none", []) == "float32"
    assert reported("float16", []) == "float16 throughout"
    assert reported("float16", [(50, False)]) == "float16, float32 from step 50"
    assert reported("bfloat16", [(0, False)]) == "bfloat16, float32 from step 0"
    assert (
        reported("float16", [(0, False), (100, True), (900, False)])
        == "float16, float32 from step 0, float16 again from step 100, float32 from step 900"
    )


def test_memory_trace_prints_only_steps_that_raise_the_peak(monkeypatch, capsys):
    module = load_script("benchmark_speed", monkeypatch)
    gib = 2**30
    readings = iter([(7.0, 0.3), (7.0 + 2**-8, 0.3), (7.5, 0.4)])  # (peak, allocated); +4 MiB is noise
    current = {}

    def advance():
        current["peak"], current["allocated"] = next(readings)

    monkeypatch.setattr(module.torch.cuda, "max_memory_allocated", lambda: int(current["peak"] * gib))
    monkeypatch.setattr(module.torch.cuda, "memory_allocated", lambda: int(current["allocated"] * gib))
    peaks = [0]
    for step in range(3):
        advance()
        module._trace_memory(step, peaks)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "  step 0: peak 0.000 -> 7.000 GiB, allocated after the step 0.300 GiB",
        "  step 2: peak 7.000 -> 7.500 GiB, allocated after the step 0.400 GiB",
    ]


def test_fields_benchmark_on_cpu(monkeypatch):
    """scripts/benchmark_fields.py's smoke run: every part timed eager and compiled (aot_eager on CPU)."""

    module = load_script("benchmark_fields", monkeypatch)
    table = run_main(module, ["--device", "cpu", "--scale", "0.002", "--repeats", "1", "--backend", "aot_eager"])
    lines = table.splitlines()
    assert lines[0] == "Device: CPU; TF32 on; backend aot_eager; median of 1"
    rows = [line.split(" | ") for line in lines[4:]]
    assert [row[0].split(" (")[0] for row in rows] == [
        "| SDF + gradient + backward with the eikonal term",
        "| the same + colour head",
        "| background field forward + backward",
        "| SDF query without autograd, the sampler's",
        "| prototypes of 4 heads forward + backward",
    ]
    assert rows[0][0].endswith("(200)")  # 1024 x 98 = 100352 points, scaled by 0.002
    assert rows[4][0].endswith("(64 codebook entries)")  # 16384 x 0.002 = 32, at least 64
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x |")


def test_prototypes_benchmark_on_cpu(monkeypatch):
    """scripts/benchmark_prototypes.py's smoke run: both head layouts, fused and explicit, compiled (aot_eager)."""

    module = load_script("benchmark_prototypes", monkeypatch)
    table = run_main(module, ["--device", "cpu", "--entries", "64", "--repeats", "1", "--backend", "aot_eager"])
    lines = table.splitlines()
    assert lines[0].startswith("Device: CPU; TF32 on; backend aot_eager; 4 heads, codebook 64x256")
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert [row[:2] for row in rows] == [
        ["fused", "one after another"],
        ["fused", "batched (vmap)"],
        ["explicit", "one after another"],
        ["explicit", "batched (vmap)"],
    ]
    assert all(float(row[2]) > 0 and row[3] == "-" for row in rows)  # no CUDA graph off CUDA


def test_point_attention_benchmark_on_cpu(monkeypatch):
    """scripts/benchmark_point_attention.py's smoke run: both paths, eager and compiled (aot_eager), on CPU (the
    point kernels' torch formulas)."""
    module = load_script("benchmark_point_attention", monkeypatch)
    argv = ["--device", "cpu", "--points", "40", "--prototypes", "16", "--repeats", "1", "--backend", "aot_eager"]
    lines = run_main(module, argv).splitlines()
    assert lines[0].startswith("Device: CPU; 40 points, 16 keys, 4 heads x 32; TF32 on; backend aot_eager")
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert [row[0] for row in rows] == [
        "explicit (block-diagonal)",
        "explicit, compiled",
        "point kernels",
        "point kernels, compiled",
    ]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)


def test_point_attention_tile_sweep_refuses_where_the_kernels_do_not_run(monkeypatch, capsys):
    """On a CPU the ops run their torch formulas: a sweep would time those as if they were the kernels' tiles."""
    module = load_script("benchmark_point_attention", monkeypatch)
    argv = ["--device", "cpu", "--points", "40", "--prototypes", "16", "--repeats", "1", "--no-explicit"]
    run_main(module, [*argv, "--tile-sweep"])
    printed = capsys.readouterr().out
    assert "--tile-sweep: the point kernels do not run here" in printed and "| pass |" not in printed


def test_matmul_padding_benchmark_on_cpu(monkeypatch):
    """scripts/benchmark_matmul_padding.py's smoke run: every product in both dtypes, and the padded product
    equal to the plain one up to float rounding (zeros add nothing)."""
    module = load_script("benchmark_matmul_padding", monkeypatch)
    table = run_main(module, ["--device", "cpu", "--rows", "64", "--repeats", "1", "--warmup", "0"])
    lines = table.splitlines()
    assert lines[0] == "Device: CPU; 64 rows; median of 1"
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert len(rows) == 2 * len(module.SHAPES)
    assert [row[2] for row in rows] == ["bfloat16"] * len(module.SHAPES) + ["float32"] * len(module.SHAPES)
    assert rows[7][:2] == ["colour: feed-forward", "289 x 289"]
    for row in rows:
        assert float(row[3]) > 0 and float(row[4]) > 0 and row[5].endswith("x")
        assert float(row[6]) < (2e-2 if row[2] == "bfloat16" else 1e-5)


def test_aligned_widths(monkeypatch):
    module = load_script("benchmark_matmul_padding", monkeypatch)
    assert [module.aligned(w, 8) for w in (39, 78, 256, 257, 289)] == [40, 80, 256, 264, 296]
    assert [module.aligned(w, 4) for w in (39, 283, 84)] == [40, 284, 84]


def test_the_fast_method_is_the_benchmarked_recipe(monkeypatch):
    """The figures docs/benchmarks.md gives for ``graph+fields+bf16+sdpa+points+flash+fp16+geo16+split`` are those
    of ``ns-train coco-inr-fast``."""
    from cocoinr_nerfstudio.method_configs import coco_inr, coco_inr_fast

    benchmark = load_script("benchmark_speed", monkeypatch)
    model = copy.deepcopy(coco_inr.config.pipeline.model)
    benchmark.CONFIGS["graph+fields+bf16+sdpa+points+flash+fp16+geo16+split"](model)
    assert model == coco_inr_fast.config.pipeline.model
    for previous in (
        "graph+fields+bf16+sdpa+points+flash+fp16",
        "graph+fields+bf16+sdpa+points+flash+fp16+geobf16",
        "graph+fields+bf16+sdpa+points+flash+fp16+geo16",
    ):
        benchmark.CONFIGS[previous](model := copy.deepcopy(coco_inr.config.pipeline.model))
        assert model != coco_inr_fast.config.pipeline.model  # the comparison can fail


def test_readme_float32_command_is_the_benchmarked_graph_fields(monkeypatch):
    """README's command for the recipe without half precision trains the model that round twenty-eight measured as
    ``graph+fields``."""
    import shlex

    import tyro

    from cocoinr_nerfstudio.method_configs import coco_inr

    benchmark = load_script("benchmark_speed", monkeypatch)
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()]
    prefix = "ns-train coco-inr --pipeline.model.tf32-matmul"  # the one-line command, not the one option a line
    (command,) = [line for line in lines if line.startswith(prefix) and "--data" in line]
    words = shlex.split(command)[2:]
    options = words[: words.index("--data")]
    trainer = tyro.cli(
        tyro.conf.FlagConversionOff[type(coco_inr.config)],
        default=copy.deepcopy(coco_inr.config),
        args=[*options, "idr-data"],
    )
    expected = copy.deepcopy(coco_inr.config.pipeline.model)
    benchmark.CONFIGS["graph+fields"](expected)
    assert trainer.pipeline.model == expected
    assert trainer.pipeline.model != coco_inr.config.pipeline.model


def test_recipe_variants_set_what_their_names_say(monkeypatch, tmp_path):
    """Each variant of the defaults' config differs from them in what its name adds or leaves out: only ``+adam1``
    steps with the one-launch Adam, and the half-precision levers are those named."""
    benchmark = load_script("benchmark_speed", monkeypatch)
    args = benchmark.parse_args(["--device", "cpu"])
    for name, expected in [
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16", False),
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16+split", False),
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+adam1", True),
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+follow+adam1", True),
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+hold4+adam1", True),
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+color32+adam1", True),
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+batch+adam1", True),
        ("graph+fields+bf16+sdpa+points+flash+fp16+split+adam1", True),
        ("graph+fields+bf16+sdpa+points+fp16+geo16+split+adam1", True),
        ("graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+q32+adam1", True),
    ]:
        config = benchmark._trainer_config(args, tmp_path, name, tmp_path)
        assert {group["optimizer"].multi_tensor_kernel for group in config.optimizers.values()} == {expected}
        assert config.pipeline.model.mix_order_reduction is ("+split" not in name)
        assert config.pipeline.model.training_queries_follow_geometry is ("+follow" in name)
        assert config.pipeline.model.refine_budget_shrink_checks == (4 if "+hold4" in name else 1)
        assert config.pipeline.model.bf16_color_heads is ("+color32" not in name)
        assert config.pipeline.model.per_ray_convergence is ("+batch" not in name)
        assert config.pipeline.model.static_refine_budget == (1.0 if "+batch" in name else "auto")
        assert config.pipeline.model.geometry_autocast == ("float16" if "+geo16" in name else "none")
        assert config.pipeline.model.sampler_autocast == ("none" if "+q32" in name else "float16")
        for field in (config.pipeline.model.sdf_field, config.pipeline.model.background_field):
            assert field.coordinate_attention.flash_first_order is ("+flash" in name)
            assert field.coordinate_attention.point_kernels and field.coordinate_attention.fused_without_grad
        assert config.pipeline.model.cuda_graph and config.pipeline.model.compile_fields


def test_refine_budget_pins_the_graph_configs_only(monkeypatch, tmp_path, capsys):
    """``--refine-budget`` sets the budget of configs whose sampler has one (CUDA-graph configs with per-ray
    convergence) and leaves the others, whose sampler refuses a budget without per-ray convergence, as they are."""
    benchmark = load_script("benchmark_speed", monkeypatch)
    args = benchmark.parse_args(["--device", "cpu", "--refine-budget", "0.5"])
    recipe = benchmark._trainer_config(args, tmp_path, "graph+fields+bf16+sdpa+points+flash+fp16", tmp_path)
    reference = benchmark._trainer_config(args, tmp_path, "reference", tmp_path)
    assert recipe.pipeline.model.static_refine_budget == 0.5
    assert reference.pipeline.model.static_refine_budget == 1.0
    batch = "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+batch+adam1"  # every ray in every round
    assert benchmark._trainer_config(args, tmp_path, batch, tmp_path).pipeline.model.static_refine_budget == 1.0
    unpinned = benchmark._trainer_config(benchmark.parse_args(["--device", "cpu"]), tmp_path, "graph+auto", tmp_path)
    assert unpinned.pipeline.model.static_refine_budget == "auto"
    for share in ("0", "1.5"):
        with pytest.raises(SystemExit):
            benchmark.parse_args(["--device", "cpu", "--refine-budget", share])
        assert f"--refine-budget must be a share of the rays in (0, 1], got {float(share)}" in capsys.readouterr().err


def test_schedule_steps_set_how_fast_the_learning_rates_decay(monkeypatch, tmp_path, capsys):
    """By default a run's rates decay to a tenth over its own steps (warm-up included); ``--schedule-steps 200000``
    keeps them where the original's are at the same step. The loop benchmark, whose loop length is the decay's,
    refuses the option."""
    import torch

    from cocoinr_nerfstudio.engine.trainer import resolve_decay_lengths

    benchmark = load_script("benchmark_speed", monkeypatch)

    def rate_at(argv: list[str], step: int) -> float:
        config = benchmark._trainer_config(benchmark.parse_args(argv), tmp_path, "reference", tmp_path)
        group = resolve_decay_lengths(config.optimizers, config.max_num_iterations)["fields"]
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=group["optimizer"].lr)
        scheduler = group["scheduler"].setup().get_scheduler(optimizer, group["optimizer"].lr)
        for _ in range(step):
            optimizer.step()
            scheduler.step()
        return optimizer.param_groups[0]["lr"]

    run = ["--device", "cpu", "--steps", "575", "--warmup", "25"]
    assert rate_at(run, 600) == pytest.approx(5e-5)  # a tenth of 5e-4 at the run's end
    assert rate_at(run, 300) == pytest.approx(5e-4 * 0.1**0.5)
    assert rate_at([*run, "--schedule-steps", "200000"], 600) == pytest.approx(5e-4 * 0.1 ** (600 / 200000))
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--device", "cpu", "--schedule-steps", "0"])
    assert "--schedule-steps must be at least 1, got 0" in capsys.readouterr().err
    loop = load_script("benchmark_training_loop", monkeypatch)
    with pytest.raises(SystemExit):
        loop.parse_args(["--device", "cpu", "--schedule-steps", "1000"])
    assert "--schedule-steps: ns-train's loop ends where the learning rates' decay does" in capsys.readouterr().err


def test_quality_benchmark_pairs_runs_by_seed(monkeypatch):
    """Round nine's reference and recipe runs (docs/benchmarks.md): the means and paired differences printed there."""
    quality = load_script("benchmark_quality", monkeypatch)
    runs = {
        ("reference", 1, 1): (20.91, 14.76, 9.847),
        ("reference", 2, 1): (20.62, 14.32, 8.343),
        ("reference", 3, 1): (21.44, 15.33, 10.828),
        ("recipe", 1, 1): (20.68, 14.51, 9.902),
        ("recipe", 2, 1): (21.07, 14.87, 9.397),
        ("recipe", 3, 1): (21.57, 15.60, 12.358),
    }
    results = {
        key: dict(zip(("psnr", "psnr_masked", "chamfer", "final_loss"), (*v, 0.02), strict=True))
        for key, v in runs.items()
    }
    results[("recipe", 1, 1)]["sampler_queries"] = "float16, float32 from step 50"  # benchmark_speed.py's, when given
    table = quality.summarize(results, ["reference", "recipe"], [1, 2, 3]).splitlines()
    assert "| 1 | recipe | 20.68 | 14.51 | 9.90 | 0.0200 | float16, float32 from step 50 |" in table
    assert "| 2 | recipe | 21.07 | 14.87 | 9.40 | 0.0200 | - |" in table
    assert "| mean of 3 | reference | 20.99 | 14.80 | 9.67 | | |" in table
    assert "| mean of 3 | recipe | 21.11 | 14.99 | 10.55 | | |" in table
    # PSNR -0.23, +0.45, +0.13; Chamfer +0.055, +1.054, +1.530. Unpaired: the same means, Welch's errors
    # sqrt(var/3 + var/3) of 0.35 and 1.17 dB, larger than the paired ones where the seeds' values move together
    assert table[-1] == "| recipe | 3 | +0.12 (0.20) | 2 | 3 | +0.88 (0.43) | 0 | 0 / 0 | +0.12 (0.35) | +0.88 (1.17) |"
    assert not any(line.startswith("| 1 (run 2)") for line in table)  # one run a seed: no repeat rows, no spread
    assert not any("runs of one seed" in line for line in table)

    del results[("recipe", 2, 1)]  # a failed run leaves its seed out of the pairs
    table = quality.summarize(results, ["reference", "recipe"], [1, 2, 3]).splitlines()
    assert "| 2 | recipe | failed | - | - | - | - |" in table
    assert any(line.startswith("| mean of 2 | recipe | ") for line in table)
    # unpaired: seed 2's reference run stays in (21.13 - 20.99), Welch's errors over 2 and 3 runs
    assert table[-1] == "| recipe | 2 | -0.05 (0.18) | 1 | 2 | +0.79 (0.74) | 0 | 0 / 0 | +0.14 (0.51) | +1.46 (1.42) |"
    assert quality.mean_and_standard_error([1.5])[0] == 1.5 and math.isnan(quality.mean_and_standard_error([1.5])[1])

    # a mesh without a surface: counted apart, the Chamfer means and pairs over the runs with one
    results[("recipe", 2, 1)] = {
        **results[("recipe", 1, 1)],
        "chamfer": math.nan,
        "sampler_queries": "float16 throughout",
    }
    table = quality.summarize(results, ["reference", "recipe"], [1, 2, 3]).splitlines()
    assert "| 2 | recipe | 20.68 | 14.51 | nan | 0.0200 | float16 throughout |" in table
    assert "| mean of 3 | recipe | 20.98 | 14.87 | 11.13 (1 without a surface) | | |" in table
    assert table[-1] == "| recipe | 3 | -0.01 (0.11) | 2 | 2 | +0.79 (0.74) | 0 | 1 / 0 | -0.01 (0.38) | +1.46 (1.42) |"
    results[("reference", 2, 1)] = {**results[("reference", 2, 1)], "chamfer": math.nan}  # both without one
    table = quality.summarize(results, ["reference", "recipe"], [1, 2, 3]).splitlines()
    assert table[-1] == "| recipe | 3 | -0.01 (0.11) | 2 | 2 | +0.79 (0.74) | 0 | 1 / 1 | -0.01 (0.38) | +0.79 (1.32) |"


def test_quality_benchmark_statistics_on_small_inputs(monkeypatch):
    """Welch's difference and the pooled within-seed deviation, by hand."""
    quality = load_script("benchmark_quality", monkeypatch)
    assert quality.welch_difference([1.0, 3.0], [0.0, 0.0, 0.0]) == (2.0, 1.0)  # sqrt(2 / 2 + 0 / 3)
    difference, error = quality.welch_difference([1.0, 3.0], [0.5])
    assert difference == 1.5 and math.isnan(error)
    assert all(math.isnan(v) for v in quality.welch_difference([], [1.0, 2.0]))
    # squares about each group's mean: 1 + 1 and 4 + 0 + 4; degrees of freedom 1 + 2 (a single run adds none)
    assert quality.within_seed_deviation([[1.0, 3.0], [5.0], [2.0, 4.0, 6.0]]) == pytest.approx(math.sqrt(10 / 3))
    assert math.isnan(quality.within_seed_deviation([[1.0], [2.0]]))


def _quality_rows(psnr: float, chamfer: float, queries: str | None = None) -> dict:
    row = {"psnr": psnr, "psnr_masked": psnr - 6.0, "chamfer": chamfer, "final_loss": 0.02}
    return row if queries is None else {**row, "sampler_queries": queries}


def test_quality_benchmark_repeats_a_seed(monkeypatch):
    """Two runs of seed 1: both rows, their spread against all runs', and each seed's mean paired; the unpaired
    difference over every run."""
    quality = load_script("benchmark_quality", monkeypatch)
    args = quality.parse_args(["--configs", "a", "b", "--seeds", "1", "--repeats", "2"])[0]
    planned = [(run.output.name, run.label) for run in quality.plan(args, Path("study"))]
    assert planned == [
        ("a_seed1", "a, seed 1"),
        ("b_seed1", "b, seed 1"),
        ("a_seed1_run2", "a, seed 1 (run 2)"),
        ("b_seed1_run2", "b, seed 1 (run 2)"),
    ]
    results = {
        ("reference", 1, 1): _quality_rows(20.0, 10.0),
        ("reference", 1, 2): _quality_rows(21.0, 12.0),
        ("reference", 2, 1): _quality_rows(22.0, 8.0),
        ("reference", 2, 2): _quality_rows(22.0, 8.0),
        ("recipe", 1, 1): _quality_rows(20.0, 30.0),
        ("recipe", 1, 2): _quality_rows(22.0, 10.0),
        ("recipe", 2, 1): _quality_rows(23.0, 9.0),
    }
    table = quality.summarize(results, ["reference", "recipe"], [1, 2], repeats=2).splitlines()
    assert "| 1 (run 2) | recipe | 22.00 | 16.00 | 10.00 | 0.0200 | - |" in table
    assert "| 2 (run 2) | recipe | failed | - | - | - | - |" in table
    assert "| mean of 4 | reference | 21.25 | 15.25 | 9.50 | | |" in table
    assert "| mean of 3 | recipe | 21.67 | 15.67 | 16.33 | | |" in table
    # reference: all runs' PSNR deviation 0.96; within seeds sqrt((0.25 + 0.25 + 0 + 0) / 2) = 0.5; Chamfer 1.91 and 1
    assert "| reference | 4 | 0.96 | 0.50 | 1.91 | 1.00 |" in table
    # recipe: within seed 1 only (seed 2 ran once): sqrt(2 / 1) = 1.41 dB and sqrt(200 / 1) = 14.14
    assert "| recipe | 3 | 1.53 | 1.41 | 11.85 | 14.14 |" in table
    # paired on seed means: PSNR 21 - 20.5 and 23 - 22 (+0.75, error 0.25); Chamfer 20 - 11 and 9 - 8 (+5, error 4)
    # unpaired: PSNR 21.67 - 21.25, Chamfer 16.33 - 9.5, Welch's errors from every run
    assert table[-1] == "| recipe | 2 | +0.75 (0.25) | 2 | 2 | +5.00 (4.00) | 0 | 0 / 0 | +0.42 (1.00) | +6.83 (6.91) |"


FAKE_SPEED_SCRIPT = """
import argparse, json, sys, time
from pathlib import Path

def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", choices=["a", "b", "reference"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--no-eval", dest="eval", action="store_false")
    parser.add_argument("--no-mesh", dest="mesh", action="store_false")
    parser.add_argument("--eval-stride", type=int)
    return parser.parse_args(argv)

if __name__ == "__main__":
    args = parse_args()
    if args.configs == ["b"] and args.seed == 2:
        sys.exit("boom: b cannot train at seed 2")
    if args.configs == ["b"] and args.seed == 3:
        time.sleep(120)  # a run still going when its study is stopped
    result = {"psnr": 20.0 + args.seed + (args.configs == ["b"]), "psnr_masked": 15.0, "chamfer": 10.0 - args.seed,
              "final_loss": 0.02, "argv": sys.argv[1:]}
    if args.configs == ["a"]:  # what a run says of its sampler and training, carried into the study's rows
        result.update(sampler_refined=0.25, refine_budgets=[0.5, 0.125], iters_per_sec=3.0,
                      training_curve={"step": [args.steps], "loss": [0.1 * args.seed]})
    args.output.with_suffix(".json").write_text(json.dumps([result]))
"""


def fake_speed_script(quality, monkeypatch, tmp_path: Path) -> None:
    """benchmark_speed.py's parser (the options the quality script sets) and result files, in milliseconds."""
    script = tmp_path / "fake_speed.py"
    script.write_text(FAKE_SPEED_SCRIPT)
    monkeypatch.setattr(quality, "SPEED_SCRIPT", script)


def test_departure_is_where_a_runs_loss_stays_above_the_others_median(monkeypatch):
    quality = load_script("benchmark_quality", monkeypatch)
    others = [
        {"step": [1, 2, 3, 4], "loss": [1.0, 1.0, 1.0, 1.0]},
        {"step": [1, 2, 3, 4], "loss": [1.0, 1.0, 5.0, 1.0]},
    ]
    others.append({"step": [1, 2, 3], "loss": [1.0, 1.0, 1.0]})  # a shorter curve counts where it has the window
    assert quality.departure_step({"step": [1, 2, 3, 4], "loss": [2.0, 1.0, 1.3, 1.3]}, others) == 3
    assert quality.departure_step({"step": [1, 2, 3, 4], "loss": [2.0, 2.0, 2.0, 2.0]}, others) == 1
    assert quality.departure_step({"step": [1, 2, 3, 4], "loss": [2.0, 2.0, 2.0, 1.1]}, others) is None  # 1.1 < 1.2
    # a window no other curve has is skipped: the run is judged by the windows it shares
    assert quality.departure_step({"step": [3, 4, 9], "loss": [1.0, 1.5, 0.1]}, others) == 4


def test_quality_benchmark_lists_runs_astray_and_when_they_left_the_others(monkeypatch):
    """A Chamfer above 1.6 times the study's median (over every configuration's runs with a surface) is astray; its
    row says when its loss left its own configuration's other runs, where they kept curves."""
    quality = load_script("benchmark_quality", monkeypatch)
    flat = {"step": [50, 100, 150], "loss": [1.0, 1.0, 1.0]}

    def row(psnr, chamfer, curve=None, refined=None):
        row = {**_quality_rows(psnr, chamfer), **({"training_curve": curve} if curve else {})}
        return {**row, "sampler_refined": refined} if refined is not None else row

    results = {
        ("a", 1, 1): row(21.0, 10.0, flat),
        ("a", 2, 1): row(21.0, 12.0, flat, 0.25),
        ("a", 3, 1): {
            **row(18.0, 30.0, {"step": [50, 100, 150], "loss": [1.0, 1.5, 2.0]}, 0.93),
            "accuracy": 55.0,
            "completeness": 5.0,
        },
        ("b", 1, 1): row(21.0, 11.0),
        ("b", 2, 1): row(21.0, 12.0),
        ("b", 3, 1): row(20.0, 19.3),  # 1.61 times the median of 12: astray, but b's runs kept no curves
        ("b", 4, 1): row(20.0, 19.1),  # 1.59 times
        ("b", 5, 1): row(20.0, math.nan),
    }
    assert quality.astray_runs(results) == ([("a", 3, 1), ("b", 3, 1)], 12.0)  # of 10, 11, 12, 12, 19.1, 19.3, 30
    lines = quality.summarize(results, ["a", "b"], [1, 2, 3, 4, 5])
    assert "Runs astray: 2 of 8, each with a Chamfer above 1.6 times the study's median of 12.00." in lines
    assert "| a | 3 | 18.00 | 30.00 | 55.00 / 5.00 | 0.0200 | 93% | step 100 |" in lines
    assert "| b | 3 | 20.00 | 19.30 | - | 0.0200 | - | no curves |" in lines
    assert lines.splitlines()[-1].startswith("| b | 3 | +0.67 (0.67) |")  # the differences, paired, still end it
    del results[("a", 3, 1)], results[("b", 3, 1)]
    assert "Runs astray" not in quality.summarize(results, ["a", "b"], [1, 2, 4, 5])


def test_beta_rose_early_compares_the_window_at_step_150_with_the_first(monkeypatch):
    quality = load_script("benchmark_quality", monkeypatch)
    assert quality.beta_rose_early({"step": [50, 100, 150, 200], "beta": [0.104, 0.109, 0.106, 0.1]}) is True
    assert quality.beta_rose_early({"step": [50, 100, 150, 200], "beta": [0.104, 0.1, 0.104, 0.2]}) is False  # equal
    assert quality.beta_rose_early({"step": [100, 175], "beta": [0.1, 0.11]}) is True  # no window ends at 150: 175's
    assert quality.beta_rose_early({"step": [50, 100], "beta": [0.1, 0.11]}) is None  # the curve ends before 150
    assert quality.beta_rose_early({"step": [160], "beta": [0.1]}) is None  # its first window is the one at 150
    assert quality.beta_rose_early({"step": [50, 150], "loss": [1.0, 1.0]}) is None  # a curve without beta


def test_quality_benchmark_counts_runs_whose_beta_rose_early_and_how_they_ended(monkeypatch):
    quality = load_script("benchmark_quality", monkeypatch)
    rose, fell = {"step": [50, 150], "beta": [0.10, 0.11]}, {"step": [50, 150], "beta": [0.10, 0.09]}

    def row(chamfer, curve=None):
        return {**_quality_rows(21.0, chamfer), **({"training_curve": curve} if curve else {})}

    results = {
        ("a", 1, 1): row(10.0, fell),
        ("a", 2, 1): row(12.0, fell),
        ("a", 3, 1): row(30.0, rose),  # astray: above 1.6 times the median of 11.5
        ("a", 4, 1): row(11.0, rose),
        ("a", 5, 1): row(math.nan, rose),  # no surface: left out of the medians only
        ("b", 1, 1): row(11.0),  # b kept no curves: no row of its own
        ("b", 2, 1): row(12.0),
        ("c", 1, 1): row(9.0, fell),
        ("c", 2, 1): row(20.0, fell),  # astray although its beta fell
    }
    lines = quality.early_beta_table(results, ["c", "a", "b"], quality.astray_runs(results)[0])
    assert lines[-2:] == ["| c | 2 | 0 | 0 | 1 | - / 14.50 |", "| a | 5 | 3 | 1 | 0 | 20.50 / 11.00 |"]
    assert "| a | 5 | 3 | 1 | 0 | 20.50 / 11.00 |" in quality.summarize(results, ["a", "b", "c"], [1, 2, 3, 4, 5])
    assert quality.early_beta_table({key: row(10.0) for key in results}, ["a", "b", "c"], []) == []


def test_quality_benchmark_runs_pairs_and_reports_failures(monkeypatch, tmp_path, capsys):
    """Two at once; each run gets its seed, the steps and the options passed on; a failed run is reported with its log
    and left out of its pair; the script exits non-zero; a second study may not overwrite the first's files."""
    quality = load_script("benchmark_quality", monkeypatch)
    fake_speed_script(quality, monkeypatch, tmp_path)
    out = tmp_path / "study"
    argv = ["--configs", "a", "b", "--seeds", "1", "2", "--steps", "5", "--warmup", "1", "--parallel", "2"]
    argv += ["--eval-stride", "8", "--output-dir", str(out)]
    with pytest.raises(SystemExit, match="1 of 4 runs failed"):
        quality.main(argv)
    printed = capsys.readouterr().out
    assert "b, seed 2: failed (exit code 1" in printed and "boom: b cannot train at seed 2" in printed
    recorded = json.loads((out / "a_seed2.json").read_text())[0]["argv"]
    assert recorded[:8] == ["--configs", "a", "--seed", "2", "--steps", "5", "--warmup", "1"]
    assert recorded[-2:] == ["--eval-stride", "8"]
    rows = json.loads((out / "quality.json").read_text())
    assert [(r["config"], r["seed"]) for r in rows] == [("a", 1), ("b", 1), ("a", 2)]  # the order of --configs
    assert rows[2]["training_curve"] == {"step": [5], "loss": [0.2]} and rows[2]["refine_budgets"] == [0.5, 0.125]
    assert rows[2]["sampler_refined"] == 0.25 and "iters_per_sec" not in rows[2]  # runs sharing a GPU: no timings
    assert "training_curve" not in rows[1]  # b's runs have none
    merged = quality.main(["--configs", "a", "b", "--merge", str(out), "--output-dir", str(tmp_path / "merged")])
    assert "| 2 | a | 22.00 |" in merged
    assert json.loads((tmp_path / "merged" / "quality.json").read_text())[2]["training_curve"]["loss"] == [0.2]
    table = (out / "quality.md").read_text()
    assert table.startswith("5 steps after 1 warm-up --eval-stride 8")
    assert "| b | 1 | +1.00 (nan) | 1 | 1 | +0.00 (nan) | 0 | 0 / 0 |" in table  # seed 2 has no pair
    with pytest.raises(SystemExit, match=f"{out / 'quality.md'} exists"):
        quality.main(argv)


def running_command_lines() -> list[list[bytes]]:
    """Every running process's command line, split into its arguments."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that ended while we looked
            lines.append(cmdline.read_bytes().split(b"\0"))
    return lines


def test_quality_benchmark_stopped_from_outside_keeps_finished_runs(monkeypatch, tmp_path):
    """A study stopped by SIGTERM (``timeout`` at a device call's limit) leaves the table and rows of the runs that had
    finished, says how many of the planned ones that is, stops the run under way, and can be merged."""
    fake = tmp_path / "fake_speed.py"
    fake.write_text(FAKE_SPEED_SCRIPT)
    wrapper, script = tmp_path / "quality_with_fake_runs.py", str(REPO / "scripts" / "benchmark_quality.py")
    wrapper.write_text(
        "import importlib.util, sys\nfrom pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('benchmark_quality', {script!r})\n"
        "module = importlib.util.module_from_spec(spec)\nsys.modules['benchmark_quality'] = module\n"
        f"spec.loader.exec_module(module)\nmodule.SPEED_SCRIPT = Path({str(fake)!r})\nmodule.main(sys.argv[1:])\n"
    )
    out = tmp_path / "study"
    argv = ["--configs", "a", "b", "--seeds", "1", "3", "--steps", "5", "--warmup", "1", "--parallel", "1"]
    process = subprocess.Popen(
        [sys.executable, str(wrapper), *argv, "--output-dir", str(out)],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "quality.json").exists() and len(json.loads((out / "quality.json").read_text())) == 3:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # b at seed 3 has started and sleeps
        process.send_signal(signal.SIGTERM)
        printed, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, printed
    rows = json.loads((out / "quality.json").read_text())
    assert [(r["config"], r["seed"]) for r in rows] == [("a", 1), ("b", 1), ("a", 3)]
    table = (out / "quality.md").read_text()
    assert table.startswith("5 steps after 1 warm-up\n")
    assert "| 3 | b | not finished | - | - | - | - |" in table
    assert "3 of the 4 planned runs had finished when this was written" in table
    assert not list(out.glob(".*.partial"))
    assert not (out / "b_seed3.json").exists()
    assert not [line for line in running_command_lines() if str(fake).encode() in b" ".join(line)]  # stopped
    merged = load_script("benchmark_quality", monkeypatch).main(["--configs", "a", "b", "--merge", str(out)])
    assert "| 3 | b | not run | - | - | - | - |" in merged  # b's seed 3 is the one that never finished
    assert merged.endswith("| b | 1 | +1.00 (nan) | 1 | 1 | +0.00 (nan) | 0 | 0 / 0 | +0.00 (nan) | +1.00 (nan) |")


def test_quality_benchmark_refuses_options_it_sets(monkeypatch, tmp_path):
    """An option passed on that would override what the script sets, in any spelling benchmark_speed.py accepts, is
    refused before any run starts; so is an unknown config."""
    quality = load_script("benchmark_quality", monkeypatch)
    fake_speed_script(quality, monkeypatch, tmp_path)
    base = ["--configs", "a", "--seeds", "1", "--output-dir", str(tmp_path / "study")]
    for passed_on, option in (
        (["--seed=3"], "--seed"),
        (["--see", "3"], "--seed"),
        (["--config", "b"], "--configs"),
        (["--step", "3"], "--steps"),
        (["--no-e"], "--eval"),
        (["--out", "x"], "--output"),
    ):
        with pytest.raises(SystemExit, match=f"set {option}, which this script sets"):
            quality.main([*base, *passed_on])
    with pytest.raises(SystemExit):
        quality.main(["--configs", "a", "nope", "--output-dir", str(tmp_path / "study")])
    with pytest.raises(SystemExit):
        quality.parse_args(["--configs", "a", "a"])
    assert not (tmp_path / "study").exists()  # nothing started, nothing written
    args, passed_on = quality.parse_args(["--configs", "reference", "--eval-stride", "8", "--frame-size", "0"])
    assert passed_on == ["--eval-stride", "8", "--frame-size", "0"] and args.seeds == [1, 2, 3]
    for wrong in (["--repeats", "0"], ["--merge", "x", "--eval-stride", "8"]):
        with pytest.raises(SystemExit):
            quality.parse_args(["--configs", "a", *wrong])


SETTINGS = "600 steps after 25 warm-up --device cuda --eval-stride 8"


def write_study(folder, rows, settings: str = SETTINGS) -> None:
    """A study's output folder as benchmark_quality.py leaves it: its table (settings first) and its rows."""
    folder.mkdir()
    (folder / "quality.md").write_text(f"{settings}\n\n| seed | config | ... |\n")
    dumped = [{"config": c, "seed": s, **_quality_rows(p, ch, "float32")} for c, s, p, ch in rows]
    (folder / "quality.json").write_text(json.dumps(dumped))


def test_quality_benchmark_merges_studies(monkeypatch, tmp_path, capsys):
    """Studies split over device calls summarised as one: a seed found again is its next repeat, runs of other
    configurations are left out, rows no study has read "not run"; nothing is overwritten."""
    quality = load_script("benchmark_quality", monkeypatch)
    first, second = tmp_path / "call1", tmp_path / "call2"
    write_study(first, [("a", 1, 20.0, 10.0), ("b", 1, 21.0, 9.0), ("a", 2, 22.0, 8.0), ("b", 2, 21.0, math.nan)])
    write_study(second, [("b", 1, 23.0, 7.0), ("c", 1, 0.0, 0.0)])
    out = tmp_path / "merged"
    argv = ["--configs", "a", "b", "--merge", str(first), str(second), "--output-dir", str(out)]
    table = quality.main(argv).splitlines()
    assert table[0] == f"merged from {first} {second}: {SETTINGS}"
    assert "| 1 (run 2) | b | 23.00 | 17.00 | 7.00 | 0.0200 | float32 |" in table
    assert "| 1 (run 2) | a | not run | - | - | - | - |" in table
    assert "| 2 | b | 21.00 | 15.00 | nan | 0.0200 | float32 |" in table
    assert not any("| c |" in line for line in table)
    # paired: seed 1 (22 - 20), seed 2 (21 - 22); Chamfer only seed 1 (8 - 10), b's seed 2 has no surface.
    # unpaired: PSNR 21.67 - 21 (error sqrt(1.33 / 3 + 2 / 2)); Chamfer over the surfaces, 8 - 9 (sqrt(2 / 2 + 2 / 2))
    assert table[-1] == "| b | 2 | +0.50 (1.50) | 1 | 1 | -2.00 (nan) | 1 | 1 / 0 | +0.67 (1.20) | -1.00 (1.41) |"
    rows = json.loads((out / "quality.json").read_text())
    assert [(r["config"], r["seed"], r["repeat"]) for r in rows] == [
        ("a", 1, 1),
        ("b", 1, 1),
        ("a", 2, 1),
        ("b", 2, 1),
        ("b", 1, 2),
    ]
    with pytest.raises(SystemExit, match=r"quality\.md exists"):
        quality.main(argv)


def test_quality_benchmark_refuses_merges_that_would_mislead(monkeypatch, tmp_path, capsys):
    """A folder that cannot be read, named twice, a merge of merges, studies run with other settings, a config
    no study ran, and options that only shape runs: each refused with what is wrong."""
    quality = load_script("benchmark_quality", monkeypatch)
    first, other, merged = tmp_path / "call1", tmp_path / "other", tmp_path / "merged"
    write_study(first, [("a", 1, 20.0, 10.0)])
    write_study(other, [("a", 2, 20.0, 10.0)], settings="300 steps after 25 warm-up --device cuda")
    write_study(merged, [("a", 3, 20.0, 10.0)], settings=f"merged from {first}: {SETTINGS}")
    for folders, message in (
        ([tmp_path / "nowhere"], f"--merge {tmp_path / 'nowhere'}: cannot read"),
        ([first, tmp_path / "." / "call1"], "names a folder twice"),
        ([first, merged], f"--merge {merged}: {merged / 'quality.md'} is not the table of a study that ran"),
        ([first, other], f"different settings ({first}: {SETTINGS}; {other}: 300 steps"),
    ):
        with pytest.raises(SystemExit) as raised:
            quality.main(["--configs", "a", "--merge", *map(str, folders)])
        assert message in str(raised.value)
    with pytest.raises(SystemExit, match="--configs b: no run of it in the --merge folders"):
        quality.main(["--configs", "a", "b", "--merge", str(first)])
    with pytest.raises(SystemExit):
        quality.parse_args(["--configs", "a", "--merge", str(first), "--repeats", "2"])
    assert "--merge runs nothing: --repeats, --parallel and --timeout do not apply" in capsys.readouterr().err


def test_quality_benchmark_stops_a_run_past_its_timeout(monkeypatch, tmp_path, capsys):
    """A run that outlives --timeout is stopped with the processes it started, reported, and left out."""
    quality = load_script("benchmark_quality", monkeypatch)
    args, passed_on = quality.parse_args(["--configs", "reference", "--seeds", "1", "--timeout", "1"])
    monkeypatch.setattr(quality, "SPEED_SCRIPT", tmp_path / "sleeper.py")
    (tmp_path / "sleeper.py").write_text(
        "import subprocess, sys, time\nsubprocess.Popen(['sleep', '67'])\ntime.sleep(60)\n"
    )
    started = time.monotonic()
    assert quality.run_all(quality.plan(args, tmp_path), args, passed_on) == ({}, 1)
    assert time.monotonic() - started < 20
    assert "reference, seed 1: failed (timed out" in capsys.readouterr().out
    assert [b"sleep", b"67"] not in [line[:2] for line in running_command_lines()]  # the run's child went with it


def test_quality_benchmark_on_cpu(tmp_path):
    """A real run (the tiny model on CPU) through benchmark_speed.py: its result, log and table."""
    command = [sys.executable, str(REPO / "scripts" / "benchmark_quality.py"), "--device", "cpu", "--steps", "2"]
    command += ["--warmup", "1", "--configs", "default", "--seeds", "7", "--output-dir", str(tmp_path)]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "quality.json").read_text())
    assert [(r["config"], r["seed"]) for r in rows] == [("default", 7)]
    assert math.isfinite(rows[0]["psnr"]) and math.isfinite(rows[0]["chamfer"])
    assert "| 7 | default |" in (tmp_path / "quality.md").read_text() and "--device cpu" in proc.stdout
    assert rows[0]["sampler_queries"] == "float32" and " | float32 |" in (tmp_path / "quality.md").read_text()
    # the surface's Chamfer halves, area and pieces, carried from the run's result
    assert rows[0]["chamfer"] == pytest.approx((rows[0]["accuracy"] + rows[0]["completeness"]) / 2)
    assert rows[0]["mesh_area_ratio"] > 0 and rows[0]["mesh_components"] >= 1
    assert [len(values) for values in rows[0]["training_curve"].values()] == [1] * 6  # 3 steps, one window
    assert (tmp_path / "default_seed7.log").exists() and "[1/1] default, seed 7: PSNR" in proc.stdout


def test_step_phases_table_from_known_times():
    from cocoinr_nerfstudio.benchmarks.step_phases import (
        BACKWARD,
        FORWARD,
        LOSSES,
        SAMPLES_GRADIENT,
        TOTAL,
        PhaseTimes,
        format_phases,
    )

    times = PhaseTimes(
        {
            FORWARD: 10.0,
            "foreground field (samples and eikonal points)": 4.0,
            SAMPLES_GRADIENT: 3.0,
            LOSSES: 0.5,
            BACKWARD: 9.5,
            TOTAL: 20.0,
        },
        "GPU kernel ms",
    )
    assert format_phases(times, "title").splitlines() == [
        "title",
        "",
        "| part | GPU kernel ms per step | share of the step |",
        "|---|---:|---:|",
        "| forward pass | 10.00 | 50.0% |",
        "| · foreground field (samples and eikonal points) | 4.00 | 20.0% |",
        "| ·· SDF and its gradient | 3.00 | 15.0% |",
        "| losses and metrics | 0.50 | 2.5% |",
        "| backward pass (the rest) | 9.50 | 47.5% |",
        "| step | 20.00 | 100.0% |",
    ]
    host = format_phases(PhaseTimes({FORWARD: 8.0, "colour head": 2.0}, "host ms"), "t").splitlines()
    assert host[2:] == [
        "| part | host ms per step | share of the forward pass |",
        "|---|---:|---:|",
        "| forward pass | 8.00 | 100.0% |",
        "| ·· colour head | 2.00 | 25.0% |",
    ]


def host_event(name, start, end, thread, own=0.0, launched=(), shapes=None):
    """A made-up profiler host event: a range or an operator, with the (name, microseconds) kernels it launched."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    return SimpleNamespace(
        name=name,
        device_type=DeviceType.CPU,
        time_range=SimpleNamespace(start=start, end=end),
        thread=thread,
        device_time_total=own,
        input_shapes=shapes,
        kernels=[SimpleNamespace(name=kernel, duration=duration) for kernel, duration in launched],
    )


def test_kernels_count_in_the_ranges_open_when_they_were_launched():
    """CUDA accounting on made-up events: a range's own kernels, kernels that autograd's thread launched while the
    range was open (an eager ``autograd.grad``), annotations that are not kernels, and the backward as the rest."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from cocoinr_nerfstudio.benchmarks.step_phases import PREFIX, sum_by_range

    def cpu(name, start, end, thread, own=0.0, launched=()):
        return host_event(name, start, end, thread, own, [("kernel", duration) for duration in launched])

    def gpu(name, duration, annotation=False):
        return SimpleNamespace(
            name=name, device_type=DeviceType.CUDA, device_time=duration, is_user_annotation=annotation
        )

    events = [
        cpu(PREFIX + "forward pass", 0, 100, thread=1, own=30.0),
        cpu(PREFIX + "SDF and its gradient at the samples", 10, 50, thread=1, own=20.0),
        cpu("aten::mm", 20, 25, thread=2, launched=(5.0, 2.0)),  # autograd's thread, inside both ranges
        cpu("aten::mm", 150, 160, thread=2, launched=(40.0,)),  # loss.backward(): after every range
        cpu("aten::add", 60, 61, thread=1, launched=(9.0,)),  # the main thread's own: already in ``own``
        gpu(PREFIX + "forward pass", 95.0, annotation=True),
        *(gpu("kernel", d) for d in (20.0, 9.0, 1.0, 5.0, 2.0, 40.0)),
    ]
    totals, kernels = sum_by_range(events, cuda=True)
    assert totals == {"forward pass": 37.0, "SDF and its gradient at the samples": 27.0}
    assert kernels == 77.0  # 77 - 37 = 40: the backward pass


def test_kernels_are_listed_by_part_and_launcher():
    """Made-up events: a kernel belongs to the innermost range open at its launch (on any thread; of two ranges
    opened at once, the one closing first), else to the backward pass; a range's own kernels are its part's, its
    annotation (named like it) is no kernel; rows group by (part, launcher with shapes, kernel), per step, largest
    first."""

    from cocoinr_nerfstudio.benchmarks.step_phases import PREFIX, format_kernels, kernels_by_launcher

    def cpu(name, start, end, thread=1, launched=(), shapes=None):
        return host_event(name, start, end, thread, launched=launched, shapes=shapes)

    events = [
        cpu(PREFIX + "forward pass", 0, 100, launched=[(PREFIX + "forward pass", 99.0)]),  # its annotation
        cpu(PREFIX + "sampler (SDF queries, beta search)", 10, 40, launched=[("raw_launch", 0.8)]),
        cpu(PREFIX + "colour head", 60, 70),
        cpu(PREFIX + "foreground field at the samples", 60, 80),  # opened with the colour head, closes later
        cpu("aten::gelu", 65, 66, launched=[("gelu_kernel", 0.6)]),
        cpu("aten::mm", 12, 13, launched=[("gemm", 6.0)], shapes=[[8, 4], [4, 2]]),
        cpu("aten::mm", 30, 31, thread=2, launched=[("gemm", 4.0)], shapes=[[8, 4], [4, 2]]),  # autograd's thread
        cpu("aten::mm", 50, 51, launched=[("gemm", 1.0)], shapes=[[8, 4], [4, 2]]),  # the forward pass only
        cpu("triton_poi_fused_mul_0", 150, 151, thread=2, launched=[("triton_poi_fused_mul_0", 30.0)]),
        cpu("aten::add", 160, 161, thread=2, launched=[("add_kernel", 2.0), ("add_kernel", 2.0)], shapes=[[], []]),
    ]
    rows = kernels_by_launcher(events, num_steps=2)
    assert [(row.part, row.launcher, row.kernel, row.milliseconds, row.launches) for row in rows] == [
        ("backward pass (the rest)", "triton_poi_fused_mul_0", "triton_poi_fused_mul_0", 0.015, 0.5),
        ("sampler (SDF queries, beta search)", "aten::mm [[8, 4], [4, 2]]", "gemm", 0.005, 1.0),
        ("backward pass (the rest)", "aten::add", "add_kernel", 0.002, 1.0),
        ("forward pass", "aten::mm [[8, 4], [4, 2]]", "gemm", 0.0005, 0.5),
        (
            "sampler (SDF queries, beta search)",
            PREFIX + "sampler (SDF queries, beta search)",
            "raw_launch",
            0.0004,
            0.5,
        ),
        ("colour head", "aten::gelu", "gelu_kernel", 0.0003, 0.5),
    ]
    table = format_kernels(rows, limit=2, width=12).splitlines()
    assert table[2:] == [
        "| backward pass (the rest) | triton_po... | triton_po... | 0.015 | 0.5 |",
        "| sampler (SDF queries, beta search) | aten::mm ... | gemm | 0.005 | 1 |",
    ]


def test_phase_ranges_wrap_and_restore_the_model_parts():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cocoinr_nerfstudio.benchmarks.step_phases import PREFIX, phase_ranges

    class Field(torch.nn.Module):
        def outputs_and_gradient_at(self, x):
            return self.sdf_and_gradient(x)

        def sdf_and_gradient(self, x):
            return x + 1

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.field = Field()

        def _render_background(self, x):
            return x * 2

    model = Model()  # no prior, no sampler: those parts are skipped

    def patched(x):
        return x - 1

    model._render_background = patched  # someone's instance attribute: put back afterwards
    with phase_ranges(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        assert (
            model.field.outputs_and_gradient_at(1) == 2
            and model.field.sdf_and_gradient(1) == 2
            and model._render_background(3) == 2
        )
    names = [event.name[len(PREFIX) :] for event in prof.events() if event.name.startswith(PREFIX)]
    assert names == [
        "foreground field (samples and eikonal points)",
        "SDF and its gradient",
        "SDF and its gradient at eikonal points",
        "background field",
    ]
    assert "outputs_and_gradient_at" not in vars(model.field) and "sdf_and_gradient" not in vars(model.field)
    assert model._render_background is patched


def test_step_profile_on_cpu(monkeypatch):
    """scripts/profile_step.py's smoke run: every part of a real step gets a range (host times on CPU)."""
    module = load_script("profile_step", monkeypatch)
    argv = ["--device", "cpu", "--config", "default", "--warmup", "1", "--steps", "1", "--rays", "64"]
    lines = run_main(module, argv).splitlines()
    assert lines[0].startswith("Device: CPU; config default; 64 rays/step; 1 eager steps profiled after 1 trainer")
    rows = {row[0]: float(row[1]) for row in (line.strip("| ").split(" | ") for line in lines[4:])}
    assert list(rows) == [
        "training batch",
        "forward pass",
        "· prototypes (codebook attention)",
        "· sampler (SDF queries, beta search)",
        "· foreground field (samples and eikonal points)",
        "·· SDF and its gradient",
        "·· colour head",
        "· background field",
        "losses and metrics",
    ]
    assert all(value > 0 for value in rows.values())
    parts = [name for name in rows if name.startswith("· ")]
    assert sum(rows[part] for part in parts) <= rows["forward pass"]
    nested = ["·· SDF and its gradient", "·· colour head"]
    assert sum(rows[part] for part in nested) <= rows["· foreground field (samples and eikonal points)"]


HALF = ("bfloat16", "float16")  # the precisions measure_sampler_precision.py measures by default, in its order


def test_half_precision_sdf_error_of_the_fresh_model_on_cpu(monkeypatch):
    """scripts/measure_sampler_precision.py at the paper's initialisation: bf16 errs by a few 1e-3 at the surface,
    so the sampler keeps bf16 at beta 0.1 and would switch below about 0.01-0.02; float16 by about a tenth."""
    module = load_script("measure_sampler_precision", monkeypatch)
    lines = run_main(module, ["--device", "cpu", "--codebook-entries", "64"]).splitlines()
    assert lines[0].startswith("Device: CPU; where 1024 chords first cross the surface")
    rows = [line.strip("| ").split(" | ") for line in lines[4:6]]
    assert [row[:3] for row in rows] == [["initialisation, random 64x256 codebook", "0.1", name] for name in HALF]
    (bf16, fp16) = ([float(value) for value in row[3:6]] for row in rows)
    assert 5e-4 < bf16[0] < bf16[1] < bf16[2] < 1e-2
    assert 0 < fp16[0] < fp16[1] < fp16[2] < bf16[2] / 5
    assert [row[7] for row in rows] == list(HALF) and 0.002 < float(rows[0][8]) < 0.04
    assert float(rows[1][8]) < float(rows[0][8]) / 5
    only = run_main(module, ["--device", "cpu", "--codebook-entries", "64", "--dtypes", "float16"]).splitlines()
    assert only[4].split(" | ")[2] == "float16" and only[5:] == []


def test_the_tf32_row_measures_the_float32_reference_and_restores_the_precision(monkeypatch):
    """--tf32: a row for float32 with TF32 products against IEEE ones, and one per half precision against IEEE
    products. A CPU has no TF32: the first is exactly 0 there, and the half row repeats the check's own figures;
    torch's matmul precision is as it was."""
    import torch

    module = load_script("measure_sampler_precision", monkeypatch)
    before = torch.get_float32_matmul_precision()
    argv = ["--device", "cpu", "--codebook-entries", "64", "--dtypes", "float16", "--tf32"]
    lines = run_main(module, argv).splitlines()
    checked, tf32, ieee = (line.strip("| ").split(" | ") for line in lines[4:7])
    assert tf32[2:] == ["float32, TF32 against IEEE products", *["0.00e+00"] * 3, "0.000", "-", "-"]
    assert ieee[2:] == ["float16 against IEEE products", *checked[3:7], "-", "-"]
    assert float(ieee[5]) > 0
    assert lines[7:] == [] and torch.get_float32_matmul_precision() == before


def test_half_products_table_tells_a_bias_added_after_rounding(monkeypatch):
    """scripts/measure_half_products.py: a CPU's products sum in float32 and add the bias before rounding, so with
    the cancelling bias they err by far less than half a unit in the last place of the terms' sum (about 14: 3.9e-3
    in float16). A product that rounds that sum before adding the bias (cuBLAS's one-column one on a GPU) errs by
    about that half unit, with the bias and not without it."""
    import torch

    module = load_script("measure_half_products", monkeypatch)
    lines = run_main(module, ["--device", "cpu", "--rows", "256", "--dtypes", "float16"]).splitlines()
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert [(row[1], row[2]) for row in rows] == [(str(k), str(n)) for k, n in module.SHAPES]
    for row in rows:
        without_bias, with_bias, half_ulp = (float(value) for value in row[4:])
        assert without_bias < 1e-5 and with_bias < 1e-5 and round(half_ulp, 5) in (0.00391, 0.00781)

    def rounded_before_bias(x, weight, bias=None):
        product = (x.float() @ weight.float().T).to(x.dtype)
        return product if bias is None else product + bias

    monkeypatch.setattr(module.F, "linear", rounded_before_bias)
    errors = module.measure(256, 256, 1, torch.float16, "cpu")
    assert errors.without_bias < 1e-5 and 0.5 * errors.half_ulp_of_sum < errors.with_bias <= errors.half_ulp_of_sum


def test_geometry_gradients_in_float16_with_and_without_the_loss_scale(monkeypatch):
    """scripts/measure_geometry_gradients.py, the paper's model at its initialisation: without a scale float16 loses
    gradients to underflow, with 2^10 their error is several times smaller; nothing overflows at either."""
    module = load_script("measure_geometry_gradients", monkeypatch)
    argv = [
        "--device",
        "cpu",
        "--codebook-entries",
        "64",
        "--rays",
        "64",
        "--betas",
        "0.005",
        "--log2-scales",
        "0",
        "10",
    ]
    lines = run_main(module, argv).splitlines()
    assert lines[0].startswith("Device: CPU; the paper's model at its initialisation (random 64x256 codebook)")
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert [row[:3] for row in rows] == [["0.005", "float16", "2^0"], ["0.005", "float16", "2^10"]]
    (unscaled, scaled) = ([float(value) for value in row[3:6]] for row in rows)
    assert all(row == sorted(row) for row in (unscaled, scaled))  # median <= 90% <= max
    assert 0 < scaled[0] < unscaled[0] / 3 and scaled[2] < 0.05
    assert [row[6:] for row in rows] == [["0", "yes"]] * 2
    with pytest.raises(SystemExit):
        module.parse_args(["--rays", "0"])


def test_half_precision_render_comparison_restores_the_model(monkeypatch):
    """--render-betas: one row a beta and precision, the float32 render made once a beta; the model's beta and
    sampler precision are as they were."""
    import torch

    module = load_script("measure_sampler_precision", monkeypatch)
    argv = ["--device", "cpu", "--codebook-entries", "64", "--render-betas", "0.1", "0.001", "--rays", "64"]
    built, renders = {}, []
    load_model = module.load_model

    def keep(args):
        built["model"], name = load_model(args)
        built["beta"] = built["model"].density.beta_param.detach().clone()
        render = built["model"].get_outputs_for_camera_ray_bundle

        def counted(rays):
            renders.append(built["model"]._sampler_dtype)
            return render(rays)

        built["model"].get_outputs_for_camera_ray_bundle = counted
        return built["model"], name

    monkeypatch.setattr(module, "load_model", keep)
    lines = run_main(module, argv).splitlines()
    assert lines[7] == (
        "Renders of 64 rays, samples placed by float32 against half-precision SDF queries (the field in float32):"
    )
    rows = [line.strip("| ").split(" | ") for line in lines[11:]]
    assert [row[:2] for row in rows] == [[beta, name] for beta in ("0.1", "0.001") for name in HALF]
    for row in rows:
        hits, total = (int(value) for value in row[2].split(" / "))
        assert 0 < hits <= total == 64
        for cell in row[3:]:
            mean_or_median, largest = (float(value) for value in cell.split(" / "))
            assert 0 <= mean_or_median <= largest < 0.5  # the same field: renders differ, but not by much
    assert renders == [None, torch.bfloat16, torch.float16] * 2  # per beta: float32, then each half precision
    model = built["model"]
    assert torch.equal(model.density.beta_param, built["beta"])  # as built: float32 queries, beta 0.1
    assert model._sampler_half is False and model._sampler_dtype is None
    with pytest.raises(SystemExit):
        module.parse_args(["--render-betas", "0.1", "0"])


def test_half_precision_sdf_error_of_a_trained_model(monkeypatch, tmp_path):
    """--load-config reads a run through nerfstudio's eval_setup; a sharp beta means float32 queries."""
    import torch
    from tiny_models import build, tiny_config

    module = load_script("measure_sampler_precision", monkeypatch)
    model = build(tiny_config(sampler_autocast="bfloat16"))
    with torch.no_grad():
        model.density.beta_param.fill_(1e-3)
    pipeline = type("Pipeline", (), {"model": model})()
    config = tmp_path / "run" / "config.yml"
    config.parent.mkdir()
    config.write_text("fake: true\n")
    monkeypatch.setattr(module, "eval_setup", lambda path, test_mode: (None, pipeline, None, 1234))
    lines = run_main(module, ["--device", "cpu", "--load-config", str(config)]).splitlines()
    rows = [line.strip("| ").split(" | ") for line in lines[4:6]]
    assert [row[:3] for row in rows] == [["run, step 1234", "0.0011", name] for name in HALF]
    assert [row[7] for row in rows] == ["float32", "float32"]
    with pytest.raises(SystemExit, match=r"--load-config: .* is not a file"):
        run_main(module, ["--device", "cpu", "--load-config", str(tmp_path / "missing.yml")])


def test_step_profile_refuses_a_negative_kernel_count(monkeypatch, capsys):
    module = load_script("profile_step", monkeypatch)
    with pytest.raises(SystemExit):
        module.parse_args(["--device", "cpu", "--top-kernels", "-1"])
    assert "--top-kernels must be >= 0, got -1" in capsys.readouterr().err


def test_step_profile_leaves_no_writer_behind(monkeypatch):
    """The profiled trainer logs into a temporary folder: its writers must not outlive it (a later in-process
    trainer would write to them)."""
    from nerfstudio.utils import writer

    module = load_script("profile_step", monkeypatch)
    before = list(writer.EVENT_WRITERS)
    run_main(module, ["--device", "cpu", "--config", "default", "--warmup", "1", "--steps", "1", "--rays", "32"])
    assert writer.EVENT_WRITERS == before


def test_frame_profile_on_cpu(monkeypatch):
    """scripts/profile_frame.py's smoke run: a timed row per occupancy grid and chunk size, each image compared with
    the first row's, the work the frame asked for, and every part of the volume render in its table (host times on
    CPU, nested parts within their parents)."""
    module = load_script("profile_frame", monkeypatch)
    argv = ["--device", "cpu", "--config", "default", "--frame-size", "16", "--chunks", "64", "256", "--grids", "0"]
    argv += ["10", "--points-per-pass", "100", "1000000", "--beta", "0.08", "--repeats", "1", "--frames", "1"]
    lines = run_main(module, argv).splitlines()
    assert lines[0] == "Device: CPU; config default; a 16x16 volume-rendered frame after 0 training steps (beta 0.08)"
    rows = [line.strip("| ").split(" | ") for line in lines[4:12]]
    assert [row[:3] for row in rows] == [
        [grid, points, chunk] for grid in ("none", "10^3") for points in ("100", "1000000") for chunk in ("64", "256")
    ]
    assert all(math.isnan(float(row[5])) for row in rows)  # no GPU memory
    assert rows[0][6] == "inf dB, max 0.000"  # the first row is the reference
    # without a grid, chunks and passes change nothing but float rounding; the grid only skips what is not seen
    assert all(row[6] == "inf dB, max 0.000" or float(row[6].split(" dB")[0]) > 100 for row in rows[1:4])
    assert all(float(row[6].split(" dB")[0]) > 30 for row in rows[4:])
    assert lines[14].startswith("256 of 256 rays sampled, in 1 chunks; ")  # beta 0.08 keeps a wide band: no ray cut
    table = lines[lines.index("By part (1 frames profiled at 256 rays a chunk):") + 4 :]
    rows = {row[0]: float(row[1]) for row in (line.strip("| ").split(" | ") for line in table)}
    assert list(rows) == [
        "· occupancy grid (the SDF on a grid)",
        "· sampler (SDF queries, beta search)",
        "· foreground field at the samples",
        "·· gradient and colour where the weights matter",
        "··· SDF and its gradient",
        "··· colour head",
        "· background field",
        "· the rest (chunking, ray bounds, compositing, copies)",
        "frame",
    ]
    parts = [
        "· occupancy grid (the SDF on a grid)",
        "· sampler (SDF queries, beta search)",
        "· foreground field at the samples",
        "· background field",
    ]
    rest = "· the rest (chunking, ray bounds, compositing, copies)"
    assert all(rows[part] > 0 for part in parts) and rows[rest] >= 0
    assert sum(rows[part] for part in parts) <= rows["frame"]
    nested = ["··· SDF and its gradient", "··· colour head"]
    assert sum(rows[part] for part in nested) <= rows["·· gradient and colour where the weights matter"]
    assert rows["·· gradient and colour where the weights matter"] <= rows["· foreground field at the samples"]


def test_frame_work_counts_rays_rounds_and_visible_samples():
    """frame_work on a tiny model: every ray of the camera, one count per chunk, at least one sampler round a ray,
    and a visible share that is a fraction; the model's methods are its own again afterwards."""
    from tiny_models import build, tiny_config, viewer_camera

    from cocoinr_nerfstudio.benchmarks.frame_phases import frame_work

    model = build(tiny_config())
    model.eval()
    model.config.eval_num_rays_per_chunk = 30
    work = frame_work(model, viewer_camera(8, 8))
    assert (work.pixels, work.rays, work.chunks) == (64, 64, 3)  # an 8x8 image gets no occupancy grid
    assert 1.0 <= work.sampler_rounds <= model.config.max_total_iters
    assert 0.0 < work.visible_share <= 1.0
    assert "generate_ray_samples" not in vars(model.sampler) and "_forward_visible_samples" not in vars(model)


def test_frame_kernels_outside_every_part_are_the_rest():
    """Made-up events of one frame: the frame's own range holds the parts; a kernel launched inside a part is that
    part's, one launched in the frame but outside every part is the rest's (not the frame's); the table says
    "per frame"."""
    from cocoinr_nerfstudio.benchmarks.frame_phases import FRAME, REST, SAMPLER, frame_kernels
    from cocoinr_nerfstudio.benchmarks.step_phases import PREFIX, format_kernels

    events = [
        host_event(PREFIX + FRAME, 0, 100, 1),
        host_event(PREFIX + SAMPLER, 10, 40, 1),
        host_event("aten::mm", 12, 13, 1, launched=[("gemm", 6.0)]),
        host_event("aten::cat", 90, 91, 1, launched=[("cat_kernel", 2.0)]),
    ]
    rows = frame_kernels(events, num_frames=1)
    assert [(row.part, row.kernel, row.milliseconds) for row in rows] == [
        (SAMPLER, "gemm", 0.006),
        (REST, "cat_kernel", 0.002),
    ]
    assert format_kernels(rows, limit=1, unit_of_work="frame").splitlines()[0] == (
        "| part | launcher | kernel | GPU ms per frame | launches per frame |"
    )


def test_frame_profile_without_the_weight_threshold_counts_the_field_once():
    """With eval_weight_threshold 0 the render calls the field directly: its row stands for the foreground, and the
    rest of the frame (host time on CPU) does not hold it a second time."""
    from tiny_models import build, tiny_config, viewer_camera

    from cocoinr_nerfstudio.benchmarks.frame_phases import FOREGROUND, FRAME, REST, VISIBLE, profile_frames

    model = build(tiny_config(eval_weight_threshold=0.0))
    model.eval()
    # host times: one untimed frame first (a first render's one-off costs land in the rest), and 256 rays, so that
    # the field's row stands well above the rest's fixed costs (at 36 rays and no warm-up, a loaded CI machine once
    # timed the rest above the field; at 256 after a warm-up, three runs at once on 2 cores stayed below 0.35x)
    times = profile_frames(model, viewer_camera(16, 16), num_frames=1, warmup=1).milliseconds
    assert FOREGROUND not in times and times[VISIBLE] > 0
    assert 0 <= times[REST] < times[VISIBLE] and times[REST] < 0.2 * times[FRAME]


def _trace_event(category: str, name: str, ts: float, dur: float, **args) -> dict:
    return {"cat": category, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}


def test_idle_gaps_are_charged_to_the_code_that_launched_the_next_kernel():
    """A hand-made trace: three kernels with gaps of 10 and 2 us (below the 3-us floor), the first gap's kernel
    launched inside the sampler's _refine, called from generate_ray_samples; one wait for the GPU."""
    from cocoinr_nerfstudio.benchmarks.gpu_gaps import format_gaps, idle_gaps

    sampler = "cocoinr_nerfstudio/model_components/error_bounded_sampler.py"
    events = [
        _trace_event("kernel", "a", 100, 20, correlation=1),
        _trace_event("kernel", "b", 130, 5, correlation=2),  # 10 us after a
        _trace_event("kernel", "c", 137, 1, correlation=3),  # 2 us after b: not a gap
        _trace_event("cuda_runtime", "cudaLaunchKernel", 50, 1, correlation=1),
        _trace_event("cuda_driver", "cuLaunchKernel", 125, 1, correlation=2),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 126, 1, correlation=3),
        _trace_event("cuda_runtime", "cudaStreamSynchronize", 110, 10),
        _trace_event("python_function", f"{sampler}(532): generate_ray_samples", 40, 100),
        _trace_event("python_function", f"{sampler}(376): _refine", 120, 10),
        _trace_event("python_function", "torch/nn/modules/module.py(1): _call_impl", 124, 2),  # not the project's
        _trace_event("python_function", f"{sampler}(99): finished_before", 60, 5),  # ended before the launch
    ]
    report = idle_gaps(events)
    assert (report.kernels, report.span_us, report.busy_us, report.idle_us, report.waits) == (3, 38, 26, 10, 1)
    where = "model_components/error_bounded_sampler.py(376): _refine <- " + (
        "model_components/error_bounded_sampler.py(532): generate_ray_samples"
    )
    assert dict(report.by_launcher) == {where: 10} and dict(report.gaps_by_launcher) == {where: 1}
    table = format_gaps(report).splitlines()
    assert table[0] == (
        "GPU work from first to last kernel 0.0 ms: busy 0.0 ms, idle 0.0 ms in gaps; 3 kernels; 1 host waits for "
        "the GPU."
    )
    assert table[4] == f"| 0.0 | 1 | {where} |"
    assert idle_gaps([]).kernels == 0 and idle_gaps(events, min_gap_us=20).idle_us == 0
    # a later kernel, 12 us after c, launched after _refine returned: charged to the frame still open
    later = [
        _trace_event("kernel", "d", 150, 2, correlation=4),
        _trace_event("cuda_runtime", "x", 135, 1, correlation=4),
    ]
    report = idle_gaps(events + later)
    assert dict(report.by_launcher) == {
        where: 10,
        "model_components/error_bounded_sampler.py(532): generate_ray_samples": 12,
    }


def test_frame_gaps_need_a_gpu(monkeypatch):
    module = load_script("profile_frame", monkeypatch)
    argv = ["--device", "cpu", "--config", "default", "--frame-size", "8", "--repeats", "1", "--frames", "0"]
    assert run_main(module, [*argv, "--gaps"]).endswith(
        "--gaps: needs a GPU (on a CPU nothing runs asynchronously, so nothing waits)"
    )


def test_training_loop_benchmark_on_cpu(monkeypatch):
    """scripts/benchmark_training_loop.py's smoke run: nerfstudio's own loop with each writer, timed (the viewer's
    run must end: nerfstudio otherwise waits after training for the viewer to be closed); no CUDA, so no waits."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    module = load_script("benchmark_training_loop", monkeypatch)
    argv = ["--device", "cpu", "--configs", "default", "--steps", "2", "--warmup", "1", "--rays", "64"]
    lines = run_main(module, [*argv, "--vis", "tensorboard", "viewer", "--viewer-port", str(port)]).splitlines()
    assert lines[0] == "Device: CPU; 64 rays/step; 2 timed steps after 1"
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| default |")]
    assert [cells[1] for cells in rows] == ["tensorboard", "viewer"]
    for cells in rows:
        assert float(cells[2]) > 0 and abs(1000.0 / float(cells[2]) - float(cells[3])) < 0.01 * float(cells[3])
        assert cells[4:8] == ["nan", "nan", "0 (0)", "0"]  # no graph on a CPU: no replays, no captures


def test_training_loop_benchmark_refuses_a_span_it_cannot_time(monkeypatch, capsys):
    module = load_script("benchmark_training_loop", monkeypatch)
    with pytest.raises(SystemExit):
        module.parse_args(["--device", "cpu", "--steps", "1"])
    assert "--steps must be at least 2 and --warmup at least 1, got 1 and 1" in capsys.readouterr().err


def _ticking_clock(monkeypatch, seconds_per_call: float) -> None:
    """The loop benchmark's clock, advancing ``seconds_per_call`` at every reading (from 0)."""
    from types import SimpleNamespace

    from cocoinr_nerfstudio.benchmarks import training_loop

    readings = iter(range(0, 10**6, 1))
    monkeypatch.setattr(training_loop, "time", SimpleNamespace(perf_counter=lambda: seconds_per_call * next(readings)))


def test_training_loop_benchmark_cut_by_its_time_limit_still_reports_the_span(monkeypatch, capsys):
    """Readings 10 s apart, a 25-s limit, steps 1-4 planned: the clock passes the limit at the span's first step
    (30 s), so the span takes one more step and ends there, and training stops."""
    module = load_script("benchmark_training_loop", monkeypatch)
    _ticking_clock(monkeypatch, 10.0)
    argv = ["--device", "cpu", "--configs", "default", "--steps", "4", "--warmup", "1", "--rays", "64"]
    lines = run_main(module, [*argv, "--vis", "tensorboard", "--time-limit", "25"]).splitlines()
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| default |")]
    assert len(rows) == 1 and rows[0][3] == "15000.00"  # 2 steps from 20 s to 50 s
    assert "default --vis tensorboard: cut by the time limit after 2 of 4 steps" in lines
    # a limit that passes in the warm-up: that run has no result, and says why
    lines = run_main(module, [*argv, "--vis", "tensorboard", "--time-limit", "5"]).splitlines()
    assert not [line for line in lines if line.startswith("| default |")]
    printed = " ".join(capsys.readouterr().out.split())
    assert "default --vis tensorboard: the time limit (5 s) passed before timed steps 1-2: no result" in printed
    with pytest.raises(SystemExit):
        module.parse_args([*argv, "--time-limit", "0"])
    assert "--time-limit must be positive, got 0.0" in capsys.readouterr().err


def test_host_waits_are_charged_to_their_step_and_the_code_that_waited(monkeypatch):
    import warnings

    from cocoinr_nerfstudio.benchmarks.training_loop import SyncLog, recording_syncs

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))

    def reads_the_gpu():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    log = SyncLog()
    with recording_syncs(log):
        log.step = 7
        reads_the_gpu()
        reads_the_gpu()  # every wait counts, not only the first of a place
        log.step = 9
        reads_the_gpu()
        warnings.warn("something else", UserWarning, stacklevel=1)  # passed on, not recorded
    assert log.steps == [7, 9] and len(log.seen) == 3
    places = [place.split(" < ") for place in log.by_place()]  # three calls from three lines of the test
    assert len(places) == 3 and len({inner for inner, *_ in places}) == 1
    for inner, caller, *_ in places:
        assert inner.startswith("test_benchmark_speed.py:") and inner.endswith(" reads_the_gpu")
        assert caller.endswith(" test_host_waits_are_charged_to_their_step_and_the_code_that_waited")
    assert shown == ["something else"]
    assert warnings.showwarning is not None and torch_sync_mode() == 0  # restored


def torch_sync_mode() -> int:
    import torch

    return torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0


def test_waiting_code_skips_torch_and_the_warnings_module():
    import traceback

    from cocoinr_nerfstudio.benchmarks.training_loop import waiting_code

    stack = [
        traceback.FrameSummary("/x/nerfstudio/engine/trainer.py", 300, "train"),
        traceback.FrameSummary("/x/cocoinr_nerfstudio/models/coco_inr.py", 900, "check"),
        traceback.FrameSummary("/x/site-packages/torch/_tensor.py", 10, "item"),
        traceback.FrameSummary("/usr/lib/python3.11/warnings.py", 110, "_showwarnmsg"),
    ]
    assert waiting_code(stack) == "coco_inr.py:900 check < trainer.py:300 train"
    assert waiting_code(stack, depth=1) == "coco_inr.py:900 check"


def test_training_loop_table_from_known_results():
    from cocoinr_nerfstudio.benchmarks.training_loop import LoopResult, SyncLog, format_results

    log = SyncLog(seen=[(50, "a.py:1 f"), (50, "b.py:2 g"), (100, "a.py:1 f")], captures=[50, 250])
    result = LoopResult("recipe", "viewer", "GPU", steps=400, seconds=9.2, syncs=log, replay_ms=22.0,
                        replay_period_ms=22.65, peak_memory_gib=4.39)  # fmt: skip
    other = LoopResult("recipe", "tensorboard", "GPU", steps=400, seconds=9.2, syncs=SyncLog())
    lines = format_results([result, other]).splitlines()
    assert lines[2] == "| recipe | viewer | 43.48 | 23.00 | 22.00 | 22.65 | 3 (2) | 2 (50, 250) | 4.39 |"
    assert lines[3] == "| recipe | tensorboard | 43.48 | 23.00 | nan | nan | 0 (0) | 0 | nan |"
    assert lines[5:8] == [
        "Waits of the host, recipe --vis viewer: at steps [50, 100]",
        "      2  a.py:1 f",
        "      1  b.py:2 g",
    ]


def test_captures_are_recorded_with_their_step_and_capture_is_restored(monkeypatch):
    from cocoinr_nerfstudio.benchmarks.training_loop import SyncLog, recording_captures
    from cocoinr_nerfstudio.engine.cuda_graph_step import CudaGraphTrainStep

    captured = []
    monkeypatch.setattr(CudaGraphTrainStep, "capture", lambda self, bundle, batch: captured.append((bundle, batch)))
    fake = CudaGraphTrainStep.capture
    log = SyncLog(step=7)
    with recording_captures(log):
        CudaGraphTrainStep.capture(None, "bundle", "batch")
        log.step = 9
        CudaGraphTrainStep.capture(None, "bundle", "batch")
    assert log.captures == [7, 9] and captured == [("bundle", "batch")] * 2  # recorded, and still captured
    assert CudaGraphTrainStep.capture is fake
    CudaGraphTrainStep.capture(None, "bundle", "batch")
    assert log.captures == [7, 9]


def test_replay_clock_times_each_replay_and_restores_replay(monkeypatch):
    """The clock's bookkeeping with events faked (no GPU here): replay i runs from 25 i to 25 i + 22 ms."""
    import torch

    from cocoinr_nerfstudio.benchmarks.training_loop import ReplayClock

    now = [0.0]

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.at = None

        def record(self) -> None:
            self.at = now[0]

        def elapsed_time(self, other) -> float:
            return other.at - self.at

    def replay(graph) -> None:
        now[0] += 22.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", replay)
    with ReplayClock() as clock:
        for _ in range(5):
            torch.cuda.CUDAGraph.replay(None)
            now[0] += 3.0  # the work between two replays
    assert torch.cuda.CUDAGraph.replay is replay
    assert clock.medians(last=4) == (22.0, 25.0) and len(clock.events) == 5
    assert all(math.isnan(value) for value in ReplayClock().medians(last=4))


def _gpu_op(name: str, ts: float, dur: float, correlation: int) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def _launch(name: str, ts: float, correlation: int) -> dict:
    return {"cat": "cuda_runtime", "name": name, "ts": ts, "dur": 5.0, "args": {"correlation": correlation}}


def test_replay_profile_tells_the_graphs_kernels_from_the_work_between_replays():
    """Two replays (correlations 1 and 3) of three kernels each, with a copy and an Adam kernel launched between
    them (correlations 2, 4): per step, the graph's kernels, its gaps, the outside work and the rhythm of replays."""
    from cocoinr_nerfstudio.benchmarks.replay_profile import format_replay_profile, replay_profile

    events = [
        _launch("cudaGraphLaunch", 0, 1),
        _launch("cudaMemcpyAsync", 1, 2),
        _launch("cudaGraphLaunch_v10000", 2, 3),
    ]
    events += [_launch("cudaLaunchKernel", 3, 4), {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9}]
    for start, correlation in ((100, 1), (1100, 3)):  # kernels of 300 + 200 + 100 us with gaps of 50 and 30 us
        events += [_gpu_op("mm", start, 300, correlation), _gpu_op("softplus", start + 350, 200, correlation)]
        events += [_gpu_op("mm", start + 580, 100, correlation)]
    events += [_gpu_op("copy", 750, 40, 2), _gpu_op("adam", 1750, 60, 4)]
    report = replay_profile(events)
    assert (report.steps, report.graph_kernels) == (2, 3)
    assert report.graph_busy_ms == pytest.approx(0.6) and report.graph_span_ms == pytest.approx(0.68)
    assert report.graph_gaps_ms == pytest.approx(0.08)
    assert (report.outside_kernels, report.outside_busy_ms) == (1.0, pytest.approx(0.05))
    assert report.step_ms == pytest.approx(1.0)
    assert report.by_kernel == [("mm", pytest.approx(0.4), 2.0), ("softplus", pytest.approx(0.2), 1.0)]
    table = format_replay_profile(report, top=1)
    assert "| graph: gaps between its kernels | 0.08 | |" in table
    assert "| idle between replays, outside work aside | 0.27 | |" in table
    assert table.splitlines()[-1] == "| mm | 0.400 | 2 |"
    with pytest.raises(ValueError, match="no kernel in the trace was launched by cudaGraphLaunch"):
        replay_profile([e for e in events if not e["name"].startswith("cudaGraphLaunch")])


def test_replayed_step_profile_needs_cuda(monkeypatch, capsys):
    module = load_script("profile_step", monkeypatch)
    with pytest.raises(SystemExit):
        module.parse_args(["--device", "cpu", "--replayed"])
    assert "--replayed profiles CUDA-graph replays: it needs --device cuda" in capsys.readouterr().err
