"""Shared fixtures: the built-in generated scene, small enough for every test file to reuse."""

from __future__ import annotations

import pytest

from cocoinr_nerfstudio.data.scene_generator import SceneInfo, generate_scene


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory: pytest.TempPathFactory) -> SceneInfo:
    """8 views at 64x48 in the IDR layout (image/, mask/, cameras.npz, gt_mesh.ply, scene.json).

    Shared by the whole session: treat ``tiny_scene.path`` as read-only (copy it to change files).
    """
    return generate_scene(tmp_path_factory.mktemp("tiny_scene"), num_views=8, width=64, height=48, mesh_resolution=96)
