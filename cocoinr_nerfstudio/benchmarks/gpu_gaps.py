"""Where the GPU sits idle, from a ``torch.profiler`` trace taken with Python stacks.

A render launches kernels from Python; when the host falls behind (a wait for the GPU to count a mask, small
kernels whose launches take longer than they run), the GPU idles between kernels. Each gap is charged to the code
that launched the kernel after it: the innermost two frames of this project enclosing that launch on the host,
which is where the host was busy while the GPU waited.
"""

from __future__ import annotations

import bisect
import itertools
import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

PROJECT = "cocoinr_nerfstudio"
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass
class GapReport:
    """A trace's GPU work and idle time, in microseconds."""

    kernels: int
    span_us: float
    busy_us: float
    idle_us: float
    waits: int
    """Host calls that block until the GPU is done (synchronisations)."""
    by_launcher: Counter = field(default_factory=Counter)
    """Idle microseconds by the project frames that launched the kernel after each gap."""
    gaps_by_launcher: Counter = field(default_factory=Counter)


def idle_gaps(events: list[dict[str, Any]], min_gap_us: float = 3.0) -> GapReport:
    """The gaps longer than ``min_gap_us`` between consecutive GPU operations (in start order) of a Chrome trace's
    ``traceEvents``, charged to their launchers."""
    work = sorted((e for e in events if e.get("cat") in GPU_WORK and "ts" in e), key=lambda e: e["ts"])
    launches = {
        e["args"]["correlation"]: e for e in events if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})
    }
    frames: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "python_function" and PROJECT in e.get("name", ""):
            frames[e["tid"]].append(e)
    starts = {}
    for tid, stack in frames.items():
        stack.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in stack]
    waits = sum(1 for e in events if e.get("cat") in LAUNCHES and e.get("name") in WAITS)
    report = GapReport(
        kernels=len(work),
        span_us=(work[-1]["ts"] + work[-1]["dur"] - work[0]["ts"]) if work else 0.0,
        busy_us=sum(e["dur"] for e in work),
        idle_us=0.0,
        waits=waits,
    )
    for before, after in itertools.pairwise(work):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap <= min_gap_us:
            continue
        report.idle_us += gap
        launch = launches.get(after.get("args", {}).get("correlation"))
        where = "launch not in the trace" if launch is None else _launcher(launch, frames, starts)
        report.by_launcher[where] += gap
        report.gaps_by_launcher[where] += 1
    return report


def _launcher(launch: dict[str, Any], frames: dict[Any, list], starts: dict[Any, list]) -> str:
    """The innermost two project frames enclosing ``launch`` on its thread (innermost first)."""
    stack, ts = frames.get(launch["tid"], []), launch["ts"]
    last = bisect.bisect_right(starts.get(launch["tid"], []), ts)
    enclosing = [e for e in stack[:last] if e["ts"] + e["dur"] >= ts]
    names = [e["name"].split(f"{PROJECT}/")[-1] for e in enclosing[::-1][:2]]
    return " <- ".join(names) or "outside the project"


def profile_gaps(work: Callable[[], Any]) -> GapReport:
    """Runs ``work`` once on the GPU under the profiler, with Python stacks, and reports its idle gaps."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        work()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return idle_gaps(events)


def format_gaps(report: GapReport, top: int = 15) -> str:
    """A table of the launchers with the most idle time before their kernels."""
    lines = [
        f"GPU work from first to last kernel {report.span_us / 1000:.1f} ms: busy {report.busy_us / 1000:.1f} ms, "
        f"idle {report.idle_us / 1000:.1f} ms in gaps; {report.kernels} kernels; {report.waits} host waits for the "
        "GPU.",
        "",
        "| idle ms | gaps | launched from (innermost first) |",
        "|---:|---:|---|",
    ]
    for where, us in report.by_launcher.most_common(top):
        lines.append(f"| {us / 1000:.1f} | {report.gaps_by_launcher[where]} | {where} |")
    return "\n".join(lines)
