"""The volume-rendering quadrature and stratified sampling shared by the foreground, background and sampler."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def volume_weights(
    deltas: Float[Tensor, "*batch s"], density: Float[Tensor, "*batch s"]
) -> tuple[Float[Tensor, "*batch s"], Float[Tensor, "*batch"]]:
    """Weights ``(1 - exp(-sigma_i delta_i)) T_i`` and the transmittance left after the last sample.

    The leftover transmittance is what the background receives (nerfstudio's ``get_weights`` drops it).
    """
    free_energy = deltas * density
    optical_depth = torch.cumsum(free_energy, dim=-1)
    transmittance = torch.exp(-torch.cat([torch.zeros_like(optical_depth[..., :1]), optical_depth[..., :-1]], -1))
    weights = (1.0 - torch.exp(-free_energy)) * transmittance
    return weights, torch.exp(-optical_depth[..., -1])


def jitter_within_intervals(t: Float[Tensor, "*batch s"]) -> Float[Tensor, "*batch s"]:
    """Stratified sampling: each sorted sample moves uniformly within its cell (midpoints to its neighbours)."""
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    upper = torch.cat([mids, t[..., -1:]], -1)
    lower = torch.cat([t[..., :1], mids], -1)
    return lower + (upper - lower) * torch.rand_like(t)
