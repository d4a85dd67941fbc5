"""Where the GPU sits idle, from a ``torch.profiler`` trace taken with Python stacks.

A render launches kernels from Python; when the host falls behind (a wait for the GPU to count a mask, small
kernels whose launches take longer than they run), the GPU idles between kernels. Each gap is charged to the code
that launched the kernel after it: the innermost two frames of this project enclosing that launch on the host,
which is where the host was busy while the GPU waited.
"""

from __future__ import annotations

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
    waits = sum(1 for e in events if e.get("cat") in LAUNCHES and e.get("name") in WAITS)
    report = GapReport(
        kernels=len(work),
        span_us=(work[-1]["ts"] + work[-1]["dur"] - work[0]["ts"]) if work else 0.0,
        busy_us=sum(e["dur"] for e in work),
        idle_us=0.0,
        waits=waits,
    )
    gaps = []
    for before, after in itertools.pairwise(work):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > min_gap_us:
            gaps.append((gap, launches.get(after.get("args", {}).get("correlation"))))
    launchers = _launchers([launch for _, launch in gaps if launch is not None], events)
    for gap, launch in gaps:
        where = "launch not in the trace" if launch is None else launchers[id(launch)]
        report.idle_us += gap
        report.by_launcher[where] += gap
        report.gaps_by_launcher[where] += 1
    return report


def _launchers(launches: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[int, str]:
    """For each launch (by ``id``), the innermost two project frames enclosing it on its thread, innermost first.
    One sweep per thread in time order: Python frames nest, so the frames still open at a launch form a stack."""
    frames: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "python_function" and PROJECT in e.get("name", ""):
            frames[e["tid"]].append(e)
    names: dict[int, str] = {}
    for tid in {launch["tid"] for launch in launches}:
        pending = sorted(frames.get(tid, []), key=lambda e: e["ts"])
        queries = sorted((launch for launch in launches if launch["tid"] == tid), key=lambda e: e["ts"])
        open_frames: list[dict[str, Any]] = []
        next_frame = 0
        for launch in queries:
            ts = launch["ts"]
            while next_frame < len(pending) and pending[next_frame]["ts"] <= ts:
                frame = pending[next_frame]
                while open_frames and open_frames[-1]["ts"] + open_frames[-1]["dur"] < frame["ts"]:
                    open_frames.pop()
                open_frames.append(frame)
                next_frame += 1
            while open_frames and open_frames[-1]["ts"] + open_frames[-1]["dur"] < ts:
                open_frames.pop()
            innermost = [e["name"].split(f"{PROJECT}/")[-1] for e in open_frames[::-1][:2]]
            names[id(launch)] = " <- ".join(innermost) or "outside the project"
    return names


def traced_events(work: Callable[[], Any], with_stack: bool = False) -> list[dict[str, Any]]:
    """Runs ``work`` once on the GPU under the profiler (host and GPU activity) and returns the Chrome trace's
    ``traceEvents``."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=with_stack) as prof:
        work()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return json.loads(trace.read_text())["traceEvents"]


def profile_gaps(work: Callable[[], Any]) -> GapReport:
    """Runs ``work`` once on the GPU under the profiler, with Python stacks, and reports its idle gaps."""
    return idle_gaps(traced_events(work, with_stack=True))


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
