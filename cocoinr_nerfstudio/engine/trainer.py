"""nerfstudio's Trainer, with learning-rate decays that span the run and an optional CUDA-graph step."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import TRAIN_INTERATION_OUTPUT, Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from cocoinr_nerfstudio.engine.cuda_graph_step import CudaGraphTrainStep, StaticShapeError
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
    """Trainer whose open-ended decays follow ``max_num_iterations`` (the original decays over its whole run),
    and which replays each step as a CUDA graph when the model asks for it (``--pipeline.model.cuda-graph``)."""

    config: CocoTrainerConfig
    _graph_step: CudaGraphTrainStep | None = None
    _graph_unavailable: str | None = None

    def setup_optimizers(self) -> Optimizers:
        optimizers = resolve_decay_lengths(self.config.optimizers, self.config.max_num_iterations)
        return Optimizers(optimizers, self.pipeline.get_param_groups())

    def _cuda_graph_blocker(self) -> str | None:
        """Why this run cannot replay graphs (None: it can)."""
        if not self.device.startswith("cuda"):
            return f"the device is {self.device}, not CUDA"
        if self.world_size > 1:
            return "it runs distributed (DDP synchronises gradients inside backward)"
        if self.mixed_precision:
            return "mixed precision is on (the gradient scaler synchronises with the host)"
        if any(steps != 1 for steps in self.gradient_accumulation_steps.values()):
            return "gradients are accumulated over several steps"
        return None

    def train_iteration(self, step: int) -> TRAIN_INTERATION_OUTPUT:
        model = self.pipeline.model
        if not getattr(model.config, "cuda_graph", False) or self._graph_unavailable is not None:
            return super().train_iteration(step)
        if self._graph_step is None:
            self._graph_unavailable = self._cuda_graph_blocker()
            if self._graph_unavailable is not None:
                CONSOLE.print(
                    f"[bold yellow]--pipeline.model.cuda-graph: not used because {self._graph_unavailable}; "
                    "training runs eagerly (same static-shape sampler)."
                )
                return super().train_iteration(step)
            self._graph_step = CudaGraphTrainStep(model)
            CONSOLE.print("Capturing the training step as a CUDA graph (a few eager warm-up passes first).")

        self.optimizers.zero_grad_all()
        ray_bundle, batch = self.pipeline.datamanager.next_train(step)
        try:
            outputs, loss_dict = self._graph_step(ray_bundle, batch)
        except StaticShapeError as error:
            CONSOLE.print(f"[bold yellow]CUDA graph skipped for step {step}: {error}")
            outputs = model(ray_bundle)
            loss_dict = model.get_loss_dict(outputs, batch)
            functools.reduce(torch.add, loss_dict.values()).backward()
        # the graph overwrites its outputs on the next replay: hand out copies
        loss_dict = {name: value.detach().clone() for name, value in loss_dict.items()}
        metrics_dict = model.get_metrics_dict(outputs, batch)
        loss = functools.reduce(torch.add, loss_dict.values())
        self.optimizers.optimizer_scaler_step_some(self.grad_scaler, list(self.optimizers.parameters.keys()))
        self.grad_scaler.update()
        self.optimizers.scheduler_step_all(step)
        return loss, loss_dict, metrics_dict
