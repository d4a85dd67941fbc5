"""Known answers for block-wise marching cubes, component filtering, mask culling and the world transform."""

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from cocoinr_nerfstudio.mesh.extraction import (
    NoSurfaceError,
    cull_by_masks,
    extract_mesh,
    keep_largest_component,
    transform_mesh,
)

CENTRE = torch.tensor([0.1, -0.05, 0.2])


def sphere(radius=0.6, centre=CENTRE):
    return lambda p: (p - centre.to(p)).norm(dim=-1) - radius


def run(sdf, resolution=40, **kwargs):
    kwargs.setdefault("show_progress", False)
    return extract_mesh(sdf, resolution, **kwargs)


def test_sphere_vertices_lie_on_the_sphere():
    """Off-centre sphere in an off-centre, non-cubic box; vertices within 2% of a voxel of the true radius."""
    box_min, box_max = (-0.7, -0.9, -0.5), (0.9, 0.8, 1.0)
    mesh = run(sphere(0.55), 45, bounding_box_min=box_min, bounding_box_max=box_max)
    voxel = (np.array(box_max) - np.array(box_min)).max() / 44
    radii = np.linalg.norm(mesh.vertices - CENTRE.numpy(), axis=1)
    assert np.abs(radii - 0.55).max() < 0.02 * voxel
    assert mesh.is_watertight and mesh.euler_number == 2
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.55**3, rel=0.01)  # positive: normals point outwards


@pytest.mark.parametrize("block_resolution,lipschitz", [(7, 4.0), (16, None), (13, 1.0)])
def test_blocks_give_the_same_seamless_mesh(block_resolution, lipschitz):
    """41 samples = 40 cells: 7 and 13 do not divide it; block faces must weld into one closed surface."""
    single = run(sphere(), 41, block_resolution=64)
    blocks = run(sphere(), 41, block_resolution=block_resolution, lipschitz=lipschitz)
    assert (len(blocks.vertices), len(blocks.faces)) == (len(single.vertices), len(single.faces))
    assert blocks.is_watertight and blocks.euler_number == 2
    # same vertices up to float32 rounding of block-local coordinates (skimage works in float32)
    distances, _ = cKDTree(single.vertices).query(blocks.vertices)
    assert distances.max() < 1e-6


def test_batch_dependent_sdf_stays_seamless():
    """SDFs whose outputs depend on the rest of the batch (GPU/MKL kernels) still agree on shared block faces.

    The offset below changes with the batch's first point; evaluating each block's samples as one batch
    instead of in canonical pieces leaves cracks here (Euler characteristic -69 instead of 2).
    """

    def batch_dependent(p):
        return sphere()(p) + 0.02 * torch.sin(p[0].sum() * 1000.0)

    mesh = run(batch_dependent, 37, block_resolution=9)
    assert mesh.is_watertight and mesh.euler_number == 2


def test_any_resolution_and_chunking():
    calls = []

    def counted(p):
        calls.append(p.shape[0])
        return sphere()(p)

    small_chunks = run(counted, 33, block_resolution=10, chunk_size=1000, device=torch.device("cpu"))
    assert max(calls) <= 1000
    reference = run(sphere(), 33, block_resolution=10)
    np.testing.assert_array_equal(small_chunks.vertices, reference.vertices)
    np.testing.assert_array_equal(small_chunks.faces, reference.faces)


def test_coarse_pass_skips_empty_blocks_without_losing_surface():
    counts = {}

    def counter(key):
        def fn(p):
            counts[key] = counts.get(key, 0) + p.shape[0]
            return sphere(0.2, torch.tensor([-0.6, -0.6, -0.6]))(p)

        return fn

    pruned = run(counter("pruned"), 49, block_resolution=8)
    full = run(counter("full"), 49, block_resolution=8, lipschitz=None)
    np.testing.assert_array_equal(pruned.vertices, full.vertices)  # same blocks and pieces where active
    assert counts["pruned"] < 0.5 * counts["full"]


def test_sdf_with_trailing_channel_is_accepted():
    mesh = run(lambda p: sphere()(p)[:, None], 24)
    assert mesh.is_watertight


@pytest.mark.parametrize("offset,side", [(5.0, "negative"), (-1.0, "positive")])
def test_no_zero_crossing_raises_clear_error(offset, side):
    with pytest.raises(NoSurfaceError) as info:
        run(lambda p: p.norm(dim=-1) - offset, 20, block_resolution=8)
    message = str(info.value)
    assert side in message and "larger bounding box" in message and "resolution 20" in message


