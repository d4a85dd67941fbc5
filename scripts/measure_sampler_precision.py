#!/usr/bin/env python
"""How far half-precision (bfloat16, float16) SDF queries are from float32 at the surface, against the density's
beta: what ``--pipeline.model.sampler-autocast-max-error`` checks during training with
``--pipeline.model.sampler-autocast`` (on in ``coco-inr-fast``). The error bound of the sampler trusts the SDF, so
its queries stay in half precision only while this error is a small share of beta (docs/benchmarks.md, round
eleven). One row per precision.

    python scripts/measure_sampler_precision.py --device cuda           # the paper's model at its initialisation
    python scripts/measure_sampler_precision.py --load-config outputs/scan65/coco-inr/RUN/config.yml   # a trained one

``--render-betas`` also renders rays with samples placed by half-precision and by float32 queries (the field itself
in float32 both times) at each given beta, and compares the renders: what the check guards against. The rays look at
the origin from 2.5 units (the normalised frame's object sits there); the model's own beta and sampler precision are
put back afterwards.

The float32 reference computes its matrix products as the model does: in TF32 where it sets ``tf32-matmul`` (a
trained ``coco-inr-fast`` run), which rounds their operands to float16's 10 mantissa bits. ``--tf32`` adds a row
for that reference's own error, |TF32 products - IEEE float32 products| at the same points (0 where the device has
no TF32, as a CPU), and a row per half precision against IEEE products: how much of the check's error is the
reference's own, and how much a switch of the queries to float32 (TF32) gains in such a run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox

from cocoinr_nerfstudio.model_components.sampler_precision import HALF_DTYPES, first_crossings, rounding_is_safe
from cocoinr_nerfstudio.models.coco_inr import CocoInrModel, CocoInrModelConfig
from cocoinr_nerfstudio.scripts.extract_mesh import eval_setup

QUANTILES = (0.5, 0.9, 0.99)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--load-config", type=Path, default=None, help="a trained run's config.yml (ns-train's)")
    parser.add_argument(
        "--codebook-entries", type=int, default=16384, help="random codebook rows of the fresh model (VQGAN: 16384)"
    )
    parser.add_argument("--render-betas", type=float, nargs="*", default=[], help="compare renders at these betas")
    parser.add_argument("--rays", type=int, default=2048, help="rays of each render comparison")
    parser.add_argument(
        "--dtypes", nargs="+", default=list(HALF_DTYPES), choices=list(HALF_DTYPES), help="half precisions measured"
    )
    parser.add_argument(
        "--tf32", action="store_true", help="a row for TF32 products against IEEE float32 ones (see above)"
    )
    args = parser.parse_args(argv)
    if any(not beta > 0 for beta in args.render_betas) or args.rays < 1:
        parser.error(f"--render-betas must be > 0 and --rays >= 1, got {args.render_betas} and {args.rays}")
    return args


def probe_rays(num: int, device: str) -> RayBundle:
    """Rays from (0, 0, 2.5) toward the origin, spread over about 28 degrees (fixed); shaped as a num x 1 image."""
    generator = torch.Generator().manual_seed(1)
    spread = 0.5 * (torch.rand(num, 3, generator=generator) - 0.5)
    directions = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, -1.0]) + spread, dim=-1)
    return (
        RayBundle(
            origins=torch.tensor([[0.0, 0.0, 2.5]]).expand(num, 3).contiguous(),
            directions=directions,
            pixel_area=torch.ones(num, 1),
            camera_indices=torch.zeros(num, 1, dtype=torch.long),
        )
        .reshape((num, 1))
        .to(device)
    )


@contextlib.contextmanager
def beta_set_to(model: CocoInrModel, beta: float) -> Iterator[None]:
    parameter = model.density.beta_param
    kept = parameter.detach().clone()
    try:
        with torch.no_grad():
            parameter.fill_(beta - model.density.beta_min)
        yield
    finally:
        with torch.no_grad():
            parameter.copy_(kept)


@contextlib.contextmanager
def sampler_queries_in(model: CocoInrModel, dtype: torch.dtype | None) -> Iterator[None]:
    """The sampler's queries in ``dtype`` (None: float32), unchecked (the check would switch half precision off at
    a small beta); the model's own setting is put back afterwards."""
    kept = model._sampler_dtype, model._sampler_half
    try:
        model._sampler_dtype, model._sampler_half = dtype, dtype is not None
        yield
    finally:
        model._sampler_dtype, model._sampler_half = kept


@torch.no_grad()
def render_differences(model: CocoInrModel, rays: RayBundle, beta: float, dtypes: list[str]) -> list[list[str]]:
    """A table row for each of ``dtypes``: renders with samples placed by float32 against that precision's queries
    at ``beta`` (the float32 render made once)."""
    with beta_set_to(model, beta):
        with sampler_queries_in(model, None):
            exact = model.get_outputs_for_camera_ray_bundle(rays)
        rows = []
        for dtype in dtypes:
            with sampler_queries_in(model, HALF_DTYPES[dtype]):
                rows.append(_difference_row(beta, dtype, exact, model.get_outputs_for_camera_ray_bundle(rays)))
    return rows


