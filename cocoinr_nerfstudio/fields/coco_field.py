"""The foreground field: an SDF with a geometry feature, and a colour head, both reading the codebook prior."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.cameras.rays import RaySamples
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.fields.base_field import Field
from torch import Tensor, nn

from cocoinr_nerfstudio.field_components.attention import CoordinateAttention, FeedForwardActivation
from cocoinr_nerfstudio.field_components.compilation import CompiledOrEager
from cocoinr_nerfstudio.field_components.encodings import IDRFrequencyEncoding
from cocoinr_nerfstudio.field_components.gradient_scale import GradientScale, scale_gradient, unscale_gradient
from cocoinr_nerfstudio.field_components.hash_grid import HashGrid, HashGridConfig
from cocoinr_nerfstudio.field_components.mlp import SDFMLP

PrototypeSource = Callable[[str], Tensor]
"""Returns the prototypes of a named head (``"geometry"``, ``"color"``, ...)."""

GEOMETRY_MODULES = ("position_encoding", "geometry_attention", "hash_grid", "sdf_mlp")
"""The field's submodules that compute ``[sdf, feature]`` (:meth:`CocoField._geometry`), in order."""


class CompiledFieldPaths(NamedTuple):
    """The field's hot paths, each wrapped by ``torch.compile`` (see :meth:`CocoField.enable_torch_compile`)."""

    geometry: Callable[..., Tensor]
    geometry_with_gradient: Callable[..., tuple[Tensor, Tensor]]
    colors: Callable[..., Tensor]


@dataclass
class CoordinateAttentionConfig:
    """How sample points attend to the prototypes (shared by every head)."""

    heads: int = 4
    """Attention heads of each coordinate-attention block."""
    dim_head: int = 32
    """Width of each head."""
    fused: bool = False
    """Use torch's fused scaled-dot-product kernels where no second derivative is needed. Off: in fp32 they were
    slower than explicit attention on an H200, measured before the points reached them as 4-D inputs (so on torch's
    unfused math kernel); not re-measured since."""
    fused_without_grad: bool = False
    """Use the fused kernels where no gradient is taken at all: the sampler's SDF queries, evaluation and the
    viewer. Under half precision (``sampler-autocast``) that is the flash kernel, which spreads one sequence of
    every query point over the GPU; its backward would not (the 256 shared keys' gradients are reductions over all
    queries), so differentiated paths stay explicit unless ``fused`` is on. Measured on an H200: +4-8% a training
    step with ``compile-fields`` and bf16 sampler queries (``coco-inr-fast`` now queries in float16), no gain in
    float32, hence off by default."""
    block_diagonal: bool = True
    """Explicit attention as two plain matrix products against block-diagonal keys and values instead of one
    batched product per head: the same values, a faster backward pass (see ``attend_block_diagonal``)."""
    point_kernels: bool = False
    """Explicit attention (every differentiated pass, unless ``fused``) through this project's point-attention
    ops, differentiable twice: on CUDA, Triton kernels that keep each point's scores to the prototypes on chip
    through the forward pass, the SDF's gradient and the backward of both, where the torch path writes and re-reads
    400-MB score matrices at each of them (``point_attention``); elsewhere the same formulas in torch, which do not
    pay on a CPU. Takes precedence over ``block_diagonal``. Measured on an H100 in ``coco-inr-fast`` (which turns it
    on): +9% a training step and 2.6 GiB less peak memory."""

    flash_first_order: bool = False
    """Attention differentiated once in half precision (the colour heads and the background field in training,
    with ``bf16-color-heads``) takes torch's fused (flash) kernels, the points cut into sequences of
    ``flash-sequence-length`` so that their backward pass spreads over the GPU, instead of the point kernels' or
    the explicit path's float32 products. The geometry head, differentiated twice, is unaffected. Measured on an
    H200 in ``coco-inr-fast`` (which turns it on): +7% a training step, 0.07 GiB more peak memory, held-out PSNR
    and Chamfer at 600 steps within the seed-to-seed spread (docs/benchmarks.md, round seventeen)."""
    flash_sequence_length: int = 2048
    """Points per sequence of ``flash-first-order``."""

    def use_fused(self, grad: bool, second_derivative: bool = False, half_precision: bool = False) -> bool:
        """Whether a pass takes the fused kernels: never under a second derivative (they have none); with
        ``fused`` otherwise; with ``fused_without_grad`` where no gradient is taken (``grad`` False); with
        ``flash_first_order`` where it runs in half precision."""
        if second_derivative:
            return False
        return self.fused or (self.fused_without_grad and not grad) or (self.flash_first_order and half_precision)

    def setup(
        self, query_dim: int, prototype_dim: int, depth: int, activation: FeedForwardActivation
    ) -> CoordinateAttention:
        """A coordinate-attention module of this shape for one head."""
        return CoordinateAttention(
            query_dim,
            prototype_dim,
            depth,
            self.heads,
            self.dim_head,
            activation,
            block_diagonal=self.block_diagonal,
            point_kernels=self.point_kernels,
            sequence_length=self.flash_sequence_length if self.flash_first_order else 0,
        )


