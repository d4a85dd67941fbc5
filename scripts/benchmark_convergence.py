#!/usr/bin/env python
"""Quality against training time: how soon a configuration reaches a held-out PSNR and Chamfer.

Issue 5's stretch goal is the quality of the original's full schedule in 20 minutes on one GPU.
benchmark_speed.py measures a step and benchmark_quality.py the quality after a fixed number of steps; this script
trains one run per configuration for ``--steps`` steps, with the learning rate decaying over ``--schedule-steps``
(default: the run, as ``ns-train`` decays over ``--max-num-iterations``), and evaluates it at each of ``--eval-at``
steps, once each of ``--eval-at-seconds`` of training has passed, at the last step, and once ``--time-limit``
seconds of training have passed (where the run then ends). The clock counts training as a user waits for it (its
steps, callbacks, compilation and graph captures), not the setup before the first step (the scene, the model);
evaluations pause it and leave the random streams as they found them. Each row gives the step, the training time,
the speed since the last row, held-out PSNR, masked PSNR, Chamfer, beta and the geometry's learning rate; rows are
written to ``--output`` as they come. A row's time is read after waiting for the GPU; whether a time has passed is
judged on the host's clock, which may run ahead of the GPU, so a row can come a few steps after its time.

    python scripts/benchmark_convergence.py --device cuda \\
        --configs graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+adam1 \\
        --steps 20000 --eval-at 2500 5000 10000 20000 --time-limit 540 --eval-stride 8 --frame-size 0
    python scripts/benchmark_convergence.py --device cpu --configs default --steps 4 --eval-at 2 4   # smoke

Options this script does not know are passed on to benchmark_speed.py's parser (``--configs``, ``--seed``,
``--beta-init``, ``--eval-stride``, ``--mesh-resolution``, ...); its ``--steps`` is the run's length and its
``--warmup`` is not used (every step counts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from nerfstudio.utils.rich_utils import CONSOLE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_speed  # a sibling script, not a package


@dataclass
class Point:
    """One evaluation of a run."""

    config: str
    step: int
    """Steps trained."""
    train_seconds: float
    """Training time so far, evaluations excluded."""
    iters_per_sec: float
    """Steps per second since the previous row (the first row's includes compilation)."""
    psnr: float
    psnr_masked: float
    chamfer: float
    beta: float
    learning_rate: float
    """The SDF field's learning rate at this step (the schedule's progress)."""
    sampler_queries: str
    time_limit: bool = False
    """Whether the run stopped here at ``--time-limit``."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[], help="steps to evaluate at besides the last")
    parser.add_argument(
        "--eval-at-seconds",
        type=float,
        nargs="+",
        default=[],
        help="seconds of training after which to evaluate (at the step under way), besides --eval-at",
    )
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds of training after which a run is evaluated and ends"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table (.md) and rows (.json)")
    args, passed_on = parser.parse_known_args(argv)
    speed = benchmark_speed.parse_args(passed_on)
    if speed.steps < 1:
        parser.error(f"--steps must be at least 1, got {speed.steps}")
    args.eval_at = sorted({*args.eval_at, speed.steps})
    if not 1 <= args.eval_at[0] or args.eval_at[-1] > speed.steps:
        parser.error(f"--eval-at takes steps from 1 to --steps ({speed.steps}), got {args.eval_at}")
    if speed.schedule_steps is None:  # benchmark_speed.py's option; here every step counts, so the run is --steps
        speed.schedule_steps = speed.steps
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error(f"--time-limit must be positive, got {args.time_limit}")
    if any(not seconds > 0 for seconds in args.eval_at_seconds):
        parser.error(f"--eval-at-seconds takes positive seconds, got {args.eval_at_seconds}")
    args.eval_at_seconds = sorted(set(args.eval_at_seconds))
    if not (speed.eval and speed.mesh):
        parser.error("this script evaluates held-out views and meshes: drop --no-eval and --no-mesh")
    return args, speed


def _evaluate(trainer, config: str, scene: Path, speed, step: int, seconds: float, rate: float, stop: bool) -> Point:
    pipeline, model = trainer.pipeline, trainer.pipeline.model
    metrics = pipeline.get_average_eval_image_metrics()
    surface = benchmark_speed.surface_metrics(pipeline, scene / "gt_mesh.ply", speed.mesh_resolution, trainer.device)
    chamfer = surface["chamfer"]
    point = Point(
        config=config,
        step=step,
        train_seconds=seconds,
        iters_per_sec=rate,
        psnr=float(metrics["psnr"]),
        psnr_masked=float(metrics.get("psnr_masked", math.nan)),
        chamfer=chamfer,
        beta=float(model.density.get_beta().detach()),
        learning_rate=float(trainer.optimizers.optimizers["fields"].param_groups[0]["lr"]),
        sampler_queries=benchmark_speed.sampler_query_precision(model),
        time_limit=stop,
    )
    CONSOLE.print(
        f"{config}: step {step}, {seconds:.0f} s of training: PSNR {point.psnr:.2f}, Chamfer {chamfer:.3f}, "
        f"beta {point.beta:.2e}" + (" (time limit)" if stop else "")
    )
    return point


@contextlib.contextmanager
def _random_streams_kept(device: str) -> Iterator[None]:
    """Torch's CPU (and the device's) random state as it was before the block."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if device.startswith("cuda") else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def run_config(
    args, speed, scene: Path, name: str, output_dir: Path, on_point: Callable[[Point], None] = lambda point: None
) -> list[Point]:
    """One run of configuration ``name``: trained and evaluated as the module says; ``on_point`` is called with
    each row as it comes."""
    torch.manual_seed(speed.seed)
    config = benchmark_speed._trainer_config(speed, scene, name, output_dir)  # decays over speed.schedule_steps
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    device = trainer.device
    points: list[Point] = []
    trained = 0.0  # seconds, evaluations excluded
    last_step, last_seconds = 0, 0.0
    marks = list(args.eval_at_seconds)  # --eval-at-seconds not yet passed
    start = time.perf_counter()
    for step in range(speed.steps):
        benchmark_speed.train_step(trainer, step)
        done = step + 1
        elapsed = trained + time.perf_counter() - start
        over_time = args.time_limit is not None and elapsed > args.time_limit
        if done not in args.eval_at and not over_time and not (marks and elapsed >= marks[0]):
            continue
        benchmark_speed._sync(device)
        trained += time.perf_counter() - start
        rate = (done - last_step) / max(trained - last_seconds, 1e-9)
        with _random_streams_kept(device):  # a row's step must not change the training that follows it
            points.append(
                _evaluate(trainer, name, scene, speed, done, trained, rate, over_time and done != speed.steps)
            )
        on_point(points[-1])
        last_step, last_seconds = done, trained
        marks = [mark for mark in marks if mark > trained]
        if over_time:
            break
        start = time.perf_counter()
    return points


