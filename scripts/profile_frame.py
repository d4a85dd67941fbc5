#!/usr/bin/env python
"""Where a viewer frame's time goes: wall-clock seconds per frame at chosen chunk sizes, then the GPU time of each
part of the volume render (``cocoinr_nerfstudio.benchmarks.frame_phases``) and its largest kernels.

A benchmark_speed.py configuration trains for ``--train-steps`` steps through nerfstudio's Trainer (0: the model
at its initialisation, which skips the minutes the training step's compilation takes), then renders a
``--frame-size`` square frame at the pose of a held-out view, as the viewer does.

    python scripts/profile_frame.py --device cuda --train-steps 0 --chunks 8192 32768 --grids 0 128
    python scripts/profile_frame.py --device cuda --train-steps 1500 --chunks 16384 65536 --points-per-pass 524288
    python scripts/profile_frame.py --device cuda --chunks 16384 --beta 0.04 --frames 1 --gaps
    python scripts/profile_frame.py --device cpu --frame-size 24 --frames 1   # smoke (host times)

Options this script does not know are passed on to benchmark_speed.py's parser (``--beta-init``, ``--seed``, ...).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_speed  # a sibling script, not a package

from cocoinr_nerfstudio.benchmarks.frame_phases import FRAME, FRAME_ROWS, REST, frame_work, profile_frames
from cocoinr_nerfstudio.benchmarks.gpu_gaps import format_gaps, profile_gaps
from cocoinr_nerfstudio.benchmarks.step_phases import format_kernels, format_phases
from cocoinr_nerfstudio.models.coco_inr import MIN_GRID_RESOLUTION


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--config",
        default="graph+fields+bf16+sdpa+points+flash+fp16+geo16+split",
        choices=list(benchmark_speed.CONFIGS),
    )
    parser.add_argument("--train-steps", type=int, default=0, help="trainer steps before rendering (0: at init)")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="set the density's beta after training (imitates a later stage: the surface sharper than the geometry)",
    )
    parser.add_argument("--frame-size", type=int, default=None, help="square frame's side (default 512 GPU, 32 CPU)")
    parser.add_argument("--chunks", type=int, nargs="+", default=None, help="rays per chunk to time (default: model's)")
    parser.add_argument(
        "--grids",
        type=int,
        nargs="+",
        default=None,
        help="render-occupancy-resolution values to time (0: no grid; default: the model's); later ones are "
        "compared with the first one's image",
    )
    parser.add_argument(
        "--points-per-pass",
        type=int,
        nargs="+",
        default=None,
        help="render-points-per-pass values to time (points per field pass; default: the model's)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed frames per chunk size (the median is shown)")
    parser.add_argument("--frames", type=int, default=2, help="frames profiled by part (0: none)")
    parser.add_argument("--top-kernels", type=int, default=20, help="largest kernels listed (CUDA; 0: none)")
    parser.add_argument(
        "--gaps",
        action="store_true",
        help="also profile one frame with Python stacks: where the GPU idles, by the code that launched the next "
        "kernel (CUDA; the profiler slows the host, so the gaps are overstated)",
    )
    args, passed_on = parser.parse_known_args(argv)
    if args.frame_size is None:
        args.frame_size = 512 if args.device == "cuda" else 32
    for name in ("train_steps", "frames", "top_kernels"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    counts = [*(args.chunks or ()), *(args.points_per_pass or ())]
    if args.repeats < 1 or args.frame_size < 1 or any(count < 1 for count in counts):
        parser.error("--repeats, --frame-size, --chunks and --points-per-pass must be at least 1")
    if args.beta is not None and not args.beta > 0:
        parser.error(f"--beta must be positive, got {args.beta}")
    if any(grid != 0 and grid < MIN_GRID_RESOLUTION for grid in args.grids or ()):
        parser.error(f"--grids: 0 (no grid) or at least {MIN_GRID_RESOLUTION} cells a side")
    speed = ["--device", args.device, "--configs", args.config, "--steps", "1", "--warmup", "0"]
    return args, benchmark_speed.parse_args(speed + passed_on)


def set_beta(model, beta: float) -> None:
    """Sets the density's beta; the sampler's query precision is checked again at the next render (a smaller
    beta may need float32 queries)."""
    if beta <= model.density.beta_min:
        sys.exit(f"--beta {beta}: the density's beta is at least its beta_min ({model.density.beta_min})")
    with torch.no_grad():
        model.density.beta_param.fill_(beta - model.density.beta_min)
    if model._checks_sampler_precision:
        model._sampler_half = None


def time_frames(model, camera, chunk: int, repeats: int, sync) -> tuple[float, float, float, Tensor]:
    """Seconds of the first render at this chunk size (compilation for new shapes included), the median of
    ``repeats`` more, the GPU memory they peaked at (GiB allocated; nan on a CPU), and the last frame's colours."""
    model.config.eval_num_rays_per_chunk = chunk
    model._render_chunks.clear()  # a size lowered after running out of memory at an earlier chunk size
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        rgb = model.get_outputs_for_camera(camera)["rgb"]
        sync()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return seconds[0], statistics.median(seconds[1:]), peak, rgb


