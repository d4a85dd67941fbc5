#!/usr/bin/env python
"""Quality at equal steps over several seeds: held-out PSNR and Chamfer per configuration and seed, the means, and
each configuration's difference to the first one, paired by seed and over all runs unpaired.

One run per configuration says little at a few hundred steps: on the generated scene the spread between seeds of one
configuration (up to 0.8 dB of held-out PSNR and 3 Chamfer units in round nine, docs/benchmarks.md) is larger than
the differences between configurations. This runs ``scripts/benchmark_speed.py`` once per (configuration, seed), in
its own process, several at once with ``--parallel`` (runs sharing a GPU are not timings, so no it/s is reported),
and pairs the runs by seed.
A run that fails is reported with the end of its log and left out of the pairs it belongs to, and the script then
exits non-zero. Every run's arguments are checked with benchmark_speed.py's own parser before the first starts.
A run whose mesh has no surface (Chamfer nan; from a sharp ``--beta-init`` the reference's runs fail so as well,
round twenty-five) is counted per configuration and left out of the Chamfer figures only. Each run's row says in
which precision its sampler's queries ran, and from which step in float32 if the precision check switched them.

A seed fixes the initial weights and the batches, but on a GPU two runs of one seed still differ (atomic sums,
nondeterministic kernels) and 600 steps amplify that: in round twenty-six two runs of one seed and configuration
gave 20.12 and 20.89 dB, Chamfer 25.4 and 9.1. Pairing by seed then removes only part of the spread, so the
unpaired difference of all runs' means (Welch's standard error) is printed beside the paired one. ``--repeats N``
runs each (configuration, seed) N times and prints how much runs of one seed spread against all runs. Device calls
are short, so a study is often split over several: ``--merge`` summarises their output folders as one study. With
``--output-dir`` the table and rows are rewritten as each run finishes, so a study stopped from outside (``timeout``'s
SIGTERM at a call's limit) keeps the runs that had finished, and its table says how many of the planned ones.
Runs that went astray (a Chamfer far above the study's median, :data:`ASTRAY_CHAMFER`) are listed apart, with the
step where each one's training loss left its configuration's other runs (from the curves benchmark_speed.py keeps).

    python scripts/benchmark_quality.py --device cuda --configs reference graph+fields+bf16+sdpa \\
        --seeds 1 2 3 --steps 600 --parallel 3 --eval-stride 8 --frame-size 0
    python scripts/benchmark_quality.py --device cpu --configs reference --seeds 1 2 --steps 2 --warmup 1   # smoke
    python scripts/benchmark_quality.py --device cuda --configs reference --seeds 1 2 3 --repeats 2 ...  # same-seed spread
    python scripts/benchmark_quality.py --configs reference recipe --merge call1 call2   # one study from two folders
    python scripts/benchmark_quality.py --device cuda --configs reference recipe --seeds 1 2 3 --steps 600 \
        --schedule-steps 200000 ...   # the original's learning rates at these steps (round thirty-two's studies)

Options this script does not know are passed on to benchmark_speed.py (``--eval-stride``, ``--frame-size``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SPEED_SCRIPT = Path(__file__).resolve().parent / "benchmark_speed.py"
METRICS = ("psnr", "psnr_masked", "chamfer", "final_loss")
CARRIED = (
    "sampler_queries",
    "sampler_refined",
    "refine_budgets",
    "training_curve",
    "accuracy",
    "completeness",
    "mesh_area_ratio",
    "mesh_components",
)
"""What a run's result also says, kept as it is in ``quality.json`` (and through ``--merge``) where the run has it:
the precision of its sampler's queries, the sampler's refinement, its training curve and its surface's Chamfer
halves, area and pieces (what a run that ended far off its seed's others went through, and what it grew)."""


@dataclass
class Run:
    config: str
    seed: int
    log: Path
    output: Path
    repeat: int = 1
    """Which run of this (configuration, seed) it is, from 1 (``--repeats``)."""
    process: subprocess.Popen | None = None
    started: float = 0.0

    @property
    def key(self) -> tuple[str, int, int]:
        return self.config, self.seed, self.repeat

    @property
    def label(self) -> str:
        return f"{self.config}, seed {self.seed}" + (f" (run {self.repeat})" if self.repeat > 1 else "")

    def arguments(self, args: argparse.Namespace, passed_on: list[str]) -> list[str]:
        """benchmark_speed.py's arguments for this run: what this script sets, then what it passes on."""
        own = ["--configs", self.config, "--seed", str(self.seed), "--steps", str(args.steps)]
        return [*own, "--warmup", str(args.warmup), "--output", str(self.output), *passed_on]

    def files(self) -> list[Path]:
        return [self.log, self.output.with_suffix(".json"), self.output.with_suffix(".md")]


def plan(args: argparse.Namespace, folder: Path) -> list[Run]:
    """Every (configuration, seed), ``--repeats`` times, seed by seed so that early pairs complete first. A repeat
    after the first has ``_run<k>`` in its file names."""
    runs = []
    for seed in args.seeds:
        for repeat in range(1, args.repeats + 1):
            for config in args.configs:
                stem = f"{config}_seed{seed}" + (f"_run{repeat}" if repeat > 1 else "")
                runs.append(Run(config, seed, folder / f"{stem}.log", folder / stem, repeat))
    return runs


def check_runs(runs: list[Run], args: argparse.Namespace, passed_on: list[str]) -> None:
    """Parses every run's arguments with benchmark_speed.py's own parser before anything starts: an unknown config
    or option fails now, not in every run, and an option passed on that would override what this script sets
    (``--seed=3``, ``--see 3``, ``--no-e``, ...) is refused."""
    spec = importlib.util.spec_from_file_location("_benchmark_speed_parser", SPEED_SCRIPT)
    speed = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = speed  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(speed)
    finally:
        del sys.modules[spec.name]
    for run in runs:
        parsed = speed.parse_args(run.arguments(args, passed_on))
        own = {
            "configs": [run.config],
            "seed": run.seed,
            "steps": args.steps,
            "warmup": args.warmup,
            "output": run.output,
            "eval": True,
            "mesh": True,
        }
        for name, value in own.items():
            if getattr(parsed, name) != value:
                sys.exit(
                    f"benchmark_quality.py: the options passed on to benchmark_speed.py ({' '.join(passed_on)}) set "
                    f"--{name.replace('_', '-')}, which this script sets for every run; drop it."
                )


def refuse_existing_files(runs: list[Run], folder: Path) -> None:
    """Earlier results in --output-dir are never overwritten."""
    for path in [folder / "quality.md", folder / "quality.json", *(p for run in runs for p in run.files())]:
        if path.exists():
            sys.exit(f"benchmark_quality.py: {path} exists (an earlier study?); choose another --output-dir.")


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample deviation / sqrt(n)); the error is nan below two values. A nan among the
    values makes both nan, so that no failed value is averaged away unsaid (:func:`summarize` takes runs without a
    surface, Chamfer nan, out of Chamfer's figures and counts them)."""
    if not values or any(math.isnan(value) for value in values):
        return math.nan, math.nan
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), error


