#!/usr/bin/env python
"""Where a training step's GPU time goes, by part of the model (``cocoinr_nerfstudio.benchmarks.step_phases``).

A benchmark_speed.py configuration trains for ``--warmup`` steps through nerfstudio's Trainer (so a CUDA graph is
captured, fields compiled, the sampler's refine budget adapted as in a real run), then ``--steps`` further steps run
eagerly under the profiler with a range around each part: prototypes, sampler, foreground field, SDF gradient,
colour head, background, losses, and the backward pass as the rest of the step's kernel time. Where prototypes
are not cached (the ``reference`` config) they are computed inside each head's range, and their row is empty.

    python scripts/profile_step.py --device cuda --config graph+fields+bf16+sdpa+points+flash+fp16+geo16+split
    python scripts/profile_step.py --device cpu --config default --warmup 1 --steps 1   # smoke (host times)

On CUDA, ``--top-kernels N`` (default 25) adds the step's N largest kernels, each with its part and the operator
(and input shapes) that launched it.

``--replayed`` profiles the trainer's own steps instead (CUDA-graph configs, ``cocoinr_nerfstudio.benchmarks.
replay_profile``): the replayed graph's kernels and the gaps between them, the work outside the graph, and the
graph's largest kernels by name (a replay cannot be split by part):

    python scripts/profile_step.py --device cuda --replayed --warmup 101 --steps 10 --beta-init 0.005

Options this script does not know are passed on to benchmark_speed.py's parser (``--rays``, ``--beta-init``, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_speed  # a sibling script, not a package

from cocoinr_nerfstudio.benchmarks.replay_profile import format_replay_profile, profile_replays
from cocoinr_nerfstudio.benchmarks.step_phases import TOTAL, PhaseTimes, format_kernels, format_phases, profile_phases


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--config",
        default="graph+fields+bf16+sdpa+points+flash+fp16+geo16+split",
        choices=list(benchmark_speed.CONFIGS),
    )
    parser.add_argument("--warmup", type=int, default=None, help="trainer steps first (default 100 GPU, 2 CPU)")
    parser.add_argument("--steps", type=int, default=5, help="steps profiled (eager; with --replayed, the trainer's)")
    parser.add_argument("--top-kernels", type=int, default=25, help="largest kernels listed (CUDA; 0: none)")
    parser.add_argument(
        "--replayed", action="store_true", help="profile the trainer's replayed steps, not eager ones (CUDA graphs)"
    )
    args, passed_on = parser.parse_known_args(argv)
    if args.warmup is None:
        args.warmup = 100 if args.device == "cuda" else 2
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be at least 1, got {args.warmup} and {args.steps}")
    if args.top_kernels < 0:
        parser.error(f"--top-kernels must be >= 0, got {args.top_kernels}")
    if args.replayed and args.device != "cuda":
        parser.error("--replayed profiles CUDA-graph replays: it needs --device cuda")
    speed = ["--device", args.device, "--configs", args.config, "--steps", "1", "--warmup", str(args.warmup)]
    return args, benchmark_speed.parse_args(speed + passed_on)


def main(argv: list[str] | None = None) -> str:
    args, speed_args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    torch.manual_seed(speed_args.seed)
    with benchmark_speed.trained(speed_args, args.config, args.warmup) as trainer:
        if args.replayed:
            report = _replay_report(args, trainer)
        else:
            report = _step_report(args, speed_args, trainer, profile_phases(trainer.pipeline, args.warmup, args.steps))
    print(report)
    return report


def _replay_report(args: argparse.Namespace, trainer) -> str:
    steps = range(args.warmup, args.warmup + args.steps)
    if getattr(trainer, "_graph_step", None) is None or trainer._graph_step.graph is None:
        sys.exit(f"--replayed: config {args.config} did not capture a CUDA graph in its {args.warmup} warm-up steps")
    profile = profile_replays(lambda: [benchmark_speed.train_step(trainer, step) for step in steps])
    title = (
        f"Device: {torch.cuda.get_device_name()}; config {args.config}; steps {steps.start}-{steps.stop - 1} replayed"
    )
    return "\n".join([title, "", format_replay_profile(profile, args.top_kernels)])


def _step_report(args: argparse.Namespace, speed_args: argparse.Namespace, trainer, times: PhaseTimes) -> str:
    """The phase table, then (on CUDA) the largest kernels with the share of the step they cover."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    model = trainer.pipeline.model
    budgets = model.sampler.refine_budgets if model.sampler.static_shapes else (1.0,)
    shares = " / ".join(f"{100 * share:.0f}" for share in budgets)
    title = (
        f"Device: {device}; config {args.config}; {speed_args.rays} rays/step; {args.steps} eager steps profiled "
        f"after {args.warmup} trainer steps; sampler rounds 2.. on {shares}% of the rays"
    )
    report = [format_phases(times, title)]
    if times.kernels and args.top_kernels > 0:
        listed = sum(row.milliseconds for row in times.kernels[: args.top_kernels])
        step = times.milliseconds.get(TOTAL, 0.0)
        heading = f"The step's {args.top_kernels} largest kernels ({listed:.2f} of its {step:.2f} GPU kernel ms):"
        report += ["", heading, "", format_kernels(times.kernels, args.top_kernels)]
    return "\n".join(report)


if __name__ == "__main__":
    main()
