"""cocoinr-eval-mesh: accuracy / completeness / Chamfer / Hausdorff of a mesh, against a GT mesh or the DTU data.

Prints one JSON object on stdout (messages go to stderr, so the output can be piped). ``hausdorff`` is the
symmetric Hausdorff distance (the larger directed maximum); in DTU mode it includes the points that the
protocol's means drop as outliers (>= --max-dist).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
import tyro
from rich.console import Console

from cocoinr_nerfstudio.mesh.evaluation import MeshEvaluationError, evaluate_dtu, mesh_distances
from cocoinr_nerfstudio.scripts.cli_errors import CLIError

ERR_CONSOLE = Console(stderr=True, width=120)


def load_mesh(path: Path, what: str, allow_points: bool = False):
    """Read a mesh; with ``allow_points`` a face-less file (a point cloud) comes back as an [N, 3] array."""
    if not path.is_file():
        raise CLIError(f"{what} file not found: {path}")
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as err:  # trimesh raises many types for corrupt or unknown files
        raise CLIError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err
    if isinstance(loaded, trimesh.Scene):
        loaded = loaded.to_geometry() if loaded.geometry else trimesh.Trimesh()
    faces = getattr(loaded, "faces", None)
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))))
    if faces is not None and len(faces) > 0:
        return loaded
    if allow_points and len(vertices) > 0:
        ERR_CONSOLE.print(f"{what} {path} has no faces: using its {len(vertices)} points as the reference")
        return vertices.astype(np.float64)
    raise CLIError(f"{what} {path} is empty: it has {len(vertices)} vertices and no faces")


@dataclass
class EvalMesh:
    """Evaluate a reconstructed mesh (accuracy, completeness, Chamfer, Hausdorff): give exactly one of --gt or
    --dtu-dir (with --scan)."""

    mesh: Path
    """Reconstructed mesh (.ply/.obj/...)."""
    gt: Path | None = None
    """Ground-truth mesh or point cloud, in the same frame and units as --mesh."""
    dtu_dir: Path | None = None
    """Official DTU evaluation data: contains Points/stl/ and ObsMask/. The mesh must be in DTU world mm."""
    scan: int | None = None
    """DTU scan number (with --dtu-dir)."""
    num_samples: int = 200_000
    """--gt mode: points sampled on each surface."""
    thresholds: tuple[float, ...] = ()
    """--gt mode: distance thresholds for precision / recall / F-score."""
    downsample_density: float = 0.2
    """DTU mode: point spacing (mm) of the downsampled reconstruction."""
    max_dist: float = 20.0
    """DTU mode: distances at or beyond this (mm) are outliers and ignored."""
    seed: int = 0
    """Seed for surface sampling and the downsampling order."""

    def run(self) -> dict:
        """Compute the metrics as a JSON-ready dict; raises CLIError on bad input."""
        if (self.gt is None) == (self.dtu_dir is None):
            raise CLIError("give exactly one of --gt GT_MESH or --dtu-dir DIR --scan N")
        if self.dtu_dir is not None and self.scan is None:
            raise CLIError("--dtu-dir needs --scan N")
        pred = load_mesh(self.mesh, "mesh")
        try:
            if self.gt is not None:
                gt = load_mesh(self.gt, "ground truth", allow_points=True)
                with ERR_CONSOLE.status("Sampling surfaces and measuring distances..."):
                    metrics = mesh_distances(pred, gt, self.num_samples, self.seed, self.thresholds).to_dict()
                result = {"mode": "gt", "mesh": str(self.mesh), "gt": str(self.gt), **metrics, "units": "mesh units"}
            else:
                assert self.dtu_dir is not None and self.scan is not None
                with ERR_CONSOLE.status(f"DTU evaluation of scan {self.scan}..."):
                    metrics = evaluate_dtu(
                        pred, self.dtu_dir, self.scan, self.downsample_density, self.max_dist, self.seed
                    ).to_dict()
                result = {
                    "mode": "dtu",
                    "mesh": str(self.mesh),
                    "dtu_dir": str(self.dtu_dir),
                    "scan": self.scan,
                    **metrics,
                }
        except MeshEvaluationError as err:
            raise CLIError(str(err)) from err
        return result

    def main(self) -> None:
        try:
            result = self.run()
        except CLIError as err:
            ERR_CONSOLE.print(f"[bold red]Error:[/bold red] {err}")
            sys.exit(1)
        print(json.dumps(result, indent=2))


def entrypoint():
    """Entrypoint for use with pyproject scripts."""
    tyro.extras.set_accent_color("bright_yellow")
    tyro.cli(EvalMesh).main()


if __name__ == "__main__":
    entrypoint()
