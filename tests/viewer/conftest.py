"""Helpers for the viewer tests: the real coco-inr architecture, narrowed so a CPU frame renders in a second."""

from __future__ import annotations

import socket

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings
from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig
from cocoinr_nerfstudio.models.coco_inr import CocoInrModel, CocoInrModelConfig


def build_tiny_model(**overrides) -> CocoInrModel:
    settings = dict(
        codebook_source="random",
        random_codebook_shape=(64, 16),
        codebook_attention=CodebookAttentionSettings(num_latents=8, latent_dim=16, depth=1, ff_mult=2),
        sdf_field=CocoFieldConfig(geometry_hidden_dims=(32, 32), feature_dim=16),
        num_samples=8,
        num_samples_eval=16,
        num_samples_extra=4,
        num_samples_outside=4,
        max_total_iters=3,
    )
    settings.update(overrides)
    config = CocoInrModelConfig(**settings)
    config.background_field.hidden_dims = (32,)
    config.background_field.feature_dim = 16
    torch.manual_seed(0)
    return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-3.0] * 3, [3.0] * 3])), num_train_data=4)


@pytest.fixture
def make_tiny_model():
    """``make_tiny_model(**config_overrides)`` builds a tiny model (fresh, seeded)."""
    return build_tiny_model


@pytest.fixture
def tiny_model() -> CocoInrModel:
    return build_tiny_model()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_port()
