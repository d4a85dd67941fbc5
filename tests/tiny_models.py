"""The real coco-inr architecture narrowed so CPU tests run in a second (shared by several test folders)."""

from __future__ import annotations

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.scene_box import SceneBox

from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings
from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig
from cocoinr_nerfstudio.models.coco_inr import CocoInrModel, CocoInrModelConfig

SCENE_BOX = SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3]))


def tiny_config(**overrides) -> CocoInrModelConfig:
    """Every code path of the paper's model (random 64x16 codebook), with small widths and sample counts."""
    settings = {
        "codebook_source": "random",
        "random_codebook_shape": (64, 16),
        "codebook_attention": CodebookAttentionSettings(num_latents=8, latent_dim=16, depth=1, ff_mult=2),
        "sdf_field": CocoFieldConfig(geometry_hidden_dims=(32, 32), feature_dim=16),
        "num_samples": 8,
        "num_samples_eval": 16,
        "num_samples_extra": 4,
        "num_samples_outside": 4,
        "max_total_iters": 3,
    }
    settings.update(overrides)
    config = CocoInrModelConfig(**settings)
    config.background_field.hidden_dims = (32,)
    config.background_field.feature_dim = 16
    return config


def build(config: CocoInrModelConfig) -> CocoInrModel:
    """A fresh, seeded model on CPU."""
    torch.manual_seed(0)
    return config.setup(scene_box=SCENE_BOX, num_train_data=4)


def viewer_camera(height: int = 12, width: int = 16) -> Cameras:
    """Looking down -z at the origin from 2.5 units away (nerfstudio's OpenGL camera convention): the tiny model's
    sphere in the middle of the frame, the background around it."""
    c2w = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.5]]])
    return Cameras(
        camera_to_worlds=c2w,
        fx=14.0,
        fy=14.0,
        cx=width / 2,
        cy=height / 2,
        width=width,
        height=height,
        camera_type=CameraType.PERSPECTIVE,
    )
