"""Half-precision sampler queries are used only while their SDF error is a small share of beta, then float32 for
good; while no error can be measured (no surface), float32 until one is."""

from __future__ import annotations

import math

import pytest
import torch
from nerfstudio.engine.callbacks import TrainingCallbackAttributes
from test_coco_inr import rays
from tiny_models import build, tiny_config

from cocoinr_nerfstudio.models.coco_inr import SAMPLER_PRECISION_LEAD, CocoInrModel


def record_query_precision(model: CocoInrModel) -> list[torch.dtype | None]:
    """The autocast precision each of the sampler's SDF queries ran under, None for none (the precision check's
    own eager probes, ``compiled=False``, are not the sampler's queries)."""
    seen: list[torch.dtype | None] = []
    sampler_sdf = model._sampler_sdf

    def recording(points):
        original = model.field.get_sdf_values

        def get_sdf_values(x, compiled=True):
            if compiled:
                seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return original(x, compiled=compiled)

        model.field.get_sdf_values = get_sdf_values
        try:
            return sampler_sdf(points)
        finally:
            del model.field.get_sdf_values

    model._sampler_sdf = recording
    return seen


def set_beta(model: CocoInrModel, beta: float) -> None:
    with torch.no_grad():
        model.density.beta_param.fill_(beta - model.density.beta_min)


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_queries_switch_to_float32_once_beta_is_below_the_error(capsys, name, dtype):
    model = build(tiny_config(sampler_autocast=name))
    assert model._sampler_half is None  # not checked before the first step or render
    model._check_sampler_precision(step=0)
    assert model._sampler_half is True  # beta 0.1: the error (bf16 6e-3 here, float16 10x less) is below 0.025
    key = model.cuda_graph_key()
    seen = record_query_precision(model)
    model.train()
    model(rays(16))
    assert seen and all(precision == dtype for precision in seen)

    set_beta(model, 2e-4)  # late in training: the rounding error is no longer small against beta
    model._check_sampler_precision(step=50)
    assert model._sampler_half is False and model.cuda_graph_key() != key  # a captured step is captured again
    printed = " ".join(capsys.readouterr().out.split())
    assert f"Sampler: {name} SDF queries err by" in printed
    assert "at step 50: they run in float32 from now on (--pipeline.model.sampler-autocast-max-error)" in printed
    seen.clear()
    model(rays(16))
    assert seen and not any(seen)

    set_beta(model, 0.1)
    model._check_sampler_precision(step=100)
    assert model._sampler_half is False  # once off, off: no capture to and fro


def test_the_check_is_a_training_callback_only_where_it_can_change_anything():
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=None)

    def checks(**overrides) -> int:
        model = build(tiny_config(**overrides))
        callbacks = model.get_training_callbacks(attributes)
        return sum(getattr(c.func, "__func__", None) is CocoInrModel._sampler_precision_callback for c in callbacks)

    assert checks(sampler_autocast="bfloat16") == 1
    assert checks(sampler_autocast="bfloat16", sampler_autocast_max_error=math.inf) == 0
    assert checks() == 0
    assert build(tiny_config(sampler_autocast="bfloat16", sampler_autocast_max_error=math.inf))._sampler_half is True
    assert build(tiny_config())._sampler_half is False


def test_a_loaded_model_checks_before_its_first_render():
    model = build(tiny_config(sampler_autocast="bfloat16"))
    set_beta(model, 2e-4)  # as a trained checkpoint's
    model.eval()
    seen = record_query_precision(model)
    with torch.no_grad():
        model(rays(8))
    assert model._sampler_half is False and seen and not any(seen)


def test_a_negative_share_is_refused():
    with pytest.raises(ValueError, match="sampler-autocast-max-error must be a share of beta >= 0"):
        build(tiny_config(sampler_autocast="bfloat16", sampler_autocast_max_error=-0.1))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (0.012, [2001, 2200, 2400]),  # below half of 0.25 x beta (0.1001): every 200 steps
        (0.013, [2001, 2050, 2100, 2150, 2200, 2250, 2300, 2350, 2400]),  # above it: every 50
    ],
)
def test_a_resumed_run_checks_before_its_first_step_then_on_multiples_of_50(monkeypatch, error, expected):
    """The first check probes and reads at once; each later one reads a probe launched 25 steps before it (queued
    behind the steps the host has launched ahead, and read long after it arrived)."""
    model = build(tiny_config(sampler_autocast="bfloat16"))
    checked, probed = [], []
    check = model._check_sampler_precision
    step = 0

    def counting(at=None, probe=None):
        checked.append(at)
        check(at, probe)

    def probing():
        probed.append(step)
        return torch.tensor([error])

    monkeypatch.setattr(model, "_check_sampler_precision", counting)
    monkeypatch.setattr(model, "sampler_rounding_error_on_device", probing)
    for step in range(2001, 2402):  # resumed at a step that is no multiple of 50
        model._sampler_precision_callback(step)
    assert checked == expected and model._sampler_half is True
    assert probed == [2001] + [at - SAMPLER_PRECISION_LEAD for at in expected[1:]]


