"""Whether the error-bounded sampler's SDF queries may run in half precision (bfloat16 or float16): only while
their SDF error is small against the density's beta.

The sampler bounds the opacity error of its samples from the SDF and beta (the Laplace density's scale); an SDF
off by delta changes the density there, and the terms of the bound, by up to a factor exp(delta / beta). At the
geometric init, bf16 queries of the paper's field err by about 3e-3 at the surface in the normalised frame (99th
percentile; median 1.7e-3; docs/benchmarks.md, round eleven): a few percent of beta at the start (0.1), but more
than beta once training has sharpened the surface (VolSDF's beta falls toward 1e-3). float16 keeps 3 more mantissa
bits and errs about 10x less (3.5e-4), at the same speed on tensor cores, but overflows above 65504. So the check
compares the two where the samples gather: where fixed chords through the ball first cross the surface, as the
cameras' rays from outside do, and the 99th percentile of |half - float32| there is taken as a share of beta. The
sampler queries the whole ball, so float16 is also run along chords from end to end: one query that overflows
anywhere is unsafe.

The probe runs the field eagerly. Compiled code (what the sampler runs under ``compile-fields``) does not round
between the operations inductor fuses, so it should err no more: the check errs on the safe side (not measured).
Both sum the SDF column and its bias in float32 (``mlp._first_rows``): cuBLAS's eager one-column product had rounded
the terms' sum to half precision before adding the bias, and the probe measured that rounding grid instead of the
queries' error (docs/benchmarks.md, rounds twenty-four and twenty-five).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cocoinr_nerfstudio.model_components.host_reads import copy_to_device

PROBE_CHORDS = 1024
PROBE_SEED = 0  # the same chords every check and on every rank (each rank then decides alike)
PROBE_INTERVALS = 64  # a chord's coarse search for its first sign change: 65 queries, 0.094 apart in a ball of 3
PROBE_REFINEMENTS = 3  # then that interval searched again in 16ths, three times: to 1/4096 of it
MIN_SURFACE_POINTS = 64  # fewer chords crossing the surface: no measurement
OVERFLOW_CHORDS = 256  # float16's overflow check: chords through the ball, end to end,
OVERFLOW_INTERVALS = 32  # at 33 points each (8448 queries). Activations grow over regions, not at single points;
# float16 without tensor cores (a CPU) takes 20x float32's time, so the check stays small: 27 s on 2 CPU cores
# for the search's 66,560 points with the paper's model, 3 s for these.


def probe_directions(device: torch.device | str, num: int = PROBE_CHORDS) -> Tensor:
    """Fixed unit vectors, uniform on the sphere: each chord of the probe enters the ball at ``radius`` times one
    and runs through the centre. Kept per device after the first call (not to be changed in place): a copy to a GPU
    from pageable memory would wait for everything queued there."""
    return _probe_directions(str(torch.device(device)), num)


@functools.lru_cache(maxsize=8)
def _probe_directions(device: str, num: int) -> Tensor:
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.nn.functional.normalize(torch.randn(num, 3, generator=generator), dim=-1).to(device)


def _float32(device: torch.device | str) -> torch.autocast:
    """No autocast, whatever the caller runs under (``--mixed-precision`` renders): the float32 reference."""
    return torch.autocast(torch.device(device).type, enabled=False)


@torch.no_grad()
def first_crossings(
    sdf_fn: Callable[[Tensor], Tensor],
    radius: float,
    device: torch.device | str,
    num: int = PROBE_CHORDS,
    intervals: int = PROBE_INTERVALS,
    refinements: int = PROBE_REFINEMENTS,
) -> Tensor:
    """:func:`crossing_chords`' points of the chords that cross (one host read)."""
    points, crossed = crossing_chords(sdf_fn, radius, device, num, intervals, refinements)
    return points[crossed]


