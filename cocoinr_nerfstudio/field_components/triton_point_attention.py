"""Triton kernels of :mod:`.point_attention`: each point's scores to every key stay on chip.

One program takes ``BLOCK_N`` points of one head, with all of that head's keys and values (256 x 32 in CoCo-INR)
in registers, and recomputes the softmax in every pass instead of reading it back. Passes that reduce over the
points (the keys' and values' gradients) loop over many tiles per program and write one partial sum per program,
summed afterwards (deterministic, unlike atomics).

Products use TF32 where torch's float32 matmul precision allows it (``torch.set_float32_matmul_precision``), as
the explicit path's matrix products do. Inputs of any float dtype are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    AVAILABLE = False

ROWS_PER_PROGRAM = 16
"""Points per program in the passes over whole rows (all keys): 16 x 256 float32 scores per live matrix."""
NUM_WARPS = 4
"""Warps per program."""
KEYS_PER_PROGRAM = 64
"""Keys per program in the passes that sum over the points (the keys' and values' cotangents)."""
REDUCTION_ROWS = 64
"""Points per tile in those passes."""
REDUCTION_PROGRAMS = 32
"""Programs along the points in those passes, per block of keys and head (each writes one partial sum)."""
REDUCTION_WARPS = 4
"""Warps per program in those passes."""


def _pow2(x: int) -> int:
    return max(16, 1 << (x - 1).bit_length())  # tl.dot needs each dimension >= 16


def _precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


if AVAILABLE:

    @triton.jit
    def _load_rows(ptr, rows, cols, row_ok, col_ok, width):
        return tl.load(
            ptr + rows[:, None] * width + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        ).to(tl.float32)

    @triton.jit
    def _store_rows(ptr, value, rows, cols, row_ok, col_ok, width):
        tl.store(
            ptr + rows[:, None] * width + cols[None, :],
            value.to(ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )

    @triton.jit
    def _softmax(q, k, key_ok, scale, PRECISION: tl.constexpr):
        """The attention weights ``p`` of a tile of points to all keys, and each point's log-sum-exp."""
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        top = tl.max(scores, axis=1)
        p = tl.exp(scores - top[:, None])
        total = tl.sum(p, axis=1)
        return p / total[:, None], top + tl.log(total)

    @triton.jit
    def _row_tile(n, m, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """What a program of a pass over whole rows covers: its head, points, all keys, and the head's columns."""
        head = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        keys = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        return head, rows, keys, head * D + dims, rows < n, keys < m, dims < D

    @triton.jit
    def _attend_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, n, m, width, scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        _, rows, keys, cols, row_ok, key_ok, dim_ok = _row_tile(n, m, D, BLOCK_N, BLOCK_M, BLOCK_D)
        q = _load_rows(q_ptr, rows, cols, row_ok, dim_ok, width)
        k = _load_rows(k_ptr, keys, cols, key_ok, dim_ok, width)
        v = _load_rows(v_ptr, keys, cols, key_ok, dim_ok, width)
        p, _ = _softmax(q, k, key_ok, scale, PRECISION)
        _store_rows(o_ptr, tl.dot(p, v, input_precision=PRECISION), rows, cols, row_ok, dim_ok, width)

    @triton.jit
    def _store_stat(ptr, value, rows, row_ok, head, heads):
        tl.store(ptr + rows * heads + head, value, mask=row_ok)

    @triton.jit
    def _load_stat(ptr, rows, row_ok, head, heads):
        return tl.load(ptr + rows * heads + head, mask=row_ok, other=0.0)[:, None]

    @triton.jit
    def _weights_and_u(
        q_ptr, k_ptr, v_ptr, g_ptr, rows, keys, cols, row_ok, key_ok, dim_ok, width, scale, PRECISION: tl.constexpr
    ):
        """A row program's start in the backward passes: its head's keys and values, the attention weights of its
        points with their log-sum-exp, and ``u = g v^T`` (``g`` the cotangent of the output)."""
        q = _load_rows(q_ptr, rows, cols, row_ok, dim_ok, width)
        g = _load_rows(g_ptr, rows, cols, row_ok, dim_ok, width)
        k = _load_rows(k_ptr, keys, cols, key_ok, dim_ok, width)
        v = _load_rows(v_ptr, keys, cols, key_ok, dim_ok, width)
        p, lse = _softmax(q, k, key_ok, scale, PRECISION)
        return k, v, p, lse, tl.dot(g, tl.trans(v), input_precision=PRECISION)

    @triton.jit
    def _grad_q_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, n, m, width, scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, WRITE_DQ: tl.constexpr, WRITE_STATS: tl.constexpr,
    ):  # fmt: skip
        """``dq`` (``WRITE_DQ``) and, per point and head, what the keys' pass needs (``WRITE_STATS``): the
        log-sum-exp of the scores and ``delta = <p, u>``, ``u = g v^T``."""
        head, rows, keys, cols, row_ok, key_ok, dim_ok = _row_tile(n, m, D, BLOCK_N, BLOCK_M, BLOCK_D)
        heads = tl.num_programs(1)
        k, _, p, lse, u = _weights_and_u(
            q_ptr, k_ptr, v_ptr, g_ptr, rows, keys, cols, row_ok, key_ok, dim_ok, width, scale, PRECISION
        )
        delta = tl.sum(p * u, axis=1)
        if WRITE_DQ:
            dq = tl.dot(p * (u - delta[:, None]), k, input_precision=PRECISION) * scale
            _store_rows(dq_ptr, dq, rows, cols, row_ok, dim_ok, width)
        if WRITE_STATS:
            _store_stat(lse_ptr, lse, rows, row_ok, head, heads)
            _store_stat(delta_ptr, delta, rows, row_ok, head, heads)

    @triton.jit
    def _grad_q_backward_rows_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, f_ptr, dq_ptr, dg_ptr, lse_ptr, delta_ptr, c_ptr, e_ptr, n, m, width, scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """``dq`` and ``dg`` of ``grad_q_backward``, and the row statistics its keys' pass needs: the scores'
        log-sum-exp, ``delta = <p, u>``, ``c = <p, dds>`` and ``e = <p, dds * u>``."""
        head, rows, keys, cols, row_ok, key_ok, dim_ok = _row_tile(n, m, D, BLOCK_N, BLOCK_M, BLOCK_D)
        heads = tl.num_programs(1)
        k, v, p, lse, u = _weights_and_u(
            q_ptr, k_ptr, v_ptr, g_ptr, rows, keys, cols, row_ok, key_ok, dim_ok, width, scale, PRECISION
        )
        f = _load_rows(f_ptr, rows, cols, row_ok, dim_ok, width)
        delta_row = tl.sum(p * u, axis=1)
        pdds = p * tl.dot(f, tl.trans(k), input_precision=PRECISION) * scale
        c_row = tl.sum(pdds, axis=1)
        e_row = tl.sum(pdds * u, axis=1)
        delta, c, e = delta_row[:, None], c_row[:, None], e_row[:, None]
        du = pdds - c * p
        dscores = pdds * (u - delta) - c * p * u - p * (e - 2.0 * c * delta)
        _store_rows(dq_ptr, tl.dot(dscores, k, input_precision=PRECISION) * scale, rows, cols, row_ok, dim_ok, width)
        _store_rows(dg_ptr, tl.dot(du, v, input_precision=PRECISION), rows, cols, row_ok, dim_ok, width)
        _store_stat(lse_ptr, lse, rows, row_ok, head, heads)
        _store_stat(delta_ptr, delta_row, rows, row_ok, head, heads)
        _store_stat(c_ptr, c_row, rows, row_ok, head, heads)
        _store_stat(e_ptr, e_row, rows, row_ok, head, heads)

    @triton.jit
    def _keys_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, f_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, c_ptr, e_ptr, n, m, width, scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, SECOND_ORDER: tl.constexpr,
    ):  # fmt: skip
        """Partial sums over the points of the keys' and values' cotangents, one block of keys per program: of
        ``grad_kv`` (``SECOND_ORDER`` False; ``f``, ``c``, ``e`` unused) or of ``grad_q_backward``. The row
        statistics come from a pass over whole rows, so each program needs only its own keys' scores. Program
        ``(b, i, h)`` writes rows ``[i * m + b * BLOCK_KEYS, ...)`` of ``dk`` and ``dv``."""
        keys = tl.program_id(0) * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
        program = tl.program_id(1)
        programs = tl.num_programs(1)
        head = tl.program_id(2)
        heads = tl.num_programs(2)
        dims = tl.arange(0, BLOCK_D)
        cols = head * D + dims
        key_ok, dim_ok = keys < m, dims < D
        k = _load_rows(k_ptr, keys, cols, key_ok, dim_ok, width)
        v = _load_rows(v_ptr, keys, cols, key_ok, dim_ok, width)
        dk = tl.zeros((BLOCK_KEYS, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_KEYS, BLOCK_D), dtype=tl.float32)
        for tile in range(program, tl.cdiv(n, BLOCK_N), programs):
            rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < n
            q = _load_rows(q_ptr, rows, cols, row_ok, dim_ok, width)
            g = _load_rows(g_ptr, rows, cols, row_ok, dim_ok, width)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.exp(scores - _load_stat(lse_ptr, rows, row_ok, head, heads))
            p = tl.where(key_ok[None, :] & row_ok[:, None], p, 0.0)
            u = tl.dot(g, tl.trans(v), input_precision=PRECISION)
            delta = _load_stat(delta_ptr, rows, row_ok, head, heads)
            ds = p * (u - delta)
            if SECOND_ORDER:
                f = _load_rows(f_ptr, rows, cols, row_ok, dim_ok, width)
                c = _load_stat(c_ptr, rows, row_ok, head, heads)
                e = _load_stat(e_ptr, rows, row_ok, head, heads)
                pdds = p * tl.dot(f, tl.trans(k), input_precision=PRECISION) * scale
                dscores = pdds * (u - delta) - c * p * u - p * (e - 2.0 * c * delta)
                dk += tl.dot(tl.trans(ds), f, input_precision=PRECISION)
                dk += tl.dot(tl.trans(dscores), q, input_precision=PRECISION)
                dv += tl.dot(tl.trans(pdds - c * p), g, input_precision=PRECISION)
            else:
                dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
                dv += tl.dot(tl.trans(p), g, input_precision=PRECISION)
        partial_rows = program * m + keys
        _store_rows(dk_ptr, dk * scale, partial_rows, cols, key_ok, dim_ok, width)
        _store_rows(dv_ptr, dv, partial_rows, cols, key_ok, dim_ok, width)


