"""Adam as nerfstudio configures it, with torch's fused kernel."""

from __future__ import annotations

from dataclasses import dataclass

from nerfstudio.engine.optimizers import AdamOptimizerConfig


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """``torch.optim.Adam`` with ``fused=True``: one kernel updates every tensor of a group. The for-each
    implementation launches several kernels per step and group and cost ~4 ms of GPU time per step here;
    the update is the same to float rounding."""

    fused: bool = True
    """Use the fused implementation (CUDA and CPU parameters); False: torch's default (for-each)."""
