"""``cocoinr-generate-scene``: write the built-in procedural scene in the IDR/VolSDF layout.

Example: ``cocoinr-generate-scene --output-dir data/generated/scan65 --num-views 49``, then train
with ``--data data/generated/scan65 idr-data --num-views 3`` (a folder named like a DTU scan
picks that scan's paper split; any other name uses evenly spaced views).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from cocoinr_nerfstudio.data.scene_generator import generate_scene


@dataclass
class GenerateScene:
    """Render a procedural object (box + sphere + torus) with masks, cameras.npz and a ground-truth mesh."""

    output_dir: Path
    """Scene folder to create (image/, mask/, cameras.npz, gt_mesh.ply, scene.json)."""
    num_views: int = 49
    """Number of views (DTU scenes have 49 or 64)."""
    width: int = 400
    """Image width in pixels."""
    height: int = 300
    """Image height in pixels."""
    seed: int = 0
    """Seed of the texture, environment and camera jitter (same seed, same files)."""
    world_scale: float = 200.0
    """World units per normalised unit (DTU-like millimetres)."""
    world_centre: tuple[float, float, float] = (40.0, -60.0, 620.0)
    """Object centre in world units."""
    world_rotation_deg: float = 0.0
    """Rotation of the normalised frame about world z inside scale_mat (DTU: 0)."""
    camera_radius: float = 2.4
    """Camera distance from the object centre, normalised units (inside VolSDF's radius 3)."""
    mesh_resolution: int = 128
    """Marching-cubes grid size of the ground-truth mesh."""
    overwrite: bool = False
    """Replace an existing scene in output_dir."""

    def main(self) -> None:
        start = time.perf_counter()
        info = generate_scene(**vars(self))
        print(
            f"Wrote {info.num_views} views at {info.width}x{info.height} to {info.path} "
            f"in {time.perf_counter() - start:.1f} s (gt_mesh.ply in world units)."
        )


def entrypoint() -> None:
    """Entry point of the console script."""
    tyro.cli(GenerateScene).main()


if __name__ == "__main__":
    entrypoint()
