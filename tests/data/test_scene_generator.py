"""The built-in procedural scene: files, determinism, geometry/mask/camera consistency, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from cocoinr_nerfstudio.data.scene_generator import OBJECT_RADIUS, SceneInfo, generate_scene, scene_sdf


def _files(path: Path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_files_and_cameras_npz(tiny_scene: SceneInfo):
    path = tiny_scene.path
    assert sorted(p.name for p in (path / "image").iterdir()) == [f"{i:06d}.png" for i in range(8)]
    assert sorted(p.name for p in (path / "mask").iterdir()) == [f"{i:06d}.png" for i in range(8)]
    image, mask = Image.open(path / "image" / "000003.png"), np.asarray(Image.open(path / "mask" / "000003.png"))
    assert image.size == (64, 48) and image.mode == "RGB" and set(np.unique(mask)) == {0, 255}
    cams = np.load(path / "cameras.npz")
    assert sorted(cams.files) == sorted([f"world_mat_{i}" for i in range(8)] + [f"scale_mat_{i}" for i in range(8)])
    for i in range(8):
        assert cams[f"world_mat_{i}"].shape == (4, 4)
        np.testing.assert_array_equal(cams[f"world_mat_{i}"][3], [0, 0, 0, 1])
        np.testing.assert_array_equal(cams[f"scale_mat_{i}"], tiny_scene.scale_mat)
        np.testing.assert_allclose(cams[f"world_mat_{i}"], tiny_scene.world_mats[i])
    meta = json.loads((path / "scene.json").read_text())
    assert meta["num_views"] == 8 and meta["width"] == 64 and meta["seed"] == 0 and meta["gt_mesh"]["units"] == "world"


def test_world_frame_is_dtu_like_and_cameras_see_the_object(tiny_scene: SceneInfo):
    s = tiny_scene.scale_mat
    assert s[0, 0] == s[1, 1] == s[2, 2] == 200.0 and np.linalg.norm(s[:3, 3]) > 500  # far from the origin
    centres = tiny_scene.to_normalised(tiny_scene.c2w_opencv[:, :3, 3])
    assert (np.linalg.norm(centres, axis=1) < 3.0).all() and (np.linalg.norm(centres, axis=1) > 1.5).all()
    assert (centres[:, 2] > 0).all()  # upper hemisphere
    uv, depth = tiny_scene.project(s[:3, 3][None])  # object centre: in front of and inside every image
    assert (depth > 0).all() and (uv[..., 0] > 0).all() and (uv[..., 0] < 64).all()
    assert (uv[..., 1] > 0).all() and (uv[..., 1] < 48).all()
    # K [R|t] in cameras.npz agrees with the stored intrinsics and poses
    w2c = np.linalg.inv(tiny_scene.c2w_opencv)
    np.testing.assert_allclose(tiny_scene.world_mats[:, :3, :4], tiny_scene.intrinsics @ w2c[:, :3, :4], atol=1e-9)


def test_gt_mesh_is_the_surface_in_world_units(tiny_scene: SceneInfo):
    mesh = trimesh.load(tiny_scene.mesh_path)
    normalised = tiny_scene.to_normalised(mesh.vertices)
    assert mesh.is_watertight and mesh.volume > 0  # outward normals
    assert np.abs(scene_sdf(normalised)).max() < 2 * OBJECT_RADIUS / 95 * 0.5  # within half a voxel
    assert np.linalg.norm(normalised, axis=1).max() < OBJECT_RADIUS <= 1.0  # inside VolSDF's unit sphere
    extent = mesh.bounds[1] - mesh.bounds[0]
    assert (extent > 100).all() and (extent < 400).all()  # world units: ~200 per normalised unit


def test_masks_are_the_silhouette_of_the_gt_mesh(tiny_scene: SceneInfo):
    vertices = trimesh.load(tiny_scene.mesh_path).vertices
    uv, _ = tiny_scene.project(vertices)
    for k in range(tiny_scene.num_views):
        mask = np.asarray(Image.open(tiny_scene.path / "mask" / f"{k:06d}.png")) > 0
        px = np.round(uv[k]).astype(int)  # IDR: pixel centres at integer coordinates
        assert mask[px[:, 1], px[:, 0]].mean() > 0.9
        # every mask pixel is covered by the projected surface (no stray foreground)
        covered = np.zeros_like(mask)
        covered[px[:, 1], px[:, 0]] = True
        assert covered[mask].mean() > 0.95


def test_background_is_textured_not_black(tiny_scene: SceneInfo):
    image = np.asarray(Image.open(tiny_scene.path / "image" / "000000.png")).astype(float)
    mask = np.asarray(Image.open(tiny_scene.path / "mask" / "000000.png")) > 0
    background = image[~mask]
    assert background.mean() > 60 and background.std(axis=0).min() > 2
    assert 0.05 < mask.mean() < 0.6


def test_deterministic_for_a_seed(tiny_scene: SceneInfo, tmp_path: Path):
    again = generate_scene(tmp_path / "again", num_views=8, width=64, height=48, mesh_resolution=96)
    assert _files(again.path) == _files(tiny_scene.path)
    other = generate_scene(tmp_path / "other", num_views=8, width=64, height=48, seed=1, mesh_resolution=96)
    assert _files(other.path)["image/000000.png"] != _files(tiny_scene.path)["image/000000.png"]
    assert _files(other.path)["gt_mesh.ply"] == _files(tiny_scene.path)["gt_mesh.ply"]  # the shape is fixed


def test_refuses_to_overwrite_and_validates_arguments(tiny_scene: SceneInfo, tmp_path: Path):
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_scene(tiny_scene.path, num_views=2, width=16, height=12)
    with pytest.raises(ValueError, match="camera_radius"):
        generate_scene(tmp_path / "a", camera_radius=3.5)
    with pytest.raises(ValueError, match="num_views"):
        generate_scene(tmp_path / "b", num_views=0)
    target = generate_scene(tmp_path / "c", num_views=3, width=16, height=12, mesh_resolution=16).path
    generate_scene(target, num_views=2, width=16, height=12, mesh_resolution=16, overwrite=True)
    assert len(list((target / "image").iterdir())) == 2 and len(list((target / "mask").iterdir())) == 2


def test_console_script(tmp_path: Path, monkeypatch, capsys):
    from cocoinr_nerfstudio.scripts.generate_scene import entrypoint

    out = tmp_path / "cli"
    argv = [
        "cocoinr-generate-scene",
        "--output-dir",
        str(out),
        "--num-views",
        "2",
        "--width",
        "16",
        "--height",
        "12",
        "--mesh-resolution",
        "16",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    entrypoint()
    assert "Wrote 2 views at 16x12" in capsys.readouterr().out
    assert (out / "cameras.npz").is_file() and (out / "gt_mesh.ply").is_file()
