"""The NeRF++ background field, with the same codebook-prior heads as the foreground."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn

from cocoinr_nerfstudio.field_components.attention import FeedForwardActivation, half_precision_autocast
from cocoinr_nerfstudio.field_components.compilation import CompiledOrEager
from cocoinr_nerfstudio.field_components.encodings import IDRFrequencyEncoding
from cocoinr_nerfstudio.field_components.mlp import SDFMLP
from cocoinr_nerfstudio.fields.coco_field import CoordinateAttentionConfig, PrototypeSource
from cocoinr_nerfstudio.model_components.density import abs_density


@dataclass
class CocoBackgroundFieldConfig(InstantiateConfig):
    """Background outside the bounding sphere (inverted-sphere parametrisation). Original's defaults."""

    _target: type = field(default_factory=lambda: CocoBackgroundField)
    use_coordinate_attention: bool = True
    """Let background points attend to codebook prototypes."""
    coordinate_attention: CoordinateAttentionConfig = field(default_factory=CoordinateAttentionConfig)
    """Coordinate-attention block shape."""
    position_frequencies: int = 10
    """Frequencies of the encoding of (unit direction, 1/r): 84 dims with 10."""
    density_attention_depth: int = 1
    """Coordinate-attention blocks of the density head."""
    density_attention_activation: FeedForwardActivation = "softplus"
    """Activation of the density head's attention feed-forward."""
    hidden_dims: tuple[int, ...] = (256, 256, 256, 256)
    """Hidden widths of the density MLP."""
    feature_dim: int = 256
    """Feature passed from the density head to the colour head."""
    direction_frequencies: int = 4
    """Frequencies of the view-direction encoding."""
    color_attention_depth: int = 1
    """Coordinate-attention blocks of the colour head."""
    color_attention_activation: FeedForwardActivation = "gelu"
    """Activation of the colour head's attention feed-forward."""
    color_hidden_dims: tuple[int, ...] = ()
    """Hidden widths of the colour MLP after attention."""


class CocoBackgroundField(nn.Module):
    """Density and colour of background points given as ``(x/|x|, 1/|x|)`` (NeRF++)."""

    def __init__(
        self,
        config: CocoBackgroundFieldConfig,
        prototype_source: PrototypeSource | None = None,
        prototype_dim: int = 128,
    ) -> None:
        super().__init__()
        self.config = config
        if config.use_coordinate_attention and prototype_source is None:
            raise ValueError("CocoBackgroundField with coordinate attention needs a prototype source.")
        self.prototype_source = prototype_source
        self._compiled_forward: Callable[..., tuple[Tensor, Tensor]] | None = None
        attention = config.coordinate_attention
        self.position_encoding = IDRFrequencyEncoding(4, config.position_frequencies)
        enc_dim = self.position_encoding.get_out_dim()
        use_attention = config.use_coordinate_attention
        self.density_attention = (
            attention.setup(enc_dim, prototype_dim, config.density_attention_depth, config.density_attention_activation)
            if use_attention
            else None
        )
        self.density_mlp = SDFMLP(
            in_dim=2 * enc_dim if use_attention else enc_dim,
            hidden_dims=config.hidden_dims,
            out_dim=1 + config.feature_dim,
            geometric_init=False,
            weight_norm=False,
        )
        self.direction_encoding = IDRFrequencyEncoding(3, config.direction_frequencies)
        color_in = self.direction_encoding.get_out_dim() + config.feature_dim
        self.color_attention = (
            attention.setup(color_in, prototype_dim, config.color_attention_depth, config.color_attention_activation)
            if use_attention
            else None
        )
        self.color_mlp = SDFMLP(
            in_dim=color_in,
            hidden_dims=config.color_hidden_dims,
            out_dim=3,
            geometric_init=False,
            weight_norm=False,
            activation=nn.ReLU(),
        )

    def enable_torch_compile(
        self, backend: str = "inductor", pad_matmuls: bool = False, mix_order_reduction: bool = True
    ) -> None:
        """Run the field through ``torch.compile`` (it is differentiated once: no SDF gradient here); eagerly, with a
        message, where the backend cannot compile. ``pad_matmuls``, ``mix_order_reduction``: see
        :class:`CompiledOrEager`."""
        self._compiled_forward = CompiledOrEager(
            self._forward,
            backend,
            "the background field",
            pad_matmuls=pad_matmuls,
            mix_order_reduction=mix_order_reduction,
        )

    def forward(
        self, points: Float[Tensor, "n 4"], directions: Float[Tensor, "n 3"]
    ) -> tuple[Float[Tensor, "n 1"], Float[Tensor, "n 3"]]:
        """Returns (density, rgb)."""
        use_prototypes = self.config.use_coordinate_attention and self.prototype_source is not None
        density_prototypes = self.prototype_source("background_density") if use_prototypes else None
        color_prototypes = self.prototype_source("background_color") if use_prototypes else None
        forward = self._compiled_forward if self._compiled_forward is not None else self._forward
        return forward(points, directions, density_prototypes, color_prototypes)

    def _forward(
        self, points: Tensor, directions: Tensor, density_prototypes: Tensor | None, color_prototypes: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` as a function of tensors alone (the prototypes are arguments), so that it compiles."""
        half = half_precision_autocast(points.device.type)  # the model's bf16-color-heads
        fused = self.config.coordinate_attention.use_fused(torch.is_grad_enabled(), half_precision=half)
        encoded = self.position_encoding(points)
        if self.density_attention is not None:
            assert density_prototypes is not None
            attended = self.density_attention(encoded, density_prototypes, fused=fused)
            encoded = torch.cat([encoded, attended], dim=-1)
        output = self.density_mlp(encoded)
        density, feature = abs_density(output[..., :1]), output[..., 1:]
        x = torch.cat([self.direction_encoding(directions), feature], dim=-1)
        if self.color_attention is not None:
            assert color_prototypes is not None
            x = self.color_attention(x, color_prototypes, fused=fused)
        return density, torch.sigmoid(self.color_mlp(x))
