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
    """Beyond the band the Laplace density, over the cube's diagonal, adds exactly the tolerance; no tolerance (the
    exact render) keeps everything, and a band never goes below 0."""
    beta, tolerance = 0.01, 1e-4
    band = surface_band(beta, RADIUS, tolerance)
    assert band == pytest.approx(beta * math.log(math.sqrt(3) * RADIUS / (beta * tolerance)))
    density = LaplaceDensity(beta_init=beta, beta_min=0.0)(torch.tensor([band], dtype=torch.float64))
    diagonal = 2 * math.sqrt(3) * RADIUS  # the longest path through the cube
    assert float(diagonal * density.detach()) == pytest.approx(tolerance, rel=1e-6)
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


def test_every_point_in_a_cell_marked_before_the_dilation_lies_within_the_bounds():
    """The bounds' own promise, cell by cell: points taken densely along random rays (from outside and from inside
    the cube) that fall in a cell marked before the dilation all lie within their ray's bounds, on a grid coarse
    enough that rays graze marked cells' corners."""
    torch.manual_seed(1)
    beta, tolerance, resolution = 0.005, 1e-4, 12
    grid = OccupancyGrid.from_sdf(sphere_sdf, RADIUS, resolution, beta, tolerance)
    cell = grid.cell
    axis = -RADIUS + cell * (torch.arange(resolution) + 0.5)
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    marked = sphere_sdf(centres)[..., 0] < surface_band(beta, RADIUS, tolerance) + math.sqrt(3) / 2 * cell
    origins = torch.cat([torch.nn.functional.normalize(torch.randn(1500, 3), dim=-1) * 3.0, torch.rand(500, 3) - 0.5])
    directions = torch.nn.functional.normalize(torch.randn(2000, 3), dim=-1)
    enter, leave = _crossing(origins, directions, RADIUS)
    nears, fars = enter.clamp(min=0)[:, None], leave[:, None]
    keep = leave > 0  # rays that pass the bounding sphere ahead of them
    origins, directions, nears, fars = origins[keep], directions[keep], nears[keep], fars[keep]
    hit, new_nears, new_fars = grid.ray_bounds(origins, directions, nears, fars)
    t = nears + (fars - nears) * torch.linspace(0, 1, 3000)
    points = origins[:, None] + t[..., None] * directions[:, None]
    cells = ((points + RADIUS) / cell).floor().long().clamp(0, resolution - 1)
    in_marked = marked[cells[..., 0], cells[..., 1], cells[..., 2]]
    assert not (in_marked & ((t < new_nears) | (t > new_fars))).any()
    assert not in_marked[~hit].any()
    assert in_marked.any() and (~hit).any()


def test_points_outside_the_cube_count_as_marked():
    """A crop box's bounds may leave the cube, where the grid knows nothing: a sphere beyond it is still sampled."""
    grid = OccupancyGrid.from_sdf(sphere_sdf, RADIUS, 16, 0.005, 1e-4)
    origin, direction = torch.tensor([[0.0, 1.2, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    hit, nears, fars = grid.ray_bounds(origin, direction, torch.zeros(1, 1), torch.full((1, 1), 10.0))
    assert hit.tolist() == [True]
    assert float(nears) <= RADIUS and float(fars) == 10.0


def test_rays_with_bounds_that_are_not_finite_keep_them():
    """A NaN bound (nerfstudio's box intersection can give one) is passed on as it was, not turned into an
    error or a skipped ray."""
    grid = OccupancyGrid.from_sdf(sphere_sdf, RADIUS, 16, 0.005, 1e-4)
    origins = torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, 4.0]])
    directions = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    nears, fars = torch.tensor([[math.nan], [2.5]]), torch.tensor([[5.0], [5.5]])
    hit, new_nears, new_fars = grid.ray_bounds(origins, directions, nears, fars)
    assert hit.tolist() == [True, True]
    assert math.isnan(float(new_nears[0])) and float(new_fars[0]) == 5.0
    assert 2.5 <= float(new_nears[1]) < 3.5 and 4.5 < float(new_fars[1]) <= 5.5
