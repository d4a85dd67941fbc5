"""A checkpoint carries what training set outside the weights: the sampler queries' precision, the refine budgets
and the geometry head's loss scale, so that ``--load-dir`` resumes them instead of starting them over."""

from __future__ import annotations

import io

import pytest
import torch
from test_coco_inr import rays
from test_half_sampler_queries import set_beta
from tiny_models import build, tiny_config

from cocoinr_nerfstudio.model_components.extra_state import decode_extra_state, encode_extra_state
from cocoinr_nerfstudio.models.coco_inr import SAMPLER_PRECISION_LEAD, CocoInrModel

FAST = {
    "sampler_autocast": "float16",
    "geometry_autocast": "float16",
    "geometry_gradient_scale": 2.0**40,  # far too large for float16: the first step overflows
    "cuda_graph": True,
    "static_refine_budget": "auto",
}


def train_step(model: CocoInrModel, seed: int = 0) -> None:
    outputs = model(rays(32, seed=seed))
    image = torch.rand(32, 3, generator=torch.Generator().manual_seed(seed))
    sum(model.get_loss_dict(outputs, {"image": image}).values()).backward()


def trained_state(model: CocoInrModel) -> None:
    """Drives ``model`` through what a run sets: float16 queries checked safe at step 0 and switched to float32 at
    the next check, the refine budgets sized from demand, the loss scale halved after an overflow."""
    model.train()
    model._sampler_precision_callback(0)
    assert model._sampler_half is True
    set_beta(model, 2e-4)  # the rounding error is no longer small against beta
    check = model._next_precision_check
    model._sampler_precision_callback(check - SAMPLER_PRECISION_LEAD)  # the probe
    model._sampler_precision_callback(check)
    assert model._sampler_half is False and model.training_query_switches == [(check, False)]
    for _ in range(model.refine_budget.min_observations):
        model.refine_budget.observe(torch.tensor([0.25, 0.0]))
    assert model.refine_budget.adapt(50)
    train_step(model)
    model._check_geometry_overflows(50)
    assert model.field.gradient_scale.value() == 2.0**39


def saved(model: CocoInrModel) -> dict:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # nerfstudio's loader under torch >= 2.6


def test_a_checkpoint_resumes_the_sampler_precision_the_budgets_and_the_loss_scale(capsys):
    model = build(tiny_config(**FAST))
    trained_state(model)
    state = saved(model)
    assert all(isinstance(value, torch.Tensor) for value in state["model"].values())

    resumed = build(tiny_config(**FAST))
    assert (resumed._sampler_half, resumed.sampler.refine_budgets) == (None, (1.0, 1.0))  # what a resume started with
    resumed.load_model(state)  # strict, as ns-eval's and --load-dir's loads try first
    assert resumed._sampler_half is False and not resumed._sampler_unmeasured
    assert resumed.training_query_switches == model.training_query_switches
    assert resumed._next_precision_check == model._next_precision_check
    assert resumed.sampler.refine_budgets == (13 / 32, 1 / 32)
    assert resumed.refine_budget.history == model.refine_budget.history == [(50, (0.25, 0.0), (13 / 32, 1 / 32))]
    assert resumed.cuda_graph_key() == model.cuda_graph_key()  # the first capture bakes in the run's state
    # the next check finds the precision settled: no probe, no switch back to float16
    resumed.train()
    resumed._sampler_precision_callback(model._next_precision_check)
    assert resumed._sampler_probe is None and resumed._sampler_half is False
    # the loss scale goes on from the halved one: the next overflow halves it again, from 2^39
    train_step(resumed, seed=1)
    assert resumed.field.gradient_scale.value() == 2.0**39
    resumed._check_geometry_overflows(100)
    assert resumed.field.gradient_scale.value() == 2.0**38
    assert "afresh" not in capsys.readouterr().out


def test_a_loss_scale_in_use_is_lowered_in_place():
    """A model that already trained (its scale captured in a graph) takes the checkpoint's value in place, and
    forgets the overflows its own scale had: they would halve the loaded one."""
    model = build(tiny_config(**FAST))
    trained_state(model)
    state = saved(model)
    other = build(tiny_config(**FAST))
    other.train()
    train_step(other)
    scale = other.field.gradient_scale
    assert scale.overflows.grad.item() > 0
    other._request_checks(49)  # a count on its way to the check at step 50
    assert other._requested_overflows is not None
    other.load_model(state)
    assert scale.factor.item() == 2.0**39 and other.field.gradient_scale is scale
    assert other._requested_overflows is None and scale.overflows.grad.item() == 0
    other._check_geometry_overflows(50)
    assert scale.value() == 2.0**39


