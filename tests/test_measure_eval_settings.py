"""scripts/measure_eval_settings.py: one trained model evaluated with each of the original's evaluation settings."""

from __future__ import annotations

import json
import math
import types

import pytest
from test_benchmark_speed import load_script, run_main


def test_each_setting_is_evaluated_and_put_back(monkeypatch, capsys, tmp_path):
    """On a tiny CPU model: the model's own row, one row per setting that applies (no half-precision queries to
    undo here), all of them together; refinements of the same sampling move PSNR by hundredths of a dB at most."""
    script = load_script("measure_eval_settings", monkeypatch)
    argv = ["--device", "cpu", "--configs", "default", "--steps", "2", "--rays", "64", "--scene-size", "8", "32", "24"]
    out = tmp_path / "settings"
    rows = run_main(script, [*argv, "--eval-stride", "4", "--output", str(out)])
    assert [row.setting for row in rows] == [
        "the model's own",
        "every sample evaluated (eval-weight-threshold 0)",
        "batch-level convergence (per-ray-convergence False)",
        "sequential bisection (batched-bisection False)",
        "all of the above (the original's evaluation)",
    ]
    for row in rows:
        assert math.isfinite(row.psnr) and abs(row.psnr - rows[0].psnr) < 0.05
    assert "| the model's own | " in capsys.readouterr().out
    assert [row["setting"] for row in json.loads(out.with_suffix(".json").read_text())] == [r.setting for r in rows]
    assert out.with_suffix(".md").read_text().startswith("Device: CPU; default trained 2 steps")
    with pytest.raises(SystemExit, match="exists"):
        script.main([*argv, "--output", str(out)])


def test_settings_are_put_back_even_when_an_evaluation_fails(monkeypatch):
    script = load_script("measure_eval_settings", monkeypatch)
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(eval_weight_threshold=1e-4, sampler_autocast="none"),
        sampler=types.SimpleNamespace(per_ray_convergence=True, batched_bisection=True),
    )
    seen = []

    class Pipeline:
        def __init__(self):
            self.model = model

        def get_average_eval_image_metrics(self):
            seen.append((model.config.eval_weight_threshold, model.sampler.per_ray_convergence))
            if len(seen) == 5:
                raise RuntimeError("out of memory")
            return {"psnr": 20.0}

    with pytest.raises(RuntimeError, match="out of memory"):
        script.measure(Pipeline())
    assert seen == [(1e-4, True), (0.0, True), (1e-4, False), (1e-4, True), (0.0, False)]
    assert (model.config.eval_weight_threshold, model.sampler.per_ray_convergence) == (1e-4, True)
    assert model.sampler.batched_bisection is True


def test_one_configuration_is_trained(monkeypatch):
    script = load_script("measure_eval_settings", monkeypatch)
    with pytest.raises(SystemExit, match="give --configs one name, not 2"):
        script.main(["--device", "cpu", "--configs", "default", "reference"])
    with pytest.raises(SystemExit, match="drop --no-eval"):
        script.main(["--device", "cpu", "--configs", "default", "--no-eval"])
