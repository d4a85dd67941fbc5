"""coco-inr with the optional hash-grid geometry features (``--pipeline.model.sdf-field.use-hash-grid True``)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import tyro
from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
from test_coco_inr import rays
from tiny_models import build, tiny_config

from cocoinr_nerfstudio.field_components.hash_grid import HashGridConfig
from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig
from cocoinr_nerfstudio.method_configs import HASH_GRID_LEARNING_RATE, LEARNING_RATE, coco_inr

SMALL_GRID = HashGridConfig(num_levels=4, log2_hashmap_size=10, min_res=4, max_res=32)


def hash_config(**overrides):
    field = CocoFieldConfig(geometry_hidden_dims=(32, 32), feature_dim=16, use_hash_grid=True, hash_grid=SMALL_GRID)
    return tiny_config(**{"sdf_field": field, **overrides})


def test_grid_covers_the_bounding_sphere_and_feeds_the_sdf_mlp():
    model = build(hash_config(scene_radius=2.5))
    grid = model.field.hash_grid
    assert grid is not None and grid.bound == 2.5 and grid.implementation == "torch"
    # [positional encoding 39, attended 39, grid 4 levels x 2]
    assert model.field.sdf_mlp.layers[0].direction.shape[1] == 39 + 39 + 8


def test_training_starts_from_the_same_sphere_whatever_the_table_holds():
    model = build(hash_config())
    points = torch.randn(200, 3)
    with torch.no_grad():
        before = model.field.get_sdf_values(points)
        model.field.hash_grid.table.normal_()  # geometric init: the grid's input columns are zero
        after = model.field.get_sdf_values(points)
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_hash_grid_has_its_own_parameter_group_and_learns():
    model = build(hash_config())
    groups = model.get_param_groups()
    table = model.field.hash_grid.table
    assert [id(p) for p in groups["hash_grid"]] == [id(table)]
    assert all(p is not table for p in groups["fields"])
    grouped = [id(p) for group in groups.values() for p in group]
    trained = [id(p) for name, p in model.named_parameters() if name != "device_indicator_param"]  # nerfstudio's
    assert sorted(grouped) == sorted(trained)  # every parameter exactly once
    assert coco_inr.config.optimizers["hash_grid"]["optimizer"].lr == HASH_GRID_LEARNING_RATE == 10 * LEARNING_RATE

    model.train()
    first_layer = model.field.sdf_mlp.layers[0].direction
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    table_grads = []
    for step in range(2):
        optimizer.zero_grad()
        outputs = model(rays(seed=step))
        sum(model.get_loss_dict(outputs, {"image": torch.rand(32, 3)}).values()).backward()
        table_grads.append(table.grad.abs().sum().item())
        if step == 0:  # the grid's columns start at zero: the table gets no gradient, those columns do
            assert first_layer.grad[:, -8:].abs().sum() > 0
        optimizer.step()
    assert table_grads[0] == 0.0 and table_grads[1] > 0.0


def test_checkpoint_roundtrip_with_the_grid():
    model = build(hash_config())
    with torch.no_grad():
        model.field.hash_grid.table.normal_()
        model.field.sdf_mlp.layers[0].direction.normal_()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    buffer.seek(0)
    reloaded = build(hash_config())
    reloaded.load_model(torch.load(buffer, weights_only=True))
    points = torch.randn(50, 3)
    with torch.no_grad():
        torch.testing.assert_close(model.field.get_sdf_values(points), reloaded.field.get_sdf_values(points))


def test_cuda_graph_takes_the_torch_grid_and_refuses_tcnn():
    config = hash_config(cuda_graph=True)
    model = build(config)
    assert model.field.config.hash_grid.implementation == "torch"
    assert config.sdf_field.hash_grid.implementation == "auto"  # the user's config is left as given
    tcnn_field = dataclasses.replace(config.sdf_field, hash_grid=dataclasses.replace(SMALL_GRID, implementation="tcnn"))
    with pytest.raises(ValueError, match=r"hash-grid\.implementation torch"):
        build(hash_config(cuda_graph=True, sdf_field=tcnn_field))


def test_command_line_switches_it_on():
    args = ["coco-inr", "--pipeline.model.sdf-field.use-hash-grid", "True"]
    args += ["--pipeline.model.sdf-field.hash-grid.max-res", "1024"]
    parsed = tyro.cli(AnnotatedBaseConfigUnion, args=args)
    assert parsed.pipeline.model.sdf_field.use_hash_grid
    assert parsed.pipeline.model.sdf_field.hash_grid.max_res == 1024
