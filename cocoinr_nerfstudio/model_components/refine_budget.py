"""How many rays each of the fixed-shape sampler's rounds 2.. refines: sized from what training needs.

A CUDA graph needs a fixed count of rays in each of the sampler's rounds after the first (``refine_budgets``).
The share of rays that need those rounds depends on the scene (how much of each image the object covers), on
the stage of training and on the round: far fewer rays need round 4 than round 2. So ``auto`` measures it:
each step's demand per round (rays that ran the round + rays cut off before it) is folded into a running
maximum on the device (no host synchronisation), and every ``interval`` steps each round's budget is compared
with that maximum plus headroom (read without draining the GPU's queue when requested a step before). A round
grows as soon as its demand plus headroom exceeds its budget, and then takes twice the headroom; it shrinks only
where that roomier target falls clearly below its budget. Each change
means a new graph capture, 0.3-0.6 s on an H200 (round twenty of docs/benchmarks.md): the equal of 15-25 steps,
so spare rays that spare a capture are cheap.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cocoinr_nerfstudio.model_components.error_bounded_sampler import ErrorBoundedSampler
from cocoinr_nerfstudio.model_components.host_reads import DeferredRead


class AdaptiveRefineBudget:
    """Sets ``sampler.refine_budgets`` from the demand observed in training.

    Args:
        sampler: the fixed-shape sampler whose budgets are set; it starts at 1 (every ray, exact).
        margin: relative headroom above the highest demand seen since the last check.
        growth_margin: relative headroom of the budget a round grows or shrinks to (demand that rose once tends to
            rise again: the later rounds' demand climbs as beta falls).
        floor: headroom added in absolute terms (a view the last interval did not draw may need more).
        quantum: budgets are multiples of this (fewer distinct graphs).
        shrink_hysteresis: a round shrinks only when its roomy target is at least this much lower than its budget;
            a round whose target is a little lower keeps its budget, also when another round's change means a new
            capture (set to their bare targets, such rounds grew back at a later check: a capture more each time).
        min_observations: a check with fewer steps observed since the previous check that read them keeps observing (the first
            step, whose initial sphere fills much of the image, does not set the budget alone).
    """

    def __init__(
        self,
        sampler: ErrorBoundedSampler,
        margin: float = 0.25,
        growth_margin: float = 0.5,
        floor: float = 1 / 32,
        quantum: float = 1 / 32,
        shrink_hysteresis: float = 0.125,
        min_observations: int = 10,
    ) -> None:
        self.sampler = sampler
        self.margin = margin
        self.growth_margin = growth_margin
        self.floor = floor
        self.quantum = quantum
        self.shrink_hysteresis = shrink_hysteresis
        self.min_observations = min_observations
        sampler.static_refine_budget = 1.0
        self._demand: Tensor | None = None
        self._observed = 0
        self._requested: DeferredRead | None = None
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

    def target_share(self, demand: float, margin: float | None = None) -> float:
        """The budget for one round's demand: headroom added (``margin``, default ``self.margin``), rounded up to the
        quantum, at most 1."""
        wanted = demand * (1.0 + (self.margin if margin is None else margin)) + self.floor
        return min(1.0, math.ceil(wanted / self.quantum - 1e-6) * self.quantum)  # demand arrives as float32

    def next_budgets(self, demand: tuple[float, ...]) -> tuple[float, ...]:
        """Each round's budget after a check, never above the round before's (a round's rays come from it).

        A round whose target (``margin``) exceeds its budget grows to its demand plus ``growth_margin``; one whose
        demand plus ``growth_margin`` is ``shrink_hysteresis`` below its budget shrinks to that; others hold. Both
        moves land on the same roomy target, so a round that just grew does not shrink at the next small dip."""
        shares, limit = [], 1.0
        for round_demand, held in zip(demand, self.budgets, strict=True):
            roomy = self.target_share(round_demand, self.growth_margin)
            if self.target_share(round_demand) > held or roomy <= held - self.shrink_hysteresis:
                share = roomy
            else:
                share = held
            limit = min(limit, share)
            shares.append(limit)
        return tuple(shares)

    def request(self) -> None:
        """Starts reading the maximum demand since the last request (no wait: see
        :mod:`~cocoinr_nerfstudio.model_components.host_reads`) for the next :meth:`adapt`, and observes afresh.
        Fewer than ``min_observations`` steps observed: keeps observing."""
        if self._demand is None or self._observed < self.min_observations:
            return
        self._requested = DeferredRead(self._demand)
        self._demand, self._observed = None, 0

    def adapt(self, step: int) -> bool:
        """Sets the budgets from the demand :meth:`request` read (requested here, and waited for, when it was not);
        True when they changed."""
        if self._requested is None:
            self.request()
        if self._requested is None:
            return False
        demand = tuple(float(value) for value in self._requested.result().reshape(-1).tolist())
        self._requested = None
        new = self.next_budgets(demand)
        if new == self.budgets:
            return False
        self.sampler.refine_budgets = new
        self.history.append((step, demand, new))
        return True