@dataclass
class CocoFieldConfig(InstantiateConfig):
    """Foreground SDF + colour field. Defaults are the original's DTU configuration."""

    _target: type = field(default_factory=lambda: CocoField)
    use_coordinate_attention: bool = True
    """Let points attend to codebook prototypes (off: the plain VolSDF MLPs, the prior-free baseline)."""
    coordinate_attention: CoordinateAttentionConfig = field(default_factory=CoordinateAttentionConfig)
    """Coordinate-attention block shape."""
    position_frequencies: int = 6
    """Frequencies of the positional encoding of xyz (39 input dims with 6)."""
    geometry_attention_depth: int = 1
    """Coordinate-attention blocks in the geometry head."""
    geometry_attention_activation: FeedForwardActivation = "softplus"
    """Activation of the geometry head's attention feed-forward (softplus keeps second derivatives smooth)."""
    use_hash_grid: bool = False
    """Append multiresolution hash-grid features (Instant-NGP) to the SDF MLP's input: local detail that an MLP
    fed by 6 frequencies learns slowly. Off in the paper. Its columns start at zero (geometric init), so
    training still starts from the sphere."""
    hash_grid: HashGridConfig = field(default_factory=HashGridConfig)
    """Hash-grid shape and implementation (tiny-cuda-nn when it imports, else torch)."""
    geometry_hidden_dims: tuple[int, ...] = (256, 256, 256, 256)
    """Hidden widths of the SDF MLP."""
    geometry_skip_in: tuple[int, ...] = ()
    """Layers that re-read the MLP input (VolSDF uses (4,) with 8 layers)."""
    feature_dim: int = 256
    """Geometry feature passed to the colour head."""
    geometric_init: bool = True
    """Initialise the SDF as a sphere of radius ``bias``."""
    bias: float = 0.6
    """Radius of the initial sphere (normalised frame)."""
    weight_norm: bool = True
    """Weight normalisation in the SDF MLP."""
    direction_frequencies: int = 4
    """Frequencies of the view-direction encoding (27 dims with 4)."""
    color_attention_depth: int = 2
    """Coordinate-attention blocks in the colour head."""
    color_attention_activation: FeedForwardActivation = "gelu"
    """Activation of the colour head's attention feed-forward."""
    color_hidden_dims: tuple[int, ...] = ()
    """Hidden widths of the colour MLP after attention (the original: none, a single linear layer)."""
    color_weight_norm: bool = False
    """Weight normalisation in the colour MLP."""
    color_mode: Literal["idr", "nerf"] = "idr"
    """Colour input: ``idr`` = [x, view dir, SDF gradient, feature]; ``nerf`` = [view dir, feature]."""


