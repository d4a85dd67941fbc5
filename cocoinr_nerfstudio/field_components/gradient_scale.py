"""Identity ops that rescale the gradient passing through them: the loss scale of a half-precision region.

float16 keeps 10 mantissa bits (TF32's) but stops at 6e-5 (normal) and 6e-8 (subnormal): per-point gradients of a
mean over ~100k samples fall there. A region computed in float16 therefore receives its output gradients multiplied
by a power of two (:func:`scale_gradient` on its outputs) and hands them back divided (:func:`unscale_gradient` on
its inputs, parameters included), so that nothing outside it sees the factor. Only the first derivative is scaled:
the region must not be differentiated twice from outside (the SDF's own gradient is computed inside it).

The factor is a tensor, so a CUDA graph or a compiled function reads its current value: it can be lowered in place
after an overflow without recompiling or capturing again. An overflow (an inf or NaN reaching an input) is dropped,
not passed on, and counted in the gradient of an ``overflows`` tensor, for the host to read when it next waits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cocoinr_nerfstudio.model_components.host_reads import DeferredRead


class _ScaleGradient(torch.autograd.Function):
    """``x`` unchanged; its gradient multiplied by ``factor``."""

    @staticmethod
    def forward(x: Tensor, factor: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (factor,) = ctx.saved_tensors
        return grad * factor.to(grad.dtype), None


class _UnscaleGradient(torch.autograd.Function):
    """``x`` unchanged; its gradient divided by ``factor``, non-finite entries zeroed and counted (as the gradient of
    ``overflows``)."""

    @staticmethod
    def forward(x: Tensor, factor: Tensor, overflows: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor):
        factor, overflows = ctx.saved_tensors
        grad = grad / factor.to(grad.dtype)
        finite = torch.isfinite(grad)
        count = (~finite).sum().to(overflows.dtype).expand_as(overflows)
        return torch.where(finite, grad, torch.zeros_like(grad)), None, count


def scale_gradient(x: Tensor, factor: Tensor) -> Tensor:
    """``x``, whose gradient is multiplied by ``factor`` (a one-element tensor) on its way back: a region's output."""
    return _ScaleGradient.apply(x, factor)


def unscale_gradient(x: Tensor, factor: Tensor, overflows: Tensor) -> Tensor:
    """``x``, whose gradient is divided by ``factor`` on its way back: a region's input. Entries that overflowed
    (inf or NaN) are passed on as zeros, and their number is added to ``overflows.grad`` (a one-element leaf that
    requires grad)."""
    return _UnscaleGradient.apply(x, factor, overflows)


class GradientScale:
    """A region's loss scale on one device, and its overflow count. Lowered in place (:meth:`halve`) after an
    overflow: a CUDA graph that captured the region reads the new value on its next replay."""

    def __init__(self, value: float, device: torch.device | str) -> None:
        self.factor = torch.full((1,), float(value), device=device)
        self.overflows = torch.zeros(1, device=device, requires_grad=True)

    def value(self) -> float:
        return float(self.factor.item())

    def take_overflows(self) -> int:
        """Entries dropped since the last call (a read of the device: the host waits for it), and resets the count
        in place."""
        if self.overflows.grad is None:
            return 0
        count = int(self.overflows.grad.item())
        self.overflows.grad.zero_()
        return count

    def request_overflows(self) -> DeferredRead | None:
        """The count since the last request or take, to read later without draining the GPU's queue, and resets it
        in place (after the copy, in queue order). None: nothing was ever counted."""
        if self.overflows.grad is None:
            return None
        read = DeferredRead(self.overflows.grad)
        self.overflows.grad.zero_()
        return read

    def halve(self) -> None:
        self.factor.mul_(0.5)