def test_a_checkpoint_without_the_state_loads_and_starts_it_over():
    """Checkpoints written before the state was saved still load strictly; their runs check and size afresh."""
    model = build(tiny_config(**FAST))
    trained_state(model)
    state = saved(model)
    del state["model"]["_extra_state"]
    resumed = build(tiny_config(**FAST))
    resumed.load_model(state)
    assert (resumed._sampler_half, resumed.sampler.refine_budgets) == (None, (1.0, 1.0))
    assert resumed.field.geometry_gradient_scale == 2.0**40
    for name, value in model.state_dict().items():
        if name != "_extra_state":
            torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_state_saved_under_other_settings_starts_over_and_says_so(capsys):
    model = build(tiny_config(**FAST))
    trained_state(model)
    state = saved(model)

    other_precision = build(tiny_config(**{**FAST, "sampler_autocast": "bfloat16", "geometry_autocast": "bfloat16"}))
    other_precision.load_model(state)
    assert other_precision._sampler_half is None  # checked afresh before its first step
    assert other_precision.field.geometry_gradient_scale == 2.0**40  # a float16 scale says nothing of bfloat16's
    assert other_precision.sampler.refine_budgets == (13 / 32, 1 / 32)  # budgets do not depend on the precision
    printed = " ".join(capsys.readouterr().out.split())
    assert "the checkpoint checked float16 queries against 0.25 x beta; this run checks bfloat16" in printed
    assert "the checkpoint's loss scale (5.49756e+11) was for float16 from 1.09951e+12; this run's bfloat16" in printed

    other_scale = build(tiny_config(**{**FAST, "geometry_gradient_scale": 2.0**20}))
    other_scale.load_model(state)
    assert other_scale.field.geometry_gradient_scale == 2.0**20 and other_scale._sampler_half is False
    printed = " ".join(capsys.readouterr().out.split())
    assert "this run's float16 starts from 1.04858e+06 afresh" in printed

    following = build(tiny_config(**FAST, training_queries_follow_geometry=True))
    following.load_model(state)
    assert following._sampler_half is None  # the saved switch took training's queries too; here it would not
    printed = " ".join(capsys.readouterr().out.split())
    assert "this run checks float16 against 0.25 x beta, training's following the geometry head afresh" in printed

    more_rounds = build(tiny_config(**{**FAST, "max_total_iters": 4}))
    more_rounds.load_model(state)
    assert more_rounds.sampler.refine_budgets == (1.0, 1.0, 1.0) and more_rounds._sampler_half is False
    printed = " ".join(capsys.readouterr().out.split())
    assert "refine budgets are for 3 rounds, this run has 4: they are sized afresh" in printed

    eager = build(tiny_config())  # none of it in use: nothing restored, nothing said
    capsys.readouterr()
    eager.load_model(state)
    assert eager._sampler_half is False and eager.refine_budget is None  # float32 throughout, as configured
    assert capsys.readouterr().out == ""


def test_the_encoding_round_trips_and_refuses_other_tensors():
    state = {"a": [1, 2.5, None, True], "b": {"c": "float16"}}
    encoded = encode_extra_state(state)
    assert encoded.dtype == torch.uint8 and encoded.dim() == 1
    assert decode_extra_state(encoded, "x") == {"version": 1, **state}
    with pytest.raises(ValueError, match=r"the checkpoint's _model\._extra_state: not this package's encoded"):
        build(tiny_config()).set_extra_state(torch.tensor([255, 0, 1], dtype=torch.uint8))
    with pytest.raises(ValueError, match="x: training state version 99, expected 1"):
        decode_extra_state(torch.tensor(list(b'{"version": 99}'), dtype=torch.uint8), "x")


def test_nerfstudio_pipeline_load_restores_it():
    """The path of ``--load-dir`` and ``eval_setup``: nerfstudio's pipeline strips ``_model.`` and loads strictly; a
    key it did not route would fall back to a non-strict load and leave the state unrestored, silently."""
    from nerfstudio.pipelines.base_pipeline import Pipeline, VanillaPipeline

    model = build(tiny_config(**FAST))
    trained_state(model)
    checkpoint = {f"_model.{name}": value for name, value in saved(model)["model"].items()}
    pipeline = Pipeline()
    pipeline._model = build(tiny_config(**FAST))
    VanillaPipeline.load_pipeline(pipeline, checkpoint, step=60)  # type: ignore[arg-type]
    resumed = pipeline.model
    assert resumed.cuda_graph_key() == model.cuda_graph_key() and resumed._sampler_half is False
    assert resumed.field.geometry_gradient_scale == 2.0**39
