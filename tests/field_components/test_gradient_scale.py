"""The gradient-scale ops: identity forward; the gradient multiplied (scale) or divided (unscale) on its way back,
overflows dropped and counted."""

from __future__ import annotations

import torch

from cocoinr_nerfstudio.field_components.gradient_scale import GradientScale, scale_gradient, unscale_gradient


def test_values_pass_unchanged_and_gradients_are_rescaled():
    x = torch.tensor([1.5, -2.0, 3.0], requires_grad=True)
    cotangent = torch.tensor([0.25, 1.0, -4.0])
    factor, overflows = torch.tensor([8.0]), torch.zeros(1, requires_grad=True)
    for op, expected in ((scale_gradient, cotangent * 8), (unscale_gradient, cotangent / 8)):
        x.grad = None
        y = op(x, factor) if op is scale_gradient else op(x, factor, overflows)
        assert torch.equal(y, x)
        y.backward(cotangent)
        assert torch.equal(x.grad, expected)
    assert overflows.grad.item() == 0


def test_a_region_between_them_hands_back_the_true_gradient():
    """Scaled at the output, unscaled at the input: the gradient outside equals the plain one, while inside it
    carried the factor (here: large enough that float16 would have flushed the plain one to zero)."""
    x = torch.tensor([0.5, 1.0], requires_grad=True)
    scale = GradientScale(2.0**20, "cpu")
    inside = []
    h = unscale_gradient(x, scale.factor, scale.overflows) * 3.0
    h.register_hook(lambda grad: inside.append(grad.clone()))
    scale_gradient(h.square(), scale.factor).sum().mul(1e-9).backward()
    torch.testing.assert_close(x.grad, 1e-9 * 18.0 * x.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(inside[0], 2.0**20 * 1e-9 * 2 * 3.0 * x.detach(), rtol=1e-6, atol=0)
    assert inside[0].half().min() > 0 and (1e-9 * 6.0 * x.detach()).half().min() == 0
    assert scale.take_overflows() == 0


def test_overflows_are_dropped_counted_and_the_scale_lowered_in_place():
    scale = GradientScale(2.0**4, "cpu")
    factor = scale.factor
    x = torch.ones(4, requires_grad=True)
    for _ in range(2):  # counts accumulate until they are taken
        y = unscale_gradient(x, scale.factor, scale.overflows)
        y.backward(torch.tensor([1.0, float("inf"), float("nan"), -2.0]))
    assert torch.equal(x.grad, torch.tensor([2.0, 0.0, 0.0, -4.0]) / 16)
    assert scale.take_overflows() == 4 and scale.take_overflows() == 0
    scale.halve()
    assert scale.value() == 8.0 and scale.factor is factor  # the same storage: a captured graph reads the new value
