"""nerfstudio's Trainer, with learning-rate decays that span the run as the original's do."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import Trainer, TrainerConfig

from cocoinr_nerfstudio.engine.schedulers import ExponentialDecayToSchedulerConfig


def resolve_decay_lengths(optimizers: dict[str, Any], max_num_iterations: int) -> dict[str, Any]:
    """A copy of ``optimizers`` where decays left open (``max_steps=None``) end with the run."""
    resolved = {}
    for name, group in optimizers.items():
        scheduler = group.get("scheduler")
        if isinstance(scheduler, ExponentialDecayToSchedulerConfig) and scheduler.max_steps is None:
            group = {**group, "scheduler": dataclasses.replace(scheduler, max_steps=max_num_iterations)}
        resolved[name] = group
    return resolved


@dataclass
class CocoTrainerConfig(TrainerConfig):
    """TrainerConfig for coco-inr: ``--max-num-iterations`` also sets how long the learning rate decays."""

    _target: type = field(default_factory=lambda: CocoTrainer)


class CocoTrainer(Trainer):
    """Trainer whose open-ended decays follow ``max_num_iterations`` (the original decays over its whole run)."""

    config: CocoTrainerConfig

    def setup_optimizers(self) -> Optimizers:
        optimizers = resolve_decay_lengths(self.config.optimizers, self.config.max_num_iterations)
        return Optimizers(optimizers, self.pipeline.get_param_groups())
