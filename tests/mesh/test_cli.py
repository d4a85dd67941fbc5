"""CLI glue of cocoinr-extract-mesh (fake pipeline with an analytic SDF) and cocoinr-eval-mesh (files on disk)."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from nerfstudio.cameras.cameras import Cameras
from scipy.io import savemat

from cocoinr_nerfstudio.scripts import eval_mesh, extract_mesh

SCALE_MAT = np.array([[100.0, 0, 0, 5.0], [0, 100.0, 0, -3.0], [0, 0, 100.0, 400.0], [0, 0, 0, 1]])


class AnalyticField(torch.nn.Module):
    """Stands in for the CoCo-INR field: column 0 of forward_geonetwork is the SDF, the rest are features."""

    def __init__(self, sdf):
        super().__init__()
        self.sdf = sdf
        self.calls = 0
        self.max_abs = 0.0

    def forward_geonetwork(self, points):
        self.calls += 1
        self.max_abs = max(self.max_abs, points.abs().max().item())
        return torch.cat([self.sdf(points)[:, None], torch.zeros(len(points), 3)], dim=-1)


def ball(radius=0.5, centre=(0.0, 0.0, 0.0)):
    return lambda p: (p - torch.tensor(centre)).norm(dim=-1) - radius


def fake_pipeline(sdf=None, scale_mat=SCALE_MAT, masks=True):
    model = torch.nn.Module()
    model.field = AnalyticField(sdf or ball())
    model.weight = torch.nn.Parameter(torch.zeros(1))
    model.scene_radius = 3.0
    c2w = torch.eye(4)[None, :3].clone()
    c2w[0, 2, 3] = 3.0  # above the ball, looking down -z (OpenGL)
    cameras = Cameras(camera_to_worlds=c2w, fx=100.0, fy=100.0, cx=50.0, cy=50.0, width=100, height=100)
    metadata = {} if scale_mat is None else {"scale_mat": torch.tensor(scale_mat)}
    outputs = SimpleNamespace(
        cameras=cameras, metadata=metadata, dataparser_transform=torch.eye(4)[:3], dataparser_scale=1.0
    )
    mask = torch.zeros(50, 50, 1)  # half the camera resolution: intrinsics must be rescaled
    mask[:, :25] = 1.0  # left half <=> x < 0
    dataset = [{"image": torch.zeros(50, 50, 3), **({"fg_mask": mask} if masks else {})}]
    return SimpleNamespace(
        model=model, datamanager=SimpleNamespace(train_dataparser_outputs=outputs, train_dataset=dataset)
    )


@pytest.fixture
def extract(tmp_path, monkeypatch):
    """Run cocoinr-extract-mesh on a fake pipeline; returns (exit code, pipeline, output path)."""
    config = tmp_path / "run" / "config.yml"
    config.parent.mkdir()
    config.write_text("fake: true\n")

    def run(*args, pipeline=None, output="out/sub/mesh.ply"):
        pipeline = pipeline or fake_pipeline()

        def fake_eval_setup(path, test_mode="test", **kwargs):
            assert path == config and test_mode == "inference"
            return None, pipeline, None, 0

        monkeypatch.setattr(extract_mesh, "eval_setup", fake_eval_setup)
        out = tmp_path / output
        argv = [
            "cocoinr-extract-mesh",
            "--load-config",
            str(config),
            "--output-path",
            str(out),
            "--resolution",
            "24",
            "--block-resolution",
            "8",
            *args,
        ]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            extract_mesh.entrypoint()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        return code, pipeline, out

    return run


def test_extract_writes_world_units_by_default(extract, capsys):
    code, _, out = extract()
    assert code == 0 and out.is_file()  # parent folders created
    mesh = trimesh.load(out, process=False)
    radii = np.linalg.norm(mesh.vertices - SCALE_MAT[:3, 3], axis=1)
    np.testing.assert_allclose(radii, 50.0, atol=0.3)  # 0.5 * 100, within 4% of a (8.7 mm) voxel
    assert mesh.is_watertight
    assert "world units" in capsys.readouterr().out


def test_extract_normalized_frame(extract):
    code, _, out = extract("--normalized-frame")
    assert code == 0
    np.testing.assert_allclose(np.linalg.norm(trimesh.load(out).vertices, axis=1), 0.5, atol=3e-3)


def test_extract_without_scale_mat_stays_normalised_and_says_so(extract, capsys):
    code, _, out = extract(pipeline=fake_pipeline(scale_mat=None))
    assert code == 0
    np.testing.assert_allclose(np.linalg.norm(trimesh.load(out).vertices, axis=1), 0.5, atol=3e-3)
    assert "No scale_mat" in capsys.readouterr().out


def test_extract_never_overwrites_silently(extract, capsys):
    assert extract()[0] == 0
    out = extract()[2]
    before = out.read_bytes()
    code, pipeline, _ = extract(pipeline=fake_pipeline(sdf=ball(0.3)))
    assert code == 1 and "--overwrite" in capsys.readouterr().out
    assert pipeline.model.field.calls == 0 and out.read_bytes() == before
    assert extract("--overwrite", pipeline=fake_pipeline(sdf=ball(0.3)))[0] == 0
    assert out.read_bytes() != before


def test_extract_refuses_an_unknown_mesh_format_before_extracting(extract, capsys):
    code, pipeline, out = extract(output="mesh.foo")
    assert code == 1 and "expected one of .ply" in capsys.readouterr().out
    assert pipeline.model.field.calls == 0 and not out.exists()


def test_extract_culls_by_masks(extract):
    code, _, out = extract("--cull-by-masks", "--normalized-frame")
    assert code == 0
    vertices = trimesh.load(out, process=False).vertices
    assert vertices[:, 0].max() < 0 and vertices[:, 0].min() == pytest.approx(-0.5, abs=0.01)
    full = trimesh.load(extract("--normalized-frame", output="full.ply")[2], process=False)
    assert 0.4 < len(trimesh.load(out).faces) / len(full.faces) < 0.6


def test_extract_cull_without_masks_fails_before_extracting(extract, capsys):
    code, pipeline, out = extract("--cull-by-masks", pipeline=fake_pipeline(masks=False))
    assert code == 1 and not out.exists() and pipeline.model.field.calls == 0
    assert "no foreground masks" in capsys.readouterr().out


def test_extract_no_surface_is_a_clear_error(extract, capsys):
    code, _, out = extract(pipeline=fake_pipeline(sdf=lambda p: p.norm(dim=-1) + 1.0))
    assert code == 1 and not out.exists()
    assert "No crossing" in capsys.readouterr().out


def test_extract_box_options(extract, capsys):
    code, pipeline, _ = extract()
    assert code == 0 and pipeline.model.field.max_abs == pytest.approx(1.0)
    code, pipeline, _ = extract("--use-scene-radius", "--overwrite")
    assert code == 0 and pipeline.model.field.max_abs == pytest.approx(3.0)
    code, pipeline, _ = extract(
        "--bounding-box-min", "-0.6", "-0.6", "-0.6", "--bounding-box-max", "0.6", "0.6", "0.6", "--overwrite"
    )
    assert code == 0 and pipeline.model.field.max_abs == pytest.approx(0.6)
    assert extract("--bounding-box-min", "-1", "-1", "-1", "--overwrite")[0] == 1
    assert "both --bounding-box-min and --bounding-box-max" in capsys.readouterr().out


def test_extract_largest_component(extract):
    def two(p):
        return torch.minimum(ball(0.4, (-0.45, 0, 0))(p), ball(0.2, (0.6, 0, 0))(p))

    code, _, out = extract("--largest-component", "--normalized-frame", pipeline=fake_pipeline(sdf=two))
    assert code == 0
    vertices = trimesh.load(out, process=False).vertices
    np.testing.assert_allclose(np.linalg.norm(vertices - [-0.45, 0, 0], axis=1), 0.4, atol=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_extract_cuda_request_without_cuda(extract, capsys):
    assert extract("--device", "cuda")[0] == 1
    assert "CUDA is not available" in capsys.readouterr().out


def test_input_mesh_is_post_processed_like_an_extracted_one(extract, tmp_path, capsys):
    """``--input-mesh`` (e.g. ns-export poisson's output, in the model's frame): world units and culling, no SDF
    evaluated, the input file untouched."""
    given = tmp_path / "poisson_mesh.ply"
    trimesh.creation.icosphere(subdivisions=4, radius=0.5).export(given)
    before = given.read_bytes()
    code, pipeline, out = extract("--input-mesh", str(given))
    assert code == 0 and pipeline.model.field.calls == 0 and given.read_bytes() == before
    vertices = trimesh.load(out, process=False).vertices
    np.testing.assert_allclose(np.linalg.norm(vertices - SCALE_MAT[:3, 3], axis=1), 50.0, rtol=1e-6)
    assert "Read " in capsys.readouterr().out

    code, pipeline, culled = extract(
        "--input-mesh", str(given), "--cull-by-masks", "--normalized-frame", output="c.ply"
    )
    assert code == 0 and pipeline.model.field.calls == 0
    kept = trimesh.load(culled, process=False)
    faces = len(trimesh.load(given, process=False).faces)
    assert kept.vertices[:, 0].max() < 0.05 and 0.4 < len(kept.faces) / faces < 0.6  # the left half (x < 0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("points", "no faces (a point cloud?)"),
        ("same", "is also --output-path"),
        ("box", "--use-scene-radius only apply to an extraction"),
    ],
)
def test_input_mesh_errors_name_the_file_and_stop_before_loading_the_model(extract, tmp_path, capsys, case, message):
    given = tmp_path / "in.ply"
    if case == "points":
        trimesh.PointCloud(np.random.default_rng(0).normal(size=(50, 3))).export(given)
    elif case != "missing":
        trimesh.creation.icosphere(radius=0.5).export(given)
    before = given.read_bytes() if given.exists() else None
    extra = {"box": ["--use-scene-radius"], "same": ["--overwrite"]}.get(case, [])
    output = str(given.relative_to(tmp_path)) if case == "same" else "out.ply"
    code, pipeline, out = extract("--input-mesh", str(given), *extra, output=output)
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 1 and message in printed and str(given) in printed
    assert pipeline.model.field.calls == 0
    if case == "same":
        assert given.read_bytes() == before
    else:
        assert not out.exists()


def test_model_to_world_is_the_scale_mat():
    """IDR parsers also store world -> normalised as dataparser_transform/scale: it must not be applied again."""
    transform = np.linalg.inv(SCALE_MAT)[:3] * 100.0
    outputs = SimpleNamespace(
        metadata={"scale_mat": torch.tensor(SCALE_MAT)},
        dataparser_transform=torch.tensor(transform),
        dataparser_scale=0.01,
    )
    np.testing.assert_allclose(extract_mesh.model_to_world(outputs), SCALE_MAT)
    assert extract_mesh.model_to_world(SimpleNamespace(metadata={})) is None


# ------------------------------------------------------------------------------------------ cocoinr-eval-mesh


def run_eval(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["cocoinr-eval-mesh", *map(str, args)])
    try:
        eval_mesh.entrypoint()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_against_gt_mesh(tmp_path, monkeypatch, capsys):
    sphere = trimesh.creation.icosphere(subdivisions=3)
    sphere.export(tmp_path / "a.ply")
    sphere.export(tmp_path / "b.ply")
    code, out, _ = run_eval(
        monkeypatch,
        capsys,
        "--mesh",
        tmp_path / "a.ply",
        "--gt",
        tmp_path / "b.ply",
        "--num-samples",
        2000,
        "--thresholds",
        0.01,
        0.1,
    )
    assert code == 0
    result = json.loads(out)
    assert (result["accuracy"], result["completeness"], result["chamfer"]) == (0.0, 0.0, 0.0)
    assert result["num_points_pred"] == result["num_points_gt"] == 2000
    assert result["fscore"] == {"0.01": 1.0, "0.1": 1.0} and result["units"] == "mesh units"


def test_eval_gt_point_cloud(tmp_path, monkeypatch, capsys):
    square = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    square.export(tmp_path / "square.ply")
    trimesh.PointCloud([[0.5, 0.5, 0.25]]).export(tmp_path / "point.ply")
    code, out, err = run_eval(
        monkeypatch, capsys, "--mesh", tmp_path / "square.ply", "--gt", tmp_path / "point.ply", "--num-samples", 500
    )
    assert code == 0 and "no faces" in err
    assert json.loads(out)["completeness"] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize(
    "case,message",
    [
        ("both", "exactly one of"),
        ("neither", "exactly one of"),
        ("missing", "not found"),
        ("garbage", "cannot read"),
        ("empty", "is empty"),
        ("no_scan", "--scan"),
        ("no_dtu", "not found"),
    ],
)
def test_eval_errors(tmp_path, monkeypatch, capsys, case, message):
    good = tmp_path / "good.ply"
    trimesh.creation.box().export(good)
    (tmp_path / "garbage.ply").write_bytes(b"ply\nformat nonsense\n\x00\x01")
    trimesh.PointCloud([[0, 0, 0], [1, 0, 0]]).export(tmp_path / "empty.ply")
    args = {
        "both": ["--mesh", good, "--gt", good, "--dtu-dir", tmp_path, "--scan", 1],
        "neither": ["--mesh", good],
        "missing": ["--mesh", tmp_path / "nope.ply", "--gt", good],
        "garbage": ["--mesh", tmp_path / "garbage.ply", "--gt", good],
        "empty": ["--mesh", tmp_path / "empty.ply", "--gt", good],
        "no_scan": ["--mesh", good, "--dtu-dir", tmp_path],
        "no_dtu": ["--mesh", good, "--dtu-dir", tmp_path, "--scan", 24],
    }[case]
    code, out, err = run_eval(monkeypatch, capsys, *args)
    assert code == 1 and out == "" and message in err


def square(x0, x1, y0, y1, z):
    return trimesh.Trimesh([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], [[0, 1, 2], [0, 2, 3]])


def write_dtu(root, scan):
    """Tiny DTU layout: reference = 0.05 mm grid on z = 0 over [0, 4]^2, plus points below the table (z = -3)."""
    xs = np.arange(0, 4.0001, 0.05)
    grid = np.stack(np.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    below = np.stack(np.meshgrid(np.arange(0, 4.1, 0.5), np.arange(0, 4.1, 0.5), indexing="ij"), -1).reshape(-1, 2)
    stl = np.concatenate([np.c_[grid, np.zeros(len(grid))], np.c_[below, np.full(len(below), -3.0)]])
    (root / "Points" / "stl").mkdir(parents=True)
    (root / "ObsMask").mkdir()
    trimesh.PointCloud(stl).export(root / "Points" / "stl" / f"stl{scan:03d}_total.ply")
    obs = np.ones((23, 23, 25), np.uint8)  # BB [-1, 10] x [-1, 10] x [-2, 10], 0.5 mm voxels
    obs[13:] = 0  # x >= 5.25 unobserved
    savemat(
        root / "ObsMask" / f"ObsMask{scan}_10.mat",
        {"ObsMask": obs, "BB": np.array([[-1.0, -1, -2], [10, 10, 10]]), "Res": np.array([[0.5]])},
    )
    savemat(root / "ObsMask" / f"Plane{scan}.mat", {"P": np.array([[0.0], [0], [1], [1]])})  # above: z > -1
    return len(grid)


def test_eval_dtu_protocol_on_files(tmp_path, monkeypatch, capsys):
    """Reconstruction: a square 1 mm above the reference (the answer: 1 mm both ways) plus three squares the
    protocol must ignore: unobserved (x >= 6), an outlier 9.5 mm up (--max-dist 5), one outside the box."""
    num_grid = write_dtu(tmp_path / "dtu", 24)
    recon = trimesh.util.concatenate(
        [square(0, 4, 0, 4, 1.0), square(6, 9, 0, 4, 3.0), square(0, 4, 0, 4, 9.5), square(0, 4, 0, 4, 40.0)]
    )
    recon.export(tmp_path / "recon.ply")
    code, out, err = run_eval(
        monkeypatch,
        capsys,
        "--mesh",
        tmp_path / "recon.ply",
        "--dtu-dir",
        tmp_path / "dtu",
        "--scan",
        24,
        "--max-dist",
        5,
    )
    assert code == 0, err
    result = json.loads(out)
    assert 1.0 <= result["accuracy"] < 1.001  # nearest grid point: sqrt(1 + (<= 0.035)^2)
    assert 1.0 <= result["completeness"] < 1.02  # nearest 0.2 mm-thinned point: sqrt(1 + (<= 0.2)^2)
    assert result["chamfer"] == pytest.approx((result["accuracy"] + result["completeness"]) / 2)
    assert result["units"] == "mm" and result["scan"] == 24 and result["num_points_gt"] == num_grid
