"""Triton kernels of :mod:`.point_attention`: each point's scores to every key stay on chip.

A program of a pass over whole rows takes a tile of points of one head and recomputes their softmax instead of
reading it back. It holds the scores to all of the head's keys (256 x 32 in CoCo-INR) at once, or (a key block
size in ``ROW_TILES``) loops over blocks of keys as flash attention does: an online softmax first, then, in the
backward passes, a second loop with the row statistics it found. Larger point tiles load each key fewer times.
Passes that reduce over the points (the keys' and values' gradients) loop over many tiles per program and write
one partial sum per program, summed afterwards (deterministic, unlike atomics).

Products use TF32 where torch's float32 matmul precision allows it (``torch.set_float32_matmul_precision``), as
the explicit path's matrix products do. Inputs of any float dtype are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    AVAILABLE = False


@dataclass(frozen=True)
class RowTile:
    """How a pass over whole rows divides its work."""

    points: int
    """Points per program (a power of two, >= 16)."""
    keys: int
    """Keys per step of the program's loop over them (a power of two, >= 16); 0, or at least the key count: all
    keys in one step, which needs no second loop but holds ``points x keys`` float32 scores per live matrix."""
    warps: int
    """Warps per program."""


ROW_TILES = {
    "attend": RowTile(points=128, keys=32, warps=8),
    "grad_q": RowTile(points=64, keys=32, warps=4),
    "grad_q_backward": RowTile(points=64, keys=64, warps=4),
}
"""The tile of each pass over whole rows: the forward, the gradient with respect to the queries (and the row
statistics of the keys' pass), and the rows of the gradient's backward. The fastest of a sweep on an H200
(``scripts/benchmark_point_attention.py --tile-sweep``, docs/benchmarks.md, round fifteen): against 16 points with
all keys at once, the forward took 0.20 ms instead of 0.49 at 99,328 points; the backward passes, which loop over
the keys twice, gained 11-12%. A training step measured no faster; renders a few percent."""
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
    def _row_tile(n, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """What a program of a pass over whole rows covers: its head, its points, and the head's columns."""
        head = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        return head, rows, head * D + dims, rows < n, dims < D

    @triton.jit
    def _key_block(k_ptr, v_ptr, block, cols, dim_ok, m, width, BLOCK_KEYS: tl.constexpr):
        """Block ``block`` of the head's keys and values, and which of its keys exist."""
        keys = block * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
        key_ok = keys < m
        k = _load_rows(k_ptr, keys, cols, key_ok, dim_ok, width)
        return k, _load_rows(v_ptr, keys, cols, key_ok, dim_ok, width), key_ok

    @triton.jit
    def _weights(q, k, key_ok, lse, scale, PRECISION: tl.constexpr):
        """The attention weights of a block of keys, from the points' log-sum-exp over all keys."""
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        return tl.where(key_ok[None, :], tl.exp(scores - lse[:, None]), 0.0)

    @triton.jit
    def _block_weights_and_u(
        q, g, lse, k_ptr, v_ptr, block, cols, dim_ok, m, width, scale, BLOCK_KEYS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """A block of keys in a backward pass: its keys, values, attention weights (from the points' log-sum-exp;
        ``lse`` None: all keys are in this block, and the softmax gives it) and ``u = g v^T``."""
        k, v, key_ok = _key_block(k_ptr, v_ptr, block, cols, dim_ok, m, width, BLOCK_KEYS)
        if lse is None:
            p, lse = _softmax(q, k, key_ok, scale, PRECISION)
        else:
            p = _weights(q, k, key_ok, lse, scale, PRECISION)
        return k, v, p, lse, tl.dot(g, tl.trans(v), input_precision=PRECISION)

    @triton.jit
    def _online_softmax(
        q, g, f, k_ptr, v_ptr, cols, dim_ok, m, width, scale,
        BLOCK_N: tl.constexpr, BLOCK_KEYS: tl.constexpr, KEY_BLOCKS: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, SECOND_ORDER: tl.constexpr,
    ):  # fmt: skip
        """One loop over the key blocks, rescaling the sums as the running maximum of the scores grows: each
        point's log-sum-exp and output ``o = p v``; with ``SECOND_ORDER`` also ``pk = p k`` and
        ``e = <p, dds * u>`` (``dds = f k^T * scale``, ``u = g v^T``), which are linear in ``p`` as well."""
        top = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_N,), tl.float32)
        o = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        pk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        e = tl.zeros((BLOCK_N,), tl.float32)
        for block in range(KEY_BLOCKS):
            k, v, key_ok = _key_block(k_ptr, v_ptr, block, cols, dim_ok, m, width, BLOCK_KEYS)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            rescale = tl.exp(top - new_top)  # 0 at the first block: every block has a key (m >= 1)
            p = tl.exp(scores - new_top[:, None])
            total = total * rescale + tl.sum(p, axis=1)
            o = o * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
            if SECOND_ORDER:
                dds = tl.dot(f, tl.trans(k), input_precision=PRECISION) * scale
                u = tl.dot(g, tl.trans(v), input_precision=PRECISION)
                pk = pk * rescale[:, None] + tl.dot(p, k, input_precision=PRECISION)
                e = e * rescale + tl.sum(p * dds * u, axis=1)
            top = new_top
        return top + tl.log(total), o / total[:, None], pk / total[:, None], e / total

    @triton.jit
    def _attend_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, n, m, width, scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KEYS: tl.constexpr, KEY_BLOCKS: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        _, rows, cols, row_ok, dim_ok = _row_tile(n, D, BLOCK_N, BLOCK_D)
        q = _load_rows(q_ptr, rows, cols, row_ok, dim_ok, width)
        if KEY_BLOCKS == 1:
            k, v, key_ok = _key_block(k_ptr, v_ptr, 0, cols, dim_ok, m, width, BLOCK_KEYS)
            p, _ = _softmax(q, k, key_ok, scale, PRECISION)
            o = tl.dot(p, v, input_precision=PRECISION)
        else:
            _, o, _, _ = _online_softmax(
                q, q, q, k_ptr, v_ptr, cols, dim_ok, m, width, scale,
                BLOCK_N, BLOCK_KEYS, KEY_BLOCKS, BLOCK_D, PRECISION, False,
            )  # fmt: skip
        _store_rows(o_ptr, o, rows, cols, row_ok, dim_ok, width)

    @triton.jit
    def _store_stat(ptr, value, rows, row_ok, head, heads):
        tl.store(ptr + rows * heads + head, value, mask=row_ok)

    @triton.jit
    def _load_stat(ptr, rows, row_ok, head, heads):
        return tl.load(ptr + rows * heads + head, mask=row_ok, other=0.0)[:, None]

    @triton.jit
    def _grad_q_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, n, m, width, scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KEYS: tl.constexpr, KEY_BLOCKS: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, WRITE_DQ: tl.constexpr, WRITE_STATS: tl.constexpr,
    ):  # fmt: skip
        """``dq`` (``WRITE_DQ``) and, per point and head, what the keys' pass needs (``WRITE_STATS``): the
        log-sum-exp of the scores and ``delta = <p, u>``, ``u = g v^T`` (over blocks of keys: ``delta = <g, o>``,
        the same sum)."""
        head, rows, cols, row_ok, dim_ok = _row_tile(n, D, BLOCK_N, BLOCK_D)
        heads = tl.num_programs(1)
        q = _load_rows(q_ptr, rows, cols, row_ok, dim_ok, width)
        g = _load_rows(g_ptr, rows, cols, row_ok, dim_ok, width)
        if KEY_BLOCKS == 1:
            k, _, p, lse, u = _block_weights_and_u(
                q, g, None, k_ptr, v_ptr, 0, cols, dim_ok, m, width, scale, BLOCK_KEYS, PRECISION
            )
            delta = tl.sum(p * u, axis=1)
            if WRITE_DQ:
                dq = tl.dot(p * (u - delta[:, None]), k, input_precision=PRECISION)
        else:
            lse, o, _, _ = _online_softmax(
                q, g, g, k_ptr, v_ptr, cols, dim_ok, m, width, scale,
                BLOCK_N, BLOCK_KEYS, KEY_BLOCKS, BLOCK_D, PRECISION, False,
            )  # fmt: skip
            delta = tl.sum(g * o, axis=1)
            if WRITE_DQ:
                dq = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
                for block in range(KEY_BLOCKS):
                    k, _, p, _, u = _block_weights_and_u(
                        q, g, lse, k_ptr, v_ptr, block, cols, dim_ok, m, width, scale, BLOCK_KEYS, PRECISION
                    )
                    dq += tl.dot(p * (u - delta[:, None]), k, input_precision=PRECISION)
        if WRITE_DQ:
            _store_rows(dq_ptr, dq * scale, rows, cols, row_ok, dim_ok, width)
        if WRITE_STATS:
            _store_stat(lse_ptr, lse, rows, row_ok, head, heads)
            _store_stat(delta_ptr, delta, rows, row_ok, head, heads)

    @triton.jit
    def _second_order_products(p, u, pdds, delta, c, e, k, v, PRECISION: tl.constexpr):
        """A block of keys' share of ``grad_q_backward``'s ``dq / scale`` and ``dg`` (``delta``, ``c``, ``e``:
        ``[points, 1]`` sums over all keys)."""
        dscores = pdds * (u - delta) - c * p * u - p * (e - 2.0 * c * delta)
        dq = tl.dot(dscores, k, input_precision=PRECISION)
        return dq, tl.dot(pdds - c * p, v, input_precision=PRECISION)

    @triton.jit
    def _grad_q_backward_rows_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, f_ptr, dq_ptr, dg_ptr, lse_ptr, delta_ptr, c_ptr, e_ptr, n, m, width, scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KEYS: tl.constexpr, KEY_BLOCKS: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """``dq`` and ``dg`` of ``grad_q_backward``, and the row statistics its keys' pass needs: the scores'
        log-sum-exp, ``delta = <p, u>``, ``c = <p, dds>`` and ``e = <p, dds * u>`` (over blocks of keys:
        ``delta = <g, o>`` and ``c = <f, p k> * scale``, the same sums)."""
        head, rows, cols, row_ok, dim_ok = _row_tile(n, D, BLOCK_N, BLOCK_D)
        heads = tl.num_programs(1)
        q = _load_rows(q_ptr, rows, cols, row_ok, dim_ok, width)
        g = _load_rows(g_ptr, rows, cols, row_ok, dim_ok, width)
        f = _load_rows(f_ptr, rows, cols, row_ok, dim_ok, width)
        if KEY_BLOCKS == 1:
            k, v, p, lse, u = _block_weights_and_u(
                q, g, None, k_ptr, v_ptr, 0, cols, dim_ok, m, width, scale, BLOCK_KEYS, PRECISION
            )
            pdds = p * tl.dot(f, tl.trans(k), input_precision=PRECISION) * scale
            delta_row = tl.sum(p * u, axis=1)
            c_row = tl.sum(pdds, axis=1)
            e_row = tl.sum(pdds * u, axis=1)
            dq, dg = _second_order_products(
                p, u, pdds, delta_row[:, None], c_row[:, None], e_row[:, None], k, v, PRECISION
            )
        else:
            lse, o, pk, e_row = _online_softmax(
                q, g, f, k_ptr, v_ptr, cols, dim_ok, m, width, scale,
                BLOCK_N, BLOCK_KEYS, KEY_BLOCKS, BLOCK_D, PRECISION, True,
            )  # fmt: skip
            delta_row = tl.sum(g * o, axis=1)
            c_row = tl.sum(f * pk, axis=1) * scale
            dq = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            dg = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            for block in range(KEY_BLOCKS):
                k, v, p, _, u = _block_weights_and_u(
                    q, g, lse, k_ptr, v_ptr, block, cols, dim_ok, m, width, scale, BLOCK_KEYS, PRECISION
                )
                pdds = p * tl.dot(f, tl.trans(k), input_precision=PRECISION) * scale
                dq_block, dg_block = _second_order_products(
                    p, u, pdds, delta_row[:, None], c_row[:, None], e_row[:, None], k, v, PRECISION
                )
                dq += dq_block
                dg += dg_block
        _store_rows(dq_ptr, dq * scale, rows, cols, row_ok, dim_ok, width)
        _store_rows(dg_ptr, dg, rows, cols, row_ok, dim_ok, width)
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
    return dict(n=n, m=k.shape[0], width=width, scale=d**-0.5, D=d, BLOCK_D=_pow2(d))


