"""Timing of GPU work as the benchmark scripts report it: medians of CUDA-event intervals (wall clock on CPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 0) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones. On CUDA each call is
    bracketed by events on the current stream, so what is timed is the GPU work, not the host's launches."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1000.0 * (time.perf_counter() - begin))
    return statistics.median(times)
