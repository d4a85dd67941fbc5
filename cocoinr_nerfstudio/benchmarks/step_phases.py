"""Where a training step's GPU time goes, by part of the model: a profile of steps run eagerly.

A CUDA-graph replay is one opaque launch to the profiler, and inductor's kernel names tell operators, not the
model's parts. So the step is run eagerly here (the same compiled fields, the same static sampler shapes as
the captured graph, the same batch sizes), with a ``record_function`` range around each part, and the kernels
each range launched are summed. Kernel time is what the graph replays; the host's launch gaps of an eager step
are not counted. Autograd runs CUDA work on a thread of its own: kernels launched there while the main thread
waits inside a range (an eager ``autograd.grad`` for the SDF's gradient) count in that range, and the
``loss.backward()`` is the step's kernel time minus every range (drawing the batch, the forward pass, the losses).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

PREFIX = "phase: "

BATCH, FORWARD, LOSSES, BACKWARD, TOTAL = (
    "training batch",
    "forward pass",
    "losses and metrics",
    "backward pass (the rest)",
    "step",
)
SAMPLES_GRADIENT, EIKONAL_GRADIENT = "SDF and its gradient", "SDF and its gradient at eikonal points"

PARTS: tuple[tuple[str, str, str, int], ...] = (
    # (label, attribute of the model holding the method ("" = the model), method, nesting depth in the table)
    ("prototypes (codebook attention)", "prior", "refresh", 1),
    ("sampler (SDF queries, beta search)", "sampler", "generate_ray_samples", 1),
    ("foreground field (samples and eikonal points)", "field", "outputs_and_gradient_at", 1),
    (SAMPLES_GRADIENT, "field", "sdf_and_gradient", 2),  # inside the foreground field; else the eikonal row
    ("colour head", "field", "get_colors", 2),
    ("background field", "", "_render_background", 1),
    (EIKONAL_GRADIENT, "field", "sdf_and_gradient", 1),
)
"""The model's parts that get a range, in table order. ``sdf_and_gradient`` is one method with two rows: called
inside the foreground field it is the samples' and (in training) the eikonal points' too; outside it, the eikonal
points' pass of their own (training with ``train_weight_threshold``)."""

ROWS: tuple[tuple[str, int], ...] = (
    (BATCH, 0),
    (FORWARD, 0),
    *((label, depth) for label, _, _, depth in PARTS),
    (LOSSES, 0),
    (BACKWARD, 0),
    (TOTAL, 0),
)
TOP_LEVEL = (BATCH, FORWARD, LOSSES)  # the ranges the backward pass is what is left of the step after


@dataclass
class KernelRow:
    """One kernel's GPU time per step, with the part of the model and the operator that launched it."""

    part: str
    """The innermost range open when it was launched; the backward pass where none was."""
    launcher: str
    """The operator that launched it, with its input shapes where the profiler recorded them."""
    kernel: str
    milliseconds: float
    launches: float


@dataclass
class PhaseTimes:
    """Milliseconds per step of each part, and what they were measured as (GPU kernels or host wall time).
    ``kernels``: every (part, launcher, kernel) on CUDA, largest first; empty elsewhere."""

    milliseconds: dict[str, float]
    unit: str
    kernels: list[KernelRow] = field(default_factory=list)


