"""Positional encoding layout and the SDF MLP's geometric initialisation."""

import functools
import math

import pytest
import torch

from cocoinr_nerfstudio.field_components.encodings import IDRFrequencyEncoding
from cocoinr_nerfstudio.field_components.mlp import SDFMLP, WeightNormLinear, _first_rows

# Zero level set of the initial SDF vs the sphere of radius ``bias`` (radius step 0.01):
WIDE_SPHERE_TOLERANCE = 0.08  # ReLU, width 2048: measured crossings 0.58-0.66 for bias 0.6
PAPER_WIDTH_MEDIAN_TOLERANCE = 0.25  # softplus, width 256: medians measured 0.46-0.69 (bias 0.6) over 6 seeds


def test_encoding_layout_raw_input_first_no_two_pi():
    encoding = IDRFrequencyEncoding(in_dim=3, num_frequencies=6)
    assert encoding.get_out_dim() == 39
    x = torch.tensor([[0.1, -0.2, 0.3]])
    out = encoding(x)
    torch.testing.assert_close(out[:, :3], x)
    # frequency 2^k: sin then cos, for all three coordinates
    for k in range(6):
        block = out[0, 3 + 6 * k : 9 + 6 * k]
        torch.testing.assert_close(block[:3], torch.sin(x[0] * 2**k))
        torch.testing.assert_close(block[3:], torch.cos(x[0] * 2**k))


def test_background_encoding_width():
    assert IDRFrequencyEncoding(in_dim=4, num_frequencies=10).get_out_dim() == 84


def test_weight_norm_linear_reproduces_linear_at_init():
    linear = torch.nn.Linear(5, 4)
    wrapped = WeightNormLinear(linear)
    x = torch.randn(3, 5)
    torch.testing.assert_close(wrapped(x), linear(x))
    assert {name for name, _ in wrapped.named_parameters()} == {"direction", "gain", "bias"}


def _crossing_radii(mlp: SDFMLP, num_directions: int = 200):
    """Radius at which the SDF first turns positive along random directions from the origin."""
    encoding = IDRFrequencyEncoding(3, 6)
    directions = torch.nn.functional.normalize(torch.randn(num_directions, 3), dim=-1)
    radii = torch.linspace(0.0, 2.0, 201)
    points = directions[:, None, :] * radii[None, :, None]
    # the attention half of the input (zeros here) is switched off at init anyway
    features = torch.cat([encoding(points), torch.zeros(num_directions, 201, 39)], dim=-1)
    with torch.no_grad():
        sdf = mlp(features)[..., 0]
    assert (sdf[:, 0] < 0).all() and (sdf[:, -1] > 0).all(), "inside must be negative, far points positive"
    return radii[(sdf > 0).float().argmax(dim=1)]


def test_geometric_init_is_a_sphere_of_radius_bias():
    """The init formula's known answer: a wide ReLU network is the SDF of a sphere of radius ``bias``."""
    torch.manual_seed(0)
    mlp = SDFMLP(in_dim=78, hidden_dims=(2048,) * 4, out_dim=257, bias=0.6, activation=torch.nn.ReLU())
    radii = _crossing_radii(mlp)
    assert (radii - 0.6).abs().max() <= WIDE_SPHERE_TOLERANCE


def test_geometric_init_with_the_papers_width_is_a_rough_sphere():
    """Width 256 with softplus(100) (the paper's MLP): a sphere up to finite-width noise."""
    for seed, bias in [(0, 0.6), (1, 0.6), (2, 1.0)]:
        torch.manual_seed(seed)
        radii = _crossing_radii(SDFMLP(in_dim=78, hidden_dims=(256,) * 4, out_dim=257, bias=bias))
        assert abs(radii.median() - bias) <= PAPER_WIDTH_MEDIAN_TOLERANCE * bias
        assert radii.min() >= 0.5 * bias and radii.max() <= 1.6 * bias


def test_geometric_init_ignores_all_but_xyz():
    mlp = SDFMLP(in_dim=78, hidden_dims=(128,) * 8, out_dim=5, skip_in=(4,), bias=0.6)
    x = torch.randn(10, 78)
    y = x.clone()
    y[:, 3:] = torch.randn(10, 75)
    torch.testing.assert_close(mlp(x), mlp(y))


def test_skip_connection_concatenates_the_input():
    """The original concatenated Python's builtin ``input`` and crashed; ours re-reads the MLP input."""
    mlp = SDFMLP(in_dim=6, hidden_dims=(16,) * 4, out_dim=1, skip_in=(2,), geometric_init=False, weight_norm=False)
    assert mlp.layers[1].out_features == 16 - 6 and mlp.layers[2].in_features == 16
    x = torch.randn(3, 6)
    h = mlp.activation(mlp.layers[1](mlp.activation(mlp.layers[0](x))))
    h = mlp.layers[2](torch.cat([h, x], -1) / math.sqrt(2))
    h = mlp.layers[3](mlp.activation(h))
    expected = mlp.layers[4](mlp.activation(h))
    torch.testing.assert_close(mlp(x), expected)


