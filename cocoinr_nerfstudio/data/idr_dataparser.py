"""Dataparser for the IDR/VolSDF layout (DTU, BlendedMVS, H3DS and new data).

``SCENE/image/*`` (sorted; index = position), optional ``SCENE/mask/*``, ``SCENE/cameras.npz``
with ``world_mat_i`` (K [R|t]) and ``scale_mat_i`` (normalised unit-sphere frame -> world).
The scene is kept in the normalised frame, where VolSDF's bounding sphere lives; ``scale_mat``
travels in the metadata so meshes can go back to world units. Masks are handed to
:class:`~cocoinr_nerfstudio.data.idr_dataset.IDRDataset` as ``fg_mask`` filenames, never as
nerfstudio ``mask_filenames`` (those restrict pixel sampling to the object and change the method).

Imported by ``nerfstudio.configs.dataparser_configs`` through our entry point: never import
anything that imports that module (datamanagers, method configs, trainer).
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image

from cocoinr_nerfstudio.data import splits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FOLDER_HINTS = {"dtu": ("dtu",), "bmvs": ("blendedmvs", "bmvs"), "h3ds": ("h3ds",)}


class IDRDataError(ValueError):
    """A malformed IDR scene; the message names the file or key at fault and what was expected."""


def _info(message: str) -> None:
    CONSOLE.print(message, markup=False, highlight=False)


def _warn(message: str) -> None:
    CONSOLE.print(f"Warning: {message}", style="bold yellow", markup=False, highlight=False)


def _parse_view_list(args: list[str]) -> tuple[int, ...]:
    """``--train-views 8 24 40`` and ``--train-views 8,24,40`` give the same tuple."""
    return tuple(int(tok) for arg in args for tok in arg.replace(",", " ").split())


try:  # tyro >= 0.9: also accept comma-separated lists on the command line
    from typing import Annotated

    from tyro.constructors import PrimitiveConstructorSpec

    ViewList = Annotated[
        tuple[int, ...],
        PrimitiveConstructorSpec(
            nargs="*",
            metavar="INT [INT ...]",
            instance_from_str=_parse_view_list,
            is_instance=lambda x: isinstance(x, tuple),
            str_from_instance=lambda x: [str(i) for i in x],
        ),
    ]
except ImportError:  # older tyro: space-separated only
    ViewList = tuple[int, ...]  # type: ignore[misc]


@dataclass
class IDRDataParserConfig(DataParserConfig):
    """IDR/VolSDF-format scene (DTU, BlendedMVS, H3DS or new data) with CoCo-INR's few-view splits."""

    _target: type = field(default_factory=lambda: IDRDataParser)
    """Target class to instantiate."""
    data: Path = Path("data/DTU/scan65")
    """Scene folder holding image/, cameras.npz and optionally mask/."""
    num_views: int | Literal["all"] = "all"
    """Number of training views (3, 4, 8, 16, 32 in the paper tables; any count with --split even) or 'all'."""
    train_views: ViewList | None = None
    """Explicit training view indices (positions in the sorted image list), e.g. '8 24 40' or '8,24,40';
    overrides --num-views and --split."""
    scan_id: str | None = None
    """Scan id for the paper split table (scan65, scan1, an H3DS hash); default: the data folder's name."""
    dataset: Literal["auto", "dtu", "bmvs", "h3ds", "custom"] = "auto"
    """Which paper table the scan belongs to; auto infers it from the scan id, parent folders and file layout."""
    split: Literal["auto", "paper", "even"] = "auto"
    """paper: the published views; even: evenly spaced views; auto: paper for table scans, else even."""
    eval_stride: int = 1
    """Keep every n-th held-out view for evaluation (held-out = views not used for training)."""
    downscale_factor: int = 1
    """Shrink images, masks and intrinsics by this factor, in memory (nothing is written to the data folder)."""
    scene_radius: float = 3.0
    """Radius of the bounding sphere in the normalised frame (VolSDF: 3); the scene box is [-r, r]^3."""
    load_masks: bool = True
    """Load mask/ (if present) as batch['fg_mask'] for masked metrics and the optional mask loss."""