def test_once_off_no_probe_runs(monkeypatch):
    model = build(tiny_config(sampler_autocast="bfloat16"))
    monkeypatch.setattr(model, "sampler_rounding_error_on_device", lambda: torch.tensor([1.0]))  # 10x beta
    for step in range(0, 300):
        model._sampler_precision_callback(step)
    assert model._sampler_half is False
    monkeypatch.setattr(model, "sampler_rounding_error_on_device", lambda: pytest.fail("probed while off"))
    for step in range(300, 600):
        model._sampler_precision_callback(step)
    assert model.training_queries_float32_from == 0  # unsafe at the first check: never in half precision


def test_the_step_training_queries_turn_float32_is_kept(monkeypatch):
    """What benchmark_speed.py reports of a run: the check's step, not the step its probe was launched at."""
    model = build(tiny_config(sampler_autocast="float16"))
    errors = iter([0.001] * 3 + [1.0])  # checks at 0 (0.001 < 0.0125: relaxed), 200, 400, then 600 finds 10x beta
    monkeypatch.setattr(model, "sampler_rounding_error_on_device", lambda: torch.tensor([next(errors)]))
    for step in range(0, 600):
        model._sampler_precision_callback(step)
        assert model.training_queries_float32_from is None and model._sampler_half is True
    for step in range(600, 700):
        model._sampler_precision_callback(step)
    assert model.training_queries_float32_from == 600 and model._sampler_half is False
    assert build(tiny_config()).training_queries_float32_from is None  # float32 throughout: nothing switched


def test_the_probe_leaves_the_model_as_it_was():
    model = build(tiny_config(sampler_autocast="bfloat16"))
    model.train()
    model(rays(8))  # a training forward: prototypes cached for the step
    cache = dict(model.prior._cache)
    rng = torch.get_rng_state()
    model._check_sampler_precision(step=0)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(param.grad is None for param in model.parameters())
    assert model.prior._cache.keys() == cache.keys() and all(model.prior._cache[k] is v for k, v in cache.items())


def test_no_surface_in_the_probe_means_float32_until_one_is_measured(capsys):
    model = build(tiny_config(sampler_autocast="bfloat16"))
    model.field.get_sdf_values = lambda points, compiled=True: points.norm(dim=-1, keepdim=True) + 1.0
    model._check_sampler_precision(step=0)
    assert model._sampler_half is False and not model._precision_settled()  # no error measured: checked again
    printed = " ".join(capsys.readouterr().out.split())
    assert (
        "could not be checked (fewer than 64 of the probe's chords cross the surface) at step 0: they run in "
        "float32 until a check can measure them" in printed
    )
    del model.field.get_sdf_values  # the tiny model's sphere: the probe measures its error
    model._check_sampler_precision(step=50)
    assert model._sampler_half is True
    assert "at step 50, within 0.25 x beta (1.00e-01): they run in bfloat16 again." in " ".join(
        capsys.readouterr().out.split()
    )


def test_checks_go_on_while_nothing_can_be_measured(monkeypatch, capsys):
    """Training from a collapsed surface: float32 while no error can be measured (said once), checked every 50
    steps, back in half precision once one is measured small; the switches are kept. A measured error too large
    after that is final."""
    model = build(tiny_config(sampler_autocast="float16"))
    # the first check (step 0) and the probes for the checks at 50, 100, then 300 (relaxed: 0.001 < 0.0125)
    errors = iter([math.nan, math.nan, 0.001, 1.0])
    monkeypatch.setattr(model, "sampler_rounding_error_on_device", lambda: torch.tensor([next(errors)]))
    for step in range(0, 100):
        model._sampler_precision_callback(step)
        assert model._sampler_half is False
    float32_key = model.cuda_graph_key()
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.count("could not be checked") == 1  # at step 0, not again at 50
    for step in range(100, 300):
        model._sampler_precision_callback(step)
        assert model._sampler_half is True and model.cuda_graph_key() != float32_key  # captured again
    assert "at step 100, within 0.25 x beta" in " ".join(capsys.readouterr().out.split())
    for step in range(300, 400):
        model._sampler_precision_callback(step)
    assert model._sampler_half is False and model._precision_settled()
    assert model.training_query_switches == [(0, False), (100, True), (300, False)]
    assert model.training_queries_float32_from == 300


