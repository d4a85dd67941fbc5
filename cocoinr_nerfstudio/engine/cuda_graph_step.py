"""A training step (forward, losses, backward) captured once as a CUDA graph and replayed every step.

A coco-inr step launches thousands of small kernels (the error-bounded sampler alone ~2,600 operators,
the doubly differentiated SDF as many again); on a fast GPU the host cannot issue them as fast as they
run, so the GPU idles. A captured graph issues all of them in one launch.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.models.base_model import Model
from torch import Tensor


class StaticShapeError(ValueError):
    """A batch whose shapes differ from the captured one: the graph cannot take it."""


def _static_clone(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {key: _static_clone(item, device) for key, item in value.items()}
    return value


def _copy_into(static: Any, value: Any, name: str) -> None:
    """Copies ``value`` into the captured buffer ``static`` in place (the graph reads those addresses)."""
    if isinstance(static, Tensor):
        if not isinstance(value, Tensor) or value.shape != static.shape or value.dtype != static.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise StaticShapeError(f"{name}: captured as {tuple(static.shape)} {static.dtype}, got {got}")
        static.copy_(value, non_blocking=True)
    elif isinstance(static, dict):
        if not isinstance(value, dict) or value.keys() != static.keys():
            raise StaticShapeError(f"{name}: captured with keys {sorted(static)}, got {value!r:.80}")
        for key in static:
            _copy_into(static[key], value[key], f"{name}[{key!r}]")
    elif (static is None) != (value is None):
        raise StaticShapeError(f"{name}: captured as {static!r:.40}, got {value!r:.40}")


class CudaGraphTrainStep:
    """``model``'s forward pass, loss dict and backward pass as one replayable CUDA graph.

    The model must run with fixed shapes and without host synchronisation (coco-inr's ``cuda_graph``
    mode: static-shape sampler, no sample pruning) and every batch must have the captured shapes.
    Each call copies the batch into the captured input buffers, replays, and points every parameter's
    ``.grad`` at the gradient the graph wrote; the optimizer steps outside the graph, on the same
    parameter tensors the graph reads (in place). If a parameter or buffer was replaced instead, the step
    is captured again. Returned outputs and losses are overwritten by the next call.

    Args:
        model: the (not DDP-wrapped) model, in training mode, on a CUDA device.
        warmup_steps: eager forward/backward passes on a side stream before the first capture (lets cuBLAS,
            autograd and the caching allocator settle, as torch's graph documentation asks).
        recapture_warmup_steps: the same before a later capture (a new refine budget): one pass compiles and
            autotunes the new shapes outside the capture, the rest is settled already. On an H200 a capture
            took 0.4-0.6 s with three passes and 0.3-0.5 s with one (round twenty of docs/benchmarks.md).
    """

    def __init__(self, model: Model, warmup_steps: int = 3, recapture_warmup_steps: int = 1) -> None:
        self.model = model
        self.warmup_steps = warmup_steps
        self.recapture_warmup_steps = recapture_warmup_steps
        self.params: list[Tensor] = []
        """The parameters that train, as of the capture."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.grads: list[Tensor | None] = []
        self._captured_state: list[Any] = []
        self._bundle: RayBundle | None = None
        self._batch: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.loss_dict: dict[str, Tensor] = {}
        self._warmup_stream: torch.cuda.Stream | None = None

    def _forward_backward(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        assert self._bundle is not None
        # a shallow copy: the collider writes nears/fars onto the bundle it is given, and those must be
        # recomputed (inside the graph) from the static origins and directions on every replay
        outputs = self.model(copy.copy(self._bundle))
        loss_dict = self.model.get_loss_dict(outputs, self._batch)
        torch.stack(list(loss_dict.values())).sum().backward()
        return outputs, loss_dict

    def _zero_grads(self) -> None:
        for param in self.params:
            param.grad = None

    def capture(self, ray_bundle: RayBundle, batch: dict[str, Any]) -> None:
        """Records the graph on this batch (which then sits in the input buffers, ready to replay)."""
        # a previous graph's memory (its outputs, losses, gradients) goes before the new one is recorded:
        # capturing again must not hold two steps' worth of intermediates at once
        self._zero_grads()
        self.graph, self.outputs, self.loss_dict, self.grads = None, {}, {}, []
        self.params = [param for param in self.model.parameters() if param.requires_grad]
        device = self.params[0].device
        fields = {f.name: _static_clone(getattr(ray_bundle, f.name), device) for f in dataclasses.fields(ray_bundle)}
        self._bundle = dataclasses.replace(ray_bundle, **fields)
        self._batch = {key: _static_clone(value, device) for key, value in batch.items() if isinstance(value, Tensor)}
        warmup_steps = self.warmup_steps if self._warmup_stream is None else self.recapture_warmup_steps
        if self._warmup_stream is None:
            # one for the object's lifetime: cuBLAS keeps a workspace per stream it has seen, so a new stream at
            # every capture would leave ~64 MiB behind each time
            self._warmup_stream = torch.cuda.Stream(device)
        side = self._warmup_stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._zero_grads()
                self._forward_backward()
        torch.cuda.current_stream(device).wait_stream(side)
        self._zero_grads()
        graph = torch.cuda.CUDAGraph()
        # thread-local: only this thread's calls are checked for capture safety (others are not ours to police)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs, self.loss_dict = self._forward_backward()
        self.grads = [param.grad for param in self.params]
        self._captured_state = self._capture_state()
        self.graph = graph

    def _capture_state(self) -> list[Any]:
        """Where every parameter and buffer lives (the graph reads those addresses, whatever sits there), and the
        model's ``cuda_graph_key()`` if it has one: settings the graph baked in, such as a sampler's ray count."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        key = getattr(self.model, "cuda_graph_key", None)
        return [
            *(tensor.data_ptr() for tensor in tensors),
            *(int(param.requires_grad) for param in self.model.parameters()),
            key() if key is not None else None,
        ]

    def __call__(self, ray_bundle: RayBundle, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """One training step's outputs and losses; gradients are left in the parameters' ``.grad``.

        Raises:
            StaticShapeError: the batch's shapes differ from the captured batch's; run that step eagerly.
        """
        if self.graph is not None and self._capture_state() != self._captured_state:
            # weights were replaced, not updated in place (a checkpoint that resized a tensor, .to(), a frozen
            # parameter), or the model changed a baked-in setting: the graph would replay the old ones
            self.graph = None
        if self.graph is None:
            self.capture(ray_bundle, batch)
        else:
            assert self._bundle is not None
            for f in dataclasses.fields(ray_bundle):
                _copy_into(getattr(self._bundle, f.name), getattr(ray_bundle, f.name), f"ray_bundle.{f.name}")
            tensors = {key: value for key, value in batch.items() if isinstance(value, Tensor)}
            _copy_into(self._batch, tensors, "batch")
        assert self.graph is not None
        self.graph.replay()
        for param, grad in zip(self.params, self.grads, strict=True):
            param.grad = grad
        return self.outputs, self.loss_dict
