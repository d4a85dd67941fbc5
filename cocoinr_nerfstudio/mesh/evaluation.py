"""Mesh accuracy/completeness/Chamfer/Hausdorff: a generic surface-sampled version and the standard DTU protocol.

Accuracy is prediction -> ground truth (is what we built really there?), completeness is ground truth ->
prediction (is everything there built?); Chamfer is their mean. The symmetric Hausdorff distance is the larger
of the two directed maxima: the worst error in either direction, where Chamfer is an average. All
nearest-neighbour searches use ``scipy.spatial.cKDTree``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import cKDTree


class MeshEvaluationError(ValueError):
    """Inputs that cannot be evaluated (empty mesh, wrong frame, missing DTU files)."""


@dataclass
class DistanceMetrics:
    """Symmetric surface distances, in the meshes' units."""

    accuracy: float
    completeness: float
    chamfer: float
    hausdorff: float
    """max(max accuracy distance, max completeness distance): the symmetric Hausdorff distance of the point sets."""
    num_points_pred: int
    num_points_gt: int
    precision: dict[str, float] = field(default_factory=dict)
    recall: dict[str, float] = field(default_factory=dict)
    fscore: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def nearest_distances(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Distance from each query point to its nearest target point."""
    distances, _ = cKDTree(np.asarray(targets, np.float64)).query(np.asarray(queries, np.float64), k=1, workers=-1)
    return distances


def _check_mesh(mesh: trimesh.Trimesh, name: str) -> None:
    if len(mesh.faces) == 0 or mesh.area <= 0:
        raise MeshEvaluationError(f"{name} mesh is empty (no faces of non-zero area)")


def sample_surface(mesh: trimesh.Trimesh, num_points: int, seed: int = 0) -> np.ndarray:
    """Area-uniform random points on the surface, reproducible through ``seed``."""
    _check_mesh(mesh, "input")
    points, _ = trimesh.sample.sample_surface(mesh, int(num_points), seed=seed)
    return np.asarray(points, np.float64)


def point_set_distances(pred: np.ndarray, gt: np.ndarray, thresholds: Sequence[float] = ()) -> DistanceMetrics:
    """Accuracy/completeness/Chamfer between two point sets, plus precision/recall/F-score per threshold."""
    if len(pred) == 0 or len(gt) == 0:
        raise MeshEvaluationError("cannot compare empty point sets")
    d_pred = nearest_distances(pred, gt)
    d_gt = nearest_distances(gt, pred)
    acc, comp = float(d_pred.mean()), float(d_gt.mean())
    out = DistanceMetrics(
        accuracy=acc,
        completeness=comp,
        chamfer=(acc + comp) / 2,
        hausdorff=float(max(d_pred.max(), d_gt.max())),
        num_points_pred=len(pred),
        num_points_gt=len(gt),
    )
    for t in thresholds:
        p, r = float((d_pred < t).mean()), float((d_gt < t).mean())
        out.precision[str(t)], out.recall[str(t)] = p, r
        out.fscore[str(t)] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return out


def mesh_distances(
    pred: trimesh.Trimesh,
    gt: trimesh.Trimesh | np.ndarray,
    num_samples: int = 200_000,
    seed: int = 0,
    thresholds: Sequence[float] = (),
) -> DistanceMetrics:
    """Surface-sampled symmetric distances; ``gt`` may also be a point cloud ([N, 3]), used as is.

    Both surfaces are sampled with the same seed, so a mesh compared with itself scores exactly 0.
    """
    _check_mesh(pred, "predicted")
    pred_points = sample_surface(pred, num_samples, seed)
    gt_points = np.asarray(gt, np.float64) if isinstance(gt, np.ndarray) else sample_surface(gt, num_samples, seed)
    return point_set_distances(pred_points, gt_points, thresholds)


# --------------------------------------------------------------------------------------------- DTU protocol


@dataclass
class DTUGroundTruth:
    """Official DTU evaluation data of one scan (millimetres, DTU world frame)."""

    stl_points: np.ndarray
    """[N, 3] structured-light reference points."""
    obs_mask: np.ndarray
    """Boolean voxel grid of the observed volume, voxel (i, j, k) centred at ``bb[0] + res * (i, j, k)``."""
    bb: np.ndarray
    """[2, 3] bounding box (min, max)."""
    res: float
    """Voxel size of ``obs_mask``."""
    plane: np.ndarray
    """[4] ground plane; points with ``plane . (x, y, z, 1) > 0`` are above the table."""


def load_dtu_ground_truth(dtu_dir: str | Path, scan: int) -> DTUGroundTruth:
    """Read ``Points/stl/stl{scan:03d}_total.ply``, ``ObsMask/ObsMask{scan}_10.mat`` and ``ObsMask/Plane{scan}.mat``."""
    from scipy.io import loadmat

    dtu_dir = Path(dtu_dir)
    stl_path = dtu_dir / "Points" / "stl" / f"stl{scan:03d}_total.ply"
    obs_path = dtu_dir / "ObsMask" / f"ObsMask{scan}_10.mat"
    plane_path = dtu_dir / "ObsMask" / f"Plane{scan}.mat"
    missing = [str(p) for p in (stl_path, obs_path, plane_path) if not p.is_file()]
    if missing:
        raise MeshEvaluationError(f"DTU evaluation data for scan {scan} not found: missing {', '.join(missing)}")
    stl = np.asarray(trimesh.load(stl_path, process=False).vertices, np.float64)
    obs = loadmat(str(obs_path))
    plane = np.asarray(loadmat(str(plane_path))["P"], np.float64).reshape(4)
    return DTUGroundTruth(
        stl,
        np.asarray(obs["ObsMask"]).astype(bool),
        np.asarray(obs["BB"], np.float64).reshape(2, 3),
        float(np.asarray(obs["Res"]).reshape(-1)[0]),
        plane,
    )


def sample_mesh_dense(mesh: trimesh.Trimesh, spacing: float, max_chunk: int = 4_000_000) -> np.ndarray:
    """Deterministic surface points no farther than about ``spacing`` apart (plus the vertices).

    Each triangle gets a lattice along its two edges from vertex 0 (steps <= spacing) and points along its
    third edge; duplicates across triangles are harmless since the protocol downsamples afterwards.
    """
    tri = np.asarray(mesh.vertices, np.float64)[np.asarray(mesh.faces)]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    n1 = np.maximum(1, np.ceil(np.linalg.norm(e1, axis=1) / spacing)).astype(np.int64)
    n2 = np.maximum(1, np.ceil(np.linalg.norm(e2, axis=1) / spacing)).astype(np.int64)
    n3 = np.maximum(1, np.ceil(np.linalg.norm(e2 - e1, axis=1) / spacing)).astype(np.int64)
    out = [np.asarray(mesh.vertices, np.float64)]
    counts = (n1 + 1) * (n2 + 1)
    start = 0
    while start < len(tri):  # chunks of triangles bound the candidate lattice memory
        stop = start + max(1, int(np.searchsorted(np.cumsum(counts[start:]), max_chunk)))
        sl = slice(start, stop)
        owner = np.repeat(np.arange(start, stop), counts[sl])
        local = np.arange(len(owner)) - np.repeat(np.cumsum(counts[sl]) - counts[sl], counts[sl])
        a, b = local // (n2[owner] + 1), local % (n2[owner] + 1)
        inside = a * n2[owner] + b * n1[owner] <= n1[owner] * n2[owner]
        owner, a, b = owner[inside], a[inside], b[inside]
        out.append(tri[owner, 0] + (a / n1[owner])[:, None] * e1[owner] + (b / n2[owner])[:, None] * e2[owner])
        owner = np.repeat(np.arange(start, stop), n3[sl] + 1)
        t = (np.arange(len(owner)) - np.repeat(np.cumsum(n3[sl] + 1) - (n3[sl] + 1), n3[sl] + 1)) / n3[owner]
        out.append(tri[owner, 1] + t[:, None] * (e2[owner] - e1[owner]))
        start = stop
    return np.concatenate(out)


def downsample_points(points: np.ndarray, radius: float, seed: int = 0) -> np.ndarray:
    """Greedy radius thinning in a seeded random order: keep a point, drop every later point within ``radius``.

    Same rule as the DTU protocol's 0.2 mm downsampling, so dense samples weigh the surface by area. Computed
    in parallel rounds (a point is kept once no earlier point within ``radius`` is undecided), which gives
    exactly the sequential greedy result without a Python loop over points.
    """
    points = np.asarray(points, np.float64)
    priority = np.random.default_rng(seed).permutation(len(points))
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    swap = priority[pairs[:, 0]] > priority[pairs[:, 1]]
    pairs[swap] = pairs[swap][:, ::-1]  # rows (earlier, later) in the random order
    undecided = np.ones(len(points), dtype=bool)
    kept = np.zeros(len(points), dtype=bool)
    while undecided.any():
        pairs = pairs[undecided[pairs[:, 0]] & undecided[pairs[:, 1]]]
        blocked = np.zeros(len(points), dtype=bool)
        blocked[pairs[:, 1]] = True
        chosen = undecided & ~blocked
        kept |= chosen
        undecided &= ~chosen
        undecided[pairs[chosen[pairs[:, 0]], 1]] = False
    return points[kept]


@dataclass
class DTUMetrics:
    """DTU Chamfer metrics in millimetres, with the point counts behind them."""

    accuracy: float
    completeness: float
    chamfer: float
    hausdorff: float
    """Symmetric Hausdorff distance of the evaluated point sets (the same points as accuracy and completeness),
    taken before the ``max_dist`` outlier cut: that cut only keeps outliers out of the means."""
    num_points_sampled: int
    num_points_downsampled: int
    num_points_pred: int
    """Downsampled reconstruction points inside the bounding box and observation mask."""
    num_points_gt: int
    """Reference points above the ground plane and inside the bounding box."""
    units: str = "mm"

    def to_dict(self) -> dict:
        return asdict(self)


def in_observation_mask(points: np.ndarray, gt: DTUGroundTruth) -> np.ndarray:
    """Points inside the bounding box whose nearest ObsMask voxel is observed."""
    inside = np.all((points >= gt.bb[0]) & (points < gt.bb[1]), axis=1)
    voxel = np.round((points - gt.bb[0]) / gt.res).astype(np.int64)
    inside &= np.all((voxel >= 0) & (voxel < np.asarray(gt.obs_mask.shape)), axis=1)
    out = np.zeros(len(points), dtype=bool)
    v = voxel[inside]
    out[np.nonzero(inside)[0]] = gt.obs_mask[v[:, 0], v[:, 1], v[:, 2]]
    return out


def dtu_metrics_from_points(
    recon_points: np.ndarray,
    gt: DTUGroundTruth,
    downsample_density: float = 0.2,
    max_dist: float = 20.0,
    seed: int = 0,
) -> DTUMetrics:
    """DTU protocol on dense reconstruction points (world millimetres).

    Reconstruction points are thinned to ``downsample_density``; accuracy uses those inside the bounding box
    and observation mask (-> reference points); completeness uses reference points above the ground plane and
    inside the bounding box (-> all thinned reconstruction points, as in the official MATLAB code). Distances
    of ``max_dist`` or more are outliers and left out of both means; the Hausdorff distance (not part of the
    official protocol) is the largest of all these distances, outliers included.
    """
    if len(recon_points) == 0:
        raise MeshEvaluationError("the reconstruction has no points")
    down = downsample_points(recon_points, downsample_density, seed)
    pred = down[in_observation_mask(down, gt)]
    if len(pred) == 0:
        raise MeshEvaluationError(
            f"no reconstructed point lies inside the DTU observation mask (box {gt.bb.tolist()} mm; the mesh spans "
            f"{down.min(0).round(3).tolist()} .. {down.max(0).round(3).tolist()}). Is the mesh in DTU world "
            "millimetres? cocoinr-extract-mesh writes world units unless --normalized-frame is given."
        )
    stl = gt.stl_points
    above = np.concatenate([stl, np.ones((len(stl), 1))], axis=1) @ gt.plane > 0
    stl = stl[above & np.all((stl >= gt.bb[0]) & (stl < gt.bb[1]), axis=1)]
    if len(stl) == 0:
        raise MeshEvaluationError("no reference point lies above the ground plane inside the bounding box")
    d_acc = nearest_distances(pred, gt.stl_points)
    d_comp = nearest_distances(stl, down)
    hausdorff = float(max(d_acc.max(), d_comp.max()))
    d_acc, d_comp = d_acc[d_acc < max_dist], d_comp[d_comp < max_dist]
    if len(d_acc) == 0 or len(d_comp) == 0:
        raise MeshEvaluationError(f"every distance is an outlier (>= {max_dist} mm): is the mesh in the right frame?")
    acc, comp = float(d_acc.mean()), float(d_comp.mean())
    return DTUMetrics(
        accuracy=acc,
        completeness=comp,
        chamfer=(acc + comp) / 2,
        hausdorff=hausdorff,
        num_points_sampled=len(recon_points),
        num_points_downsampled=len(down),
        num_points_pred=len(pred),
        num_points_gt=len(stl),
    )


def evaluate_dtu(
    mesh: trimesh.Trimesh,
    dtu_dir: str | Path,
    scan: int,
    downsample_density: float = 0.2,
    max_dist: float = 20.0,
    seed: int = 0,
    gt: DTUGroundTruth | None = None,
) -> DTUMetrics:
    """Standard DTU Chamfer of a world-frame (mm) mesh against scan ``scan`` of the official evaluation data."""
    _check_mesh(mesh, "reconstructed")
    gt = gt if gt is not None else load_dtu_ground_truth(dtu_dir, scan)
    points = sample_mesh_dense(mesh, downsample_density)
    return dtu_metrics_from_points(points, gt, downsample_density, max_dist, seed)