def image_difference(rgb: Tensor, reference: Tensor) -> str:
    """PSNR of ``rgb`` against ``reference`` (dB; inf where equal) and its largest pixel difference."""
    error = (rgb.float() - reference.float()).square().mean()
    psnr = float("inf") if error == 0 else float(-10.0 * torch.log10(error))
    return f"{psnr:.1f} dB, max {float((rgb - reference).abs().max()):.3f}"


def main(argv: list[str] | None = None) -> str:
    args, speed_args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")

    torch.manual_seed(speed_args.seed)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    report: list[str] = []
    with benchmark_speed.trained(speed_args, args.config, args.train_steps) as trainer:
        pipeline = trainer.pipeline
        model = pipeline.model
        model.eval()
        if args.beta is not None:
            set_beta(model, args.beta)
        cameras = pipeline.datamanager.eval_dataset.cameras
        camera = benchmark_speed._frame_camera(cameras, args.frame_size).to(model.device)
        device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        report.append(
            f"Device: {device}; config {args.config}; a {args.frame_size}x{args.frame_size} volume-rendered "
            f"frame after {args.train_steps} training steps (beta {float(model.density.get_beta().detach()):.3g})"
        )
        report += [
            "",
            "| occupancy grid | points per pass | rays per chunk | first frame s | frame s (median) | peak GiB "
            "| image against the first row's |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        reference = None
        settings = [
            (grid, points, chunk)
            for grid in args.grids or [model.config.render_occupancy_resolution]
            for points in args.points_per_pass or [model.config.render_points_per_pass]
            for chunk in args.chunks or [model.config.eval_num_rays_per_chunk]
        ]
        for grid, points, chunk in settings:
            model.config.render_occupancy_resolution = grid
            model.config.render_points_per_pass = points
            first, median, peak, rgb = time_frames(model, camera, chunk, args.repeats, sync)
            reference = rgb if reference is None else reference
            used = model._render_chunks.get("eval-num-rays-per-chunk", chunk)
            size = str(chunk) if used == chunk else f"{chunk} (out of memory: ran at {used})"
            cells = f"{grid}^3" if grid else "none"
            difference = image_difference(rgb, reference)
            row = f"| {cells} | {points} | {size} | {first:.2f} | {median:.3f} | {peak:.2f} | {difference} |"
            report.append(row)
            print(row, flush=True)
        report.append("")
        report.append("Work per frame (the last occupancy grid):")
        work = frame_work(model, camera)
        report.append(
            f"{work.rays} of {work.pixels} rays sampled, in {work.chunks} chunks; {work.sampler_rounds:.2f} sampler "
            f"rounds per sampled ray; {100 * work.visible_share:.1f}% of the final foreground samples pass the "
            "weight threshold."
        )
        if args.frames > 0:
            times = profile_frames(model, camera, args.frames)
            chunk = model._render_chunks.get("eval-num-rays-per-chunk", model.config.eval_num_rays_per_chunk)
            title = f"By part ({args.frames} frames profiled at {chunk} rays a chunk):"
            report += ["", format_phases(times, title, FRAME_ROWS, total=FRAME, unit_of_work="frame")]
            if times.kernels and args.top_kernels > 0:
                listed = sum(row.milliseconds for row in times.kernels[: args.top_kernels])
                whole = times.milliseconds.get(FRAME, 0.0)
                report += [
                    "",
                    f"The frame's {args.top_kernels} largest kernels ({listed:.1f} of its {whole:.1f} GPU kernel "
                    f"ms; '{REST}' is outside every part):",
                    "",
                    format_kernels(times.kernels, args.top_kernels, unit_of_work="frame"),
                ]
        if args.gaps and args.device != "cuda":
            report += ["", "--gaps: needs a GPU (on a CPU nothing runs asynchronously, so nothing waits)"]
        elif args.gaps:
            with torch.no_grad():
                gaps = profile_gaps(lambda: model.get_outputs_for_camera(camera))
            report += ["", "Where the GPU idles (one frame, profiled with Python stacks):", "", format_gaps(gaps)]
    text = "\n".join(report)
    print(text)
    return text


if __name__ == "__main__":
    main()
