"""cocoinr-extract-mesh: marching-cubes mesh of a trained CoCo-INR / VolSDF model, in world units by default.

Unlike ``ns-export marching-cubes`` it runs on CPU or CUDA, takes any resolution, has no block seams, can cull
by the training masks (the usual few-view DTU protocol) and maps the mesh back to the data's world frame. With
``--input-mesh`` it applies the same post-processing to a mesh made elsewhere (``ns-export poisson`` writes the
model's normalised frame).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import trimesh
import tyro
from nerfstudio.utils.rich_utils import CONSOLE

from cocoinr_nerfstudio.mesh.extraction import (
    NoSurfaceError,
    cull_by_masks,
    extract_mesh,
    keep_largest_component,
    transform_mesh,
)
from cocoinr_nerfstudio.scripts.cli_errors import CLIError


def eval_setup(config_path: Path, **kwargs):
    """nerfstudio's ``eval_setup``, imported on use: its module imports every registered method config."""
    from nerfstudio.utils.eval_utils import eval_setup as _eval_setup

    return _eval_setup(config_path, **kwargs)


def model_to_world(outputs) -> np.ndarray | None:
    """4x4 map from the model's (normalised) frame to world units, or None without a ``scale_mat`` (non-IDR data).

    IDR cameras are built in the normalised frame, so ``scale_mat`` alone is the map. The parser's
    ``dataparser_transform``/``dataparser_scale`` describe the same map the other way (world -> normalised, in
    nerfstudio's convention) and only approximately when scale_mat is not a similarity, so they are not used.
    """
    metadata = getattr(outputs, "metadata", None) or {}
    if metadata.get("scale_mat") is None:
        return None
    return np.asarray(torch.as_tensor(metadata["scale_mat"]).cpu(), np.float64).reshape(4, 4)


def _sdf_function(field):
    """The SDF at [n, 3] points as [n]: the SDF column alone where the field can leave the features out (coco-inr's
    ``get_sdf_values``), else from nerfstudio's ``forward_geonetwork``."""
    if hasattr(field, "get_sdf_values"):
        return lambda x: field.get_sdf_values(x)[:, 0]
    return lambda x: field.forward_geonetwork(x)[:, 0]


