"""Fused Adam made replayable: its state created beforehand, its learning rate read from a tensor."""

from __future__ import annotations

import pytest
import torch

from cocoinr_nerfstudio.engine.graph_optimizer import (
    GraphOptimizer,
    LearningRateMirror,
    capture_blocker,
    initialise_state,
    step_all,
)
from cocoinr_nerfstudio.engine.schedulers import ExponentialDecayToSchedulerConfig


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=generator)),
        torch.nn.Parameter(torch.randn(5, generator=generator)),
    ]


def _grads(params, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(steps)]


def test_only_fused_adam_is_captured_and_the_reason_is_named():
    params = _params()
    assert capture_blocker(torch.optim.Adam(params, lr=1e-3, fused=True)) is None
    assert capture_blocker(torch.optim.AdamW(params, lr=1e-3, fused=True)) is None
    assert "not the fused implementation" in capture_blocker(torch.optim.Adam(params, lr=1e-3))
    assert capture_blocker(torch.optim.SGD(params, lr=1e-3)) == "SGD is not Adam"
    assert "amsgrad" in capture_blocker(torch.optim.Adam(params, lr=1e-3, fused=True, amsgrad=True))


def test_initialised_state_is_a_fresh_adams_and_moves_nothing():
    """Steps after the initialisation are bit for bit those of an Adam that created its state itself; the
    parameters, their gradients and another parameter's existing state are untouched by it."""
    params, reference = _params(), _params()
    grads = _grads(params, steps=3)
    optimizer = torch.optim.Adam(params, lr=1e-2, fused=True)
    expected = torch.optim.Adam(reference, lr=1e-2, fused=True)
    # the first parameter already has state (a step taken with the second frozen); the second has none
    for opt, ps in ((optimizer, params), (expected, reference)):
        ps[0].grad = grads[0][0].clone()
        opt.step()
        ps[0].grad = None
    values_before = [p.detach().clone() for p in params]
    state_before = {key: value.clone() for key, value in optimizer.state[params[0]].items()}
    params[1].grad = marker = torch.full_like(params[1], 7.0)
    initialise_state(optimizer)
    assert params[1].grad is marker and params[0].grad is None
    for before, p in zip(values_before, params, strict=True):
        assert torch.equal(before, p.detach())
    assert set(optimizer.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(optimizer.state[params[1]]["step"]) == 0.0
    assert not optimizer.state[params[1]]["exp_avg_sq"].any()
    for key, value in state_before.items():
        assert torch.equal(optimizer.state[params[0]][key], value), key
    assert [group["lr"] for group in optimizer.param_groups] == [1e-2]
    for step_grads in grads[1:]:
        for opt, ps in ((optimizer, params), (expected, reference)):
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(params, reference, strict=True):
        assert torch.equal(p.detach(), q.detach())


def test_steps_reading_the_mirror_follow_the_scheduler_as_float_rates_do():
    """Two Adams under the same decay: one steps with its float rate, the other through the mirror (capturable,
    tensor rate), which is updated before each step as the graph's replay is. The schedulers, the rates the groups
    report and the checkpoints keep floats."""
    params, reference = _params(), _params()
    optimizer = torch.optim.Adam(params, lr=1e-1, fused=True)
    expected = torch.optim.Adam(reference, lr=1e-1, fused=True)
    decay = ExponentialDecayToSchedulerConfig(final_ratio=0.01, max_steps=4).setup()
    schedulers = [decay.get_scheduler(opt, lr_init=1e-1) for opt in (optimizer, expected)]
    mirror = LearningRateMirror.of(optimizer)
    for step_grads in _grads(params, steps=5):
        for ps in (params, reference):
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
        mirror.update()
        assert float(mirror.rates[0]) == pytest.approx(expected.param_groups[0]["lr"], rel=1e-6)
        with mirror.in_place_of_floats():
            assert optimizer.param_groups[0]["lr"] is mirror.rates[0] and optimizer.param_groups[0]["capturable"]
            optimizer.step()
        expected.step()
        assert isinstance(optimizer.param_groups[0]["lr"], float) and not optimizer.param_groups[0]["capturable"]
        for scheduler in schedulers:
            scheduler.step()
        for p, q in zip(params, reference, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    mirror.update()
    assert float(mirror.rates[0]) == pytest.approx(1e-3, rel=1e-6)  # 0.1 x 0.01: the decay's end
    assert isinstance(optimizer.state_dict()["param_groups"][0]["lr"], float)


def test_the_floats_come_back_when_the_step_fails():
    params = _params()
    optimizer = torch.optim.Adam(params, lr=1e-2, fused=True)
    mirror = LearningRateMirror.of(optimizer)
    with pytest.raises(RuntimeError, match="capture failed"), mirror.in_place_of_floats():
        raise RuntimeError("capture failed")
    assert optimizer.param_groups[0]["lr"] == 1e-2 and optimizer.param_groups[0]["capturable"] is False


def test_step_all_clips_as_nerfstudio_does_before_stepping():
    params, reference = _params(), _params()
    grads = _grads(params, steps=1)[0]
    for ps in (params, reference):
        for p, g in zip(ps, grads, strict=True):
            p.grad = 100 * g.clone()
    expected = torch.optim.Adam(reference, lr=1e-2, fused=True)
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    clipped = [p.grad.clone() for p in reference]
    expected.step()
    step_all([GraphOptimizer(torch.optim.Adam(params, lr=1e-2, fused=True), max_norm=0.5)])
    for p, q, g in zip(params, reference, clipped, strict=True):
        torch.testing.assert_close(p.grad, g)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_the_trainer_steps_fused_adams_in_the_graph_and_says_which_it_cannot(capsys):
    from types import SimpleNamespace

    from nerfstudio.engine.optimizers import Optimizers

    from cocoinr_nerfstudio.engine.optimizers import FusedAdamOptimizerConfig
    from cocoinr_nerfstudio.engine.trainer import CocoTrainer, CocoTrainerConfig

    config = {
        "fields": {"optimizer": FusedAdamOptimizerConfig(lr=1e-3, max_norm=0.5), "scheduler": None},
        "field_background": {"optimizer": FusedAdamOptimizerConfig(lr=1e-3, fused=False), "scheduler": None},
    }
    optimizers = Optimizers(config, {"fields": _params(0), "field_background": _params(1)})
    trainer = SimpleNamespace(optimizers=optimizers, config=CocoTrainerConfig())
    inside, outside = CocoTrainer._graph_optimizers(trainer)
    assert [entry.optimizer for entry in inside] == [optimizers.optimizers["fields"]]
    assert inside[0].max_norm == 0.5 and outside == ("field_background",)
    printed = " ".join(capsys.readouterr().out.split())
    assert "Optimizer 'field_background' steps outside the CUDA graph: its Adam is not the fused" in printed
    trainer.config = CocoTrainerConfig(optimizer_in_graph=False)
    inside, outside = CocoTrainer._graph_optimizers(trainer)
    assert inside == [] and outside == ("fields", "field_background")
    assert capsys.readouterr().out == ""  # the user's own choice needs no warning
