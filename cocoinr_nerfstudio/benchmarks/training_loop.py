"""Training speed as ``ns-train`` delivers it: nerfstudio's own ``Trainer.train()`` loop, timed between two
synchronisations, with every wait of the host for the GPU inside that span charged to the code that waited.

The host queues steps ahead of the GPU; each wait drains that queue, and the GPU then idles while the host prepares
the next step. How often the loop waits depends on what it logs (its writers, a viewer panel) and on the model's
callbacks, which a benchmark's own loop of steps can only imitate.
"""

from __future__ import annotations

import itertools
import statistics
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

from cocoinr_nerfstudio.engine.cuda_graph_step import CudaGraphTrainStep

SYNC_WARNING = "synchroniz"
"""What torch's sync debug mode says in each of its warnings ("called a synchronizing CUDA operation")."""


def waiting_code(stack: list[traceback.FrameSummary], depth: int = 3) -> str:
    """The innermost ``depth`` frames of ``stack`` outside torch and the warnings module, innermost first."""
    frames = [f for f in stack if "/torch/" not in f.filename and Path(f.filename).name != "warnings.py"]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-depth:][::-1])


@dataclass
class SyncLog:
    """Host synchronisations seen while recording, each with the training step it happened in, and the steps at
    which the CUDA-graph step was captured (again)."""

    step: int | None = None
    """The step being run (set by the loop's callback)."""
    seen: list[tuple[int | None, str]] = field(default_factory=list)
    captures: list[int | None] = field(default_factory=list)

    @property
    def steps(self) -> list[int | None]:
        return sorted({step for step, _ in self.seen}, key=lambda s: -1 if s is None else s)

    def by_place(self) -> Counter:
        return Counter(place for _, place in self.seen)


@contextmanager
def recording_syncs(log: SyncLog) -> Iterator[SyncLog]:
    """Every host synchronisation of CUDA work inside the block, into ``log`` (torch's sync debug mode warns at
    each; the warnings are recorded, not shown). Off CUDA nothing synchronises, and only warnings of that kind that
    code raises itself are recorded."""

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            log.seen.append((log.step, waiting_code(traceback.extract_stack()[:-1])))
        else:
            shown(message, category, filename, lineno, file, line)

    shown = warnings.showwarning
    cuda = torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # each wait, not the first of each place
        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield log
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")


@dataclass
class LoopResult:
    """One timed span of the training loop."""

    name: str
    vis: str
    device: str
    steps: int
    seconds: float
    syncs: SyncLog
    replay_ms: float = float("nan")
    """Median GPU time of one replayed CUDA-graph step (NaN without a graph)."""
    replay_period_ms: float = float("nan")
    """Median GPU time from one replay's start to the next's: the step with the work outside the graph."""
    peak_memory_gib: float = float("nan")
    planned_steps: int | None = None
    """The steps the span was to hold, where the time limit cut it short (None: it ran them all)."""

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.seconds / self.steps


class ReplayClock:
    """CUDA events around every ``torch.cuda.CUDAGraph.replay`` while installed (no waits: read them after)."""

    def __init__(self) -> None:
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._replay = None

    def __enter__(self) -> ReplayClock:
        original = self._replay = torch.cuda.CUDAGraph.replay
        events = self.events

        def timed_replay(graph) -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            original(graph)
            end.record()
            events.append((start, end))

        torch.cuda.CUDAGraph.replay = timed_replay
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.CUDAGraph.replay = self._replay

    def medians(self, last: int) -> tuple[float, float]:
        """Median replay time and replay start-to-start time (ms) of the ``last`` replays (synchronises)."""
        timed = self.events[-last:]
        if len(timed) < 2:
            return float("nan"), float("nan")
        torch.cuda.synchronize()
        replays = [start.elapsed_time(end) for start, end in timed]
        periods = [a.elapsed_time(b) for (a, _), (b, _) in itertools.pairwise(timed)]
        return statistics.median(replays), statistics.median(periods)


@contextmanager
def recording_captures(log: SyncLog) -> Iterator[SyncLog]:
    """The step of every capture of the CUDA-graph step inside the block, into ``log.captures``. A capture after the
    first follows a change the graph baked in (the sampler's refine budget under ``auto``); each costs a few tenths
    of a second, so a span's speed depends on how many it holds."""
    original = CudaGraphTrainStep.capture

    def capture(self, *args, **kwargs):
        log.captures.append(log.step)
        return original(self, *args, **kwargs)

    CudaGraphTrainStep.capture = capture
    try:
        yield log
    finally:
        CudaGraphTrainStep.capture = original


