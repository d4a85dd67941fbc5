"""Whether the error-bounded sampler's SDF queries may run in half precision (bfloat16 or float16): only while
their SDF error is small against the density's beta.

The sampler bounds the opacity error of its samples from the SDF and beta (the Laplace density's scale); an SDF
off by delta changes the density there, and the terms of the bound, by up to a factor exp(delta / beta). At the
geometric init, bf16 queries of the paper's field err by about 3e-3 at the surface in the normalised frame (99th
percentile; median 1.7e-3; docs/benchmarks.md, round eleven): a few percent of beta at the start (0.1), but more
than beta once training has sharpened the surface (VolSDF's beta falls toward 1e-3). float16 keeps 3 more mantissa
bits and errs about 10x less (3.5e-4), at the same speed on tensor cores, but overflows above 65504. So the check
compares the two where the samples gather: fixed probe points are moved onto the current surface (Newton steps
along the SDF's gradient), and the 99th percentile of |half - float32| there is taken as a share of beta.

The probe runs the field eagerly. Compiled code (what the sampler runs under ``compile-fields``) does not round
between the operations inductor fuses, so it should err no more: the check errs on the safe side (not measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

PROBE_POINTS = 4096
PROBE_SEED = 0  # the same points every check and on every rank (each rank then decides alike)
SURFACE_TOLERANCE = 1e-2  # |SDF| (normalised frame) within which a probe point counts as on the surface
MIN_SURFACE_POINTS = 64  # fewer probe points on the surface: no measurement


def probe_points(radius: float, device: torch.device | str, num: int = PROBE_POINTS) -> Tensor:
    """Fixed points, uniform in the ball of ``radius`` (where the sampler queries)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    directions = torch.nn.functional.normalize(torch.randn(num, 3, generator=generator), dim=-1)
    radii = radius * torch.rand(num, 1, generator=generator).pow(1.0 / 3.0)
    return (directions * radii).to(device)


def _float32(device: torch.device | str) -> torch.autocast:
    """No autocast, whatever the caller runs under (``--mixed-precision`` renders): the float32 reference."""
    return torch.autocast(torch.device(device).type, enabled=False)


def onto_surface(sdf_fn: Callable[[Tensor], Tensor], points: Tensor, steps: int = 3) -> Tensor:
    """``points`` moved toward the zero level set by ``steps`` Newton steps ``x - sdf(x) grad / |grad|^2`` (for a
    true distance, one step lands on the surface), in float32. Points may end anywhere (or non-finite) where the
    SDF is far from a distance: see :func:`on_surface`."""
    for _ in range(steps):
        with torch.enable_grad(), _float32(points.device):
            x = points.detach().requires_grad_(True)
            sdf = sdf_fn(x).float()
            (gradient,) = torch.autograd.grad(sdf.sum(), x)
        squared_norm = gradient.square().sum(dim=-1, keepdim=True).clamp_min(1e-12)
        points = (x - sdf.reshape(-1, 1) * gradient / squared_norm).detach()
    return points


@torch.no_grad()
def on_surface(sdf_fn: Callable[[Tensor], Tensor], points: Tensor, radius: float) -> Tensor:
    """The ``points`` that are finite, inside the ball of ``radius`` and within ``SURFACE_TOLERANCE`` of the zero
    level set (float32 SDF)."""
    finite = points.isfinite().all(dim=-1) & (points.norm(dim=-1) <= radius)
    points = points[finite]
    with _float32(points.device):
        sdf = sdf_fn(points).float().reshape(-1)
    return points[sdf.abs() <= SURFACE_TOLERANCE]


HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""The sampler's query precisions by their option name (``--pipeline.model.sampler-autocast``)."""


@torch.no_grad()
def rounding_error(
    sdf_fn: Callable[[Tensor], Tensor],
    points: Tensor,
    dtype: torch.dtype = torch.bfloat16,
    quantiles: Sequence[float] = (0.99,),
) -> tuple[float, ...]:
    """The ``quantiles`` of |SDF under ``dtype`` autocast - SDF in float32| at ``points`` (one host
    synchronisation). inf for every quantile where a query that is finite in float32 is not (float16 overflows),
    however few: such a query would corrupt the sampler wherever it falls."""
    with _float32(points.device):
        exact = sdf_fn(points).float()
    with torch.autocast(points.device.type, dtype=dtype, cache_enabled=False):
        rounded = sdf_fn(points).float()
    levels = torch.tensor(list(quantiles), device=points.device)
    errors = torch.quantile((rounded - exact).abs().flatten(), levels)
    overflowed = (exact.isfinite() & ~rounded.isfinite()).any()
    return tuple(torch.where(overflowed, math.inf, errors).tolist())


def surface_rounding_error(
    sdf_fn: Callable[[Tensor], Tensor],
    radius: float,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    quantiles: Sequence[float] = (0.99,),
) -> tuple[float, ...]:
    """``dtype``'s SDF error where the sampler's samples gather: at the probe points moved onto the surface. NaNs
    where fewer than ``MIN_SURFACE_POINTS`` reach it (no surface in the ball, or an SDF far from a distance)."""
    surface = on_surface(sdf_fn, onto_surface(sdf_fn, probe_points(radius, device)), radius)
    if len(surface) < MIN_SURFACE_POINTS:
        return tuple(math.nan for _ in quantiles)
    return rounding_error(sdf_fn, surface, dtype, quantiles)


def rounding_is_safe(error: float, beta: float, max_share: float) -> bool:
    """Half-precision queries keep the sampler's bound meaningful while their SDF error is at most ``max_share``
    of beta (an unmeasured error, NaN, is not safe; nor is an overflow, inf)."""
    return error <= max_share * beta