def test_sdf_column_alone_is_the_first_output_column():
    """``outputs=1`` (what SDF queries ask for) gives the full network's first column, eagerly and when traced by
    torch.compile (there a weighted sum instead of a one-row product), with and without weight normalisation, and
    gradients flow to the last layer's first row only."""
    torch.manual_seed(0)
    for weight_norm in (True, False):
        mlp = SDFMLP(in_dim=10, hidden_dims=(16, 16, 16), out_dim=9, skip_in=(2,), weight_norm=weight_norm)
        x = torch.randn(50, 10)
        full = mlp(x)
        compiled = torch.compile(functools.partial(mlp, outputs=1), backend="aot_eager", fullgraph=True)
        for sdf in (mlp(x, outputs=1), compiled(x)):
            assert sdf.shape == (50, 1)
            torch.testing.assert_close(sdf, full[:, :1], rtol=1e-6, atol=1e-6)
        mlp.zero_grad()
        mlp(x, outputs=1).sum().backward()
        last = mlp.layers[-1]
        last_weight = last.direction if weight_norm else last.weight
        assert last_weight.grad[1:].abs().max() == 0 and last_weight.grad[0].abs().max() > 0


def test_sdf_column_alone_rounds_as_autocast_and_keeps_float64():
    """The compiled form of the SDF column: under autocast, bf16 operands and output as F.linear's, and the same
    formula as the eager SDF column (what the precision probe measures); float64 stays float64."""
    torch.manual_seed(0)
    mlp = SDFMLP(in_dim=10, hidden_dims=(16, 16), out_dim=5, weight_norm=False)
    compiled = torch.compile(lambda points: mlp(points, outputs=1), backend="aot_eager", fullgraph=True)
    x = torch.randn(64, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, traced, column = mlp(x)[:, :1], compiled(x), mlp(x, outputs=1)
    assert traced.dtype == eager.dtype == torch.bfloat16
    assert (traced.float() - eager.float()).abs().max() <= 2 * eager.float().abs().max() * 2**-8  # one bf16 step
    assert torch.equal(column, traced)
    mlp64 = mlp.double()
    compiled64 = torch.compile(lambda points: mlp64(points, outputs=1), backend="aot_eager", fullgraph=True)
    x64 = x.double()
    assert compiled64(x64).dtype == torch.float64
    torch.testing.assert_close(compiled64(x64), mlp64(x64)[:, :1], rtol=1e-12, atol=1e-12)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sdf_column_sums_in_float32_when_its_terms_cancel(device, dtype):
    """Under half-precision autocast the SDF column alone is the exact sum of the rounded products, rounded once:
    near a surface 256 terms of about 0.1 cancel against the bias to about 1e-3. cuBLAS's one-column product in
    half precision (CUDA) rounded the terms' sum to half precision before adding the bias and was off by up to 4e-3
    here."""
    generator = torch.Generator().manual_seed(0)
    mlp = SDFMLP(in_dim=3, hidden_dims=(256,), out_dim=4, weight_norm=False).to(device)
    x = (torch.rand(1, 256, generator=generator) + 1e-3 * torch.rand(1024, 256, generator=generator)).to(device)
    last = mlp.layers[-1]
    with torch.no_grad():
        last.weight[0] = 0.11 + 0.01 * torch.randn(256, generator=generator)
        last.bias[0] = -float((x.double() @ last.weight[0].double().to(dtype).double()).mean())
    rounded = [tensor.detach().to(dtype).double() for tensor in (x, last.weight[0], last.bias[0])]
    exact = (rounded[0] @ rounded[1] + rounded[2])[:, None]
    magnitude = (rounded[0].abs() @ rounded[1].abs())[:, None]  # about 14: the terms cancel to 1e-3 of it
    assert (exact.abs() < 0.1).all() and (magnitude > 10).all()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        sdf = _first_rows(last, x, 1)  # the SDF column of SDFMLP.forward(outputs=1), x as its last hidden layer
    assert sdf.dtype == dtype
    # one rounding of the output, and a float32 sum's typical error (sqrt(256) roundings of the running sum)
    bound = torch.finfo(dtype).eps * exact.abs() + 16 * 2**-24 * magnitude
    assert ((sdf.double() - exact).abs() <= bound).all()


def test_an_eager_weighted_sum_in_chunks_is_the_whole_one(monkeypatch):
    """Eager SDF columns are summed a chunk of rows at a time (bounded float32 copies): the same values, bit for
    bit, and the same shape, for any leading shape."""
    from cocoinr_nerfstudio.field_components import mlp as mlp_module

    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((5, 7, 32), (32,), (1,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = mlp_module._weighted_sum(x, weight, bias)
        monkeypatch.setattr(mlp_module, "EAGER_SUM_ROWS", 4)  # 35 rows: 9 chunks, the last of 3
        chunked = mlp_module._weighted_sum(x, weight, bias)
    assert chunked.shape == whole.shape == (5, 7, 1) and chunked.dtype == torch.bfloat16
    assert torch.equal(chunked, whole)
