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
    """``torch.rand``/``rand_like`` draw the same row for every leading index (evenly spread values along the last
    dimension) and ``randint`` draws 0, so two code paths that draw random numbers in different orders or for
    different subsets of rays can be compared exactly."""

    def spread(shape, **kwargs) -> torch.Tensor:
        kwargs.pop("generator", None)
        kwargs.pop("requires_grad", None)
        shape = tuple(shape)
        if not shape:
            return torch.full((), 0.5, **kwargs)
        row = torch.linspace(0.05, 0.95, shape[-1], **kwargs)
        return row.expand(shape).contiguous()

    def rand(*size, **kwargs):
        size = kwargs.pop("size", size)
        return spread(size[0] if len(size) == 1 and not isinstance(size[0], int) else size, **kwargs)

    def randint(*args, **kwargs):
        size = kwargs.pop("size", args[-1])
        kwargs.pop("generator", None)
        return torch.zeros(tuple(size), dtype=torch.long, **kwargs)

    # dynamo maps torch's functions to its rules once per process, by name: built while these patches stand, the
    # map would hold them, and a later torch.compile would find no rule for the real builtins
    rule_map = getattr(getattr(torch._dynamo, "trace_rules", None), "get_torch_obj_rule_map", None)
    if rule_map is not None:
        rule_map()
    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(
        torch, "rand_like", lambda x, **kwargs: spread(x.shape, dtype=kwargs.get("dtype", x.dtype), device=x.device)
    )
    monkeypatch.setattr(torch, "randint", randint)
