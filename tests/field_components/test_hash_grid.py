"""The torch hash grid: layout, interpolation, derivatives, and the checkpoint guard."""

import math

import pytest
import torch

from cocoinr_nerfstudio.field_components.hash_grid import HashGrid, HashGridConfig


def _grid(**overrides) -> HashGrid:
    settings = {"num_levels": 3, "features_per_level": 2, "log2_hashmap_size": 8, "min_res": 2, "max_res": 8}
    settings.update(overrides)
    torch.manual_seed(0)
    return HashGrid(HashGridConfig(implementation="torch", **settings), bound=2.0)


def test_levels_dense_where_they_fit_hashed_beyond():
    grid = _grid()
    # resolutions 2, 4, 8 cells per side; vertices per side res + 2; 2^8 = 256 entries at most per level
    assert grid.resolutions.tolist() == [2.0, 4.0, 8.0]
    assert grid.strides[:, 1].tolist() == [4, 6, 10]  # vertices per side: res + 2
    assert grid.dense.tolist() == [True, True, False]  # 64 and 216 fit, 1000 does not
    assert grid.sizes.tolist() == [64, 216, 256]
    assert grid.offsets.tolist() == [0, 64, 280]
    assert grid.table.shape == (536, 2)
    assert grid.get_out_dim() == 6


def test_value_at_a_vertex_is_that_vertex_entry():
    grid = _grid()
    with torch.no_grad():
        grid.table.copy_(torch.arange(grid.table.numel(), dtype=torch.float32).reshape(-1, 2))
    # the cube [-2, 2]: point (-1, 0, 1) is (0.25, 0.5, 0.75) in unit coordinates -> vertex (1, 2, 3) at level 1
    features = grid(torch.tensor([[-1.0, 0.0, 1.0]]))
    row = 64 + 1 + 6 * (2 + 6 * 3)  # level-1 offset + dense index x + side * (y + side * z)
    torch.testing.assert_close(features[0, 2:4], grid.table[row])
    # level 0 (2 cells): (0.5, 1.0, 1.5) lies between vertices; trilinear mean of x in {0, 1}, z in {1, 2}
    expected = sum(grid.table[x + 4 * (1 + 4 * z)] for x in (0, 1) for z in (1, 2)) / 4
    torch.testing.assert_close(features[0, :2], expected)


def test_hashed_level_uses_instant_ngp_hash():
    grid = _grid()
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    # vertex (3, 5, 7) of level 2 (8 cells): unit (3/8, 5/8, 7/8) -> cube point
    point = (torch.tensor([[3.0, 5.0, 7.0]]) / 8.0 - 0.5) * 4.0
    row = 280 + ((3 * 1) ^ (5 * 2654435761) ^ (7 * 805459861)) % 256
    torch.testing.assert_close(grid(point)[0, 4:6], grid.table[row])


def test_interpolation_is_linear_along_an_edge_and_clamped_outside():
    grid = _grid()
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    # level 2 cell width in the cube: 4 / 8 = 0.5; walk along x inside one cell of all levels' grids
    start = torch.tensor([-1.0, 0.25, 0.25])
    points = torch.stack([start + torch.tensor([t * 0.5, 0.0, 0.0]) for t in (0.0, 0.25, 1.0)])
    values = grid(points)[:, 4:]
    torch.testing.assert_close(values[1], 0.75 * values[0] + 0.25 * values[2])
    far = grid(torch.tensor([[10.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(far[0], far[1])  # outside the cube: the face's value


def test_gradient_matches_finite_differences_and_has_a_second_derivative():
    grid = _grid(num_levels=2, max_res=4)
    with torch.no_grad():
        grid.table.copy_(torch.randn_like(grid.table))
    x = torch.tensor([[0.3, -0.4, 0.7]], dtype=torch.float32, requires_grad=True)
    weights = torch.randn(grid.get_out_dim())
    (gradient,) = torch.autograd.grad((grid(x) * weights).sum(), x, create_graph=True)
    step = 1e-3
    for axis in range(3):
        offset = torch.zeros(1, 3)
        offset[0, axis] = step
        with torch.no_grad():
            numeric = ((grid(x + offset) - grid(x - offset)) * weights).sum() / (2 * step)
        assert math.isclose(float(gradient[0, axis].detach()), float(numeric), rel_tol=1e-2, abs_tol=1e-3)
    # the eikonal loss differentiates the gradient with respect to the table
    (table_grad,) = torch.autograd.grad(gradient.pow(2).sum(), grid.table)
    assert table_grad.abs().sum() > 0
    assert torch.count_nonzero(table_grad.abs().sum(-1)) <= 2 * 8  # only the 8 corners of each level


def test_refuses_bad_shapes_and_missing_tinycudann():
    with pytest.raises(ValueError, match="min_res"):
        _grid(min_res=16, max_res=8)
    with pytest.raises(ValueError, match="half side"):
        HashGrid(HashGridConfig(implementation="torch"), bound=0.0)
    if not torch.cuda.is_available():
        with pytest.raises(ImportError, match="tinycudann"):
            HashGrid(HashGridConfig(implementation="tcnn"), bound=1.0)


def test_auto_without_tinycudann_is_torch_and_checkpoints_name_the_mismatch():
    grid = HashGrid(HashGridConfig(num_levels=2, log2_hashmap_size=6, min_res=2, max_res=4), bound=1.0)
    if grid.implementation != "torch":
        pytest.skip("tinycudann imports here")
    with pytest.raises(RuntimeError, match="tiny-cuda-nn implementation"):
        grid.load_state_dict({"tcnn_encoding.params": torch.zeros(10)})
    grid.load_state_dict(grid.state_dict())  # its own layout reloads
