"""How many rays the fixed-shape sampler refines past its first round: sized from what training needs.

A CUDA graph needs a fixed count of rays in the sampler's rounds 2.. (``static_refine_budget``). The share of
rays that need those rounds depends on the scene (how much of each image the object covers) and on the stage
of training, so ``auto`` measures it: each step's demand (rays that refined + rays cut off) is folded into a
running maximum on the device (no host synchronisation), and every ``interval`` steps the budget is set to
that maximum plus headroom. It grows at the first check where demand plus headroom exceeds it and shrinks
only by a clear step (each change means a new graph capture).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cocoinr_nerfstudio.model_components.error_bounded_sampler import ErrorBoundedSampler


class AdaptiveRefineBudget:
    """Sets ``sampler.static_refine_budget`` from the demand observed in training.

    Args:
        sampler: the fixed-shape sampler whose budget is set; it starts at 1 (every ray, exact).
        margin: relative headroom above the highest demand seen since the last check.
        floor: headroom added in absolute terms (a view the last interval did not draw may need more).
        quantum: budgets are multiples of this (fewer distinct graphs).
        shrink_hysteresis: shrink only when the new budget is at least this much lower.
        min_observations: a check with fewer steps observed since the previous check that read them keeps observing (the first
            step, whose initial sphere fills much of the image, does not set the budget alone).
    """

    def __init__(
        self,
        sampler: ErrorBoundedSampler,
        margin: float = 0.25,
        floor: float = 1 / 32,
        quantum: float = 1 / 32,
        shrink_hysteresis: float = 0.125,
        min_observations: int = 10,
    ) -> None:
        self.sampler = sampler
        self.margin = margin
        self.floor = floor
        self.quantum = quantum
        self.shrink_hysteresis = shrink_hysteresis
        self.min_observations = min_observations
        sampler.static_refine_budget = 1.0
        self._demand: Tensor | None = None
        self._observed = 0
        self.history: list[tuple[int, float, float]] = []
        """(step, demand seen, budget set) at every change."""

    @property
    def budget(self) -> float:
        return self.sampler.static_refine_budget

    def observe(self, demand: Tensor) -> None:
        """Folds one step's demand (share of rays that needed a second round) into the running maximum."""
        demand = demand.detach().float()
        self._demand = demand.clone() if self._demand is None else torch.maximum(self._demand, demand)
        self._observed += 1

    def target(self, demand: float) -> float:
        """The budget for a demand: headroom added, rounded up to the quantum, at most 1."""
        wanted = demand * (1.0 + self.margin) + self.floor
        return min(1.0, math.ceil(wanted / self.quantum - 1e-6) * self.quantum)  # demand arrives as float32

    def adapt(self, step: int) -> bool:
        """Reads the maximum demand since the last call (one host synchronisation) and sets the budget;
        True when it changed."""
        if self._demand is None or self._observed < self.min_observations:
            return False
        demand = float(self._demand)
        self._demand, self._observed = None, 0
        new = self.target(demand)
        if new > self.budget or new <= self.budget - self.shrink_hysteresis:
            self.sampler.static_refine_budget = new
            self.history.append((step, demand, new))
            return True
        return False
