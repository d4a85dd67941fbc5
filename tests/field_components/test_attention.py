"""Attention blocks: shapes, the fused/explicit agreement, and the invariances the method relies on."""

import pytest
import torch

from cocoinr_nerfstudio.field_components import triton_point_attention as triton_kernels
from cocoinr_nerfstudio.field_components.attention import (
    CodebookAttention,
    CoordinateAttention,
    MultiHeadAttention,
    attend,
    attend_block_diagonal,
    attend_in_sequences,
    layer_norm_var_mean,
)

TOLERANCE = 1e-5  # fused (SDPA) vs explicit softmax(QK^T)V, float32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_attend_fused_matches_explicit():
    q, k, v = torch.randn(4, 50, 32), torch.randn(4, 70, 32), torch.randn(4, 70, 32)
    fused, explicit = attend(q, k, v, fused=True), attend(q, k, v, fused=False)
    assert fused.shape == (4, 50, 32)
    torch.testing.assert_close(fused, explicit, atol=TOLERANCE, rtol=TOLERANCE)


def test_attend_uniform_keys_average_values():
    """Identical keys give uniform attention: every output is the mean of the values."""
    q, k, v = torch.randn(1, 3, 8), torch.ones(1, 5, 8), torch.arange(5.0)[None, :, None].expand(1, 5, 8)
    out = attend(q, k, v, fused=False)
    torch.testing.assert_close(out, torch.full((1, 3, 8), 2.0))


def test_multi_head_attention_shapes_and_paths():
    attention = MultiHeadAttention(query_dim=39, context_dim=128, heads=4, dim_head=32)
    x, context = torch.randn(100, 39), torch.randn(256, 128)
    fused, explicit = attention(x, context, fused=True), attention(x, context, fused=False)
    assert fused.shape == (100, 39)
    torch.testing.assert_close(fused, explicit, atol=TOLERANCE, rtol=TOLERANCE)
    assert attention.to_q.weight.shape == (128, 39) and attention.to_kv.weight.shape == (256, 128)


