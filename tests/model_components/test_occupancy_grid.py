"""The renders' occupancy grid against analytic SDFs: the band, the marked cells, and the ray bounds they give."""

import itertools
import math

import pytest
import torch

from cocoinr_nerfstudio.model_components.density import LaplaceDensity
from cocoinr_nerfstudio.model_components.occupancy_grid import OccupancyGrid, lipschitz_bound, surface_band

RADIUS, SPHERE = 1.5, 0.5  # bounding cube's half side; the analytic sphere's radius


def sphere_sdf(points: torch.Tensor) -> torch.Tensor:
    return points.norm(dim=-1, keepdim=True) - SPHERE


def test_the_band_leaves_the_tolerance_of_optical_depth_along_the_longest_ray():
    """Beyond the band the Laplace density, over a whole diameter, adds exactly the tolerance; no tolerance (the
    exact render) keeps everything, and a band never goes below 0."""
    beta, tolerance = 0.01, 1e-4
    band = surface_band(beta, RADIUS, tolerance)
    assert band == pytest.approx(beta * math.log(RADIUS / (beta * tolerance)))
    density = LaplaceDensity(beta_init=beta, beta_min=0.0)(torch.tensor([band], dtype=torch.float64))
    assert float(2 * RADIUS * density.detach()) == pytest.approx(tolerance, rel=1e-6)
    assert surface_band(beta, RADIUS, 0.0) == math.inf
    assert surface_band(10.0, RADIUS, 1.0) == 0.0


def test_lipschitz_bound_is_the_steepest_slope_on_the_grid_and_at_least_one():
    axis = torch.linspace(-1.0, 1.0, 9)
    x, y, _ = torch.meshgrid(axis, axis, axis, indexing="ij")
    assert lipschitz_bound(3.0 * x + 4.0 * y, cell=0.25) == pytest.approx(5.0)
    assert lipschitz_bound(0.5 * x, cell=0.25) == 1.0  # flatter than a distance function: 1


def _dilated(marked: torch.Tensor) -> torch.Tensor:
    """Every cell with a marked cell among its 27 neighbours (itself included), by explicit shifts."""
    size = marked.shape[0]
    padded = torch.nn.functional.pad(marked, (1, 1, 1, 1, 1, 1))
    out = torch.zeros_like(marked)
    for i, j, k in itertools.product(range(3), repeat=3):
        out |= padded[i : i + size, j : j + size, k : k + size]
    return out


def test_cells_are_marked_where_the_sphere_can_reach_the_band_then_dilated():
    """A distance function (slope 1): a cell is marked where its centre lies within the band plus its half
    diagonal of the sphere, or inside it; then its neighbours are."""
    beta, tolerance, resolution = 0.01, 1e-4, 24
    grid = OccupancyGrid.from_sdf(sphere_sdf, RADIUS, resolution, beta, tolerance, chunk=1000)
    cell = 2 * RADIUS / resolution
    axis = -RADIUS + cell * (torch.arange(resolution) + 0.5)
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    reach = surface_band(beta, RADIUS, tolerance) + math.sqrt(3) / 2 * cell
    expected = _dilated(sphere_sdf(centres)[..., 0] < reach)
    assert grid.resolution == resolution and grid.cell == pytest.approx(cell)
    assert torch.equal(grid.occupied, expected)
    assert not grid.occupied[0, 0, 0] and grid.occupied[12, 12, 12]  # a corner is empty; the centre is inside


def test_a_steeper_sdf_widens_the_reach_of_each_cell():
    """The sphere's SDF scaled by 3 (slope 3): within a cell its value can fall 3 times its half diagonal below the
    centre's, so the grid marks the cells a slope of 1 would, and more."""
    beta, tolerance, resolution = 0.01, 1e-4, 24
    steep_sdf = lambda points: 3.0 * sphere_sdf(points)  # noqa: E731
    steep = OccupancyGrid.from_sdf(steep_sdf, RADIUS, resolution, beta, tolerance)
    cell = 2 * RADIUS / resolution
    axis = -RADIUS + cell * (torch.arange(resolution) + 0.5)
    values = steep_sdf(torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1))[..., 0]
    lipschitz = lipschitz_bound(values, cell)
    assert 2.9 < lipschitz <= 3.0 + 1e-5
    band = surface_band(beta, RADIUS, tolerance)
    assert torch.equal(steep.occupied, _dilated(values < band + lipschitz * math.sqrt(3) / 2 * cell))
    slope_one = _dilated(values < band + math.sqrt(3) / 2 * cell)
    assert torch.equal(steep.occupied & slope_one, slope_one) and steep.occupied.sum() > slope_one.sum()


