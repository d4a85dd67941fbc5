"""Where a training step's GPU time goes, by part of the model: a profile of steps run eagerly.

A CUDA-graph replay is one opaque launch to the profiler, and inductor's kernel names tell operators, not the
model's parts. So the step is run eagerly here (the same compiled fields, the same static sampler shapes as
the captured graph, the same batch sizes), with a ``record_function`` range around each part, and the kernels
each range launched are summed. Kernel time is what the graph replays; the host's launch gaps of an eager step
are not counted. The backward pass runs on autograd's own thread, outside every range: it is reported as the
step's kernel time minus the forward pass, the losses and the metrics.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

PREFIX = "phase: "

PARTS: tuple[tuple[str, str, str], ...] = (
    # (label, attribute path of the object from the model, method)
    ("prototypes (codebook attention)", "prior", "refresh"),
    ("sampler (SDF queries, beta search)", "sampler", "generate_ray_samples"),
    ("foreground field at the samples", "field", "get_outputs"),
    ("SDF and its gradient (samples and eikonal points)", "field", "sdf_and_gradient"),
    ("colour head", "field", "get_colors"),
    ("background field", "", "_render_background"),
)
"""The model's parts that get a range. Ranges nest: the foreground field includes the samples' SDF gradient
and the colour head."""

FORWARD, LOSSES, BACKWARD, TOTAL = "forward pass", "losses and metrics", "backward pass (the rest)", "step"


@dataclass
class PhaseTimes:
    """Milliseconds per step of each part, and what they were measured as (GPU kernels or host wall time)."""

    milliseconds: dict[str, float]
    unit: str


@contextlib.contextmanager
def phase_ranges(model: torch.nn.Module) -> Iterator[None]:
    """Wraps the model's parts (``PARTS``, those it has) in ``record_function`` ranges, restored afterwards."""
    patched: list[tuple[Any, str]] = []
    try:
        for label, path, method in PARTS:
            owner = getattr(model, path, None) if path else model
            if owner is None or not hasattr(owner, method):
                continue
            setattr(owner, method, _ranged(getattr(owner, method), PREFIX + label))
            patched.append((owner, method))
        yield
    finally:
        for owner, method in patched:
            delattr(owner, method)  # the instance attribute goes; the class's method shows again


def _ranged(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def eager_step(pipeline: Any, step: int) -> None:
    """One training step's forward, losses and backward, without a CUDA graph or an optimizer step (the
    gradients are cleared instead, so the model does not change)."""
    model = pipeline.model
    ray_bundle, batch = pipeline.datamanager.next_train(step)
    with record_function(PREFIX + FORWARD):
        outputs = model(ray_bundle)
    with record_function(PREFIX + LOSSES):
        metrics = model.get_metrics_dict(outputs, batch)
        loss = functools.reduce(torch.add, model.get_loss_dict(outputs, batch, metrics).values())
    loss.backward()
    model.zero_grad(set_to_none=True)


def profile_phases(pipeline: Any, first_step: int, num_steps: int, warmup: int = 2) -> PhaseTimes:
    """Per-step time of each part over ``num_steps`` eager steps after ``warmup`` untimed ones. On CUDA, kernel
    time; elsewhere the host's wall time inside each range (there the backward row is not measured)."""
    cuda = next(pipeline.model.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with phase_ranges(pipeline.model):
        for step in range(first_step, first_step + warmup):
            eager_step(pipeline, step)
        sync()
        with profile(activities=activities) as prof:
            for step in range(first_step + warmup, first_step + warmup + num_steps):
                eager_step(pipeline, step)
            sync()
    totals: dict[str, float] = {}
    kernels = 0.0
    for event in prof.events():
        if event.device_type == DeviceType.CPU and event.name.startswith(PREFIX):
            label = event.name[len(PREFIX) :]
            value = event.device_time_total if cuda else event.cpu_time_total
            totals[label] = totals.get(label, 0.0) + value
        elif cuda and event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            kernels += event.device_time  # a kernel (ranges also show on the GPU timeline, as annotations)
    per_step = {label: microseconds / num_steps / 1000.0 for label, microseconds in totals.items()}
    if cuda:
        per_step[TOTAL] = kernels / num_steps / 1000.0
        per_step[BACKWARD] = per_step[TOTAL] - per_step.get(FORWARD, 0.0) - per_step.get(LOSSES, 0.0)
    return PhaseTimes(per_step, "GPU kernel ms" if cuda else "host ms")


def format_phases(times: PhaseTimes, title: str) -> str:
    """A Markdown table: the forward pass and its parts (marked with a dot; a part's nested ranges count in it too),
    the losses, the backward pass and the step, each with its share of the step (of the forward pass where the
    step's total is not measured)."""
    whole = TOTAL if TOTAL in times.milliseconds else FORWARD
    step = times.milliseconds.get(whole, 0.0)
    share_of = "the step" if whole == TOTAL else "the forward pass"
    rows = [title, "", f"| part | {times.unit} per step | share of {share_of} |", "|---|---:|---:|"]
    labels = [FORWARD, *(label for label, _, _ in PARTS), LOSSES, BACKWARD, TOTAL]
    for label in labels:
        if label not in times.milliseconds:
            continue
        value = times.milliseconds[label]
        name = f"· {label}" if any(label == part for part, _, _ in PARTS) else label
        share = f"{100.0 * value / step:.1f}%" if step > 0 else "-"
        rows.append(f"| {name} | {value:.2f} | {share} |")
    return "\n".join(rows)
