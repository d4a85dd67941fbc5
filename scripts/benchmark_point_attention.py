"""Time coordinate attention's passes: the explicit (block-diagonal) torch path against the point-attention kernels.

The shape is the geometry head's in training (1024 rays x 97 samples, 4 heads of 32 against 256 prototypes).
"training" is what a step does with it: the output, its gradient with respect to the queries (kept differentiable,
as the SDF's gradient is), and the backward pass of a loss on both to the queries, keys and values.

    python scripts/benchmark_point_attention.py --device cuda
"""

from __future__ import annotations

import argparse
import functools

import torch

from cocoinr_nerfstudio.benchmarks.timing import median_ms
from cocoinr_nerfstudio.field_components import point_attention as point_attention_ops
from cocoinr_nerfstudio.field_components import triton_point_attention as kernels
from cocoinr_nerfstudio.field_components.attention import attend_block_diagonal
from cocoinr_nerfstudio.field_components.point_attention import point_attention


def _with_gradient(attention):
    """Output and its gradient with respect to the queries, written as the field writes the SDF's gradient."""

    def value_and_gradient(q, k, v, heads):
        def total(q):
            out = attention(q, k, v, heads)
            return out.sum(), out

        gradient, out = torch.func.grad(total, has_aux=True)(q)
        return out, gradient

    return value_and_gradient


def _training_pass(value_and_gradient, q, k, v, heads):
    q = q.detach().requires_grad_(True)
    out, gradient = value_and_gradient(q, k, v, heads)
    loss = out.square().mean() + gradient.square().mean()
    return torch.autograd.grad(loss, (q, k, v))


