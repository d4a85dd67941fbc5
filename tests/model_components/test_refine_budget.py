"""The sampler's refine budgets under ``auto``: each round sized from its observed demand, grown at once with extra
headroom, shrunk with hysteresis, held otherwise."""

import pytest
import torch

from cocoinr_nerfstudio.model_components.error_bounded_sampler import ErrorBoundedSampler
from cocoinr_nerfstudio.model_components.refine_budget import AdaptiveRefineBudget


def test_target_adds_headroom_and_rounds_up_to_a_quantum():
    budget = AdaptiveRefineBudget(ErrorBoundedSampler(static_shapes=True))
    assert budget.target_share(0.2) == pytest.approx(9 / 32)  # 0.2 * 1.25 + 1/32 = 0.28125 = 9/32 exactly
    assert budget.target_share(0.21) == pytest.approx(10 / 32)
    assert budget.target_share(0.0) == pytest.approx(1 / 32)
    assert budget.target_share(0.9) == 1.0
    assert budget.target_share(0.2, margin=0.5) == pytest.approx(11 / 32)  # 0.2 * 1.5 + 1/32 = 0.33125


def test_next_budgets_grow_with_twice_the_headroom_and_never_exceed_the_round_before():
    sampler = ErrorBoundedSampler(static_shapes=True)
    budget = AdaptiveRefineBudget(sampler)
    # from every ray: rounds 3-5 shrink to their demand + 50% + 1/32 (0.2 -> 0.33125 -> 11/32); round 2 holds
    assert budget.next_budgets((0.9, 0.2, 0.0, 0.0)) == pytest.approx((1.0, 11 / 32, 1 / 32, 1 / 32))
    sampler.refine_budgets = (10 / 32, 8 / 32, 2 / 32, 1 / 32)
    # round 2 held (target 9/32, roomy target 11/32), round 3 grows (target 9/32 > 8/32: 0.2 * 1.5 + 1/32 ->
    # 11/32, capped at round 2's 10/32), round 4 held (roomy target 1/32, not 1/8 below 2/32), round 5 grows
    # (0.05 * 1.5 + 1/32 -> 4/32, capped at round 4's 2/32)
    assert budget.next_budgets((0.2, 0.2, 0.0, 0.05)) == pytest.approx((10 / 32, 10 / 32, 2 / 32, 2 / 32))
    # a later round's demand above an earlier one's (maxima of different steps): round 3 grows, capped by round
    # 2's budget, which holds (its target 7/32 is within the hysteresis of 10/32)
    assert budget.next_budgets((0.15, 0.3, 0.0, 0.0)) == pytest.approx((10 / 32, 10 / 32, 2 / 32, 1 / 32))


def demand(*shares: float) -> torch.Tensor:
    return torch.tensor(shares)


def test_adapts_each_round_to_its_highest_demand_since_the_last_check():
    sampler = ErrorBoundedSampler(static_shapes=True, static_refine_budget=0.5)
    budget = AdaptiveRefineBudget(sampler, min_observations=3)
    assert sampler.refine_budgets == (1.0,) * 4  # starts exact
    assert not budget.adapt(step=0)  # nothing observed yet
    budget.observe(demand(0.10, 0.10, 0.0, 0.0))
    assert not budget.adapt(step=1)  # too few steps seen: keeps observing
    budget.observe(demand(0.20, 0.05, 0.02, 0.0))
    budget.observe(demand(0.15, 0.15, 0.0, 0.0))  # round 3's highest demand is another step's
    assert budget.adapt(step=50)  # each round: demand + 50% + 1/32
    assert sampler.refine_budgets == pytest.approx((11 / 32, 9 / 32, 2 / 32, 1 / 32))
    # a little less demand: within the hysteresis, no new graph
    for _ in range(3):
        budget.observe(demand(0.15, 0.12, 0.0, 0.0))
    assert not budget.adapt(step=100) and sampler.refine_budgets == pytest.approx((11 / 32, 9 / 32, 2 / 32, 1 / 32))
    # more demand in round 4: a new capture, where round 4 takes twice the headroom (0.1 * 1.5 + 1/32 -> 6/32)
    # and round 3 keeps its budget (its roomy target, 6/32, is within the hysteresis of 9/32)
    for shares in ((0.2, 0.1, 0.1, 0.0), (0.0,) * 4, (0.0,) * 4):
        budget.observe(demand(*shares))
    assert budget.adapt(step=150)
    assert sampler.refine_budgets == pytest.approx((11 / 32, 9 / 32, 6 / 32, 1 / 32))
    # about the same demand again: nothing to change (round 3 set to its bare target, 5/32, would now have to grow)
    for _ in range(3):
        budget.observe(demand(0.2, 0.13, 0.1, 0.0))
    assert not budget.adapt(step=175)
    # far less: shrinks
    for _ in range(3):
        budget.observe(demand(0.0, 0.0, 0.0, 0.0))
    assert budget.adapt(step=200) and sampler.refine_budgets == pytest.approx((1 / 32,) * 4)
    assert [step for step, _, _ in budget.history] == [50, 150, 200]
    assert budget.history[0][1] == pytest.approx((0.20, 0.15, 0.02, 0.0))


