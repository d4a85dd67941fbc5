"""A procedural scene in the IDR/VolSDF layout: the project's built-in data (tests, benchmarks, demo).

Needs no download. An analytic SDF (rounded box + sphere + tilted torus, smoothly united) is
sphere-traced with numpy in the normalised unit-sphere frame, shaded Lambertian under a
position-dependent texture (so multi-view photometry is well posed) in front of a distant
textured environment (so the background model has something to learn). The world frame is
DTU-like (object ~200 units across, far from the origin), which makes ``scale_mat`` non-trivial.
Cameras follow IDR: OpenCV axes, pixel (i, j) centred at image coordinates (i, j),
``world_mat = K @ [R|t]`` padded to 4x4, ``scale_mat`` = normalised -> world.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OBJECT_RADIUS = 0.9
"""Every surface point lies inside this radius of the normalised frame (inside VolSDF's unit sphere)."""


# ----------------------------------------------------------------------------- geometry
def _rot_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


_TORUS_TILT = np.radians(35.0)
_COS, _SIN = np.float32(np.cos(_TORUS_TILT)), np.float32(np.sin(_TORUS_TILT))


def _smin(a: np.ndarray, b: np.ndarray, k: float = 0.06) -> np.ndarray:
    """Polynomial smooth minimum: a blended union that stays a conservative distance bound."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * (k * 0.25)


def scene_sdf(p: np.ndarray) -> np.ndarray:
    """Signed distance (normalised units) of the generated object at points ``p`` [..., 3].

    Written per coordinate: numpy reductions over a last axis of size 3 are several times slower.
    """
    p = np.asarray(p, dtype=np.float32)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    # rounded box (base), centre (0, 0, -0.38)
    qx, qy, qz = np.abs(x) - 0.42, np.abs(y) - 0.32, np.abs(z + 0.38) - 0.10
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
    box = outside + np.minimum(np.maximum(qx, np.maximum(qy, qz)), 0) - 0.05
    # sphere (head)
    sphere = np.sqrt((x - 0.12) ** 2 + (y + 0.04) ** 2 + (z - 0.12) ** 2) - 0.30
    # torus (ring) around (-0.08, 0.06, -0.08), its axis tilted by 35 degrees about x
    ty, tz = y - 0.06, z + 0.08
    ty, tz = _COS * ty + _SIN * tz, _COS * tz - _SIN * ty
    ring = np.hypot(np.hypot(x + 0.08, ty) - 0.36, tz) - 0.085
    return _smin(_smin(box, sphere), ring)


def _normals(p: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    offsets = np.eye(3, dtype=np.float32) * eps
    grad = np.stack([scene_sdf(p + o) - scene_sdf(p - o) for o in offsets], axis=-1)
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


def _sphere_trace(origin: np.ndarray, dirs: np.ndarray, max_steps: int = 64, eps: float = 2e-4):
    """Hit mask and hit points of unit rays from one ``origin``; only rays meeting the bounding sphere march."""
    b = dirs @ origin
    disc = b * b - (origin @ origin - OBJECT_RADIUS**2)
    active = np.flatnonzero(disc > 0)
    t = np.zeros(len(dirs), dtype=np.float32)
    t[active] = -b[active] - np.sqrt(disc[active])
    t_far = (-b + np.sqrt(np.maximum(disc, 0))).astype(np.float32)
    hit = np.zeros(len(dirs), dtype=bool)
    for _ in range(max_steps):
        if active.size == 0:
            break
        d = scene_sdf(origin + t[active, None] * dirs[active])
        t[active] += d
        done = d < eps
        hit[active[done]] = True
        active = active[~done & (t[active] < t_far[active])]
    if active.size:  # rays grazing the surface creep along it: finish them by fixed steps + bisection
        _march_grazing(origin, dirs, t, t_far, active, hit)
    return hit, origin + t[:, None] * dirs


def _march_grazing(origin, dirs, t, t_far, rays, hit, samples: int = 256, bisections: int = 24) -> None:
    """First sign change of the SDF on each ray of ``rays`` (updates ``t`` and ``hit`` in place)."""
    frac = np.linspace(0.0, 1.0, samples, dtype=np.float32)
    ts = t[rays, None] + frac * (t_far[rays] - t[rays])[:, None]
    inside = scene_sdf(origin + ts[..., None] * dirs[rays, None]) < 0
    found = inside.any(axis=1)
    rays, ts, first = rays[found], ts[found], inside[found].argmax(axis=1)
    lo, hi = ts[np.arange(len(rays)), np.maximum(first - 1, 0)], ts[np.arange(len(rays)), first]
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        out = scene_sdf(origin + mid[:, None] * dirs[rays]) > 0
        lo, hi = np.where(out, mid, lo), np.where(out, hi, mid)
    t[rays] = hi
    hit[rays] = True


# ----------------------------------------------------------------------------- appearance
@dataclass(frozen=True)
class _Look:
    freqs: np.ndarray  # [3 colour channels, 3]
    phases: np.ndarray  # [3]
    light: np.ndarray  # [3] unit vector
    sky: np.ndarray  # [2, 3] horizon and zenith colours


def _make_look(rng: np.random.Generator) -> _Look:
    freqs = rng.normal(size=(3, 3))
    freqs *= (rng.uniform(2.0, 4.0, size=(3, 1)) * 2 * np.pi) / np.linalg.norm(freqs, axis=1, keepdims=True)
    light = np.array([0.4, -0.5, 0.75]) + rng.normal(scale=0.1, size=3)
    sky = np.array([[0.75, 0.62, 0.45], [0.30, 0.45, 0.80]]) + rng.uniform(-0.08, 0.08, size=(2, 3))
    return _Look(
        freqs.astype(np.float32),
        rng.uniform(0, 2 * np.pi, 3).astype(np.float32),
        (light / np.linalg.norm(light)).astype(np.float32),
        sky.astype(np.float32),
    )


def _shade(points: np.ndarray, look: _Look) -> np.ndarray:
    albedo = 0.5 + 0.32 * np.sin(points @ look.freqs.T + look.phases)
    checker = np.sign(np.sin(9 * points[:, 0]) * np.sin(9 * points[:, 1]) * np.sin(9 * points[:, 2]))
    albedo = albedo * (0.85 + 0.12 * checker[:, None])
    lambert = np.maximum(_normals(points) @ look.light, 0.0)
    return albedo * (0.35 + 0.65 * lambert[:, None])


def _environment(dirs: np.ndarray, look: _Look) -> np.ndarray:
    """Colour of the infinitely distant surroundings, a function of ray direction only."""
    up = np.clip(dirs[:, 2], -1, 1)[:, None]
    base = look.sky[0] + (look.sky[1] - look.sky[0]) * np.clip(0.5 + up, 0, 1)
    azim = np.arctan2(dirs[:, 1], dirs[:, 0])[:, None]
    bands = np.sin(5 * azim) * np.cos(7 * up) * np.sqrt(1 - up * up)  # fades out at the poles (no pinch)
    return base * (0.8 + 0.2 * bands)


# ----------------------------------------------------------------------------- cameras
def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world rotation (x right, y down, z forward) with +z of the frame up."""
    z = target - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


def _camera_poses(num_views: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """[N, 4, 4] OpenCV camera-to-world poses in the normalised frame: a spiral over the upper hemisphere."""
    k = np.arange(num_views)
    elev = np.radians(np.linspace(12.0, 60.0, num_views) + rng.uniform(-2, 2, num_views))
    azim = k * np.pi * (3 - np.sqrt(5)) + rng.uniform(-0.05, 0.05, num_views)  # golden angle
    centres = radius * np.stack([np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)], -1)
    poses = np.tile(np.eye(4), (num_views, 1, 1))
    for i, c in enumerate(centres):
        poses[i, :3, :3] = _look_at(c, rng.normal(scale=0.03, size=3))
        poses[i, :3, 3] = c
    return poses


def project_points(world_mats: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (OpenCV, pixel centres at integers) [N, P, 2] and depths [N, P] of world ``points`` [P, 3]."""
    hom = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    proj = np.einsum("nij,pj->npi", np.asarray(world_mats)[:, :3, :4], hom)
    return proj[..., :2] / proj[..., 2:3], proj[..., 2]


# ----------------------------------------------------------------------------- output
@dataclass(frozen=True)
class SceneInfo:
    """What :func:`generate_scene` wrote, with the ground truth tests need."""

    path: Path
    num_views: int
    width: int
    height: int
    seed: int
    intrinsics: np.ndarray  # [3, 3] K shared by all views
    world_mats: np.ndarray  # [N, 4, 4] K @ [R|t] (world units)
    scale_mat: np.ndarray  # [4, 4] normalised -> world
    c2w_opencv: np.ndarray  # [N, 4, 4] camera-to-world, OpenCV axes, world units

    @property
    def mesh_path(self) -> Path:
        return self.path / "gt_mesh.ply"

    def to_world(self, points: np.ndarray) -> np.ndarray:
        return points @ self.scale_mat[:3, :3].T + self.scale_mat[:3, 3]

    def to_normalised(self, points: np.ndarray) -> np.ndarray:
        return (points - self.scale_mat[:3, 3]) @ np.linalg.inv(self.scale_mat[:3, :3]).T

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """See :func:`project_points`."""
        return project_points(self.world_mats, points_world)


def _write_gt_mesh(path: Path, scale_mat: np.ndarray, resolution: int) -> int:
    import trimesh
    from skimage.measure import marching_cubes

    lin = np.linspace(-OBJECT_RADIUS, OBJECT_RADIUS, resolution, dtype=np.float32)
    grid = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), axis=-1)
    step = float(lin[1] - lin[0])
    verts, faces, _, _ = marching_cubes(scene_sdf(grid), level=0.0, spacing=(step,) * 3)
    verts = verts - OBJECT_RADIUS
    world = verts @ scale_mat[:3, :3].T + scale_mat[:3, 3]
    trimesh.Trimesh(world, faces, process=False).export(path)
    return len(faces)


def generate_scene(
    output_dir: Path,
    num_views: int = 49,
    width: int = 400,
    height: int = 300,
    seed: int = 0,
    world_scale: float = 200.0,
    world_centre: Sequence[float] = (40.0, -60.0, 620.0),
    world_rotation_deg: float = 0.0,
    camera_radius: float = 2.4,
    mesh_resolution: int = 128,
    overwrite: bool = False,
) -> SceneInfo:
    """Write ``image/``, ``mask/``, ``cameras.npz``, ``gt_mesh.ply`` (world units) and ``scene.json``.

    Deterministic for a given ``seed`` (texture, environment and camera jitter; the shape is fixed).
    ``world_rotation_deg`` rotates the normalised frame about the world z axis inside ``scale_mat``
    (DTU's has none) to exercise that code path. Cameras sit at ``camera_radius`` (< 3, inside
    VolSDF's bounding sphere) looking at the object.
    """
    output_dir = Path(output_dir)
    if num_views < 1 or width < 8 or height < 8:
        raise ValueError(f"need num_views >= 1 and an image of at least 8x8, got {num_views} views at {width}x{height}")
    if not OBJECT_RADIUS < camera_radius < 3.0:
        raise ValueError(f"camera_radius must lie in ({OBJECT_RADIUS}, 3.0), got {camera_radius}")
    if (output_dir / "image").exists() and not overwrite:
        raise FileExistsError(f"{output_dir / 'image'} exists; pass overwrite=True (--overwrite) to replace the scene")
    for sub in ("image", "mask"):
        (output_dir / sub).mkdir(parents=True, exist_ok=True)
        for old in (output_dir / sub).glob("*.png"):
            old.unlink()

    rng = np.random.default_rng(seed)
    look = _make_look(rng)
    poses = _camera_poses(num_views, camera_radius, rng)
    f = 1.4 * height
    K = np.array(
        [
            [f, 0.0, (width - 1) / 2 + 0.013 * width],
            [0.0, 1.003 * f, (height - 1) / 2 - 0.021 * height],
            [0.0, 0.0, 1.0],
        ]
    )
    scale_mat = np.eye(4)
    scale_mat[:3, :3] = world_scale * _rot_z(world_rotation_deg)
    scale_mat[:3, 3] = world_centre

    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays_cam = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1) @ np.linalg.inv(K).T
    world_mats, c2w_world, cams = [], [], {}
    for i, pose in enumerate(poses):
        dirs = rays_cam @ pose[:3, :3].T
        dirs = (dirs / np.linalg.norm(dirs, axis=1, keepdims=True)).astype(np.float32)
        hit, points = _sphere_trace(pose[:3, 3].astype(np.float32), dirs)
        rgb = _environment(dirs, look)
        rgb[hit] = _shade(points[hit], look)
        Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)).save(
            output_dir / "image" / f"{i:06d}.png", compress_level=1
        )
        Image.fromarray((hit.reshape(height, width) * 255).astype(np.uint8)).save(
            output_dir / "mask" / f"{i:06d}.png", compress_level=1
        )

        c2w = scale_mat @ pose  # camera axes scaled by world_scale: re-normalise the rotation
        c2w[:3, :3] /= world_scale
        w2c = np.linalg.inv(c2w)
        world_mat = np.eye(4)
        world_mat[:3, :4] = K @ w2c[:3, :4]
        world_mats.append(world_mat)
        c2w_world.append(c2w)
        cams[f"world_mat_{i}"] = world_mat
        cams[f"scale_mat_{i}"] = scale_mat
    np.savez(output_dir / "cameras.npz", **cams)
    num_faces = _write_gt_mesh(output_dir / "gt_mesh.ply", scale_mat, mesh_resolution)

    info = SceneInfo(
        output_dir, num_views, width, height, seed, K, np.stack(world_mats), scale_mat, np.stack(c2w_world)
    )
    (output_dir / "scene.json").write_text(
        json.dumps(
            {
                "generator": "cocoinr_nerfstudio.data.scene_generator",
                "num_views": num_views,
                "width": width,
                "height": height,
                "seed": seed,
                "world_scale": world_scale,
                "world_centre": list(map(float, world_centre)),
                "world_rotation_deg": world_rotation_deg,
                "camera_radius": camera_radius,
                "object_radius_normalised": OBJECT_RADIUS,
                "intrinsics_opencv": K.tolist(),
                "gt_mesh": {"file": "gt_mesh.ply", "units": "world", "faces": num_faces, "resolution": mesh_resolution},
                "primitives": ["rounded box", "sphere", "torus (tilted 35 deg)"],
            },
            indent=2,
        )
        + "\n"
    )
    return info
