"""What the GPU does in a replayed training step: the graph's kernels, the gaps between them, and the work outside.

``step_phases`` profiles eager steps, because a graph's kernels cannot be traced back to the model's parts. But
an eager profile misses what only the replay has: its own spacing of kernels, and the work the trainer launches
between replays (the batch, the copies into the graph's inputs, the optimizer, the metrics). Here the trainer's
own steps run under the profiler. Each kernel is told apart by its launch: those whose launch is a
``cudaGraphLaunch`` ran inside the graph. Per replay, the graph's span (first kernel's start to last kernel's
end) is its kernels' time plus the gaps between them, so the gaps show what fewer, larger kernels could save.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cocoinr_nerfstudio.benchmarks.gpu_gaps import GPU_WORK, LAUNCHES, traced_events


@dataclass
class ReplayProfile:
    """Per replayed step (medians over the profiled steps), in milliseconds unless said otherwise."""

    steps: int
    graph_kernels: int
    """GPU operations inside one replay (kernels, copies, memsets)."""
    graph_span_ms: float
    graph_busy_ms: float
    """Sum of those operations' durations (more than the span where some ran at once)."""
    outside_kernels: float
    """GPU operations launched outside the graph, per step (mean)."""
    outside_busy_ms: float
    step_ms: float
    """From one replay's first kernel to the next one's (one step alone: to the end of its own work)."""
    by_kernel: list[tuple[str, float, float]]
    """(kernel, ms per step, launches per step) inside the graph, largest first."""

    @property
    def graph_gaps_ms(self) -> float:
        return max(0.0, self.graph_span_ms - self.graph_busy_ms)


def replay_profile(events: list[dict[str, Any]]) -> ReplayProfile:
    """Splits a Chrome trace's GPU work into replays (by the ``cudaGraphLaunch`` that launched it) and the rest."""
    launch_names = {
        e["args"]["correlation"]: e.get("name", "")
        for e in events
        if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})
    }
    replays: dict[int, list[dict[str, Any]]] = defaultdict(list)
    outside: list[dict[str, Any]] = []
    for e in events:
        if e.get("cat") not in GPU_WORK or "ts" not in e:
            continue
        correlation = e.get("args", {}).get("correlation")
        if launch_names.get(correlation, "").startswith("cudaGraphLaunch"):
            replays[correlation].append(e)
        else:
            outside.append(e)
    if not replays:
        raise ValueError("no kernel in the trace was launched by cudaGraphLaunch: did the steps replay a CUDA graph?")
    ordered = sorted(replays.values(), key=lambda work: min(e["ts"] for e in work))
    starts = [min(e["ts"] for e in work) for work in ordered]
    ends = [max(e["ts"] + e["dur"] for e in work) for work in ordered]
    last_end = max([ends[-1], *(e["ts"] + e["dur"] for e in outside)])
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for work in ordered:
        for e in work:
            by_kernel[e["name"]][0] += e["dur"]
            by_kernel[e["name"]][1] += 1
    steps = len(ordered)
    return ReplayProfile(
        steps=steps,
        graph_kernels=round(statistics.median(len(work) for work in ordered)),
        graph_span_ms=statistics.median(end - start for start, end in zip(starts, ends, strict=True)) / 1000,
        graph_busy_ms=statistics.median(sum(e["dur"] for e in work) for work in ordered) / 1000,
        outside_kernels=len(outside) / steps,
        outside_busy_ms=sum(e["dur"] for e in outside) / steps / 1000,
        step_ms=statistics.median([b - a for a, b in itertools.pairwise(starts)] or [last_end - starts[0]]) / 1000,
        by_kernel=sorted(
            ((name, us / steps / 1000, count / steps) for name, (us, count) in by_kernel.items()), key=lambda r: -r[1]
        ),
    )


def profile_replays(run_steps: Callable[[], Any]) -> ReplayProfile:
    """Runs ``run_steps`` (trainer steps that replay a graph) under the profiler. The host's activity is traced too:
    its launches tell the graph's kernels from the others."""
    return replay_profile(traced_events(run_steps))


def format_replay_profile(report: ReplayProfile, top: int, width: int = 90) -> str:
    """The replay's make-up, then its ``top`` largest kernels (Markdown)."""
    lines = [
        f"Per replayed step (median of {report.steps}): {report.step_ms:.2f} ms from one replay's first kernel to "
        f"the next's.",
        "",
        "| part | ms per step | GPU operations |",
        "|---|---:|---:|",
        f"| graph: its kernels' time | {report.graph_busy_ms:.2f} | {report.graph_kernels} |",
        f"| graph: gaps between its kernels | {report.graph_gaps_ms:.2f} | |",
        f"| graph: first kernel to last | {report.graph_span_ms:.2f} | |",
        f"| outside the graph: kernels and copies | {report.outside_busy_ms:.2f} | {report.outside_kernels:.1f} |",
        f"| idle between replays, outside work aside | "
        f"{max(0.0, report.step_ms - report.graph_span_ms - report.outside_busy_ms):.2f} | |",
    ]
    if top > 0:
        lines += ["", "| kernel in the graph | ms per step | launches per step |", "|---|---:|---:|"]
        for name, milliseconds, launches in report.by_kernel[:top]:
            name = name if len(name) <= width else name[: width - 3] + "..."
            lines.append(f"| {name} | {milliseconds:.3f} | {launches:g} |")
    return "\n".join(lines)