def _chamfer_mean(rows: list[dict]) -> str:
    """The mean Chamfer of the runs with a surface; how many had none (Chamfer nan) is said, not averaged in."""
    values = [r["chamfer"] for r in rows]
    surfaces = [value for value in values if not math.isnan(value)]
    mean = mean_and_standard_error(surfaces)[0]
    return (
        f"{mean:.2f}"
        if len(surfaces) == len(values)
        else f"{mean:.2f} ({len(values) - len(surfaces)} without a surface)"
    )


def welch_difference(values: list[float], base: list[float]) -> tuple[float, float]:
    """mean(values) - mean(base) and its standard error sqrt(var/n + var_base/n_base) (Welch's), for runs that are
    not paired; the error is nan unless both sides have two values or more."""
    if not values or not base:
        return math.nan, math.nan
    difference = statistics.fmean(values) - statistics.fmean(base)
    if len(values) < 2 or len(base) < 2:
        return difference, math.nan
    return difference, math.sqrt(statistics.variance(values) / len(values) + statistics.variance(base) / len(base))


def within_seed_deviation(groups: list[list[float]]) -> float:
    """The pooled standard deviation of values within their groups (runs of one seed): sqrt(sum of squared
    deviations from each group's mean / sum of (group size - 1)). nan where no group has two values."""
    squares = sum(sum((v - statistics.fmean(g)) ** 2 for v in g) for g in groups if len(g) > 1)
    freedom = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(squares / freedom) if freedom else math.nan


def _surfaces(values: list[float]) -> list[float]:
    return [value for value in values if not math.isnan(value)]


