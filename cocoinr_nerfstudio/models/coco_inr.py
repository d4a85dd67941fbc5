"""CoCo-INR: a VolSDF surface model whose fields read a frozen codebook prior through attention."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import tyro
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.model_components.losses import L1Loss
from nerfstudio.model_components.renderers import RGBRenderer
from nerfstudio.model_components.scene_colliders import SphereCollider
from nerfstudio.models.base_model import Model
from nerfstudio.models.base_surface_model import SurfaceModel, SurfaceModelConfig
from nerfstudio.utils import colormaps
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor
from torch.nn import Parameter

from cocoinr_nerfstudio.codebook import CodebookError, load_codebook, locate_codebook, random_codebook
from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings, PrototypeBank
from cocoinr_nerfstudio.fields.background_field import CocoBackgroundField, CocoBackgroundFieldConfig
from cocoinr_nerfstudio.fields.coco_field import CocoField, CocoFieldConfig
from cocoinr_nerfstudio.model_components.background import (
    background_weights,
    inverted_sphere_points,
    inverted_sphere_samples,
)
from cocoinr_nerfstudio.model_components.density import LaplaceDensity
from cocoinr_nerfstudio.model_components.error_bounded_sampler import ErrorBoundedSampler
from cocoinr_nerfstudio.model_components.extra_state import decode_extra_state, encode_extra_state
from cocoinr_nerfstudio.model_components.host_reads import DeferredRead
from cocoinr_nerfstudio.model_components.image_metrics import OptionalLPIPS, batch_psnr, masked_psnr
from cocoinr_nerfstudio.model_components.mask_split import split_mask
from cocoinr_nerfstudio.model_components.occupancy_grid import OccupancyGrid
from cocoinr_nerfstudio.model_components.refine_budget import AdaptiveRefineBudget
from cocoinr_nerfstudio.model_components.sampler_precision import (
    HALF_DTYPES,
    MIN_SURFACE_POINTS,
    OVERFLOW_CHORDS,
    OVERFLOW_INTERVALS,
    overflows_on_device,
    probe_points,
    rounding_is_safe,
    surface_rounding_error_on_device,
)
from cocoinr_nerfstudio.model_components.sphere_tracing import sphere_trace
from cocoinr_nerfstudio.model_components.volume_rendering import volume_weights
from cocoinr_nerfstudio.torch_compat import OutOfMemoryError
from cocoinr_nerfstudio.viewer.panel import MethodPanel

PRIOR_HEADS = ("geometry", "color", "background_density", "background_color")
DEFAULT_SCENE_RADIUS = 3.0  # VolSDF's bounding sphere in the normalised frame
REFINE_BUDGET_INTERVAL = 50  # steps between adaptations of the sampler's refine budget (``auto``)
SAMPLER_PRECISION_INTERVAL = 50  # steps between checks that half-precision sampler queries are still accurate enough
SAMPLER_PRECISION_RELAXED_INTERVAL = 200  # ... while the error was below half its limit (beta would have to halve)
GEOMETRY_OVERFLOW_INTERVAL = 50  # steps between checks that the float16 geometry head's backward pass did not overflow
SAMPLER_PRECISION_LEAD = 25
"""Steps between the sampler-precision probe's launch and its read (the check). Halfway between the checks that
read the GPU every 50 steps, the host is well ahead of the GPU: the probe's eager queries then queue behind steps
already launched instead of leaving the GPU idle, and by the check their results have long arrived."""
MIN_RENDER_CHUNK = 256  # rays: the smallest chunk a render that runs out of GPU memory falls back to
GRID_COST_SHARE = 8  # a render's occupancy grid queries at most 1/8 of the points of the sampler's first round
MIN_GRID_RESOLUTION = 8  # cells a side: a coarser grid would skip little, so small images go without one


@dataclass
class CocoInrModelConfig(SurfaceModelConfig):
    """CoCo-INR. Method defaults are the original implementation's DTU values; the exact speed-ups on by default
    (prototype cache, fused attention, per-ray convergence, batched beta search, the rendering shortcut) change
    sample positions or renders only within the tolerances their tests state."""

    _target: type = field(default_factory=lambda: CocoInrModel)
    codebook_path: Path | None = None
    """Prior codebook: a taming-transformers VQGAN checkpoint, its extracted codebook, a .pt/.pth tensor or a
    .npy. Default: ./ckpts/model_16384x256_codebook.ckpt, then ~/.cache/cocoinr/model_16384x256_codebook.ckpt."""
    codebook_dim: int = 256
    """Width of the codebook's entries (VQGAN: 256). A file of another width is refused with a hint; known up
    front so that ns-eval / ns-export can rebuild the model from a checkpoint when the codebook file is gone."""
    codebook_source: Literal["file", "random"] = "file"
    """``random``: the prior-free ablation (a seeded N(0,1) codebook instead of VQGAN's)."""
    random_codebook_shape: tuple[int, int] = (16384, 256)
    """Shape of the random ablation codebook."""
    random_codebook_seed: int = 0
    """Seed of the random ablation codebook (reloading rebuilds the same one)."""
    use_codebook_prior: bool = True
    """Build the codebook prior at all (off: the ``volsdf`` baseline, no attention anywhere)."""
    codebook_attention: CodebookAttentionSettings = field(default_factory=CodebookAttentionSettings)
    """Codebook attention (prototype extractor) shape, one module per head."""
    fused_prototype_attention: bool = True
    """Use torch's fused attention kernels to compute prototypes."""
    cache_prototypes: bool = True
    """Compute prototypes once per training step and once per rendered frame (the original: on every call)."""
    tf32_matmul: bool = False
    """Allow TensorFloat-32 matrix products on Ampere+ GPUs (sets torch's float32 matmul precision to 'high',
    process-wide)."""
    sampler_autocast: Literal["none", "bfloat16", "float16"] = "none"
    """Run the error-bounded sampler's SDF queries in half precision (they only place samples; the rendered SDF,
    its gradient and every loss stay float32) while ``sampler-autocast-max-error`` allows. float16 errs about 10x
    less than bfloat16 at the same speed, so it stays on to a 10x sharper surface; bfloat16 cannot overflow."""
    sampler_autocast_max_error: float = 0.25
    """With sampler-autocast: the largest SDF error of the half-precision queries, as a share of the density's
    beta, at which the sampler keeps them (an error of 0.25 beta scales the terms of its error bound by at most
    exp(0.25) = 1.28). The bound trusts the SDF, and beta shrinks as the surface sharpens (from 0.1 toward 1e-3)
    while the rounding error does not (99th percentile at the geometric init: about 3e-3 in bfloat16, 3.5e-4 in
    float16). Checked before a run's first training step, then every 50 steps (every 200 while the error is below
    half this limit: beta would have to halve to break it; a check costs about 50 ms on an H200) and before a
    loaded model's first render: the 99th percentile of |half - float32| where 1024 fixed chords through the
    scene's ball first cross the surface (the field run eagerly: compiled code, which does not round between fused
    operations, should err no more). Once too large, or if a query overflows there or anywhere along the chords
    (float16 past 65504), the queries run in float32 for the rest of the process. While fewer than 64 chords cross
    the surface (none has formed yet, or it has collapsed) the error cannot be measured: they run in float32 until a
    check measures it. inf: half precision throughout, never checked (see also
    training-queries-follow-geometry)."""
    training_queries_follow_geometry: bool = False
    """Experimental. Where geometry-autocast is sampler-autocast's precision, keep training's sampler queries in it
    when the precision check switches renders' queries to float32 (an overflow still switches both): training
    renders the SDF that precision computes. It spares the switch's CUDA-graph capture and the float32 queries'
    cost (ns-train's loop, late in training: 55.3 it/s instead of 48.4 on an H200), but its quality is not shown
    equal: with the switch at the first step, one run of six collapsed (docs/benchmarks.md, round twenty-three).
    False: training's queries switch with renders'."""
    sdf_field: CocoFieldConfig = field(default_factory=CocoFieldConfig)  # type: ignore[assignment]
    """Foreground SDF and colour field."""
    background_field: CocoBackgroundFieldConfig = field(default_factory=CocoBackgroundFieldConfig)
    """NeRF++ background field."""
    background_model: Literal["nerf++", "none"] = "nerf++"  # type: ignore[assignment]
    """Background beyond the bounding sphere: NeRF++ inverted sphere, or none (black)."""
    scene_radius: float | None = None
    """Bounding sphere of the foreground in the normalised frame; the background lives outside it.
    Default: the data's (idr-data --scene-radius, 3.0 as VolSDF), or 3.0 for other dataparsers."""
    near_plane: float = 0.0
    """In training, rays start at max(near_plane, entry into the bounding sphere); renders start at the entry
    (nerfstudio's SphereCollider)."""
    beta_init: float = 0.1
    """Initial Laplace scale beta of the density."""
    beta_min: float = 1e-4
    """Lower bound added to |beta|."""
    num_samples: int = 64
    """Error-bounded sampler: final samples drawn from the converged weights."""
    num_samples_eval: int = 128
    """Error-bounded sampler: initial uniform samples, and samples added per round."""
    num_samples_extra: int = 32
    """Error-bounded sampler: extra samples kept from the dense set."""
    error_bound_eps: float = 0.1
    """Error-bounded sampler: target bound on the opacity error."""
    beta_iters: int = 10
    """Error-bounded sampler: bisection steps on beta per round."""
    max_total_iters: int = 5
    """Error-bounded sampler: rounds of Algorithm 1 at most."""
    add_tiny: float = 1e-6
    """Error-bounded sampler: floor added to the upsampling pdf."""
    per_ray_convergence: bool = True
    """Error-bounded sampler: stop upsampling each ray once its bound is met (the original waits for all rays)."""
    batched_bisection: bool = True
    """Error-bounded sampler: test 15 betas per level instead of halving one at a time (same or finer precision)."""
    compile_sampler: bool = False
    """Error-bounded sampler: torch.compile its beta search (GPU; the first steps pay the compilation). With
    cuda_graph, also each round but its SDF queries: far fewer kernel launches a round. A backend that cannot
    compile is reported and the sampler runs eagerly."""
    compile_fields: bool = False
    """torch.compile the foreground field (geometry with and without its gradient, colour head), the background
    field and the per-step prototypes (with cache_prototypes): fused kernels, far fewer launches (GPU). The SDF's
    gradient is then computed by ``torch.func.grad``, so the compiled graph is differentiated once (torch.compile
    has no double backward). The first steps pay the compilation (minutes: see the README); the first change of
    shape or of grad mode (the first evaluation) compiles again, after which shapes are dynamic. A backend that cannot compile is
    reported and its parts run eagerly."""
    pad_matmuls: bool = True
    """With compile_fields and inductor: pad the widths of the fields' matrix products to the tensor-core
    alignment (zeros; the 39-, 257-, 283- and 289-wide layers otherwise run on slow unaligned GEMM kernels). Same
    results up to the order of float sums. Measured with tf32_matmul and the bf16 options (3-5% faster); plain
    fp32 products (tf32_matmul off) are padded too, unmeasured."""
    mix_order_reduction: bool = True
    """With compile_fields and inductor (torch >= 2.10): let inductor fuse each layer norm's backward pass into one
    kernel over rows and columns at once (its default). Off: a kernel over rows and split reductions over columns.
    On an H200 the fused kernel of the colour head's [99328, 289] layer norm took 0.65 ms; off, that family of
    kernels took 1.58 ms of the step instead of 2.10, +1.6% a step (docs/benchmarks.md, round twenty-two). Same
    arithmetic up to the order of float sums."""
    compile_backend: str = "inductor"
    """torch.compile backend of compile_fields and of compile_sampler's rounds (``aot_eager`` traces and
    differentiates without generating kernels: for debugging and CPU tests)."""
    sampler_chunk_size: int = 1 << 18
    """Points per SDF query inside the sampler (bounds memory: explicit attention holds 4 KiB of scores per point;
    queries run without autograd)."""
    num_samples_outside: int = 32
    """Background samples per ray, uniform in inverse radius."""
    eikonal_loss_mult: float = 0.1
    """Weight of the eikonal loss."""
    fg_mask_loss_mult: float = 0.0
    """Weight of a BCE loss between foreground opacity and the object mask (needs masks; off as in the paper)."""
    eval_num_rays_per_chunk: int = 65536
    """Rays per chunk when rendering whole images (volume mode). Large chunks mean fewer, larger kernel launches and
    fewer waits for the GPU per frame; the fields' memory is bounded by ``render_points_per_pass`` instead, the
    sampler's grows with the chunk. A 512x512 ``coco-inr-fast`` frame (1500-step model, beta 0.046, H200) took
    0.99 s and 4.6 GiB at 65536 rays, 1.14 s and 4.1 GiB at 16384 (docs/benchmarks.md, round fifteen). A render
    that runs out of GPU memory halves it and retries, and says so."""
    render_points_per_pass: int = 1 << 19
    """Points per field pass in whole-image renders: the SDF at every final sample, its gradient and the colour at
    the visible ones, and the background field's samples. It bounds those passes' memory whatever the ray chunk
    (the gradient pass keeps its activations for the backward). Training passes are never split."""
    # SurfaceModel/Model options this model does not use (or that would be wrong here: its depth prior compares
    # z-depth while our depth is ray distance): kept for nerfstudio, hidden from the command line
    far_plane: tyro.conf.Suppress[float] = 4.0
    far_plane_bg: tyro.conf.Suppress[float] = 1000.0
    background_color: tyro.conf.Suppress[Literal["random", "last_sample", "white", "black"]] = "black"
    use_average_appearance_embedding: tyro.conf.Suppress[bool] = False
    mono_depth_loss_mult: tyro.conf.Suppress[float] = 0.0
    periodic_tvl_mult: tyro.conf.Suppress[float] = 0.0
    overwrite_near_far_plane: tyro.conf.Suppress[bool] = False
    enable_collider: tyro.conf.Suppress[bool] = False  # our SphereCollider is set in populate_modules
    collider_params: tyro.conf.Suppress[dict[str, float] | None] = None
    loss_coefficients: tyro.conf.Suppress[dict[str, float]] = field(default_factory=dict)
    prompt: tyro.conf.Suppress[str | None] = None

    def __post_init__(self) -> None:
        # config.yml must still lead ns-eval / ns-export / ns-viewer to the codebook from another folder
        if self.codebook_path is not None:
            self.codebook_path = Path(self.codebook_path).expanduser().absolute()

    eval_weight_threshold: float = 1e-4
    """When rendering (not training), samples whose weight is below this skip the SDF gradient and the colour
    head, and rays whose light reaching the background is below it skip the background field; either would change
    a pixel by at most that weight (summed). 0 evaluates every sample."""
    train_weight_threshold: float = 0.0
    """In training, samples whose weight is below this skip the (twice-differentiated) SDF gradient and the
    colour head; their colour counts as 0. Every sample's SDF, hence density and transmittance, keeps its
    gradient. 0 evaluates every sample, as the original. It changes training, not only cost: the rendered
    colour's derivative by a sample's weight is that sample's colour, which skipping zeroes. It is refused with
    cuda_graph (a fixed-count form measured slower there: docs/benchmarks.md)."""
    render_occupancy_resolution: int = 128
    """Whole-image renders in volume mode (viewer, ns-eval, ns-render) first evaluate the SDF on a grid of up to this
    many cells a side over the bounding cube, and sample each ray only where it passes cells that may come near the
    surface (or lie inside the object); a ray that meets none skips the foreground. The band kept around the
    surface is where the density still adds ``eval-weight-threshold`` of optical depth along the longest ray, so
    skipping changes a pixel by about that much, as long as the SDF varies no faster than the grid sees (its
    steepest slope between cells widens the band). The sampler then spends its samples on the part of the ray that
    matters; a skipped ray's depth is its far bound. Small images get a coarser grid (its queries stay within an
    eighth of the sampler's first round), none below 8 cells a side. 0 (or an eval-weight-threshold of 0) samples
    every ray from the bounding sphere's entry to its exit."""
    preview_trace_steps: int = 64
    """Sphere-tracing steps of the viewer's fast ``surface`` render mode."""
    preview_background_samples: int = 8
    """Background samples per ray in the viewer's fast ``surface`` render mode."""
    preview_num_rays_per_chunk: int = 1 << 16
    """Rays per chunk in the ``surface`` render mode: a traced ray holds one point at a time, so chunks can be
    large, and few chunks mean few kernel launches."""
    bf16_color_heads: bool = False
    """Run the colour heads and the background field under bfloat16 autocast. The SDF, its gradient, the
    density and the losses stay float32 (see geometry-autocast)."""
    geometry_autocast: Literal["none", "float16", "bfloat16"] = "none"
    """Train the geometry head (its coordinate attention, the SDF MLP and the SDF's gradient, where the losses
    differentiate them) under this autocast; their outputs, the density and the losses stay float32. float16 keeps
    10 mantissa bits, as the TF32 products of ``tf32-matmul`` already round to, and needs geometry-gradient-scale
    for its range; bfloat16 keeps 7. Evaluation, mesh extraction, the viewer and the sampler (see sampler-autocast)
    query the float32 SDF."""
    geometry_gradient_scale: float = 1024.0
    """With geometry-autocast: the gradients reaching the geometry head are multiplied by this power of two inside
    it, and divided again at its parameters and prototypes, so that per-point gradients of losses averaged over
    ~100k samples do not flush to zero in float16 (without it, a tenth of the gradients' norm is lost at the paper's
    initialisation; scripts/measure_geometry_gradients.py). Entries that overflow instead are dropped (zeroed, never
    passed to the optimizer); every 50 steps the model checks for them and halves the scale, with a message."""
    cuda_graph: bool = False
    """Capture the training step (sampler, fields, losses, backward) once as a CUDA graph and replay it every
    step: the step is bound by kernel launches, not arithmetic. Switches the sampler to fixed shapes (every ray
    runs every round; each keeps the samples of the round its bound was met, as with per-ray convergence).
    Needs train_weight_threshold 0 (refused otherwise). Without one CUDA device, or with mixed precision, the
    gradient scaler, --log-gradients or gradient accumulation, training runs eagerly with a message."""
    static_refine_budget: float | Literal["auto"] = 1.0
    """With cuda_graph: the share of each batch's rays that the sampler's rounds 2.. run on (a graph needs a fixed
    count), rays still refining first. 1 = every ray, exact. Where the object covers a fifth of the image, about a
    fifth of the rays need a second round, so 0.25 makes those rounds 4x cheaper; a ray that needs one and finds no
    place keeps its first-round samples (drawn at the larger beta that meets the error bound). ``auto`` starts at 1
    and every 50 steps compares each round's own budget with the highest share of rays that needed that round +
    25% + 1/32: a round above its budget grows to its demand + 50% + 1/32, one whose demand + 50% + 1/32 is 1/8
    below shrinks to that, others hold; never above the round before (the graph is captured again when they
    change): far fewer rays need rounds 4 and 5 than round 2, and a ray cut off before a later round keeps the
    samples of its last one. It applies whenever cuda_graph is set,
    also when training falls back to eager steps. Training logs the share of rays that got more than one round
    (``sampler_refined``), that needed a round but were cut off (``sampler_truncated``) and round 2's budget
    (``sampler_budget``). Needs per_ray_convergence."""
    refine_budget_shrink_checks: int = 1
    """With static-refine-budget auto: a round shrinks only once this many checks in a row (50 steps apart) found it
    shrinkable, and then to the largest of their targets; 1 shrinks at the first. Each change is a graph capture
    (0.2-0.34 s on an H200). Late in training the last round's demand swings between about 8% and 21% of the rays
    from one check to the next, and 26-40 captures came in 13,000 steps, most of them that round shrinking and
    growing back (docs/benchmarks.md, round twenty-four). Above 1 not yet timed."""


def _capturing() -> bool:
    """Whether this thread's CUDA stream is capturing a graph (host reads would break the capture)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CocoInrModel(SurfaceModel):
    """VolSDF (Laplace density, error-bounded sampling, NeRF++ background) + CoCo codebook prior."""

    config: CocoInrModelConfig

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``copy.deepcopy``) leave out what belongs to this process's threads and viewer: the render
        threads' surface override and occupancy grid (thread-local) and the viewer panel (its elements hold the viser
        server); the copy gets a fresh, unattached panel."""
        threads = ("_surface_override", "_frame_grid")
        state = {key: value for key, value in super().__getstate__().items() if key not in threads}
        state["_modules"] = {name: module for name, module in state["_modules"].items() if name != "viewer_panel"}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._surface_override = threading.local()
        self._frame_grid = threading.local()
        self.viewer_panel = MethodPanel(self)

    def populate_modules(self) -> None:
        # SurfaceModel.populate_modules builds nerfstudio's tiny-cuda-nn SDFField: skip it, keep the base setup
        Model.populate_modules(self)
        self.prior: PrototypeBank | None = None
        self._codebook_from_checkpoint = False
        if self.config.use_codebook_prior:
            self.prior = PrototypeBank(
                self._load_codebook(),
                heads=PRIOR_HEADS if self.config.background_model != "none" else PRIOR_HEADS[:2],
                settings=self.config.codebook_attention,
                fused_attention=self.config.fused_prototype_attention,
                cache=self.config.cache_prototypes,
            )
            self.prior.awaiting_checkpoint = self._codebook_from_checkpoint
        source = self.prior.get if self.prior is not None else None
        prototype_dim = self.config.codebook_attention.latent_dim
        metadata = self.kwargs.get("metadata") or {}
        self.scene_radius = float(self.config.scene_radius or metadata.get("scene_radius", DEFAULT_SCENE_RADIUS))
        """The bounding sphere's radius in use: the collider, the background, the eikonal cube and the hash grid
        share it."""
        self.field: CocoField = self._sdf_field_config().setup(
            prototype_source=source, prototype_dim=prototype_dim, grid_bound=self.scene_radius
        )
        self.field.color_autocast = torch.bfloat16 if self.config.bf16_color_heads else None
        self.field.train_geometry_in(
            HALF_DTYPES.get(self.config.geometry_autocast), self.config.geometry_gradient_scale
        )
        self.field_background: CocoBackgroundField | None = None
        if self.config.background_model == "nerf++":
            self.field_background = self.config.background_field.setup(
                prototype_source=source, prototype_dim=prototype_dim
            )
        if self.config.compile_fields:
            try:
                compile_options = dict(
                    backend=self.config.compile_backend,
                    pad_matmuls=self.config.pad_matmuls,
                    mix_order_reduction=self.config.mix_order_reduction,
                )
                self.field.enable_torch_compile(**compile_options)
                if self.prior is not None:
                    self.prior.enable_torch_compile(**compile_options)
                if self.field_background is not None:
                    self.field_background.enable_torch_compile(**compile_options)
            except torch._dynamo.exc.InvalidBackend as error:
                raise ValueError(f"--pipeline.model.compile-backend: {error}") from error
        self.image_metrics_log: list[dict[str, float]] | None = None
        """Set to a list by CocoPipeline while it averages held-out metrics: every image's metrics land here."""
        self.viewer_render_mode: Literal["volume", "surface"] = "volume"
        """Set by the viewer panel; ``surface`` sphere-traces the viewer's frames (see _renders_surface)."""
        self._surface_override = threading.local()
        self._frame_grid = threading.local()
        """The occupancy grid of the whole-image render this thread is making (see render_occupancy_resolution)."""
        self._render_chunks: dict[str, int] = {}
        """Chunk sizes lowered after a render ran out of GPU memory, by option name (the config keeps the user's)."""
        self._compiled_render_modes: set[str] = set()
        """Render modes whose first whole-image render (with compile_fields: compilation) has been made."""
        if self.config.tf32_matmul:
            torch.set_float32_matmul_precision("high")
        if self.config.cuda_graph and self.config.train_weight_threshold > 0:
            raise ValueError(
                "--pipeline.model.cuda-graph needs --pipeline.model.train-weight-threshold 0: skipping samples "
                f"changes tensor shapes every step (got {self.config.train_weight_threshold})."
            )
        if (
            self.config.render_occupancy_resolution != 0
            and self.config.render_occupancy_resolution < MIN_GRID_RESOLUTION
        ):
            raise ValueError(
                f"--pipeline.model.render-occupancy-resolution must be 0 (off) or at least {MIN_GRID_RESOLUTION} cells "
                f"a side, got {self.config.render_occupancy_resolution}"
            )
        counts = {
            "render-points-per-pass": self.config.render_points_per_pass,
            "sdf-field.coordinate-attention.flash-sequence-length": (
                self.config.sdf_field.coordinate_attention.flash_sequence_length
            ),
            "background-field.coordinate-attention.flash-sequence-length": (
                self.config.background_field.coordinate_attention.flash_sequence_length
            ),
        }
        for option, count in counts.items():
            if count < 1:
                raise ValueError(f"--pipeline.model.{option} must be at least 1, got {count}")
        if self.config.num_samples_extra > self.config.num_samples_eval:
            raise ValueError(
                f"--pipeline.model.num-samples-extra ({self.config.num_samples_extra}) must not exceed "
                f"--pipeline.model.num-samples-eval ({self.config.num_samples_eval}): the extra samples are a subset "
                "of the sampler's first round."
            )
        budget = self.config.static_refine_budget
        if budget != "auto" and not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
            raise ValueError(f"--pipeline.model.static-refine-budget must be in (0, 1] or 'auto', got {budget!r}")
        if self.config.refine_budget_shrink_checks < 1:
            raise ValueError(
                "--pipeline.model.refine-budget-shrink-checks must be at least 1 (checks in a row), got "
                f"{self.config.refine_budget_shrink_checks}"
            )
        if budget != 1.0 and not self.config.per_ray_convergence:
            raise ValueError(
                "--pipeline.model.static-refine-budget below 1 (or auto) needs --pipeline.model.per-ray-convergence "
                "True: with batch-level convergence every ray refines while any ray does."
            )
        self.density = LaplaceDensity(self.config.beta_init, self.config.beta_min)
        self.sampler = ErrorBoundedSampler(
            num_samples=self.config.num_samples,
            num_samples_eval=self.config.num_samples_eval,
            num_samples_extra=self.config.num_samples_extra,
            eps=self.config.error_bound_eps,
            beta_iters=self.config.beta_iters,
            max_total_iters=self.config.max_total_iters,
            add_tiny=self.config.add_tiny,
            chunk_size=self.config.sampler_chunk_size,
            per_ray_convergence=self.config.per_ray_convergence,
            batched_bisection=self.config.batched_bisection,
            compile=self.config.compile_sampler,
            compile_backend=self.config.compile_backend,
            static_shapes=self.config.cuda_graph,
            static_refine_budget=1.0
            if self.config.static_refine_budget == "auto"
            else self.config.static_refine_budget,
        )
        if not self.config.sampler_autocast_max_error >= 0:
            raise ValueError(
                "--pipeline.model.sampler-autocast-max-error must be a share of beta >= 0 (inf: never checked), got "
                f"{self.config.sampler_autocast_max_error}"
            )
        self._sampler_dtype = HALF_DTYPES.get(self.config.sampler_autocast)
        """The sampler queries' half precision (``sampler_autocast``), None for float32 throughout."""
        half = self._sampler_dtype is not None
        self._checks_sampler_precision = half and self.config.sampler_autocast_max_error != math.inf
        self._sampler_half: bool | None = None if self._checks_sampler_precision else half
        """Whether the sampler's queries run in half precision now; None until checked (_check_sampler_precision).
        Training's queries may stay in half precision after it is False: see ``_training_queries_follow_geometry``."""
        self._training_queries_follow_geometry = (
            half
            and self.config.training_queries_follow_geometry
            and HALF_DTYPES.get(self.config.geometry_autocast) == self._sampler_dtype
        )
        """``training-queries-follow-geometry``, and the sampler's half precision is the one the geometry head trains
        in (``geometry-autocast``): training renders the SDF rounded as the queries round it, so the queries' error
        against float32, which the check measures for the float32 SDF of renders, is not an error against what
        training renders. Training's queries then stay in half precision unless a probe finds an overflow
        (``_sampler_overflowed``)."""
        if self.config.training_queries_follow_geometry and not self._training_queries_follow_geometry:
            CONSOLE.print(
                "[bold yellow]--pipeline.model.training-queries-follow-geometry True has no effect: it needs "
                "--pipeline.model.sampler-autocast and --pipeline.model.geometry-autocast to be one half precision "
                f"(got {self.config.sampler_autocast} and {self.config.geometry_autocast})."
            )
        self._sampler_overflowed = False
        """A probe found a half-precision query that overflows in the scene's ball (float16 past 65504)."""
        self._sampler_unmeasured = False
        """The last check could not measure the queries' error: too few of the probe's chords cross the surface.
        The queries then run in float32 until a check measures it, not for good."""
        self.training_query_switches: list[tuple[int, bool]] = []
        """Each step at which a check changed the precision of training's sampler queries, and whether they run in
        half precision from it (they start in it). What a quality comparison needs to know of a run
        (``scripts/benchmark_speed.py``)."""
        self._next_precision_check = 0
        """The training step of the next precision check (see ``sampler_autocast_max_error``)."""
        self._sampler_probe: DeferredRead | None = None
        """The probe launched for the next precision check (its error and beta), on its way to the host."""
        self._requested_overflows: DeferredRead | None = None
        """The geometry head's overflow count, requested a step before its check."""
        self.refine_budget = (
            AdaptiveRefineBudget(self.sampler, shrink_checks=self.config.refine_budget_shrink_checks)
            if self.config.cuda_graph and self.config.static_refine_budget == "auto"
            else None
        )
        self.collider = SphereCollider(
            center=torch.zeros(3), radius=self.scene_radius, near_plane=self.config.near_plane
        )
        # renders (clamping, the viewer's background override) and SurfaceModel's loss use it; training sums directly
        self.renderer_rgb = RGBRenderer(background_color="black")
        self.rgb_loss = L1Loss()
        from torchmetrics.functional import structural_similarity_index_measure
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = structural_similarity_index_measure
        self.lpips = OptionalLPIPS()
        self.viewer_panel = MethodPanel(self)  # viewer elements only: no parameters, no buffers
        # every rank builds the same buffers (the 16 MiB codebook, the encodings' constant frequencies):
        # DDP need neither broadcast them at start-up nor before every forward
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]

    def _sdf_field_config(self) -> CocoFieldConfig:
        """The field's config; under a CUDA graph or compile_fields, ``auto`` takes the torch hash grid (tiny-cuda-nn
        has not been checked under graph capture, and its kernels are opaque to torch.compile and torch.func).
        Decided from the config alone, so a reload builds the same table layout."""
        field_config = self.config.sdf_field
        options = [name for name in ("cuda_graph", "compile_fields") if getattr(self.config, name)]
        if not (options and field_config.use_hash_grid):
            return field_config
        if field_config.hash_grid.implementation == "tcnn":
            option = options[0].replace("_", "-")
            raise ValueError(
                f"--pipeline.model.{option} True needs --pipeline.model.sdf-field.hash-grid.implementation torch "
                "(or auto): tiny-cuda-nn's grid has not been checked under CUDA-graph capture, and torch.compile "
                "cannot trace or twice-differentiate it."
            )
        grid = dataclasses.replace(field_config.hash_grid, implementation="torch")
        return dataclasses.replace(field_config, hash_grid=grid)

    def _load_codebook(self) -> Tensor:
        config = self.config
        if config.codebook_source == "random":
            CONSOLE.print(
                "[bold yellow]Prior-free ablation: using a random N(0,1) codebook of shape "
                f"{tuple(config.random_codebook_shape)} (seed {config.random_codebook_seed}), not VQGAN's."
            )
            return random_codebook(tuple(config.random_codebook_shape), config.random_codebook_seed)
        if config.codebook_source != "file":
            raise CodebookError(
                f"--pipeline.model.codebook-source must be 'file' or 'random', got {config.codebook_source!r}."
            )
        try:
            path = locate_codebook(config.codebook_path)
        except CodebookError as error:
            if self.kwargs.get("grad_scaler") is not None:
                raise  # built by nerfstudio's Trainer: training must not start without the prior
            # built by eval_setup (ns-eval, ns-export, ns-viewer, cocoinr-extract-mesh): checkpoints carry the codebook
            CONSOLE.print(f"[bold yellow]{error} Using the codebook stored in the checkpoint that is loaded next.")
            self._codebook_from_checkpoint = True
            return torch.zeros(1, config.codebook_dim)
        codebook = load_codebook(path)
        if codebook.shape[1] != config.codebook_dim:
            raise CodebookError(
                f"{path} holds {codebook.shape[1]}-dimensional entries; pass --pipeline.model.codebook-dim "
                f"{codebook.shape[1]} (the default 256 is VQGAN's)."
            )
        CONSOLE.print(f"Codebook prior: {path} ({codebook.shape[0]} x {codebook.shape[1]})")
        return codebook

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        groups = {"fields": list(self.field.parameters()) + list(self.density.parameters())}
        if self.prior is not None:
            groups["fields"] += list(self.prior.parameters())
        if self.field.hash_grid is not None:  # its own learning rate: a table entry sees few gradients
            grid_params = {id(param) for param in self.field.hash_grid.parameters()}
            groups["fields"] = [param for param in groups["fields"] if id(param) not in grid_params]
            groups["hash_grid"] = list(self.field.hash_grid.parameters())
        if self.field_background is not None:
            groups["field_background"] = list(self.field_background.parameters())
        return groups

    def sample_and_forward_field(self, ray_bundle: RayBundle) -> dict[str, Any]:
        ray_samples, info = self.sampler(ray_bundle, sdf_fn=self._sampler_sdf, density=self.density)
        threshold = self.config.train_weight_threshold if self.training else self.config.eval_weight_threshold
        eikonal_points = self._eikonal_points(ray_bundle, info.eikonal_z) if self.training else None
        eikonal_gradients = None
        if threshold <= 0:
            if eikonal_points is not None:  # through the geometry head with the samples, in one pass
                field_outputs, eikonal_gradients = self.field.outputs_and_gradient_at(ray_samples, eikonal_points)
            else:
                field_outputs = self._field_in_passes(ray_samples)
            sdf = field_outputs[FieldHeadNames.SDF]
            weights, bg_transmittance = volume_weights(ray_samples.deltas[..., 0], self.density(sdf)[..., 0])
        else:
            field_outputs, weights, bg_transmittance = self._forward_visible_samples(ray_samples, threshold)
            if eikonal_points is not None:  # the visible samples' pass has its own shapes: a pass of their own
                _, _, eikonal_gradients = self.field.sdf_and_gradient(eikonal_points, create_graph=True)
        return {
            "ray_samples": ray_samples,
            "field_outputs": field_outputs,
            "weights": weights[..., None],
            "bg_transmittance": bg_transmittance[..., None],
            "sampler_info": info,
            "eikonal_gradients": eikonal_gradients,
        }

    def _sampler_sdf(self, points: Tensor) -> Tensor:
        """SDF queries that only place samples: in half precision while it is safe (``sampler_autocast_max_error``)."""
        if self._sampler_half is None and not _capturing():  # not yet checked (a loaded model's first render)
            self._check_sampler_precision()
        if self._queries_half(self.training):  # unchecked during a CUDA-graph capture (no host reads there): float32
            with torch.autocast(points.device.type, dtype=self._sampler_dtype, cache_enabled=False):
                return self.field.get_sdf_values(points).float()
        return self.field.get_sdf_values(points)

    def _queries_half(self, training: bool) -> bool:
        """Whether the sampler's SDF queries run in half precision now: in training, as the geometry head rounds
        where their precisions agree (see ``_training_queries_follow_geometry``); otherwise once checked safe."""
        if training and self._training_queries_follow_geometry and self._sampler_half is not None:
            return not self._sampler_overflowed
        return bool(self._sampler_half)

    def _forward_visible_samples(
        self, ray_samples: RaySamples, threshold: float
    ) -> tuple[dict[FieldHeadNames, Tensor], Tensor, Tensor]:
        """SDF everywhere (first-order only), SDF gradient and colour only where the weights matter."""
        points = ray_samples.frustums.get_start_positions()
        fused = self.field.config.coordinate_attention.use_fused(torch.is_grad_enabled())
        flat = points.reshape(-1, 3)
        sdf = torch.cat(  # the SDF column alone: the features are not computed
            [self.field.forward_geonetwork(piece, fused=fused, sdf_only=True) for piece in self._passes(flat)]
        ).reshape(*points.shape[:-1], 1)
        weights, bg_transmittance = volume_weights(ray_samples.deltas[..., 0], self.density(sdf)[..., 0])
        visible = (weights.detach() > threshold).reshape(-1).nonzero().squeeze(1)  # one wait for the GPU
        outputs = {FieldHeadNames.SDF: sdf}
        for name in (FieldHeadNames.RGB, FieldHeadNames.NORMALS, FieldHeadNames.GRADIENT):
            outputs[name] = sdf.new_zeros(*sdf.shape[:-1], 3)
        samples = ray_samples.flatten()
        for piece in self._passes(visible):
            for name, value in self.field(samples[piece]).items():
                if name != FieldHeadNames.SDF:
                    outputs[name].view(-1, 3)[piece] = value
        return outputs, weights, bg_transmittance

    def _field_in_passes(self, ray_samples: RaySamples) -> dict[FieldHeadNames, Tensor]:
        """The field at every sample: whole in training, in passes of ``render_points_per_pass`` in renders."""
        if self.training:
            return self.field(ray_samples)
        samples = ray_samples.flatten()
        step = self.config.render_points_per_pass
        pieces = [self.field(samples[start : start + step]) for start in range(0, len(samples), step)]
        return {
            name: torch.cat([piece[name] for piece in pieces]).reshape(*ray_samples.shape, -1) for name in pieces[0]
        }

    def _passes(self, rows: Tensor) -> tuple[Tensor, ...]:
        """``rows`` (points, or indices of points) split into a render's field passes (``render_points_per_pass``);
        whole in training; no pass at all when there are no rows."""
        if not len(rows):
            return ()
        if self.training:
            return (rows,)
        return rows.split(self.config.render_points_per_pass)

    def _background_term(self, ray_bundle: RayBundle, bg_transmittance: Tensor) -> Tensor:
        """The background's colour times the light that reaches it, ``[rays, 3]``. Renders skip the rays whose
        transmittance is at most ``eval_weight_threshold`` (those the object hides): each would change a pixel by at
        most that much."""
        transmittance = bg_transmittance.reshape(-1, 1)
        threshold = self.config.eval_weight_threshold
        if self.training or threshold <= 0:
            return transmittance * self._render_background(ray_bundle)
        seen, hidden = split_mask(transmittance[:, 0] > threshold)
        if not hidden.numel():
            return transmittance * self._render_background(ray_bundle)
        term = transmittance.new_zeros(transmittance.shape[0], 3)
        if seen.numel():
            term[seen] = transmittance[seen] * self._render_background(ray_bundle.flatten()[seen])
        return term

    def _render_background(self, ray_bundle: RayBundle, num_samples: int | None = None) -> Tensor:
        """The background's colour along each ray, ``[rays, 3]``; renders go in passes of at most
        ``render_points_per_pass`` samples."""
        num_samples = num_samples or self.config.num_samples_outside
        rays_per_pass = max(1, self.config.render_points_per_pass // num_samples)  # at least one ray a pass
        if self.training or ray_bundle.shape.numel() <= rays_per_pass:
            return self._render_background_pass(ray_bundle, num_samples)
        bundle = ray_bundle.flatten()
        return torch.cat(
            [
                self._render_background_pass(bundle[start : start + rays_per_pass], num_samples)
                for start in range(0, len(bundle), rays_per_pass)
            ]
        )

    def _render_background_pass(self, ray_bundle: RayBundle, num_samples: int) -> Tensor:
        assert self.field_background is not None
        origins, directions = ray_bundle.origins.reshape(-1, 3), ray_bundle.directions.reshape(-1, 3)
        inverse_radii = inverted_sphere_samples(
            num_samples,
            origins.shape[0],
            self.scene_radius,
            stratified=self.training,
            device=origins.device,
        )
        points = inverted_sphere_points(origins, directions, inverse_radii)
        num_rays, num_samples = inverse_radii.shape
        bf16 = self.config.bf16_color_heads
        with torch.autocast(origins.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            density, rgb = self.field_background(
                points.reshape(-1, 4), directions[:, None, :].expand(num_rays, num_samples, 3).reshape(-1, 3)
            )
        density, rgb = density.float(), rgb.float()
        weights = background_weights(inverse_radii, density.reshape(num_rays, num_samples))
        return (weights[..., None] * rgb.reshape(num_rays, num_samples, 3)).sum(-2)

    def _eikonal_points(self, ray_bundle: RayBundle, eikonal_z: Tensor) -> Tensor:
        """One uniform point in the bounding cube and one near-surface point *on the ray* per ray."""
        origins, directions = ray_bundle.origins.reshape(-1, 3), ray_bundle.directions.reshape(-1, 3)
        radius = self.scene_radius
        uniform = (torch.rand_like(origins) * 2.0 - 1.0) * radius
        near_surface = origins + eikonal_z * directions
        return torch.cat([uniform, near_surface], dim=0)

    @contextmanager
    def surface_rendering(self) -> Iterator[None]:
        """Renders made by this thread inside the block use the fast surface mode (benchmarks, tests)."""
        self._surface_override.active = True
        try:
            yield
        finally:
            self._surface_override.active = False

    def _renders_surface(self) -> bool:
        """The panel's choice applies to the viewer's render threads only: metrics, ns-eval and exports, which
        run in the main thread, always use the method's volume rendering."""
        if getattr(self._surface_override, "active", False):
            return True
        return self.viewer_render_mode == "surface" and threading.current_thread() is not threading.main_thread()

    def _render_surface(self, ray_bundle: RayBundle) -> dict[str, Any]:
        """Preview: colour of the first surface hit (sphere tracing), background elsewhere; no volume integral."""
        bundle = ray_bundle.flatten()
        origins, directions = bundle.origins, bundle.directions
        assert bundle.nears is not None and bundle.fars is not None
        t, hit = sphere_trace(
            self.field.get_sdf_values, origins, directions, bundle.nears, bundle.fars, self.config.preview_trace_steps
        )
        rgb, normal = torch.zeros_like(origins), torch.zeros_like(origins)
        hits, missed = split_mask(hit)
        if hits.numel():
            points = (origins + t * directions)[hits]
            _, features, gradients = self.field.sdf_and_gradient(points, create_graph=False)
            rgb[hits] = self.field.get_colors(points, directions[hits], gradients, features)
            normal[hits] = F.normalize(gradients, dim=-1)
        if self.field_background is not None and missed.numel():
            rgb[missed] = self._render_background(bundle[missed], self.config.preview_background_samples)
        shape = (*ray_bundle.shape, -1)
        return {
            "rgb": rgb.reshape(shape),
            "accumulation": hit.to(rgb.dtype).reshape(shape),
            "depth": torch.where(hit[:, None], t, bundle.fars).reshape(shape),
            "normal": normal.reshape(shape),
            "normals": ((normal + 1.0) / 2.0).clamp(0.0, 1.0).reshape(shape),
        }

    @torch.no_grad()
    def get_outputs_for_camera_ray_bundle(self, camera_ray_bundle: RayBundle) -> dict[str, Tensor]:
        """A whole image, chunk by chunk. A chunk that runs out of GPU memory halves the chunk size for this and
        every later render (down to ``MIN_RENDER_CHUNK``), with one message naming the option to set instead."""
        mode = "surface" if self._renders_surface() else "volume"
        option = "preview-num-rays-per-chunk" if mode == "surface" else "eval-num-rays-per-chunk"
        compiles = self.config.compile_fields and mode not in self._compiled_render_modes
        if compiles:  # the viewer's first frame waits for it: say why
            CONSOLE.print(
                f"First {mode} render: compiling the fields for whole images (--pipeline.model.compile-fields; "
                "about 1.5 minutes on an H200, once per process and render mode); later frames take seconds."
            )
        start = time.perf_counter()
        pixels = len(camera_ray_bundle)
        self._frame_grid.grid = self._render_occupancy_grid(pixels) if mode == "volume" else None
        try:
            return self._render_whole_image(camera_ray_bundle, mode, option, compiles, start)
        finally:
            self._frame_grid.grid = None

    def _render_occupancy_grid(self, num_rays: int) -> OccupancyGrid | None:
        """The grid a whole-image volume render of ``num_rays`` skips empty space with (see
        ``render_occupancy_resolution``); built for every image, from the field as it is now (the viewer renders
        between training steps)."""
        affordable = int((num_rays * self.config.num_samples_eval / GRID_COST_SHARE) ** (1.0 / 3.0) + 1e-6)
        resolution = min(self.config.render_occupancy_resolution, affordable)
        tolerance = self.config.eval_weight_threshold
        if resolution < MIN_GRID_RESOLUTION or tolerance <= 0 or self.training:
            return None
        fused = self.field.config.coordinate_attention.use_fused(grad=False)
        try:
            return OccupancyGrid.from_sdf(
                lambda points: self.field.forward_geonetwork(points, fused=fused, sdf_only=True),
                self.scene_radius,
                resolution,
                beta=float(self.density.get_beta().detach()),
                tolerance=tolerance,
                chunk=self.config.sampler_chunk_size,
                device=self.device,
            )
        except OutOfMemoryError:
            CONSOLE.print(
                f"[bold yellow]The render's occupancy grid ({resolution}^3) ran out of GPU memory: this image samples "
                "every ray in full (--pipeline.model.render-occupancy-resolution lower, or "
                "--pipeline.model.sampler-chunk-size smaller)."
            )
            return None

    def _render_whole_image(
        self, camera_ray_bundle: RayBundle, mode: str, option: str, compiles: bool, start: float
    ) -> dict[str, Tensor]:
        # a field pass keeps its size until a chunk holds fewer samples than it: name it too
        passes_hint = "; or lower --pipeline.model.render-points-per-pass" if mode == "volume" else ""
        while True:
            configured = getattr(self.config, option.replace("-", "_"))
            chunk = min(self._render_chunks.get(option, configured), configured)
            outputs = self._render_in_chunks(camera_ray_bundle, chunk)
            if outputs is not None:
                if compiles:
                    self._compiled_render_modes.add(mode)
                    CONSOLE.print(f"First {mode} render done in {time.perf_counter() - start:.0f} s.")
                return outputs
            # the failed chunk's tensors are released by now (the exception was handled inside): free the cache
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if chunk <= MIN_RENDER_CHUNK:
                raise OutOfMemoryError(
                    f"Rendering ran out of GPU memory even at {chunk} rays per chunk "
                    f"(--pipeline.model.{option}){passes_hint}; free GPU memory or render on a larger GPU."
                )
            self._render_chunks[option] = max(chunk // 2, MIN_RENDER_CHUNK)
            CONSOLE.print(
                f"[bold yellow]Rendering ran out of GPU memory at {chunk} rays per chunk; retrying with "
                f"{self._render_chunks[option]} (--pipeline.model.{option} {self._render_chunks[option]} starts there"
                f"{passes_hint})."
            )

    def _render_in_chunks(self, camera_ray_bundle: RayBundle, chunk: int) -> dict[str, Tensor] | None:
        """nerfstudio's chunked render (outputs back on the bundle's device, shaped like the image); None where a
        chunk's forward pass ran out of GPU memory."""
        height, width = camera_ray_bundle.origins.shape[:2]
        pieces: dict[str, list[Tensor]] = {}
        for start in range(0, len(camera_ray_bundle), chunk):
            bundle = camera_ray_bundle.get_row_major_sliced_ray_bundle(start, start + chunk).to(self.device)
            try:
                outputs = self.forward(ray_bundle=bundle)
            except OutOfMemoryError:
                return None
            for name, value in outputs.items():
                if isinstance(value, Tensor):
                    pieces.setdefault(name, []).append(value.to(camera_ray_bundle.directions.device))
        return {name: torch.cat(values).view(height, width, -1) for name, values in pieces.items()}

    def get_outputs(self, ray_bundle: RayBundle) -> dict[str, Any]:  # type: ignore[override]
        if not self.training and self._renders_surface():
            return self._render_surface(ray_bundle)
        grid = None if self.training else getattr(self._frame_grid, "grid", None)
        if grid is not None:
            return self._render_occupied(ray_bundle, grid)
        return self._render_volume(ray_bundle)

    def _render_occupied(self, ray_bundle: RayBundle, grid: OccupancyGrid) -> dict[str, Tensor]:
        """A render's volume outputs with the foreground sampled only where ``grid`` marks cells on the ray."""
        bundle = ray_bundle.flatten()
        assert bundle.nears is not None and bundle.fars is not None
        hit, nears, fars = grid.ray_bounds(bundle.origins, bundle.directions, bundle.nears, bundle.fars)
        bundle.nears, bundle.fars = nears, fars
        hit, missed = split_mask(hit)
        if not missed.numel():
            outputs = self._render_volume(bundle)
        else:
            outputs = self._render_empty(bundle[missed])
            if hit.numel():
                seen = self._render_volume(bundle[hit])
                for name, value in outputs.items():
                    merged = value.new_empty(len(bundle), *value.shape[1:])
                    merged[missed], merged[hit] = value, seen[name]
                    outputs[name] = merged
        return {name: value.reshape(*ray_bundle.shape, -1) for name, value in outputs.items()}

    def _render_empty(self, ray_bundle: RayBundle) -> dict[str, Tensor]:
        """Volume outputs of rays with no foreground on them: the background's colour (and the viewer's crop
        override, as RGBRenderer adds it to every render), nothing accumulated, depth at the far bound."""
        assert ray_bundle.fars is not None
        num_rays = len(ray_bundle)
        no_samples = ray_bundle.origins.new_zeros(num_rays, 1, 1)
        rgb = self.renderer_rgb(rgb=no_samples.expand(num_rays, 1, 3), weights=no_samples)
        if self.field_background is not None:  # all the light reaches it: no ray to skip, no mask to count
            rgb = rgb + self._render_background(ray_bundle)
        normal = torch.zeros_like(rgb)
        return {
            "rgb": rgb,
            "accumulation": no_samples[:, 0],
            "depth": ray_bundle.fars.reshape(num_rays, 1),
            "normal": normal,
            "normals": ((F.normalize(normal, dim=-1) + 1.0) / 2.0).clamp(0.0, 1.0),
        }

    def _render_volume(self, ray_bundle: RayBundle) -> dict[str, Any]:
        """The method's volume rendering between each ray's ``nears`` and ``fars`` (training and renders)."""
        if self.training and self.prior is not None:
            self.prior.refresh()  # once per step: shared by sampler, render pass and eikonal points
        samples = self.sample_and_forward_field(ray_bundle)
        ray_samples, field_outputs = samples["ray_samples"], samples["field_outputs"]
        weights = samples["weights"]

        if self.training:
            # the background field paints what the foreground leaves: in training, RGBRenderer's black background
            # adds nothing but a blocking host-to-device copy of its colour constant (no CUDA-graph capture either)
            rgb = (weights * field_outputs[FieldHeadNames.RGB]).sum(dim=-2)
        else:  # renders keep nerfstudio's behaviour: clamping, and the viewer's crop-background override
            rgb = self.renderer_rgb(rgb=field_outputs[FieldHeadNames.RGB], weights=weights)
        accumulation = weights.sum(dim=-2)
        distances = ray_samples.frustums.starts
        depth = (weights * distances).sum(dim=-2) / accumulation.clamp(min=1e-10)
        depth = torch.minimum(torch.maximum(depth, distances[..., 0, :]), distances[..., -1, :])
        normal = (weights * field_outputs[FieldHeadNames.NORMALS]).sum(dim=-2)
        if self.field_background is not None:
            rgb = rgb + self._background_term(ray_bundle, samples["bg_transmittance"]).reshape(rgb.shape)

        outputs: dict[str, Any] = {
            "rgb": rgb,
            "accumulation": accumulation,
            "depth": depth,  # distance along the (unit) ray, as nerfstudio's exporters and viewer expect
            "normal": normal,
            "normals": ((F.normalize(normal, dim=-1) + 1.0) / 2.0).clamp(0.0, 1.0),
        }
        if self.training:
            outputs["eik_grad"] = samples["eikonal_gradients"]
            outputs["weights"] = weights
            info = samples["sampler_info"]
            outputs["sampler_rounds"] = info.num_rounds
            truncated = info.num_truncated
            # a fill kernel, not a host-to-device copy: nothing blocks, and CUDA-graph capture allows it
            outputs["sampler_truncated"] = truncated if isinstance(truncated, Tensor) else info.beta.new_zeros(())
            outputs["sampler_round_demand"] = info.round_demand
        return outputs

    def get_metrics_dict(self, outputs, batch) -> dict[str, Tensor]:
        # SurfaceModel's version calls torchmetrics' PSNR, which waits for the GPU (see batch_psnr)
        image = self.renderer_rgb.blend_background(batch["image"].to(self.device))
        metrics = {"psnr": batch_psnr(outputs["rgb"], image)}
        metrics["beta"] = self.density.get_beta().detach()
        if self.training and "eik_grad" in outputs:
            metrics["eikonal"] = ((outputs["eik_grad"].norm(dim=-1) - 1.0) ** 2).mean().detach()
            rounds = outputs["sampler_rounds"]
            metrics["sampler_refined"] = (rounds > 1).float().mean()  # share of rays that got a second round
            metrics["sampler_truncated"] = outputs["sampler_truncated"].float() / rounds.numel()
            metrics["sampler_budget"] = self.sampler.static_refine_budget if self.sampler.static_shapes else 1.0
            if self.refine_budget is not None:
                self.refine_budget.observe(outputs["sampler_round_demand"].float() / rounds.numel())
        self.viewer_panel.record_metrics(metrics)
        return metrics

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> list[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        if self._checks_sampler_precision:
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                    update_every_num_iters=1,
                    func=self._sampler_precision_callback,
                )
            )
        if self.field.geometry_autocast is not None or self.refine_budget is not None:
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                    update_every_num_iters=1,
                    func=self._request_checks,
                )
            )
        if self.field.geometry_autocast is not None:
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                    update_every_num_iters=GEOMETRY_OVERFLOW_INTERVAL,
                    func=self._check_geometry_overflows,
                )
            )
        if self.refine_budget is not None:
            # before the step, as the precision check: their two reads of the GPU then come together, so the GPU
            # idles once every 50 steps while the host prepares the next step, not twice
            callbacks.append(
                TrainingCallback(
                    [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                    update_every_num_iters=REFINE_BUDGET_INTERVAL,
                    func=self._adapt_refine_budget,
                )
            )
        return [*callbacks, *self.viewer_panel.training_callbacks(training_callback_attributes)]

    def _request_checks(self, step: int) -> None:
        """A step before the checks on multiples of 50, starts their reads of the GPU (no wait): at the check the
        host then waits only for the step before this one, while this one still runs on the GPU, instead of
        leaving the GPU idle until it has launched the next step (see
        :mod:`~cocoinr_nerfstudio.model_components.host_reads`)."""
        scale = self.field.gradient_scale
        if (step + 1) % GEOMETRY_OVERFLOW_INTERVAL == 0 and scale is not None:
            self._requested_overflows = scale.request_overflows()
        if (step + 1) % REFINE_BUDGET_INTERVAL == 0 and self.refine_budget is not None:
            self.refine_budget.request()

    def _check_geometry_overflows(self, step: int) -> None:
        """Halves the geometry head's loss scale if its half-precision backward pass overflowed since the last check
        (those gradient entries were dropped; see geometry-gradient-scale). Reads the count requested a step before
        (:meth:`_request_checks`), or reads it now."""
        scale = self.field.gradient_scale
        requested, self._requested_overflows = self._requested_overflows, None
        if requested is not None:
            overflows = int(requested.result().item())
        else:
            overflows = scale.take_overflows() if scale is not None else 0
        if overflows:
            scale.halve()
            since = max(step - GEOMETRY_OVERFLOW_INTERVAL, 0)
            CONSOLE.print(
                f"[bold yellow]Geometry: {overflows} gradient values overflowed {self.config.geometry_autocast} in "
                f"steps {since}-{step} and were dropped; the loss scale is now {scale.value():g} "
                "(--pipeline.model.geometry-gradient-scale)."
            )

    def _adapt_refine_budget(self, step: int) -> None:
        assert self.refine_budget is not None
        if self.refine_budget.adapt(step):
            _, demand, budgets = self.refine_budget.history[-1]
            shares = " / ".join
            CONSOLE.print(
                f"Sampler: {shares(f'{100 * share:.1f}' for share in demand)}% of rays needed rounds "
                f"2-{len(demand) + 1} (most in the last {REFINE_BUDGET_INTERVAL} steps): they now run on "
                f"{shares(f'{100 * share:.1f}' for share in budgets)}% of them."
            )

    def sampler_rounding_error(
        self, quantiles: tuple[float, ...] = (0.99,), dtype: torch.dtype | None = None
    ) -> tuple[float, ...]:
        """Quantiles of |``dtype`` - float32| of the SDF at the surface (see ``sampler_autocast_max_error``);
        ``dtype`` defaults to the sampler's (bfloat16 where it has none). One host read."""
        return tuple(self.sampler_rounding_error_on_device(quantiles, dtype).tolist())

    def sampler_rounding_error_on_device(
        self, quantiles: tuple[float, ...] = (0.99,), dtype: torch.dtype | None = None
    ) -> Tensor:
        """:meth:`sampler_rounding_error` as a tensor on the model's device: queued, not read."""
        dtype = dtype or self._sampler_dtype or torch.bfloat16
        return surface_rounding_error_on_device(
            self._probe_sdf, self.scene_radius, self.density.beta_param.device, dtype, quantiles
        )

    def sampler_overflows_on_device(self) -> Tensor:
        """Whether a query in the sampler's half precision overflows along the probe's chords through the scene's
        ball where float32's does not (:func:`overflows_on_device`): a boolean on the model's device, not read."""
        points = probe_points(self.scene_radius, self.density.beta_param.device, OVERFLOW_CHORDS, OVERFLOW_INTERVALS)
        return overflows_on_device(self._probe_sdf, points, self._sampler_dtype or torch.bfloat16)

    def _probe_sdf(self, points: Tensor) -> Tensor:
        """The precision probes' SDF queries, eager: a probe of its shapes and precisions compiles nothing."""
        return self.field.get_sdf_values(points, compiled=False)

    @property
    def training_queries_float32_from(self) -> int | None:
        """The step of the last switch of training's sampler queries, where it was to float32 (0 where the first
        check found them unsafe at once); None while they run in half precision, or where they never did."""
        if self.training_query_switches and not self.training_query_switches[-1][1]:
            return self.training_query_switches[-1][0]
        return None

    def _precision_settled(self) -> bool:
        """Nothing a probe could find would change the queries' precision any more: renders' queries run in
        float32 on a measured error, and so do training's, unless they follow the geometry head's precision and
        nothing overflowed."""
        return (
            self._sampler_half is False
            and not self._sampler_unmeasured
            and (not self._training_queries_follow_geometry or self._sampler_overflowed)
        )

    def _probe_sampler_precision(self) -> DeferredRead:
        """The precision check's measurements, the probe's error and beta, queued on their way to the host. Once
        renders' queries are float32, only an overflow is left to find (error inf, or 0)."""
        if self._sampler_half is False and not self._sampler_unmeasured:
            error = torch.where(self.sampler_overflows_on_device(), math.inf, 0.0)
        else:
            error = self.sampler_rounding_error_on_device()
        return DeferredRead(torch.cat([error.reshape(1), self.density.get_beta().detach().reshape(1).to(error)]))

    def _sampler_precision_callback(self, step: int) -> None:
        """Before the first step of a run (resumed runs start at any step), then at the step the last check set,
        from a probe launched ``SAMPLER_PRECISION_LEAD`` steps before it."""
        if self._precision_settled():
            return
        was_half = self._sampler_half is None or self._queries_half(training=True)
        if self._sampler_half is None:
            self._check_sampler_precision(step)
        elif self._sampler_probe is not None:
            if step >= self._next_precision_check:
                probe, self._sampler_probe = self._sampler_probe, None
                self._check_sampler_precision(step, probe)
        elif step >= self._next_precision_check - SAMPLER_PRECISION_LEAD:
            self._sampler_probe = self._probe_sampler_precision()
        if was_half != self._queries_half(training=True):
            self.training_query_switches.append((step, not was_half))

    def _check_sampler_precision(self, step: int | None = None, probe: DeferredRead | None = None) -> None:
        """Sets whether the sampler's queries run in half precision (see ``sampler_autocast_max_error``) from
        ``probe`` (by default one made now): the SDF in both precisions, and beta. Once off on a measured error or
        an overflow, it stays off; off because nothing could be measured, it is checked again."""
        if self._precision_settled():
            return
        error, beta = (probe or self._probe_sampler_precision()).result().tolist()
        safe = rounding_is_safe(error, beta, self.config.sampler_autocast_max_error)
        when = f"at step {step}" if step is not None else "before rendering"
        overflowed = self._training_queries_follow_geometry and math.isinf(error)
        if overflowed and self._sampler_half is False:  # renders' queries switched before; now training's too
            self._sampler_overflowed, self._sampler_unmeasured = True, False
            CONSOLE.print(
                f"Sampler: {self.config.sampler_autocast} SDF queries overflow in the scene's ball {when}: "
                "training's queries run in float32 from now on too."
            )
            return
        self._sampler_overflowed = overflowed
        if step is not None:
            # on multiples of 50, with the refine budget's and the overflow count's reads
            relaxed = rounding_is_safe(error, beta, 0.5 * self.config.sampler_autocast_max_error)
            interval = SAMPLER_PRECISION_RELAXED_INTERVAL if relaxed else SAMPLER_PRECISION_INTERVAL
            self._next_precision_check = (step // SAMPLER_PRECISION_INTERVAL) * SAMPLER_PRECISION_INTERVAL + interval
        unmeasured = math.isnan(error)
        until = "until a check can measure them" if unmeasured else "from now on"
        if not safe and not (unmeasured and self._sampler_unmeasured):  # said once while nothing can be measured
            if unmeasured:
                measured = (
                    f"could not be checked (fewer than {MIN_SURFACE_POINTS} of the probe's chords cross the surface)"
                )
            elif math.isinf(error):
                measured = "overflow in the scene's ball"
            else:
                measured = (
                    f"err by {error:.2e} (99th percentile at the surface), more than "
                    f"{self.config.sampler_autocast_max_error:g} x beta ({beta:.2e})"
                )
            if self._training_queries_follow_geometry and not overflowed:
                which = (
                    f"renders' queries run in float32 {until}; training's stay "
                    f"{self.config.sampler_autocast}, the precision the geometry head trains in "
                    "(--pipeline.model.sampler-autocast-max-error, --pipeline.model.geometry-autocast)."
                )
            else:
                which = f"they run in float32 {until} (--pipeline.model.sampler-autocast-max-error)."
            CONSOLE.print(f"Sampler: {self.config.sampler_autocast} SDF queries {measured} {when}: {which}")
        elif safe and self._sampler_unmeasured:
            CONSOLE.print(
                f"Sampler: {self.config.sampler_autocast} SDF queries err by {error:.2e} (99th percentile at the "
                f"surface) {when}, within {self.config.sampler_autocast_max_error:g} x beta ({beta:.2e}): they run "
                f"in {self.config.sampler_autocast} again."
            )
        # renders' queries: once off on a measured error, off
        self._sampler_half = safe and (self._sampler_half is not False or self._sampler_unmeasured)
        self._sampler_unmeasured = unmeasured

    def cuda_graph_key(self) -> tuple:
        """What a captured training step bakes in besides tensors: a new value means capturing again."""
        return (self.sampler.refine_budgets, self._queries_half(training=True))

    def get_extra_state(self) -> Tensor:
        """What training has set that is no parameter or buffer (the sampler's precision, the refine budgets, the
        geometry head's loss scale), so that a checkpoint resumes it (see
        :mod:`~cocoinr_nerfstudio.model_components.extra_state`). Reads the loss scale from the device."""
        state: dict[str, Any] = {}
        if self._checks_sampler_precision:
            state["sampler_precision"] = {
                "autocast": self.config.sampler_autocast,
                "max_error": self.config.sampler_autocast_max_error,
                "follow_geometry": self._training_queries_follow_geometry,
                "half": self._sampler_half,
                "overflowed": self._sampler_overflowed,
                "unmeasured": self._sampler_unmeasured,
                "next_check": self._next_precision_check,
                "switches": [[step, half] for step, half in self.training_query_switches],
            }
        if self.refine_budget is not None:
            state["refine_budget"] = self.refine_budget.state_dict()
        if self.field.geometry_autocast is not None:
            scale = self.field.gradient_scale
            value = scale.value() if scale is not None else self.field.geometry_gradient_scale
            state["geometry_loss_scale"] = {
                "autocast": self.config.geometry_autocast,
                "start": self.config.geometry_gradient_scale,
                "value": value,
            }
        return encode_extra_state(state)

    def set_extra_state(self, state: Tensor) -> None:
        """Restores :meth:`get_extra_state`'s parts that this configuration uses the same way; a part saved under
        other settings (another half precision, error limit, round count or starting loss scale) starts over, and
        says so."""
        saved = decode_extra_state(state, "the checkpoint's _model._extra_state")
        precision = saved.get("sampler_precision")
        if precision is not None and self._checks_sampler_precision:
            settings = (self.config.sampler_autocast, self.config.sampler_autocast_max_error)
            follow = self._training_queries_follow_geometry
            if (precision["autocast"], precision["max_error"], precision["follow_geometry"]) == (*settings, follow):
                self._sampler_half = precision["half"]
                self._sampler_overflowed = bool(precision["overflowed"])
                self._sampler_unmeasured = bool(precision["unmeasured"])
                self._next_precision_check = int(precision["next_check"])
                self._sampler_probe = None
                self.training_query_switches = [(int(step), bool(half)) for step, half in precision["switches"]]
            else:
                following = {True: ", training's following the geometry head", False: ""}
                CONSOLE.print(
                    f"Sampler: the checkpoint checked {precision['autocast']} queries against "
                    f"{precision['max_error']:g} x beta{following[precision['follow_geometry']]}; this run checks "
                    f"{settings[0]} against {settings[1]:g} x beta{following[follow]} afresh."
                )
        budget = saved.get("refine_budget")
        if budget is not None and self.refine_budget is not None:
            if len(budget["budgets"]) == len(self.sampler.refine_budgets):
                self.refine_budget.load_state_dict(budget)
            else:
                CONSOLE.print(
                    f"Sampler: the checkpoint's refine budgets are for {len(budget['budgets']) + 1} rounds, this run "
                    f"has {len(self.sampler.refine_budgets) + 1}: they are sized afresh."
                )
        scale = saved.get("geometry_loss_scale")
        if scale is not None and self.field.geometry_autocast is not None:
            geometry = (self.config.geometry_autocast, self.config.geometry_gradient_scale)
            if (scale["autocast"], scale["start"]) == geometry:
                self.field.resume_gradient_scale(scale["value"])
                self._requested_overflows = None  # counted by whatever ran before the load
            else:
                CONSOLE.print(
                    f"Geometry: the checkpoint's loss scale ({scale['value']:g}) was for {scale['autocast']} from "
                    f"{scale['start']:g}; this run's {geometry[0]} starts from {geometry[1]:g} afresh."
                )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # a checkpoint written before it was saved: that state starts over, as it did

    def get_image_metrics_and_images(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        image = batch["image"].to(self.device)[..., :3]
        rgb = outputs["rgb"]
        images = {
            "img": torch.cat([image, rgb], dim=1),
            "rgb": rgb,
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
            "depth": colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"]),
            "normal": outputs["normals"],
        }
        image_nchw, rgb_nchw = image.permute(2, 0, 1)[None], rgb.permute(2, 0, 1)[None]
        metrics: dict[str, float] = {
            "psnr": float(self.psnr(rgb_nchw, image_nchw)),
            "ssim": float(self.ssim(rgb_nchw, image_nchw)),  # type: ignore[arg-type]
        }
        lpips = self.lpips(rgb_nchw, image_nchw)
        if lpips is not None:
            metrics["lpips"] = lpips
        if "fg_mask" in batch:
            # every image reports it (nerfstudio averages per key); NaN when the object is out of view
            value = masked_psnr(rgb, image, batch["fg_mask"].to(self.device))
            metrics["psnr_masked"] = float("nan") if value is None else value
        if self.image_metrics_log is not None:
            self.image_metrics_log.append(dict(metrics))
        return metrics, images
