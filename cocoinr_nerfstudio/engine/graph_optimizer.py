"""A fused Adam step recorded in the training step's CUDA graph, after the backward pass.

Outside the graph the optimizer, the batch copies and the metrics are a few hundred small launches each step
(0.64 ms of GPU time on an H200, round nineteen of docs/benchmarks.md); inside it the Adam update costs no
launches of its own. Three things make an optimizer's step replayable:

- its state (moments, step counts) exists before the capture: a state created during the capture would be
  zeroed again on every replay. :func:`initialise_state` creates it with Adam's own code.
- its learning rate is read from the GPU: the graph bakes in a Python float. :class:`LearningRateMirror` gives
  each group a device tensor that the graph reads and that takes the group's rate before every replay, so the
  schedulers, the logged rates and the checkpoints keep their floats.
- ``capturable=True`` while it is captured (torch refuses the capture otherwise); the flag is restored after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def capture_blocker(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s step cannot be recorded in a graph (None: it can)."""
    if not isinstance(optimizer, torch.optim.Adam):
        return f"{type(optimizer).__name__} is not Adam"
    if not all(group.get("fused") for group in optimizer.param_groups):
        return "its Adam is not the fused implementation (--optimizers.<group>.optimizer.fused True)"
    if any(group.get("amsgrad") or group.get("differentiable") for group in optimizer.param_groups):
        return "its Adam uses amsgrad or differentiable steps"
    return None


def initialise_state(optimizer: torch.optim.Adam) -> None:
    """Creates the missing Adam state (zero moments, step 0) of every parameter, leaving the parameters unchanged.

    Runs one step of Adam's own code with zero gradients at learning rate 0 (the update is then exactly 0), then
    zeroes what that step wrote. Parameters' gradients are left as they were."""
    missing = [p for group in optimizer.param_groups for p in group["params"] if p not in optimizer.state]
    if not missing:
        return
    saved_grads = {p: p.grad for p in missing}
    saved_rates = [group["lr"] for group in optimizer.param_groups]
    others = [p for group in optimizer.param_groups for p in group["params"] if p in optimizer.state]
    saved_other_grads = {p: p.grad for p in others}
    try:
        for p in others:  # their state must not move
            p.grad = None
        for p in missing:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
    finally:
        for group, rate in zip(optimizer.param_groups, saved_rates, strict=True):
            group["lr"] = rate
        for p, grad in (saved_grads | saved_other_grads).items():
            p.grad = grad
    with torch.no_grad():
        for p in missing:
            for value in optimizer.state[p].values():
                if isinstance(value, Tensor):
                    value.zero_()


@dataclass
class LearningRateMirror:
    """One device tensor per parameter group of ``optimizer``: what a captured step reads as the learning rate."""

    optimizer: torch.optim.Optimizer
    rates: list[Tensor]

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> LearningRateMirror:
        rates = []
        for group in optimizer.param_groups:
            device = group["params"][0].device
            rates.append(torch.tensor(float(group["lr"]), dtype=torch.float32, device=device))
        return cls(optimizer, rates)

    def update(self) -> None:
        """Copies each group's current rate (a scheduler may have changed it) to the GPU, without waiting."""
        for group, rate in zip(self.optimizer.param_groups, self.rates, strict=True):
            rate.fill_(float(group["lr"]))

    @contextlib.contextmanager
    def in_place_of_floats(self) -> Iterator[None]:
        """The groups read their rates from the mirror and are capturable for the duration (for the capture)."""
        self.update()
        saved = [(group["lr"], group.get("capturable", False)) for group in self.optimizer.param_groups]
        try:
            for group, rate in zip(self.optimizer.param_groups, self.rates, strict=True):
                group["lr"], group["capturable"] = rate, True
            yield
        finally:
            for group, (rate, capturable) in zip(self.optimizer.param_groups, saved, strict=True):
                group["lr"], group["capturable"] = rate, capturable


@dataclass
class GraphOptimizer:
    """An optimizer to step inside the graph, with the gradient clipping nerfstudio applies before its step."""

    optimizer: torch.optim.Adam
    max_norm: float | None = None
    """Clip the gradients of the optimizer's parameters to this total norm first (nerfstudio's ``max_norm``)."""

    def parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_tensors(self) -> list[Tensor]:
        """Every tensor of the optimizer's state: the graph reads and writes them where they are."""
        return [
            value for state in self.optimizer.state.values() for value in state.values() if isinstance(value, Tensor)
        ]


def step_all(optimizers: Sequence[GraphOptimizer]) -> None:
    """Clips and steps each optimizer as nerfstudio's ``optimizer_scaler_step_some`` does without a scaler."""
    for entry in optimizers:
        if entry.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(entry.parameters(), entry.max_norm)
        entry.optimizer.step()
