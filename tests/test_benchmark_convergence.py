"""scripts/benchmark_convergence.py: quality against training time, on the CPU's tiny model."""

from __future__ import annotations

import itertools
import json
import math
import types

import pytest
from test_benchmark_speed import load_script, run_main

SMOKE = ["--device", "cpu", "--configs", "default", "--rays", "64", "--scene-size", "8", "32", "24"]
SMOKE += ["--eval-stride", "4", "--mesh-resolution", "24"]


def test_convergence_rows_follow_the_schedule(monkeypatch, tmp_path):
    """Evaluated at --eval-at and at the last step; the learning rate decays over --schedule-steps, not the run;
    the training clock only grows; the table and the rows are written, and not over an earlier run's."""
    convergence = load_script("benchmark_convergence", monkeypatch)
    out = tmp_path / "convergence"
    argv = [*SMOKE, "--steps", "3", "--eval-at", "1", "--schedule-steps", "4", "--output", str(out)]
    points = run_main(convergence, argv)
    assert [(p.step, p.time_limit) for p in points] == [(1, False), (3, False)]
    # 5e-4 x 0.1 ** (step / 4): the decay's length is --schedule-steps
    assert [p.learning_rate for p in points] == pytest.approx([5e-4 * 0.1**0.25, 5e-4 * 0.1**0.75])
    assert 0 < points[0].train_seconds < points[1].train_seconds
    for point in points:
        assert 5.0 < point.psnr < 60.0 and point.iters_per_sec > 0
        assert abs(point.beta - 0.1001) <= point.step * 5e-4 + 1e-6  # from beta_init + beta_min, an Adam step a step
        assert point.sampler_queries == "float32" and (math.isnan(point.chamfer) or point.chamfer > 0)
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(row["config"], row["step"]) for row in rows] == [("default", 1), ("default", 3)]
    table = out.with_suffix(".md").read_text()
    assert table.startswith("Device: CPU; 64 rays/step; 3 steps, learning rates decaying over 4; 8 training views")
    assert "| default | 3 | " in table
    with pytest.raises(SystemExit, match="exists"):
        run_main(convergence, argv)


def test_convergence_stops_at_the_time_limit_and_survives_a_broken_config(monkeypatch, tmp_path):
    """Once --eval-at-seconds pass, a run is evaluated at the step under way (marks passed together give one row);
    past --time-limit it is evaluated and ends there, marked. A configuration that fails is reported and the others
    still run; their rows are written, and the script exits non-zero."""
    convergence = load_script("benchmark_convergence", monkeypatch)

    def broken(model):
        raise RuntimeError("this lever is broken")

    monkeypatch.setitem(convergence.benchmark_speed.CONFIGS, "broken", broken)
    ticks = itertools.count(1.0)  # the script's clock: one second a reading
    monkeypatch.setattr(convergence, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    out = tmp_path / "limited"
    argv = [*SMOKE, "--steps", "9", "--eval-at-seconds", "2.5", "1.5", "--time-limit", "4.5", "--output", str(out)]
    with pytest.raises(SystemExit, match="broken failed"):
        run_main(convergence, [*argv, "--configs", "broken", "default"])
    rows = json.loads(out.with_suffix(".json").read_text())
    # start 1; step 1 read at 2 (1 s); step 2 at 3 (2 s >= 1.5): the row's clock stops at 4 (3 s, past 2.5 too);
    # restart at 5; step 3 at 6 (4 s); step 4 at 7 (5 s > 4.5): the row at 8 (6 s) ends the run
    assert [(row["config"], row["step"], row["train_seconds"], row["time_limit"]) for row in rows] == [
        ("default", 2, 3.0, False),
        ("default", 4, 6.0, True),
    ]
    assert "| default | 4 (time limit) |" in out.with_suffix(".md").read_text()


def test_convergence_refuses_what_it_cannot_do(monkeypatch, capsys):
    convergence = load_script("benchmark_convergence", monkeypatch)
    for wrong, message in (
        (["--steps", "3", "--eval-at", "4"], "--eval-at takes steps from 1 to --steps (3), got [3, 4]"),
        (["--steps", "3", "--eval-at", "0"], "--eval-at takes steps from 1 to --steps (3), got [0, 3]"),
        (["--schedule-steps", "0"], "--schedule-steps must be at least 1, got 0"),
        (["--time-limit", "0"], "--time-limit must be positive, got 0.0"),
        (["--eval-at-seconds", "5", "0"], "--eval-at-seconds takes positive seconds, got [5.0, 0.0]"),
        (["--no-mesh"], "drop --no-eval and --no-mesh"),
    ):
        with pytest.raises(SystemExit):
            convergence.parse_args(["--device", "cpu", *wrong])
        assert message in capsys.readouterr().err