def _shapes(q: Tensor, k: Tensor, heads: int) -> dict:
    n, width = q.shape  # checked by point_attention's ops
    d = width // heads
    return dict(n=n, m=k.shape[0], width=width, scale=d**-0.5, D=d, BLOCK_M=_pow2(k.shape[0]), BLOCK_D=_pow2(d))


def _reduction_programs(n: int) -> int:
    return max(1, min(REDUCTION_PROGRAMS, triton.cdiv(n, REDUCTION_ROWS)))


def _row_grid(n: int, heads: int) -> tuple[int, int]:
    return triton.cdiv(n, ROWS_PER_PROGRAM), heads


def _launch(kernel, grid, *tensors, shapes: dict, warps: int | None = None, **constants) -> None:
    kernel[grid](*tensors, **shapes, PRECISION=_precision(), num_warps=warps or NUM_WARPS, **constants)


def _keys_pass(q, k, v, g, f, lse, delta, c, e, shapes: dict, heads: int) -> tuple[Tensor, Tensor]:
    """Sums over the points of the keys' and values' cotangents (see ``_keys_kernel``)."""
    programs = _reduction_programs(q.shape[0])
    dk = torch.empty(programs, *k.shape, device=k.device, dtype=torch.float32)
    dv = torch.empty(programs, *v.shape, device=v.device, dtype=torch.float32)
    key_shapes = {name: value for name, value in shapes.items() if name != "BLOCK_M"}
    grid = (triton.cdiv(k.shape[0], KEYS_PER_PROGRAM), programs, heads)
    _launch(
        _keys_kernel, grid, q, k, v, g, f, dk, dv, lse, delta, c, e, shapes=key_shapes,
        warps=REDUCTION_WARPS, BLOCK_N=REDUCTION_ROWS, BLOCK_KEYS=KEYS_PER_PROGRAM, SECOND_ORDER=f is not None,
    )  # fmt: skip
    return dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)


