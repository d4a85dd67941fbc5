"""The half-precision sampler-query check's parts: fixed probe points, the error measure, the threshold."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cocoinr_nerfstudio.model_components.sampler_precision import (
    HALF_DTYPES,
    on_surface,
    onto_surface,
    probe_points,
    rounding_error,
    rounding_is_safe,
    surface_rounding_error,
)


def test_probe_points_are_fixed_and_fill_the_ball():
    points = probe_points(3.0, "cpu")
    assert points.shape == (4096, 3) and torch.equal(points, probe_points(3.0, "cpu"))  # every check, every rank
    radii = points.norm(dim=-1)
    assert float(radii.max()) <= 3.0
    # uniform in volume: the share inside half the radius is 1/8
    assert abs(float((radii < 1.5).float().mean()) - 0.125) < 0.02
    torch.testing.assert_close(probe_points(1.0, "cpu", num=16), probe_points(3.0, "cpu", num=16) / 3.0)


def test_the_error_is_the_quantile_of_what_autocast_rounds():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(1000, 3, generator=generator)
    weight = torch.randn(1, 3, generator=generator)

    def sdf(x):
        return F.linear(x, weight)  # autocast runs linear layers in bf16

    rounded = F.linear(points.bfloat16(), weight.bfloat16()).float()
    expected = torch.quantile((rounded - F.linear(points, weight)).abs().flatten(), 0.99)
    assert rounding_error(sdf, points) == (float(expected),) and float(expected) > 0
    median, largest = rounding_error(sdf, points, quantiles=(0.5, 1.0))
    assert largest == float((rounded - sdf(points)).abs().max()) and 0 < median < largest
    assert rounding_error(lambda x: x.norm(dim=-1) - 1.0, points) == (0.0,)  # no autocast op: nothing rounded

    # float16: the same products rounded to 10 mantissa bits instead of 7
    (fp16,) = rounding_error(sdf, points, torch.float16)
    expected = torch.quantile((F.linear(points.half(), weight.half()).float() - sdf(points)).abs().flatten(), 0.99)
    assert fp16 == float(expected) and 0 < fp16 < float(rounded.sub(sdf(points)).abs().quantile(0.99)) / 4


def test_an_overflow_is_an_infinite_error_however_rare():
    """One query of 1000 past float16's largest value (65504): inf, though the 99th percentile is 0."""
    points = torch.zeros(1000, 3)
    points[0, 0] = 1.0

    def sdf(x):
        return F.linear(x, torch.tensor([[7e4, 0.0, 0.0]]))

    assert rounding_error(sdf, points, torch.float16, quantiles=(0.5, 0.99)) == (math.inf, math.inf)
    assert rounding_error(sdf, points, torch.bfloat16) == (0.0,)  # bf16 has float32's range
    assert not rounding_is_safe(math.inf, beta=0.1, max_share=0.25)
    assert HALF_DTYPES == {"bfloat16": torch.bfloat16, "float16": torch.float16}


def test_half_precision_is_safe_up_to_the_share_of_beta():
    assert rounding_is_safe(1e-3, beta=0.01, max_share=0.1)
    assert not rounding_is_safe(1.01e-3, beta=0.01, max_share=0.1)
    assert not rounding_is_safe(1e-9, beta=0.01, max_share=0.0)
    assert rounding_is_safe(1.0, beta=1e-4, max_share=math.inf)


def test_probe_points_move_onto_the_surface():
    def sphere(x):
        return x.norm(dim=-1, keepdim=True) - 0.6

    points = onto_surface(sphere, probe_points(3.0, "cpu"), steps=1)  # exact SDF: one Newton step lands on it
    torch.testing.assert_close(points.norm(dim=-1), torch.full((4096,), 0.6), atol=1e-5, rtol=0)

    def ellipsoid(x):  # not a distance: Newton steps converge instead
        return (x / torch.tensor([1.0, 0.5, 0.5])).norm(dim=-1, keepdim=True) - 1.0

    points = onto_surface(ellipsoid, probe_points(3.0, "cpu"), steps=6)
    assert float(ellipsoid(points).abs().max()) < 1e-3


def test_surface_error_is_measured_on_the_surface():
    """A function that autocast rounds only away from the unit sphere: no error at the surface, some elsewhere."""
    weight = torch.tensor([[1.0, 1.0, 1.0]]) / 3.0

    def sdf(x):
        radius = x.norm(dim=-1, keepdim=True)
        return radius - 1.0 + 0.1 * (radius - 1.0) ** 2 * F.linear(x, weight)

    (at_surface,) = surface_rounding_error(sdf, 3.0, "cpu")
    (everywhere,) = rounding_error(sdf, probe_points(3.0, "cpu"))
    assert at_surface < 1e-6 and everywhere > 1e-4


def test_only_points_on_the_surface_are_measured():
    points = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.605, 0.0], [0.0, 0.0, 0.7], [9.0, 0.0, 0.0], [math.nan, 0.0, 0.0]])

    def sdf(x):
        return x.norm(dim=-1, keepdim=True) - 0.6 - (x.norm(dim=-1, keepdim=True) - 9.0).abs().lt(1e-3) * 8.4

    # kept: on it, within 1e-2 of it; left out: 0.1 away, outside the ball (though its SDF is 0), not finite
    assert torch.equal(on_surface(sdf, points, radius=3.0), points[:2])


def test_no_surface_gives_no_measurement():
    assert all(math.isnan(e) for e in surface_rounding_error(lambda x: x.norm(dim=-1) + 1.0, 3.0, "cpu", (0.5, 0.99)))
    assert not rounding_is_safe(math.nan, beta=0.1, max_share=0.25)


def test_the_float32_reference_ignores_the_callers_autocast():
    generator = torch.Generator().manual_seed(1)
    points, weight = torch.randn(500, 3, generator=generator), torch.randn(1, 3, generator=generator)

    def sdf(x):
        return F.linear(x, weight)

    alone = rounding_error(sdf, points)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under --mixed-precision
        assert rounding_error(sdf, points) == alone
