"""Codebook attention and coordinate attention, the two CoCo-INR building blocks.

Codebook attention turns the frozen codebook into a small set of *prototypes*; coordinate attention
lets every sample point read from those prototypes. Both are pre-norm, residual transformer blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from cocoinr_nerfstudio.field_components import point_attention as point_ops
from cocoinr_nerfstudio.field_components.point_attention import point_attention

FeedForwardActivation = Literal["softplus", "gelu", "geglu", "relu"]


def attend(
    q: Float[Tensor, "*b heads n d"],
    k: Float[Tensor, "*b heads m d"],
    v: Float[Tensor, "*b heads m d"],
    fused: bool,
) -> Float[Tensor, "*b heads n d"]:
    """Scaled dot-product attention.

    ``fused`` uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels). Those
    kernels have no second derivative, so anything differentiated twice (the SDF's gradient enters
    the eikonal loss) must take the explicit path, which autograd can differentiate any number of times.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1), v)


def attend_in_sequences(
    q: Float[Tensor, "heads n d"], k: Float[Tensor, "heads m d"], v: Float[Tensor, "heads m d"], length: int
) -> Float[Tensor, "heads n d"]:
    """``attend(q, k, v, fused=True)`` of many queries against shared keys, the queries cut into sequences of
    ``length`` (the last one padded with zeros, whose outputs are dropped).

    torch's fused backward passes parallelise over sequences, heads and blocks of keys: one sequence of every
    point against 256 keys gives them a handful of blocks, each summing its keys' gradients over all the points.
    As sequences, each sums over its own points, and autograd adds the sequences' sums (the keys are expanded)."""
    heads, n, d = q.shape
    count = -(-n // length)
    q = F.pad(q, (0, 0, 0, count * length - n)).view(heads, count, length, d).transpose(0, 1)
    # copies of the keys (count x 64 KiB at 256 x 4 x 32 in bf16): no fused kernel is promised a batch stride of 0
    k, v = k.expand(count, *k.shape).contiguous(), v.expand(count, *v.shape).contiguous()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(0, 1).reshape(heads, count * length, d)[:, :n]


def half_precision_autocast(device_type: str) -> bool:
    """Whether autocast runs this device's products in bfloat16 or float16 here."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (
        torch.bfloat16,
        torch.float16,
    )


def attend_block_diagonal(
    q: Float[Tensor, "n heads*d"], k: Float[Tensor, "m heads*d"], v: Float[Tensor, "m heads*d"], heads: int
) -> Float[Tensor, "n heads*d"]:
    """The explicit multi-head attention of 2-D inputs as two plain matrix products.

    Each head's keys (values) sit on the diagonal of one ``[heads*d, heads*m]`` (``[heads*m, heads*d]``) matrix,
    so the scores of all heads are one ``q @ K`` and the outputs one ``P @ V``. Same result as :func:`attend`
    for finite inputs (an inf in one head's keys would reach every head through the zero blocks), at ``heads``
    times the multiply-adds, which tensor cores absorb. The point is the backward pass: the gradients of the
    few keys and values shared by every query are reductions over all ``n`` queries, which batched GEMMs (one
    per head) run on a handful of GPU blocks, while a plain GEMM spreads them over the whole GPU. Twice
    differentiable, like every explicit path.
    """
    m, inner = k.shape
    dim_head = inner // heads
    keys = torch.block_diag(*k.view(m, heads, dim_head).permute(1, 2, 0).unbind(0))  # [heads*d, heads*m]
    values = torch.block_diag(*v.view(m, heads, dim_head).transpose(0, 1).unbind(0))  # [heads*m, heads*d]
    scores = (q @ keys) * dim_head**-0.5
    weights = scores.view(-1, heads, m).softmax(dim=-1).view(-1, heads * m)
    return weights @ values


class MultiHeadAttention(nn.Module):
    """Multi-head attention from ``query_dim`` inputs to a context (itself when none is given).

    ``block_diagonal``: the explicit path of 2-D inputs goes through :func:`attend_block_diagonal`.
    ``batch_fused``: the fused path of 2-D inputs adds the batch dimension torch's flash and memory-efficient
    kernels require (they take 4-D inputs only; torch runs a 3-D one through its unfused math kernel).
    ``point_kernels``: the explicit path of 2-D inputs goes through :func:`point_attention` (fused kernels,
    differentiable twice) instead, and so does the fused path of float32 CUDA inputs where no gradient is taken.
    ``sequence_length``: with ``batch_fused``, the fused path of 2-D inputs where gradients are taken cuts the
    points into sequences of that length (:func:`attend_in_sequences`); 0 keeps them one sequence.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 4,
        dim_head: int = 32,
        block_diagonal: bool = False,
        batch_fused: bool = False,
        point_kernels: bool = False,
        sequence_length: int = 0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.block_diagonal = block_diagonal
        self.batch_fused = batch_fused
        self.point_kernels = point_kernels
        self.sequence_length = sequence_length
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim or query_dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)

    @staticmethod
    def _point_kernels_beat_sdpa(q: Tensor) -> bool:
        """Where nothing is differentiated, float32 queries take the point kernels rather than torch's fused
        attention, which for float32 is its memory-efficient kernel: 1.8x slower a point on an H200 (42 ms for 6.4M
        points against the point kernels' 19 ms for 5.1M), and a third of a 512x512 frame's GPU time once the
        sampler's queries run in float32 (late in training). Only where the Triton kernels run (CUDA, no failure
        so far): their torch formulas would hold every point's scores. Their products follow torch's float32
        matmul precision (TF32 with ``tf32_matmul``, as the model's other float32 products). Half-precision
        queries keep the flash kernel, faster still."""
        return q.dtype == torch.float32 and not torch.is_grad_enabled() and point_ops.kernels_run(q)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def forward(
        self, x: Float[Tensor, "*b n dq"], context: Float[Tensor, "*b m dc"] | None = None, fused: bool = True
    ) -> Float[Tensor, "*b n dq"]:
        context = x if context is None else context
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q = self.to_q(x)
        if self.point_kernels and q.dim() == 2 and k.dim() == 2 and (not fused or self._point_kernels_beat_sdpa(q)):
            return self.to_out(point_attention(q, k, v, self.heads))
        if not fused and self.block_diagonal and q.dim() == 2 and k.dim() == 2:
            return self.to_out(attend_block_diagonal(q, k, v, self.heads))
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        if fused and self.batch_fused and q.dim() == 3 and k.dim() == 3:
            if self.sequence_length > 0 and torch.is_grad_enabled():
                out = attend_in_sequences(q, k, v, self.sequence_length)
            else:
                out = attend(q[None], k[None], v[None], fused)[0]
        else:
            out = attend(q, k, v, fused)
        return self.to_out(out.transpose(-2, -3).flatten(-2))


class GEGLU(nn.Module):
    """Gated GELU: half of the features gate the other half."""

    def forward(self, x: Tensor) -> Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


def layer_norm_var_mean(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Layer norm over the last dimension, written with ``torch.var_mean`` (what :class:`LayerNorm` infers with).

    Statistics and output in float32, as ``layer_norm`` under autocast."""
    x = x.float()
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose inference on CUDA rows of a width that is not a multiple of 4 (the 39-d point
    encodings) uses :func:`layer_norm_var_mean`: CUDA's layer-norm kernel takes a one-block-per-row path for such
    rows, 4x slower on the sampler's [131072, 39] queries (H200). Same formula; training keeps torch's kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not x.is_cuda or x.shape[-1] % 4 == 0 or len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm_var_mean(x, self.weight, self.bias, self.eps)


def make_activation(name: FeedForwardActivation) -> nn.Module:
    if name == "softplus":
        return nn.Softplus(beta=100)  # the SDF MLP's activation: smooth, so second derivatives exist
    if name == "gelu":
        return nn.GELU()
    if name == "geglu":
        return GEGLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"Unknown feed-forward activation {name!r}; expected softplus, gelu, geglu or relu.")


class FeedForward(nn.Module):
    """Pre-norm two-layer feed-forward, hidden width ``dim * mult`` (GEGLU doubles the first layer)."""

    def __init__(self, dim: int, mult: int = 1, activation: FeedForwardActivation = "geglu") -> None:
        super().__init__()
        hidden = dim * mult
        self.norm = LayerNorm(dim)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden * 2 if activation == "geglu" else hidden),
            make_activation(activation),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.norm(x))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross attention: both the queries and the context are layer-normalised."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        heads: int,
        dim_head: int,
        block_diagonal: bool = False,
        batch_fused: bool = False,
        point_kernels: bool = False,
        sequence_length: int = 0,
    ) -> None:
        super().__init__()
        self.norm = LayerNorm(query_dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.attention = MultiHeadAttention(
            query_dim,
            context_dim,
            heads=heads,
            dim_head=dim_head,
            block_diagonal=block_diagonal,
            batch_fused=batch_fused,
            point_kernels=point_kernels,
            sequence_length=sequence_length,
        )

    def forward(self, x: Tensor, context: Tensor, fused: bool = True) -> Tensor:
        return self.attention(self.norm(x), self.norm_context(context), fused=fused)


class SelfAttentionBlock(nn.Module):
    """Pre-norm self attention."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.norm = LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, heads=heads, dim_head=dim_head)

    def forward(self, x: Tensor, fused: bool = True) -> Tensor:
        return self.attention(self.norm(x), fused=fused)


class CodebookAttention(nn.Module):
    """Perceiver-style prototype extractor.

    Learned latent queries cross-attend once to the (frozen) codebook, then refine themselves with
    ``depth`` self-attention blocks. The result does not depend on any sample point, so callers
    compute it once per optimisation step and reuse it for every chunk of points.
    """

    def __init__(
        self,
        codebook_dim: int,
        num_latents: int = 256,
        latent_dim: int = 128,
        depth: int = 3,
        latent_heads: int = 4,
        latent_dim_head: int = 32,
        cross_heads: int = 4,
        cross_dim_head: int = 32,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.cross_attention = CrossAttentionBlock(latent_dim, codebook_dim, cross_heads, cross_dim_head)
        self.cross_feed_forward = FeedForward(latent_dim, mult=ff_mult, activation="geglu")
        self.self_attentions = nn.ModuleList(
            [SelfAttentionBlock(latent_dim, latent_heads, latent_dim_head) for _ in range(depth)]
        )
        self.feed_forwards = nn.ModuleList(
            [FeedForward(latent_dim, mult=ff_mult, activation="geglu") for _ in range(depth)]
        )

    def forward(self, codebook: Float[Tensor, "entries codebook_dim"], fused: bool = True) -> Float[Tensor, "k d"]:
        x = self.latents
        x = x + self.cross_attention(x, codebook.to(x.dtype), fused=fused)
        x = x + self.cross_feed_forward(x)
        for attention, feed_forward in zip(self.self_attentions, self.feed_forwards, strict=True):
            x = x + attention(x, fused=fused)
            x = x + feed_forward(x)
        return x


class CoordinateAttention(nn.Module):
    """Each query (an encoded point) attends to the prototypes ``depth`` times, residually.

    A feed-forward (``in -> in -> in``) follows the last block only, as in the original. The fused path runs
    the points as one sequence of queries against the prototypes, through torch's fused kernels.
    """

    def __init__(
        self,
        query_dim: int,
        prototype_dim: int = 128,
        depth: int = 1,
        heads: int = 4,
        dim_head: int = 32,
        activation: FeedForwardActivation = "softplus",
        feed_forward: bool = True,
        block_diagonal: bool = False,
        point_kernels: bool = False,
        sequence_length: int = 0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                CrossAttentionBlock(
                    query_dim,
                    prototype_dim,
                    heads,
                    dim_head,
                    block_diagonal,
                    batch_fused=True,
                    point_kernels=point_kernels,
                    sequence_length=sequence_length,
                )
                for _ in range(depth)
            ]
        )
        self.feed_forward = FeedForward(query_dim, mult=1, activation=activation) if feed_forward else None

    def forward(
        self, queries: Float[Tensor, "n dq"], prototypes: Float[Tensor, "k d"], fused: bool = True
    ) -> Float[Tensor, "n dq"]:
        x = queries
        for block in self.blocks:
            x = x + block(x, prototypes, fused=fused)
        if self.feed_forward is not None:
            x = x + self.feed_forward(x)
        return x
