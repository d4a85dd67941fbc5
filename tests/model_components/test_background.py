"""NeRF++ inverted-sphere parametrisation and quadrature."""

import torch

from cocoinr_nerfstudio.model_components.background import (
    background_weights,
    inverted_sphere_points,
    inverted_sphere_samples,
)


def test_points_lie_on_the_ray_at_the_requested_radius():
    torch.manual_seed(0)
    origins = torch.randn(20, 3) * 0.5
    directions = torch.nn.functional.normalize(torch.randn(20, 3), dim=-1)
    inverse_radii = inverted_sphere_samples(8, 20, radius=3.0, stratified=True, device=torch.device("cpu"))
    assert (inverse_radii <= 1 / 3.0 + 1e-7).all() and (inverse_radii >= 0).all()
    assert (inverse_radii[:, 1:] <= inverse_radii[:, :-1]).all()  # near sphere first, infinity last
    points = inverted_sphere_points(origins, directions, inverse_radii[:, :-1])  # finite radii
    world = points[..., :3] / points[..., 3:]
    torch.testing.assert_close(world.norm(dim=-1), 1 / inverse_radii[:, :-1], rtol=1e-4, atol=1e-4)
    offset = world - origins[:, None, :]
    t = (offset * directions[:, None, :]).sum(-1)
    assert (t > 0).all()  # in front of the origin
    torch.testing.assert_close(offset, t[..., None] * directions[:, None, :].expand_as(offset), rtol=1e-4, atol=1e-4)


def test_points_at_infinity_are_the_direction():
    directions = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    points = inverted_sphere_points(torch.randn(5, 3) * 0.3, directions, torch.zeros(5, 1))
    torch.testing.assert_close(points[:, 0, :3], directions)
    assert (points[..., 3] == 0).all()


def test_background_is_opaque_at_infinity():
    inverse_radii = inverted_sphere_samples(16, 4, radius=3.0, stratified=False, device=torch.device("cpu"))
    weights = background_weights(inverse_radii, torch.rand(4, 16))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    # nearly empty space: the whole weight lands on the last sample, at infinity
    weights = background_weights(inverse_radii, torch.full((4, 16), 1e-6))
    torch.testing.assert_close(weights[:, -1], torch.ones(4), atol=1e-6, rtol=0)
