"""The half-precision sampler-query check's parts: fixed probe points, the error measure, the threshold."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cocoinr_nerfstudio.model_components.sampler_precision import (
    HALF_DTYPES,
    first_crossings,
    overflows,
    probe_directions,
    probe_points,
    rounding_error,
    rounding_is_safe,
    surface_rounding_error,
)


def test_probe_directions_are_fixed_and_uniform():
    directions = probe_directions("cpu")
    assert directions.shape == (1024, 3) and torch.equal(directions, probe_directions("cpu"))  # every check, every rank
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(1024))
    assert float(directions.mean(dim=0).norm()) < 0.05  # uniform on the sphere: no side favoured
    # a chord's share in the cap within 30 degrees of an axis: (1 - cos 30) / 2
    assert abs(float((directions[:, 2] > math.cos(math.pi / 6)).float().mean()) - 0.067) < 0.015


def _in_ball(radius: float, num: int = 4096) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    directions = F.normalize(torch.randn(num, 3, generator=generator), dim=-1)
    return directions * radius * torch.rand(num, 1, generator=generator).pow(1.0 / 3.0)


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


def test_crossings_lie_on_the_surface_seen_from_outside():
    """Every chord of the ball enters a centred sphere: its crossing is on the sphere, on the entry side, to within
    a step of the coarse search (6 / 64) over 16^3."""
    points = first_crossings(lambda x: x.norm(dim=-1, keepdim=True) - 0.6, 3.0, "cpu")
    assert points.shape == (1024, 3)
    torch.testing.assert_close(points.norm(dim=-1), torch.full((1024,), 0.6), atol=6 / 64 / 16**3, rtol=0)
    assert torch.equal(points, first_crossings(lambda x: x.norm(dim=-1, keepdim=True) - 0.6, 3.0, "cpu"))
    assert float((points * probe_directions("cpu")).sum(dim=-1).min()) > 0  # the near side of each chord


def test_crossings_need_no_distance():
    """SDFs far from a distance, where Newton steps toward the surface stall or overshoot: a cube of the distance
    (a triple root: each Newton step removes only a third of the distance) and a stretched ellipsoid."""
    points = first_crossings(lambda x: (x.norm(dim=-1, keepdim=True) - 0.6) ** 3, 3.0, "cpu")
    assert len(points) == 1024
    torch.testing.assert_close(points.norm(dim=-1), torch.full((1024,), 0.6), atol=6 / 64 / 16**3, rtol=0)

    def ellipsoid(x):
        return 100.0 * ((x / torch.tensor([1.0, 0.5, 0.5])).norm(dim=-1, keepdim=True) - 1.0)

    points = first_crossings(ellipsoid, 3.0, "cpu")
    assert len(points) == 1024 and float(ellipsoid(points).abs().max()) < 100.0 * 2 * 6 / 64 / 16**3


def test_only_chords_that_cross_give_points():
    """A sphere of radius 0.5 centred 2 from the centre: only the chords passing within 0.5 of its centre meet it,
    each on the side it enters first."""
    centre = torch.tensor([0.0, 0.0, 2.0])
    points = first_crossings(lambda x: (x - centre).norm(dim=-1, keepdim=True) - 0.5, 3.0, "cpu")
    directions = probe_directions("cpu")
    meeting = torch.linalg.cross(directions, centre.expand_as(directions)).norm(dim=-1) < 0.5
    assert 0 < len(points) == int(meeting.sum())  # 32 of the 1024 chords
    torch.testing.assert_close((points - centre).norm(dim=-1), torch.full((len(points),), 0.5), atol=1e-4, rtol=0)
    # a chord enters at radius x its direction and runs against it: it meets the side facing its entry
    assert float(((points - centre) * directions[meeting]).sum(dim=-1).min()) > 0


def test_surface_error_is_measured_on_the_surface():
    """A function that autocast rounds only away from the unit sphere: no error at the surface, some elsewhere."""
    weight = torch.tensor([[1.0, 1.0, 1.0]]) / 3.0

    def sdf(x):
        radius = x.norm(dim=-1, keepdim=True)
        return radius - 1.0 + 0.1 * (radius - 1.0) ** 2 * F.linear(x, weight)

    (at_surface,) = surface_rounding_error(sdf, 3.0, "cpu")
    (everywhere,) = rounding_error(sdf, _in_ball(3.0))
    assert at_surface < 1e-6 and everywhere > 1e-4


def test_probe_points_run_along_each_chord_from_end_to_end():
    """65 points a chord, 6 / 64 apart, from radius x its direction through the centre to the opposite end."""
    points = probe_points(3.0, "cpu").reshape(1024, 65, 3)
    directions = probe_directions("cpu")
    torch.testing.assert_close(points[:, 0], 3.0 * directions)
    torch.testing.assert_close(points[:, 32], torch.zeros(1024, 3))
    torch.testing.assert_close(points[:, -1], -3.0 * directions)
    steps = (points[:, 1:] - points[:, :-1]).norm(dim=-1)
    torch.testing.assert_close(steps, torch.full_like(steps, 6.0 / 64))


def test_an_overflow_off_the_surface_is_an_infinite_error():
    """float16 overflows only near the ball's edge (|x| > 2.5), far from the unit sphere the samples gather at:
    the error there is 0, but the sampler queries the whole ball, so float16 is unsafe. bfloat16 cannot overflow."""

    def sdf(x):
        radius = x.norm(dim=-1, keepdim=True)
        return radius - 1.0 + F.linear(100.0 * F.relu(radius - 2.5), torch.tensor([[6e4]])) * 1e-6  # up to 3e6

    assert rounding_error(sdf, first_crossings(sdf, 3.0, "cpu"), torch.float16) == (0.0,)
    assert overflows(sdf, probe_points(3.0, "cpu"), torch.float16)
    assert surface_rounding_error(sdf, 3.0, "cpu", torch.float16, (0.5, 0.99)) == (math.inf, math.inf)
    assert not overflows(sdf, probe_points(3.0, "cpu"), torch.bfloat16)
    assert surface_rounding_error(sdf, 3.0, "cpu", torch.bfloat16) == (0.0,)
    assert not overflows(lambda x: x.norm(dim=-1) - 1.0, probe_points(3.0, "cpu"), torch.float16)
    # not finite in float32 either: not the precision's doing
    broken = lambda x: torch.where(x.norm(dim=-1) > 2.5, math.nan, x.norm(dim=-1) - 1.0)  # noqa: E731
    assert not overflows(broken, probe_points(3.0, "cpu"), torch.float16)


def test_float16_runs_at_the_crossings_and_on_the_smaller_overflow_probe_only():
    """float16 costs 20x float32 on a CPU: the check runs it at the surface and at 256 x 33 points of the ball (not
    the search's 1024 x 65); bfloat16 only at the surface."""
    queries = []

    def sdf(x):
        if torch.is_autocast_enabled("cpu"):
            queries.append((torch.get_autocast_dtype("cpu"), len(x)))
        return x.norm(dim=-1, keepdim=True) - 1.0

    surface_rounding_error(sdf, 3.0, "cpu", torch.float16)
    assert queries == [(torch.float16, 256 * 33), (torch.float16, 1024)]
    queries.clear()
    surface_rounding_error(sdf, 3.0, "cpu", torch.bfloat16)
    assert queries == [(torch.bfloat16, 1024)]


def test_no_surface_gives_no_measurement():
    errors = surface_rounding_error(lambda x: x.norm(dim=-1) + 1.0, 3.0, "cpu", quantiles=(0.5, 0.99))
    assert len(errors) == 2 and all(math.isnan(e) for e in errors)
    assert not rounding_is_safe(math.nan, beta=0.1, max_share=0.25)


def test_the_float32_reference_ignores_the_callers_autocast():
    generator = torch.Generator().manual_seed(1)
    points, weight = torch.randn(500, 3, generator=generator), torch.randn(1, 3, generator=generator)

    def sdf(x):
        return F.linear(x, weight)

    alone = rounding_error(sdf, points)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under --mixed-precision
        assert rounding_error(sdf, points) == alone
