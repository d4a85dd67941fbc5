"""``--pipeline.model.geometry-autocast``: the geometry head trained in half precision, as one gradient-scaled region.

Small fields on CPU (autocast runs bfloat16 and float16 there too): the region's outputs are float32 and close to
the float32 field's, a power-of-two scale changes no gradient, the scale is what keeps a tiny loss's gradients in
float16, and nothing but the trained pass leaves float32.
"""

from __future__ import annotations

import pytest
import torch
from test_coco_inr import rays
from tiny_models import build, tiny_config

from cocoinr_nerfstudio.fields.coco_field import CocoField, CocoFieldConfig

POINTS = torch.rand(64, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1


def _field(dtype: torch.dtype | None = None, scale: float = 1.0) -> tuple[CocoField, torch.Tensor]:
    """A small field with its attention switched on (geometric init zeroes those columns), and its prototypes."""
    prototypes = {
        head: torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) for head in ("geometry", "color")
    }
    prototypes["geometry"].requires_grad_(True)
    torch.manual_seed(0)
    field = CocoFieldConfig(geometry_hidden_dims=(32, 32), feature_dim=16).setup(
        prototype_source=prototypes.__getitem__, prototype_dim=16
    )
    with torch.no_grad():
        field.sdf_mlp.layers[0].direction.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    field.train_geometry_in(dtype, scale)
    return field, prototypes["geometry"]


def _trained(dtype: torch.dtype | None, scale: float = 1.0, loss_weight: float = 1.0):
    """The trained pass (create_graph) and the gradients of an eikonal-style loss on it (means, as the model's)."""
    field, prototypes = _field(dtype, scale)
    sdf, feature, gradient = field.sdf_and_gradient(POINTS, create_graph=True)
    loss = sdf.abs().mean() + feature.square().mean() + ((gradient.norm(dim=-1) - 1.0) ** 2).mean()
    (loss * loss_weight).backward()
    grads = {name: p.grad for name, p in field.named_parameters() if p.grad is not None}
    return (sdf, feature, gradient), {**grads, "prototypes": prototypes.grad}


def _relative_errors(grads: dict, reference: dict) -> dict[str, float]:
    assert grads.keys() == reference.keys()
    return {name: float((grads[name] - reference[name]).norm() / reference[name].norm()) for name in reference}


@pytest.mark.parametrize(
    ("dtype", "sdf_atol", "gradient_atol", "weights_rtol"),
    [(torch.float16, 2e-3, 5e-2, 3e-2), (torch.bfloat16, 2e-2, 4e-1, 2.5e-1)],
)
def test_half_precision_outputs_are_float32_and_close_to_the_float32_field(
    dtype, sdf_atol, gradient_atol, weights_rtol
):
    """Rounding-level differences: float16 keeps 8x bfloat16's precision, and the tolerances say so. The loss is
    weighted as one of 64 points among the model's ~100k samples."""
    (sdf, feature, gradient), grads = _trained(dtype, 1024.0, loss_weight=1e-3)
    (sdf32, feature32, gradient32), grads32 = _trained(None, loss_weight=1e-3)
    assert sdf.dtype == feature.dtype == gradient.dtype == torch.float32
    torch.testing.assert_close(sdf, sdf32, atol=sdf_atol, rtol=0)
    torch.testing.assert_close(feature, feature32, atol=sdf_atol, rtol=0)
    torch.testing.assert_close(gradient, gradient32, atol=gradient_atol, rtol=0)
    assert max(_relative_errors(grads, grads32).values()) < weights_rtol
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_a_power_of_two_scale_changes_no_bfloat16_gradient():
    """bfloat16 has float32's range, so nothing underflows either way: scaled and unscaled gradients are the same
    numbers (a power of two scales without rounding), up to float sums."""
    _, grads = _trained(torch.bfloat16, 1.0)
    _, scaled = _trained(torch.bfloat16, 2.0**10)
    assert max(_relative_errors(scaled, grads).values()) < 1e-6