def _difference_row(beta: float, dtype: str, exact: dict, rounded: dict) -> list[str]:
    hit = exact["accumulation"].reshape(-1) > 0.5
    depth = (exact["depth"] - rounded["depth"]).abs().reshape(-1)[hit]
    accumulation = (exact["accumulation"] - rounded["accumulation"]).abs()
    rgb = (exact["rgb"] - rounded["rgb"]).abs()
    depth_p99 = float(torch.quantile(depth, 0.99)) if len(depth) else float("nan")
    depth_median = float(depth.median()) if len(depth) else float("nan")
    return [
        f"{beta:g}",
        dtype,
        f"{int(hit.sum())} / {len(hit)}",
        f"{depth_median:.2e} / {depth_p99:.2e}",
        f"{float(accumulation.mean()):.2e} / {float(accumulation.max()):.2e}",
        f"{float(rgb.mean()):.2e} / {float(rgb.max()):.2e}",
    ]


@contextlib.contextmanager
def matmul_precision(level: str) -> Iterator[None]:
    """torch's float32 matmul precision (``highest``: IEEE products; ``high``: TF32) inside the block only."""
    kept = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(kept)


@torch.no_grad()
def tf32_error(model: CocoInrModel, quantiles: tuple[float, ...]) -> tuple[float, ...]:
    """``quantiles`` of |SDF with TF32 products - SDF with IEEE float32 products| where the probe's chords first
    cross the surface (found with IEEE products); nan where none cross."""

    def sdf(points: torch.Tensor) -> torch.Tensor:  # eager, as the check's probe
        return model.field.get_sdf_values(points, compiled=False).float()

    device = model.density.beta_param.device
    with matmul_precision("highest"):
        points = first_crossings(sdf, model.scene_radius, device)
        exact = sdf(points)
    if not len(points):
        return tuple(float("nan") for _ in quantiles)
    with matmul_precision("high"):
        rounded = sdf(points)
    levels = torch.tensor(quantiles, device=device)
    return tuple(torch.quantile((rounded - exact).abs().flatten(), levels).tolist())


def load_model(args: argparse.Namespace) -> tuple[CocoInrModel, str]:
    """The trained model of ``--load-config``, or the paper's model at its geometric initialisation."""
    if args.load_config is not None:
        if not args.load_config.is_file():
            sys.exit(f"--load-config: {args.load_config} is not a file (expected a run's config.yml)")
        _, pipeline, _, step = eval_setup(args.load_config, test_mode="inference")
        model = pipeline.model
        if not isinstance(model, CocoInrModel):
            sys.exit(f"--load-config: {args.load_config} is a {type(model).__name__} run, not coco-inr's")
        return model.to(args.device), f"{args.load_config.parent.name}, step {step}"
    torch.manual_seed(0)
    config = CocoInrModelConfig(codebook_source="random", random_codebook_shape=(args.codebook_entries, 256))
    scene_box = SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3]))
    model = config.setup(scene_box=scene_box, num_train_data=1).to(args.device)
    return model, f"initialisation, random {args.codebook_entries}x256 codebook"


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    model, name = load_model(args)
    model.train()  # as the check runs in training (the prototypes are computed, not cached)
    beta = float(model.density.get_beta().detach())
    share = model.config.sampler_autocast_max_error
    rows = []
    for dtype in args.dtypes:
        errors = model.sampler_rounding_error(QUANTILES, HALF_DTYPES[dtype])
        keeps = dtype if rounding_is_safe(errors[-1], beta, share) else "float32"
        kept_while = errors[2] / share if share > 0 else float("inf")
        rows.append(
            f"| {name} | {beta:.3g} | {dtype} | {errors[0]:.2e} | {errors[1]:.2e} | {errors[2]:.2e} | "
            f"{errors[2] / beta:.3f} | {keeps} | {kept_while:.3g} |"
        )
    if args.tf32:
        ieee_rows = [("float32, TF32", tf32_error(model, QUANTILES))]
        with matmul_precision("highest"):  # the reference in IEEE products; half precision's own are unaffected
            ieee_rows += [(dtype, model.sampler_rounding_error(QUANTILES, HALF_DTYPES[dtype])) for dtype in args.dtypes]
        rows += [
            f"| {name} | {beta:.3g} | {label} against IEEE products | {errors[0]:.2e} | {errors[1]:.2e} | "
            f"{errors[2]:.2e} | {errors[2] / beta:.3f} | - | - |"
            for label, errors in ieee_rows
        ]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    table = "\n".join(
        [
            f"Device: {device}; where 1024 chords first cross the surface; |half - float32| of the SDF (normalised "
            "frame)",
            "",
            f"| model | beta | queries | error median | 90% | 99% | 99% / beta | sampler queries (max share {share:g}) "
            "| half kept while beta >= |",
            "|---|---:|---|---:|---:|---:|---:|---|---:|",
            *rows,
        ]
    )
    if args.render_betas:
        model.eval()
        rays = probe_rays(args.rays, args.device)
        rows = [row for beta in args.render_betas for row in render_differences(model, rays, beta, args.dtypes)]
        table += "\n".join(
            [
                "",
                "",
                f"Renders of {args.rays} rays, samples placed by float32 against half-precision SDF queries (the field "
                "in float32):",
                "",
                "| beta | queries | rays hitting | depth difference median / 99% (hits) | accumulation difference mean "
                "/ max | rgb difference mean / max |",
                "|---:|---|---:|---:|---:|---:|",
                *(f"| {' | '.join(row)} |" for row in rows),
            ]
        )
    print(table)
    return table


if __name__ == "__main__":
    main()
