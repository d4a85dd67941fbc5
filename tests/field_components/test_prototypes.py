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
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    bank = PrototypeBank(torch.randn(32, 16), HEADS, CodebookAttentionSettings(num_latents=4, latent_dim=16, depth=1))
    bank.train()
    expected = {head: bank.compute(head) for head in HEADS}
    bank.enable_torch_compile("aot_eager")

    def no_eager_form(codebook):
        raise AssertionError("the heads ran one after another, not batched and compiled")

    bank._compute_each = no_eager_form  # the fallback would land here
    torch._dynamo.reset()
    counters.clear()
    try:
        bank.refresh()
        assert not bank._compiled_all.failed and counters["stats"]["unique_graphs"] > 0
    finally:
        torch._dynamo.reset()
    for head in HEADS:
        torch.testing.assert_close(bank.get(head), expected[head], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU kernels need CUDA")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_compiled_batched_heads_on_gpu_match_eager(fused):
    """The paper's sizes: inductor's kernels for the batched pass (CUDA's batched SDPA included) against eager."""
    torch.manual_seed(0)
    codebook = torch.randn(16384, 256)
    bank = PrototypeBank(codebook, HEADS, CodebookAttentionSettings(), fused_attention=fused).cuda().train()
    params = list(bank.parameters())
    expected = [bank.compute(head) for head in HEADS]
    expected_grads = torch.autograd.grad(sum(p.square().mean() for p in expected), params)
    bank.enable_torch_compile()
    try:
        bank.refresh()
        assert not bank._compiled_all.failed
        ours = [bank.get(head) for head in HEADS]
        grads = torch.autograd.grad(sum(p.square().mean() for p in ours), params)
    finally:
        torch._dynamo.reset()
    for mine, theirs in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5 * max(1.0, float(theirs.abs().max())))
