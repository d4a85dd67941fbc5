"""Where a rendered frame's GPU time goes, by part of the model: the viewer's volume render, profiled.

The frame is rendered as the viewer renders it (``get_outputs_for_camera``, chunk by chunk, no gradients but the
SDF's at the samples that are seen) with a ``record_function`` range around the whole frame and around each part.
The parts are the occupancy grid that bounds where rays are sampled (``render_occupancy_resolution``), the sampler,
the foreground field at the final samples (its SDF everywhere; the SDF's gradient and the colour head only where the
weights matter, see ``eval_weight_threshold``) and the background field; what is left of the frame (chunking, the
rays' bounds in the grid, compositing, copies) is its own row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from cocoinr_nerfstudio.benchmarks.step_phases import (
    PREFIX,
    SAMPLES_GRADIENT,
    PhaseTimes,
    kernels_by_launcher,
    phase_ranges,
    replaced_methods,
    sum_by_range,
)

FRAME, REST = "frame", "the rest (chunking, ray bounds, compositing, copies)"
GRID = "occupancy grid (the SDF on a grid)"
SAMPLER, FOREGROUND, VISIBLE, COLOUR, BACKGROUND = (
    "sampler (SDF queries, beta search)",
    "foreground field at the samples",
    "gradient and colour where the weights matter",
    "colour head",
    "background field",
)

FRAME_PARTS: tuple[tuple[str, str, str, int], ...] = (
    # (label, attribute of the model holding the method ("" = the model), method, nesting depth in the table)
    (GRID, "", "_render_occupancy_grid", 1),
    (SAMPLER, "sampler", "generate_ray_samples", 1),
    (FOREGROUND, "", "_forward_visible_samples", 1),
    (VISIBLE, "field", "get_outputs", 2),
    (SAMPLES_GRADIENT, "field", "sdf_and_gradient", 3),
    (COLOUR, "field", "get_colors", 3),
    (BACKGROUND, "", "_render_background", 1),
)
"""The render's parts that get a range. The SDF at every final sample is the foreground row less its gradient
and colour row. With ``eval_weight_threshold`` 0 the foreground row is empty and the field's own row is the one
at depth 2."""

FRAME_ROWS: tuple[tuple[str, int], ...] = (
    *((label, depth) for label, _, _, depth in FRAME_PARTS),
    (REST, 1),
    (FRAME, 0),
)


def _top_level(per_frame: dict[str, float]) -> tuple[str, ...]:
    """The parts that do not nest in one another: the foreground row, or (with ``eval_weight_threshold`` 0, where
    the render calls the field directly) the field's own row."""
    return (GRID, SAMPLER, FOREGROUND if FOREGROUND in per_frame else VISIBLE, BACKGROUND)


@dataclass
class FrameWork:
    """How much a frame asks of the model: what explains a part's time besides its kernels' speed."""

    pixels: int
    rays: int
    """Rays that reached the sampler: those the occupancy grid did not rule out."""
    chunks: int
    """Chunks that reached the sampler."""
    sampler_rounds: float
    """Mean rounds of the error-bounded sampler per ray (1 = converged after the uniform samples)."""
    visible_share: float
    """Share of the final foreground samples whose weight passes ``eval_weight_threshold``."""


def profile_frames(model: Any, camera: Any, num_frames: int, warmup: int = 1) -> PhaseTimes:
    """Per-frame time of each part over ``num_frames`` renders after ``warmup`` untimed ones (the first compiles
    what the render's shapes need). On CUDA, kernel time; elsewhere the host's wall time inside each range."""
    cuda = next(model.parameters()).device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), phase_ranges(model, FRAME_PARTS):
        for _ in range(warmup):
            model.get_outputs_for_camera(camera)
        sync()
        with profile(activities=activities, record_shapes=cuda) as prof:
            for _ in range(num_frames):
                with record_function(PREFIX + FRAME):
                    model.get_outputs_for_camera(camera)
            sync()
    events = prof.events()
    totals, kernels = sum_by_range(events, cuda)
    per_frame = {label: microseconds / num_frames / 1000.0 for label, microseconds in totals.items()}
    if cuda:
        per_frame[FRAME] = kernels / num_frames / 1000.0
    per_frame[REST] = per_frame.get(FRAME, 0.0) - sum(per_frame.get(label, 0.0) for label in _top_level(per_frame))
    if not cuda:
        return PhaseTimes(per_frame, "host ms")
    return PhaseTimes(per_frame, "GPU kernel ms", frame_kernels(events, num_frames))


def frame_kernels(events: Any, num_frames: int) -> list[Any]:
    """Every kernel's time per frame by part and launcher (``kernels_by_launcher``). The frame's own range holds
    every part, so it is left out: kernels launched outside the parts belong to the rest, not to "frame"."""
    in_parts = [event for event in events if event.name != PREFIX + FRAME]
    return kernels_by_launcher(in_parts, num_frames, outside=REST)


def frame_work(model: Any, camera: Any) -> FrameWork:
    """Renders one frame while counting the rays sampled, the sampler's rounds per ray and the foreground samples
    the weight threshold lets through (wrapping the two methods that know, for this one render)."""
    counts = {"rays": 0, "rounds": 0.0, "samples": 0, "visible": 0, "chunks": 0}
    sampler, threshold = model.sampler, model.config.eval_weight_threshold
    generate, forward_visible = sampler.generate_ray_samples, model._forward_visible_samples

    def counted_generate(*args: Any, **kwargs: Any) -> Any:
        ray_samples, info = generate(*args, **kwargs)
        counts["chunks"] += 1
        counts["rays"] += int(info.num_rounds.numel())
        counts["rounds"] += float(info.num_rounds.float().sum())
        return ray_samples, info

    def counted_forward(ray_samples: Any, weight_threshold: float) -> Any:
        outputs, weights, bg_transmittance = forward_visible(ray_samples, weight_threshold)
        counts["samples"] += int(weights.numel())
        counts["visible"] += int((weights > weight_threshold).sum())
        return outputs, weights, bg_transmittance

    replacements = [
        (sampler, "generate_ray_samples", counted_generate),
        (model, "_forward_visible_samples", counted_forward),
    ]
    with torch.no_grad(), replaced_methods(replacements):
        model.get_outputs_for_camera(camera)
    samples = counts["samples"]
    return FrameWork(
        pixels=int(camera.width[0, 0]) * int(camera.height[0, 0]),
        rays=counts["rays"],
        chunks=counts["chunks"],
        sampler_rounds=counts["rounds"] / max(counts["rays"], 1),
        visible_share=counts["visible"] / samples if samples and threshold > 0 else 1.0,
    )
