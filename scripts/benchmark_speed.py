#!/usr/bin/env python
"""Training speed of coco-inr: iterations/s, peak memory and quality at equal steps, per configuration.

Every configuration trains from scratch through nerfstudio's own Trainer on the same generated scene
(the project's embedded default scene), then is evaluated on held-out views (PSNR) and by its mesh
(Chamfer against the scene's ground truth, world units). ``reference`` is our model configured like
the original implementation with every speed-up off; the ratio column is relative to it. Configurations whose name
ends in ``+adam1`` step Adam with the one-launch kernel (``multi_tensor_kernel``); the others with torch's fused
Adam, as the figures of earlier rounds did. The results (``--output``, .json) also keep each run's training curve
(``--curve-every``) and its surface's Chamfer halves, area and pieces: what tells a run gone astray apart.

    python scripts/benchmark_speed.py --device cuda --steps 300            # GPU: the table for the docs
    python scripts/benchmark_speed.py --device cpu --steps 3 --rays 64     # anywhere: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.engine.callbacks import TrainingCallbackLocation
from nerfstudio.engine.trainer import TrainerConfig

from cocoinr_nerfstudio.data.scene_generator import generate_scene
from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings
from cocoinr_nerfstudio.mesh.evaluation import mesh_distances
from cocoinr_nerfstudio.mesh.extraction import NoSurfaceError, extract_mesh, transform_mesh
from cocoinr_nerfstudio.method_configs import coco_inr
from cocoinr_nerfstudio.models.coco_inr import CocoInrModelConfig


def _reference(model: CocoInrModelConfig) -> None:
    """The original's behaviour: prototypes on every call, explicit attention, batch-level sampler (and, in
    _trainer_config, torch's default for-each Adam)."""
    model.cache_prototypes = False
    model.fused_prototype_attention = False
    model.sdf_field.coordinate_attention.fused = False
    model.background_field.coordinate_attention.fused = False
    model.sdf_field.coordinate_attention.block_diagonal = False  # one batched product per head
    model.background_field.coordinate_attention.block_diagonal = False
    model.per_ray_convergence = False
    model.batched_bisection = False
    model.eval_weight_threshold = 0.0


def _default(model: CocoInrModelConfig) -> None:
    """The shipped defaults: speed-ups that keep float32 and the sampler's error bound (prototype cache, fused
    attention, batched bisection, per-ray convergence). Per-ray convergence is not exact: each ray's final samples
    come from the round its own bound was met, not from the denser set of the round the whole batch was done."""


def _tf32(model: CocoInrModelConfig) -> None:
    model.tf32_matmul = True


def _bf16(model: CocoInrModelConfig) -> None:
    """bf16 sampler queries and colour heads (the SDF, its gradient and the losses stay fp32)."""
    model.sampler_autocast = "bfloat16"
    model.bf16_color_heads = True


def _fast(model: CocoInrModelConfig) -> None:
    """Every approximate lever too: TF32, bf16 sampler queries and colour heads, negligible samples skipped."""
    model.tf32_matmul = True
    _bf16(model)
    model.train_weight_threshold = 1e-4


def _graph(model: CocoInrModelConfig) -> None:
    """TF32 and the whole training step replayed as a CUDA graph (static-shape sampler)."""
    model.tf32_matmul = True
    model.cuda_graph = True


def _graph_bf16(model: CocoInrModelConfig) -> None:
    """The CUDA graph with bf16 sampler queries and colour heads (every sample still evaluated)."""
    _graph(model)
    _bf16(model)


def _graph_compiled(model: CocoInrModelConfig) -> None:
    """The CUDA graph with the sampler's beta search compiled (fused elementwise kernels)."""
    _graph(model)
    model.compile_sampler = True


def _graph_hash(model: CocoInrModelConfig) -> None:
    """The CUDA graph (with the compiled beta search) and hash-grid features added to the SDF MLP's input."""
    _graph_compiled(model)
    model.sdf_field.use_hash_grid = True


def _graph_budget(model: CocoInrModelConfig) -> None:
    """The CUDA graph (compiled beta search) with the sampler's rounds 2.. on a quarter of the rays."""
    _graph_compiled(model)
    model.static_refine_budget = 0.25


def _graph_auto(model: CocoInrModelConfig) -> None:
    """The CUDA graph (compiled beta search) with the refine budget sized from the observed demand."""
    _graph_compiled(model)
    model.static_refine_budget = "auto"


def _graph_fields(model: CocoInrModelConfig) -> None:
    """graph+auto with the fields compiled (torch.compile; the SDF gradient by torch.func.grad)."""
    _graph_auto(model)
    model.compile_fields = True