def test_the_scale_keeps_the_float16_gradients_of_a_small_loss():
    """A loss of 1e-7 (per-point gradients of a mean over ~100k samples are that small): float16 flushes many of its
    backward values to zero or to a few bits; scaled by 2^10 inside the region, they come back right."""
    _, reference = _trained(None, loss_weight=1e-7)
    unscaled = _relative_errors(_trained(torch.float16, 1.0, loss_weight=1e-7)[1], reference)
    scaled = _relative_errors(_trained(torch.float16, 2.0**10, loss_weight=1e-7)[1], reference)
    assert max(scaled.values()) < 3e-2
    assert max(unscaled.values()) > 0.5 and sorted(unscaled.values())[len(unscaled) // 2] > 0.5


def test_queries_and_renders_stay_float32():
    """Only the pass the losses differentiate runs in half precision: the sampler's queries, renders, evaluation and
    mesh extraction see the float32 field's values, exactly."""
    half, _ = _field(torch.float16, 1024.0)
    full, _ = _field(None)
    with torch.no_grad():
        assert torch.equal(half.get_sdf_values(POINTS), full.get_sdf_values(POINTS))
    for ours, theirs in zip(
        half.sdf_and_gradient(POINTS, create_graph=False),
        full.sdf_and_gradient(POINTS, create_graph=False),
        strict=True,
    ):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("scale", [0.0, -4.0, 1000.0, float("inf")])
def test_a_scale_that_is_not_a_power_of_two_is_refused_by_name(scale):
    field, _ = _field()
    with pytest.raises(ValueError, match=r"--pipeline\.model\.geometry-gradient-scale must be a positive power of two"):
        field.train_geometry_in(torch.float16, scale)


def test_tiny_cuda_nn_hash_grid_is_refused(monkeypatch):
    """torch.func cannot differentiate tiny-cuda-nn's encoding: the option says what to change instead of failing
    inside the first step."""
    field = CocoFieldConfig(geometry_hidden_dims=(32,), feature_dim=8, use_hash_grid=True).setup(
        prototype_source=lambda head: torch.zeros(8, 16), prototype_dim=16
    )
    monkeypatch.setattr(field.hash_grid, "tcnn_encoding", torch.nn.Identity())
    with pytest.raises(ValueError, match=r"hash-grid\.implementation torch"):
        field.train_geometry_in(torch.float16, 1024.0)
    field.train_geometry_in(None, 1024.0)  # float32 training is unaffected


def test_the_model_options_reach_the_field():
    assert build(tiny_config()).field.geometry_autocast is None
    field = build(tiny_config(geometry_autocast="float16", geometry_gradient_scale=256.0)).field
    assert (field.geometry_autocast, field.geometry_gradient_scale) == (torch.float16, 256.0)
    with pytest.raises(ValueError, match="geometry-gradient-scale"):
        build(tiny_config(geometry_autocast="float16", geometry_gradient_scale=100.0))


def test_an_overflow_is_dropped_reported_and_the_scale_halved(capsys):
    """A scale far too large for float16: the step's geometry gradients that overflowed reach no weight (they are
    zeros, not infs), and the next check reports them and halves the scale in place."""
    model = build(tiny_config(geometry_autocast="float16", geometry_gradient_scale=2.0**40))
    model.train()
    outputs = model(rays(32))
    sum(model.get_loss_dict(outputs, {"image": torch.rand(32, 3, generator=torch.Generator())}).values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scale = model.field.gradient_scale
    factor = scale.factor
    model._check_geometry_overflows(50)
    assert scale.value() == 2.0**39 and scale.factor is factor
    message = " ".join(capsys.readouterr().out.split())
    assert "gradient values overflowed float16 in steps 0-50" in message and "loss scale is now 5.49756e+11" in message
    model._check_geometry_overflows(100)  # nothing since: nothing to say, the scale stays
    assert scale.value() == 2.0**39 and "overflowed" not in capsys.readouterr().out


def test_a_count_requested_a_step_before_its_check_is_the_one_reported():
    """What _request_checks reads at step 49 is what the check at 50 reports; what overflows after the request is
    counted at the next check."""
    model = build(tiny_config(geometry_autocast="float16", geometry_gradient_scale=2.0**40))
    model.train()

    def step() -> None:
        outputs = model(rays(32))
        losses = model.get_loss_dict(outputs, {"image": torch.rand(32, 3, generator=torch.Generator())})
        sum(losses.values()).backward()

    step()
    scale = model.field.gradient_scale
    first = int(scale.overflows.grad.item())
    model._request_checks(48)  # not the step before a check: nothing requested
    assert model._requested_overflows is None
    model._request_checks(49)
    assert int(scale.overflows.grad.item()) == 0 and first > 0  # the count restarts at the request
    step()  # after the request: the next check's
    later = int(scale.overflows.grad.item())
    model._check_geometry_overflows(50)
    assert scale.value() == 2.0**39 and model._requested_overflows is None
    model._check_geometry_overflows(100)  # nothing requested: read now
    assert scale.value() == 2.0**38 and later > 0


def test_the_overflow_check_runs_only_with_the_option():
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes

    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=None)
    for autocast, expected in (("none", False), ("float16", True)):
        callbacks = build(tiny_config(geometry_autocast=autocast)).get_training_callbacks(attributes)
        assert any(getattr(c.func, "__name__", "") == "_check_geometry_overflows" for c in callbacks) is expected
