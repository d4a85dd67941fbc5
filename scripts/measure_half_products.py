#!/usr/bin/env python
"""How a half-precision ``F.linear`` rounds when its bias cancels its terms, by output width: the case of the SDF
column near the surface, where terms summing to about 14 meet a bias of about -14.

For each precision and shape the layer's inputs (about 0.5) and weights (about 0.11) are drawn, and each column's bias
cancels the mean of its terms to 1e-3. The result under autocast is compared with the exact (float64) sum of the same
rounded operands, as the error beyond rounding that exact sum to the output's precision; the same product without
the bias is compared with its own exact sum. A product that sums in float32 and adds the bias before rounding errs
by well under that rounding in both; one that rounds the terms' sum before adding the bias errs, with the bias, by
about half a unit in the last place of the terms' sum (column "half ulp of the sum"). docs/benchmarks.md, round
twenty-five, has an H200's table.

    python scripts/measure_half_products.py --device cuda
    python scripts/measure_half_products.py --device cuda --no-reduced-precision-reduction
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
SHAPES = ((256, 1), (512, 1), (256, 3), (512, 3), (259, 8), (259, 32), (512, 257))
"""(inputs, output columns): the SDF column alone (256 wide in the paper's model), colour-head widths, hidden layers."""


@dataclass(frozen=True)
class ProductErrors:
    without_bias: float
    """Largest error of the product without its bias, beyond rounding its exact sum to the output's precision."""
    with_bias: float
    """The same for the product with its cancelling bias."""
    half_ulp_of_sum: float
    """Half a unit in the last place of the largest terms' sum: the error of rounding it before the bias."""


def cancelling_layer(rows: int, inputs: int, columns: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Inputs, weights and a bias that cancels each column's mean sum of terms to 1e-3, in ``dtype``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = (0.5 + 0.05 * torch.randn(rows, inputs, device=device, generator=generator)).to(dtype)
    weight = (0.11 + 0.01 * torch.randn(columns, inputs, device=device, generator=generator)).to(dtype)
    terms = x.double() @ weight.double().T
    bias = (1e-3 - terms.mean(0)).to(dtype)
    return x, weight, bias, terms


def beyond_rounding(result: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest |result - exact| beyond |exact rounded to result's dtype - exact|, element by element."""
    rounding = (exact.to(result.dtype).double() - exact).abs()
    return float(((result.double() - exact).abs() - rounding).max())


def measure(rows: int, inputs: int, columns: int, dtype: torch.dtype, device: str) -> ProductErrors:
    x, weight, bias, terms = cancelling_layer(rows, inputs, columns, dtype, device)
    with torch.autocast(device, dtype=dtype):
        product = F.linear(x, weight)
        layer = F.linear(x, weight, bias)
    largest = terms.abs().max()
    half_ulp = float(torch.exp2(torch.floor(torch.log2(largest)) - MANTISSA_BITS[dtype]) / 2)
    return ProductErrors(beyond_rounding(product, terms), beyond_rounding(layer, terms + bias.double()), half_ulp)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 65536], help="batch sizes (rows) measured")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--no-reduced-precision-reduction",
        action="store_true",
        help="turn off torch's allow_{fp16,bf16}_reduced_precision_reduction (cuBLAS's split-K sums in half)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if min(args.rows) < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    matmul = torch.backends.cuda.matmul
    before = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    if args.no_reduced_precision_reduction:
        matmul.allow_fp16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction = False
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [
        f"{name}, torch {torch.__version__}, reduced-precision reductions "
        f"{'off' if args.no_reduced_precision_reduction else 'as torch sets them'}",
        "",
        "| dtype | inputs | columns | rows | without bias: error beyond rounding | with bias: error beyond rounding "
        "| half ulp of the sum |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    try:
        for dtype_name in args.dtypes:
            for inputs, columns in SHAPES:
                for rows in args.rows:
                    errors = measure(rows, inputs, columns, DTYPES[dtype_name], args.device)
                    lines.append(
                        f"| {dtype_name} | {inputs} | {columns} | {rows} | {errors.without_bias:.2e} "
                        f"| {errors.with_bias:.2e} | {errors.half_ulp_of_sum:.2e} |"
                    )
                    print(lines[-1], flush=True)
    finally:
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = before
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
