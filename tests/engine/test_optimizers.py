"""The method's Adam: fused, and the same update as torch's default implementation."""

from __future__ import annotations

import torch

from cocoinr_nerfstudio.engine.optimizers import FusedAdamOptimizerConfig, set_fused
from cocoinr_nerfstudio.method_configs import coco_inr


def test_method_uses_fused_adam_with_the_originals_settings():
    expected = {"fields": (5e-4, 1e-8), "field_background": (5e-4, 1e-8), "hash_grid": (5e-3, 1e-15)}
    assert set(coco_inr.config.optimizers) == set(expected)  # the grid's group gets parameters only with the option
    for name, group in coco_inr.config.optimizers.items():
        optimizer = group["optimizer"]
        assert isinstance(optimizer, FusedAdamOptimizerConfig)
        assert (optimizer.lr, optimizer.eps, optimizer.fused) == (*expected[name], True)


def test_fused_adam_matches_the_default_implementation():
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    results = []
    for fused in (True, False):
        params = [p.clone().requires_grad_(True) for p in start]
        optimizer = FusedAdamOptimizerConfig(lr=5e-4, eps=1e-8, fused=fused).setup(params)
        assert optimizer.defaults["fused"] is fused
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for fused, default, before in zip(*results, start, strict=True):
        torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)
        assert (fused - before).abs().max() > 1e-3  # the steps moved the parameters


def test_resumed_state_takes_the_configured_implementation():
    """A checkpoint of the for-each Adam (older runs) loads into a fused run as fused, and steps the same."""
    torch.manual_seed(0)
    start, grads = torch.randn(6), [torch.randn(6) for _ in range(4)]

    def run(fused_before: bool, fused_after: bool | None) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        param = start.clone().requires_grad_(True)
        optimizer = FusedAdamOptimizerConfig(lr=1e-2, fused=fused_before).setup([param])
        for index, grad in enumerate(grads):
            if index == 2 and fused_after is not None:  # save, rebuild as configured now, load, switch
                saved = optimizer.state_dict()
                optimizer = FusedAdamOptimizerConfig(lr=1e-2, fused=fused_after).setup([param])
                optimizer.load_state_dict(saved)
                assert optimizer.param_groups[0]["fused"] is fused_before  # what load_state_dict restores
                set_fused(optimizer, fused_after)
            param.grad = grad.clone()
            optimizer.step()
        return param.detach(), optimizer

    expected, _ = run(False, None)
    resumed, optimizer = run(False, True)
    assert optimizer.param_groups[0]["fused"] is True
    torch.testing.assert_close(resumed, expected, rtol=1e-6, atol=1e-7)
    back, optimizer = run(True, False)
    assert not optimizer.param_groups[0]["fused"]
    torch.testing.assert_close(back, expected, rtol=1e-6, atol=1e-7)