def _reduction_programs(n: int) -> int:
    return max(1, min(REDUCTION_PROGRAMS, triton.cdiv(n, REDUCTION_ROWS)))


def _launch(kernel, grid, *tensors, shapes: dict, warps: int, **constants) -> None:
    kernel[grid](*tensors, **shapes, PRECISION=_precision(), num_warps=warps, **constants)


def _row_launch(pass_name: str, kernel, *tensors, shapes: dict, heads: int, **constants) -> None:
    """Launches a pass over whole rows with its tile in ``ROW_TILES``."""
    tile = ROW_TILES[pass_name]
    all_keys = _pow2(shapes["m"])
    block_keys = all_keys if tile.keys <= 0 else min(_pow2(tile.keys), all_keys)
    grid = (triton.cdiv(shapes["n"], _pow2(tile.points)), heads)
    _launch(
        kernel, grid, *tensors, shapes=shapes, warps=tile.warps, BLOCK_N=_pow2(tile.points), BLOCK_KEYS=block_keys,
        KEY_BLOCKS=triton.cdiv(shapes["m"], block_keys), **constants,
    )  # fmt: skip


def _keys_pass(q, k, v, g, f, lse, delta, c, e, shapes: dict, heads: int) -> tuple[Tensor, Tensor]:
    """Sums over the points of the keys' and values' cotangents (see ``_keys_kernel``)."""
    programs = _reduction_programs(q.shape[0])
    dk = torch.empty(programs, *k.shape, device=k.device, dtype=torch.float32)
    dv = torch.empty(programs, *v.shape, device=v.device, dtype=torch.float32)
    grid = (triton.cdiv(k.shape[0], KEYS_PER_PROGRAM), programs, heads)
    _launch(
        _keys_kernel, grid, q, k, v, g, f, dk, dv, lse, delta, c, e, shapes=shapes,
        warps=REDUCTION_WARPS, BLOCK_N=REDUCTION_ROWS, BLOCK_KEYS=KEYS_PER_PROGRAM, SECOND_ORDER=f is not None,
    )  # fmt: skip
    return dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)


def _stats(q: Tensor, heads: int, count: int) -> list[Tensor]:
    return [torch.empty(q.shape[0], heads, device=q.device, dtype=torch.float32) for _ in range(count)]


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    if q.shape[0]:
        _row_launch("attend", _attend_kernel, q, k, v, o, shapes=_shapes(q, k, heads), heads=heads)
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
    _row_launch(
        "grad_q", _grad_q_kernel, q, k, v, g, dq, lse, delta, shapes=shapes, heads=heads,
        WRITE_DQ=need_q, WRITE_STATS=need_kv,
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
    _row_launch(
        "grad_q_backward", _grad_q_backward_rows_kernel, q, k, v, g, f, dq, dg, lse, delta, c, e,
        shapes=shapes, heads=heads,
    )  # fmt: skip
    dk, dv = _keys_pass(q, k, v, g, f, lse, delta, c, e, shapes, heads)
    return dq, dk, dv, dg
