"""Positional encoding in the IDR/VolSDF convention."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn


class IDRFrequencyEncoding(nn.Module):
    """``[x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)]``.

    nerfstudio's ``NeRFEncoding`` multiplies inputs by 2*pi and groups sines before cosines. The
    geometric initialisation relies on the *raw* input occupying the first ``in_dim`` columns and
    the original's spectrum has no 2*pi factor, so the paper's MLP widths and init assume this layout.
    """

    def __init__(self, in_dim: int, num_frequencies: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_frequencies = num_frequencies
        self.register_buffer("freqs", 2.0 ** torch.arange(num_frequencies, dtype=torch.float32), persistent=False)

    def get_out_dim(self) -> int:
        return self.in_dim * (1 + 2 * self.num_frequencies)

    def forward(self, x: Float[Tensor, "*batch in_dim"]) -> Float[Tensor, "*batch out_dim"]:
        if self.num_frequencies == 0:
            return x
        scaled = x[..., None, :] * self.freqs[:, None]  # [..., L, in_dim]
        # interleave per frequency: sin(f0 x), cos(f0 x), sin(f1 x), ...
        periodic = torch.stack([torch.sin(scaled), torch.cos(scaled)], dim=-2)  # [..., L, 2, in_dim]
        return torch.cat([x, periodic.flatten(-3)], dim=-1)