def _forward(attention, q, k, v, heads):
    with torch.no_grad():
        return attention(q, k, v, heads)


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    return median_ms(fn, device.type, repeats, warmup=3)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--points", type=int, default=99328)
    parser.add_argument("--prototypes", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim-head", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--tile-sweep", action="store_true", help="also time the kernels' tile sizes and warps")
    parser.add_argument(
        "--explicit", action=argparse.BooleanOptionalAction, default=True, help="time the explicit paths as well"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    torch.manual_seed(0)
    width = args.heads * args.dim_head
    q = torch.randn(args.points, width, device=device)
    k = torch.randn(args.prototypes, width, device=device, requires_grad=True)
    v = torch.randn(args.prototypes, width, device=device, requires_grad=True)
    compile_ = functools.partial(torch.compile, backend=args.backend)
    paths = {  # forward, training pass
        "explicit (block-diagonal)": (attend_block_diagonal, _with_gradient(attend_block_diagonal)),
        "explicit, compiled": (
            compile_(attend_block_diagonal),
            compile_(_with_gradient(attend_block_diagonal)),
        ),
        "point kernels": (point_attention, _with_gradient(point_attention)),
        "point kernels, compiled": (compile_(point_attention), compile_(_with_gradient(point_attention))),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"Device: {name}; {args.points} points, {args.prototypes} keys, {args.heads} heads x {args.dim_head}; "
        f"TF32 {'on' if args.tf32 else 'off'}; backend {args.backend}; median ms of {args.repeats}",
        "",
        "| path | forward (no grad) | training pass |",
        "|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for label, (forward_fn, training_fn) in paths.items():
        if label.startswith("explicit") and not args.explicit:
            continue
        forward = _time_ms(functools.partial(_forward, forward_fn, q, k, v, args.heads), device, args.repeats)
        training = _time_ms(functools.partial(_training_pass, training_fn, q, k, v, args.heads), device, args.repeats)
        lines.append(f"| {label} | {forward:.3f} | {training:.3f} |")
        print(lines[-1], flush=True)
    if args.tile_sweep and not point_attention_ops.kernels_run(q):
        print("--tile-sweep: the point kernels do not run here (they need CUDA and Triton): no sweep", flush=True)
    elif args.tile_sweep:
        _tile_sweep(q, k, v, args, device)
    torch.set_float32_matmul_precision("highest")  # TF32 is process-wide
    return "\n".join(lines)


def _sweep_settings(settings: dict, timed: dict, args, device) -> dict[str, float] | None:
    """Milliseconds of each of ``timed`` (label: function) with the kernels' module set to ``settings``; None where
    the kernels cannot run (the ops then fall back to their torch formulas, which must not be timed as the
    kernels). The module is restored afterwards."""
    before = {name: getattr(kernels, name) for name in settings if name not in kernels.ROW_TILES}
    before_tiles = dict(kernels.ROW_TILES)
    for name, value in settings.items():
        if name in kernels.ROW_TILES:
            kernels.ROW_TILES[name] = value
        else:
            setattr(kernels, name, value)
    failure = point_attention_ops._kernel_failure
    failure.clear()
    try:
        times = {label: _time_ms(fn, device, args.repeats) for label, fn in timed.items()}
    finally:
        kernels.ROW_TILES.update(before_tiles)
        for name, value in before.items():
            setattr(kernels, name, value)
    if failure:  # a tile that does not fit the chip (shared memory, registers)
        print(f"| {settings} | {failure[0][:80]} |", flush=True)
        failure.clear()
        return None
    return times


ROW_CANDIDATES = [
    kernels.RowTile(16, 0, 4),
    kernels.RowTile(32, 32, 4),
    kernels.RowTile(64, 32, 4),
    kernels.RowTile(64, 64, 4),
    kernels.RowTile(64, 64, 8),
    kernels.RowTile(128, 32, 8),
    kernels.RowTile(128, 64, 8),
]
"""Tiles of the passes over whole rows that compile without register spills for sm_90 (ptxas), but for 64 x 64
at 4 warps in ``grad_q_backward`` (96 bytes)."""


def _tile_sweep(q, k, v, args, device) -> None:
    """Each pass over whole rows at each of ``ROW_CANDIDATES`` (the op that launches it, alone), then the training
    pass with the fastest tile of each; then the passes that sum over the points. Prints the best settings."""
    heads = args.heads
    g, f = torch.randn_like(q), torch.randn_like(q)
    kd, vd = k.detach(), v.detach()
    ops = {
        "attend": {"forward": functools.partial(point_attention_ops.attend, q, kd, vd, heads)},
        "grad_q": {
            "grad_q": functools.partial(point_attention_ops.grad_q, q, kd, vd, g, heads),
            "grad_qkv": functools.partial(point_attention_ops.grad_qkv, q, kd, vd, g, heads),
        },
        "grad_q_backward": {
            "grad_q_backward": functools.partial(point_attention_ops.grad_q_backward, q, kd, vd, g, f, heads)
        },
    }
    training = {"training pass": functools.partial(_training_pass, _with_gradient(point_attention), q, k, v, heads)}
    best = {}
    print("| pass | points | keys per step | warps | ms (each op launching it) |\n|---|---:|---:|---:|---|")
    for name, timed in ops.items():
        results = {}
        for tile in ROW_CANDIDATES:
            times = _sweep_settings({name: tile}, timed, args, device)
            if times is None:
                continue
            results[tile] = sum(times.values())
            shown = ", ".join(f"{label} {ms:.3f}" for label, ms in times.items())
            print(f"| {name} | {tile.points} | {tile.keys or 'all'} | {tile.warps} | {shown} |", flush=True)
        best[name] = min(results, key=results.get) if results else kernels.ROW_TILES[name]
    shipped = _sweep_settings({}, training, args, device)
    fastest = _sweep_settings(best, training, args, device)
    if shipped and fastest:
        print(
            f"training pass: shipped tiles {shipped['training pass']:.3f} ms, fastest tile of each pass "
            f"{fastest['training pass']:.3f} ms ({best})",
            flush=True,
        )
    print("| keys per program | rows per tile | programs | warps | training pass |")
    print("|---:|---:|---:|---:|---:|")
    reductions = {}
    for keys in (32, 64, 128):
        for tile_rows in (32, 64, 128):
            for programs in (32, 64):
                for warps in (4, 8):
                    settings = {
                        "KEYS_PER_PROGRAM": keys,
                        "REDUCTION_ROWS": tile_rows,
                        "REDUCTION_PROGRAMS": programs,
                        "REDUCTION_WARPS": warps,
                    }
                    times = _sweep_settings({**best, **settings}, training, args, device)
                    if times is not None:
                        reductions[tuple(settings.values())] = times["training pass"]
                        print(f"| {keys} | {tile_rows} | {programs} | {warps} | {times['training pass']:.3f} |")
    fastest_reduction = min(reductions, key=reductions.get) if reductions else None
    print(
        f"best: ROW_TILES {best}; KEYS_PER_PROGRAM, REDUCTION_ROWS, REDUCTION_PROGRAMS, REDUCTION_WARPS = "
        f"{fastest_reduction}",
        flush=True,
    )


if __name__ == "__main__":
    main()
