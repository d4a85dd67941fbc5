"""Shared fixtures: the built-in generated scene, small enough for every test file to reuse."""

from __future__ import annotations

import pytest
import torch

from cocoinr_nerfstudio.data.scene_generator import SceneInfo, generate_scene


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory: pytest.TempPathFactory) -> SceneInfo:
    """8 views at 64x48 in the IDR layout (image/, mask/, cameras.npz, gt_mesh.ply, scene.json).

    Shared by the whole session: treat ``tiny_scene.path`` as read-only (copy it to change files).
    """
    return generate_scene(tmp_path_factory.mktemp("tiny_scene"), num_views=8, width=64, height=48, mesh_resolution=96)


@pytest.fixture
def constant_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.rand``/``rand_like``/``randint`` draw is a constant (0.5, or 0 for integers), so two code
    paths that draw random numbers in different orders or amounts can be compared exactly."""

    def rand(*size, **kwargs):
        size = kwargs.pop("size", size)
        kwargs.pop("generator", None)
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return torch.full(tuple(shape), 0.5, **kwargs)

    def randint(*args, **kwargs):
        size = kwargs.pop("size", args[-1])
        kwargs.pop("generator", None)
        return torch.zeros(tuple(size), dtype=torch.long, **kwargs)

    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(torch, "rand_like", lambda x, **kwargs: torch.full_like(x, 0.5, **kwargs))
    monkeypatch.setattr(torch, "randint", randint)