@torch.no_grad()
def crossing_chords(
    sdf_fn: Callable[[Tensor], Tensor],
    radius: float,
    device: torch.device | str,
    num: int = PROBE_CHORDS,
    intervals: int = PROBE_INTERVALS,
    refinements: int = PROBE_REFINEMENTS,
) -> tuple[Tensor, Tensor]:
    """Where the probe's chords of the ball of ``radius`` first go from a positive to a non-positive SDF (float32):
    the surface as seen from outside. Each chord is searched at ``intervals`` steps, then the first step with a
    sign change is searched again in 16ths ``refinements`` times (one batch of queries each), so a point lies within
    ``2 radius / intervals / 16^refinements`` of a zero of the SDF along its chord, however far the SDF is from a
    distance (Newton steps toward the surface need one: once training has bent the SDF far from it, they left most
    points off the surface). Returns a point for every chord and whether the chord crosses (no host read): those
    that never cross, or cross only between two steps of the coarse search (a structure thinner than a step),
    have no crossing."""
    directions = probe_directions(device, num)

    def first_entry(travelled: Tensor) -> tuple[Tensor, Tensor]:
        """For [num, k] distances from each chord's entry: the index of the first step into the surface (0 where
        none), and whether there is one."""
        points = directions[:, None, :] * (radius - travelled)[..., None]
        with _float32(device):
            sdf = sdf_fn(points.reshape(-1, 3)).float().reshape(travelled.shape)
        entering = (sdf[:, :-1] > 0) & (sdf[:, 1:] <= 0)
        return entering.to(torch.uint8).argmax(dim=1), entering.any(dim=1)  # argmax: the first maximum

    width = 2.0 * radius / intervals
    travelled = (width * torch.arange(intervals + 1, device=device)).expand(num, -1)
    first, crossed = first_entry(travelled)
    outer = travelled[:, 0] + width * first
    for _ in range(refinements):  # the bracket's ends are queried again: a sign lost to rounding keeps its start
        width /= 16
        travelled = outer[:, None] + width * torch.arange(17, device=device)
        outer = outer + width * first_entry(travelled)[0]
    return directions * (radius - outer - width / 2)[:, None], crossed


def probe_points(
    radius: float, device: torch.device | str, num: int = PROBE_CHORDS, intervals: int = PROBE_INTERVALS
) -> Tensor:
    """The probe's coarse search points, ``intervals + 1`` evenly spaced along each chord from end to end: the
    whole ball along ``num`` diameters, as [num * (intervals + 1), 3]."""
    travelled = (2.0 * radius / intervals) * torch.arange(intervals + 1, device=device)
    return (probe_directions(device, num)[:, None, :] * (radius - travelled)[None, :, None]).reshape(-1, 3)


HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""The sampler's query precisions by their option name (``--pipeline.model.sampler-autocast``)."""


@torch.no_grad()
def rounding_error(
    sdf_fn: Callable[[Tensor], Tensor],
    points: Tensor,
    dtype: torch.dtype = torch.bfloat16,
    quantiles: Sequence[float] = (0.99,),
) -> tuple[float, ...]:
    """The ``quantiles`` of |SDF under ``dtype`` autocast - SDF in float32| at ``points`` (one host
    synchronisation). inf for every quantile where a query that is finite in float32 is not (float16 overflows),
    however few: such a query would corrupt the sampler wherever it falls."""
    return tuple(rounding_error_on_device(sdf_fn, points, dtype, quantiles).tolist())


