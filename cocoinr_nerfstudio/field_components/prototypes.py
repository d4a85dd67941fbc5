"""The codebook prior: one frozen codebook, one codebook-attention module per head, cached prototypes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cocoinr_nerfstudio.codebook import CodebookError
from cocoinr_nerfstudio.field_components.attention import CodebookAttention
from cocoinr_nerfstudio.field_components.compilation import CompiledOrEager


@dataclass
class CodebookAttentionSettings:
    """Shape of every codebook-attention module (the paper's values)."""

    num_latents: int = 256
    latent_dim: int = 128
    depth: int = 3
    latent_heads: int = 4
    latent_dim_head: int = 32
    cross_heads: int = 4
    cross_dim_head: int = 32
    ff_mult: int = 4


class PrototypeBank(nn.Module):
    """Holds the single codebook copy and turns it into per-head prototypes.

    Prototypes do not depend on sample points. In training they are recomputed once per step by
    :meth:`refresh` (with gradients, shared by the sampler, the render pass and the eikonal points);
    in evaluation they are computed on first use and cached until the module trains again or loads
    new weights, so a frame rendered in many chunks pays for them once. ``cache=False`` recomputes them
    on every use, as the original does (kept as the reference for benchmarks).
    """

    def __init__(
        self,
        codebook: Tensor,
        heads: Sequence[str],
        settings: CodebookAttentionSettings,
        fused_attention: bool = True,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.cache = cache
        # persistent: checkpoints carry the codebook once, so they stay self-describing
        self.register_buffer("codebook", codebook.detach().clone().float(), persistent=True)
        self.fused_attention = fused_attention
        self.attentions = nn.ModuleDict(
            {
                head: CodebookAttention(
                    codebook_dim=codebook.shape[1],
                    num_latents=settings.num_latents,
                    latent_dim=settings.latent_dim,
                    depth=settings.depth,
                    latent_heads=settings.latent_heads,
                    latent_dim_head=settings.latent_dim_head,
                    cross_heads=settings.cross_heads,
                    cross_dim_head=settings.cross_dim_head,
                    ff_mult=settings.ff_mult,
                )
                for head in heads
            }
        )
        self._cache: dict[str, Tensor] = {}
        self._compiled_all: CompiledOrEager | None = None
        self.awaiting_checkpoint = False
        """True while ``codebook`` is a placeholder that a checkpoint must replace (the file was not found)."""

    def enable_torch_compile(
        self, backend: str = "inductor", pad_matmuls: bool = False, mix_order_reduction: bool = True
    ) -> None:
        """Compute the per-step prototypes of every head in one ``torch.compile``d function: a few hundred small
        kernels (layer norms, GEGLUs, residual adds over 256 latents) become a few fused ones. Where the backend
        cannot compile, it says so and they run eagerly. Applies to :meth:`refresh` (``cache``), not to the
        uncached per-call prototypes of the reference configuration. ``pad_matmuls``, ``mix_order_reduction``: see
        :class:`CompiledOrEager`."""
        self._compiled_all = CompiledOrEager(
            self._compute_all,
            backend,
            "the prototypes",
            eager=self._compute_each,
            pad_matmuls=pad_matmuls,
            mix_order_reduction=mix_order_reduction,
        )

    def _check_codebook(self) -> None:
        if self.awaiting_checkpoint:
            raise CodebookError(
                "No codebook: its file was not found and no checkpoint (which would carry it) has been loaded."
            )

    def _attend(self, attention: CodebookAttention, codebook: Tensor) -> Tensor:
        """One head's prototypes in float32 whatever autocast the caller runs under (the bf16 colour heads):
        cached, uncached and per-step prototypes are then the same numbers."""
        with torch.autocast(codebook.device.type, enabled=False):
            return attention(codebook, fused=self.fused_attention)

    def compute(self, head: str) -> Tensor:
        """Prototypes for ``head`` from the current weights (no caching)."""
        self._check_codebook()
        return self._attend(self.attentions[head], self.codebook)

    def _compute_each(self, codebook: Tensor) -> tuple[Tensor, ...]:
        """Every head, one after another: the eager form (no stacked copies of the weights)."""
        return tuple(self._attend(attention, codebook) for attention in self.attentions.values())

    def _compute_all(self, codebook: Tensor) -> tuple[Tensor, ...]:
        """Every head in one batched pass (``torch.func.vmap`` over the heads' stacked weights): one kernel does
        what one kernel per head did. The stacks are built from the parameters inside the function, so gradients
        reach each head's own weights; ``strict`` makes a module that gains a buffer fail here rather than share
        head 0's."""
        modules = list(self.attentions.values())
        names = [name for name, _ in modules[0].named_parameters()]
        stacked = {name: torch.stack([module.get_parameter(name) for module in modules]) for name in names}

        def one_head(params: dict[str, Tensor]) -> Tensor:
            return torch.func.functional_call(
                modules[0], params, (codebook,), {"fused": self.fused_attention}, strict=True
            )

        with torch.autocast(codebook.device.type, enabled=False):
            return tuple(torch.func.vmap(one_head)(stacked).unbind(0))

    def refresh(self) -> None:
        """Recomputes every head's prototypes; call once at the start of each training step."""
        if not self.cache:
            return
        self._check_codebook()
        compute_all = self._compute_each if self._compiled_all is None else self._compiled_all
        self._cache = dict(zip(self.attentions, compute_all(self.codebook), strict=True))

    def invalidate(self) -> None:
        self._cache = {}

    def __getstate__(self) -> dict:
        """Copies leave the cached prototypes out: after a training step they are non-leaf tensors of that step's
        graph, which cannot be copied; the copy recomputes them on use."""
        return {**super().__getstate__(), "_cache": {}}

    def get(self, head: str) -> Tensor:
        cached: Tensor | None = self._cache.get(head)
        if cached is not None:
            return cached
        if self.training or not self.cache:
            return self.compute(head)  # uncached: what the original does on every call of every head
        with torch.no_grad():
            self._cache[head] = self.compute(head)
        return self._cache[head]

    def train(self, mode: bool = True) -> PrototypeBank:
        self.invalidate()
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        self.invalidate()
        key = prefix + "codebook"
        self.awaiting_checkpoint = self.awaiting_checkpoint and key not in state_dict
        if key in state_dict and state_dict[key].shape != self.codebook.shape:
            # a checkpoint's codebook wins: resize so it can be copied in
            self.codebook = torch.empty_like(state_dict[key], device=self.codebook.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
