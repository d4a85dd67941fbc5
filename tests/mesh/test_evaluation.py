"""Known answers for surface distances, the DTU downsampling/sampling steps and a hand-made DTU case."""

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy import integrate
from scipy.spatial import cKDTree

from cocoinr_nerfstudio.mesh.evaluation import (
    DTUGroundTruth,
    MeshEvaluationError,
    downsample_points,
    dtu_metrics_from_points,
    mesh_distances,
    point_set_distances,
    sample_mesh_dense,
)


def test_mesh_against_itself_is_zero():
    mesh = trimesh.creation.icosphere(subdivisions=3)
    metrics = mesh_distances(mesh, mesh, num_samples=5000, thresholds=(0.01,))
    assert (metrics.accuracy, metrics.completeness, metrics.chamfer) == (0.0, 0.0, 0.0)
    assert metrics.fscore["0.01"] == 1.0


def test_parallel_squares_shifted_by_d_give_d():
    """Two 1 x 1 squares 0.05 apart along their normal: every distance is ~d (edge and sampling effects < 2%)."""
    square = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    shifted = square.copy().apply_translation([0, 0, 0.05])
    metrics = mesh_distances(square, shifted, num_samples=20000)
    assert metrics.accuracy == pytest.approx(0.05, rel=0.02)
    assert metrics.completeness == pytest.approx(0.05, rel=0.02)


def test_sphere_shifted_by_d_gives_the_exact_mean_surface_distance():
    """Unit sphere vs the same sphere shifted by d: the mean point-to-surface distance is not d but

    E|sqrt(1 - 2 d x + d^2) - 1| over x ~ U[-1, 1] (Archimedes: a sphere's x is uniform), about d/2.
    Tolerance 2%: faceting of the icosphere and the finite sample density.
    """
    d = 0.1
    expected = 0.5 * integrate.quad(lambda x: abs(math.sqrt(1 - 2 * d * x + d * d) - 1), -1, 1)[0]
    sphere = trimesh.creation.icosphere(subdivisions=5)
    metrics = mesh_distances(sphere, sphere.copy().apply_translation([d, 0, 0]), num_samples=100_000)
    assert expected == pytest.approx(d / 2, rel=0.01)
    assert metrics.accuracy == pytest.approx(expected, rel=0.02)
    assert metrics.completeness == pytest.approx(expected, rel=0.02)
    assert metrics.chamfer == pytest.approx(expected, rel=0.02)


def test_point_distances_match_brute_force():
    rng = np.random.default_rng(1)
    pred, gt = rng.normal(size=(700, 3)), rng.normal(size=(500, 3)) + 0.3
    metrics = point_set_distances(pred, gt)
    dist = torch.cdist(torch.from_numpy(pred), torch.from_numpy(gt))
    acc, comp = dist.min(1).values.mean().item(), dist.min(0).values.mean().item()
    assert metrics.accuracy == pytest.approx(acc, rel=1e-12)
    assert metrics.completeness == pytest.approx(comp, rel=1e-12)
    assert metrics.chamfer == pytest.approx((acc + comp) / 2, rel=1e-12)
    assert (metrics.num_points_pred, metrics.num_points_gt) == (700, 500)


def test_precision_recall_fscore_by_hand():
    pred = np.array([[0, 0, 0], [1, 0, 0], [5, 0, 0]], float)
    gt = np.array([[0, 0, 0.1], [1, 0, 0]], float)
    metrics = point_set_distances(pred, gt, thresholds=(0.5,))
    assert metrics.precision["0.5"] == pytest.approx(2 / 3)
    assert metrics.recall["0.5"] == 1.0
    assert metrics.fscore["0.5"] == pytest.approx(0.8)
    assert metrics.accuracy == pytest.approx((0.1 + 0 + 4) / 3)  # (5, 0, 0) is 4 from (1, 0, 0)


