"""The SDF MLP: softplus(beta=100), optional weight normalisation and IDR's geometric initialisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from cocoinr_nerfstudio.field_components.attention import half_precision_autocast


class WeightNormLinear(nn.Module):
    """``y = x (g v / |v|)^T + b`` with the norm taken per output row (Salimans & Kingma).

    Written out instead of ``torch.nn.utils.weight_norm`` (deprecated, and its parametrised twin
    recomputes the weight on every access) so the state dict has stable, explicit names.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.direction = nn.Parameter(weight.clone())
        self.gain = nn.Parameter(weight.norm(dim=1, keepdim=True))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    @property
    def weight(self) -> Tensor:
        return self.gain * self.direction / self.direction.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class SDFMLP(nn.Module):
    """MLP mapping encoded points to ``[sdf, features]``.

    With ``geometric_init`` (Atzmon & Lipman; IDR) the network starts as the SDF of a sphere of
    radius ``bias``: only the first ``raw_input_dim`` input columns (raw xyz) are non-zero in the first
    layer and at skip connections, so encodings and attention features start switched off and are
    learned in gradually.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        skip_in: Sequence[int] = (),
        geometric_init: bool = True,
        bias: float = 0.6,
        weight_norm: bool = True,
        raw_input_dim: int = 3,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        self.skip_in = tuple(skip_in)
        self.activation = activation if activation is not None else nn.Softplus(beta=100)
        layers = []
        num_linear = len(dims) - 1
        for layer in range(num_linear):
            # a skip layer's predecessor shrinks so that [hidden, input] has the nominal width
            out_features = dims[layer + 1] - in_dim if (layer + 1) in self.skip_in else dims[layer + 1]
            lin = nn.Linear(dims[layer], out_features)
            if geometric_init:
                self._geometric_init(lin, layer, num_linear, dims, bias, raw_input_dim)
            layers.append(WeightNormLinear(lin) if weight_norm else lin)
        self.layers = nn.ModuleList(layers)

    def _geometric_init(
        self, lin: nn.Linear, layer: int, num_linear: int, dims: Sequence[int], bias: float, raw_input_dim: int
    ) -> None:
        with torch.no_grad():
            if layer == num_linear - 1:
                nn.init.normal_(lin.weight, mean=math.sqrt(math.pi) / math.sqrt(dims[layer]), std=1e-4)
                nn.init.constant_(lin.bias, -bias)
                return
            nn.init.constant_(lin.bias, 0.0)
            nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(lin.out_features))
            if layer == 0:
                lin.weight[:, raw_input_dim:] = 0.0
            elif layer in self.skip_in:
                # skip input is appended last: keep only its raw-xyz columns
                lin.weight[:, -(dims[0] - raw_input_dim) :] = 0.0

    def forward(self, x: Float[Tensor, "*batch in_dim"], outputs: int | None = None) -> Float[Tensor, "*batch out"]:
        """``outputs``: only the first this many output columns (the SDF alone: 1), the last layer's other rows
        left out. Under torch.compile a single column is a weighted sum that inductor fuses with the activation
        before it: the last hidden layer is then never written to memory (the sampler's queries, renders and
        meshes need the SDF only)."""
        inputs = x
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if index in self.skip_in:
                x = torch.cat([x, inputs], dim=-1) / math.sqrt(2)
            if index == last and outputs is not None:
                return _first_rows(layer, x, outputs)
            x = layer(x)
            if index < last:
                x = self.activation(x)
        return x


def _first_rows(layer: nn.Module, x: Tensor, rows: int) -> Tensor:
    """``layer(x)[..., :rows]`` without the other rows' products (``layer``: nn.Linear or WeightNormLinear).

    One row under half-precision autocast is a weighted sum summed in float32 (:func:`_weighted_sum`), eager or
    compiled: cuBLAS's half-precision product for one output column rounds the sum of its terms to half precision
    before it adds the bias, and the SDF, a near-zero sum of terms up to about 1 against the bias, came out on a
    grid of 4.9e-4 (float16) or 3.9e-3 (bfloat16) in the normalised frame (H200, docs/benchmarks.md rounds
    twenty-four and twenty-five)."""
    weight, bias = layer.weight[:rows], layer.bias[:rows] if layer.bias is not None else None
    if rows == 1 and (torch.compiler.is_compiling() or half_precision_autocast(x.device.type)):
        return _weighted_sum(x, weight[0], bias)
    return F.linear(x, weight, bias)


EAGER_SUM_ROWS = 1 << 16
"""Rows per chunk of an eager :func:`_weighted_sum`: its float32 copies stay at 128 MiB for 256 columns whatever the
batch (a render's pass of 2^19 points would otherwise hold 1 GiB of them)."""


def _weighted_sum(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight[None], bias)`` as a sum over x's last dimension, which inductor fuses with x's producer,
    rounded as autocast rounds the product: operands and output in autocast's dtype, exact products summed in
    float32 or wider (compiled and eager SDF queries then agree up to the order of the sum). Eagerly, in chunks of
    :data:`EAGER_SUM_ROWS` rows."""
    # compiled code fuses the sum (no copies); its symbolic row count is never compared (no guard on it)
    if not torch.compiler.is_compiling() and (rows := x.shape[:-1].numel()) > EAGER_SUM_ROWS:
        flat = x.reshape(rows, x.shape[-1])
        parts = [_weighted_sum(part, weight, bias) for part in flat.split(EAGER_SUM_ROWS)]
        return torch.cat(parts).reshape(*x.shape[:-1], 1)
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    accumulate = torch.promote_types(dtype, torch.float32)  # float64 fields keep float64
    column = (x.to(dtype).to(accumulate) * weight.to(dtype).to(accumulate)).sum(-1, keepdim=True)
    if bias is not None:
        column = column + bias.to(dtype).to(accumulate)
    return column.to(dtype)