def _stats(q: Tensor, heads: int, count: int) -> list[Tensor]:
    return [torch.empty(q.shape[0], heads, device=q.device, dtype=torch.float32) for _ in range(count)]


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    if q.shape[0]:
        _launch(
            _attend_kernel,
            _row_grid(q.shape[0], heads),
            q,
            k,
            v,
            o,
            shapes=_shapes(q, k, heads),
            BLOCK_N=ROWS_PER_PROGRAM,
        )
    return o


def _grad(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int, need_q: bool, need_kv: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The cotangents of ``q`` and/or of ``k, v``: one pass over whole rows, then (``need_kv``) the keys' pass."""
    q, k, v, g = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous()
    dq = torch.empty_like(q) if need_q else None
    if not q.shape[0]:
        return dq, torch.zeros_like(k) if need_kv else None, torch.zeros_like(v) if need_kv else None
    shapes = _shapes(q, k, heads)
    lse, delta = _stats(q, heads, 2) if need_kv else (None, None)
    _launch(
        _grad_q_kernel, _row_grid(q.shape[0], heads), q, k, v, g, dq, lse, delta, shapes=shapes,
        BLOCK_N=ROWS_PER_PROGRAM, WRITE_DQ=need_q, WRITE_STATS=need_kv,
    )  # fmt: skip
    if not need_kv:
        return dq, None, None
    dk, dv = _keys_pass(q, k, v, g, None, lse, delta, None, None, shapes, heads)
    return dq, dk, dv


def grad_q(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> Tensor:
    return _grad(q, k, v, g, heads, need_q=True, need_kv=False)[0]


def grad_kv(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    _, dk, dv = _grad(q, k, v, g, heads, need_q=False, need_kv=True)
    return dk, dv


def grad_qkv(q: Tensor, k: Tensor, v: Tensor, g: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    return _grad(q, k, v, g, heads, need_q=True, need_kv=True)


def grad_q_backward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, f: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, k, v, g, f = (x.contiguous() for x in (q, k, v, g, f))
    dq, dg = torch.empty_like(q), torch.empty_like(g)
    if not q.shape[0]:
        return dq, torch.zeros_like(k), torch.zeros_like(v), dg
    shapes = _shapes(q, k, heads)
    lse, delta, c, e = _stats(q, heads, 4)
    _launch(
        _grad_q_backward_rows_kernel, _row_grid(q.shape[0], heads), q, k, v, g, f, dq, dg, lse, delta, c, e,
        shapes=shapes, BLOCK_N=ROWS_PER_PROGRAM,
    )  # fmt: skip
    dk, dv = _keys_pass(q, k, v, g, f, lse, delta, c, e, shapes, heads)
    return dq, dk, dv, dg
