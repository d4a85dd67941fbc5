"""Learning-rate schedules whose state survives ``torch.load(weights_only=True)``."""

from __future__ import annotations

from dataclasses import dataclass, field

from nerfstudio.engine.schedulers import Scheduler, SchedulerConfig
from torch.optim import Optimizer, lr_scheduler


@dataclass
class ExponentialDecayToSchedulerConfig(SchedulerConfig):
    """``lr(step) = lr_init * final_ratio ** (step / max_steps)``, then constant: the original's decay."""

    _target: type = field(default_factory=lambda: ExponentialDecayToScheduler)
    final_ratio: float = 0.1
    """Learning rate at ``max_steps`` as a fraction of the initial one."""
    max_steps: int | None = None
    """Steps over which the rate decays; None: the whole run (``--max-num-iterations``, set by CocoTrainer)."""


class ExponentialDecayToScheduler(Scheduler):
    """Like nerfstudio's ExponentialDecayScheduler, but the factor is a Python float.

    nerfstudio's schedulers return numpy scalars, which end up in the optimizer and scheduler state;
    torch >= 2.6 then refuses to load the checkpoint in ns-eval/ns-export/ns-viewer (weights_only).
    """

    config: ExponentialDecayToSchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        if self.config.max_steps is None:
            raise ValueError(
                "ExponentialDecayToScheduler needs max_steps: train with CocoTrainerConfig (it uses the run's length) "
                "or pass --optimizers.<group>.scheduler.max-steps."
            )
        ratio, max_steps = float(self.config.final_ratio), max(1, int(self.config.max_steps))

        def factor(step: int) -> float:
            return float(ratio ** (min(step, max_steps) / max_steps))

        return lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
