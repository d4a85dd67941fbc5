"""How many rays each of the fixed-shape sampler's rounds 2.. refines: sized from what training needs.

A CUDA graph needs a fixed count of rays in each of the sampler's rounds after the first (``refine_budgets``).
The share of rays that need those rounds depends on the scene (how much of each image the object covers), on
the stage of training and on the round: far fewer rays need round 4 than round 2. So ``auto`` measures it:
each step's demand per round (rays that ran the round + rays cut off before it) is folded into a running
maximum on the device (no host synchronisation), and every ``interval`` steps each round's budget is compared
with that maximum plus headroom (read without draining the GPU's queue when requested a step before). A round
grows as soon as its demand plus headroom exceeds its budget, and then takes twice the headroom; it shrinks only
where that roomier target falls clearly below its budget (optionally only after several checks in a row: see
``shrink_checks``). Each change means a new graph capture, 0.2-0.6 s on an H200 (rounds twenty and twenty-three of
docs/benchmarks.md): the equal of 10-25 steps, so spare rays that spare a capture are cheap.
"""

from __future__ import annotations

import math
from collections import deque

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
        shrink_checks: a round shrinks only when this many checks in a row found it shrinkable, and then to the
            largest of their roomy targets; 1: at the first. Late in training the last round's demand swings
            between windows (about 8 and 21% of the rays), and each dip shrank it and the next peak grew it back:
            two captures each time.
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
        shrink_checks: int = 1,
    ) -> None:
        if shrink_checks < 1:
            raise ValueError(f"shrink_checks must be at least 1, got {shrink_checks}")
        self.sampler = sampler
        self.margin = margin
        self.growth_margin = growth_margin
        self.floor = floor
        self.quantum = quantum
        self.shrink_hysteresis = shrink_hysteresis
        self.min_observations = min_observations
        self.shrink_checks = shrink_checks
        self._recent: deque[tuple[float, ...]] = deque(maxlen=shrink_checks - 1)
        """The demand read at the ``shrink_checks - 1`` checks before the next, oldest first."""
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

    def next_budgets(
        self, demand: tuple[float, ...], earlier: tuple[tuple[float, ...], ...] | None = None
    ) -> tuple[float, ...]:
        """Each round's budget after a check, never above the round before's (a round's rays come from it).

        A round whose target (``margin``) exceeds its budget grows to its demand plus ``growth_margin``; one whose
        demand plus ``growth_margin`` is ``shrink_hysteresis`` below its budget, at this check and at the
        ``shrink_checks - 1`` before it (``earlier``, oldest first; None: this check alone), shrinks to the largest
        of those roomy targets; others hold. Both moves land on a roomy target, so a round that just grew does not
        shrink at the next small dip."""
        checks = (*(earlier or ()), demand)[-self.shrink_checks :]
        may_shrink = earlier is None or len(checks) == self.shrink_checks
        shares, limit = [], 1.0
        for index, (round_demand, held) in enumerate(zip(demand, self.budgets, strict=True)):
            roomy = max(self.target_share(check[index], self.growth_margin) for check in checks)
            if self.target_share(round_demand) > held:
                share = self.target_share(round_demand, self.growth_margin)
            elif may_shrink and roomy <= held - self.shrink_hysteresis:
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
        # the first sizing, from every ray, waits for no run of checks
        new = self.next_budgets(demand, tuple(self._recent) if self.history else None)
        self._recent.append(demand)
        if new == self.budgets:
            return False
        self.sampler.refine_budgets = new
        self.history.append((step, demand, new))
        return True

    def state_dict(self) -> dict:
        """What a resumed run needs to go on sizing as this one would: the budgets set, their history and the demand
        of the checks a shrink waits on (JSON-serialisable). The demand observed since the last check is not kept:
        a resumed run observes afresh."""
        return {
            "budgets": list(self.budgets),
            "history": [[step, list(demand), list(budgets)] for step, demand, budgets in self.history],
            "recent": [list(demand) for demand in self._recent],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s budgets and history (the sampler's setter checks the budgets: one per round
        after the first, in (0, 1], never growing)."""
        self.sampler.refine_budgets = tuple(state["budgets"])
        self.history = [(int(step), tuple(demand), tuple(budgets)) for step, demand, budgets in state["history"]]
        self._recent.clear()
        self._recent.extend(tuple(demand) for demand in state["recent"])
        self._demand, self._observed, self._requested = None, 0, None
