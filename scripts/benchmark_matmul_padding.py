#!/usr/bin/env python
"""Times the fields' matrix products at their own widths against the same products on zero-padded operands.

The geometry encoding (39), its concatenation with the attended features (78), the SDF+feature output (257), the
colour input (289), the background colour input (283) and the background encoding (84) are not multiples of the
tensor-core alignment (8 elements in bf16, 4 in tf32). cuBLAS then falls back to one-element-aligned kernels.
``--pipeline.model.pad-matmuls`` has inductor pad those operands with zero rows and columns inside the compiled
fields; this script shows what that buys per product, on operands padded beforehand (inductor writes the padding
in the kernel that produces the operand). The padded product equals the unpadded one up to the order of float
sums: the "max rel. diff" column checks it. Prints a markdown table.

    python scripts/benchmark_matmul_padding.py --device cuda
    python scripts/benchmark_matmul_padding.py --device cpu --rows 256 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cocoinr_nerfstudio.benchmarks.timing import median_ms

# (K, N, where) of the products a training step runs, forward; the backward runs their transposes
SHAPES: tuple[tuple[int, int, str], ...] = (
    (39, 128, "geometry: encoding -> attention query"),
    (128, 39, "geometry: attention output -> encoding width"),
    (39, 39, "geometry: feed-forward"),
    (78, 256, "geometry: first MLP layer"),
    (256, 257, "geometry: SDF + feature output"),
    (289, 128, "colour: input -> attention query"),
    (128, 289, "colour: attention output -> input width"),
    (289, 289, "colour: feed-forward"),
    (283, 283, "background colour: feed-forward"),
    (84, 84, "background: encoding feed-forward"),
)


def aligned(width: int, alignment: int) -> int:
    return -(-width // alignment) * alignment


def time_shape(args, k: int, n: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """(ms as is, ms on padded operands, max relative difference of the results)."""
    alignment = 8 if dtype == torch.bfloat16 else 4
    generator = torch.Generator(args.device).manual_seed(0)
    x = torch.randn(args.rows, k, device=args.device, dtype=dtype, generator=generator)
    w = torch.randn(n, k, device=args.device, dtype=dtype, generator=generator)
    x_padded = F.pad(x, (0, aligned(k, alignment) - k))
    w_padded = F.pad(w, (0, aligned(k, alignment) - k, 0, aligned(n, alignment) - n))
    plain = median_ms(lambda: x @ w.t(), args.device, args.repeats, warmup=args.warmup)
    padded = median_ms(lambda: x_padded @ w_padded.t(), args.device, args.repeats, warmup=args.warmup)
    reference = (x @ w.t()).float()
    difference = ((x_padded @ w_padded.t())[:, :n].float() - reference).abs().max() / reference.abs().max()
    return plain, padded, float(difference)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=100_352, help="points per product (1024 rays x 98 samples)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True  # the recipe's tf32-matmul
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"Device: {device_name}; {args.rows} rows; median of {args.repeats}"
        + ("; fp32 products in TF32" if args.device == "cuda" else ""),
        "",
        "| product | K x N | dtype | ms as is | ms padded | speed-up | max rel. diff |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for k, n, where in SHAPES:
            plain, padded, difference = time_shape(args, k, n, dtype)
            lines.append(
                f"| {where} | {k} x {n} | {str(dtype).removeprefix('torch.')} | {plain:.4f} | {padded:.4f} "
                f"| {plain / padded:.2f}x | {difference:.1e} |"
            )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
