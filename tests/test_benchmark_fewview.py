"""scripts/benchmark_fewview.py: the mesh rasteriser's known answers, codebook policy, and the tiny CPU run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from cocoinr_nerfstudio.benchmarks import fewview
from cocoinr_nerfstudio.benchmarks.fewview import BenchmarkError, choose_figure_view, render_mesh

REPO = Path(__file__).resolve().parents[1]


def idr_world_mat(K: np.ndarray, c2w_opencv: np.ndarray) -> np.ndarray:
    """IDR's world_mat = K [R|t] (4x4) of an OpenCV camera-to-world pose."""
    out = np.eye(4)
    out[:3, :4] = K @ np.linalg.inv(c2w_opencv)[:3, :4]
    return out


K = np.array([[100.0, 0, 50.0], [0, 100.0, 40.0], [0, 0, 1]])


def test_render_sphere_silhouette_depth_and_normal():
    """Unit sphere 5 in front of the camera: a disc of radius f / sqrt(D^2 - 1) px, depth D - 1 at its centre."""
    sphere = trimesh.creation.icosphere(subdivisions=5).apply_translation([0.0, 0.0, 5.0])
    render = render_mesh(sphere.vertices, sphere.faces, idr_world_mat(K, np.eye(4)), 100, 80)
    radius_px = 100.0 / math.sqrt(24.0)
    assert render.mask.sum() == pytest.approx(math.pi * radius_px**2, rel=0.03)
    assert render.depth[40, 50] == pytest.approx(4.0, abs=0.01)
    assert np.isinf(render.depth[0, 0]) and (render.shaded[0, 0] == 1).all() and (render.normals[0, 0] == 1).all()
    # the normal at the centre faces the camera: world (0, 0, -1), encoded (n + 1) / 2
    np.testing.assert_allclose(render.normals[40, 50], [0.5, 0.5, 0.0], atol=0.02)
    assert render.shaded[40, 50] == pytest.approx(np.array([0.82, 0.82, 0.85]), abs=0.01)  # head-on: full light
    # the disc is centred on the principal point (cx, cy) = (50, 40)
    rows, cols = np.nonzero(render.mask)
    assert (cols.mean(), rows.mean()) == (pytest.approx(50.0, abs=0.1), pytest.approx(40.0, abs=0.1))


def test_render_keeps_the_nearest_surface_in_any_face_order():
    near = trimesh.creation.box(extents=[1.0, 1.0, 0.01]).apply_translation([0.0, 0.0, 4.0])
    far = trimesh.creation.box(extents=[4.0, 4.0, 0.01]).apply_translation([0.0, 0.0, 6.0])
    both = trimesh.util.concatenate([far, near])
    for mesh in (both, trimesh.Trimesh(both.vertices, both.faces[::-1], process=False)):
        render = render_mesh(mesh.vertices, mesh.faces, idr_world_mat(K, np.eye(4)), 100, 80, max_candidates=5000)
        assert render.depth[40, 50] == pytest.approx(4.0 - 0.005)
        assert render.depth[40, 25] == pytest.approx(6.0 - 0.005)


def test_render_through_a_rotated_camera_and_normal_frame():
    """A camera looking down -z from above sees the top of a sphere; normal_frame rotates the displayed normals."""
    sphere = trimesh.creation.icosphere(subdivisions=4)
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])  # OpenCV axes: x right, y down (= -y world), z forward (= -z world)
    c2w[:3, 3] = [0.0, 0.0, 4.0]
    render = render_mesh(sphere.vertices, sphere.faces, idr_world_mat(K, c2w), 100, 80)
    assert render.depth[40, 50] == pytest.approx(3.0, abs=0.01)
    np.testing.assert_allclose(render.normals[40, 50], [0.5, 0.5, 1.0], atol=0.02)  # world +z
    swap = np.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]])  # x <-> z
    rotated = render_mesh(sphere.vertices, sphere.faces, idr_world_mat(K, c2w), 100, 80, normal_frame=swap)
    np.testing.assert_allclose(rotated.normals[40, 50], [1.0, 0.5, 0.5], atol=0.02)


def test_figure_view_is_held_out_by_every_run():
    assert choose_figure_view(12, [[0, 6, 11], [0, 2, 3, 5, 6, 8, 9, 11]]) == 7
    with pytest.raises(BenchmarkError, match="held-out"):
        choose_figure_view(3, [[0, 1], [2]])


