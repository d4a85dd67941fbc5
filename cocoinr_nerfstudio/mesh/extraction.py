"""Mesh extraction from an SDF: block-wise marching cubes, largest component, mask culling, world transform.

nerfstudio's own ``generate_mesh_with_multires_marching_cubes`` hard-codes CUDA, needs a resolution that is a
multiple of 512 and concatenates per-block meshes with duplicated seam vertices; this module replaces it.

Design (why it is seamless): all blocks index one global sample grid, neighbouring blocks share their boundary
samples, and every sample is evaluated as part of a canonical *piece* (a block interior, face, edge or corner
that does not depend on which block asks for it), so shared samples get bit-identical values even when the
SDF's output depends on batch composition (GPU/MKL kernels). Vertices are then welded by the global grid edge
they lie on, which makes the block decomposition invisible in the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import trimesh
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from skimage import measure
from torch import Tensor

SDFCallable = Callable[[Tensor], Tensor]
Vec3 = tuple[float, float, float]


class NoSurfaceError(RuntimeError):
    """The SDF has no crossing of the requested level inside the searched box (nothing to mesh)."""


def _axis_boundaries(resolution: int, block_resolution: int) -> np.ndarray:
    """Sample indices where blocks meet along one axis: 0, B, 2B, ..., resolution - 1."""
    return np.unique(np.append(np.arange(0, resolution - 1, block_resolution), resolution - 1))


def _segments(lo: int, hi: int) -> list[tuple[int, int]]:
    """Split the closed index range [lo, hi] into canonical segments {lo}, (lo, hi), {hi} (half-open pairs)."""
    return [(lo, lo + 1), (lo + 1, hi), (hi, hi + 1)]


class _GridSampler:
    """Evaluates an SDF on index sub-grids of one global regular grid, in chunks, under ``no_grad``."""

    def __init__(self, sdf_fn: SDFCallable, bmin: np.ndarray, spacing: np.ndarray, device, chunk_size: int):
        self.sdf_fn = sdf_fn
        self.device = torch.device(device)
        self.bmin = torch.tensor(bmin, dtype=torch.float64, device=self.device)
        self.spacing = torch.tensor(spacing, dtype=torch.float64, device=self.device)
        self.chunk_size = int(chunk_size)
        self.min_seen, self.max_seen = np.inf, -np.inf

    @torch.no_grad()
    def evaluate(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """SDF at the tensor product of the given per-axis sample indices, as a float32 array [nx, ny, nz]."""
        shape = tuple(len(a) for a in axes)
        out = np.empty(int(np.prod(shape)), dtype=np.float32)
        if out.size == 0:
            return out.reshape(shape)
        idx = [torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device) for a in axes]
        for start in range(0, out.size, self.chunk_size):
            lin = torch.arange(start, min(start + self.chunk_size, out.size), device=self.device)
            ijk = torch.stack(
                [idx[0][lin // (shape[1] * shape[2])], idx[1][(lin // shape[2]) % shape[1]], idx[2][lin % shape[2]]],
                dim=-1,
            )
            points = (self.bmin + ijk.to(torch.float64) * self.spacing).to(torch.float32)
            values = self.sdf_fn(points).reshape(-1)
            if values.numel() != points.shape[0]:
                raise ValueError(f"sdf_fn returned {values.numel()} values for {points.shape[0]} points")
            out[start : start + values.numel()] = values.detach().float().cpu().numpy()
        finite = out[np.isfinite(out)]
        if finite.size != out.size:
            raise ValueError(f"sdf_fn returned {out.size - finite.size} non-finite values (NaN/inf): check the model")
        self.min_seen = min(self.min_seen, float(out.min()))
        self.max_seen = max(self.max_seen, float(out.max()))
        return out.reshape(shape)


def _block_volume(sampler: _GridSampler, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Samples of one block (closed index ranges), assembled from its 27 canonical pieces."""
    volume = np.empty(tuple(hi - lo + 1 for lo, hi in ranges), dtype=np.float32)
    for piece in itertools.product(*(_segments(lo, hi) for lo, hi in ranges)):
        if any(b <= a for a, b in piece):
            continue  # empty interior when a block is one cell thick
        sl = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(piece, ranges, strict=True))
        volume[sl] = sampler.evaluate([np.arange(a, b) for a, b in piece])
    return volume


