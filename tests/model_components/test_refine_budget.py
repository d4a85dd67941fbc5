"""The sampler's refine budget under ``auto``: sized from observed demand, grown at once, shrunk with hysteresis."""

import pytest
import torch

from cocoinr_nerfstudio.model_components.error_bounded_sampler import ErrorBoundedSampler
from cocoinr_nerfstudio.model_components.refine_budget import AdaptiveRefineBudget


def test_target_adds_headroom_and_rounds_up_to_a_quantum():
    budget = AdaptiveRefineBudget(ErrorBoundedSampler(static_shapes=True))
    assert budget.target(0.2) == pytest.approx(9 / 32)  # 0.2 * 1.25 + 1/32 = 0.28125 = 9/32 exactly
    assert budget.target(0.21) == pytest.approx(10 / 32)
    assert budget.target(0.0) == pytest.approx(1 / 32)
    assert budget.target(0.9) == 1.0


def test_adapts_to_the_highest_demand_since_the_last_check():
    sampler = ErrorBoundedSampler(static_shapes=True, static_refine_budget=0.5)
    budget = AdaptiveRefineBudget(sampler, min_observations=3)
    assert sampler.static_refine_budget == 1.0  # starts exact
    assert not budget.adapt(step=0)  # nothing observed yet
    budget.observe(torch.tensor(0.10))
    assert not budget.adapt(step=1)  # too few steps seen: keeps observing
    for demand in (0.20, 0.15):
        budget.observe(torch.tensor(demand))
    assert budget.adapt(step=50) and sampler.static_refine_budget == pytest.approx(9 / 32)
    # a little less demand: within the hysteresis, no new graph
    for _ in range(3):
        budget.observe(torch.tensor(0.12))
    assert not budget.adapt(step=100) and sampler.static_refine_budget == pytest.approx(9 / 32)
    # more demand: grows at once
    for demand in (0.3, 0.0, 0.0):
        budget.observe(torch.tensor(demand))
    assert budget.adapt(step=150) and sampler.static_refine_budget == pytest.approx(13 / 32)
    # far less: shrinks
    for _ in range(3):
        budget.observe(torch.tensor(0.0))
    assert budget.adapt(step=200) and sampler.static_refine_budget == pytest.approx(1 / 32)
    assert [step for step, _, _ in budget.history] == [50, 150, 200]
