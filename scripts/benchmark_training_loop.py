#!/usr/bin/env python
"""Training speed as ns-train delivers it: nerfstudio's own ``Trainer.train()`` loop, per ``--vis``.

benchmark_speed.py times a loop of its own, which waits for the GPU every ``--sync-every`` steps. In ns-train,
how often the host waits (and the GPU then idles while the host prepares the next step) depends on the writers
and the model's callbacks: tensorboard and wandb read the logged losses every 10 steps, the viewer (ns-train's
default) reads nothing. This script runs the real loop for ``--warmup`` + ``--steps`` steps, times the last
``--steps`` between two synchronisations, and lists every wait inside that span by the code that waited (torch's
CUDA sync debug mode). On CUDA it also gives the replayed graph's GPU time per step.

    python scripts/benchmark_training_loop.py --device cuda --steps 400 --warmup 25 --beta-init 0.005 \\
        --refine-budget 0.5 --vis viewer tensorboard
    python scripts/benchmark_training_loop.py --device cpu --steps 2 --configs default --vis tensorboard  # smoke

``--time-limit SECONDS`` ends a run's span at the step under way once the run has taken that long (compilation
included) and still reports it, with the steps it holds: for hosts that stop a command at a fixed time.

Options this script does not know are passed on to benchmark_speed.py's parser (``--configs``, ``--rays``,
``--beta-init``, ``--refine-budget``, ...); each configuration runs once per ``--vis``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from nerfstudio.utils.rich_utils import CONSOLE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_speed  # a sibling script, not a package

from cocoinr_nerfstudio.benchmarks.training_loop import LoopResult, TimeLimitError, format_results, time_training_loop

VIS_CHOICES = ("viewer", "tensorboard", "viewer+tensorboard")  # wandb logs like tensorboard, but needs a login


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vis", nargs="+", default=["viewer"], choices=VIS_CHOICES, help="ns-train's --vis, a run each"
    )
    parser.add_argument("--viewer-port", type=int, default=None, help="the viewer's port (nerfstudio's default 7007)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds a run may take, compilation included: its timed span then ends early and is still reported",
    )
    args, passed_on = parser.parse_known_args(argv)
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be positive, got {args.time_limit}")
    speed = benchmark_speed.parse_args(passed_on)
    if speed.schedule_steps is not None:  # ns-train's loop runs max_num_iterations steps, the decays' length too
        parser.error("--schedule-steps: ns-train's loop ends where the learning rates' decay does (warmup + steps)")
    if speed.steps < 2 or speed.warmup < 1:
        parser.error(f"--steps must be at least 2 and --warmup at least 1, got {speed.steps} and {speed.warmup}")
    return args, speed


def main(argv: list[str] | None = None) -> str:
    args, speed = parse_args(argv)
    if speed.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    from nerfstudio.utils import writer  # not at the top: imported before nerfstudio's configs, it is circular

    results: list[LoopResult] = []
    writers_before = list(writer.EVENT_WRITERS)
    with tempfile.TemporaryDirectory() as tmp:
        scene = benchmark_speed.scene_or_generated(speed, Path(tmp), mesh_resolution=32)
        try:
            for name in speed.configs:
                for vis in args.vis:
                    torch.manual_seed(speed.seed)
                    config = benchmark_speed._trainer_config(speed, scene, name, Path(tmp) / "outputs" / vis)
                    config.vis = vis
                    config.viewer.websocket_port = args.viewer_port
                    config.viewer.quit_on_train_completion = True  # else train() waits for a viewer to close
                    config.get_base_dir().mkdir(parents=True, exist_ok=True)  # ns-train makes it with the config
                    writer.EVENT_WRITERS[:] = []  # each trainer sets up its own
                    trainer = config.setup(local_rank=0, world_size=1)
                    trainer.setup()
                    try:
                        results.append(
                            time_training_loop(trainer, name, vis, speed.warmup, speed.steps, args.time_limit)
                        )
                    except TimeLimitError as error:  # the other runs still get their turn
                        CONSOLE.print(f"[bold yellow]{error}: no result")
                    finally:
                        trainer.shutdown()  # the viewer's server, if any
                        torch.set_float32_matmul_precision("highest")  # tf32 is process-wide
                        torch._dynamo.reset()
        finally:
            writer.EVENT_WRITERS[:] = writers_before
    device = results[0].device if results else speed.device
    report = f"Device: {device}; {speed.rays} rays/step; {speed.steps} timed steps after {speed.warmup}\n\n"
    report += format_results(results)
    print(report)
    return report


if __name__ == "__main__":
    main()