def test_empty_mesh_is_rejected():
    with pytest.raises(MeshEvaluationError, match="empty"):
        mesh_distances(trimesh.Trimesh(), trimesh.creation.icosphere())


def test_downsampling_is_the_greedy_thinning():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 2, size=(3000, 3))
    points[100:200] = points[:100]  # exact duplicates vanish
    kept = downsample_points(points, 0.2, seed=3)
    # brute force: sequential greedy in the same seeded order
    order = np.argsort(np.random.default_rng(3).permutation(len(points)))
    alive = np.ones(len(points), bool)
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    for i in order:
        if alive[i]:
            alive[dist[i] <= 0.2] = False
            alive[i] = True
    np.testing.assert_array_equal(np.sort(kept, axis=0), np.sort(points[alive], axis=0))
    assert cKDTree(kept).query(kept, k=2)[0][:, 1].min() > 0.2  # spacing
    assert cKDTree(kept).query(points)[0].max() <= 0.2  # coverage


def test_dense_sampling_covers_the_surface():
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=10.0)
    dense = sample_mesh_dense(mesh, 0.2)
    probes, _ = trimesh.sample.sample_surface(mesh, 20000, seed=0)
    assert cKDTree(dense).query(probes)[0].max() < 0.2
    _, distance, _ = trimesh.proximity.closest_point(mesh, dense[::50])
    assert distance.max() < 1e-9


def hand_made_dtu() -> DTUGroundTruth:
    """Box [0, 10]^3 mm, 1 mm voxels observed for x < 5.5, table plane z = 0.5 (above: z > 0.5)."""
    obs = np.ones((11, 11, 11), bool)
    obs[6:] = False
    stl = np.array(
        [
            [1, 1, 1],  # s1
            [3, 1, 1],  # s2
            [2, 2, 0.2],  # s3: below the table, still a target for accuracy
            [9, 9, 9],  # s4: above, but > max_dist from the reconstruction
            [20, 1, 1],  # s5: outside the box
            [8, 1, 2],  # s6: above, nearest to the unobserved point r3
        ],
        float,
    )
    return DTUGroundTruth(stl, obs, np.array([[0, 0, 0], [10, 10, 10]], float), 1.0, np.array([0, 0, 1, -0.5]))


def test_dtu_protocol_by_hand():
    recon = np.array(
        [
            [1, 1, 2],  # r1: observed, nearest s1 at 1
            [1, 1, 2],  # duplicate of r1: removed by the 0.2 mm downsampling
            [2, 2, 1],  # r2: observed, nearest s3 at 0.8
            [8, 1, 1],  # r3: unobserved voxel -> not in accuracy, but a completeness target
            [-3, 1, 1],  # r4: outside the box
            [1, 1, 8.4],  # r5: observed, nearest s1 at 7.4 >= max_dist -> outlier
        ],
        float,
    )
    metrics = dtu_metrics_from_points(recon, hand_made_dtu(), downsample_density=0.2, max_dist=5.0)
    # completeness: s1 -> r1 = 1, s2 -> r2 = sqrt 2, s6 -> r3 = 1, s4 -> r5 = 11.3 (outlier)
    assert metrics.accuracy == pytest.approx((1.0 + 0.8) / 2)
    assert metrics.completeness == pytest.approx((1.0 + math.sqrt(2) + 1.0) / 3)
    assert metrics.chamfer == pytest.approx((0.9 + (2 + math.sqrt(2)) / 3) / 2)
    assert (metrics.num_points_sampled, metrics.num_points_downsampled) == (6, 5)
    assert (metrics.num_points_pred, metrics.num_points_gt) == (3, 4)


def test_dtu_points_in_the_wrong_frame_get_a_hint():
    with pytest.raises(MeshEvaluationError, match="millimetres"):
        dtu_metrics_from_points(np.array([[0.1, 0.2, -0.3], [0.5, 0.5, 0.5]]) - 1, hand_made_dtu())