def test_float16_stays_on_where_bfloat16_is_switched_off():
    """At the init of the tiny model, bf16 errs by about 6e-3 and float16 by about a tenth of that: at beta 0.01
    (0.25 x beta = 2.5e-3) only float16 is kept."""
    errors = {}
    for name in ("bfloat16", "float16"):
        model = build(tiny_config(sampler_autocast=name))
        set_beta(model, 0.01)
        (errors[name],) = model.sampler_rounding_error()
        model._check_sampler_precision(step=0)
        assert model._sampler_half is (name == "float16")
    assert errors["float16"] < errors["bfloat16"] / 4


def test_an_overflow_in_the_probe_means_float32(capsys):
    model = build(tiny_config(sampler_autocast="float16"))
    overflow_anywhere(model)
    model._check_sampler_precision(step=0)
    assert model._sampler_half is False
    printed = " ".join(capsys.readouterr().out.split())
    assert "Sampler: float16 SDF queries overflow in the scene's ball at step 0: they run in float32" in printed


FOLLOW = {"training_queries_follow_geometry": True}


def overflow_anywhere(model: CocoInrModel) -> None:
    """Makes every float16 query of ``model`` overflow (finite in float32, past float16's range under autocast)."""
    sdf_values = model.field.get_sdf_values

    def overflowing(points, compiled=True):
        big = torch.nn.functional.linear(points.new_ones(len(points), 1), points.new_full((1, 1), 1e5))
        return sdf_values(points, compiled=compiled) + big - 1e5

    model.field.get_sdf_values = overflowing


def test_training_queries_keep_the_geometry_heads_precision_after_renders_switch(capsys, monkeypatch):
    """With the geometry head trained in float16, training renders a float16 SDF: the sampler's float16 queries
    stay on in training (no new capture) when the error against float32 outgrows beta; renders switch. Only an
    overflow, which a cheaper probe then watches for, switches training's queries too."""
    model = build(tiny_config(sampler_autocast="float16", geometry_autocast="float16", **FOLLOW))
    model._check_sampler_precision(step=0)
    key = model.cuda_graph_key()
    set_beta(model, 2e-5)  # float16's error is no longer small against beta
    model._check_sampler_precision(step=50)
    assert model._sampler_half is False and model.cuda_graph_key() == key
    printed = " ".join(capsys.readouterr().out.split())
    assert "at step 50: renders' queries run in float32 from now on; training's stay float16, the precision the " in (
        printed
    )
    seen = record_query_precision(model)
    model.train()
    model(rays(16))
    assert seen and all(precision == torch.float16 for precision in seen)
    seen.clear()
    model.eval()
    with torch.no_grad():
        model(rays(8))
    assert seen and not any(seen)

    set_beta(model, 0.1)  # renders' queries stay float32: once off, off
    monkeypatch.setattr(model, "sampler_rounding_error_on_device", lambda: pytest.fail("the full probe ran"))
    for step in range(51, 400):
        model._sampler_precision_callback(step)
    assert model._sampler_half is False and model.cuda_graph_key() == key and not model._sampler_overflowed
    assert model.training_queries_float32_from is None  # renders' queries switched, training's did not
    overflow_anywhere(model)
    for step in range(400, 700):
        model._sampler_precision_callback(step)
    assert model._sampler_overflowed and model.cuda_graph_key() != key
    assert model.training_queries_float32_from == 500
    printed = " ".join(capsys.readouterr().out.split())
    assert "overflow in the scene's ball at step 500: training's queries run in float32 from now on too." in printed
    seen.clear()
    model.train()
    model(rays(16))
    assert seen and not any(seen)
    monkeypatch.setattr(model, "sampler_overflows_on_device", lambda: pytest.fail("probed once settled"))
    for step in range(700, 1000):
        model._sampler_precision_callback(step)


