"""bf16 sampler queries are used only while their SDF error is a small share of beta, then float32 for good."""

from __future__ import annotations

import math

import pytest
import torch
from nerfstudio.engine.callbacks import TrainingCallbackAttributes
from test_coco_inr import rays
from tiny_models import build, tiny_config

from cocoinr_nerfstudio.models.coco_inr import CocoInrModel


def record_query_precision(model: CocoInrModel) -> list[bool]:
    """Whether each of the sampler's SDF queries ran under bf16 autocast (the precision check's own eager probes,
    ``compiled=False``, are not the sampler's queries)."""
    seen: list[bool] = []
    sampler_sdf = model._sampler_sdf

    def recording(points):
        original = model.field.get_sdf_values

        def get_sdf_values(x, compiled=True):
            if compiled:
                seen.append(torch.is_autocast_enabled("cpu"))
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


def test_queries_switch_to_float32_once_beta_is_below_the_error(capsys):
    model = build(tiny_config(sampler_autocast="bfloat16"))
    assert model._sampler_bf16 is None  # not checked before the first step or render
    model._check_sampler_precision(step=0)
    assert model._sampler_bf16 is True  # beta 0.1: bf16's error (6e-3 here) is below a quarter of it
    key = model.cuda_graph_key()
    seen = record_query_precision(model)
    model.train()
    model(rays(16))
    assert seen and all(seen)

    set_beta(model, 2e-4)  # late in training: bf16's error is no longer small against beta
    model._check_sampler_precision(step=50)
    assert model._sampler_bf16 is False and model.cuda_graph_key() != key  # a captured step is captured again
    printed = " ".join(capsys.readouterr().out.split())
    assert "at step 50: they run in float32 from now on (--pipeline.model.sampler-autocast-max-error)" in printed
    seen.clear()
    model(rays(16))
    assert seen and not any(seen)

    set_beta(model, 0.1)
    model._check_sampler_precision(step=100)
    assert model._sampler_bf16 is False  # once off, off: no capture to and fro


def test_the_check_is_a_training_callback_only_where_it_can_change_anything():
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=None)

    def checks(**overrides) -> int:
        model = build(tiny_config(**overrides))
        callbacks = model.get_training_callbacks(attributes)
        return sum(getattr(c.func, "__func__", None) is CocoInrModel._check_sampler_precision for c in callbacks)

    assert checks(sampler_autocast="bfloat16") == 1
    assert checks(sampler_autocast="bfloat16", sampler_autocast_max_error=math.inf) == 0
    assert checks() == 0
    assert build(tiny_config(sampler_autocast="bfloat16", sampler_autocast_max_error=math.inf))._sampler_bf16 is True
    assert build(tiny_config())._sampler_bf16 is False


def test_a_loaded_model_checks_before_its_first_render():
    model = build(tiny_config(sampler_autocast="bfloat16"))
    set_beta(model, 2e-4)  # as a trained checkpoint's
    model.eval()
    seen = record_query_precision(model)
    with torch.no_grad():
        model(rays(8))
    assert model._sampler_bf16 is False and seen and not any(seen)


def test_a_negative_share_is_refused():
    with pytest.raises(ValueError, match="sampler-autocast-max-error must be a share of beta >= 0"):
        build(tiny_config(sampler_autocast="bfloat16", sampler_autocast_max_error=-0.1))
