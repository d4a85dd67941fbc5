#!/usr/bin/env python
"""Does the way a model is evaluated move its held-out PSNR? One trained model, evaluated with each setting in which
our evaluation differs from the original's.

At equal steps ``coco-inr-fast`` scored about 0.3 dB below the original-like reference (docs/benchmarks.md, round
twenty-seven). Part of that difference could lie in the evaluation rather than in training: our renders skip samples
whose weight is below ``eval-weight-threshold`` (the original evaluates every sample), stop each ray's upsampling
once its own error bound is met (the original waits for every ray of the chunk), search beta with batched candidates
(the original halves one at a time) and, with ``sampler-autocast``, place samples by half-precision SDF queries.
This trains one configuration of ``scripts/benchmark_speed.py`` for ``--steps`` steps, then evaluates the same
weights on the held-out views with the model's own settings, with each of the original's in turn, and with all of
them, and prints each row's PSNR and its difference to the model's own. The model's settings are put back after
each row. ``--output`` also writes the table (.md) and the rows (.json), never over an earlier run's.

    python scripts/measure_eval_settings.py --device cuda --configs default --steps 600 --eval-stride 8 --frame-size 0
    python scripts/measure_eval_settings.py --device cpu --configs default --steps 2   # smoke

Options are benchmark_speed.py's (``--configs`` names the one configuration trained; ``--steps`` are its training
steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cocoinr_nerfstudio.benchmarks.step_phases import replaced_methods  # (owner, name, value) set for a block

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_speed  # sibling scripts, not a package
import measure_sampler_precision


@dataclass(frozen=True)
class Row:
    setting: str
    psnr: float
    psnr_masked: float
    seconds: float


def _every_sample(model):
    return replaced_methods([(model.config, "eval_weight_threshold", 0.0)])


def _batch_convergence(model):
    return replaced_methods([(model.sampler, "per_ray_convergence", False)])


def _sequential_bisection(model):
    return replaced_methods([(model.sampler, "batched_bisection", False)])


def _float32_queries(model):
    return measure_sampler_precision.sampler_queries_in(model, None)


SETTINGS: dict[str, Callable] = {
    "every sample evaluated (eval-weight-threshold 0)": _every_sample,
    "batch-level convergence (per-ray-convergence False)": _batch_convergence,
    "sequential bisection (batched-bisection False)": _sequential_bisection,
    "float32 sampler queries": _float32_queries,
}
"""Each of the original's evaluation settings, as a context that sets it on a trained model and puts it back."""


@contextlib.contextmanager
def _all_of(model, names: list[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(SETTINGS[name](model))
        yield


def _evaluated(pipeline, setting: str) -> Row:
    start = time.perf_counter()
    metrics = pipeline.get_average_eval_image_metrics()
    return Row(
        setting=setting,
        psnr=float(metrics["psnr"]),
        psnr_masked=float(metrics.get("psnr_masked", math.nan)),
        seconds=time.perf_counter() - start,
    )


def measure(pipeline) -> list[Row]:
    """The held-out metrics of ``pipeline``'s model with its own settings, each of :data:`SETTINGS` that applies,
    and all of those together."""
    model = pipeline.model
    names = [name for name in SETTINGS if name != "float32 sampler queries" or model.config.sampler_autocast != "none"]
    rows = [_evaluated(pipeline, "the model's own")]
    for name in names:
        with SETTINGS[name](model):
            rows.append(_evaluated(pipeline, name))
    with _all_of(model, names):
        rows.append(_evaluated(pipeline, "all of the above (the original's evaluation)"))
    return rows


def format_table(rows: list[Row], device: str, config: str, steps: int, beta: float) -> str:
    own = rows[0]
    lines = [
        f"Device: {device}; {config} trained {steps} steps (beta {beta:.3g}); the same weights evaluated each way",
        "",
        "| evaluation | held-out PSNR | difference | masked PSNR | difference | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setting} | {row.psnr:.4f} | {row.psnr - own.psnr:+.4f} | {row.psnr_masked:.4f} | "
            f"{row.psnr_masked - own.psnr_masked:+.4f} | {row.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    args = benchmark_speed.parse_args(argv)
    if not args.eval:
        sys.exit("measure_eval_settings.py evaluates held-out views: drop --no-eval")
    if len(args.configs) != 1:
        sys.exit(f"measure_eval_settings.py trains one configuration: give --configs one name, not {len(args.configs)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    benchmark_speed.refuse_earlier_output("measure_eval_settings.py", args.output)
    config = args.configs[0]
    torch.manual_seed(args.seed)
    with benchmark_speed.trained(args, config, args.steps) as trainer:
        pipeline = trainer.pipeline
        rows = measure(pipeline)
        beta = float(pipeline.model.density.get_beta().detach())
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    table = format_table(rows, device, config, args.steps, beta)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(table + "\n")
        args.output.with_suffix(".json").write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