def _crossing(origins, directions, radius):
    """Where each ray enters and leaves the sphere of ``radius`` at the origin (nan where it misses)."""
    b = (origins * directions).sum(-1)
    a = directions.pow(2).sum(-1)
    disc = b * b - a * (origins.pow(2).sum(-1) - radius**2)
    root = disc.clamp(min=0).sqrt()
    enter, leave = (-b - root) / a, (-b + root) / a
    return torch.where(disc >= 0, enter, math.nan), torch.where(disc >= 0, leave, math.nan)


@pytest.mark.parametrize("speed", [1.0, 2.5], ids=["unit-directions", "scaled-directions"])
def test_ray_bounds_keep_the_band_and_drop_empty_rays(speed):
    """Rays from outside the bounding sphere, near to far as the collider sets them: those that pass the sphere
    within the band are kept, with bounds that hold all of the band on them and little more; those that pass far
    from it are dropped, their bounds untouched. Directions of any length give the same points."""
    beta, tolerance, resolution = 0.01, 1e-4, 32
    grid = OccupancyGrid.from_sdf(sphere_sdf, RADIUS, resolution, beta, tolerance)
    band = surface_band(beta, RADIUS, tolerance)
    offsets = torch.tensor([0.0, 0.3, 0.55, 0.62, 1.1, 1.3])  # closest approach to the centre
    origins = torch.stack([offsets, torch.zeros(6), torch.full((6,), 4.0)], -1)
    directions = torch.tensor([[0.0, 0.0, -1.0]]).expand(6, 3) * speed
    nears, fars = (value[:, None] for value in _crossing(origins, directions, RADIUS))
    hit, new_nears, new_fars = grid.ray_bounds(origins, directions, nears, fars)
    assert hit.tolist() == [True, True, True, True, False, False]
    assert torch.equal(new_nears[~hit], nears[~hit]) and torch.equal(new_fars[~hit], fars[~hit])
    enter, leave = _crossing(origins[:4], directions[:4], SPHERE + band)
    assert (new_nears[:4, 0] <= enter).all() and (new_fars[:4, 0] >= leave).all()
    slack = SPHERE + band + 4 * grid.cell  # the half diagonal, the dilation and the steps, with room
    loose_enter, loose_leave = _crossing(origins[:4], directions[:4], slack)
    assert (new_nears[:4, 0] >= loose_enter).all() and (new_fars[:4, 0] <= loose_leave).all()
    assert (new_nears >= nears).all() and (new_fars <= fars).all()


def test_no_point_of_a_random_ray_near_the_surface_falls_outside_its_bounds():
    """Two spheres, rays in random directions through the cube: every point taken densely along a ray where the
    SDF is below the band lies within the ray's bounds, and a dropped ray has no such point."""

    def two_spheres(points):
        first = (points - torch.tensor([0.4, 0.0, 0.0])).norm(dim=-1, keepdim=True) - 0.3
        second = (points + torch.tensor([0.5, 0.3, 0.0])).norm(dim=-1, keepdim=True) - 0.2
        return torch.minimum(first, second)

    torch.manual_seed(0)
    beta, tolerance = 0.005, 1e-4
    grid = OccupancyGrid.from_sdf(two_spheres, RADIUS, 40, beta, tolerance)
    band = surface_band(beta, RADIUS, tolerance)
    origins = torch.nn.functional.normalize(torch.randn(400, 3), dim=-1) * 3.0
    targets = torch.rand(400, 3) * 1.6 - 0.8
    directions = torch.nn.functional.normalize(targets - origins, dim=-1)
    nears, fars = (value[:, None] for value in _crossing(origins, directions, RADIUS))
    hit, new_nears, new_fars = grid.ray_bounds(origins, directions, nears, fars)
    t = nears + (fars - nears) * torch.linspace(0, 1, 2000)
    near_surface = two_spheres(origins[:, None] + t[..., None] * directions[:, None])[..., 0] < band
    inside = (t >= new_nears) & (t <= new_fars)
    assert not (near_surface & ~inside).any()
    assert not near_surface[~hit].any()
    assert 0 < hit.sum() < 400  # some rays kept, some dropped


def test_a_grid_needs_two_cells_a_side():
    with pytest.raises(ValueError, match="at least 2 cells"):
        OccupancyGrid.from_sdf(sphere_sdf, RADIUS, 1, 0.01, 1e-4)
