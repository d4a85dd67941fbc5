"""Adam as nerfstudio configures it, with torch's fused kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """``torch.optim.Adam`` with ``fused=True``: one kernel updates every tensor of a group. The for-each
    implementation launches several kernels per step and group and cost ~4 ms of GPU time per step here;
    the update is the same to float rounding."""

    fused: bool = True
    """Use the fused implementation (CUDA and CPU parameters); False: torch's default (for-each)."""


def set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Switches a loaded Adam to (or from) the fused implementation: ``load_state_dict`` restores the flag the
    checkpoint was saved with. The fused kernel keeps each step count as a float32 tensor on the parameter's
    device, the for-each one on the CPU."""
    for group in optimizer.param_groups:
        if "fused" not in group or bool(group["fused"]) == fused:
            continue
        group["fused"] = fused
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                device = param.device if fused else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
