"""nerfstudio's Trainer, with learning-rate decays that span the run, an optional CUDA-graph step and a viewer
that a browser can open while training starts (:mod:`cocoinr_nerfstudio.viewer.viewer`)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import nerfstudio.engine.trainer as nerfstudio_trainer
import torch
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import TRAIN_INTERATION_OUTPUT, Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from cocoinr_nerfstudio.engine.cuda_graph_step import CudaGraphTrainStep, StaticShapeError
from cocoinr_nerfstudio.engine.optimizers import set_fused
from cocoinr_nerfstudio.engine.schedulers import ExponentialDecayToSchedulerConfig
from cocoinr_nerfstudio.viewer.viewer import CocoViewer


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
    which replays each step as a CUDA graph when the model asks for it (``--pipeline.model.cuda-graph``), and whose
    viewer is :class:`~cocoinr_nerfstudio.viewer.viewer.CocoViewer` (safe to open while training starts).

    The graph path replaces ``pipeline.get_train_loss_dict`` with the model's forward and loss (what
    VanillaPipeline does); a pipeline that customises that method would be bypassed."""

    config: CocoTrainerConfig
    _graph_step: CudaGraphTrainStep | None = None
    _graph_unavailable: str | None = None
    _shape_warning_shown: bool = False

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        # nerfstudio's setup builds the viewer from the class its module imported: lend it ours for the call
        builtin = nerfstudio_trainer.ViewerState
        nerfstudio_trainer.ViewerState = CocoViewer
        try:
            super().setup(test_mode)
        finally:
            nerfstudio_trainer.ViewerState = builtin

    def setup_optimizers(self) -> Optimizers:
        optimizers = resolve_decay_lengths(self.config.optimizers, self.config.max_num_iterations)
        return Optimizers(optimizers, self.pipeline.get_param_groups())

    def _cuda_graph_blocker(self) -> str | None:
        """Why this run cannot replay graphs (None: it can)."""
        if not self.device.startswith("cuda"):
            return f"the device is {self.device}, not CUDA"
        if self.world_size > 1:
            return "it runs distributed (DDP synchronises gradients inside backward)"
        if self.use_grad_scaler:
            return "the gradient scaler is on (mixed precision or --use-grad-scaler: it synchronises with the host)"
        if self.config.log_gradients:
            return "--log-gradients is on"
        if any(steps != 1 for steps in self.gradient_accumulation_steps.values()):
            return "gradients are accumulated over several steps"
        return None

    def _announce_eager_training(self) -> None:
        CONSOLE.print(
            f"[bold yellow]--pipeline.model.cuda-graph: not used because {self._graph_unavailable}; "
            "training runs eagerly (same static-shape sampler)."
        )

    def _eager_forward_backward(self, ray_bundle, batch) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        model = self.pipeline.model
        outputs = model(ray_bundle)
        loss_dict = model.get_loss_dict(outputs, batch)
        functools.reduce(torch.add, loss_dict.values()).backward()
        return outputs, loss_dict

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()
        # an optimizer's state dict carries its implementation flags: the configured one wins on resume
        for name, optimizer in self.optimizers.optimizers.items():
            fused = getattr(self.config.optimizers[name]["optimizer"], "fused", None)
            if fused is not None:
                set_fused(optimizer, fused)

    def train_iteration(self, step: int) -> TRAIN_INTERATION_OUTPUT:
        model = self.pipeline.model
        if not getattr(model.config, "cuda_graph", False) or self._graph_unavailable is not None:
            return super().train_iteration(step)
        if self._graph_step is None:
            self._graph_unavailable = self._cuda_graph_blocker()
            if self._graph_unavailable is not None:
                self._announce_eager_training()
                return super().train_iteration(step)
            self._graph_step = CudaGraphTrainStep(model)
            CONSOLE.print("Capturing the training step as a CUDA graph (a few eager warm-up passes first).")

        self.optimizers.zero_grad_all()
        ray_bundle, batch = self.pipeline.datamanager.next_train(step)
        try:
            outputs, loss_dict = self._graph_step(ray_bundle, batch)
        except StaticShapeError as error:
            if not self._shape_warning_shown:
                CONSOLE.print(f"[bold yellow]CUDA graph skipped for step {step} (and silently for later ones): {error}")
                self._shape_warning_shown = True
            outputs, loss_dict = self._eager_forward_backward(ray_bundle, batch)
        except Exception as error:  # capture failed (an operation that cannot be captured): train eagerly from now on
            if self._graph_step.graph is not None:
                raise
            self._graph_unavailable = f"capturing the step failed ({type(error).__name__}: {error})"
            self._announce_eager_training()
            self.optimizers.zero_grad_all()
            outputs, loss_dict = self._eager_forward_backward(ray_bundle, batch)
        # the graph overwrites its outputs on the next replay: hand out copies
        loss_dict = {name: value.detach().clone() for name, value in loss_dict.items()}
        metrics_dict = model.get_metrics_dict(outputs, batch)
        loss = functools.reduce(torch.add, loss_dict.values())
        self.optimizers.optimizer_scaler_step_some(self.grad_scaler, list(self.optimizers.parameters.keys()))
        self.grad_scaler.update()
        self.optimizers.scheduler_step_all(step)
        return loss, loss_dict, metrics_dict