def _graph_budget_fields(model: CocoInrModelConfig) -> None:
    """graph+budget (a fixed quarter of the rays refined) with the fields compiled."""
    _graph_budget(model)
    model.compile_fields = True


def _graph_fields_bf16(model: CocoInrModelConfig) -> None:
    """graph+fields with bf16 sampler queries and colour heads."""
    _graph_fields(model)
    _bf16(model)


def _graph_fields_bf16_explicit(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16 with explicit (not fused) attention to the codebook."""
    _graph_fields_bf16(model)
    model.fused_prototype_attention = False


def _graph_fields_bf16_unpadded(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16 with the fields' matrix products at their own widths (round eight's A/B)."""
    _graph_fields_bf16(model)
    model.pad_matmuls = False


def _graph_fields_bf16_sdpa(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16 with fused (flash, in bf16) coordinate attention where nothing is differentiated: the
    sampler's SDF queries."""
    _graph_fields_bf16(model)
    _fused_without_grad(model)


def _graph_fields_bf16_sdpa_points(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa with the point-attention kernels in every differentiated coordinate attention
    (``coco-inr-fast`` of rounds ten to sixteen)."""
    _graph_fields_bf16_sdpa(model)
    model.sdf_field.coordinate_attention.point_kernels = True
    model.background_field.coordinate_attention.point_kernels = True


def _graph_fields_bf16_sdpa_points_flash(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points with the bf16 heads' attention (differentiated once) through torch's flash
    kernels, as sequences of points (flash-first-order)."""
    _graph_fields_bf16_sdpa_points(model)
    model.sdf_field.coordinate_attention.flash_first_order = True
    model.background_field.coordinate_attention.flash_first_order = True


def _graph_fields_bf16_sdpa_points_fp16(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points with the sampler's queries in float16 instead of bf16: the same speed on
    tensor cores, a tenth of the SDF error, so they stay in half precision to a 10x smaller beta."""
    _graph_fields_bf16_sdpa_points(model)
    model.sampler_autocast = "float16"


def _graph_fields_bf16_sdpa_points_flash_fp16(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash with the sampler's queries in float16 (kept to a 10x smaller beta than
    bfloat16's). The model of the ``coco-inr-fast`` method until round twenty-one (docs/benchmarks.md)."""
    _graph_fields_bf16_sdpa_points_flash(model)
    model.sampler_autocast = "float16"


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry16(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash+fp16 with the geometry head trained in float16 (its gradients scaled).
    The model of the ``coco-inr-fast`` method until round twenty-two (docs/benchmarks.md)."""
    _graph_fields_bf16_sdpa_points_flash_fp16(model)
    model.geometry_autocast = "float16"


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry_bf16(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash+fp16 with the geometry head trained in bfloat16."""
    _graph_fields_bf16_sdpa_points_flash_fp16(model)
    model.geometry_autocast = "bfloat16"


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash+fp16+geo16 with each layer norm's backward pass as row and column kernels
    (``--pipeline.model.mix-order-reduction False``). The model of the ``coco-inr-fast`` method (a test checks they
    agree)."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16(model)
    model.mix_order_reduction = False


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_follow(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash+fp16+geo16+split with training's sampler queries kept in float16, the
    geometry head's precision, when the precision check switches renders' queries to float32
    (``--pipeline.model.training-queries-follow-geometry True``, experimental)."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model)
    model.training_queries_follow_geometry = True


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_hold(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash+fp16+geo16+split with a sampler round shrunk only after four low checks
    in a row (``--pipeline.model.refine-budget-shrink-checks 4``): fewer graph captures late in training."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model)
    model.refine_budget_shrink_checks = 4


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_color32(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash+fp16+geo16+split with the colour heads and the background field in
    float32 (TF32 products; ``--pipeline.model.bf16-color-heads False``): what bfloat16 colour costs in quality."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model)
    model.bf16_color_heads = False


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_batch(model: CocoInrModelConfig) -> None:
    """graph+fields+bf16+sdpa+points+flash+fp16+geo16+split with the original's batch-level sampler convergence
    (``--pipeline.model.per-ray-convergence False``): every ray upsampled until all rays of the batch meet their
    bound, so every ray's final samples come from the densest set, as the reference's do. Fixed shapes then need
    every ray in every round (refine budget 1). Round twenty-seven's suspect for the defaults' 0.3 dB lower PSNR;
    round twenty-eight cleared it (as far below the reference over 18 seeds)."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model)
    model.per_ray_convergence = False
    model.static_refine_budget = 1.0


def _graph_fields_bf16_sdpa_points_flash_fp16_split(model: CocoInrModelConfig) -> None:
    """The defaults with the geometry head trained in float32 (no ``+geo16``). Round twenty-eight traced the defaults'
    0.26 dB lower PSNR at 600 steps to their half precisions (``graph+fields`` matches the reference); this and the
    next two configs each leave one of them out of the defaults."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model)
    model.geometry_autocast = "none"


def _graph_fields_bf16_sdpa_points_fp16_geometry16_split(model: CocoInrModelConfig) -> None:
    """The defaults without ``flash``: the bf16 heads' attention (differentiated once) through the point kernels
    instead of torch's flash kernels."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model)
    model.sdf_field.coordinate_attention.flash_first_order = False
    model.background_field.coordinate_attention.flash_first_order = False


def _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_queries32(model: CocoInrModelConfig) -> None:
    """The defaults with the sampler's SDF queries in float32 (``--pipeline.model.sampler-autocast none``): samples
    placed as ``graph+fields`` places them."""
    _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split(model)
    model.sampler_autocast = "none"


def _graph_fields_points(model: CocoInrModelConfig) -> None:
    """graph+fields (no bf16) with the point-attention kernels in every differentiated coordinate attention."""
    _graph_fields(model)
    model.sdf_field.coordinate_attention.point_kernels = True
    model.background_field.coordinate_attention.point_kernels = True


def _fused_without_grad(model: CocoInrModelConfig) -> None:
    model.sdf_field.coordinate_attention.fused_without_grad = True
    model.background_field.coordinate_attention.fused_without_grad = True


def _default_sdpa(model: CocoInrModelConfig) -> None:
    """The defaults with fused (in float32: memory-efficient) coordinate attention where nothing is differentiated."""
    _fused_without_grad(model)


def _graph_sdpa(model: CocoInrModelConfig) -> None:
    """graph with fused coordinate attention where nothing is differentiated (float32 sampler queries)."""
    _graph(model)
    _fused_without_grad(model)


def _fast_compiled(model: CocoInrModelConfig) -> None:
    _fast(model)
    model.compile_sampler = True


CONFIGS: dict[str, Callable[[CocoInrModelConfig], None]] = {
    "reference": _reference,
    "default": _default,
    "tf32": _tf32,
    "fast": _fast,
    "fast+compile": _fast_compiled,
    "graph": _graph,
    "graph+bf16": _graph_bf16,
    "graph+compile": _graph_compiled,
    "graph+hash": _graph_hash,
    "graph+budget": _graph_budget,
    "graph+auto": _graph_auto,
    "graph+fields": _graph_fields,
    "graph+budget+fields": _graph_budget_fields,
    "graph+fields+bf16": _graph_fields_bf16,
    "graph+fields+bf16+explicit": _graph_fields_bf16_explicit,
    "graph+fields+bf16+unpadded": _graph_fields_bf16_unpadded,
    "graph+fields+bf16+sdpa": _graph_fields_bf16_sdpa,
    "graph+fields+bf16+sdpa+points": _graph_fields_bf16_sdpa_points,
    "graph+fields+bf16+sdpa+points+flash": _graph_fields_bf16_sdpa_points_flash,
    "graph+fields+bf16+sdpa+points+fp16": _graph_fields_bf16_sdpa_points_fp16,
    "graph+fields+bf16+sdpa+points+flash+fp16": _graph_fields_bf16_sdpa_points_flash_fp16,
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16": _graph_fields_bf16_sdpa_points_flash_fp16_geometry16,
    "graph+fields+bf16+sdpa+points+flash+fp16+geobf16": _graph_fields_bf16_sdpa_points_flash_fp16_geometry_bf16,
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split": _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split,
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+adam1": (
        _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split
    ),
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+follow+adam1": (
        _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_follow
    ),
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+hold4+adam1": (
        _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_hold
    ),
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+color32+adam1": (
        _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_color32
    ),
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+batch+adam1": (
        _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_batch
    ),
    "graph+fields+bf16+sdpa+points+flash+fp16+split+adam1": _graph_fields_bf16_sdpa_points_flash_fp16_split,
    "graph+fields+bf16+sdpa+points+fp16+geo16+split+adam1": _graph_fields_bf16_sdpa_points_fp16_geometry16_split,
    "graph+fields+bf16+sdpa+points+flash+fp16+geo16+split+q32+adam1": (
        _graph_fields_bf16_sdpa_points_flash_fp16_geometry16_split_queries32
    ),
    "graph+fields+points": _graph_fields_points,
    "default+sdpa": _default_sdpa,
    "graph+sdpa": _graph_sdpa,
}


def _shrink(model: CocoInrModelConfig) -> None:
    """--tiny: the same code paths with small widths, for CPU smoke runs."""
    model.codebook_attention = CodebookAttentionSettings(num_latents=16, latent_dim=32, depth=1, ff_mult=2)
    model.sdf_field.geometry_hidden_dims = (64, 64)
    model.sdf_field.feature_dim = 32
    model.background_field.hidden_dims = (64,)
    model.background_field.feature_dim = 32
    model.num_samples, model.num_samples_eval, model.num_samples_extra = 16, 32, 8
    model.num_samples_outside = 8


@dataclass
class Result:
    name: str
    device: str
    iters_per_sec: float
    ms_per_step: float
    peak_memory_gib: float
    """Peak allocated GPU memory over the whole run: warm-up (compilation, graph capture) and timed steps."""
    timed_peak_memory_gib: float
    """Peak over the timed steps alone: what training holds once compilation and capture are done."""
    psnr: float
    psnr_masked: float
    chamfer: float
    frame_seconds: float
    frame_surface_seconds: float
    final_loss: float
    sampler_refined: float
    """Share of rays that got more than the sampler's first round (mean over the timed steps)."""
    sampler_truncated: float
    """Share of rays that needed another round but were cut off by the graph's refine budget (mean)."""
    refine_budgets: tuple[float, ...]
    """Share of rays each of the sampler's rounds 2.. ran on at the end (1 each without a budget)."""
    sampler_queries: str = "float32"
    """The precision of training's sampler queries: float32, a half precision throughout, or one until the
    precision check's step that turned them float32 (a run's quality depends on it)."""
    accuracy: float = float("nan")
    """Chamfer's half from the extracted surface to the true one (extra surface raises it; :func:`surface_metrics`)."""
    completeness: float = float("nan")
    """Chamfer's half from the true surface to the extracted one (missing surface raises it)."""
    mesh_area_ratio: float = float("nan")
    """The extracted surface's area over the true one's."""
    mesh_components: int = 0
    """Connected pieces of the extracted surface (0: none found, or no mesh extracted)."""
    training_curve: dict[str, list[float]] = field(default_factory=dict, repr=False)
    """Means over each window of ``--curve-every`` steps (warm-up included) of the loss and of the training metrics
    that tell a run gone astray (:func:`training_curve`): where and how a run that ends far off its seed's others
    left them."""


def _trainer_config(args, scene: Path, name: str, output_dir: Path) -> TrainerConfig:
    config = copy.deepcopy(coco_inr.config)
    config.output_dir = output_dir
    config.experiment_name = "benchmark"
    config.timestamp = name
    config.vis = "tensorboard"
    config.machine.device_type = args.device
    config.machine.seed = args.seed
    # the learning rates' decay length (CocoTrainer), not where the run stops: this script runs its own steps
    config.max_num_iterations = args.steps + args.warmup if args.schedule_steps is None else args.schedule_steps
    config.steps_per_save = 10**9
    config.save_only_latest_checkpoint = True
    datamanager = config.pipeline.datamanager
    datamanager.train_num_rays_per_batch = args.rays
    datamanager.eval_num_rays_per_batch = args.rays
    datamanager.dataparser.data = scene
    datamanager.dataparser.num_views = args.train_views
    datamanager.dataparser.eval_stride = args.eval_stride
    datamanager.batches_on_device = not args.host_batches
    model = config.pipeline.model
    if args.codebook is not None:
        model.codebook_path = args.codebook
    else:
        model.codebook_source = "random"
        model.random_codebook_shape = tuple(args.codebook_shape)
    if args.tiny:
        _shrink(model)
    if args.eval_chunk is not None:
        model.eval_num_rays_per_chunk = args.eval_chunk
    CONFIGS[name](model)
    for group in config.optimizers.values():
        # torch's fused Adam unless the name asks for the one-launch kernel: the figures of earlier rounds used it
        group["optimizer"].multi_tensor_kernel = name.endswith("+adam1")
        if name == "reference":
            group["optimizer"].fused = False
    if args.beta_init is not None:
        model.beta_init = args.beta_init
    if args.refine_budget is not None and model.cuda_graph and model.per_ray_convergence:  # only these budget rounds
        model.static_refine_budget = args.refine_budget
    return config


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _frame_camera(reference: Cameras, size: int) -> Cameras:
    """A size x size pinhole camera at the pose of a held-out view (what the viewer renders)."""
    focal = float(reference.fx[0, 0]) * size / float(reference.width[0, 0])
    return Cameras(
        camera_to_worlds=reference.camera_to_worlds[:1],
        fx=focal,
        fy=focal,
        cx=size / 2.0,
        cy=size / 2.0,
        width=size,
        height=size,
        camera_type=CameraType.PERSPECTIVE,
    )


NO_SURFACE = {"chamfer": float("nan"), "accuracy": float("nan"), "completeness": float("nan"),
              "mesh_area_ratio": float("nan"), "mesh_components": 0}  # fmt: skip
""":func:`surface_metrics` of a model whose SDF has no zero level in the extraction grid."""


def surface_metrics(pipeline, gt_mesh: Path, resolution: int, device: str) -> dict[str, float]:
    """The extracted surface against the scene's true one, in world units: Chamfer and its two halves (accuracy,
    from the surface to the truth: extra surface raises it; completeness, from the truth to the surface: missing
    surface raises it), the surface's area over the truth's and its count of connected pieces. The halves, area and
    pieces tell a run that grew surface where there is none from one that lost some (:data:`NO_SURFACE` where no
    surface was found)."""
    import trimesh

    model = pipeline.model
    model.eval()
    try:
        with torch.no_grad():
            mesh = extract_mesh(
                lambda x: model.field.forward_geonetwork(x)[:, 0],
                resolution=resolution,
                device=device,
                show_progress=False,
            )
    except NoSurfaceError:
        return dict(NO_SURFACE)
    finally:
        model.train()
    scale_mat = np.asarray(pipeline.datamanager.train_dataparser_outputs.metadata["scale_mat"], dtype=np.float64)
    mesh, truth = transform_mesh(mesh, scale_mat), trimesh.load(gt_mesh)
    distances = mesh_distances(mesh, truth)
    pieces = trimesh.graph.connected_components(mesh.face_adjacency, nodes=np.arange(len(mesh.faces)))
    return {
        "chamfer": float(distances.chamfer),
        "accuracy": float(distances.accuracy),
        "completeness": float(distances.completeness),
        "mesh_area_ratio": float(mesh.area / truth.area),
        "mesh_components": len(pieces),
    }


def _profile(trainer, first_step: int, num_steps: int, device: str) -> None:
    """Prints where a step's time goes (top operators), to direct optimisation work."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for step in range(first_step, first_step + num_steps):
            trainer.train_iteration(step)
        _sync(device)
    sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=50), flush=True)


def _trace_memory(step: int, peaks: list[int]) -> None:
    """Prints the steps that raise peak GPU memory by more than 16 MiB, and what stays allocated after them
    (memory a captured graph or its re-captures keep shows as a rising 'allocated')."""
    peak = torch.cuda.max_memory_allocated()
    if peak > peaks[0] + 2**24:
        print(
            f"  step {step}: peak {peaks[0] / 2**30:.3f} -> {peak / 2**30:.3f} GiB, "
            f"allocated after the step {torch.cuda.memory_allocated() / 2**30:.3f} GiB",
            flush=True,
        )
        peaks[0] = peak


def scene_or_generated(args, folder: Path, mesh_resolution: int) -> Path:
    """``--scene``, or the project's generated scene (``--scene-size``, ground-truth mesh at ``mesh_resolution``)
    written into ``folder``."""
    if args.scene is not None:
        return args.scene
    views, width, height = args.scene_size
    scene = folder / "scene"
    generate_scene(scene, num_views=views, width=width, height=height, mesh_resolution=mesh_resolution)
    return scene


def train_step(trainer, step: int):
    """One training step as ``ns-train`` runs it: the callbacks (the sampler's refine budget and precision checks,
    schedulers) before and after ``train_iteration``, whose (loss, loss_dict, metrics) it returns."""
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    outputs = trainer.train_iteration(step)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    return outputs


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """nerfstudio's event writers and the float32 matmul precision as they were before the block: a trainer set up
    in it adds writers that log into its (often temporary) folder, and its model may set TF32 process-wide."""
    from nerfstudio.utils import writer  # not at the top: imported before nerfstudio's configs, it is circular

    writers_before = list(writer.EVENT_WRITERS)
    precision_before = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision_before)
        writer.EVENT_WRITERS[:] = writers_before


@contextlib.contextmanager
def trained(args, name: str, steps: int) -> Iterator[Any]:
    """A Trainer of configuration ``name`` set up in a temporary folder (on ``args.scene``, or a scene generated
    there) and trained ``steps`` steps as ``ns-train`` runs them: what the profiling scripts start from. Afterwards
    the folder is gone, and the process-wide state the trainer changed is as before (:func:`process_state_kept`)."""
    with tempfile.TemporaryDirectory() as tmp, process_state_kept():
        folder = Path(tmp)
        scene = scene_or_generated(args, folder, mesh_resolution=32)
        trainer = _trainer_config(args, scene, name, folder / "outputs").setup(local_rank=0, world_size=1)
        trainer.setup()
        for step in range(steps):  # with the callbacks: they adapt the sampler's refine budget and check bf16
            train_step(trainer, step)
        yield trainer


CURVE_METRICS = ("psnr", "beta", "eikonal", "sampler_refined")
"""Training metrics in a run's curve besides the loss. In round thirty, the runs that ended far below their seed's
others (held-out PSNR 18-20.5 dB, Chamfer 20-60) had nearly every ray needing the sampler's second round at the
end, where the others had a quarter: the curve shows when that began, and what beta and the eikonal term did."""


def training_curve(steps: list[dict[str, float]], every: int) -> dict[str, list[float]]:
    """Window means of each step's values (``loss`` and :data:`CURVE_METRICS`, the keys the steps have): ``step``
    lists each window's last step, 1-based; a last, shorter window keeps the steps left over. A metric missing at
    some step (the eikonal term of an eager step without one) is averaged over the steps that have it, nan where
    none does."""
    if every < 1:
        raise ValueError(f"the curve's window must be at least one step, got {every}")
    keys = [key for key in ("loss", *CURVE_METRICS) if any(key in values for values in steps)]
    curve: dict[str, list[float]] = {"step": [], **{key: [] for key in keys}}
    for start in range(0, len(steps), every):
        window = steps[start : start + every]
        curve["step"].append(start + len(window))
        for key in keys:
            values = [values[key] for values in window if key in values]
            curve[key].append(float(np.mean(values)) if values else float("nan"))
    return curve


def run_config(args, scene: Path, name: str, output_dir: Path) -> Result:
    torch.manual_seed(args.seed)
    config = _trainer_config(args, scene, name, output_dir)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    device = trainer.device
    durations: list[float] = []
    losses: list = []  # tensors during the run, floats after it
    curve_metrics: list[dict] = []  # likewise: each step's CURVE_METRICS, read after the run
    sampler_shares: dict[str, list] = {"sampler_refined": [], "sampler_truncated": []}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    peaks = [0]  # --trace-memory: the peak at the last step that raised it
    warmup_peak = 0
    # the host synchronises once every sync_every steps, as ns-train (which never waits per step; with tensorboard
    # it waits every 10) lets the host prepare step n + 1 while the GPU runs step n; each step of a block counts as
    # the block's mean
    sync_every = 1 if args.trace_memory else max(1, args.sync_every)
    block_start, block_steps = 0.0, 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            if device.startswith("cuda"):
                warmup_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            block_start, block_steps = time.perf_counter(), 0
        loss, _, metrics = train_step(trainer, step)
        if args.trace_memory and device.startswith("cuda"):
            _sync(device)
            _trace_memory(step, peaks)
        losses.append(loss.detach())  # read after the run: a float() here would wait for the GPU every step
        curve_metrics.append({key: metrics[key] for key in CURVE_METRICS if key in metrics})
        if step >= args.warmup:
            for key, values in sampler_shares.items():
                values.append(metrics[key])
            block_steps += 1
            if block_steps == sync_every or step == args.warmup + args.steps - 1:
                _sync(device)
                now = time.perf_counter()
                durations.extend([(now - block_start) / block_steps] * block_steps)
                block_start, block_steps = now, 0
    losses = [float(value) for value in losses]
    curve_steps = [
        {"loss": loss, **{key: float(value) for key, value in values.items()}}
        for loss, values in zip(losses, curve_metrics, strict=True)
    ]
    sampler_shares = {key: [float(value) for value in values] for key, values in sampler_shares.items()}
    timed_peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    peak = max(warmup_peak / 2**30, timed_peak) if device.startswith("cuda") else float("nan")
    if args.profile > 0:
        _profile(trainer, args.warmup + args.steps, args.profile, device)
    pipeline = trainer.pipeline
    metrics = pipeline.get_average_eval_image_metrics() if args.eval else {}
    surface = (
        surface_metrics(pipeline, scene / "gt_mesh.ply", args.mesh_resolution, device) if args.mesh else NO_SURFACE
    )
    frame_seconds = {"volume": float("nan"), "surface": float("nan")}
    if args.frame_size > 0:
        camera = _frame_camera(pipeline.datamanager.eval_dataset.cameras, args.frame_size).to(device)
        model = pipeline.model
        model.eval()
        for mode in frame_seconds:
            with model.surface_rendering() if mode == "surface" else contextlib.nullcontext():
                model.get_outputs_for_camera(camera)  # warm-up
                _sync(device)
                start = time.perf_counter()
                model.get_outputs_for_camera(camera)
                _sync(device)
                frame_seconds[mode] = time.perf_counter() - start
        model.train()
    median = statistics.median(durations)
    return Result(
        name=name,
        device=torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
        iters_per_sec=1.0 / median,
        ms_per_step=1000.0 * median,
        peak_memory_gib=peak,
        timed_peak_memory_gib=timed_peak,
        psnr=float(metrics.get("psnr", float("nan"))),
        psnr_masked=float(metrics.get("psnr_masked", float("nan"))),
        chamfer=surface["chamfer"],
        frame_seconds=frame_seconds["volume"],
        frame_surface_seconds=frame_seconds["surface"],
        final_loss=float(np.mean(losses[-10:])),
        sampler_refined=float(np.mean(sampler_shares["sampler_refined"])),
        sampler_truncated=float(np.mean(sampler_shares["sampler_truncated"])),
        refine_budgets=pipeline.model.sampler.refine_budgets if pipeline.model.sampler.static_shapes else (1.0,),
        sampler_queries=sampler_query_precision(pipeline.model),
        training_curve=training_curve(curve_steps, args.curve_every),
        **{key: surface[key] for key in ("accuracy", "completeness", "mesh_area_ratio", "mesh_components")},
    )


def refuse_earlier_output(script: str, output: Path | None) -> None:
    """Exits, naming the file, where ``output``'s table (.md) or rows (.json) already exist: a later run must not
    overwrite an earlier one's results (``--output`` of the scripts that write both)."""
    if output is None:
        return
    for path in (output.with_suffix(".md"), output.with_suffix(".json")):
        if path.exists():
            sys.exit(f"{script}: {path} exists (an earlier run?); choose another --output.")


def sampler_query_precision(model) -> str:
    """``Result.sampler_queries`` of a trained model: float32, a half precision throughout, or the half precision
    and each of the precision check's switches ("float16, float32 from step 50, float16 again from step 100")."""
    half, switches = model.config.sampler_autocast, model.training_query_switches
    if half == "none":
        return "float32"
    if not switches:
        return f"{half} throughout"
    changes = [
        f"{half} again from step {step}" if to_half else f"float32 from step {step}" for step, to_half in switches
    ]
    return ", ".join([half, *changes])


def format_table(results: list[Result], args) -> str:
    reference = next((r for r in results if r.name == "reference"), None)
    lines = [
        f"Device: {results[0].device}; {args.rays} rays/step; {args.steps} timed steps after {args.warmup} warm-up; "
        f"codebook {'file ' + str(args.codebook) if args.codebook else 'random ' + 'x'.join(map(str, args.codebook_shape))}; "
        f"{args.train_views} training views{'; tiny model' if args.tiny else ''}; "
        f"{'' if args.schedule_steps is None else f'learning rates decay over {args.schedule_steps} steps; '}"
        f"host synchronised every {1 if args.trace_memory else max(1, args.sync_every)} steps"
        f"{'; batches drawn on the host' if args.host_batches else ''}",
        "",
        f"| config | it/s | ms/step | x reference | peak GiB (timed steps) | held-out PSNR | masked PSNR | Chamfer | "
        f"{args.frame_size}px frame s (volume / surface) | loss | rays refined / cut % | rounds 2.. on % of rays | "
        "sampler's queries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r.iters_per_sec / reference.iters_per_sec if reference else float("nan")
        lines.append(
            f"| {r.name} | {r.iters_per_sec:.2f} | {r.ms_per_step:.1f} | {ratio:.2f} | {r.peak_memory_gib:.2f} ({r.timed_peak_memory_gib:.2f}) | "
            f"{r.psnr:.2f} | {r.psnr_masked:.2f} | {r.chamfer:.3f} | {r.frame_seconds:.2f} / {r.frame_surface_seconds:.2f} | "
            f"{r.final_loss:.4f} | {100 * r.sampler_refined:.1f} / {100 * r.sampler_truncated:.1f} | "
            f"{' / '.join(f'{100 * share:.0f}' for share in r.refine_budgets)} | {r.sampler_queries} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 20 on GPU, 1 on CPU)")
    parser.add_argument("--rays", type=int, default=1024)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--codebook", type=Path, default=None, help="real codebook file; default: random (shape below)")
    parser.add_argument("--codebook-shape", type=int, nargs=2, default=None, help="default 16384 256 (CPU: 1024 256)")
    parser.add_argument("--scene", type=Path, default=None, help="IDR scene; default: generate one")
    parser.add_argument("--scene-size", type=int, nargs=3, default=None, metavar=("VIEWS", "W", "H"))
    parser.add_argument("--train-views", type=int, default=8)
    parser.add_argument(
        "--eval-stride", type=int, default=None, help="every n-th held-out view (default 4 GPU, 40 CPU)"
    )
    parser.add_argument("--no-eval", dest="eval", action="store_false")
    parser.add_argument("--no-mesh", dest="mesh", action="store_false")
    parser.add_argument("--mesh-resolution", type=int, default=256)
    parser.add_argument("--frame-size", type=int, default=None, help="viewer frame to time (default 512 GPU, 0 CPU)")
    parser.add_argument(
        "--beta-init", type=float, default=None, help="start from a sharper density, as late in training (0.1)"
    )
    parser.add_argument(
        "--refine-budget",
        type=float,
        default=None,
        help="pin the sampler's rounds 2.. to this share of the rays in configs that budget them (CUDA-graph ones "
        "with per-ray convergence; the recipe's is auto): A/Bs at equal work, whatever each run's trajectory asks for",
    )
    parser.add_argument("--eval-chunk", type=int, default=None, help="rays per chunk when rendering (model default)")
    parser.add_argument("--tiny", action="store_true", default=None, help="shrink the model (default on CPU)")
    parser.add_argument("--full-model", dest="tiny", action="store_false", help="the paper's model even on CPU")
    parser.add_argument("--profile", type=int, default=0, help="also profile this many steps per config (top ops)")
    parser.add_argument(
        "--trace-memory", action="store_true", help="print each step that raises peak GPU memory (CUDA only)"
    )
    parser.add_argument(
        "--sync-every",
        type=int,
        default=10,
        help="timed steps between two host-GPU synchronisations: 10 as ns-train --vis tensorboard or wandb (their "
        "loss logging reads the GPU every 10 steps; with the default viewer ns-train waits only for the sampler's "
        "checks, every 50-200 steps: benchmark_training_loop.py times the real loop); 1: every step, as rounds one "
        "to six measured",
    )
    parser.add_argument(
        "--host-batches",
        action="store_true",
        help="draw training batches on the host (nerfstudio's path) instead of on the GPU",
    )
    parser.add_argument(
        "--curve-every",
        type=int,
        default=50,
        help="steps per window of the training curve in the results (.json): the loss, training PSNR, beta, the "
        "eikonal term and the share of rays refined, averaged over each window",
    )
    parser.add_argument(
        "--schedule-steps",
        type=int,
        default=None,
        help="steps over which the learning rates decay to a tenth (default: the run, warm-up included). The "
        "original decays over its 200,000, so at its step 600 the rates are still 99%% of their start, where a "
        "600-step run's have fallen to a tenth; beta falls by about the learning rate a step (Adam), so a run whose "
        "beta turns late cannot catch up within a run-length decay (docs/benchmarks.md, round thirty-one). Use 200000 to "
        "compare configurations at the original's defaults: round thirty-two's 600-step runs found the defaults equal "
        "to the reference so (+0.25 dB), where a run-length decay had put them 0.2 dB lower",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", type=Path, default=None, help="also write the table (.md) and results (.json)")
    args = parser.parse_args(argv)
    if args.curve_every < 1:
        parser.error(f"--curve-every must be at least 1, got {args.curve_every}")
    if args.schedule_steps is not None and args.schedule_steps < 1:
        parser.error(f"--schedule-steps must be at least 1, got {args.schedule_steps}")
    if args.refine_budget is not None and not 0.0 < args.refine_budget <= 1.0:
        parser.error(f"--refine-budget must be a share of the rays in (0, 1], got {args.refine_budget}")
    gpu = args.device == "cuda"
    if args.warmup is None:
        args.warmup = 20 if gpu else 1
    if args.eval_stride is None:
        args.eval_stride = 4 if gpu else 40
    if args.frame_size is None:
        args.frame_size = 512 if gpu else 0
    if args.tiny is None:
        args.tiny = not gpu
    if args.codebook_shape is None:
        args.codebook_shape = [16384, 256] if gpu else [1024, 256]
    if args.scene_size is None:
        args.scene_size = [49, 400, 300] if gpu else [49, 48, 36]
    if not gpu:
        args.mesh_resolution = min(args.mesh_resolution, 48)
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    refuse_earlier_output("benchmark_speed.py", args.output)
    with tempfile.TemporaryDirectory() as tmp:
        scene = scene_or_generated(args, Path(tmp), mesh_resolution=128)
        results = []
        for name in args.configs:
            try:
                results.append(run_config(args, scene, name, Path(tmp) / "outputs"))
            except Exception:  # one broken lever must not cost the other measurements
                traceback.print_exc()
                continue
            finally:
                torch.set_float32_matmul_precision("highest")  # tf32 is process-wide: reset between configs
                torch._dynamo.reset()  # compiled code of the previous model would count against recompile limits
            print(f"{name}: {results[-1]}", flush=True)
    table = format_table(results, args)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(table + "\n")
        args.output.with_suffix(".json").write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
