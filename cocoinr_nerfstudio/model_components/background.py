"""NeRF++ inverted-sphere background: sampling beyond the bounding sphere and its quadrature."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from cocoinr_nerfstudio.model_components.volume_rendering import jitter_within_intervals, volume_weights


def inverted_sphere_samples(
    num_samples: int, num_rays: int, radius: float, stratified: bool, device: torch.device
) -> Float[Tensor, "num_rays num_samples"]:
    """Inverse radii ``1/r`` from ``1/radius`` (the sphere) down to 0 (infinity), uniformly spaced.

    Uniform in ``1/r`` spends samples where the background changes fastest on screen.
    """
    t = torch.linspace(0.0, 1.0, num_samples, device=device).expand(num_rays, num_samples)
    if stratified:
        t = jitter_within_intervals(t)
    return torch.flip(t, dims=[-1]) / radius


def inverted_sphere_points(
    origins: Float[Tensor, "n 3"], directions: Float[Tensor, "n 3"], inverse_radii: Float[Tensor, "n s"]
) -> Float[Tensor, "n s 4"]:
    """``(p/|p|, 1/|p|)`` for the point ``p`` on each ray whose radius is ``1/inverse_radius``.

    Solves ``|o + t d| = r`` for the far root, written in terms of ``1/r`` so that ``1/r = 0`` (a point
    at infinity) is exact: ``p/r -> d``. Rays must start inside the sphere.
    """
    o, d = origins[:, None, :], directions[:, None, :]
    b = (o * d).sum(-1)  # o.d
    c = (o * o).sum(-1)  # |o|^2
    inv = inverse_radii
    # t / r = -b/r + sqrt((b^2 - c)/r^2 + 1)
    t_over_r = -b * inv + torch.sqrt(((b * b - c) * inv * inv + 1.0).clamp(min=0.0))
    unit = o * inv[..., None] + t_over_r[..., None] * d
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.cat([unit, inv[..., None]], dim=-1)


def background_weights(inverse_radii: Float[Tensor, "n s"], density: Float[Tensor, "n s"]) -> Float[Tensor, "n s"]:
    """Volume-rendering weights along the inverse-radius axis; the last sample is opaque (infinity)."""
    deltas = inverse_radii[:, :-1] - inverse_radii[:, 1:]
    deltas = torch.cat([deltas, torch.full_like(deltas[:, :1], 1e10)], -1)
    return volume_weights(deltas, density)[0]