def _weld(vertices: np.ndarray, faces: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices lying on the same global grid edge (or grid point), then drop degenerate faces.

    A marching-cubes vertex has at most one non-integer coordinate (the edge direction), so the key
    (floor of its grid coordinates, edge axis) identifies the edge without a distance tolerance. Coordinates
    within 1e-4 cell of a grid point are snapped to it first, so an edge interpolated in opposite directions by
    two blocks (float32 rounding to the end point in one of them) still gets one key.
    """
    nearest = np.round(vertices)
    vertices = np.where(np.abs(vertices - nearest) < 1e-4, nearest, vertices)
    base = np.floor(vertices).astype(np.int64)
    frac = vertices != base
    axis = np.where(frac.any(1), frac.argmax(1) + 1, 0).astype(np.int64)
    keys = ((base[:, 0] * resolution + base[:, 1]) * resolution + base[:, 2]) * 4 + axis
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    degenerate = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    return vertices[first], faces[~degenerate]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(elapsed_when_finished=True),
        console=CONSOLE,
        transient=False,
    )


def _iter_blocks(bounds: Sequence[np.ndarray]) -> Iterator[tuple[tuple[int, int], ...]]:
    for ids in itertools.product(*(range(len(b) - 1) for b in bounds)):
        yield tuple((int(b[i]), int(b[i + 1])) for b, i in zip(bounds, ids, strict=True))


def extract_mesh(
    sdf_fn: SDFCallable,
    resolution: int = 512,
    bounding_box_min: Vec3 = (-1.0, -1.0, -1.0),
    bounding_box_max: Vec3 = (1.0, 1.0, 1.0),
    level: float = 0.0,
    block_resolution: int = 256,
    device: str | torch.device = "cpu",
    chunk_size: int = 1 << 18,
    lipschitz: float | None = 4.0,
    show_progress: bool = True,
) -> trimesh.Trimesh:
    """Marching cubes of ``{sdf_fn = level}`` on a ``resolution``^3 sample grid spanning the box (inclusive).

    Memory is bounded by one block of ``(block_resolution + 1)^3`` samples plus one chunk of points. Blocks
    are skipped without fine evaluation when a coarse pass proves they cannot hold the surface, assuming the
    SDF is ``lipschitz``-Lipschitz (learned SDFs are only roughly 1-Lipschitz; ``None`` disables skipping).
    Negative values are inside: faces are wound so normals point to increasing SDF (outwards).

    Returns the mesh in the SDF's own frame. Raises ``NoSurfaceError`` when no level crossing exists.
    """
    bmin, bmax = np.asarray(bounding_box_min, np.float64), np.asarray(bounding_box_max, np.float64)
    if bmin.shape != (3,) or bmax.shape != (3,) or np.any(bmax <= bmin):
        raise ValueError(f"bounding box needs 3 coordinates with min < max, got {bmin.tolist()} .. {bmax.tolist()}")
    if resolution < 2 or block_resolution < 1:
        raise ValueError(f"need resolution >= 2 and block_resolution >= 1, got {resolution}, {block_resolution}")
    spacing = (bmax - bmin) / (resolution - 1)
    sampler = _GridSampler(sdf_fn, bmin, spacing, device, chunk_size)
    bounds = [_axis_boundaries(resolution, block_resolution)] * 3
    blocks = list(_iter_blocks(bounds))
    active = _coarse_active_blocks(
        sampler, blocks, bounds[0], resolution, block_resolution, spacing, level, lipschitz, show_progress
    )

    vertices: list[np.ndarray] = []
    faces: list[np.ndarray] = []
    num_vertices = 0
    with _progress() if show_progress else _NullProgress() as progress:
        task = progress.add_task(f"Marching cubes {resolution}^3", total=len(active))
        for ranges in active:
            volume = _block_volume(sampler, ranges)
            vmin, vmax = float(volume.min()), float(volume.max())
            if vmin <= level <= vmax and vmin < vmax:  # skimage raises outside that range
                verts, tris, _, _ = measure.marching_cubes(volume, level=level, gradient_direction="descent")
                vertices.append(verts.astype(np.float64) + np.array([lo for lo, _ in ranges], np.float64))
                faces.append(tris.astype(np.int64) + num_vertices)
                num_vertices += len(verts)
            progress.advance(task)

    if not faces:
        raise NoSurfaceError(_no_surface_message(sampler, bmin, bmax, resolution, level))
    grid_vertices, all_faces = _weld(np.concatenate(vertices), np.concatenate(faces), resolution)
    mesh = trimesh.Trimesh(bmin + grid_vertices * spacing, all_faces, process=False)
    return _remove_unreferenced(mesh)


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass


def _coarse_active_blocks(
    sampler, blocks, boundaries, resolution, block_resolution, spacing, level, lipschitz, verbose
):
    """Blocks that may contain the level set, judged from a coarse sub-grid that includes every block boundary.

    Every fine sample lies within half a coarse-cell diagonal ``h`` of a coarse sample of its own block, so a
    block whose coarse values all exceed ``lipschitz * h`` in distance from ``level`` (with one sign) is empty.
    """
    if lipschitz is None:
        return blocks
    stride = max(2, block_resolution // 16)  # 256-cell blocks: coarse grid 1/4096 of the samples
    coarse = np.unique(np.concatenate([np.arange(0, resolution, stride), boundaries]))
    with CONSOLE.status(f"Coarse SDF pass ({len(coarse)}^3 samples)...") if verbose else nullcontext():
        values = sampler.evaluate([coarse] * 3) - level
    half_diag = 0.5 * np.linalg.norm(np.diff(coarse).max() * spacing)
    margin = lipschitz * half_diag
    active = []
    for ranges in blocks:
        sel = [np.nonzero((coarse >= lo) & (coarse <= hi))[0] for lo, hi in ranges]
        sub = values[np.ix_(*sel)]
        if not (sub.min() > margin or sub.max() < -margin):
            active.append(ranges)
    if verbose:
        CONSOLE.print(f"Marching cubes: {len(active)} of {len(blocks)} blocks may hold the surface")
    return active


def _no_surface_message(sampler: _GridSampler, bmin, bmax, resolution: int, level: float) -> str:
    lo, hi = sampler.min_seen, sampler.max_seen
    side = "positive (all outside)" if lo > level else "negative (all inside)" if hi < level else "on one side"
    return (
        f"No crossing of SDF level {level} found in the box {np.round(bmin, 4).tolist()} .. "
        f"{np.round(bmax, 4).tolist()} at resolution {resolution}: the sampled SDF ranges over [{lo:.4g}, {hi:.4g}], "
        f"i.e. it is {side} there. Try a larger bounding box, an isosurface level inside that range, a higher "
        f"resolution (for thin structures), or a longer training (the surface may not have formed yet)."
    )


def _remove_unreferenced(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    used, faces = np.unique(mesh.faces.reshape(-1), return_inverse=True)
    return trimesh.Trimesh(mesh.vertices[used], faces.reshape(-1, 3), process=False)


def keep_largest_component(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Keep the connected component (by shared edges) with the most faces: drops floaters of few-view SDFs."""
    if len(mesh.faces) == 0:
        return mesh
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    largest = np.bincount(labels).argmax()
    return _remove_unreferenced(trimesh.Trimesh(mesh.vertices, mesh.faces[labels == largest], process=False))


def cull_by_masks(
    mesh: trimesh.Trimesh,
    fx: Sequence[float],
    fy: Sequence[float],
    cx: Sequence[float],
    cy: Sequence[float],
    camera_to_worlds: np.ndarray,
    masks: Sequence[np.ndarray],
    dilation: int = 0,
) -> trimesh.Trimesh:
    """Remove faces with a vertex that projects into an image but outside that view's foreground mask.

    Cameras use nerfstudio conventions (c2w 3x4, OpenGL axes: x right, y up, z back; pixel centres at +0.5),
    in the mesh's frame. A vertex is judged only by views that see it (in front of the camera and inside the
    image; occlusion is ignored). ``dilation`` grows every mask by that many pixels (disk) to spare borders.
    """
    from scipy.ndimage import distance_transform_edt

    c2w = np.asarray(camera_to_worlds, np.float64).reshape(-1, 3, 4)
    if not (len(c2w) == len(masks) == len(fx) == len(fy) == len(cx) == len(cy)):
        raise ValueError("cull_by_masks needs one intrinsics/pose entry per mask")
    verts = np.asarray(mesh.vertices, np.float64)
    keep = np.ones(len(verts), dtype=bool)
    for i, mask in enumerate(masks):
        mask = np.asarray(mask).astype(bool)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if dilation > 0 and mask.any():  # disk dilation: pixels within `dilation` of the foreground
            mask = distance_transform_edt(~mask) <= dilation
        cam = (verts - c2w[i, :, 3]) @ c2w[i, :, :3]  # world -> camera: R^T (p - t)
        depth = -cam[:, 2]
        front = depth > 1e-8
        safe = np.where(front, depth, 1.0)
        u = cx[i] + fx[i] * cam[:, 0] / safe
        v = cy[i] - fy[i] * cam[:, 1] / safe
        h, w = mask.shape
        seen = front & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        rows, cols = np.floor(v[seen]).astype(np.int64), np.floor(u[seen]).astype(np.int64)
        outside = np.zeros_like(keep)
        outside[np.nonzero(seen)[0]] = ~mask[rows, cols]
        keep &= ~outside
    face_keep = keep[mesh.faces].all(axis=1)
    if not face_keep.any():
        raise ValueError("Mask culling removed every face: check that masks, cameras and mesh share one frame")
    return _remove_unreferenced(trimesh.Trimesh(mesh.vertices, mesh.faces[face_keep], process=False))


def transform_mesh(mesh: trimesh.Trimesh, matrix: np.ndarray) -> trimesh.Trimesh:
    """Apply a 4x4 affine map (e.g. IDR ``scale_mat``: normalised -> world); winding is fixed for reflections."""
    matrix = np.asarray(matrix, np.float64).reshape(4, 4)
    out = mesh.copy()
    out.apply_transform(matrix)
    return out