def test_codebook_policy(tmp_path, monkeypatch):
    """Real codebook when given/found; otherwise --random-codebook must be explicit (the prior-free ablation)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(BenchmarkError, match="--random-codebook"):
        fewview.codebook_flags(fewview.parse_settings(["--device", "cpu"]))
    flags, text = fewview.codebook_flags(fewview.parse_settings(["--device", "cpu", "--random-codebook"]))
    assert flags == [
        "--pipeline.model.codebook-source",
        "random",
        "--pipeline.model.random-codebook-shape",
        "16384",
        "256",
    ]
    assert "PRIOR-FREE ABLATION" in text
    found = tmp_path / "cache" / "cocoinr" / "model_16384x256_codebook.ckpt"
    found.parent.mkdir(parents=True)
    found.write_bytes(b"placeholder")  # only located here; ns-train would load and validate it
    flags, text = fewview.codebook_flags(fewview.parse_settings(["--device", "cpu"]))
    assert flags == ["--pipeline.model.codebook-path", str(found)] and "VQGAN" in text
    with pytest.raises(SystemExit):
        fewview.parse_settings(["--device", "cpu", "--random-codebook", "--codebook", str(found)])


def test_train_command_uses_the_real_cli(tmp_path):
    settings = fewview.parse_settings(["--tiny", "--device", "cpu", "--steps", "7", "--output-dir", str(tmp_path)])
    cmd = fewview.train_command(settings, tmp_path / "scene", "volsdf", 8, ["--pipeline.model.codebook-path", "x"])
    assert Path(cmd[0]).name == "ns-train" and cmd[1] == "volsdf"
    assert cmd[cmd.index("--max-num-iterations") + 1] == "7" and cmd[cmd.index("--steps-per-save") + 1] == "7"
    assert "--pipeline.model.codebook-path" not in cmd  # volsdf has no prior
    assert cmd[cmd.index("idr-data") :][:5] == ["idr-data", "--num-views", "8", "--split", "even"]
    assert cmd[-2:] == ["--dataset", "custom"]  # the generated scene, whatever its folder's name
    assert set(fewview.TINY_MODEL_ARGS) <= set(cmd)


def _table_rows(markdown: str) -> dict[tuple[str, int], list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in fewview.METHODS:
            rows[(cells[0], int(cells[1]))] = cells[2:]
    return rows


@pytest.mark.slow
def test_tiny_benchmark_on_cpu(tmp_path):
    """The real script at --tiny scale: 2 methods x 2 view counts trained with ns-train, evaluated, meshed, plotted."""
    out = tmp_path / "bench"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), TORCH_HOME=str(tmp_path / "torch"))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark_fewview.py"),
            "--tiny",
            "--random-codebook",
            "--device",
            "cpu",
            "--jobs",
            "2",
            "--output-dir",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (out / "results.md").read_text()
    assert "**Device**: CPU" in report and "PRIOR-FREE ABLATION" in report
    assert "4 iterations per run" in report and "tiny model" in report
    rows = _table_rows(report)
    assert set(rows) == {(m, v) for m in ("coco-inr", "volsdf") for v in (3, 8)}
    for key, cells in rows.items():
        numbers = [float(c) for c in cells]  # PSNR SSIM mPSNR Chamfer acc comp Hausdorff views time it/s
        assert all(math.isfinite(x) for x in numbers), (key, cells)
        assert 0 < numbers[1] <= 1 and numbers[3] > 0 and numbers[7] >= 1

    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 4
    for run in data["runs"]:
        for key in ("psnr", "ssim", "psnr_masked"):
            assert math.isfinite(run["image_metrics"][key])
        for key in ("chamfer", "accuracy", "completeness", "hausdorff"):
            assert math.isfinite(run["mesh_metrics"][key])
        assert Path(run["mesh_path"]).is_file()
        assert run["command"].startswith(f"ns-train {run['method']} --data ")
    assert data["runs"][0]["train_indices"] == [0, 6, 11]  # even split of 12 views

    figure = Image.open(out / "fewview.png")
    assert figure.size[0] > 300 and figure.size[1] > 5 * 100  # ground-truth row + 4 runs
