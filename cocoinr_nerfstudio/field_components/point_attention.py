"""Multi-head attention of many points to a few shared keys, as custom ops differentiable twice.

The geometry head's attention is differentiated twice in training (the SDF's gradient enters the eikonal loss
and the colour head). Written with torch operations, every pass (forward, the gradient, the backward of both)
writes and re-reads ``points x heads x keys`` score matrices: 400 MB at 100k points, 4 heads and 256 keys. The
ops below are the four passes as whole functions, so that a kernel can keep each point's scores on chip: on CUDA
they run this project's Triton kernels (:mod:`.triton_point_attention`), elsewhere the torch formulas here.

Layout: ``q`` is ``[n, heads * d]``, ``k`` and ``v`` are ``[m, heads * d]``, each head a block of ``d`` columns
(what the projections produce, so no transposes). Scores are scaled by ``d ** -0.5``.

Ops and their derivatives (``p`` = softmax of the scores, ``g`` a cotangent of the output):
- ``attend(q, k, v) -> o``; backward: ``grad_q`` and ``grad_kv``;
- ``grad_q(q, k, v, g) -> dq`` (what an input gradient needs); backward: ``grad_q_backward``;
- ``grad_kv(q, k, v, g) -> dk, dv`` (reductions over all points); first order only;
- ``grad_qkv``: both at once, for a backward pass that nothing differentiates further;
- ``grad_q_backward(q, k, v, g, f) -> dq, dk, dv, dg``; first order only (a third derivative is never taken).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from cocoinr_nerfstudio.field_components import triton_point_attention as kernels
from cocoinr_nerfstudio.torch_compat import OutOfMemoryError


def _heads(x: Tensor, heads: int) -> Tensor:
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return x.view(x.shape[0], heads, x.shape[1] // heads)


def _probabilities(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """``[n, heads, m]`` softmax of the scaled scores (float32 for half-precision inputs)."""
    qh, kh = _heads(q, heads), _heads(k, heads)
    return (torch.einsum("nhd,mhd->nhm", qh, kh) * qh.shape[-1] ** -0.5).softmax(dim=-1)


def reference_attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    p = _probabilities(q, k, heads)
    return torch.einsum("nhm,mhd->nhd", p, _heads(v, heads)).reshape(q.shape).to(q.dtype)


def _score_gradient(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``p``, ``u = g v^T`` and the scores' cotangent ``p * (u - <p, u>)``, all ``[n, heads, m]``."""
    p = _probabilities(q, k, heads)
    u = torch.einsum("nhd,mhd->nhm", _heads(g, heads), _heads(v, heads))
    return p, u, p * (u - (p * u).sum(-1, keepdim=True))