def test_following_the_geometry_head_without_a_surface_to_measure(capsys):
    """No surface to measure: renders' queries run in float32 until one is measured, training's stay float16 (no
    switch). An overflow is still found without a surface, and switches training's queries too."""
    model = build(tiny_config(sampler_autocast="float16", geometry_autocast="float16", **FOLLOW))
    sdf_values = model.field.get_sdf_values
    model.field.get_sdf_values = lambda points, compiled=True: sdf_values(points, compiled=compiled).abs() + 5.0
    model._sampler_precision_callback(0)
    assert model._sampler_half is False and model._queries_half(training=True) and not model._precision_settled()
    assert model.training_query_switches == []
    printed = " ".join(capsys.readouterr().out.split())
    assert "at step 0: renders' queries run in float32 until a check can measure them; training's stay float16" in (
        printed
    )
    overflow_anywhere(model)  # still no surface: the overflow must not hide behind the unmeasured error
    for step in range(1, 51):
        model._sampler_precision_callback(step)
    assert model._sampler_overflowed and model._precision_settled() and not model._queries_half(training=True)
    assert model.training_query_switches == [(50, False)]
    assert "overflow in the scene's ball at step 50: training's queries run in float32 from now on too." in " ".join(
        capsys.readouterr().out.split()
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"sampler_autocast": "bfloat16", "geometry_autocast": "float16", **FOLLOW},
        {"sampler_autocast": "float16", "geometry_autocast": "float16"},  # the default: they do not follow it
    ],
)
def test_training_queries_switch_with_renders_unless_they_follow_the_geometry_head(overrides):
    model = build(tiny_config(**overrides))
    model._check_sampler_precision(step=0)
    key = model.cuda_graph_key()
    set_beta(model, 2e-5)
    model._check_sampler_precision(step=50)
    assert model._sampler_half is False and model.cuda_graph_key() != key and model._precision_settled()


@pytest.mark.parametrize(("sampler", "geometry"), [("float16", "none"), ("bfloat16", "float16"), ("none", "float16")])
def test_following_the_geometry_head_without_its_precision_says_it_has_no_effect(capsys, sampler, geometry):
    model = build(tiny_config(sampler_autocast=sampler, geometry_autocast=geometry, **FOLLOW))
    assert not model._training_queries_follow_geometry
    printed = " ".join(capsys.readouterr().out.split())
    assert "training-queries-follow-geometry True has no effect: it needs --pipeline.model.sampler-autocast and " in (
        printed
    )
    assert f"(got {sampler} and {geometry})" in printed
    build(tiny_config(sampler_autocast="float16", geometry_autocast="float16", **FOLLOW))
    assert "no effect" not in capsys.readouterr().out


def test_an_overflow_at_the_first_check_switches_training_queries_too():
    model = build(tiny_config(sampler_autocast="float16", geometry_autocast="float16", **FOLLOW))
    overflow_anywhere(model)
    model._check_sampler_precision(step=0)
    assert model._sampler_half is False and model._sampler_overflowed and model._precision_settled()
    assert model.cuda_graph_key()[1] is False


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_the_probe_and_the_checks_requests_queue_without_reading_the_gpu(device):
    """What runs between checks (the probe, the requests a step before a check) gives what a check made at once
    would, and on a GPU makes no synchronising call: the GPU's queue is left alone; only the check's read waits,
    for these copies alone."""
    config = tiny_config(
        sampler_autocast="float16", geometry_autocast="float16", cuda_graph=True, static_refine_budget="auto"
    )
    model = build(config).to(device).train()
    outputs = model(rays(16).to(device))  # a step: a geometry overflow count to request
    sum(model.get_loss_dict(outputs, {"image": torch.rand(16, 3, device=device)}).values()).backward()
    rounds = len(model.sampler.refine_budgets)
    for _ in range(model.refine_budget.min_observations):
        model.refine_budget.observe(torch.full((rounds,), 0.25, device=device))
    expected = model.sampler_rounding_error()  # a first check: the probe's fixed directions move to the GPU once
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        probe = model._probe_sampler_precision()
        model._request_checks(49)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    error, beta = probe.result().tolist()
    assert error == pytest.approx(expected[0], rel=1e-6) and beta == pytest.approx(0.1 + 1e-4)  # beta_min added
    assert model._requested_overflows is not None and model.refine_budget._requested is not None
    model._check_geometry_overflows(50)
    assert model.refine_budget.adapt(50)  # 25% of rays: rounds shrink from every ray to 0.25 * 1.5 + 1/32
    assert model.sampler.refine_budgets == pytest.approx((13 / 32,) * rounds)
