"""IDR dataparser + IDRDataset on generated scenes: cameras, splits, layouts, downscale, bad inputs."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.ndimage import binary_dilation

from cocoinr_nerfstudio.data.idr_dataparser import (
    IDRDataError,
    IDRDataParser,
    IDRDataParserConfig,
    decompose_projection,
)
from cocoinr_nerfstudio.data.idr_dataset import IDRDataset
from cocoinr_nerfstudio.data.scene_generator import SceneInfo, generate_scene


# ----------------------------------------------------------------------------- helpers
def parse(data: Path, **options):
    parser = IDRDataParserConfig(data=data, **options).setup()
    return parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("test")


def ns_project(outputs, k: int, points_world: np.ndarray) -> np.ndarray:
    """Pixels (nerfstudio convention: pixel centres at +0.5) of world points in camera ``k`` of ``outputs``."""
    scale_mat = outputs.metadata["scale_mat"].numpy()
    xn = (points_world - scale_mat[:3, 3]) @ np.linalg.inv(scale_mat[:3, :3]).T
    c2w = outputs.cameras.camera_to_worlds[k].double().numpy()
    pc = (xn - c2w[:, 3]) @ c2w[:, :3]  # OpenGL camera frame: looking down -z, y up
    cam = outputs.cameras[k]
    x = cam.fx.item() * pc[:, 0] / -pc[:, 2] + cam.cx.item()
    y = cam.fy.item() * -pc[:, 1] / -pc[:, 2] + cam.cy.item()
    return np.stack([x, y], axis=-1)


def snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def relayout(src: Path, dst: Path, image_name: str, mask_name: str | None = None, mask_rgb: bool = False) -> Path:
    """Copy a generated scene into another dataset's file naming (``image_name.format(i)``)."""
    (dst / "image").mkdir(parents=True)
    if mask_name:
        (dst / "mask").mkdir()
    shutil.copy(src / "cameras.npz", dst / "cameras.npz")
    for i, path in enumerate(sorted((src / "image").glob("*.png"))):
        Image.open(path).save(dst / "image" / image_name.format(i))
        if mask_name:
            mask = Image.open(src / "mask" / path.name)
            (mask.convert("RGB") if mask_rgb else mask).save(dst / "mask" / mask_name.format(i))
    return dst


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Generated scenes in DTU, H3DS and BlendedMVS layouts (built once per module, read-only)."""
    root = tmp_path_factory.mktemp("layouts")

    def make(name: str, num_views: int, width: int, height: int) -> Path:
        return generate_scene(root / "raw" / name, num_views, width, height, seed=3, mesh_resolution=16).path

    return {
        "dtu": relayout(make("dtu", 49, 32, 24), root / "DTU" / "scan65", "{:06d}.png", "{:03d}.png", mask_rgb=True),
        "h3ds": relayout(
            make("h3ds", 66, 16, 12), root / "h3ds_data" / "1b2a8613401e42a8", "img_{:04d}.jpg", "mask_{:04d}.png"
        ),
        "bmvs": relayout(make("bmvs", 64, 16, 12), root / "BlendedMVS" / "scan1", "{:06d}.jpg"),
    }


@pytest.fixture(scope="module")
def gt_vertices(tiny_scene: SceneInfo) -> np.ndarray:
    """Ground-truth surface points of the tiny scene, in world units."""
    return trimesh.load(tiny_scene.mesh_path).vertices


@pytest.fixture()
def scene_copy(tiny_scene: SceneInfo, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_scene.path, tmp_path / "scene"))


# ----------------------------------------------------------------------------- cameras
def test_decompose_projection_recovers_k_and_pose():
    rng = np.random.default_rng(0)
    K = np.array([[500.0, 0.7, 320.0], [0, 510.0, 240.0], [0, 0, 1]])
    R, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R *= np.sign(np.linalg.det(R))
    C = np.array([1.0, -2.0, 3.0])
    P = -3.0 * K @ np.concatenate([R, -(R @ C)[:, None]], axis=1)  # any scale, even negative
    K2, c2w = decompose_projection(P)
    np.testing.assert_allclose(K2, K, atol=1e-9)
    np.testing.assert_allclose(c2w[:3, :3], R.T, atol=1e-9)
    np.testing.assert_allclose(c2w[:3, 3], C, atol=1e-9)


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # inside nerfstudio's generate_rays
def test_known_points_reproject_to_generator_pixels(tiny_scene: SceneInfo, gt_vertices: np.ndarray):
    train, _ = parse(tiny_scene.path)
    assert train.cameras.shape == (8,) and (train.cameras.width == 64).all() and (train.cameras.height == 48).all()
    points = gt_vertices[::97]
    uv, depth = tiny_scene.project(points)
    assert (depth > 0).all()
    for k in range(8):
        # IDR puts pixel (i, j) at image coordinates (i, j); nerfstudio at (i + .5, j + .5)
        np.testing.assert_allclose(ns_project(train, k, points), uv[k] + 0.5, atol=1e-3)
        # and nerfstudio's own ray generation sends the ray of that pixel through the point
        coords = torch.from_numpy(uv[k][:, ::-1] + 0.5).float()  # (y, x)
        rays = train.cameras.generate_rays(torch.full((len(points), 1), k), coords=coords)
        scale_mat = train.metadata["scale_mat"].numpy()
        xn = torch.from_numpy((points - scale_mat[:3, 3]) / scale_mat[0, 0]).float()
        offset = xn - rays.origins
        dist = torch.linalg.cross(offset, rays.directions).norm(dim=-1)
        assert dist.max() < 1e-4


def test_gt_surface_projects_inside_masks(tiny_scene: SceneInfo, gt_vertices: np.ndarray):
    train, _ = parse(tiny_scene.path)
    dataset = IDRDataset(train)
    points = gt_vertices
    for k in range(len(dataset)):
        mask = dataset[k]["fg_mask"][..., 0].numpy() > 0
        px = np.floor(ns_project(train, k, points)).astype(int)  # nerfstudio: pixel i covers [i, i + 1)
        assert (px >= 0).all() and (px < [64, 48]).all()
        # a mask pixel is set when its centre ray hits, so silhouette points may sit one pixel out
        assert binary_dilation(mask, np.ones((3, 3)))[px[:, 1], px[:, 0]].all()
        assert mask[px[:, 1], px[:, 0]].mean() > 0.9


def test_frame_metadata_and_transform_are_truthful(tiny_scene: SceneInfo):
    train, test = parse(tiny_scene.path, scene_radius=2.0)
    meta = train.metadata
    assert meta["scale_mat"].dtype == torch.float64
    np.testing.assert_allclose(meta["scale_mat"].numpy(), tiny_scene.scale_mat)
    assert meta["scene_radius"] == 2.0 and meta["dataset"] == "custom" and meta["scan_id"] == tiny_scene.path.name
    assert torch.equal(train.scene_box.aabb, torch.tensor([[-2.0] * 3, [2.0] * 3]))
    assert meta["train_indices"] == meta["eval_indices"] == list(range(8))  # all views train, eval on all
    assert [p.name for p in meta["fg_mask_filenames"]] == [f"{i:06d}.png" for i in range(8)]
    # x_normalised = scale * (transform @ x_world) and the camera centres map back to world units
    centres = tiny_scene.c2w_opencv[:, :3, 3]
    T = train.dataparser_transform.double().numpy()
    xn = train.dataparser_scale * (centres @ T[:, :3].T + T[:, 3])
    np.testing.assert_allclose(xn, train.cameras.camera_to_worlds[:, :, 3].double().numpy(), atol=1e-4)
    back = train.transform_poses_to_original_space(train.cameras.camera_to_worlds)
    np.testing.assert_allclose(back[:, :, 3].numpy(), centres, rtol=1e-5)
    np.testing.assert_allclose(back[:, :, :3].numpy(), tiny_scene.c2w_opencv[:, :3, :3], atol=1e-5)
    assert len(test.image_filenames) == 8


def test_rotated_scale_mat_is_exact_in_the_transform(tmp_path: Path, capsys):
    info = generate_scene(tmp_path / "rot", 4, 32, 24, world_rotation_deg=30.0, mesh_resolution=16)
    train, _ = parse(info.path)
    assert "rotates the frame" in capsys.readouterr().out
    points = info.to_world(np.array([[0.2, -0.1, 0.3], [0.0, 0.5, -0.2]]))
    T = train.dataparser_transform.double().numpy()
    np.testing.assert_allclose(
        train.dataparser_scale * (points @ T[:, :3].T + T[:, 3]), info.to_normalised(points), atol=1e-5
    )
    uv, _ = info.project(points)
    np.testing.assert_allclose(ns_project(train, 1, points), uv[1] + 0.5, atol=1e-3)


def test_skew_is_ignored_with_a_warning(scene_copy: Path, capsys):
    cams = dict(np.load(scene_copy / "cameras.npz"))
    for i in range(8):
        K_skew = np.array([[1.0, 0.02, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # 0.02 * fx of skew
        cams[f"world_mat_{i}"][:3] = K_skew @ cams[f"world_mat_{i}"][:3]
    np.savez(scene_copy / "cameras.npz", **cams)
    train, _ = parse(scene_copy)
    assert "camera skew" in capsys.readouterr().out and train.cameras.shape == (8,)


def test_non_uniform_or_differing_scale_mats_warn(scene_copy: Path, capsys):
    cams = dict(np.load(scene_copy / "cameras.npz"))
    for i in range(8):
        cams[f"scale_mat_{i}"] = cams[f"scale_mat_{i}"] @ np.diag([1.0, 1.1, 0.9, 1.0])
    cams["scale_mat_5"] = cams["scale_mat_5"] * 1.01
    np.savez(scene_copy / "cameras.npz", **cams)
    train, _ = parse(scene_copy)
    out = " ".join(capsys.readouterr().out.split())
    assert "scale_mat_i in" in out and "using scale_mat_0" in out and "not a uniform scale" in out
    assert train.dataparser_scale == pytest.approx(1 / 200.0)
    np.testing.assert_allclose(train.metadata["scale_mat"].numpy(), cams["scale_mat_0"])


# ----------------------------------------------------------------------------- splits through the parser
def test_scan65_three_views(scenes, capsys):
    parser = IDRDataParserConfig(data=scenes["dtu"], num_views=3).setup()
    train, val = parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("val")
    assert [p.name for p in train.image_filenames] == ["000008.png", "000024.png", "000040.png"]
    assert train.metadata["train_indices"] == [8, 24, 40] and train.metadata["dataset"] == "dtu"
    assert len(val.image_filenames) == 46 and val.metadata["eval_indices"] == sorted(set(range(49)) - {8, 24, 40})
    assert {p.name for p in val.image_filenames}.isdisjoint(p.name for p in train.image_filenames)
    assert [p.name for p in val.metadata["fg_mask_filenames"]][:2] == ["000.png", "001.png"]  # DTU mask names
    np.testing.assert_allclose(
        val.cameras.camera_to_worlds[0], parser.get_dataparser_outputs("test").cameras[0].camera_to_worlds
    )
    out = capsys.readouterr().out
    assert "Warning" not in out and "paper split" in out and "[8, 24, 40]" in out
    with pytest.raises(ValueError, match="Unknown split 'eval'"):
        parser.get_dataparser_outputs("eval")


def test_the_scan_id_is_the_folder_name_as_given_even_through_a_link(scenes, tmp_path):
    link = tmp_path / "links" / "scan65"
    link.parent.mkdir()
    link.symlink_to(scenes["dtu"].resolve())
    renamed = tmp_path / "renamed_target"
    renamed.symlink_to(scenes["dtu"].resolve())  # another name for the same folder: not a table scan
    assert IDRDataParserConfig(data=link, num_views=3).setup().get_dataparser_outputs("train").metadata[
        "train_indices"
    ] == [8, 24, 40]
    assert (
        IDRDataParserConfig(data=renamed, num_views=3).setup().get_dataparser_outputs("train").metadata["scan_id"]
        == "renamed_target"
    )


def test_invalid_table_entries_give_one_warning(scenes, capsys):
    train, _ = parse(scenes["dtu"], num_views=4, eval_stride=10)
    assert train.metadata["train_indices"] == [18, 24]
    assert train.metadata["eval_indices"] == sorted(set(range(49)) - {18, 24})[::10]
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("Warning") == 1 and "[58, 65]" in out and "2 valid views" in out


def test_unknown_scan_error_lists_known_scans(scenes, tmp_path: Path):
    data = Path(shutil.copytree(scenes["dtu"], tmp_path / "DTU" / "scan999"))
    with pytest.raises(ValueError, match="'scan999'") as err:
        parse(data, num_views=3)
    assert "scan24" in str(err.value) and "scan122" in str(err.value) and "BlendedMVS" not in str(err.value)
    assert parse(data, num_views="all")[0].metadata["dataset"] == "dtu"
    assert parse(data, num_views=3, scan_id="scan24")[0].metadata["train_indices"] == [8, 24, 40]


def test_parent_folder_names_the_dataset_before_the_tables(tiny_scene: SceneInfo, tmp_path: Path):
    data = Path(shutil.copytree(tiny_scene.path, tmp_path / "DTU" / "scan1"))  # DTU scan1: in no paper table
    with pytest.raises(ValueError, match="'scan1' is not in DTU") as err:
        parse(data, num_views=3)
    assert "scan24" in str(err.value) and "BlendedMVS" not in str(err.value)
    train, _ = parse(data, num_views=8, dataset="bmvs")  # BlendedMVS scan1's split, out-of-range views dropped
    assert train.metadata["dataset"] == "bmvs" and train.metadata["train_indices"] == [0]


def test_even_and_explicit_views_on_new_data(tiny_scene: SceneInfo, capsys):
    train, _ = parse(tiny_scene.path, num_views=3)
    assert train.metadata["train_indices"] == [0, 4, 7] and "even split" in capsys.readouterr().out
    train, test = parse(tiny_scene.path, train_views=(6, 1))
    assert train.metadata["train_indices"] == [1, 6] and test.metadata["eval_indices"] == [0, 2, 3, 4, 5, 7]
    with pytest.raises(ValueError, match=r"--train-views \[8\] out of range"):
        parse(tiny_scene.path, train_views=(1, 8))
    with pytest.raises(ValueError, match=r"--train-views repeats \[2\]"):
        parse(tiny_scene.path, train_views=(2, 2))


def test_cli_accepts_both_view_list_forms():
    tyro = pytest.importorskip("tyro")
    for args in (["--train-views", "8", "24", "40"], ["--train-views", "8,24,40"]):
        assert tyro.cli(IDRDataParserConfig, args=args).train_views == (8, 24, 40)
    assert tyro.cli(IDRDataParserConfig, args=["--num-views", "8"]).num_views == 8
    assert tyro.cli(IDRDataParserConfig, args=["--num-views", "all"]).num_views == "all"


# ----------------------------------------------------------------------------- other layouts
def test_h3ds_layout(scenes, capsys):
    train, test = parse(scenes["h3ds"], num_views=3)
    meta = train.metadata
    assert meta["dataset"] == "h3ds" and meta["train_indices"] == [0, 18, 65] and len(test.image_filenames) == 63
    assert [p.name for p in train.image_filenames] == ["img_0000.jpg", "img_0018.jpg", "img_0065.jpg"]
    assert [p.name for p in meta["fg_mask_filenames"]] == ["mask_0000.png", "mask_0018.png", "mask_0065.png"]
    assert "matched by number" in capsys.readouterr().out
    mask = IDRDataset(train)[1]["fg_mask"]
    expected = np.asarray(Image.open(scenes["h3ds"] / "mask" / "mask_0018.png")) > 127
    assert mask.shape == (12, 16, 1) and np.array_equal(mask[..., 0].numpy(), expected)


def test_dtu_three_channel_masks(scenes):
    train, _ = parse(scenes["dtu"], num_views=3)
    mask = IDRDataset(train)[0]["fg_mask"]
    expected = np.asarray(Image.open(scenes["dtu"] / "mask" / "008.png"))[..., 0] > 127
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0} and np.array_equal(mask[..., 0].numpy(), expected)


def test_blendedmvs_layout_without_masks(scenes, capsys, tmp_path: Path):
    train, _ = parse(scenes["bmvs"], num_views=4)
    assert train.metadata["dataset"] == "bmvs" and train.metadata["train_indices"] == [18, 24, 58]
    assert train.metadata["fg_mask_filenames"] is None and "fg_mask" not in IDRDataset(train)[0]
    assert " ".join(capsys.readouterr().out.split()).count("Warning") == 1
    other = Path(shutil.copytree(scenes["bmvs"], tmp_path / "BlendedMVS" / "scan42"))  # not in the table
    assert parse(other, num_views="all")[0].metadata["dataset"] == "bmvs"


def test_zero_one_masks(scene_copy: Path):
    original = np.asarray(Image.open(scene_copy / "mask" / "000002.png")) > 0
    Image.fromarray(original.astype(np.uint8)).save(scene_copy / "mask" / "000002.png")  # 0/1, not 0/255
    mask = IDRDataset(parse(scene_copy)[0])[2]["fg_mask"][..., 0].numpy()
    assert original.any() and np.array_equal(mask > 0, original)


def test_masks_can_be_skipped(tiny_scene: SceneInfo):
    train, _ = parse(tiny_scene.path, load_masks=False)
    assert train.metadata["fg_mask_filenames"] is None and train.mask_filenames is None


# ----------------------------------------------------------------------------- dataset: downscale, datamanager
def test_downscale_scales_images_masks_and_intrinsics_together(tiny_scene: SceneInfo, gt_vertices: np.ndarray):
    full, _ = parse(tiny_scene.path)
    half, _ = parse(tiny_scene.path, downscale_factor=2)
    assert (half.cameras.width == 32).all() and (half.cameras.height == 24).all()
    for name in ("fx", "fy", "cx", "cy"):
        torch.testing.assert_close(getattr(half.cameras, name), getattr(full.cameras, name) / 2)
    big, small = IDRDataset(full)[3], IDRDataset(half)[3]
    assert small["image"].shape == (24, 32, 3) and small["fg_mask"].shape == (24, 32, 1)
    block_mean = big["image"].reshape(24, 2, 32, 2, 3).mean(dim=(1, 3))
    assert (small["image"] - block_mean).abs().max() <= 1 / 255 + 1e-6
    block_mask = big["fg_mask"].reshape(24, 2, 32, 2).mean(dim=(1, 3))
    assert torch.equal(small["fg_mask"][..., 0], (block_mask >= 0.5).float())  # majority vote, ties -> object
    uv, _ = tiny_scene.project(gt_vertices[::200])
    np.testing.assert_allclose(ns_project(half, 3, gt_vertices[::200]), (uv[3] + 0.5) / 2, atol=1e-3)


def test_odd_downscale_keeps_intrinsics_consistent(tiny_scene: SceneInfo):
    third, _ = parse(tiny_scene.path, downscale_factor=3)
    assert (third.cameras.width == 21).all() and (third.cameras.height == 16).all()
    assert IDRDataset(third)[0]["image"].shape == (16, 21, 3)
    full, _ = parse(tiny_scene.path)
    torch.testing.assert_close(third.cameras.cx, full.cameras.cx * 21 / 64)
    torch.testing.assert_close(third.cameras.cy, full.cameras.cy * 16 / 48)


@pytest.mark.filterwarnings("ignore:This DataLoader will create", "ignore:Using a non-tuple sequence")
def test_datamanager_samples_everywhere_and_carries_fg_mask(tiny_scene: SceneInfo):
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig

    config = VanillaDataManagerConfig(
        _target=VanillaDataManager[IDRDataset],
        dataparser=IDRDataParserConfig(data=tiny_scene.path, num_views=3),
        train_num_rays_per_batch=512,
    )
    manager = config.setup(device="cpu")
    assert isinstance(manager.train_dataset, IDRDataset) and len(manager.train_dataset) == 3
    assert "fg_mask" in manager.exclude_batch_keys_from_device
    _, batch = manager.next_train(0)
    assert batch["fg_mask"].shape == (512, 1) and "mask" not in batch
    assert 0 < batch["fg_mask"].mean() < 1  # rays are drawn inside and outside the object


# ----------------------------------------------------------------------------- bad inputs
def _drop_key(key: str) -> Callable[[Path], None]:
    def apply(scene: Path) -> None:
        cams = dict(np.load(scene / "cameras.npz"))
        cams[key.replace("_3", "_99").replace("_2", "_99")] = cams.pop(key)  # keep the camera count
        np.savez(scene / "cameras.npz", **cams)

    return apply


def _set_world_mat(scene: Path) -> None:
    cams = dict(np.load(scene / "cameras.npz"))
    cams["world_mat_2"][:3, :3] = 0.0
    np.savez(scene / "cameras.npz", **cams)


def _truncate(scene: Path) -> None:
    data = (scene / "image" / "000004.png").read_bytes()
    (scene / "image" / "000004.png").write_bytes(data[: len(data) // 2])


def _resize(path: str, size=(32, 24)) -> Callable[[Path], None]:
    return lambda scene: Image.open(scene / path).resize(size).save(scene / path)


BAD_INPUTS = {
    "corrupt cameras.npz": (
        lambda s: (s / "cameras.npz").write_bytes(b"PK\x03\x04 not a zip"),
        IDRDataError,
        r"Cannot read .*cameras\.npz",
    ),
    "no cameras.npz": (lambda s: (s / "cameras.npz").unlink(), FileNotFoundError, r"cameras\.npz not found"),
    "missing world_mat": (_drop_key("world_mat_3"), IDRDataError, r"cameras\.npz has no 'world_mat_3'"),
    "missing scale_mat": (_drop_key("scale_mat_2"), IDRDataError, r"cameras\.npz has no 'scale_mat_2'"),
    "image count": (
        lambda s: (s / "image" / "000007.png").unlink(),
        IDRDataError,
        r"holds 8 cameras \(world_mat_i\) but image/ has 7 images",
    ),
    "garbage image": (
        lambda s: (s / "image" / "000002.png").write_bytes(b"not a png"),
        IDRDataError,
        r"Cannot read image .*000002\.png",
    ),
    "truncated image": (_truncate, IDRDataError, r"Cannot read image .*000004\.png"),
    "mask size": (_resize("mask/000005.png"), IDRDataError, r"Mask .*000005\.png is 32x24 but the images are 64x48"),
    "mixed resolution": (
        _resize("image/000001.png"),
        IDRDataError,
        r"different sizes: 000000\.png is 64x48, 000001\.png is 32x24",
    ),
    "mask count": (lambda s: (s / "mask" / "000006.png").unlink(), IDRDataError, r"7 masks for 8 images"),
    "singular projection": (_set_world_mat, IDRDataError, r"world_mat_2 @ scale_mat_0 .* singular"),
    "no image folder": (lambda s: shutil.rmtree(s / "image"), FileNotFoundError, r"has no image/ folder"),
    "empty image folder": (
        lambda s: [p.unlink() for p in (s / "image").iterdir()],
        FileNotFoundError,
        r"holds no \.png/\.jpg images",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors_and_write_nothing(scene_copy: Path, case: str):
    breaker, error, message = BAD_INPUTS[case]
    breaker(scene_copy)
    before = snapshot(scene_copy)
    with pytest.raises(error, match=message):
        parse(scene_copy)
    assert snapshot(scene_copy) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_views": (0, 99)}, r"--train-views \[99\] out of range"),
        ({"train_views": (3, 3)}, r"--train-views repeats"),
        ({"downscale_factor": 0}, r"--downscale-factor must be >= 1"),
        ({"downscale_factor": 100}, r"--downscale-factor 100 leaves no pixel"),
        ({"num_views": 9, "split": "even"}, r"--num-views 9 is more than the 8 images"),
    ],
)
def test_bad_options_raise_clear_errors(tiny_scene: SceneInfo, options, message):
    before = snapshot(tiny_scene.path)
    with pytest.raises(ValueError, match=message):
        parse(tiny_scene.path, **options)
    assert snapshot(tiny_scene.path) == before


def test_missing_data_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope")) + " does not exist"):
        parse(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_parsing_writes_nothing_and_parses_once(tiny_scene: SceneInfo, monkeypatch):
    before = snapshot(tiny_scene.path)
    parser = IDRDataParserConfig(data=tiny_scene.path, downscale_factor=2, num_views=3).setup()
    assert isinstance(parser, IDRDataParser)
    parser.get_dataparser_outputs("train")
    monkeypatch.setattr(IDRDataParser, "_parse_scene", lambda self: pytest.fail("parsed twice"))
    parser.get_dataparser_outputs("val")
    IDRDataset(parser.get_dataparser_outputs("test"))[0]
    assert snapshot(tiny_scene.path) == before


def test_entry_point_registers_without_circular_import():
    import nerfstudio.configs.dataparser_configs as registry

    assert isinstance(registry.all_dataparsers["idr-data"], IDRDataParserConfig)