def test_bad_box_is_rejected():
    with pytest.raises(ValueError, match="min < max"):
        run(sphere(), 20, bounding_box_min=(0, 0, 0), bounding_box_max=(1, -1, 1))


def test_keep_largest_component():
    big, small = sphere(0.4, torch.tensor([-0.4, 0.0, 0.0])), sphere(0.2, torch.tensor([0.6, 0.0, 0.0]))
    both = run(lambda p: torch.minimum(big(p), small(p)), 40)
    assert len(trimesh.graph.connected_components(both.face_adjacency)) == 2
    kept = keep_largest_component(both)
    assert kept.is_watertight and kept.euler_number == 2
    np.testing.assert_allclose(np.linalg.norm(kept.vertices - [-0.4, 0, 0], axis=1), 0.4, atol=0.01)


def test_transform_mesh_maps_to_world():
    mesh = run(sphere(0.5, torch.zeros(3)), 24)
    scale_mat = np.diag([200.0, 200.0, 200.0, 1.0])
    scale_mat[:3, 3] = [10.0, -20.0, 600.0]
    world = transform_mesh(mesh, scale_mat)
    np.testing.assert_allclose(world.vertices, mesh.vertices * 200 + [10, -20, 600])
    mirrored = transform_mesh(mesh, np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert mirrored.volume > 0  # winding follows the reflection


def plane_mesh(n=8):
    """Unit-spaced grid of 2 n^2 triangles on z = 0; coordinates are k - n/2 + 0.25, never on a pixel edge."""
    xs = np.arange(n + 1) - n / 2 + 0.25
    xx, yy = np.meshgrid(xs, xs, indexing="ij")
    vertices = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], 1)
    idx = np.arange(xx.size).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return trimesh.Trimesh(vertices, faces, process=False)


def look_down(height=10.0):
    """Camera above the origin looking down -z (nerfstudio/OpenGL: the camera looks along its -z axis)."""
    c2w = np.eye(4)[:3].copy()
    c2w[2, 3] = height
    return c2w


def test_cull_by_masks_removes_exactly_the_faces_outside():
    mesh = plane_mesh()
    w = h = 100
    mask = np.zeros((h, w), bool)
    mask[:, : w // 2] = True  # left half of the image = x < 0 in the world
    behind = look_down(-5.0)  # the plane is behind this camera: it sees nothing and must not cull
    empty = np.zeros((h, w), bool)
    culled = cull_by_masks(mesh, [50, 50], [50, 50], [50, 50], [50, 50], np.stack([look_down(), behind]), [mask, empty])
    inside_vertex = mesh.vertices[:, 0] < 0
    expected = mesh.faces[inside_vertex[mesh.faces].all(1)]
    assert len(culled.faces) == len(expected) > 0
    np.testing.assert_array_equal(
        np.sort(culled.vertices[culled.faces].reshape(-1, 9), axis=0),
        np.sort(mesh.vertices[expected].reshape(-1, 9), axis=0),
    )


def test_cull_by_masks_ignores_unseen_vertices_and_dilates():
    mesh = plane_mesh()
    # fx = 500 at height 10: u = 50 + 50 x, so the 100 px image sees only -1 <= x < 1 (and -1 < y <= 1).
    mask = np.zeros((100, 100), bool)
    mask[:, :40] = True  # u < 40  <=> x < -0.2 at fx=500, height 10
    culled = cull_by_masks(mesh, [500.0], [500.0], [50.0], [50.0], look_down()[None], [mask])
    x = mesh.vertices[:, 0]
    seen = np.abs(x) < 1.0  # |u - 50| < 50 and the same for y, which covers |y| < 1
    seen &= np.abs(mesh.vertices[:, 1]) < 1.0
    rejected = seen & (x >= -0.2)
    expected = mesh.faces[~rejected[mesh.faces].any(1)]
    assert len(culled.faces) == len(expected)
    dilated = cull_by_masks(mesh, [500.0], [500.0], [50.0], [50.0], look_down()[None], [mask], dilation=60)
    assert len(dilated.faces) == len(mesh.faces)


def test_cull_by_masks_rejects_everything_clearly():
    with pytest.raises(ValueError, match="removed every face"):
        cull_by_masks(plane_mesh(), [50], [50], [50], [50], look_down()[None], [np.zeros((100, 100), bool)])