# ----------------------------------------------------------------------------- camera maths
def decompose_projection(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a 3x4 projection ``P ~ K [R|t]`` into K (K[2,2] = 1) and the OpenCV camera-to-world 4x4.

    RQ decomposition with a positive-diagonal K; P is only defined up to scale, so a negative
    scale is flipped rather than turned into an improper rotation.
    """
    P = np.asarray(P, dtype=np.float64)[:3, :4]
    M = P[:, :3]
    if not np.isfinite(P).all() or np.linalg.cond(M) > 1e12:
        raise np.linalg.LinAlgError("singular projection matrix")
    if np.linalg.det(M) < 0:
        P, M = -P, -M
    flip = np.eye(3)[::-1]
    Q, U = np.linalg.qr((flip @ M).T)
    K, R = flip @ U.T @ flip, flip @ Q.T
    signs = np.diag(np.sign(np.diag(K)))
    K, R = K @ signs, signs @ R
    c2w = np.eye(4)
    c2w[:3, :3] = R.T
    c2w[:3, 3] = -np.linalg.solve(M, P[:, 3])
    return K / K[2, 2], c2w


def dataparser_transform_from_scale_mat(scale_mat: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """nerfstudio's (transform 3x4, scale) with x_normalised = scale * (transform @ [x_world; 1]).

    Exact for scale_mat = [[s R, t], [0, 1]]; otherwise the rotation of the polar decomposition and the
    mean scale are reported (third value False) and ``metadata['scale_mat']`` stays the exact truth.
    """
    A, t = scale_mat[:3, :3], scale_mat[:3, 3]
    U, S, Vt = np.linalg.svd(A)
    R = U @ Vt
    s = float(S.mean())
    transform = np.concatenate([R.T, -(R.T @ t)[:, None]], axis=1)
    exact = bool(np.allclose(S, s, rtol=1e-6) and np.linalg.det(R) > 0)
    return transform, 1.0 / s, exact


# ----------------------------------------------------------------------------- files
def list_images(folder: Path) -> list[Path]:
    """Images of ``folder`` sorted by name: the index of a view is its position here (as in IDR)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _number(path: Path) -> int | None:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else None


def match_masks(images: list[Path], mask_dir: Path) -> tuple[list[Path] | None, str]:
    """Masks paired with ``images`` (None if the folder holds none), and how they were paired.

    Same file stem (BlendedMVS/new data), else the same trailing number (DTU ``000.png`` for
    ``000000.png``, H3DS ``mask_0000.png`` for ``img_0000.jpg``), else sorted position.
    """
    masks = list_images(mask_dir)
    if not masks:
        return None, "no masks"
    by_stem = {m.stem: m for m in masks}
    if all(im.stem in by_stem for im in images):
        return [by_stem[im.stem] for im in images], "same names as the images"
    by_number = {_number(m): m for m in masks}
    numbers = [_number(im) for im in images]
    if len(by_number) == len(masks) and all(n is not None and n in by_number for n in numbers):
        return [by_number[n] for n in numbers], f"matched by number ({masks[0].name} ...)"
    if len(masks) == len(images):
        return masks, "paired by sorted position"
    raise IDRDataError(
        f"{mask_dir} has {len(masks)} masks for {len(images)} images and their names do not match the images'; "
        "fix the masks or pass --load-masks False."
    )


def _image_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from the header, after a cheap integrity check (``verify``)."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as err:  # PIL raises several unrelated types for bad files
        raise IDRDataError(f"Cannot read {what} {path}: {err}") from err
    return size


def load_cameras_npz(path: Path, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """``world_mat_i`` and ``scale_mat_i`` for i < num_images, as [N, 4, 4] float64 arrays."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an IDR scene needs cameras.npz with world_mat_i and scale_mat_i.")
    try:
        npz = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise IDRDataError(f"Cannot read {path}: {err}") from err
    with npz:
        keys = set(npz.files)
        num_cams = sum(1 for k in keys if re.fullmatch(r"world_mat_\d+", k))
        if num_cams != num_images:
            raise IDRDataError(f"{path} holds {num_cams} cameras (world_mat_i) but image/ has {num_images} images.")
        mats: dict[str, list[np.ndarray]] = {"world_mat": [], "scale_mat": []}
        for i in range(num_images):
            for name, out in mats.items():
                key = f"{name}_{i}"
                if key not in keys:
                    raise IDRDataError(
                        f"{path} has no '{key}' (expected world_mat_i and scale_mat_i for i < {num_images})."
                    )
                m = np.asarray(npz[key], dtype=np.float64)
                if m.shape not in ((4, 4), (3, 4)):
                    raise IDRDataError(f"'{key}' in {path} has shape {m.shape}, expected 4x4.")
                out.append(np.concatenate([m, [[0, 0, 0, 1]]]) if m.shape == (3, 4) else m)
    return np.stack(mats["world_mat"]), np.stack(mats["scale_mat"])


# ----------------------------------------------------------------------------- parser
@dataclass
class _ParsedScene:
    """Everything split-independent, parsed once per parser."""

    images: list[Path]
    masks: list[Path] | None
    cameras: Cameras
    scale_mat: np.ndarray
    transform: np.ndarray
    scale: float
    dataset: str
    scan_id: str
    view_split: splits.ViewSplit


@dataclass
class IDRDataParser(DataParser):
    """Parses an IDR/VolSDF scene into nerfstudio cameras in the normalised (unit-sphere) frame."""

    config: IDRDataParserConfig

    def __init__(self, config: IDRDataParserConfig):
        super().__init__(config=config)
        self.downscale_factor = config.downscale_factor  # nerfstudio sets this to 1 for inference
        self._scene: _ParsedScene | None = None

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown split '{split}': expected train, val or test.")
        scene = self._parse()
        indices = scene.view_split.train if split == "train" else scene.view_split.eval
        r = float(self.config.scene_radius)
        return DataparserOutputs(
            image_filenames=[scene.images[i] for i in indices],
            cameras=scene.cameras[torch.tensor(indices)],
            scene_box=SceneBox(aabb=torch.tensor([[-r, -r, -r], [r, r, r]], dtype=torch.float32)),
            dataparser_transform=torch.from_numpy(scene.transform).float(),
            dataparser_scale=scene.scale,
            metadata={
                "scale_mat": torch.from_numpy(scene.scale_mat),
                "fg_mask_filenames": None if scene.masks is None else [scene.masks[i] for i in indices],
                "scene_radius": r,
                "dataset": scene.dataset,
                "scan_id": scene.scan_id,
                "train_indices": list(scene.view_split.train),
                "eval_indices": list(scene.view_split.eval),
            },
        )

    def _parse(self) -> _ParsedScene:
        if self._scene is None:
            self._scene = self._parse_scene()
        return self._scene

    def _parse_scene(self) -> _ParsedScene:
        cfg = self.config
        data = Path(cfg.data)
        if not (data / "image").is_dir():
            what = "does not exist" if not data.exists() else "has no image/ folder"
            raise FileNotFoundError(f"IDR scene {data} {what} (expected image/, cameras.npz and optionally mask/).")
        images = list_images(data / "image")
        if not images:
            raise FileNotFoundError(f"{data / 'image'} holds no .png/.jpg images.")
        if self.downscale_factor < 1:
            raise ValueError(f"--downscale-factor must be >= 1, got {self.downscale_factor}.")
        world_mats, scale_mats = load_cameras_npz(data / "cameras.npz", len(images))

        width, height = _image_size(images[0], "image")
        odd = [(p, size) for p in images[1:] if (size := _image_size(p, "image")) != (width, height)]
        if odd:
            listing = ", ".join(f"{p.name} is {w}x{h}" for p, (w, h) in odd[:5])
            raise IDRDataError(
                f"Images in {data / 'image'} have different sizes: {images[0].name} is {width}x{height}, {listing}"
                f"{' ...' if len(odd) > 5 else ''}; IDR scenes need one resolution."
            )

        masks = None
        if cfg.load_masks and (data / "mask").is_dir():
            masks, how = match_masks(images, data / "mask")
            for m in masks or []:
                size = _image_size(m, "mask")
                if size != (width, height):
                    raise IDRDataError(f"Mask {m} is {size[0]}x{size[1]} but the images are {width}x{height}.")
            if masks:
                _info(f"IDR: {len(masks)} masks in {data / 'mask'}, {how}.")

        scale_mat = scale_mats[0]
        if not np.allclose(scale_mats, scale_mat, rtol=1e-6, atol=1e-9):
            _warn(f"the scale_mat_i in {data / 'cameras.npz'} differ; using scale_mat_0 for every view.")
        transform, scale, exact = dataparser_transform_from_scale_mat(scale_mat)
        if exact and not np.allclose(transform[:, :3], np.eye(3)):
            _info(f"IDR: scale_mat_0 in {data / 'cameras.npz'} rotates the frame; dataparser_transform holds it.")
        if not exact:
            _warn(
                f"scale_mat_0 in {data / 'cameras.npz'} is not a uniform scale + rotation: dataparser_transform/"
                "scale report its rotation and mean scale; metadata['scale_mat'] is exact."
            )
        cameras = self._cameras(world_mats, scale_mat, width, height, data / "cameras.npz")
        dataset, scan_id = self._identify(data, images)
        view_split = self._select(len(images), dataset, scan_id)
        return _ParsedScene(images, masks, cameras, scale_mat, transform, scale, dataset, scan_id, view_split)

    def _cameras(self, world_mats, scale_mat, width: int, height: int, npz: Path) -> Cameras:
        """nerfstudio cameras in the normalised frame, at the downscaled resolution."""
        intrinsics, c2ws = [], []
        worst_skew = 0.0
        for i, world_mat in enumerate(world_mats):
            try:
                K, c2w = decompose_projection(world_mat @ scale_mat)
            except np.linalg.LinAlgError as err:
                raise IDRDataError(f"world_mat_{i} @ scale_mat_0 in {npz} is a singular projection matrix.") from err
            worst_skew = max(worst_skew, abs(K[0, 1]) * height / (2 * K[1, 1]))  # pixels at the image border
            # IDR casts pixel (i, j) through image coordinates (i, j); nerfstudio through (i + .5, j + .5).
            intrinsics.append([K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5])
            c2ws.append(c2w[:3, :4])
        if worst_skew > 0.05:
            _warn(f"camera skew in {npz} ignored (up to {worst_skew:.2f} px at the image border).")
        fx, fy, cx, cy = torch.tensor(intrinsics, dtype=torch.float32).unbind(-1)
        c2w = torch.tensor(np.stack(c2ws), dtype=torch.float32)
        c2w[:, :3, 1:3] *= -1  # OpenCV (y down, z forward) -> nerfstudio/OpenGL (y up, z backward)
        d = self.downscale_factor
        new_w, new_h = width // d, height // d
        if new_w < 1 or new_h < 1:
            raise ValueError(f"--downscale-factor {d} leaves no pixel of the {width}x{height} images.")
        sx, sy = new_w / width, new_h / height  # per axis: exact even when the size is not divisible by d
        return Cameras(
            camera_to_worlds=c2w,
            fx=(fx * sx)[:, None],
            fy=(fy * sy)[:, None],
            cx=(cx * sx)[:, None],
            cy=(cy * sy)[:, None],
            width=new_w,
            height=new_h,
            camera_type=CameraType.PERSPECTIVE,
        )

    def _identify(self, data: Path, images: list[Path]) -> tuple[str, str]:
        """(dataset, scan id): from the options, else parent folders, the tables and the file layout.

        Folders come before the tables: DTU's scan1 (in no paper table) must not get BlendedMVS scan1's split.
        """
        # the path as the user wrote it (made absolute, '..' folded) but not through symlinks:
        # a link named scan65 to a differently named folder is scan65
        named = Path(os.path.abspath(data))
        scan_id = self.config.scan_id or named.name
        if self.config.dataset != "auto":
            return self.config.dataset, scan_id
        for parent in list(named.parents)[:2]:
            for dataset, hints in _FOLDER_HINTS.items():
                if any(h in parent.name.lower() for h in hints):
                    return dataset, scan_id
        in_tables = splits.datasets_with_scan(scan_id)
        if len(in_tables) == 1:
            return in_tables[0], scan_id
        if splits.H3DS_SCENE_ID.match(scan_id) or images[0].name.startswith("img_"):
            return "h3ds", scan_id
        return "custom", scan_id

    def _select(self, num_images: int, dataset: str, scan_id: str) -> splits.ViewSplit:
        cfg = self.config
        known = None if cfg.dataset == "auto" and dataset == "custom" else dataset
        chosen = splits.select_views(
            num_images,
            num_views=cfg.num_views,
            split=cfg.split,
            scan_id=scan_id,
            dataset=known,
            train_views=cfg.train_views,
            eval_stride=cfg.eval_stride,
        )
        label = splits.DATASET_NAMES.get(dataset, dataset)
        if chosen.notes:
            _warn(f"paper split of {label} {scan_id} for {cfg.num_views} views: {'; '.join(chosen.notes)}.")
        _info(
            f"IDR: {label} {scan_id}: {chosen.method} split, train views {chosen.train}, "
            f"{len(chosen.eval)} eval views (of {num_images})."
        )
        return chosen
