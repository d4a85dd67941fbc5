"""How many rays each of the fixed-shape sampler's rounds 2.. refines: sized from what training needs.

A CUDA graph needs a fixed count of rays in each of the sampler's rounds after the first (``refine_budgets``).
The share of rays that need those rounds depends on the scene (how much of each image the object covers), on
the stage of training and on the round: far fewer rays need round 4 than round 2. So ``auto`` measures it:
each step's demand per round (rays that ran the round + rays cut off before it) is folded into a running
maximum on the device (no host synchronisation), and every ``interval`` steps each round's budget is set to that
maximum plus headroom. The budgets change at the first check where a round's demand plus headroom exceeds its
budget, or where one falls clearly below it (each change means a new graph capture).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cocoinr_nerfstudio.model_components.error_bounded_sampler import ErrorBoundedSampler


class AdaptiveRefineBudget:
    """Sets ``sampler.refine_budgets`` from the demand observed in training.

    Args:
        sampler: the fixed-shape sampler whose budgets are set; it starts at 1 (every ray, exact).
        margin: relative headroom above the highest demand seen since the last check.
        floor: headroom added in absolute terms (a view the last interval did not draw may need more).
        quantum: budgets are multiples of this (fewer distinct graphs).
        shrink_hysteresis: the budgets change on a shrink only when some round's target is at least this much lower.
            A change (a new capture) sets every round to its target, also rounds whose target moved less: the
            capture is paid once for all of them.
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
        self.history: list[tuple[int, tuple[float, ...], tuple[float, ...]]] = []
        """(step, demand seen per round, budgets set per round) at every change."""

    @property
    def budgets(self) -> tuple[float, ...]:
        return self.sampler.refine_budgets

    def observe(self, demand: Tensor) -> None:
        """Folds one step's demand (share of rays that needed each round 2..) into the running maximum."""
        demand = demand.detach().float()
        self._demand = demand.clone() if self._demand is None else torch.maximum(self._demand, demand)
        self._observed += 1

    def target_share(self, demand: float) -> float:
        """The budget for one round's demand: headroom added, rounded up to the quantum, at most 1."""
        wanted = demand * (1.0 + self.margin) + self.floor
        return min(1.0, math.ceil(wanted / self.quantum - 1e-6) * self.quantum)  # demand arrives as float32

    def target(self, demand: tuple[float, ...]) -> tuple[float, ...]:
        """Each round's budget, never above the round before's (a round's rays come from it)."""
        shares, limit = [], 1.0
        for round_demand in demand:
            limit = min(limit, self.target_share(round_demand))
            shares.append(limit)
        return tuple(shares)

    def adapt(self, step: int) -> bool:
        """Reads the maximum demand since the last call (one host synchronisation) and sets the budgets;
        True when they changed."""
        if self._demand is None or self._observed < self.min_observations:
            return False
        demand = tuple(float(value) for value in self._demand.reshape(-1).tolist())
        self._demand, self._observed = None, 0
        new = self.target(demand)
        pairs = list(zip(new, self.budgets, strict=True))
        grows = any(wanted > held for wanted, held in pairs)
        shrinks = any(wanted <= held - self.shrink_hysteresis for wanted, held in pairs)
        if not (grows or shrinks):
            return False
        self.sampler.refine_budgets = new
        self.history.append((step, demand, new))
        return True