class TimeLimitError(RuntimeError):
    """The time limit passed before the timed span had two steps."""


def time_training_loop(
    trainer, name: str, vis: str, warmup: int, steps: int, time_limit_s: float | None = None
) -> LoopResult:
    """Runs ``trainer.train()`` (set up, ``max_num_iterations`` = ``warmup + steps``) and times steps ``warmup`` to
    the last: one synchronisation before the first timed step (before the model's own callbacks) and one after the
    last, host synchronisations recorded in between.

    ``time_limit_s``: seconds from this call (compilation included) after which the span ends at the step under way
    (once it holds two steps) and training stops; the result then says how many steps were planned, so a GPU host's
    limit on a command still leaves one. Raises TimeLimitError if the limit passes before that."""
    cuda = trainer.device.startswith("cuda")
    first, last = warmup, warmup + steps - 1
    began = time.perf_counter()
    marks: dict[str, float] = {}
    log = SyncLog()
    recording = ExitStack()  # open from the first timed step to the last (closed also if the loop stops between)
    clock = ReplayClock() if cuda else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def before(step: int) -> None:
        log.step = step
        if step == first:
            sync()
            marks["start"] = time.perf_counter()
            recording.enter_context(recording_syncs(log))
            recording.enter_context(recording_captures(log))

    def after(step: int) -> None:
        out_of_time = time_limit_s is not None and time.perf_counter() - began > time_limit_s
        if step == last or (out_of_time and step > first):
            recording.close()
            sync()
            marks["end"], marks["last"] = time.perf_counter(), step
        if out_of_time and step < last and step != first:  # at the span's first step: one more, then stop
            trainer.stop_training = True  # nerfstudio's loop ends before the next step, as at its last

    trainer.callbacks.insert(0, TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], before))
    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], after))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with recording, clock or nullcontext():
        trainer.train()
    if "end" not in marks:
        if time_limit_s is not None and trainer.stop_training:
            raise TimeLimitError(
                f"{name} --vis {vis}: the time limit ({time_limit_s:g} s) passed before timed steps {first}-{first + 1}"
            )
        raise RuntimeError(f"the loop stopped before step {last} (max_num_iterations must be warmup + steps)")
    timed = int(marks["last"]) - first + 1
    replay_ms, period_ms = clock.medians(timed) if clock is not None else (float("nan"), float("nan"))
    return LoopResult(
        name=name,
        vis=vis,
        device=torch.cuda.get_device_name(trainer.device) if cuda else "CPU",
        steps=timed,
        seconds=marks["end"] - marks["start"],
        syncs=log,
        replay_ms=replay_ms,
        replay_period_ms=period_ms,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        planned_steps=steps if timed < steps else None,
    )


def _captures(steps: list[int | None]) -> str:
    return f"{len(steps)} ({', '.join(str(step) for step in steps)})" if steps else "0"


def format_results(results: list[LoopResult], places: int = 8) -> str:
    """A table of the timed spans, then where each run's host waited for the GPU."""
    lines = [
        "| config | --vis | it/s | ms/step | replay ms | replay start to start ms | waits (steps with one) | "
        "graph captures (at steps) | peak GiB |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        steps = r.syncs.steps
        lines.append(
            f"| {r.name} | {r.vis} | {r.steps / r.seconds:.2f} | {r.ms_per_step:.2f} | {r.replay_ms:.2f} | "
            f"{r.replay_period_ms:.2f} | {len(r.syncs.seen)} ({len(steps)}) | {_captures(r.syncs.captures)} | "
            f"{r.peak_memory_gib:.2f} |"
        )
    for r in results:
        if r.planned_steps is not None:
            lines += ["", f"{r.name} --vis {r.vis}: cut by the time limit after {r.steps} of {r.planned_steps} steps"]
    for r in results:
        lines += ["", f"Waits of the host, {r.name} --vis {r.vis}: at steps {r.syncs.steps}"]
        lines += [f"  {count:5d}  {place}" for place, count in r.syncs.by_place().most_common(places)]
    return "\n".join(lines)