def training_views(pipeline) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Intrinsics, poses and binary masks of the training views; intrinsics rescaled to each mask's size."""
    datamanager = pipeline.datamanager
    dataset = getattr(datamanager, "train_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise CLIError("--cull-by-masks: the pipeline has no training dataset to read masks from")
    items = [dataset[i] for i in range(len(dataset))]  # each view decoded once
    key = next((k for k in ("fg_mask", "mask") if k in items[0]), None)
    if key is None:
        raise CLIError(
            "--cull-by-masks: the training data has no foreground masks (no 'fg_mask'): "
            "train on data with a mask/ folder, or extract without culling"
        )
    cameras = datamanager.train_dataparser_outputs.cameras
    masks = []
    for item in items:
        mask = torch.as_tensor(item[key]).cpu()
        masks.append(mask.reshape(mask.shape[:2]).numpy() > 0.5)
    if len(masks) != len(cameras):
        raise CLIError(f"--cull-by-masks: {len(masks)} masks but {len(cameras)} training cameras")
    sx = np.array([m.shape[1] for m in masks]) / cameras.width.reshape(-1).cpu().numpy()
    sy = np.array([m.shape[0] for m in masks]) / cameras.height.reshape(-1).cpu().numpy()

    def flat(t):
        return t.reshape(-1).cpu().numpy().astype(np.float64)

    return (
        flat(cameras.fx) * sx,
        flat(cameras.fy) * sy,
        flat(cameras.cx) * sx,
        flat(cameras.cy) * sy,
        cameras.camera_to_worlds.cpu().numpy(),
        masks,
    )


MESH_SUFFIXES = (".ply", ".obj", ".stl", ".off", ".glb")
"""Mesh formats trimesh writes."""


@dataclass
class ExtractMesh:
    """Extract the zero level set of a trained model's SDF as a mesh."""

    load_config: Path
    """config.yml of the training run."""
    output_path: Path = Path("mesh.ply")
    """Mesh file to write (.ply, .obj, .stl); parent folders are created."""
    resolution: int = 512
    """Grid samples per axis (any value >= 2; 2048 is fine memory-wise)."""
    bounding_box_min: tuple[float, float, float] | None = None
    """Box minimum in the normalised frame (default -1, -1, -1: the object lies in the unit sphere)."""
    bounding_box_max: tuple[float, float, float] | None = None
    """Box maximum in the normalised frame (default 1, 1, 1)."""
    use_scene_radius: bool = False
    """Search the cube around the model's whole bounding sphere (model.scene_radius) instead."""
    isosurface_level: float = 0.0
    """SDF level to extract."""
    block_resolution: int = 256
    """Cells per block edge: memory is about (block_resolution + 1)^3 floats."""
    chunk_size: int = 1 << 18
    """Points per SDF evaluation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to evaluate the SDF (auto: where the model was loaded)."""
    cull_by_masks: bool = False
    """Remove faces that project outside a training mask in any view that sees them."""
    mask_dilation: int = 0
    """Grow the masks by this many pixels before culling."""
    largest_component: bool = False
    """Keep only the largest connected component (after culling)."""
    normalized_frame: bool = False
    """Write the mesh in the normalised frame instead of world units (scale_mat)."""
    input_mesh: Path | None = None
    """Post-process this mesh (in the model's frame, e.g. from ``ns-export poisson`` or ``marching-cubes``) instead
    of extracting one: world units, culling and the largest component as for an extracted mesh. The file itself is
    never changed."""
    overwrite: bool = False
    """Replace an existing output file."""

    def main(self) -> None:
        try:
            self.run()
        except CLIError as err:
            CONSOLE.print(f"[bold red]Error:[/bold red] {err}")
            sys.exit(1)

    def _box(self, model) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if (self.bounding_box_min is None) != (self.bounding_box_max is None):
            raise CLIError("give both --bounding-box-min and --bounding-box-max, or neither")
        if self.bounding_box_min is not None and self.bounding_box_max is not None:
            return tuple(self.bounding_box_min), tuple(self.bounding_box_max)
        if self.use_scene_radius:
            radius = getattr(model, "scene_radius", None)
            if radius is None:
                raise CLIError("--use-scene-radius: the model has no scene_radius")
            return (-float(radius),) * 3, (float(radius),) * 3
        return (-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)

    def _device(self, model) -> torch.device:
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        current = params[0].device if params else None
        if self.device == "auto":
            return current if current is not None else torch.device("cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda: CUDA is not available here; use --device cpu")
        device = torch.device(self.device)
        if current is not None and current.type != device.type:
            model.to(device)
        return device

    def _read_input_mesh(self) -> trimesh.Trimesh:
        path = self.input_mesh
        assert path is not None
        if not path.is_file():
            raise CLIError(f"--input-mesh {path}: no such file")
        if path.resolve() == self.output_path.resolve():
            raise CLIError(f"--input-mesh {path} is also --output-path: write the result to another file")
        conflicting = [
            f"--{name.replace('_', '-')}"
            for name in ("bounding_box_min", "bounding_box_max")
            if getattr(self, name) is not None
        ] + (["--use-scene-radius"] if self.use_scene_radius else [])
        if conflicting:
            raise CLIError(f"--input-mesh {path}: {', '.join(conflicting)} only apply to an extraction; leave them out")
        try:
            mesh = trimesh.load(path, force="mesh", process=False)
        except Exception as err:  # trimesh raises many types for unreadable files
            raise CLIError(f"--input-mesh {path}: not a mesh trimesh can read ({type(err).__name__}: {err})") from err
        if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
            raise CLIError(f"--input-mesh {path}: no faces (a point cloud?); expected a triangle mesh")
        CONSOLE.print(f"Read {path}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces (model frame)")
        return mesh

    def _extract(self, model, field) -> trimesh.Trimesh:
        box_min, box_max = self._box(model)
        device = self._device(model)
        CONSOLE.print(
            f"Extracting level {self.isosurface_level} at {self.resolution}^3 in box {box_min} .. {box_max} on {device}"
        )
        return extract_mesh(
            _sdf_function(field),
            self.resolution,
            box_min,
            box_max,
            self.isosurface_level,
            self.block_resolution,
            device,
            self.chunk_size,
        )

    def run(self) -> Path:
        """Load, extract, post-process and write the mesh; returns the written path."""
        out = self.output_path
        if out.suffix.lower() not in MESH_SUFFIXES:
            raise CLIError(f"--output-path {out}: expected one of {', '.join(MESH_SUFFIXES)}")
        if out.exists() and not self.overwrite:
            raise CLIError(f"{out} already exists: pass --overwrite to replace it")
        if not self.load_config.is_file():
            raise CLIError(f"config not found: {self.load_config}")
        given = self._read_input_mesh() if self.input_mesh is not None else None  # fail before loading the model
        _, pipeline, _, _ = eval_setup(self.load_config, test_mode="inference")
        model = pipeline.model
        field = getattr(model, "field", None)
        if given is None and not hasattr(field, "forward_geonetwork"):
            raise CLIError("the model's field has no forward_geonetwork(points): it is not an SDF model")
        outputs = pipeline.datamanager.train_dataparser_outputs
        to_world = None if self.normalized_frame else model_to_world(outputs)
        if to_world is None and not self.normalized_frame:
            CONSOLE.print(
                "[yellow]No scale_mat in the dataparser metadata (non-IDR data): "
                "the mesh stays in the normalised frame."
            )
        views = training_views(pipeline) if self.cull_by_masks else None  # fail before the long part
        try:
            mesh = given if given is not None else self._extract(model, field)
            if views is not None:
                mesh = cull_by_masks(mesh, *views, dilation=self.mask_dilation)
                CONSOLE.print(f"Culled by {len(views[-1])} training masks: {len(mesh.faces)} faces left")
        except (NoSurfaceError, ValueError) as err:
            raise CLIError(str(err)) from err
        if self.largest_component:
            mesh = keep_largest_component(mesh)
        if to_world is not None:
            mesh = transform_mesh(mesh, to_world)
        out.parent.mkdir(parents=True, exist_ok=True)
        mesh.export(out)
        frame = "world units (scale_mat)" if to_world is not None else "the normalised frame"
        CONSOLE.print(
            f":white_check_mark: Wrote {out}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces, in {frame}"
        )
        return out


def entrypoint():
    """Entrypoint for use with pyproject scripts."""
    tyro.extras.set_accent_color("bright_yellow")
    tyro.cli(ExtractMesh).main()


if __name__ == "__main__":
    entrypoint()
