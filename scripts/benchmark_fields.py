"""Times each part of a coco-inr training step, eager against ``--pipeline.model.compile-fields``.

The paper's field sizes (geometry 4 x 256 with coordinate attention, 289-wide colour head, background
field, 256 prototypes of 128 per head) at the point counts of one 1024-ray step. Prints a markdown table
with the device name; the medians come from CUDA events (CPU: wall clock).

    python scripts/benchmark_fields.py --device cuda
    python scripts/benchmark_fields.py --device cpu --scale 0.01 --repeats 2 --backend aot_eager   # smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cocoinr_nerfstudio.benchmarks.timing import median_ms
from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings, PrototypeBank
from cocoinr_nerfstudio.fields.background_field import CocoBackgroundField, CocoBackgroundFieldConfig
from cocoinr_nerfstudio.fields.coco_field import CocoField, CocoFieldConfig
from cocoinr_nerfstudio.models.coco_inr import PRIOR_HEADS

RENDER_POINTS = 1024 * 98  # 64 + 32 rendered samples per ray, 2 eikonal points
BACKGROUND_POINTS = 1024 * 32
SAMPLER_POINTS = 1024 * 128  # the sampler's first round
CODEBOOK_ENTRIES = 16384  # VQGAN's


def _parts(
    field: CocoField, background: CocoBackgroundField, prior: PrototypeBank, scale: float, device: str
) -> dict[str, Callable]:
    generator = torch.Generator(device).manual_seed(0)
    n_render, n_bg, n_query = (max(8, int(n * scale)) for n in (RENDER_POINTS, BACKGROUND_POINTS, SAMPLER_POINTS))
    points = torch.rand(n_render, 3, device=device, generator=generator) * 2 - 1
    directions = F.normalize(torch.randn(n_render, 3, device=device, generator=generator), dim=-1)
    bg_points = torch.cat(
        [
            F.normalize(torch.randn(n_bg, 3, device=device, generator=generator), dim=-1),
            torch.rand(n_bg, 1, device=device, generator=generator),
        ],
        -1,
    )
    bg_directions = F.normalize(torch.randn(n_bg, 3, device=device, generator=generator), dim=-1)
    queries = torch.rand(n_query, 3, device=device, generator=generator) * 2 - 1

    def eikonal(gradient: torch.Tensor) -> torch.Tensor:
        return ((gradient.norm(dim=-1) - 1.0) ** 2).mean()

    def geometry() -> None:
        sdf, feature, gradient = field.sdf_and_gradient(points, create_graph=True)
        (sdf.mean() + feature.mean() + eikonal(gradient)).backward()

    def geometry_and_colour() -> None:
        sdf, feature, gradient = field.sdf_and_gradient(points, create_graph=True)
        rgb = field.get_colors(points, directions, gradient, feature)
        (sdf.mean() + rgb.mean() + eikonal(gradient)).backward()

    def background_field() -> None:
        density, rgb = background(bg_points, bg_directions)
        (density.mean() + rgb.mean()).backward()

    def sampler_query() -> None:
        with torch.no_grad():
            field.get_sdf_values(queries)

    def prototypes() -> None:
        prior.refresh()
        sum(prior.get(head).mean() for head in PRIOR_HEADS).backward()

    return {
        f"SDF + gradient + backward with the eikonal term ({n_render})": geometry,
        f"the same + colour head ({n_render})": geometry_and_colour,
        f"background field forward + backward ({n_bg})": background_field,
        f"SDF query without autograd, the sampler's ({n_query})": sampler_query,
        f"prototypes of {len(PRIOR_HEADS)} heads forward + backward ({prior.codebook.shape[0]} codebook entries)": prototypes,
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of one 1024-ray step's points")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled fields")
    parser.add_argument("--fp32", action="store_true", help="no TF32 matmuls (the benchmark default is TF32)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.backends.cuda.matmul.allow_tf32 = not args.fp32
    torch.manual_seed(0)
    prototypes = {head: torch.randn(256, 128, device=args.device, requires_grad=True) for head in PRIOR_HEADS}
    timings: dict[str, dict[str, float]] = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        field = CocoFieldConfig().setup(prototype_source=prototypes.__getitem__).to(args.device)
        background = CocoBackgroundFieldConfig().setup(prototype_source=prototypes.__getitem__).to(args.device)
        entries = max(64, int(CODEBOOK_ENTRIES * args.scale))
        codebook = torch.randn(entries, 256, generator=torch.Generator().manual_seed(0))
        prior = PrototypeBank(codebook, PRIOR_HEADS, CodebookAttentionSettings()).to(args.device).train()
        if mode == "compiled":
            field.enable_torch_compile(args.backend)
            background.enable_torch_compile(args.backend)
            prior.enable_torch_compile(args.backend)
        for name, fn in _parts(field, background, prior, args.scale, args.device).items():
            # two untimed calls first: compilation, cuBLAS handles, the caching allocator
            timings.setdefault(name, {})[mode] = median_ms(fn, args.device, args.repeats, warmup=2)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"Device: {device_name}; TF32 {'off' if args.fp32 else 'on'}; backend {args.backend}; median of {args.repeats}",
        "",
        "| part (points) | eager ms | compiled ms | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, row in timings.items():
        lines.append(f"| {name} | {row['eager']:.2f} | {row['compiled']:.2f} | {row['eager'] / row['compiled']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