@torch.no_grad()
def rounding_error_on_device(
    sdf_fn: Callable[[Tensor], Tensor],
    points: Tensor,
    dtype: torch.dtype = torch.bfloat16,
    quantiles: Sequence[float] = (0.99,),
    valid: Tensor | None = None,
) -> Tensor:
    """:func:`rounding_error` as a tensor on the points' device (no host read), over the points where ``valid``
    (all by default). NaN where an error is NaN or no point is valid."""
    with _float32(points.device):
        exact = sdf_fn(points).float().reshape(len(points), -1)
    with torch.autocast(points.device.type, dtype=dtype, cache_enabled=False):
        rounded = sdf_fn(points).float().reshape(len(points), -1)
    valid = torch.ones(len(points), dtype=torch.bool, device=points.device) if valid is None else valid
    errors = (rounded - exact).abs()
    counted = valid[:, None].expand_as(errors)
    levels = copy_to_device(torch.tensor(list(quantiles), dtype=torch.float32), points.device)
    levels_of = torch.nanquantile(torch.where(counted, errors, math.nan).flatten(), levels)
    unmeasured = (errors.isnan() & counted).any()  # the SDF itself is NaN there: no error to speak of
    overflowed = (exact.isfinite() & ~rounded.isfinite() & counted).any()
    return torch.where(overflowed, math.inf, torch.where(unmeasured, math.nan, levels_of))


@torch.no_grad()
def overflows(sdf_fn: Callable[[Tensor], Tensor], points: Tensor, dtype: torch.dtype) -> bool:
    """Whether a query under ``dtype`` autocast is not finite where float32's is (one host read)."""
    return bool(overflows_on_device(sdf_fn, points, dtype))


@torch.no_grad()
def overflows_on_device(sdf_fn: Callable[[Tensor], Tensor], points: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`overflows` as a boolean tensor on the points' device (no host read). False, without querying, for a
    dtype with float32's range (bfloat16)."""
    if torch.finfo(dtype).max > 1e38:  # float32's 8 exponent bits (bfloat16: 3.39e38, float32's 3.40e38)
        return torch.zeros((), dtype=torch.bool, device=points.device)
    with torch.autocast(points.device.type, dtype=dtype, cache_enabled=False):
        rounded_finite = sdf_fn(points).float().isfinite().reshape(len(points), -1).all(dim=-1)
    with _float32(points.device):
        exact_finite = sdf_fn(points).float().isfinite().reshape(len(points), -1).all(dim=-1)
    return (exact_finite & ~rounded_finite).any()


def surface_rounding_error(
    sdf_fn: Callable[[Tensor], Tensor],
    radius: float,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    quantiles: Sequence[float] = (0.99,),
) -> tuple[float, ...]:
    """``dtype``'s SDF error where the sampler's samples gather: at the probe's chords' first crossings of the
    surface. NaNs where fewer than ``MIN_SURFACE_POINTS`` chords cross it (no surface in the ball); infs where a
    query overflows there or along ``OVERFLOW_CHORDS`` chords through the whole ball (:func:`probe_points`), with
    or without a surface. One host read."""
    return tuple(surface_rounding_error_on_device(sdf_fn, radius, device, dtype, quantiles).tolist())


def surface_rounding_error_on_device(
    sdf_fn: Callable[[Tensor], Tensor],
    radius: float,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    quantiles: Sequence[float] = (0.99,),
) -> Tensor:
    """:func:`surface_rounding_error` as a tensor on ``device``: no host read, so the probe can be queued behind
    training steps and read later (:class:`~cocoinr_nerfstudio.model_components.host_reads.DeferredRead`)."""
    points, crossed = crossing_chords(sdf_fn, radius, device)
    overflowed = overflows_on_device(sdf_fn, probe_points(radius, device, OVERFLOW_CHORDS, OVERFLOW_INTERVALS), dtype)
    errors = rounding_error_on_device(sdf_fn, points, dtype, quantiles, valid=crossed)
    errors = torch.where(crossed.sum() < MIN_SURFACE_POINTS, math.nan, errors)
    return torch.where(overflowed, math.inf, errors)  # an overflow is found without a surface too


def rounding_is_safe(error: float, beta: float, max_share: float) -> bool:
    """Half-precision queries keep the sampler's bound meaningful while their SDF error is at most ``max_share``
    of beta (an unmeasured error, NaN, is not safe; nor is an overflow, inf)."""
    return error <= max_share * beta