@contextlib.contextmanager
def replaced_methods(replacements: Iterable[tuple[Any, str, Callable[..., Any]]]) -> Iterator[None]:
    """Sets each ``(owner, method name, function)`` as an instance attribute for the block; afterwards every method
    is as it was (an instance attribute that was there is put back, else the class's method shows again)."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for owner, method, function in replacements:
            saved.append((owner, method, vars(owner).get(method)))
            setattr(owner, method, function)
        yield
    finally:
        for owner, method, previous in reversed(saved):
            if previous is None:
                delattr(owner, method)
            else:
                setattr(owner, method, previous)


def phase_ranges(
    model: torch.nn.Module, parts: tuple[tuple[str, str, str, int], ...] = PARTS
) -> contextlib.AbstractContextManager:
    """Wraps the model's parts (``parts``, those it has) in ``record_function`` ranges for the block
    (:func:`replaced_methods`)."""
    inside_field = threading.local()
    wrapped: dict[tuple[int, str], tuple[Any, str, Callable[..., Any]]] = {}
    for label, path, method, _ in parts:
        owner = getattr(model, path, None) if path else model
        if owner is None or not hasattr(owner, method) or (id(owner), method) in wrapped:
            continue
        function = getattr(owner, method)
        if method == "sdf_and_gradient":
            wrapper = _ranged(
                function, lambda: SAMPLES_GRADIENT if getattr(inside_field, "on", False) else EIKONAL_GRADIENT
            )
        elif path == "field" and method in ("get_outputs", "outputs_and_gradient_at"):
            wrapper = _ranged(function, lambda label=label: label, flag=inside_field)
        else:
            wrapper = _ranged(function, lambda label=label: label)
        wrapped[(id(owner), method)] = (owner, method, wrapper)
    return replaced_methods(wrapped.values())


def _ranged(
    fn: Callable[..., Any], label: Callable[[], str], flag: threading.local | None = None
) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + label()):
            if flag is None:
                return fn(*args, **kwargs)
            flag.on = True
            try:
                return fn(*args, **kwargs)
            finally:
                flag.on = False

    return wrapper


def eager_step(pipeline: Any, step: int) -> None:
    """One training step's batch, forward, losses and backward, without a CUDA graph or an optimizer step (the
    gradients are cleared instead, so the model does not change)."""
    model = pipeline.model
    with record_function(PREFIX + BATCH):
        ray_bundle, batch = pipeline.datamanager.next_train(step)
    with record_function(PREFIX + FORWARD):
        outputs = model(ray_bundle)
    with record_function(PREFIX + LOSSES):
        metrics = model.get_metrics_dict(outputs, batch)
        loss = functools.reduce(torch.add, model.get_loss_dict(outputs, batch, metrics).values())
    loss.backward()
    model.zero_grad(set_to_none=True)


def sum_by_range(events: Iterable[Any], cuda: bool) -> tuple[dict[str, float], float]:
    """Microseconds per range label (summed over occurrences), and all kernels' microseconds (CUDA).

    On CUDA a range holds the kernels its own thread launched inside it (``device_time_total``) and those that
    ops on other threads (autograd's) launched while it was open. Elsewhere, the host time inside it."""
    events = list(events)
    ranges = _ranges(events)
    totals: dict[str, float] = {}
    for event in ranges:
        label = event.name[len(PREFIX) :]
        totals[label] = totals.get(label, 0.0) + (event.device_time_total if cuda else event.cpu_time_total)
    if not cuda:
        return totals, 0.0
    kernels = sum(
        event.device_time
        for event in events
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    )  # ranges also show on the GPU timeline, as annotations: not kernels
    for event in events:
        launched = sum(kernel.duration for kernel in getattr(event, "kernels", ()))
        if event.device_type != DeviceType.CPU or launched == 0 or event.name.startswith(PREFIX):
            continue
        start = event.time_range.start
        for window in ranges:
            if window.thread != event.thread and window.time_range.start <= start <= window.time_range.end:
                label = window.name[len(PREFIX) :]
                totals[label] += launched
    return totals, kernels


def _ranges(events: list[Any]) -> list[Any]:
    """The host events of the ``record_function`` ranges this module opens."""
    return [event for event in events if event.device_type == DeviceType.CPU and event.name.startswith(PREFIX)]


def _innermost(ranges: list[Any], time: float, outside: str = BACKWARD) -> str:
    """The label of the innermost range that contains ``time`` (ranges nest: the latest opened, and of two opened
    at once the first to close), else ``outside``."""
    inside = [window for window in ranges if window.time_range.start <= time <= window.time_range.end]
    if not inside:
        return outside
    innermost = max(inside, key=lambda window: (window.time_range.start, -window.time_range.end))
    return innermost.name[len(PREFIX) :]


def kernels_by_launcher(events: Iterable[Any], num_steps: int, outside: str = BACKWARD) -> list[KernelRow]:
    """Every kernel's time per step, grouped by (part, launching operator and shapes, kernel name), largest first:
    which products and fused kernels of which part the step's time goes to. Inductor's kernels are their own
    launchers; an operator launched on autograd's thread counts in the range open at the time, as in
    :func:`sum_by_range`. A kernel a range launched itself belongs to that range; the range's own annotation on
    the GPU timeline (named like it) is not a kernel. Kernels launched outside every range count as ``outside``."""
    events = list(events)
    ranges = _ranges(events)
    rows: dict[tuple[str, str, str], list[float]] = {}
    for event in events:
        if event.device_type != DeviceType.CPU:
            continue
        kernels = getattr(event, "kernels", ())
        if event.name.startswith(PREFIX):  # inductor's launchers are named like their kernels: not skipped
            kernels = [kernel for kernel in kernels if kernel.name != event.name]
        if not kernels:
            continue
        shapes = [list(shape) for shape in getattr(event, "input_shapes", None) or () if shape]
        launcher = f"{event.name} {shapes}" if shapes else event.name
        part = _innermost(ranges, event.time_range.start, outside)
        for kernel in kernels:
            total = rows.setdefault((part, launcher, kernel.name), [0.0, 0.0])
            total[0] += kernel.duration
            total[1] += 1
    table = [
        KernelRow(part, launcher, kernel, microseconds / num_steps / 1000.0, count / num_steps)
        for (part, launcher, kernel), (microseconds, count) in rows.items()
    ]
    return sorted(table, key=lambda row: -row.milliseconds)


def format_kernels(rows: list[KernelRow], limit: int, width: int = 70, unit_of_work: str = "step") -> str:
    """A Markdown table of the ``limit`` largest rows; long launcher and kernel names are cut to ``width``."""

    def cut(text: str) -> str:
        return text if len(text) <= width else text[: width - 3] + "..."

    header = f"| part | launcher | kernel | GPU ms per {unit_of_work} | launches per {unit_of_work} |"
    lines = [header, "|---|---|---|---:|---:|"]
    for row in rows[:limit]:
        lines.append(
            f"| {row.part} | {cut(row.launcher)} | {cut(row.kernel)} | {row.milliseconds:.3f} | {row.launches:g} |"
        )
    return "\n".join(lines)


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
        with profile(activities=activities, record_shapes=cuda) as prof:
            for step in range(first_step + warmup, first_step + warmup + num_steps):
                eager_step(pipeline, step)
            sync()
    events = prof.events()
    totals, kernels = sum_by_range(events, cuda)
    per_step = {label: microseconds / num_steps / 1000.0 for label, microseconds in totals.items()}
    if not cuda:
        return PhaseTimes(per_step, "host ms")
    per_step[TOTAL] = kernels / num_steps / 1000.0
    per_step[BACKWARD] = per_step[TOTAL] - sum(per_step.get(label, 0.0) for label in TOP_LEVEL)
    return PhaseTimes(per_step, "GPU kernel ms", kernels_by_launcher(events, num_steps))


def format_phases(
    times: PhaseTimes,
    title: str,
    rows_in_order: tuple[tuple[str, int], ...] = ROWS,
    total: str = TOTAL,
    unit_of_work: str = "step",
) -> str:
    """A Markdown table: the batch, the forward pass and its parts (one dot a level: a part includes the parts
    below it with more dots), the losses, the backward pass and the step, each with its share of the step (of
    the forward pass where the step's total is not measured). ``rows_in_order``, ``total`` and ``unit_of_work``
    let another profile (a rendered frame) use the same layout."""
    whole = total if total in times.milliseconds else FORWARD
    step = times.milliseconds.get(whole, 0.0)
    share_of = f"the {unit_of_work}" if whole == total else f"the {whole}"
    rows = [title, "", f"| part | {times.unit} per {unit_of_work} | share of {share_of} |", "|---|---:|---:|"]
    for label, depth in rows_in_order:
        if label not in times.milliseconds:
            continue
        value = times.milliseconds[label]
        name = f"{'·' * depth} {label}" if depth else label
        share = f"{100.0 * value / step:.1f}%" if step > 0 else "-"
        rows.append(f"| {name} | {value:.2f} | {share} |")
    return "\n".join(rows)
