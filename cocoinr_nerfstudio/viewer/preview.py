"""A low-resolution mesh of the SDF as it is now, taken without racing the training loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import trimesh

from cocoinr_nerfstudio.mesh.extraction import Vec3, extract_mesh

if TYPE_CHECKING:
    from cocoinr_nerfstudio.models.coco_inr import CocoInrModel


def extract_preview_mesh(
    model: CocoInrModel,
    resolution: int,
    bounding_box_min: Vec3,
    bounding_box_max: Vec3,
    lock: threading.Lock | None = None,
    on_locked: Callable[[], None] | None = None,
) -> trimesh.Trimesh:
    """Marching cubes of the model's zero level set on a ``resolution``^3 grid, in the model's frame.

    ``lock`` is the trainer's train lock: nerfstudio's trainer holds it for each whole training step and its
    viewer holds it for each render, so taking it here means no optimizer step or render runs while the
    model is switched to eval mode. ``on_locked`` is called once the lock is held (for progress messages).
    The model's train/eval mode is restored afterwards; no gradient is computed or kept.
    Raises ``NoSurfaceError`` when the SDF has no zero crossing in the box (e.g. early in training).
    """
    field = model.field
    with lock if lock is not None else nullcontext():
        if on_locked is not None:
            on_locked()
        was_training = model.training
        model.eval()  # cached eval prototypes, no stochastic paths
        try:
            with torch.no_grad():
                return extract_mesh(
                    lambda x: field.get_sdf_values(x)[:, 0],
                    resolution=resolution,
                    bounding_box_min=bounding_box_min,
                    bounding_box_max=bounding_box_max,
                    device=model.device,
                    show_progress=False,  # keep the training log readable; progress goes to the panel
                )
        finally:
            model.train(was_training)