def format_table(points: list[Point], device: str, args, speed) -> str:
    lines = [
        f"Device: {device}; {speed.rays} rays/step; {speed.steps} steps, learning rates decaying over "
        f"{speed.schedule_steps}; {speed.train_views} training views; seed {speed.seed}"
        + (f"; beta from {speed.beta_init}" if speed.beta_init is not None else "")
        + (f"; time limit {args.time_limit:g} s" if args.time_limit is not None else ""),
        "",
        "| config | step | training min | it/s since the last row | held-out PSNR | masked PSNR | Chamfer | beta | "
        "learning rate | sampler's queries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.config} | {p.step}{' (time limit)' if p.time_limit else ''} | {p.train_seconds / 60:.2f} | "
            f"{p.iters_per_sec:.2f} | {p.psnr:.2f} | {p.psnr_masked:.2f} | {p.chamfer:.3f} | {p.beta:.2e} | "
            f"{p.learning_rate:.2e} | {p.sampler_queries} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Point]:
    args, speed = parse_args(argv)
    if speed.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    benchmark_speed.refuse_earlier_output("benchmark_convergence.py", args.output)
    device = torch.cuda.get_device_name() if speed.device == "cuda" else "CPU"
    points: list[Point] = []
    failed = []

    def keep(point: Point) -> None:
        """Each row is written as it comes: a run stopped from outside (a host's time limit) keeps what it had."""
        points.append(point)
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.with_suffix(".md").write_text(format_table(points, device, args, speed) + "\n")
            args.output.with_suffix(".json").write_text(json.dumps([asdict(p) for p in points], indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        scene = benchmark_speed.scene_or_generated(speed, Path(tmp), mesh_resolution=128)
        for name in speed.configs:
            try:
                with benchmark_speed.process_state_kept():  # the trainer's writers log into the temporary folder
                    run_config(args, speed, scene, name, Path(tmp) / "outputs", keep)
            except Exception:  # one broken configuration must not cost the others' rows
                traceback.print_exc()
                failed.append(name)
            finally:
                torch._dynamo.reset()  # compiled code of the previous model would count against recompile limits
    print(format_table(points, device, args, speed))
    if failed:
        sys.exit(f"benchmark_convergence.py: {', '.join(failed)} failed (tracebacks above).")
    return points


if __name__ == "__main__":
    main()
