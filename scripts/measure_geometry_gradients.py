#!/usr/bin/env python
"""How close the geometry head's gradients are to float32's when it trains in half precision
(``--pipeline.model.geometry-autocast``, float16 in ``coco-inr-fast``), per loss scale
(``--pipeline.model.geometry-gradient-scale``): what underflows without a scale, and where a scale would overflow.

One training step of the paper's model at its initialisation, on the same rays and target, at each beta: the relative
error of every geometry parameter's gradient against the float32 model's (parameters whose float32 gradient is zero,
such as the geometric initialisation's zeroed columns, are left out), and the gradient entries that overflowed and
were dropped (``field_components/gradient_scale.py``). One row per (beta, precision, scale).

    python scripts/measure_geometry_gradients.py --device cuda
    python scripts/measure_geometry_gradients.py --device cpu --codebook-entries 1024 --rays 512   # round twenty-one
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from nerfstudio.data.scene_box import SceneBox

from cocoinr_nerfstudio.model_components.sampler_precision import HALF_DTYPES
from cocoinr_nerfstudio.models.coco_inr import CocoInrModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_sampler_precision import probe_rays  # a sibling script, not a package


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--codebook-entries", type=int, default=16384, help="random codebook rows of the model (VQGAN: 16384)"
    )
    parser.add_argument("--rays", type=int, default=1024, help="rays of the step (per-ray gradients scale as 1/rays)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.005], help="the density's beta, a row each")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float16"], choices=list(HALF_DTYPES), help="half precisions measured"
    )
    parser.add_argument(
        "--log2-scales", type=int, nargs="+", default=[0, 10, 13, 16], help="loss scales measured, as powers of two"
    )
    args = parser.parse_args(argv)
    if args.rays < 1 or args.codebook_entries < 1 or any(not beta > 0 for beta in args.betas):
        parser.error(
            f"--rays and --codebook-entries must be >= 1 and --betas > 0, got {args.rays}, {args.codebook_entries} "
            f"and {args.betas}"
        )
    return args


def geometry_gradients(args: argparse.Namespace, beta: float, dtype: str, log2_scale: int) -> tuple[dict, int]:
    """The geometry head's parameter gradients after one step (same model, rays, target and samples every call),
    and the entries that overflowed."""
    torch.manual_seed(0)
    config = CocoInrModelConfig(
        codebook_source="random",
        random_codebook_shape=(args.codebook_entries, 256),
        beta_init=beta,
        geometry_autocast=dtype,
        geometry_gradient_scale=2.0**log2_scale,
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=1)
    model = model.to(args.device).train()
    target = torch.rand(args.rays, 3, generator=torch.Generator().manual_seed(2)).to(args.device)
    torch.manual_seed(1)  # stratified samples and eikonal points
    outputs = model(probe_rays(args.rays, args.device).flatten())
    sum(model.get_loss_dict(outputs, {"image": target}).values()).backward()
    field = model.field
    grads = {name: p.grad.detach().clone() for name, p in field.named_parameters() if p.grad is not None}
    geometry = {name: grad for name, grad in grads.items() if not name.startswith(("color_", "direction_"))}
    overflows = field.gradient_scale.take_overflows() if field.gradient_scale is not None else 0
    return geometry, overflows


def relative_errors(grads: dict, reference: dict) -> list[float]:
    errors = []
    for name, exact in reference.items():
        norm = float(exact.norm())
        if norm > 0:
            errors.append(float((grads[name] - exact).norm()) / norm)
    return errors


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    rows = []
    for beta in args.betas:
        reference, _ = geometry_gradients(args, beta, "none", 0)
        for dtype in args.dtypes:
            for log2_scale in args.log2_scales:
                grads, overflows = geometry_gradients(args, beta, dtype, log2_scale)
                errors = sorted(relative_errors(grads, reference))
                finite = all(bool(torch.isfinite(grad).all()) for grad in grads.values())
                rows.append(
                    f"| {beta:g} | {dtype} | 2^{log2_scale} | {statistics.median(errors):.2e} | "
                    f"{errors[int(0.9 * (len(errors) - 1))]:.2e} | {errors[-1]:.2e} | {overflows} | "
                    f"{'yes' if finite else 'no'} |"
                )
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    table = "\n".join(
        [
            f"Device: {device}; the paper's model at its initialisation (random {args.codebook_entries}x256 codebook), "
            f"one step of {args.rays} rays; relative error of each geometry parameter's gradient against float32",
            "",
            "| beta | geometry head | loss scale | error median | 90% | max | overflowed entries (dropped) | finite |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
            *rows,
        ]
    )
    print(table)
    return table


if __name__ == "__main__":
    main()
