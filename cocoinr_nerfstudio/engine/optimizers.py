"""Adam as nerfstudio configures it, with torch's fused kernel or, on a GPU, one launch per parameter group."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig

from cocoinr_nerfstudio.engine.multi_tensor_adam import MultiTensorAdam


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """``torch.optim.Adam`` with ``fused=True``: one kernel updates every tensor of a group. The for-each
    implementation launches several kernels per step and group and cost ~4 ms of GPU time per step here;
    the update is the same to float rounding. On a GPU with Triton, each group's update is one launch over all its
    tensors instead (:mod:`~cocoinr_nerfstudio.engine.multi_tensor_adam`); its state is the fused kernel's."""

    _target: type = field(default_factory=lambda: MultiTensorAdam)
    fused: bool = True
    """Use the fused implementation (CUDA and CPU parameters); False: torch's default (for-each)."""
    multi_tensor_kernel: bool = True
    """On CUDA, update each parameter group in one Triton launch over all its tensors (torch's fused kernel packs a
    few dozen tensors into each of several launches, which left most of an H200 idle: 0.39 ms a step against 0.07,
    +1.7% a step, docs/benchmarks.md, round twenty-two). Same update and state as the fused kernel; falls back to
    it where it does not apply."""


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