class CocoField(Field):
    """SDF field whose geometry and colour heads are enriched by coordinate attention.

    Geometry: ``enc(x)`` attends to the geometry prototypes; ``[enc(x), attended]`` feeds the SDF MLP, followed
    by hash-grid features of x with ``use_hash_grid``.
    Colour: ``[x, enc(d), grad sdf, feature]`` attends to the colour prototypes, then a linear map + sigmoid.
    """

    def __init__(
        self,
        config: CocoFieldConfig,
        prototype_source: PrototypeSource | None = None,
        prototype_dim: int = 128,
        grid_bound: float = 3.0,
    ) -> None:
        """``grid_bound``: half side of the cube the hash grid covers (the model passes its bounding sphere's
        radius: every sample and eikonal point lies inside)."""
        super().__init__()
        self.config = config
        if config.use_coordinate_attention and prototype_source is None:
            raise ValueError("CocoField with coordinate attention needs a prototype source (the codebook prior).")
        # a plain attribute, not a submodule: the prior is owned (and checkpointed) by the model
        self.prototype_source = prototype_source
        self.color_autocast: torch.dtype | None = None
        """Autocast dtype for the colour head (set by the model), None for float32."""
        self.geometry_autocast: torch.dtype | None = None
        """Autocast dtype of the geometry head where it is trained (the SDF and its gradient differentiated for the
        losses; set by the model), None for float32. Queries that are not differentiated stay float32."""
        self.geometry_gradient_scale = 1.0
        """The loss scale the geometry head starts with under ``geometry_autocast`` (see
        :mod:`~cocoinr_nerfstudio.field_components.gradient_scale`); the one in use is :attr:`gradient_scale`'s."""
        self.gradient_scale: GradientScale | None = None
        """The geometry head's loss scale in use and its overflow count, on the device it last trained on."""
        self._compiled: CompiledFieldPaths | None = None
        attention = config.coordinate_attention

        self.position_encoding = IDRFrequencyEncoding(3, config.position_frequencies)
        enc_dim = self.position_encoding.get_out_dim()
        self.geometry_attention = (
            attention.setup(
                enc_dim, prototype_dim, config.geometry_attention_depth, config.geometry_attention_activation
            )
            if config.use_coordinate_attention
            else None
        )
        self.hash_grid = HashGrid(config.hash_grid, grid_bound) if config.use_hash_grid else None
        grid_dim = self.hash_grid.get_out_dim() if self.hash_grid is not None else 0
        self.sdf_mlp = SDFMLP(
            in_dim=(2 * enc_dim if config.use_coordinate_attention else enc_dim) + grid_dim,
            hidden_dims=config.geometry_hidden_dims,
            out_dim=1 + config.feature_dim,
            skip_in=config.geometry_skip_in,
            geometric_init=config.geometric_init,
            bias=config.bias,
            weight_norm=config.weight_norm,
        )

        self.direction_encoding = IDRFrequencyEncoding(3, config.direction_frequencies)
        dir_dim = self.direction_encoding.get_out_dim()
        color_in = dir_dim + config.feature_dim + (6 if config.color_mode == "idr" else 0)
        self.color_attention = (
            attention.setup(color_in, prototype_dim, config.color_attention_depth, config.color_attention_activation)
            if config.use_coordinate_attention
            else None
        )
        self.color_mlp = SDFMLP(
            in_dim=color_in,
            hidden_dims=config.color_hidden_dims,
            out_dim=3,
            geometric_init=False,
            weight_norm=config.color_weight_norm,
            activation=nn.ReLU(),
        )

    def _fused(self, create_graph: bool) -> bool:
        return self.config.coordinate_attention.use_fused(torch.is_grad_enabled(), second_derivative=create_graph)

    def enable_torch_compile(
        self, backend: str = "inductor", pad_matmuls: bool = False, mix_order_reduction: bool = True
    ) -> None:
        """Run the geometry (with and without its gradient) and the colour head through ``torch.compile``.

        The compiled SDF gradient is written as a function (``torch.func.grad``), so the compiled graph holds
        the SDF, its gradient and the feature as one first-order graph that the loss differentiates once:
        ``autograd.grad(create_graph=True)`` would need a second derivative of a compiled graph, which
        torch.compile does not provide. Where the backend cannot compile, each path says so and runs eagerly.
        ``pad_matmuls``, ``mix_order_reduction``: see :class:`CompiledOrEager`."""
        options = dict(pad_matmuls=pad_matmuls, mix_order_reduction=mix_order_reduction)
        self._compiled = CompiledFieldPaths(
            geometry=CompiledOrEager(self._geometry, backend, "the SDF", **options),
            geometry_with_gradient=CompiledOrEager(
                self._geometry_with_gradient, backend, "the SDF gradient", **options
            ),
            colors=CompiledOrEager(self._colors, backend, "the colour head", **options),
        )

    def train_geometry_in(self, dtype: torch.dtype | None, gradient_scale: float = 1.0) -> None:
        """Sets ``geometry_autocast`` and ``geometry_gradient_scale``, refusing what cannot run: a scale that is not
        a positive power of two (it would round the gradients), or tiny-cuda-nn's hash grid, which torch.func (the
        region's gradient) cannot differentiate."""
        if not (gradient_scale > 0 and math.isfinite(gradient_scale) and math.frexp(gradient_scale)[0] == 0.5):
            raise ValueError(
                f"--pipeline.model.geometry-gradient-scale must be a positive power of two, got {gradient_scale}"
            )
        if dtype is not None and self.hash_grid is not None and self.hash_grid.tcnn_encoding is not None:
            raise ValueError(
                "--pipeline.model.geometry-autocast needs torch.func's gradient, which tiny-cuda-nn's hash grid does "
                "not support: set --pipeline.model.sdf-field.hash-grid.implementation torch, or geometry-autocast none."
            )
        self.geometry_autocast = dtype
        self.geometry_gradient_scale = float(gradient_scale)
        self.gradient_scale = None

    def resume_gradient_scale(self, value: float) -> None:
        """Starts the geometry head's loss scale at ``value`` (a resumed run's, lowered by its overflows), in place
        where one is in use (a captured step reads the new value), with no overflow counted: any were the scale's
        before."""
        self.geometry_gradient_scale = float(value)
        if self.gradient_scale is not None:
            self.gradient_scale.factor.fill_(value)
            if self.gradient_scale.overflows.grad is not None:
                self.gradient_scale.overflows.grad.zero_()

    def _gradient_scale_on(self, device: torch.device) -> GradientScale:
        if self.gradient_scale is None or self.gradient_scale.factor.device != device:
            self.gradient_scale = GradientScale(self.geometry_gradient_scale, device)
        return self.gradient_scale

    def _prototypes(self, head: str) -> Tensor | None:
        if not self.config.use_coordinate_attention or self.prototype_source is None:
            return None
        return self.prototype_source(head)

    def _geometry(
        self,
        flat: Float[Tensor, "n 3"],
        prototypes: Tensor | None,
        fused: bool,
        parameters: dict[str, dict[str, Tensor]] | None = None,
        sdf_only: bool = False,
    ) -> Float[Tensor, "n out"]:
        """``[sdf, feature]``; a function of tensors alone (the prototypes are an argument), so it compiles.
        ``parameters``: stand-ins for the submodules' own, by submodule name (see :data:`GEOMETRY_MODULES`).
        ``sdf_only``: ``[sdf]`` alone, without computing the feature (see :meth:`SDFMLP.forward`)."""

        def run(name: str, *args, **kwargs) -> Tensor:
            module = getattr(self, name)
            if parameters is None or name not in parameters:
                return module(*args, **kwargs)
            return torch.func.functional_call(module, parameters[name], args, kwargs)

        encoded = run("position_encoding", flat)
        inputs = [encoded]
        if self.geometry_attention is not None:
            assert prototypes is not None
            inputs.append(run("geometry_attention", encoded, prototypes, fused=fused))
        if self.hash_grid is not None:
            inputs.append(run("hash_grid", flat))
        mlp_input = torch.cat(inputs, dim=-1) if len(inputs) > 1 else encoded
        return run("sdf_mlp", mlp_input, outputs=1 if sdf_only else None)

    def _geometry_with_gradient(
        self,
        flat: Float[Tensor, "n 3"],
        prototypes: Tensor | None,
        scale: Tensor | None = None,
        overflows: Tensor | None = None,
    ) -> tuple[Float[Tensor, "n out"], Float[Tensor, "n 3"]]:
        """``[sdf, feature]`` and d(sdf)/dx, the gradient by ``torch.func.grad`` (see :meth:`enable_torch_compile`).
        Explicit attention inside: the fused kernels have no second derivative.

        With ``scale`` and ``overflows`` (the pass the losses differentiate, under ``geometry_autocast``): the whole
        computation, the gradient's included, runs under autocast as one region whose inputs (the parameters, the
        prototypes) and outputs carry the loss scale (:mod:`~cocoinr_nerfstudio.field_components.gradient_scale`).
        The region is differentiated once from outside, so the scale holds. Outputs have the points' dtype."""
        dtype = self.geometry_autocast if scale is not None else None
        parameters = None
        if dtype is not None:
            assert scale is not None and overflows is not None
            parameters = {}
            for name in GEOMETRY_MODULES:  # a loop: dynamo breaks its graph on a walrus inside a comprehension
                module = getattr(self, name)
                if module is not None:
                    parameters[name] = {
                        key: unscale_gradient(p, scale, overflows) for key, p in module.named_parameters()
                    }
            prototypes = unscale_gradient(prototypes, scale, overflows) if prototypes is not None else None

        def sdf_sum(x: Tensor) -> tuple[Tensor, Tensor]:
            # no weight-cast cache: it would outlive a captured CUDA graph's memory pool
            with torch.autocast(
                x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
            ):
                output = self._geometry(x, prototypes, fused=False, parameters=parameters).to(x.dtype)
            return output[..., 0].sum(), output

        gradient, output = torch.func.grad(sdf_sum, has_aux=True)(flat)
        if dtype is None:
            return output, gradient
        assert scale is not None
        return scale_gradient(output, scale), scale_gradient(gradient, scale)

    def forward_geonetwork(
        self,
        points: Float[Tensor, "*batch 3"],
        fused: bool | None = None,
        compiled: bool = True,
        sdf_only: bool = False,
    ) -> Float[Tensor, "*batch 1+feature_dim"]:
        """``[sdf, feature]`` at points in the normalised frame (nerfstudio's marching-cubes contract).
        ``compiled`` False runs eagerly even with ``enable_torch_compile``: a one-off query of another shape or
        precision then costs no compilation. ``sdf_only``: ``[sdf]``, the feature's 256 columns left uncomputed."""
        if fused is None:
            fused = self._fused(create_graph=self.training and torch.is_grad_enabled())
        geometry = self._compiled.geometry if self._compiled is not None and compiled else self._geometry
        output = geometry(points.reshape(-1, 3), self._prototypes("geometry"), fused, sdf_only=sdf_only)
        return output.reshape(*points.shape[:-1], -1)

    def get_sdf_values(self, points: Float[Tensor, "*batch 3"], compiled: bool = True) -> Float[Tensor, "*batch 1"]:
        """SDF only; what samplers and mesh extraction query (``compiled``: see :meth:`forward_geonetwork`)."""
        return self.forward_geonetwork(points, compiled=compiled, sdf_only=True)

    def sdf_and_gradient(
        self, points: Float[Tensor, "n 3"], create_graph: bool
    ) -> tuple[Float[Tensor, "n 1"], Float[Tensor, "n feature"], Float[Tensor, "n 3"]]:
        """SDF, feature and d(sdf)/dx. ``create_graph`` keeps the gradient differentiable (eikonal loss)."""
        # point kernels: under func.grad only the points are differentiated, so the keys' and values' gradients
        # (a pass over every point) are not computed for the SDF's gradient, as autograd.grad below would
        point_kernels = self.config.coordinate_attention.point_kernels and self.geometry_attention is not None
        tcnn = self.hash_grid is not None and self.hash_grid.tcnn_encoding is not None  # no torch.func support
        half = create_graph and self.geometry_autocast is not None  # a region only _geometry_with_gradient makes
        if self._compiled is not None or (create_graph and (point_kernels or half) and not tcnn):
            geometry_with_gradient = (
                self._compiled.geometry_with_gradient if self._compiled is not None else self._geometry_with_gradient
            )
            region = ()
            if half:
                scale = self._gradient_scale_on(points.device)
                region = (scale.factor, scale.overflows)
            with torch.enable_grad() if create_graph else contextlib.nullcontext():  # as autograd.grad's path below
                output, gradient = geometry_with_gradient(points.detach(), self._prototypes("geometry"), *region)
            if not create_graph:
                output, gradient = output.detach(), gradient.detach()
            return output[..., :1], output[..., 1:], gradient
        with torch.enable_grad():
            x = points.detach().requires_grad_(True)
            output = self.forward_geonetwork(x, fused=self._fused(create_graph))
            sdf, feature = output[..., :1], output[..., 1:]
            (gradient,) = torch.autograd.grad(
                sdf, x, grad_outputs=torch.ones_like(sdf), create_graph=create_graph, retain_graph=create_graph
            )
        if not create_graph:
            sdf, feature = sdf.detach(), feature.detach()
        return sdf, feature, gradient

    def get_colors(
        self,
        points: Float[Tensor, "n 3"],
        directions: Float[Tensor, "n 3"],
        gradients: Float[Tensor, "n 3"],
        features: Float[Tensor, "n feature"],
    ) -> Float[Tensor, "n 3"]:
        colors = self._compiled.colors if self._compiled is not None else self._colors
        return colors(points, directions, gradients, features, self._prototypes("color"))

    def _colors(
        self, points: Tensor, directions: Tensor, gradients: Tensor, features: Tensor, prototypes: Tensor | None
    ) -> Float[Tensor, "n 3"]:
        encoded_dirs = self.direction_encoding(directions)
        if self.config.color_mode == "idr":
            x = torch.cat([points, encoded_dirs, gradients, features], dim=-1)
        else:
            x = torch.cat([encoded_dirs, features], dim=-1)
        dtype = self.color_autocast
        # no weight-cast cache: it would outlive a captured CUDA graph's memory pool
        autocast = torch.autocast(
            x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
        )
        with autocast:
            if self.color_attention is not None:
                assert prototypes is not None
                half = dtype in (torch.bfloat16, torch.float16)
                fused = self.config.coordinate_attention.use_fused(torch.is_grad_enabled(), half_precision=half)
                x = self.color_attention(x, prototypes, fused=fused)
            return torch.sigmoid(self.color_mlp(x)).float()

    def get_density(self, ray_samples: RaySamples):  # type: ignore[override]
        raise NotImplementedError("CocoField predicts an SDF; the model turns it into density (LaplaceDensity).")

    def get_outputs(  # type: ignore[override]
        self, ray_samples: RaySamples, density_embedding: Tensor | None = None
    ) -> dict[FieldHeadNames, Tensor]:
        return self.outputs_and_gradient_at(ray_samples, None)[0]

    def outputs_and_gradient_at(
        self, ray_samples: RaySamples, points: Float[Tensor, "m 3"] | None
    ) -> tuple[dict[FieldHeadNames, Tensor], Float[Tensor, "m 3"] | None]:
        """:meth:`get_outputs` at ``ray_samples``, and the SDF's gradient at further ``points`` (the eikonal term's),
        from one pass of the geometry head over both. On a GPU a separate pass over a few thousand points costs
        nearly as many kernel launches as the pass over a hundred thousand samples."""
        shape = ray_samples.frustums.shape
        samples = ray_samples.frustums.get_start_positions().reshape(-1, 3)
        directions = ray_samples.frustums.directions.reshape(-1, 3)
        queried = samples if points is None else torch.cat([samples, points.to(samples.dtype)])
        sdf, features, gradients = self.sdf_and_gradient(queried, create_graph=self.training)
        extra = None
        if points is not None:
            count = len(samples)
            extra = gradients[count:]
            sdf, features, gradients = sdf[:count], features[:count], gradients[:count]
        rgb = self.get_colors(samples, directions, gradients, features)
        outputs = {
            FieldHeadNames.SDF: sdf.reshape(*shape, 1),
            FieldHeadNames.RGB: rgb.reshape(*shape, 3),
            FieldHeadNames.GRADIENT: gradients.reshape(*shape, 3),
            FieldHeadNames.NORMALS: F.normalize(gradients, dim=-1).reshape(*shape, 3),
        }
        return outputs, extra

    def forward(self, ray_samples: RaySamples, compute_normals: bool = False) -> dict[FieldHeadNames, Tensor]:  # type: ignore[override]
        return self.get_outputs(ray_samples)
