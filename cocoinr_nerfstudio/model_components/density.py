"""SDF -> volume density transforms."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn


class LaplaceDensity(nn.Module):
    """VolSDF density: ``sigma = (1/beta) * Psi_beta(-sdf)`` with Psi the Laplace(0, beta) CDF.

    ``beta = |beta_param| + beta_min`` is learned; it controls how sharp the surface is and is also
    the quantity the error-bounded sampler bisects on.
    """

    def __init__(self, beta_init: float = 0.1, beta_min: float = 1e-4) -> None:
        super().__init__()
        self.beta_param = nn.Parameter(torch.tensor(float(beta_init)))
        self.beta_min = beta_min

    def get_beta(self) -> Float[Tensor, ""]:
        return self.beta_param.abs() + self.beta_min

    def forward(self, sdf: Float[Tensor, "*batch 1"], beta: Tensor | float | None = None) -> Float[Tensor, "*batch 1"]:
        beta = self.get_beta() if beta is None else beta
        return (0.5 + 0.5 * sdf.sign() * torch.expm1(-sdf.abs() / beta)) / beta


def abs_density(raw: Tensor) -> Tensor:
    """NeRF++ background density: the magnitude of the raw network output."""
    return raw.abs()