def reference_grad_q(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> Tensor:
    _, _, ds = _score_gradient(q, k, v, g, heads)
    kh = _heads(k, heads)
    return (torch.einsum("nhm,mhd->nhd", ds, kh) * kh.shape[-1] ** -0.5).reshape(q.shape).to(q.dtype)


def reference_grad_kv(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    p, _, ds = _score_gradient(q, k, v, g, heads)
    qh, gh = _heads(q, heads), _heads(g, heads)
    dk = torch.einsum("nhm,nhd->mhd", ds, qh) * qh.shape[-1] ** -0.5
    dv = torch.einsum("nhm,nhd->mhd", p, gh)
    return dk.reshape(k.shape).to(k.dtype), dv.reshape(v.shape).to(v.dtype)


def reference_grad_qkv(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    return reference_grad_q(q, k, v, g, heads), *reference_grad_kv(q, k, v, g, heads)


def reference_grad_q_backward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, f: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cotangents of ``q, k, v, g`` given the cotangent ``f`` of ``grad_q(q, k, v, g)``."""
    p, u, ds = _score_gradient(q, k, v, g, heads)
    qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    gh, fh = _heads(g, heads), _heads(f, heads)
    scale = qh.shape[-1] ** -0.5
    dds = torch.einsum("nhd,mhd->nhm", fh, kh) * scale  # cotangent of ds
    c = (dds * p).sum(-1, keepdim=True)
    du = p * (dds - c)
    dp = dds * (u - (p * u).sum(-1, keepdim=True)) - c * u
    dscores = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.einsum("nhm,mhd->nhd", dscores, kh) * scale
    dk = (torch.einsum("nhm,nhd->mhd", ds, fh) + torch.einsum("nhm,nhd->mhd", dscores, qh)) * scale
    dv = torch.einsum("nhm,nhd->mhd", du, gh)
    dg = torch.einsum("nhm,mhd->nhd", du, vh)
    return (
        dq.reshape(q.shape).to(q.dtype),
        dk.reshape(k.shape).to(k.dtype),
        dv.reshape(v.shape).to(v.dtype),
        dg.reshape(g.shape).to(g.dtype),
    )


_kernel_failure: list[str] = []
"""Why the kernels failed on this machine, once they have: every later call takes the torch formulas."""


def _kernels_apply(q: Tensor) -> bool:
    return q.is_cuda and kernels.AVAILABLE


def kernels_run(q: Tensor) -> bool:
    """Whether the Triton kernels (not the torch formulas) would take these queries: CUDA, Triton there, and no
    failure of the kernels earlier in this process."""
    return _kernels_apply(q) and not _kernel_failure


def _check_shapes(name: str, q: Tensor, k: Tensor, v: Tensor, heads: int, *per_point: Tensor) -> None:
    """Refuses what the kernels would read out of bounds: ``q`` and the per-point cotangents ``[n, heads * d]``,
    ``k`` and ``v`` ``[m, heads * d]``, on one device; and no keys at all (``m = 0``), where the kernels' softmax
    would divide 0 by 0."""
    tensors = (q, k, v, *per_point)
    width = q.shape[-1] if q.dim() == 2 else -1
    if (
        heads < 1
        or width < heads
        or width % heads
        or any(x.dim() != 2 or x.shape[1] != width or x.device != q.device for x in tensors)
        or k.shape[0] != v.shape[0]
        or k.shape[0] == 0
        or any(x.shape[0] != q.shape[0] for x in per_point)
    ):
        shapes = ", ".join(f"{tuple(x.shape)} on {x.device}" for x in tensors)
        raise ValueError(
            f"point attention ({name}): expected queries [n, heads * d], keys and values [m >= 1, heads * d] and "
            f"per-point cotangents [n, heads * d] on one device, with heads={heads}; got {shapes}."
        )


def _run(name: str, reference: Callable, q: Tensor, *args):
    """The op ``name`` through the Triton kernels on CUDA, else (or where they cannot run: a GPU without the
    registers or shared memory their tiles need, a broken Triton) through the torch formulas, saying so once.
    While a CUDA graph is being captured, a failure is raised instead: nothing may fall back in the middle of a
    capture."""
    *tensors, heads = args
    _check_shapes(name, q, *tensors[:2], heads, *tensors[2:])
    if _kernels_apply(q) and not _kernel_failure:
        try:
            return getattr(kernels, name)(q, *args)
        except OutOfMemoryError:
            raise  # what callers (chunked renders) handle themselves
        except Exception as error:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            _kernel_failure.append(f"{type(error).__name__}: {error}")
            CONSOLE.print(
                f"[bold yellow]Point-attention kernels failed on this GPU ({_kernel_failure[0][:300]}); using "
                "their torch formulas instead (slower). --pipeline.model.sdf-field.coordinate-attention.point-kernels "
                "False (and the same under background-field) returns to the block-diagonal path."
            )
    return reference(q, *args)


@torch.library.custom_op("cocoinr::point_attend", mutates_args=())
def attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Softmax attention of every row of ``q`` to the rows of ``k`` and ``v``, per head; ``[n, heads * d]``."""
    return _run("attend", reference_attend, q, k, v, heads)


@torch.library.custom_op("cocoinr::point_attend_grad_q", mutates_args=())
def grad_q(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> Tensor:
    """The cotangent of ``q`` given the cotangent ``g`` of ``attend(q, k, v)``."""
    return _run("grad_q", reference_grad_q, q, k, v, g, heads)


@torch.library.custom_op("cocoinr::point_attend_grad_kv", mutates_args=())
def grad_kv(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """The cotangents of ``k`` and ``v`` given the cotangent ``g`` of ``attend(q, k, v)``."""
    return _run("grad_kv", reference_grad_kv, q, k, v, g, heads)


@torch.library.custom_op("cocoinr::point_attend_grad_qkv", mutates_args=())
def grad_qkv(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``grad_q`` and ``grad_kv`` at once (on CUDA one pass over the rows fewer); first order only."""
    return _run("grad_qkv", reference_grad_qkv, q, k, v, g, heads)


@torch.library.custom_op("cocoinr::point_attend_grad_q_backward", mutates_args=())
def grad_q_backward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, f: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cotangents of ``q, k, v, g`` given the cotangent ``f`` of ``grad_q(q, k, v, g)``."""
    return _run("grad_q_backward", reference_grad_q_backward, q, k, v, g, f, heads)


@attend.register_fake
def _(q, k, v, heads):
    return torch.empty_like(q)


@grad_q.register_fake
def _(q, k, v, g, heads):
    return torch.empty_like(q)


@grad_kv.register_fake
def _(q, k, v, g, heads):
    return torch.empty_like(k), torch.empty_like(v)


@grad_qkv.register_fake
def _(q, k, v, g, heads):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@grad_q_backward.register_fake
def _(q, k, v, g, f, heads):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)


def _save_inputs(ctx, inputs, output) -> None:
    *tensors, heads = inputs
    ctx.save_for_backward(*tensors)
    ctx.heads = heads


class PointAttention(torch.autograd.Function):
    """``attend`` with its derivatives, as an ``autograd.Function`` (custom ops alone have no ``torch.func``
    support, which the compiled SDF gradient needs)."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
        return attend(q, k, v, heads)

    setup_context = staticmethod(_save_inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors
        needs_q, needs_k, needs_v = ctx.needs_input_grad[:3]
        if needs_q and (needs_k or needs_v) and not torch.is_grad_enabled():  # nothing differentiates the result
            return (*grad_qkv(q, k, v, grad, ctx.heads), None)
        dq = PointAttentionGradQ.apply(q, k, v, grad, ctx.heads) if needs_q else None
        dk = dv = None
        if needs_k or needs_v:
            dk, dv = PointAttentionGradKV.apply(q, k, v, grad, ctx.heads)
        return dq, dk, dv, None


class PointAttentionGradQ(torch.autograd.Function):
    """``grad_q``, differentiable once more (through ``grad_q_backward``)."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> Tensor:
        return grad_q(q, k, v, g, heads)

    setup_context = staticmethod(_save_inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, g = ctx.saved_tensors
        return (*grad_q_backward(q, k, v, g, grad, ctx.heads), None)


class PointAttentionGradKV(torch.autograd.Function):
    """``grad_kv``; its own derivative (a third one of the SDF) is never needed and raises."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor]:
        return grad_kv(q, k, v, g, heads)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, dk: Tensor, dv: Tensor):
        raise RuntimeError(
            "point attention: the derivative of the keys' and values' gradient is not implemented "
            "(taken only by a third derivative of the attention)."
        )


@torch._dynamo.allow_in_graph
def point_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Softmax attention of every point (row of ``q``) to shared keys and values, differentiable twice with
    respect to ``q`` and once more with respect to everything (see the module docstring).

    Kept whole in ``torch.compile``'s graphs (``allow_in_graph``): traced into, the ``autograd.Function``'s
    backward would lose its own derivative, and the SDF gradient's derivative would silently be wrong."""
    return PointAttention.apply(q, k, v, heads)


# The same derivatives on the ops themselves: what AOTAutograd differentiates in compiled graphs.
attend.register_autograd(lambda ctx, grad: PointAttention.backward(ctx, grad), setup_context=_save_inputs)
grad_q.register_autograd(lambda ctx, grad: PointAttentionGradQ.backward(ctx, grad), setup_context=_save_inputs)
