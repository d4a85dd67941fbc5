"""VolSDF's error-bounded sampler (Yariv et al. 2021, Algorithm 1).

Samples are added until the opacity computed from them is provably within ``eps`` of the true
opacity (Theorem 1's bound, using the distance bound ``d*`` that an SDF gives between samples).
The sampler bisects on beta: where the model's own beta cannot meet the bound yet, a larger beta
that does is used to place the final samples.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.model_components.ray_samplers import Sampler
from torch import Tensor

from cocoinr_nerfstudio.field_components.compilation import CompiledOrEager
from cocoinr_nerfstudio.model_components.density import LaplaceDensity
from cocoinr_nerfstudio.model_components.mask_split import split_mask
from cocoinr_nerfstudio.model_components.volume_rendering import jitter_within_intervals, volume_weights

SDFCallable = Callable[[Float[Tensor, "num_points 3"]], Float[Tensor, "num_points 1"]]
FinalDraws = tuple[Float[Tensor, "num_rays num_samples"], Tensor | None]
"""The random numbers of training's final samples: inverse-CDF positions, indices of the extra dense samples."""
RayState = tuple[Tensor, Tensor, Tensor, Tensor]
"""Per ray: final samples, their beta, the error bound at that beta, rounds gone through."""


def _static_widths(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Keeps the sample count of per-round tensors static under torch.compile: each round has its own fixed count
    (kernels specialised to it), where automatic dynamic shapes would make it symbolic from the second round on (a
    form inductor, torch 2.11, failed to generate one of the round's kernels for)."""
    for tensor in tensors:
        torch._dynamo.mark_static(tensor, 1)
    return tensors


@dataclass
class ErrorBoundInfo:
    """What the sampler found, for losses and for checking the algorithm."""

    eikonal_z: Float[Tensor, "num_rays 1"]
    """One distance per ray drawn from the final samples: a near-surface eikonal point."""
    beta: Float[Tensor, " num_rays"]
    """The beta each ray's final samples were drawn with (>= the model's beta)."""
    error_bound: Float[Tensor, " num_rays"]
    """Theorem 1's opacity error bound of the dense sample set at ``beta``."""
    num_rounds: Float[Tensor, " num_rays"]
    """Rounds of Algorithm 1 each ray went through (1 = no upsampling needed)."""
    num_queries: int
    """SDF evaluations spent, all rays together."""
    num_truncated: Tensor | int = 0
    """Rays cut off by the refine budgets: they needed another round and kept the samples of their last one."""
    round_demand: Float[Tensor, " later_rounds"] | None = None
    """Rays that needed each round after the first: those that ran it, and those a refine budget cut off before it
    or before an earlier round (counted in every later round: an upper bound where rays were cut, so that ``auto``
    sizes the later rounds up at once rather than cutting rays again)."""


def sample_pdf(
    bins: Float[Tensor, "n m"],
    pdf: Float[Tensor, "n m_minus_1"],
    num: int,
    deterministic: bool,
    u: Float[Tensor, "n num"] | None = None,
) -> Float[Tensor, "n num"]:
    """Inverse-CDF sampling of ``num`` distances from a piecewise-constant pdf over ``bins``.

    ``u``: the random positions in [0, 1) to invert, drawn by the caller (a compiled caller keeps torch's random
    stream out of the compiled graph); by default drawn here, or evenly spaced if ``deterministic``."""
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    if u is None and deterministic:
        u = torch.linspace(0.0, 1.0, num, device=bins.device, dtype=bins.dtype).expand(bins.shape[0], num)
    elif u is None:
        u = torch.rand(bins.shape[0], num, device=bins.device, dtype=bins.dtype)
    u = u.contiguous()
    above = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    below = (above - 1).clamp(min=0)
    cdf_below, cdf_above = cdf.gather(1, below), cdf.gather(1, above)
    bin_below, bin_above = bins.gather(1, below), bins.gather(1, above)
    denom = cdf_above - cdf_below
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    return bin_below + (u - cdf_below) / denom * (bin_above - bin_below)


def distance_bound(z: Float[Tensor, "n m"], sdf: Float[Tensor, "n m"]) -> Float[Tensor, "n m_minus_1"]:
    """``d*``: a lower bound on the distance to the surface inside each interval (Theorem 1).

    The SDF values at both ends define two balls; the surface lies outside both, so the closest it
    can come to the segment is the height of the triangle they span (or an end value when the
    triangle is obtuse). Zero when the sign changes: the surface crosses the interval.
    """
    a = z[:, 1:] - z[:, :-1]
    b, c = sdf[:, :-1].abs(), sdf[:, 1:].abs()
    first = a.pow(2) + b.pow(2) <= c.pow(2)
    second = a.pow(2) + c.pow(2) <= b.pow(2)
    s = (a + b + c) / 2.0
    area = (s * (s - a) * (s - b) * (s - c)).clamp(min=0.0)
    height = torch.where(b + c - a > 0, 2.0 * torch.sqrt(area) / a.clamp(min=1e-12), torch.zeros_like(a))
    d_star = torch.where(first, b, torch.where(second, c, height))
    same_sign = sdf[:, 1:].sign() * sdf[:, :-1].sign() == 1
    return d_star * same_sign


def opacity_error_bound(
    density: LaplaceDensity,
    beta: Tensor,
    sdf: Float[Tensor, "n m"],
    dists: Float[Tensor, "n m_minus_1"],
    d_star: Float[Tensor, "n m_minus_1"],
) -> Float[Tensor, "n m_minus_1"]:
    """Per-interval bound on the opacity error (Theorem 1), cumulative along the ray.

    Broadcasts: ``beta`` may carry extra leading dimensions (several candidate betas per ray).
    """
    sigma = density(sdf, beta=beta)
    free_energy = dists * sigma[..., :-1]
    optical_depth = torch.cumsum(torch.cat([torch.zeros_like(free_energy[..., :1]), free_energy], -1), -1)
    error = torch.cumsum(torch.exp(-d_star / beta) * dists.pow(2) / (4.0 * beta**2), -1)
    return (torch.exp(error).clamp(max=1e6) - 1.0) * torch.exp(-optical_depth[..., :-1])


def grid_search_beta(
    density: LaplaceDensity,
    beta0: Tensor,
    beta_hi: Float[Tensor, " n"],
    sdf: Float[Tensor, "n m"],
    dists: Float[Tensor, "n m_minus_1"],
    d_star: Float[Tensor, "n m_minus_1"],
    eps: float,
    levels: int,
    count: int = 15,
) -> Float[Tensor, " n"]:
    """Smallest beta in [beta0, beta_hi] meeting the bound, to (hi - lo) / count^levels, per ray.

    Bisection's answer (the bound falls as beta grows) with ``count`` candidates tested at once per
    level: a fixed, branch-free sequence of tensor operations, so it also compiles into few kernels.
    """
    meets_at_beta0 = opacity_error_bound(density, beta0, sdf, dists, d_star).max(-1).values <= eps
    hi = torch.where(meets_at_beta0, beta0.expand_as(beta_hi), beta_hi)
    lo = beta0.expand_as(hi)
    fractions = torch.arange(1, count + 1, device=hi.device, dtype=hi.dtype) / count
    sdf, dists, d_star = sdf[:, None, :], dists[:, None, :], d_star[:, None, :]
    for _ in range(levels):
        candidates = lo[:, None] + (hi - lo)[:, None] * fractions  # [n, count], the last one is hi
        ok = opacity_error_bound(density, candidates[..., None], sdf, dists, d_star).max(-1).values <= eps
        ok = torch.cat([ok[:, :-1], torch.ones_like(ok[:, -1:])], -1)  # hi met the bound already
        first = ok.to(torch.uint8).argmax(-1, keepdim=True)
        below = candidates.gather(1, (first - 1).clamp(min=0))[:, 0]
        hi, lo = candidates.gather(1, first)[:, 0], torch.where(first[:, 0] > 0, below, lo)
    return hi


class ErrorBoundedSampler(Sampler):
    """Algorithm 1 of VolSDF on nerfstudio ray bundles (``nears``/``fars`` set by a collider).

    Args:
        num_samples: final samples drawn from the converged weights.
        num_samples_eval: samples of the initial uniform pass and of every upsampling round.
        num_samples_extra: dense samples kept in addition (helps gradients reach empty space).
        eps: target bound on the opacity error.
        beta_iters: bisection steps on beta per round.
        max_total_iters: rounds of Algorithm 1 at most.
        add_tiny: added to the upsampling pdf so no interval gets zero probability.
        chunk_size: points per SDF query (memory bound; queries run without autograd).
        per_ray_convergence: a ray stops upsampling as soon as its own bound is met. The original
            upsamples every ray until all of them converge, which only spends queries on rays that
            are already done (their final samples then come from a denser set).
        batched_bisection: search beta by testing 15 candidates at once per level (4 bits of precision
            per level, at least ``beta_iters`` bits in all) instead of ``beta_iters`` sequential halvings:
            the same or finer precision in a third of the kernel launches.
        compile: ``torch.compile`` the batched search (dynamic shapes): far fewer kernel launches on GPU. With
            ``static_shapes`` also each round but its SDF queries (the beta search, the final and the upsampling
            distances, the per-ray bookkeeping) as one compiled function: far fewer kernel launches a round. The
            random draws, the final samples' weights, the merge of new samples and the picks of ``refine_budgets``
            stay outside it.
        compile_backend: the ``torch.compile`` backend of the rounds (``aot_eager`` traces without generating
            kernels; a backend that cannot compile falls back to the same functions run eagerly, and says so).
        static_shapes: in training, run every round on every ray and freeze each ray's final samples at the
            round it is done (its own bound met with ``per_ray_convergence``, else every ray's): the same
            samples with fixed tensor shapes and no host synchronisation, so a whole training step can be
            captured as a CUDA graph. Spends queries on rays that are done; pays only when kernel
            launches, not queries, bound the step.
        static_refine_budget: with ``static_shapes``, the share of rays that rounds 2.. run on (fixed shapes need a
            fixed count): the rays still refining after round 1 first, then done ones. 1 runs every ray (exact).
            Below that the later rounds cost proportionally less; a ray that needs refining but finds no place keeps
            its first-round samples at the larger beta that meets the bound (what every ray gets when the rounds
            run out), and is counted in ``ErrorBoundInfo.num_truncated``. ``refine_budgets`` sets each round's
            share apart.
    """

    CANDIDATES_PER_LEVEL = 15
    MAX_SEARCH_RAYS = 1 << 15
    """Rays per call of the (compiled) beta search, in renders and in static rounds alike; more go in pieces."""

    def __init__(
        self,
        num_samples: int = 64,
        num_samples_eval: int = 128,
        num_samples_extra: int = 32,
        eps: float = 0.1,
        beta_iters: int = 10,
        max_total_iters: int = 5,
        add_tiny: float = 1e-6,
        chunk_size: int = 1 << 20,
        per_ray_convergence: bool = True,
        batched_bisection: bool = True,
        compile: bool = False,
        static_shapes: bool = False,
        static_refine_budget: float = 1.0,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__(num_samples=num_samples)
        if max_total_iters < 1:
            raise ValueError(f"max_total_iters (rounds of Algorithm 1) must be at least 1, got {max_total_iters}")
        if num_samples_extra > num_samples_eval:
            raise ValueError(
                f"num_samples_extra ({num_samples_extra}) must not exceed num_samples_eval ({num_samples_eval}): "
                "the extra samples are a subset of the first round's dense samples"
            )
        self.max_total_iters = max_total_iters
        self.per_ray_convergence = per_ray_convergence
        self.static_refine_budget = static_refine_budget
        self.num_samples_eval = num_samples_eval
        self.num_samples_extra = num_samples_extra
        self.eps = eps
        self.beta_iters = beta_iters
        self.add_tiny = add_tiny
        self.chunk_size = chunk_size
        self.batched_bisection = batched_bisection
        self.static_shapes = static_shapes
        option = "--pipeline.model.compile-sampler"
        self._search_beta: Callable[..., Tensor] = grid_search_beta
        if compile:
            self._search_beta = CompiledOrEager(
                grid_search_beta, compile_backend, "the sampler's beta search", option, dynamic=True
            )
        self._round: Callable[..., tuple[RayState, Tensor, Tensor, Tensor | None]] = self._static_round
        self._volume_weights = volume_weights
        if compile and static_shapes:
            # inductor (torch 2.11, Triton) fails to generate the kernel that fuses these weights' scan into the
            # compiled rounds from the second round on; run eagerly, they cost a handful of kernels a round
            self._volume_weights = torch._dynamo.disable(volume_weights)
            # one specialisation per round (its sample count stays static, see _static_widths), each compiled again
            # once with a dynamic ray count when the refine budgets change
            limit = 4 * max_total_iters
            self._round = CompiledOrEager(
                self._static_round, compile_backend, "the sampler's rounds", option, recompile_limit=limit
            )

    @property
    def refine_budgets(self) -> tuple[float, ...]:
        """With ``static_shapes``, the share of all rays that each round 2.. runs on (never more than the round
        before: a round's rays are picked from the previous round's, those still refining first). The later
        rounds need far fewer rays (training on the generated scene at beta 0.005: 26%, 25%, 7% and 4% of rays
        needed rounds 2 to 5; early in training, at beta 0.1, 82% then none), so shares of their own make those
        rounds cheaper at the same cut."""
        return self._refine_budgets

    @refine_budgets.setter
    def refine_budgets(self, shares: tuple[float, ...]) -> None:
        shares = tuple(float(share) for share in shares)
        if len(shares) != self.max_total_iters - 1:
            raise ValueError(
                f"refine_budgets needs one share per round after the first ({self.max_total_iters - 1} with "
                f"max_total_iters {self.max_total_iters}), got {len(shares)}: {shares}"
            )
        if not all(0.0 < share <= 1.0 for share in shares):
            raise ValueError(f"refine_budgets (share of rays each round 2.. runs on) must be in (0, 1], got {shares}")
        if any(later > earlier for earlier, later in itertools.pairwise(shares)):
            raise ValueError(
                f"refine_budgets must not grow from one round to the next (a round's rays come from the round "
                f"before), got {shares}"
            )
        if any(share < 1.0 for share in shares) and not self.per_ray_convergence:
            raise ValueError(
                "static_refine_budget below 1 needs per_ray_convergence: with batch-level convergence every ray "
                "refines while any ray does, so there is no 'still refining' ray to put first"
            )
        self._refine_budgets = shares

    @property
    def static_refine_budget(self) -> float:
        """The share of rays round 2 runs on (later rounds run on at most as many); setting it runs every round
        2.. on that share."""
        return self._refine_budgets[0] if self._refine_budgets else 1.0

    @static_refine_budget.setter
    def static_refine_budget(self, share: float) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"static_refine_budget (share of rays refined) must be in (0, 1], got {share}")
        self.refine_budgets = (share,) * (self.max_total_iters - 1)

    def _query(self, sdf_fn: SDFCallable, origins: Tensor, directions: Tensor, z: Tensor) -> Tensor:
        points = (origins[:, None, :] + z[..., None] * directions[:, None, :]).reshape(-1, 3)
        with torch.no_grad():
            values = [sdf_fn(chunk).reshape(-1) for chunk in points.split(self.chunk_size)]
        return torch.cat(values).reshape(z.shape)

    def _uniform(self, nears: Tensor, fars: Tensor, num: int) -> Tensor:
        t = torch.linspace(0.0, 1.0, num, device=nears.device, dtype=nears.dtype)
        z = nears * (1.0 - t) + fars * t
        return jitter_within_intervals(z) if self.training else z

    def _bisect_beta(self, density, beta0, beta_hi, sdf, dists, d_star, in_round: bool = False) -> Tensor:
        """Smallest beta in [beta0, beta_hi] (to bisection precision) meeting the bound, per ray. ``in_round``: called
        from a static round, which compiles as a whole (the search is traced into it, not compiled apart)."""
        if self.batched_bisection:
            levels = math.ceil(self.beta_iters / math.log2(self.CANDIDATES_PER_LEVEL + 1))
            search = grid_search_beta if in_round else self._search_beta
            if beta_hi.shape[0] <= self.MAX_SEARCH_RAYS:
                return search(density, beta0, beta_hi, sdf, dists, d_star, self.eps, levels, self.CANDIDATES_PER_LEVEL)
            # inductor's compiled scan failed on a 65536-ray render chunk ("CUDA driver error: invalid argument",
            # H200; likely a launch grid axis past 65535 blocks) and ran at 32768: the search goes in pieces
            pieces = zip(
                beta_hi.split(self.MAX_SEARCH_RAYS),
                sdf.split(self.MAX_SEARCH_RAYS),
                dists.split(self.MAX_SEARCH_RAYS),
                d_star.split(self.MAX_SEARCH_RAYS),
                strict=True,
            )
            return torch.cat(
                [search(density, beta0, *piece, self.eps, levels, self.CANDIDATES_PER_LEVEL) for piece in pieces]
            )
        # the original's sequential bisection
        meets_at_beta0 = opacity_error_bound(density, beta0, sdf, dists, d_star).max(-1).values <= self.eps
        hi = torch.where(meets_at_beta0, beta0.expand_as(beta_hi), beta_hi)
        lo = beta0.expand_as(hi).clone()
        for _ in range(self.beta_iters):
            mid = 0.5 * (lo + hi)
            ok = opacity_error_bound(density, mid[:, None], sdf, dists, d_star).max(-1).values <= self.eps
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
        return hi

    def _draw_final(self, z: Tensor) -> FinalDraws:
        """Training's random numbers for :meth:`_final_samples` of dense distances ``z``, drawn in its order."""
        u = torch.rand(z.shape[0], self.num_samples, device=z.device, dtype=z.dtype)
        if self.num_samples_extra <= 0:
            return u, None
        # a uniform random subset, drawn without a host round trip (CUDA-graph safe, unlike randperm)
        return u, torch.rand(z.shape[1], device=z.device).argsort()[: self.num_samples_extra]

    def _final_samples(
        self, z: Tensor, sdf: Tensor, beta: Tensor, density: LaplaceDensity, draws: FinalDraws | None = None
    ) -> Tensor:
        """Inverse-CDF samples from the weights at ``beta``, plus some of the dense samples. In training they are
        random (``draws``, or drawn here); in renders deterministic."""
        if draws is None and self.training:
            draws = self._draw_final(z)
        dists = z[:, 1:] - z[:, :-1]
        deltas = torch.cat([dists, torch.full_like(dists[:, :1], 1e10)], -1)
        weights, _ = self._volume_weights(deltas, density(sdf, beta=beta[:, None]))
        u = None if draws is None else draws[0]
        samples = sample_pdf(z, weights[:, :-1] + 1e-5, self.num_samples, deterministic=draws is None, u=u)
        if self.num_samples_extra <= 0:
            return samples
        if draws is not None:
            extra_idx = draws[1]
        else:
            extra_idx = torch.linspace(0, z.shape[1] - 1, self.num_samples_extra, device=z.device).long()
        return torch.cat([samples, z[:, extra_idx]], -1)

    def _search_round(
        self,
        density: LaplaceDensity,
        beta0: Tensor,
        beta: Tensor,
        z: Tensor,
        sdf: Tensor,
        round_index: int,
        in_round: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One round's beta search: each ray's smallest beta meeting the bound (at most its last one), the
        per-interval bound at that beta, and which rays are done."""
        dists = z[:, 1:] - z[:, :-1]
        d_star = distance_bound(z, sdf)
        beta = self._bisect_beta(density, beta0, beta, sdf, dists, d_star, in_round)
        bound = opacity_error_bound(density, beta[:, None], sdf, dists, d_star)
        done = beta <= beta0
        if not self.per_ray_convergence:
            done = done.all().expand_as(done)
        if round_index == self.max_total_iters:
            done = torch.ones_like(done)
        return beta, bound, done

    def _upsampling_distances(self, z: Tensor, bound: Tensor) -> Tensor:
        """``num_samples_eval`` new distances where the opacity error bound is largest."""
        return sample_pdf(z, bound + self.add_tiny, self.num_samples_eval, deterministic=True)

    def _add_samples(
        self, sdf_fn: SDFCallable, origins: Tensor, directions: Tensor, z: Tensor, sdf: Tensor, new_z: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Queries the SDF at ``new_z`` and merges them into the sorted distances ``z`` and their SDF values."""
        new_sdf = self._query(sdf_fn, origins, directions, new_z)
        z, order = torch.sort(torch.cat([z, new_z], -1), -1)
        return z, torch.cat([sdf, new_sdf], -1).gather(1, order)

    def _upsample(
        self, sdf_fn: SDFCallable, origins: Tensor, directions: Tensor, z: Tensor, sdf: Tensor, bound: Tensor
    ) -> tuple[Tensor, Tensor, int]:
        """Adds ``num_samples_eval`` samples where the opacity error bound is largest: merged, sorted distances,
        their SDF values, and the queries spent."""
        new_z = self._upsampling_distances(z, bound)
        z, sdf = self._add_samples(sdf_fn, origins, directions, z, sdf, new_z)
        return z, sdf, new_z.numel()

    def _refine(
        self,
        sdf_fn: SDFCallable,
        origins: Tensor,
        directions: Tensor,
        z: Tensor,
        sdf: Tensor,
        beta: Tensor,
        beta0: Tensor,
        density: LaplaceDensity,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Rounds of Algorithm 1 on the rays still refining (shapes shrink as rays finish).

        Returns each ray's final samples, their beta and error bound, its round count, and the queries spent.
        """
        num_rays, device = origins.shape[0], origins.device
        num_queries = z.numel()
        num_final = self.num_samples + max(self.num_samples_extra, 0)
        final = torch.empty(num_rays, num_final, device=device, dtype=z.dtype)
        final_beta = torch.empty(num_rays, device=device, dtype=z.dtype)
        final_bound = torch.empty_like(final_beta)
        rounds = torch.zeros(num_rays, device=device)
        active = torch.arange(num_rays, device=device)  # rays still refining; z, sdf, beta are theirs
        for round_index in range(1, self.max_total_iters + 1):
            rounds[active] = round_index
            beta, bound, done = self._search_round(density, beta0, beta, z, sdf, round_index)
            finished, keep = split_mask(done)  # the round's one host read
            if finished.numel():
                rays = active[finished]
                final[rays] = self._final_samples(z[finished], sdf[finished], beta[finished], density)
                final_beta[rays], final_bound[rays] = beta[finished], bound[finished].max(-1).values
            if not keep.numel():
                break
            active, z, sdf, beta = active[keep], z[keep], sdf[keep], beta[keep]
            z, sdf, spent = self._upsample(sdf_fn, origins[active], directions[active], z, sdf, bound[keep])
            num_queries += spent
        return final, final_beta, final_bound, rounds, num_queries

    def _refine_static(
        self,
        sdf_fn: SDFCallable,
        origins: Tensor,
        directions: Tensor,
        z: Tensor,
        sdf: Tensor,
        beta: Tensor,
        beta0: Tensor,
        density: LaplaceDensity,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int, Tensor | None]:
        """The same rounds on every ray, with masks instead of subsets (see ``static_shapes``). Where a round's
        share in ``refine_budgets`` is below the previous round's, the round before it picks that many rays (those
        still refining first) and the later rounds run on them alone; their results are merged back at the end.

        Returns what :meth:`_refine` does, and the rays cut off before each round 2.. (None if no round picked)."""
        num_rays = origins.shape[0]
        num_final = self.num_samples + max(self.num_samples_extra, 0)
        state: RayState = (z.new_zeros(num_rays, num_final), *(z.new_zeros(num_rays) for _ in range(3)))
        finished = torch.zeros(num_rays, dtype=torch.bool, device=z.device)
        counts = [min(num_rays, math.ceil(share * num_rays)) for share in self.refine_budgets]
        picks: list[tuple[Tensor, RayState]] = []  # each pick's ray indices and the state of the rays it chose from
        cut: dict[int, Tensor] = {}  # rays cut off before round index + 2, for the rounds that picked
        num_queries, active = z.numel(), num_rays
        for round_index in range(1, self.max_total_iters + 1):
            last = round_index == self.max_total_iters
            widths = _static_widths(z, sdf)
            state, finished, beta, new_z = self._round(
                density, beta0, *widths, beta, finished, state, round_index, self._draw_final(z), not last
            )
            if new_z is None:
                break
            if counts[round_index - 1] < active:  # the next round runs on fewer rays: pick them
                active = counts[round_index - 1]
                # still refining first; a ray left out keeps the state this round gave it
                picked = torch.argsort(finished.to(torch.uint8), stable=True)[:active]
                cut[round_index - 1] = (~finished).sum() - (~finished[picked]).sum()
                picks.append((picked, state))
                state = tuple(value[picked] for value in state)  # type: ignore[assignment]
                z, sdf, beta, finished, new_z = z[picked], sdf[picked], beta[picked], finished[picked], new_z[picked]
                origins, directions = origins[picked], directions[picked]
            z, sdf = self._add_samples(sdf_fn, origins, directions, z, sdf, new_z)
            num_queries += new_z.numel()
        for picked, chosen_from in reversed(picks):
            state = tuple(value.index_copy(0, picked, part) for value, part in zip(chosen_from, state, strict=True))
        if not picks:  # no round ran on fewer rays than the one before: no counts to make
            return (*state, num_queries, None)
        none = z.new_zeros((), dtype=torch.long)
        return (*state, num_queries, torch.stack([cut.get(index, none) for index in range(len(counts))]))

    def _static_round(
        self,
        density: LaplaceDensity,
        beta0: Tensor,
        z: Tensor,
        sdf: Tensor,
        beta: Tensor,
        finished: Tensor,
        state: RayState,
        round_index: int,
        draws: FinalDraws,
        upsample: bool,
    ) -> tuple[RayState, Tensor, Tensor, Tensor | None]:
        """One round on every given ray, tensor operations only (see ``compile``): the state updated for every ray
        not finished before (a ray still refining overwrites it in a later round; one that a refine budget leaves
        out keeps it: samples at the larger beta that meets the bound), which rays are finished, each ray's beta,
        and (``upsample``) the next round's distances."""
        final, final_beta, final_bound, rounds = state
        rounds = torch.where(finished, rounds, torch.full_like(rounds, round_index))
        beta, bound, done = self._search_round(density, beta0, beta, z, sdf, round_index, in_round=True)
        open_ = ~finished
        final = torch.where(open_[:, None], self._final_samples(z, sdf, beta, density, draws), final)
        final_beta = torch.where(open_, beta, final_beta)
        final_bound = torch.where(open_, bound.max(-1).values, final_bound)
        new_z = self._upsampling_distances(z, bound) if upsample else None
        return (final, final_beta, final_bound, rounds), finished | done, beta, new_z

    def generate_ray_samples(  # type: ignore[override]
        self,
        ray_bundle: RayBundle | None = None,
        sdf_fn: SDFCallable | None = None,
        density: LaplaceDensity | None = None,
    ) -> tuple[RaySamples, ErrorBoundInfo]:
        assert ray_bundle is not None and sdf_fn is not None and density is not None
        assert ray_bundle.nears is not None and ray_bundle.fars is not None, "run a collider first"
        origins, directions = ray_bundle.origins.reshape(-1, 3), ray_bundle.directions.reshape(-1, 3)
        nears, fars = ray_bundle.nears.reshape(-1, 1), ray_bundle.fars.reshape(-1, 1)
        num_rays, device = origins.shape[0], origins.device
        beta0 = density.get_beta().detach()

        z = self._uniform(nears, fars, self.num_samples_eval)
        # Lemma 2: a beta that meets the bound for any SDF with these sample spacings
        beta = torch.sqrt((z[:, 1:] - z[:, :-1]).pow(2).sum(-1) / (4.0 * math.log(1.0 + self.eps)))
        sdf = self._query(sdf_fn, origins, directions, z)

        cut: Tensor | None = None
        if self.static_shapes and self.training:  # renders are not captured: they keep the cheaper variant
            final, final_beta, final_bound, rounds, num_queries, cut = self._refine_static(
                sdf_fn, origins, directions, z, sdf, beta, beta0, density
            )
        else:
            final, final_beta, final_bound, rounds, num_queries = self._refine(
                sdf_fn, origins, directions, z, sdf, beta, beta0, density
            )
        later = torch.arange(2, self.max_total_iters + 1, device=device, dtype=rounds.dtype)
        round_demand = (rounds[:, None] >= later).sum(0)  # rays that ran each round after the first
        final_z, _ = torch.sort(torch.cat([final, nears, fars], -1), -1)
        pick = torch.randint(final_z.shape[1], (num_rays, 1), device=device)
        info = ErrorBoundInfo(
            eikonal_z=final_z.gather(1, pick),
            beta=final_beta,
            error_bound=final_bound,
            num_rounds=rounds,
            num_queries=num_queries,
            num_truncated=0 if cut is None else cut.sum(),
            round_demand=round_demand if cut is None else round_demand + cut.cumsum(0),
        )
        # the last distance closes the final interval (VolSDF's z_max)
        ray_samples = ray_bundle.get_ray_samples(
            bin_starts=final_z[:, :-1, None].reshape(*ray_bundle.shape, -1, 1),
            bin_ends=final_z[:, 1:, None].reshape(*ray_bundle.shape, -1, 1),
        )
        return ray_samples, info
