"""Known answers for the symmetric Hausdorff distance reported next to accuracy / completeness / Chamfer."""

import json
import math
import sys

import numpy as np
import pytest
import trimesh
from scipy.spatial.distance import directed_hausdorff

from cocoinr_nerfstudio.mesh.evaluation import (
    DTUGroundTruth,
    dtu_metrics_from_points,
    mesh_distances,
    point_set_distances,
)
from cocoinr_nerfstudio.scripts import eval_mesh


def test_sphere_shifted_by_d_has_hausdorff_d_and_chamfer_about_half_of_it():
    """Unit sphere vs the same sphere shifted by d along x: the farthest point of either surface from the other
    is the pole on the shift axis, exactly d away, so Hausdorff = d while the mean-based Chamfer is ~d/2
    (see test_evaluation.py for its exact value). Tolerance: faceting and the finite sample density."""
    d = 0.1
    sphere = trimesh.creation.icosphere(subdivisions=5)
    metrics = mesh_distances(sphere, sphere.copy().apply_translation([d, 0, 0]), num_samples=100_000)
    assert metrics.hausdorff == pytest.approx(d, rel=0.03)
    assert metrics.chamfer == pytest.approx(d / 2, rel=0.05)
    assert metrics.hausdorff >= max(metrics.accuracy, metrics.completeness)


def test_identical_meshes_have_zero_hausdorff():
    mesh = trimesh.creation.box()
    assert mesh_distances(mesh, mesh, num_samples=2000).hausdorff == 0.0


def test_hausdorff_matches_scipy_directed_hausdorff():
    rng = np.random.default_rng(4)
    pred, gt = rng.normal(size=(600, 3)), rng.normal(size=(400, 3)) * 1.5 + 0.2
    metrics = point_set_distances(pred, gt)
    expected = max(directed_hausdorff(pred, gt)[0], directed_hausdorff(gt, pred)[0])
    assert metrics.hausdorff == pytest.approx(expected, rel=1e-12)


def test_one_far_point_moves_hausdorff_not_the_mean_much():
    """A single stray point 10 units away: Hausdorff = 10, accuracy only grows by about 10 / N."""
    gt = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0), [0.0], indexing="ij"), -1).reshape(-1, 3)
    pred = np.concatenate([gt, [[4.0, 4.0, 10.0]]])
    metrics = point_set_distances(pred, gt)
    assert metrics.hausdorff == pytest.approx(10.0)
    assert metrics.accuracy == pytest.approx(10.0 / len(pred))
    assert metrics.completeness == 0.0


def test_dtu_hausdorff_by_hand_includes_outliers():
    """Box [0, 10]^3 mm, voxels observed for x < 5.5, table z = 0.5; max_dist 5 drops two distances from the means."""
    obs = np.ones((11, 11, 11), bool)
    obs[6:] = False
    stl = np.array([[1, 1, 1], [3, 1, 1], [2, 2, 0.2], [9, 9, 9], [20, 1, 1], [8, 1, 2]], float)
    gt = DTUGroundTruth(stl, obs, np.array([[0, 0, 0], [10, 10, 10]], float), 1.0, np.array([0, 0, 1, -0.5]))
    recon = np.array([[1, 1, 2], [2, 2, 1], [8, 1, 1], [-3, 1, 1], [1, 1, 8.4]], float)
    metrics = dtu_metrics_from_points(recon, gt, downsample_density=0.2, max_dist=5.0)
    # accuracy distances (observed recon -> all stl): 1, 0.8, 7.4 (outlier); completeness (stl above the table
    # in the box -> recon): 1, sqrt 2, 1 and (9, 9, 9) -> (1, 1, 8.4) = sqrt(64 + 64 + 0.36) (outlier)
    assert metrics.hausdorff == pytest.approx(math.sqrt(128.36))
    assert metrics.accuracy == pytest.approx(0.9)  # the means still drop the outliers


def test_eval_mesh_cli_prints_hausdorff(tmp_path, monkeypatch, capsys):
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=50.0)
    sphere.export(tmp_path / "gt.ply")
    sphere.copy().apply_translation([0, 0, 4.0]).export(tmp_path / "pred.ply")
    argv = ["cocoinr-eval-mesh", "--mesh", str(tmp_path / "pred.ply"), "--gt", str(tmp_path / "gt.ply")]
    monkeypatch.setattr(sys, "argv", [*argv, "--num-samples", "50000"])
    eval_mesh.entrypoint()
    result = json.loads(capsys.readouterr().out)
    assert result["hausdorff"] == pytest.approx(4.0, rel=0.05)
    assert result["chamfer"] == pytest.approx(2.0, rel=0.05)
    assert result["hausdorff"] > result["chamfer"]
