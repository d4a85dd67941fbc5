"""Empty space in renders: a coarse grid of the SDF that bounds, per ray, where the foreground can be seen.

The error-bounded sampler's first round spreads its samples from the bounding sphere's entry to its exit, whatever
the object covers, and every ray that misses the object pays for a full round. Yet outside a thin band around the
zero level set VolSDF's density is negligible: where the SDF is ``m`` it is ``exp(-m/beta) / (2 beta)``. The grid
marks every cell whose SDF may fall into that band (or below zero, inside the object) somewhere, from the SDF at the
cell's centre and a Lipschitz bound of the SDF estimated on the grid. A ray is then sampled between its first and
last marked cell only, and a ray that meets no marked cell skips the foreground: its pixel is the background's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

SDFCallable = Callable[[Float[Tensor, "n 3"]], Float[Tensor, "n 1"]]


def surface_band(beta: float, radius: float, tolerance: float) -> float:
    """The SDF value above which the density can be skipped: along a ray's part inside the cube ``[-radius,
    radius]^3`` (at most its diagonal, ``2 sqrt(3) radius``, long; unit directions) it adds at most ``tolerance`` of
    optical depth, so a pixel changes by about that much at most. Solves ``2 sqrt(3) radius * exp(-m / beta) /
    (2 beta) = tolerance`` for ``m``."""
    if tolerance <= 0:
        return math.inf
    return beta * max(0.0, math.log(math.sqrt(3.0) * radius / (beta * tolerance)))


def lipschitz_bound(sdf: Float[Tensor, "r r r"], cell: float) -> float:
    """The largest gradient norm of the SDF on the grid (finite differences), at least 1 (a true distance
    function's): within a cell the SDF stays above the centre's value less this times the half diagonal. Detail
    finer than a cell is not seen."""
    gradients = torch.gradient(sdf, spacing=cell)
    norm = torch.stack(gradients).pow(2).sum(0).sqrt()
    norm = norm[norm.isfinite()]
    return max(1.0, float(norm.max())) if norm.numel() else 1.0


@dataclass(frozen=True)
class OccupancyGrid:
    """Cells of the cube ``[-radius, radius]^3`` where the foreground may be seen, dilated by one cell so that
    rays marched at one cell's length a step cannot slip past a marked cell (see :meth:`ray_bounds`)."""

    occupied: Bool[Tensor, "r r r"]
    radius: float

    @property
    def resolution(self) -> int:
        return self.occupied.shape[0]

    @property
    def cell(self) -> float:
        return 2.0 * self.radius / self.resolution

    @classmethod
    @torch.no_grad()
    def from_sdf(
        cls,
        sdf_fn: SDFCallable,
        radius: float,
        resolution: int,
        beta: float,
        tolerance: float,
        chunk: int = 1 << 18,
        device: torch.device | str = "cpu",
    ) -> OccupancyGrid:
        """Queries the SDF at every cell's centre. A cell is marked where its centre's SDF is below the surface
        band plus the Lipschitz bound times the cell's half diagonal: no point of an unmarked cell has an SDF
        below the band. Then every neighbour of a marked cell is marked too."""
        if resolution < 2:
            raise ValueError(f"an occupancy grid needs at least 2 cells a side, got {resolution}")
        cell = 2.0 * radius / resolution
        axis = torch.linspace(-radius + cell / 2, radius - cell / 2, resolution, device=device)
        centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        sdf = torch.cat([sdf_fn(points).reshape(-1).float() for points in centres.split(chunk)])
        sdf = sdf.reshape(resolution, resolution, resolution)
        reach = surface_band(beta, radius, tolerance) + lipschitz_bound(sdf, cell) * math.sqrt(3.0) / 2.0 * cell
        near_surface = (~(sdf >= reach)).float()[None, None]  # a NaN value is not known to be far: marked
        occupied = F.max_pool3d(near_surface, kernel_size=3, stride=1, padding=1)[0, 0] > 0
        return cls(occupied, radius)

    def ray_bounds(
        self,
        origins: Float[Tensor, "n 3"],
        directions: Float[Tensor, "n 3"],
        nears: Float[Tensor, "n 1"],
        fars: Float[Tensor, "n 1"],
    ) -> tuple[Bool[Tensor, " n"], Float[Tensor, "n 1"], Float[Tensor, "n 1"]]:
        """Which rays meet a marked cell between ``nears`` and ``fars``, and the part of ``[nears, fars]`` that
        holds every point of theirs in a cell marked before the dilation or outside the cube (a crop box's bounds
        may leave it: the grid knows nothing there). Rays with bounds that are not finite keep them.

        Points are taken at most one cell's length apart. A point of the ray in a cell marked before the dilation
        lies within half a step of a taken point, so in that cell or a neighbour (a point within one cell's length
        is), which the dilation marked: each such point lies within half a step of a marked taken point."""
        lengths = directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        step = self.cell / lengths  # distance along the ray per cell's length
        finite = (nears.isfinite() & fars.isfinite())[:, 0]
        spans = torch.where(finite[:, None], fars - nears, 0.0).clamp(min=0.0)
        count = int(torch.ceil((spans / step).max()).item()) + 1 if spans.numel() else 1
        index = torch.arange(count, device=origins.device, dtype=origins.dtype)
        start = torch.where(finite[:, None], nears, 0.0)
        t = torch.minimum(start + index * step, start + spans)  # [n, count]: nears to fars, at most a step apart
        points = origins[:, None, :] + t[..., None] * directions[:, None, :]
        outside = (points.abs() > self.radius).any(-1)
        cells = ((points + self.radius) / self.cell).floor().long().clamp(0, self.resolution - 1)
        flat = (cells[..., 0] * self.resolution + cells[..., 1]) * self.resolution + cells[..., 2]
        marked = (self.occupied.reshape(-1)[flat] | outside) & (spans > 0)
        hit = marked.any(-1) | ~finite
        first = marked.to(torch.uint8).argmax(-1, keepdim=True)
        last = count - 1 - marked.flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
        new_nears = torch.maximum(nears, t.gather(1, first) - step)
        new_fars = torch.minimum(fars, t.gather(1, last) + step)
        narrowed = (hit & finite)[:, None]
        return hit, torch.where(narrowed, new_nears, nears), torch.where(narrowed, new_fars, fars)
