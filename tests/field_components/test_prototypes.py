"""The prototype bank's batched pass over all heads (what compile-fields runs) equals the heads one by one."""

from __future__ import annotations

import pytest
import torch

from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings, PrototypeBank

HEADS = ("geometry", "color", "background_density", "background_color")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_batched_heads_equal_each_head_alone_with_gradients(fused):
    torch.manual_seed(0)
    codebook = torch.randn(48, 16, dtype=torch.float64)
    settings = CodebookAttentionSettings(num_latents=8, latent_dim=16, depth=2, ff_mult=2)
    bank = PrototypeBank(codebook, HEADS, settings, fused_attention=fused).double().train()
    for index, attention in enumerate(bank.attentions.values()):  # heads that differ, so a mix-up shows
        with torch.no_grad():
            for param in attention.parameters():
                param.add_(0.1 * (index + 1) * torch.randn_like(param))
    params = list(bank.parameters())
    weights = torch.linspace(0.5, 2.0, len(HEADS), dtype=torch.float64)

    def loss(prototypes) -> torch.Tensor:
        return sum(w * p.square().mean() for w, p in zip(weights, prototypes, strict=True))

    batched = bank._compute_all(bank.codebook)
    alone = [bank.compute(head) for head in HEADS]
    assert [p.shape for p in batched] == [(8, 16)] * len(HEADS)
    for ours, theirs in zip(batched, alone, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(loss(batched), params)
    expected = torch.autograd.grad(loss(alone), params)
    assert all(g.abs().sum() > 0 for g in grads)  # every head's own weights get their gradient
    for ours, theirs in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_refresh_uses_the_compiled_batched_pass():
    torch.manual_seed(0)
    bank = PrototypeBank(torch.randn(32, 16), HEADS, CodebookAttentionSettings(num_latents=4, latent_dim=16, depth=1))
    bank.train()
    expected = {head: bank.compute(head) for head in HEADS}
    calls = []
    bank.enable_torch_compile("aot_eager")
    compiled = bank._compiled_all
    bank._compiled_all = lambda codebook: calls.append(1) or compiled(codebook)
    try:
        bank.refresh()
    finally:
        torch._dynamo.reset()
    assert calls == [1]
    for head in HEADS:
        torch.testing.assert_close(bank.get(head), expected[head], rtol=1e-5, atol=1e-6)
