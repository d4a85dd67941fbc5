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
        forward = _time_ms(functools.partial(_forward, forward_fn, q, k, v, args.heads), device, args.repeats)
        training = _time_ms(functools.partial(_training_pass, training_fn, q, k, v, args.heads), device, args.repeats)
        lines.append(f"| {label} | {forward:.3f} | {training:.3f} |")
        print(lines[-1], flush=True)
    if args.tile_sweep:
        _tile_sweep(q, k, v, args, device)
    torch.set_float32_matmul_precision("highest")  # TF32 is process-wide
    return "\n".join(lines)


def _sweep_row(settings: dict, q, k, v, args, device) -> tuple[float, float] | None:
    """Times the kernels at ``settings``; None where they cannot run (the ops then fall back to their torch
    formulas, which must not be timed as the kernels)."""
    for name, value in settings.items():
        setattr(kernels, name, value)
    failure = point_attention_ops._kernel_failure
    failure.clear()
    forward = _time_ms(functools.partial(_forward, point_attention, q, k, v, args.heads), device, args.repeats)
    training_fn = _with_gradient(point_attention)
    training = _time_ms(functools.partial(_training_pass, training_fn, q, k, v, args.heads), device, args.repeats)
    values = " | ".join(str(x) for x in settings.values())
    if failure:  # a tile that does not fit the chip (shared memory, registers)
        print(f"| {values} | {failure[0][:60]} | |", flush=True)
        failure.clear()
        return None
    print(f"| {values} | {forward:.3f} | {training:.3f} |", flush=True)
    return forward, training


def _tile_sweep(q, k, v, args, device) -> None:
    """Tile sizes and warps: the passes over whole rows first, then (with the best of those) the passes that sum
    over the points. Prints the best setting of each."""
    defaults = {name: getattr(kernels, name) for name in SWEPT}
    print("| rows per program | warps | forward | training pass |\n|---:|---:|---:|---:|")
    rows = {}
    for rows_per_program in (16, 32):
        for warps in (4, 8):
            timed = _sweep_row({"ROWS_PER_PROGRAM": rows_per_program, "NUM_WARPS": warps}, q, k, v, args, device)
            if timed is not None:
                rows[(rows_per_program, warps)] = timed[1]
    best_rows = min(rows, key=rows.get) if rows else (defaults["ROWS_PER_PROGRAM"], defaults["NUM_WARPS"])
    kernels.ROWS_PER_PROGRAM, kernels.NUM_WARPS = best_rows
    print("| keys per program | rows per tile | programs | warps | forward | training pass |")
    print("|---:|---:|---:|---:|---:|---:|")
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
                    timed = _sweep_row(settings, q, k, v, args, device)
                    if timed is not None:
                        reductions[tuple(settings.values())] = timed[1]
    best = min(reductions, key=reductions.get) if reductions else None
    print(
        f"best: ROWS_PER_PROGRAM, NUM_WARPS = {best_rows}; KEYS_PER_PROGRAM, REDUCTION_ROWS, REDUCTION_PROGRAMS, "
        f"REDUCTION_WARPS = {best}"
    )
    for name, value in defaults.items():
        setattr(kernels, name, value)


SWEPT = ("ROWS_PER_PROGRAM", "NUM_WARPS", "KEYS_PER_PROGRAM", "REDUCTION_ROWS", "REDUCTION_PROGRAMS", "REDUCTION_WARPS")


if __name__ == "__main__":
    main()