def _stdev(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(
    results: dict[tuple[str, int, int], dict],
    configs: list[str],
    seeds: list[int],
    repeats: int = 1,
    missing: str = "failed",
) -> str:
    """Markdown: one row per run, the means per configuration, with ``repeats`` > 1 the spread of runs of one seed
    against that of all runs, then each configuration minus the first (higher PSNR is better, lower Chamfer is
    better): paired by seed (each seed's mean over its runs, over the seeds where both finished), and unpaired over
    all runs. ``results`` is keyed by (configuration, seed, repeat); a run without a result reads ``missing``. A
    run whose mesh has no surface (Chamfer nan) is counted apart: Chamfer means and differences are over the runs
    with one."""

    def runs(config: str, seed: int | None = None) -> list[dict]:
        return [row for (c, s, _), row in sorted(results.items()) if c == config and seed in (None, s)]

    lines = [
        "| seed | config | held-out PSNR | masked PSNR | Chamfer | final loss | sampler's queries |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for seed in seeds:
        for repeat in range(1, repeats + 1):
            if repeat > 1 and not any((config, seed, repeat) in results for config in configs):
                continue  # merged studies: not every seed was run again
            for config in configs:
                row = results.get((config, seed, repeat))
                cells = (
                    " | ".join(f"{row[m]:.4f}" if m == "final_loss" else f"{row[m]:.2f}" for m in METRICS)
                    + f" | {row.get('sampler_queries', '-')}"
                    if row
                    else f"{missing} | - | - | - | -"
                )
                which = f"{seed}" if repeat == 1 else f"{seed} (run {repeat})"
                lines.append(f"| {which} | {config} | {cells} |")
    for config in configs:
        rows = runs(config)
        psnr, masked = (mean_and_standard_error([r[m] for r in rows])[0] for m in METRICS[:2])
        lines.append(f"| mean of {len(rows)} | {config} | {psnr:.2f} | {masked:.2f} | {_chamfer_mean(rows)} | | |")
    if repeats > 1:
        lines += [
            "",
            "Runs of one seed against all runs: standard deviations. Where the two are alike, a seed does not fix "
            "a run's outcome, and the unpaired differences below are the ones to quote.",
            "",
            "| config | runs | PSNR, all runs | PSNR, runs of one seed | Chamfer, all runs | Chamfer, runs of one seed |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for config in configs:
            by_seed = [runs(config, seed) for seed in seeds]
            psnr = [[r["psnr"] for r in group] for group in by_seed]
            chamfer = [_surfaces([r["chamfer"] for r in group]) for group in by_seed]
            every_psnr, every_chamfer = ([v for group in groups for v in group] for groups in (psnr, chamfer))
            lines.append(
                f"| {config} | {len(every_psnr)} | {_stdev(every_psnr):.2f} | {within_seed_deviation(psnr):.2f} | "
                f"{_stdev(every_chamfer):.2f} | {within_seed_deviation(chamfer):.2f} |"
            )
    studied = {key: row for key, row in results.items() if key[0] in configs}
    astray, median = astray_runs(studied)
    lines += astray_table(studied, astray, median) + early_beta_table(studied, configs, astray)
    base = configs[0]
    lines += [
        "",
        f"Each configuration minus `{base}`: mean (standard error). A positive PSNR difference and a negative Chamfer "
        "difference (world units) are improvements. Paired: by seed, each seed's mean over its runs; Chamfer pairs "
        "are those where both sides have a surface. Unpaired: the means of all runs of each (whichever seeds they "
        "had), Welch's standard error.",
        "",
        "| config | pairs | PSNR difference (dB) | seeds with higher PSNR | Chamfer pairs | Chamfer difference | "
        f"seeds with lower Chamfer | runs without a surface (config / {base}) | PSNR difference, unpaired | "
        "Chamfer difference, unpaired |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]

    def seed_mean(config: str, seed: int, metric: str) -> float:
        values = [r[metric] for r in runs(config, seed)]
        values = _surfaces(values) if metric == "chamfer" else values
        return statistics.fmean(values) if values else math.nan

    for config in configs[1:]:
        paired = [s for s in seeds if runs(config, s) and runs(base, s)]
        psnr = [seed_mean(config, s, "psnr") - seed_mean(base, s, "psnr") for s in paired]
        chamfer = _surfaces([seed_mean(config, s, "chamfer") - seed_mean(base, s, "chamfer") for s in paired])
        (psnr_mean, psnr_error), (chamfer_mean, chamfer_error) = map(mean_and_standard_error, (psnr, chamfer))
        failed = [sum(math.isnan(r["chamfer"]) for s in paired for r in runs(c, s)) for c in (config, base)]
        unpaired = []
        for metric in ("psnr", "chamfer"):
            sides = [[r[metric] for r in runs(c)] for c in (config, base)]
            unpaired.append(welch_difference(*(map(_surfaces, sides) if metric == "chamfer" else sides)))
        lines.append(
            f"| {config} | {len(paired)} | {psnr_mean:+.2f} ({psnr_error:.2f}) | {sum(d > 0 for d in psnr)} | "
            f"{len(chamfer)} | {chamfer_mean:+.2f} ({chamfer_error:.2f}) | {sum(d < 0 for d in chamfer)} | "
            f"{failed[0]} / {failed[1]} | "
            + " | ".join(f"{difference:+.2f} ({error:.2f})" for difference, error in unpaired)
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    # no abbreviations: benchmark_speed.py's --seed must not be taken for this script's --seeds
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--configs", nargs="+", required=True, help="benchmark_speed.py configs; the first is the base")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 1 2 3; with --merge, all found")
    parser.add_argument("--steps", type=int, default=600, help="training steps of every run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (configuration, seed)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (they share the device)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a run may take before it is stopped")
    parser.add_argument("--output-dir", type=Path, default=None, help="logs, per-run results and the table (.md/.json)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: summarise these earlier studies' --output-dir folders as one study",
    )
    args, passed_on = parser.parse_known_args(argv)
    if args.merge is not None and passed_on:
        parser.error(f"--merge runs nothing, so options for benchmark_speed.py ({' '.join(passed_on)}) do not apply")
    if args.merge is not None and (args.repeats, args.parallel, args.timeout) != (1, 1, None):
        parser.error("--merge runs nothing: --repeats, --parallel and --timeout do not apply")
    if args.seeds is None and args.merge is None:
        args.seeds = [1, 2, 3]
    if len(set(args.configs)) != len(args.configs) or len(set(args.seeds or [])) != len(args.seeds or []):
        parser.error("--configs and --seeds must not repeat a value")
    for option in ("parallel", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1 (got {getattr(args, option)})")
    return args, passed_on


MERGED = "merged from"
"""How a merged study's table starts (its first line), where a study that ran starts with its settings."""


def study_settings(folder: Path) -> str:
    """A study's settings: the first line of its ``quality.md`` ("600 steps after 25 warm-up --device cuda ...")."""
    path = folder / "quality.md"
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        sys.exit(f"benchmark_quality.py: --merge {folder}: cannot read {path} ({error.strerror or error}).")
    if not lines or lines[0].startswith(MERGED):
        sys.exit(f"benchmark_quality.py: --merge {folder}: {path} is not the table of a study that ran (merge those).")
    return lines[0]


def merge_studies(
    folders: list[Path], configs: list[str], seeds: list[int] | None
) -> tuple[dict[tuple[str, int, int], dict], list[int], int, str]:
    """The runs of earlier studies (each folder's ``quality.json``) as one study: device calls are short, so a
    study is often split over several. A (configuration, seed) found again is that seed's next repeat. Runs of
    other configurations (and, given ``seeds``, of other seeds) are left out. The studies must have run with the
    same settings, each once (no folder twice, no merged folder). Returns the results, the seeds, the most repeats
    of a seed and the settings."""
    if len({folder.resolve() for folder in folders}) != len(folders):
        sys.exit("benchmark_quality.py: --merge names a folder twice: its runs would count as repeats.")
    settings = {folder: study_settings(folder) for folder in folders}
    if len(set(settings.values())) > 1:
        listed = "; ".join(f"{folder}: {line}" for folder, line in settings.items())
        sys.exit(f"benchmark_quality.py: --merge: the studies ran with different settings ({listed}).")
    results: dict[tuple[str, int, int], dict] = {}
    for folder in folders:
        path = folder / "quality.json"
        try:
            rows = json.loads(path.read_text())
            for row in rows:
                config, seed = row["config"], int(row["seed"])
                if config not in configs or (seeds is not None and seed not in seeds):
                    continue
                repeat = 1 + sum((c, s) == (config, seed) for c, s, _ in results)
                results[(config, seed, repeat)] = _kept(row)
        except (OSError, ValueError, KeyError, TypeError) as error:
            sys.exit(f"benchmark_quality.py: --merge {folder}: cannot read {path} as a study's results ({error!r}).")
    missing = [config for config in configs if not any(c == config for c, _, _ in results)]
    if missing:
        sys.exit(f"benchmark_quality.py: --configs {' '.join(missing)}: no run of it in the --merge folders.")
    found = sorted({seed for _, seed, _ in results})
    return results, seeds if seeds is not None else found, max(r for *_, r in results), settings[folders[0]]


def _kept(row: dict) -> dict:
    """A run's :data:`METRICS` as floats, and what of :data:`CARRIED` it has."""
    return {**{metric: float(row[metric]) for metric in METRICS}, **{key: row[key] for key in CARRIED if key in row}}


ASTRAY_CHAMFER = 1.6
"""A run went astray where its Chamfer is above this multiple of the study's median (over every run with a surface,
of every configuration). From the default beta in rounds twenty-six to thirty-one, the runs that went astray had
1.8-5.3 times the median (held-out PSNR 17.4-20.9 dB), every other run at most 1.5 times. Round thirty-one's curves
show no second mode behind the cut: roughly, the higher a run's beta stayed after its first steps, the higher its
Chamfer (see :data:`EARLY_BETA_STEP`)."""
ASTRAY_LOSS = 1.2
"""An astray run left the others at the first window of its training curve from which its loss stays above this
multiple of the median loss of its configuration's runs that did not go astray."""


def astray_runs(results: dict[tuple[str, int, int], dict]) -> tuple[list[tuple[str, int, int]], float]:
    """The runs that went astray (:data:`ASTRAY_CHAMFER`), in order, and the study's median Chamfer."""
    chamfers = _surfaces([row["chamfer"] for row in results.values()])
    if not chamfers:
        return [], math.nan
    median = statistics.median(chamfers)
    return [key for key, row in sorted(results.items()) if row["chamfer"] > ASTRAY_CHAMFER * median], median


def departure_step(curve: dict[str, list[float]], others: list[dict[str, list[float]]]) -> int | None:
    """The last step of the first window of ``curve`` from which its loss stays above :data:`ASTRAY_LOSS` times the
    median of ``others``' losses at the same window to the end; None where its last window is not above. Windows
    are matched by their step; those no other curve has are skipped."""
    windows = [
        (step, loss, [other["loss"][other["step"].index(step)] for other in others if step in other["step"]])
        for step, loss in zip(curve["step"], curve["loss"], strict=True)
    ]
    above = [(step, loss > ASTRAY_LOSS * statistics.median(losses)) for step, loss, losses in windows if losses]
    departure = None
    for step, is_above in above:
        departure = (departure or step) if is_above else None
    return departure


EARLY_BETA_STEP = 150
"""Where a run's beta stands at this step against its first window tells early whether it may go astray. In round
thirty-one (44 runs from beta 0.1), beta over steps 101-150 was below its mean over steps 1-50 in 36 runs, all of which
ended near the others; it was above it (0.106-0.116) in the seven runs that ended with the highest Chamfers (14-53),
where it stayed above 0.08 to the end, and in one reference run, which then turned and ended near the others (11.1)."""


def beta_rose_early(curve: dict[str, list[float]]) -> bool | None:
    """Whether ``curve``'s beta at the window that ends at :data:`EARLY_BETA_STEP` (the first that ends later, where
    none ends there) is above its first window's; None without beta or without such a window."""
    if "beta" not in curve:
        return None
    late = [index for index, step in enumerate(curve["step"]) if step >= EARLY_BETA_STEP]
    if not late or late[0] == 0:
        return None
    return curve["beta"][late[0]] > curve["beta"][0]


def early_beta_table(
    results: dict[tuple[str, int, int], dict], configs: list[str], astray: list[tuple[str, int, int]]
) -> list[str]:
    """Markdown lines: per configuration (in ``configs``' order), how many runs' beta rose by
    :data:`EARLY_BETA_STEP`, how many of those and of the others went astray (``astray``: :func:`astray_runs`'s),
    and each group's median Chamfer; none where no run kept beta in its curve."""
    rose_by_config = {
        config: {
            key: beta_rose_early(row.get("training_curve", {})) for key, row in results.items() if key[0] == config
        }
        for config in configs
    }
    if all(rose is None for rows in rose_by_config.values() for rose in rows.values()):
        return []
    lines = [
        "",
        f"Beta early: whether a run's beta at step {EARLY_BETA_STEP} was above its first window's (the runs whose "
        "curves kept beta). In round thirty-one, seven of the eight runs whose beta rose ended with the study's "
        "highest Chamfers.",
        "",
        f"| config | runs with beta | beta rose by step {EARLY_BETA_STEP} | astray, of those | astray, of the others "
        "| median Chamfer, rose / fell |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for config, rows in rose_by_config.items():
        rose = [key for key, value in rows.items() if value is True]
        fell = [key for key, value in rows.items() if value is False]
        if not rose and not fell:
            continue
        medians = [_median_chamfer([results[key]["chamfer"] for key in group]) for group in (rose, fell)]
        lines.append(
            f"| {config} | {len(rose) + len(fell)} | {len(rose)} | {sum(key in astray for key in rose)} | "
            f"{sum(key in astray for key in fell)} | {medians[0]} / {medians[1]} |"
        )
    return lines


def _median_chamfer(chamfers: list[float]) -> str:
    surfaces = _surfaces(chamfers)
    return f"{statistics.median(surfaces):.2f}" if surfaces else "-"


def astray_table(
    results: dict[tuple[str, int, int], dict], astray: list[tuple[str, int, int]], median: float
) -> list[str]:
    """Markdown lines on the runs that went astray (``astray`` and the study's ``median`` Chamfer: :func:`astray_runs`'s),
    with when each left its configuration's other runs (where the runs kept training curves); none where no run did."""
    if not astray:
        return []
    lines = [
        "",
        f"Runs astray: {len(astray)} of {len(results)}, each with a Chamfer above {ASTRAY_CHAMFER} times the study's "
        f"median of {median:.2f}. Accuracy: Chamfer's half from the run's surface to the truth (extra surface raises "
        "it); completeness: from the truth to the surface (missing surface raises it). Left the others: the step "
        f"from which its training loss stayed above {ASTRAY_LOSS} times the median of its configuration's other runs.",
        "",
        "| config | seed | held-out PSNR | Chamfer | accuracy / completeness | final loss | rays refined | left the others |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for config, seed, repeat in astray:
        row = results[(config, seed, repeat)]
        others = [
            other["training_curve"]
            for key, other in results.items()
            if key[0] == config and key not in astray and "loss" in other.get("training_curve", {})
        ]
        curve = row.get("training_curve", {})
        if "loss" not in curve or not others:
            left = "no curves"
        else:
            step = departure_step(curve, others)
            left = f"step {step}" if step is not None else "not by its loss"
        refined = f"{100 * row['sampler_refined']:.0f}%" if "sampler_refined" in row else "-"
        halves = f"{row['accuracy']:.2f} / {row['completeness']:.2f}" if "accuracy" in row else "-"
        which = f"{seed}" if repeat == 1 else f"{seed} (run {repeat})"
        lines.append(
            f"| {config} | {which} | {row['psnr']:.2f} | {row['chamfer']:.2f} | {halves} | {row['final_loss']:.4f} | "
            f"{refined} | {left} |"
        )
    return lines


def _start(run: Run, args: argparse.Namespace, passed_on: list[str]) -> None:
    run.started = time.monotonic()
    with run.log.open("w") as log:
        # a session of its own, so that stopping the run also stops the compile workers it started
        command = [sys.executable, str(SPEED_SCRIPT), *run.arguments(args, passed_on)]
        run.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(run: Run, grace: float = 10.0) -> None:
    """SIGINT to the run's process group (it cleans up its temporary folders), SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        if run.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.process.wait(timeout=grace)


def _finish(run: Run, results: dict, done: int, total: int, timed_out: bool) -> bool:
    """Reads a finished run's result; reports a failed one with the end of its log. True if it succeeded."""
    seconds = time.monotonic() - run.started
    label = f"[{done}/{total}] {run.label}"
    json_path = run.output.with_suffix(".json")
    rows = (
        json.loads(json_path.read_text())
        if not timed_out and run.process.returncode == 0 and json_path.exists()
        else []
    )
    if not rows:
        why = (
            "timed out"
            if timed_out
            else f"exit code {run.process.returncode}"
            if run.process.returncode
            else "no result"
        )
        tail = "".join(run.log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        print(f"{label}: failed ({why}, {seconds:.0f} s); log {run.log} ends:\n{tail}", flush=True)
        return False
    results[run.key] = _kept(rows[0])
    print(f"{label}: PSNR {rows[0]['psnr']:.2f}, Chamfer {rows[0]['chamfer']:.3f} ({seconds:.0f} s)", flush=True)
    return True


def run_all(
    runs: list[Run],
    args: argparse.Namespace,
    passed_on: list[str],
    on_result: Callable[[dict[tuple[str, int, int], dict[str, float]]], None] = lambda results: None,
) -> tuple[dict[tuple[str, int, int], dict[str, float]], int]:
    """Runs at most ``--parallel`` at once; returns the results and the number of runs that failed. ``on_result``
    gets the results so far each time a run succeeds."""
    pending, running, results, done, failed = list(runs), [], {}, 0, 0
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                run = pending.pop(0)
                _start(run, args, passed_on)
                running.append(run)
            time.sleep(0.5)
            for run in list(running):
                finished = run.process.poll() is not None
                timed_out = not finished and args.timeout is not None and time.monotonic() - run.started > args.timeout
                if not (finished or timed_out):
                    continue
                if timed_out:
                    _stop(run)
                running.remove(run)
                done += 1
                if _finish(run, results, done, len(runs), timed_out):
                    on_result(results)
                else:
                    failed += 1
    finally:  # Ctrl-C and the signals below reach only this process: the runs have sessions of their own
        for run in running:
            _stop(run)
    return results, failed


def _exit_on(signum: int, _frame) -> None:
    sys.exit(128 + signum)  # unwinds through run_all's finally, which stops the runs


def merge(args: argparse.Namespace) -> str:
    """--merge: the earlier studies' summary, written to --output-dir if given (never over an earlier one)."""
    results, seeds, repeats, settings = merge_studies(args.merge, args.configs, args.seeds)
    summary = summarize(results, args.configs, seeds, repeats, "not run")
    table = f"{MERGED} {' '.join(map(str, args.merge))}: {settings}\n\n{summary}"
    print(table)
    if args.output_dir is not None:
        refuse_existing_files([], args.output_dir)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "quality.md").write_text(table + "\n")
        rows = [{"config": c, "seed": s, "repeat": r, **metrics} for (c, s, r), metrics in results.items()]
        (args.output_dir / "quality.json").write_text(json.dumps(rows, indent=2))
    return table


def write_study(folder: Path, runs: list[Run], results: dict, table: str) -> None:
    """The study's table (``quality.md``) and rows in the order of ``runs`` (``quality.json``), each replaced whole:
    a signal that stops the study while it writes leaves the previous version, never half of one."""
    order = {run.key: index for index, run in enumerate(runs)}
    rows = [
        {"config": c, "seed": s, "repeat": r, **metrics}
        for (c, s, r), metrics in sorted(results.items(), key=lambda item: order[item[0]])
    ]
    for name, text in (("quality.json", json.dumps(rows, indent=2)), ("quality.md", table + "\n")):
        partial = folder / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, folder / name)


def main(argv: list[str] | None = None) -> str:
    args, passed_on = parse_args(argv)
    if args.merge is not None:
        return merge(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.output_dir if args.output_dir is not None else Path(tmp)
        runs = plan(args, folder)
        check_runs(runs, args, passed_on)
        refuse_existing_files(runs, folder)
        folder.mkdir(parents=True, exist_ok=True)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _exit_on)
        print(f"{len(runs)} run(s) of {args.steps} steps, {args.parallel} at once; logs in {folder}", flush=True)
        settings = " ".join([f"{args.steps} steps after {args.warmup} warm-up", *passed_on])

        def table_of(results: dict, finished: bool) -> str:
            if finished:
                return f"{settings}\n\n{summarize(results, args.configs, args.seeds, args.repeats)}"
            summary = summarize(results, args.configs, args.seeds, args.repeats, "not finished")
            return (
                f"{settings}\n\n{summary}\n\n{len(results)} of the {len(runs)} planned runs had finished when this "
                "was written: the study was stopped, or is still running."
            )

        def write(results: dict, finished: bool) -> None:
            if args.output_dir is not None:
                write_study(folder, runs, results, table_of(results, finished))

        results, failed = run_all(runs, args, passed_on, on_result=lambda results: write(results, finished=False))
        table = table_of(results, finished=True)
        print(table)
        write(results, finished=True)
    if failed:
        sys.exit(f"benchmark_quality.py: {failed} of {len(runs)} runs failed (their logs are named above).")
    return table


if __name__ == "__main__":
    main()
