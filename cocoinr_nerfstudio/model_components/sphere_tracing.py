"""Sphere tracing to the SDF's zero level set: a fast surface render for interactive previews."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor


@torch.no_grad()
def sphere_trace(
    sdf_fn: Callable[[Tensor], Tensor],
    origins: Float[Tensor, "n 3"],
    directions: Float[Tensor, "n 3"],
    nears: Float[Tensor, "n 1"],
    fars: Float[Tensor, "n 1"],
    num_steps: int = 64,
    step_scale: float = 0.9,
    tolerance: float = 1e-3,
    bisection_steps: int = 16,
) -> tuple[Float[Tensor, "n 1"], Bool[Tensor, " n"]]:
    """Distance to the first zero crossing along each ray, and whether it was found.

    Steps by the SDF value (scaled below 1: a learned SDF is not an exact distance) from ``nears``;
    a ray that jumps past a sign change is bisected back onto the surface, so thin walls are not
    skipped silently; rays leaving ``fars`` miss.
    """
    t = nears.clone()
    previous_t, previous_sdf = t.clone(), sdf_fn(origins + t * directions).reshape(-1, 1)
    sdf = previous_sdf
    for _ in range(num_steps):
        active = (sdf.abs() > tolerance) & (sdf > 0) & (t < fars)
        previous_t, previous_sdf = torch.where(active, t, previous_t), torch.where(active, sdf, previous_sdf)
        t = torch.where(active, t + step_scale * sdf, t)
        sdf = sdf_fn(origins + t * directions).reshape(-1, 1)
    crossed = (sdf < 0) & (previous_sdf > 0)
    rays = crossed[:, 0].nonzero()[:, 0]
    if rays.numel() > 0:  # refine overshoots by bisection between the last positive and the negative sample
        low, high = previous_t[rays], t[rays]
        for _ in range(bisection_steps):
            middle = 0.5 * (low + high)
            positive = sdf_fn(origins[rays] + middle * directions[rays]).reshape(-1, 1) > 0
            low, high = torch.where(positive, middle, low), torch.where(positive, high, middle)
        t = t.index_put((rays,), 0.5 * (low + high))
    hit = ((sdf.abs() <= tolerance) | crossed) & (t < fars) & (t >= nears)
    return t, hit[:, 0]