def test_a_request_reads_the_demand_so_far_and_the_next_adapt_acts_on_it():
    """What a check reads a step early: the demand observed up to the request; later steps count toward the next."""
    sampler = ErrorBoundedSampler(static_shapes=True)
    budget = AdaptiveRefineBudget(sampler, min_observations=2)
    budget.observe(demand(0.2, 0.1, 0.0, 0.0))
    budget.request()  # one step observed: too few, keeps observing, nothing requested
    assert budget._requested is None
    budget.observe(demand(0.2, 0.1, 0.0, 0.0))
    budget.request()
    budget.observe(demand(0.9, 0.9, 0.9, 0.9))  # after the request: the next check's
    budget.observe(demand(0.9, 0.9, 0.9, 0.9))
    assert budget.adapt(step=50) and sampler.refine_budgets == pytest.approx((11 / 32, 6 / 32, 1 / 32, 1 / 32))
    assert budget.adapt(step=100) and sampler.refine_budgets == (1.0,) * 4  # 0.9 * 1.5 + 1/32 > 1


def changes_under(shrink_checks: int, last_round_demand: list[float]) -> list[tuple[int, tuple[float, ...]]]:
    """The (check, budgets) changes of ``auto`` budgets over checks whose demand is 0.3 in rounds 2-4 and the
    given share in round 5, one observed step a check."""
    sampler = ErrorBoundedSampler(static_shapes=True)
    budget = AdaptiveRefineBudget(sampler, min_observations=1, shrink_checks=shrink_checks)
    for check, share in enumerate(last_round_demand):
        budget.observe(demand(0.3, 0.3, 0.3, share))
        budget.adapt(step=check)
    return [(step, budgets) for step, _, budgets in budget.history]


def test_a_swinging_last_round_shrinks_only_after_a_run_of_low_checks():
    """Late in training the last round's demand swings from one check to the next. Shrinking at the first low check
    (``shrink_checks`` 1) shrinks and regrows it again and again: a graph capture each time. With 3 it holds; a
    fall that lasts three checks shrinks it, to the largest of their targets. The first sizing, from every ray,
    waits for no run."""
    swings = [0.2, 0.08, 0.2, 0.08, 0.2, 0.08, 0.2]
    first = (16 / 32, 16 / 32, 16 / 32, 11 / 32)  # 0.3 * 1.5 + 1/32 = 0.48125 -> 16/32; 0.2 * 1.5 + 1/32 -> 11/32
    at_once = changes_under(1, swings)
    assert [step for step, _ in at_once] == [0, 1, 2, 3, 4, 5, 6]
    assert at_once[0][1] == pytest.approx(first)
    # 0.08 * 1.5 + 1/32 = 0.15125 -> 5/32, 1/8 below 11/32: shrinks; 0.2 * 1.25 + 1/32 > 5/32: grows back
    assert at_once[1][1][3] == pytest.approx(5 / 32) and at_once[2][1][3] == pytest.approx(11 / 32)
    assert changes_under(3, swings) == [(0, pytest.approx(first))]
    # checks 1-3 lie 1/8 below 11/32 (targets 5/32, 4/32, 5/32): check 3 shrinks to 5/32. At check 4 (target
    # 2/32) the largest of checks 2-4 is 5/32, not 1/8 below: it holds
    fall = changes_under(3, [0.2, 0.08, 0.05, 0.08, 0.02])
    assert fall == [(0, pytest.approx(first)), (3, pytest.approx((*first[:3], 5 / 32)))]


def test_shrink_checks_must_be_positive():
    with pytest.raises(ValueError, match="shrink_checks must be at least 1, got 0"):
        AdaptiveRefineBudget(ErrorBoundedSampler(static_shapes=True), shrink_checks=0)