def test_coordinate_attention_gives_the_fused_kernels_4d_inputs(monkeypatch):
    """torch's flash and memory-efficient kernels take 4-D inputs only (3-D ones run its unfused math kernel): the
    fused path of coordinate attention passes the points as one batch of one sequence, and still matches the
    explicit path, in both its forms."""
    from cocoinr_nerfstudio.field_components import attention as module

    shapes = []
    sdpa = module.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", recording_sdpa)
    points, prototypes = torch.randn(50, 39), torch.randn(256, 128)
    for block_diagonal in (False, True):
        block = CoordinateAttention(query_dim=39, prototype_dim=128, depth=2, block_diagonal=block_diagonal)
        shapes.clear()
        fused, explicit = block(points, prototypes, fused=True), block(points, prototypes, fused=False)
        assert shapes == [((1, 4, 50, 32), (1, 4, 256, 32))] * 2  # two blocks; the explicit pass calls none
        torch.testing.assert_close(fused, explicit, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("n, length", [(10, 4), (8, 4), (3, 8), (1, 1)], ids=["ragged", "exact", "short", "one"])
def test_attention_in_sequences_has_one_sequences_values_and_gradients(n, length):
    """Cutting the points into sequences (the last padded) changes which kernel blocks sum the keys' gradients, not
    the values or any gradient."""
    q, k, v = (torch.randn(2, size, 8, dtype=torch.float64, requires_grad=True) for size in (n, 5, 5))
    split = attend_in_sequences(q, k, v, length)
    whole = attend(q[None], k[None], v[None], fused=True)[0]
    assert split.shape == (2, n, 8)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(split)
    ours = torch.autograd.grad(split, (q, k, v), cotangent)
    theirs = torch.autograd.grad(whole, (q, k, v), cotangent)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_coordinate_attention_cuts_differentiated_fused_passes_into_sequences(monkeypatch):
    """With a sequence length, the fused path takes sequences where gradients are taken (the training backward is
    what they are for) and one sequence where none are; both match the explicit path."""
    from cocoinr_nerfstudio.field_components import attention as module

    shapes = []
    sdpa = module.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        shapes.append(tuple(q.shape))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", recording_sdpa)
    block = CoordinateAttention(query_dim=39, prototype_dim=128, depth=1, point_kernels=True, sequence_length=16)
    points, prototypes = torch.randn(50, 39, requires_grad=True), torch.randn(256, 128)
    fused = block(points, prototypes, fused=True)
    assert shapes == [(4, 4, 16, 32)]  # 50 points: four sequences of 16, the last padded
    explicit = block(points, prototypes, fused=False)
    torch.testing.assert_close(fused, explicit, atol=TOLERANCE, rtol=TOLERANCE)
    gradients = [torch.autograd.grad(out.square().sum(), points)[0] for out in (fused, explicit)]
    torch.testing.assert_close(*gradients, atol=TOLERANCE, rtol=TOLERANCE)
    with torch.no_grad():
        block(points, prototypes, fused=True)
    assert shapes[-1] == (1, 4, 50, 32)


def test_codebook_attention_output_and_parameter_count():
    attention = CodebookAttention(codebook_dim=256, num_latents=256, latent_dim=128, depth=3)
    prototypes = attention(torch.randn(1000, 256))
    assert prototypes.shape == (256, 128)
    # latents 256x128; cross block: 2 norms (128, 256) + q 128x128 + kv 256x256 + out 128x128+128;
    # 4 GEGLU feed-forwards (norm, 128->1024, 512->128); 3 self-attention blocks (norm, q, kv 128x256, out)
    ff = 2 * 128 + (128 * 1024 + 1024) + (512 * 128 + 128)
    cross = 2 * 128 + 2 * 256 + 128 * 128 + 256 * 256 + 128 * 128 + 128
    self_attn = 2 * 128 + 128 * 128 + 128 * 256 + 128 * 128 + 128
    expected = 256 * 128 + cross + 4 * ff + 3 * self_attn
    assert sum(p.numel() for p in attention.parameters()) == expected


def test_codebook_attention_ignores_codebook_order():
    """No positional information: prototypes are a function of the codebook as a set."""
    attention = CodebookAttention(codebook_dim=16, num_latents=8, latent_dim=32, depth=2)
    codebook = torch.randn(64, 16)
    permuted = codebook[torch.randperm(64)]
    torch.testing.assert_close(attention(codebook), attention(permuted), atol=TOLERANCE, rtol=TOLERANCE)


def test_coordinate_attention_is_pointwise():
    """Permuting the points permutes the outputs, and each output only depends on its own point."""
    block = CoordinateAttention(query_dim=39, prototype_dim=128, depth=2, activation="gelu")
    points, prototypes = torch.randn(50, 39), torch.randn(256, 128)
    out = block(points, prototypes)
    perm = torch.randperm(50)
    torch.testing.assert_close(block(points[perm], prototypes), out[perm], atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(block(points[:7], prototypes), out[:7], atol=TOLERANCE, rtol=TOLERANCE)


def test_coordinate_attention_starts_from_the_identity_when_switched_off():
    """Residual blocks: zero output projections leave the queries untouched."""
    block = CoordinateAttention(query_dim=10, prototype_dim=16, depth=1, activation="softplus")
    with torch.no_grad():
        for sub in block.blocks:
            sub.attention.to_out.weight.zero_()
            sub.attention.to_out.bias.zero_()
        block.feed_forward.net[-1].weight.zero_()
        block.feed_forward.net[-1].bias.zero_()
    x = torch.randn(5, 10)
    torch.testing.assert_close(block(x, torch.randn(7, 16)), x)


def test_explicit_path_has_second_derivatives():
    """The SDF's gradient enters the eikonal loss: attention must be twice differentiable there."""
    block = CoordinateAttention(query_dim=3, prototype_dim=4, depth=1, heads=2, dim_head=2).double()
    prototypes = torch.randn(5, 4, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda p: block(p, prototypes, fused=False).sum(-1), (x,))


def test_block_diagonal_attention_matches_batched_heads():
    q, k, v = torch.randn(50, 128), torch.randn(70, 128), torch.randn(70, 128)
    split = lambda x: x.unflatten(-1, (4, 32)).transpose(0, 1)  # noqa: E731
    expected = attend(split(q), split(k), split(v), fused=False).transpose(0, 1).flatten(-2)
    torch.testing.assert_close(attend_block_diagonal(q, k, v, heads=4), expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_block_diagonal_coordinate_attention_has_the_same_first_and_second_derivatives():
    """The geometry head's path: d(out)/dx and the eikonal-style second derivative into the prototypes."""
    batched = CoordinateAttention(39, 16, depth=2, activation="softplus", block_diagonal=False)
    blocked = CoordinateAttention(39, 16, depth=2, activation="softplus", block_diagonal=True)
    blocked.load_state_dict(batched.state_dict())
    x0, prototypes0 = torch.randn(30, 39), torch.randn(20, 16)
    results = []
    for module in (batched, blocked):
        x, prototypes = x0.clone().requires_grad_(True), prototypes0.clone().requires_grad_(True)
        out = module(x, prototypes, fused=False)
        (grad_x,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(grad_x.square().sum(), prototypes)
        results.append((out, grad_x, second))
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
    assert results[0][2].abs().max() > 0  # the check is not vacuous


@pytest.mark.parametrize("affine", [True, False])
def test_var_mean_layer_norm_matches_torch(affine):
    norm = torch.nn.LayerNorm(39, elementwise_affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(100, 39) * 3 + 1
    expected = norm(x)
    got = layer_norm_var_mean(x, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the var_mean inference path is taken on CUDA only")
def test_layer_norm_inference_path_on_cuda_matches_torch():
    from cocoinr_nerfstudio.field_components.attention import LayerNorm

    norm = LayerNorm(39).cuda()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(1000, 39, device="cuda") * 3 + 1
    with torch.no_grad():
        got = norm(x)
    torch.testing.assert_close(
        got, torch.nn.functional.layer_norm(x, (39,), norm.weight, norm.bias), atol=1e-5, rtol=1e-5
    )


def test_fused_float32_attention_without_gradients_takes_the_point_kernels(monkeypatch):
    """With point_kernels, a fused pass of float32 CUDA queries where nothing is differentiated takes the point
    kernels (faster than torch's float32 memory-efficient kernel); bf16, differentiated passes and CPU tensors keep
    torch's fused kernels. The route taken gives the fused path's numbers."""
    from types import SimpleNamespace

    from cocoinr_nerfstudio.field_components import attention as module
    from cocoinr_nerfstudio.field_components import point_attention as point_ops

    def query(dtype, cuda):
        return SimpleNamespace(dtype=dtype, is_cuda=cuda)

    beats = MultiHeadAttention._point_kernels_beat_sdpa
    monkeypatch.setattr(point_ops.kernels, "AVAILABLE", True)
    with torch.no_grad():
        assert beats(query(torch.float32, True))
        assert not beats(query(torch.bfloat16, True)) and not beats(query(torch.float16, True))
        assert not beats(query(torch.float32, False))
        monkeypatch.setattr(point_ops, "_kernel_failure", ["RuntimeError: no kernel image"])
        assert not beats(query(torch.float32, True))  # failed kernels: their torch formulas would hold every score
        monkeypatch.setattr(point_ops, "_kernel_failure", [])
        monkeypatch.setattr(point_ops.kernels, "AVAILABLE", False)
        assert not beats(query(torch.float32, True))  # no Triton
        monkeypatch.setattr(point_ops.kernels, "AVAILABLE", True)
    assert not beats(query(torch.float32, True))  # a gradient is being taken

    calls = []
    point_attention = module.point_attention

    def recording_point_attention(q, k, v, heads):
        calls.append(tuple(q.shape))
        return point_attention(q, k, v, heads)

    monkeypatch.setattr(module, "point_attention", recording_point_attention)
    attention = MultiHeadAttention(query_dim=39, context_dim=128, heads=4, dim_head=32, point_kernels=True)
    x, context = torch.randn(100, 39), torch.randn(256, 128)
    with torch.no_grad():
        sdpa = attention(x, context, fused=True)
        assert calls == []  # CPU tensors: torch's fused kernel
        monkeypatch.setattr(MultiHeadAttention, "_point_kernels_beat_sdpa", staticmethod(lambda q: True))
        points = attention(x, context, fused=True)
    assert calls == [(100, 128)]
    torch.testing.assert_close(points, sdpa, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_kernels.AVAILABLE, reason="the point kernels' route: CUDA and Triton"
)
@pytest.mark.parametrize("precision, tolerance", [("highest", TOLERANCE), ("high", 5e-3)])
def test_point_kernel_route_on_gpu_matches_torchs_fused_attention(precision, tolerance, monkeypatch):
    """On CUDA, a fused float32 pass without gradients goes through the point kernels and gives torch's fused
    attention's numbers: to float32 rounding with float32 products (torch's default), to TF32's with ``high``
    (what ``tf32_matmul`` sets); with a gradient, torch's kernel."""
    from cocoinr_nerfstudio.field_components import attention as module

    calls = []
    point_attention = module.point_attention
    monkeypatch.setattr(module, "point_attention", lambda *args: calls.append(1) or point_attention(*args))
    torch.manual_seed(0)
    modules = [
        MultiHeadAttention(query_dim=39, context_dim=128, heads=4, dim_head=32, point_kernels=flag).cuda()
        for flag in (True, False)
    ]
    modules[1].load_state_dict(modules[0].state_dict())
    x, context = torch.randn(5000, 39, device="cuda"), torch.randn(256, 128, device="cuda")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # set here: a model built earlier may have left TF32 on
    try:
        with torch.no_grad():
            routed, sdpa = (attention(x, context, fused=True) for attention in modules)
    finally:
        torch.set_float32_matmul_precision(before)
    assert calls == [1]
    torch.testing.assert_close(routed, sdpa, atol=tolerance, rtol=tolerance)
    modules[0](x, context, fused=True)  # a gradient is taken: torch's fused kernel
    assert calls == [1]
