"""``--pipeline.model.compile-fields``: the compiled paths compute what the eager ones do.

CPU tests compile with the ``aot_eager`` backend: dynamo traces the field, AOTAutograd builds its forward and
backward graphs (the part that must cope with ``torch.func.grad`` and a second derivative), and the graphs run
as plain torch ops. The inductor kernels are checked on a GPU (last test).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading

import pytest
import torch
from test_coco_inr import rays
from test_hash_grid_geometry import SMALL_GRID, hash_config
from tiny_models import build, tiny_config, viewer_camera
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from cocoinr_nerfstudio.field_components.compilation import NO_MIX_ORDER_REDUCTION, PAD_MATMULS, inductor_options
from cocoinr_nerfstudio.fields.background_field import CocoBackgroundFieldConfig
from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig

HEADS = ("geometry", "color", "background_density", "background_color")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or recompilation count carried between tests
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    """Graphs dynamo captured since the test began: proves the compiled paths ran."""
    return counters["stats"]["unique_graphs"]


def _prototypes(dtype=torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {head: torch.randn(8, 16, generator=generator, dtype=dtype).requires_grad_(True) for head in HEADS}


def _field_pair(use_hash_grid: bool = False):
    """The same field twice (same weights, random non-zero attention columns), the second compiled."""
    prototypes = _prototypes()
    config = CocoFieldConfig(
        geometry_hidden_dims=(32, 32), feature_dim=16, use_hash_grid=use_hash_grid, hash_grid=SMALL_GRID
    )
    fields = []
    for _ in range(2):
        torch.manual_seed(0)
        field = config.setup(prototype_source=prototypes.__getitem__, prototype_dim=16).double()
        with torch.no_grad():  # geometric init zeroes the attention and grid columns: switch them on
            field.sdf_mlp.layers[0].direction.normal_(generator=torch.Generator().manual_seed(2))
            if field.hash_grid is not None:
                field.hash_grid.table.normal_(generator=torch.Generator().manual_seed(3))
        fields.append(field)
    fields[1].enable_torch_compile("aot_eager")
    return fields, prototypes


def _grads(loss: torch.Tensor, field: torch.nn.Module, prototypes: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    inputs = [*field.parameters(), *prototypes.values()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


@pytest.mark.parametrize("use_hash_grid", [False, True])
def test_sdf_gradient_and_its_second_derivative_match_autograd(use_hash_grid):
    (eager, compiled), prototypes = _field_pair(use_hash_grid)
    points = torch.rand(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    losses, outputs = [], []
    for field in (eager, compiled):
        sdf, feature, gradient = field.sdf_and_gradient(points, create_graph=True)
        outputs.append((sdf, feature, gradient))
        # the eikonal term differentiates the gradient: second derivatives reach every weight and prototype
        losses.append(sdf.sum() + feature.square().sum() + ((gradient.norm(dim=-1) - 1.0) ** 2).sum())
    assert compiled_graphs() == 1  # the torch.func.grad path, compiled (the eager field uses autograd.grad)
    for ours, theirs in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    eager_grads, compiled_grads = _grads(losses[0], eager, prototypes), _grads(losses[1], compiled, prototypes)
    assert sum(float(g.abs().sum()) for g in eager_grads) > 0
    for ours, theirs in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_render_paths_without_autograd_state_match():
    (eager, compiled), _ = _field_pair()
    points = torch.rand(30, 3, dtype=torch.float64) * 2 - 1
    directions = torch.nn.functional.normalize(torch.randn(30, 3, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        for field in (eager, compiled):
            field.eval()
        torch.testing.assert_close(compiled.get_sdf_values(points), eager.get_sdf_values(points))
        sdf, feature, gradient = compiled.sdf_and_gradient(points, create_graph=False)  # the gradient: torch.func
        expected = eager.sdf_and_gradient(points, create_graph=False)
        for ours, theirs in zip((sdf, feature, gradient), expected, strict=True):
            torch.testing.assert_close(ours, theirs)
            assert ours.grad_fn is None
        torch.testing.assert_close(
            compiled.get_colors(points, directions, gradient, feature),
            eager.get_colors(points, directions, gradient, feature),
        )
    assert compiled_graphs() == 3  # geometry, geometry with gradient, colours
    # outside no_grad a render still returns detached values
    _, _, gradient = compiled.sdf_and_gradient(points, create_graph=False)
    assert gradient.grad_fn is None and not gradient.requires_grad


def test_background_field_matches_with_gradients():
    prototypes = _prototypes()
    config = CocoBackgroundFieldConfig(hidden_dims=(32,), feature_dim=16)
    fields = []
    for _ in range(2):
        torch.manual_seed(0)
        fields.append(config.setup(prototype_source=prototypes.__getitem__, prototype_dim=16).double())
    fields[1].enable_torch_compile("aot_eager")
    points = torch.cat([torch.nn.functional.normalize(torch.randn(25, 3), dim=-1), torch.rand(25, 1)], -1).double()
    directions = torch.nn.functional.normalize(torch.randn(25, 3), dim=-1).double()
    results = []
    for field in fields:
        density, rgb = field(points, directions)
        loss = density.sum() + rgb.square().sum()
        results.append((density, rgb, _grads(loss, field, prototypes)))
    assert compiled_graphs() == 1
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    for ours, theirs in zip(results[1][2], results[0][2], strict=True):
        torch.testing.assert_close(ours, theirs)


def _sdpa_without_grad() -> CocoFieldConfig:
    config = CocoFieldConfig(geometry_hidden_dims=(32, 32), feature_dim=16)
    config.coordinate_attention.fused_without_grad = True
    return config


def _point_kernels() -> CocoFieldConfig:
    config = CocoFieldConfig(geometry_hidden_dims=(32, 32), feature_dim=16)
    config.coordinate_attention.point_kernels = True
    return config


def _point_kernels_background() -> CocoBackgroundFieldConfig:
    config = CocoBackgroundFieldConfig(hidden_dims=(32,), feature_dim=16)
    config.coordinate_attention.point_kernels = True
    return config


def _flash_first_order() -> dict:
    """bf16 heads whose attention takes the fused kernels as sequences (shorter than the tiny model's batches)."""
    sdf_field, background_field = _point_kernels(), _point_kernels_background()
    for attention in (sdf_field.coordinate_attention, background_field.coordinate_attention):
        attention.flash_first_order, attention.flash_sequence_length = True, 16
    return {"bf16_color_heads": True, "sdf_field": sdf_field, "background_field": background_field}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bf16_color_heads": True, "sampler_autocast": "bfloat16"},
        {"sampler_autocast": "float16"},
        {"sdf_field": _sdpa_without_grad()},
        {"sdf_field": _point_kernels(), "background_field": _point_kernels_background()},
        _flash_first_order(),
        {"geometry_autocast": "bfloat16"},
        {"geometry_autocast": "float16", "sdf_field": _point_kernels()},
    ],
    ids=[
        "fp32",
        "bf16-options",
        "fp16-sampler",
        "sdpa-without-grad",
        "point-kernels",
        "flash-first-order",
        "bf16-geometry",
        "fp16-geometry-point-kernels",
    ],
)
def test_model_training_step_matches_the_eager_model(overrides):
    """The whole model: sampler queries, render pass, eikonal points, background, prototypes; losses and every
    gradient. With the half-precision options, autocast regions inside and around the compiled functions are kept."""
    results = []
    for compile_fields in (False, True):
        config = tiny_config(compile_fields=compile_fields, compile_backend="aot_eager", **overrides)
        model = build(config)
        model.train()
        torch.manual_seed(5)  # stratified samples and eikonal points draw the same numbers
        outputs = model(rays())
        assert model._sampler_half is ("sampler_autocast" in overrides)  # checked at the first query, then kept
        loss_dict = model.get_loss_dict(outputs, {"image": torch.rand(32, 3, generator=torch.Generator())})
        sum(loss_dict.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in loss_dict.items()}, grads, outputs["rgb"].detach()))
        assert (compiled_graphs() > 0) == compile_fields
        if compile_fields:  # the prototypes too, compiled without falling back
            assert model.prior._compiled_all is not None and not model.prior._compiled_all.failed
    (eager_losses, eager_grads, eager_rgb), (losses, grads, rgb) = results
    torch.testing.assert_close(rgb, eager_rgb, rtol=1e-5, atol=1e-6)
    assert losses.keys() == eager_losses.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], eager_losses[name], rtol=1e-5, atol=1e-7)
    assert grads.keys() == eager_grads.keys() and len(grads) > 20
    for name in grads:
        if overrides.get("geometry_autocast", "none") != "none":
            # half-precision products in another order round apart: 2e-3 of a gradient's norm in bf16 at worst
            error = (grads[name] - eager_grads[name]).norm() / eager_grads[name].norm().clamp_min(1e-12)
            assert error < 1e-2, (name, float(error))
        else:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_point_kernels_train_the_model_as_the_block_diagonal_path_does():
    """Losses and every gradient of a whole training step, point kernels in every head against the default."""
    results = []
    for overrides in ({}, {"sdf_field": _point_kernels(), "background_field": _point_kernels_background()}):
        model = build(tiny_config(**overrides))
        model.train()
        torch.manual_seed(5)
        outputs = model(rays())
        loss_dict = model.get_loss_dict(outputs, {"image": torch.rand(32, 3, generator=torch.Generator())})
        sum(loss_dict.values()).backward()
        results.append((loss_dict, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (losses, grads), (point_losses, point_grads) = results
    for name in losses:
        torch.testing.assert_close(point_losses[name], losses[name], rtol=1e-5, atol=1e-7)
    assert point_grads.keys() == grads.keys() and len(grads) > 20
    for name in grads:  # float32 sums in another order
        torch.testing.assert_close(
            point_grads[name], grads[name], rtol=1e-4, atol=1e-5 * float(grads[name].abs().max()), msg=name
        )


def test_a_deep_copy_of_a_compiled_model_computes_with_its_own_weights():
    """``copy.deepcopy`` of a model with compiled fields, after a training step (the cached prototypes are part of
    that step's graph): the copy renders what the original does, its compiled paths read the copy's parameters
    (not the original's), and it has a viewer panel of its own."""
    model = build(tiny_config(compile_fields=True, compile_backend="aot_eager"))
    model.train()
    outputs = model(rays())
    sum(model.get_loss_dict(outputs, {"image": torch.rand(32, 3, generator=torch.Generator())}).values()).backward()
    copy.deepcopy(model)  # in training mode, right after the step
    model.eval()
    with torch.no_grad():
        before = model(rays())["rgb"]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(rays())["rgb"], before, rtol=0, atol=0)
        for parameter in twin.field.color_mlp.parameters():
            parameter.zero_()  # the copy's colour MLP now outputs sigmoid(0) = 0.5
        changed = twin(rays())["rgb"]
        torch.testing.assert_close(model(rays())["rgb"], before, rtol=0, atol=0)
    assert not torch.allclose(changed, before)
    assert twin.field._compiled.colors.traced.__self__ is twin.field
    assert twin.viewer_panel is not model.viewer_panel and twin.viewer_panel._model is twin
    assert twin.viewer_panel._viewer is None


def test_renders_match_in_the_viewers_render_thread():
    """Volume and surface renders of a compiled model (evaluation shapes, no autograd), made in another thread
    as the viewer does, equal the eager model's."""
    renders = []
    for compile_fields in (False, True):
        model = build(tiny_config(compile_fields=compile_fields, compile_backend="aot_eager", beta_init=0.01))
        model.eval()
        model.viewer_render_mode = "surface"
        bundle = rays(24)
        results = {}

        def render(model=model, bundle=bundle, results=results) -> None:
            with torch.no_grad():  # the panel's surface mode applies in render threads
                results["surface"] = model(bundle)
            model.viewer_render_mode = "volume"
            with torch.no_grad():
                results["volume"] = model(bundle)

        thread = threading.Thread(target=render)
        thread.start()
        thread.join()
        assert set(results) == {"surface", "volume"}
        renders.append(results)
    assert compiled_graphs() >= 3
    for mode in ("surface", "volume"):
        for name in ("rgb", "depth", "accumulation", "normals"):
            torch.testing.assert_close(renders[1][mode][name], renders[0][mode][name], rtol=1e-5, atol=1e-5)


@torch._dynamo.register_backend(name="cocoinr_test_cannot_compile")
def _cannot_compile(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler found")  # what inductor says on a machine without one


def _cannot_compile_backward(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler found")


# forward graphs compile (run as traced), backward graphs cannot: a failure torch would meet only at backward()
torch._dynamo.register_backend(
    aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=_cannot_compile_backward),
    name="cocoinr_test_cannot_compile_backward",
)


@pytest.mark.parametrize("failing", ["cocoinr_test_cannot_compile", "cocoinr_test_cannot_compile_backward"])
def test_a_backend_that_cannot_compile_falls_back_to_eager_and_says_so(capsys, failing):
    results = []
    for backend in (None, failing):
        model = build(tiny_config(compile_fields=backend is not None, compile_backend=backend or "inductor"))
        model.train()
        torch.manual_seed(5)
        outputs = model(rays())
        loss = sum(model.get_loss_dict(outputs, {"image": torch.rand(32, 3, generator=torch.Generator())}).values())
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
        model(rays(seed=1))  # a second step: the fallback is remembered, nothing is printed again
    # a backend that compiles the forward pass alone still runs the sampler's queries: there the SDF column is
    # summed in another order than eagerly (SDFMLP's outputs=1), so results agree to float rounding, not bit for bit
    tolerance = dict(rtol=1e-4, atol=1e-6) if failing.endswith("backward") else dict(rtol=0, atol=0)
    torch.testing.assert_close(results[1][0], results[0][0], **tolerance)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, **tolerance)
    printed = " ".join(capsys.readouterr().out.split())
    # the sampler's SDF queries run without autograd: only a forward compiler is needed there
    parts = ("the SDF gradient", "the colour head", "the background field", "the prototypes")
    for part in parts if failing.endswith("backward") else ("the SDF", *parts):
        message = f"--pipeline.model.compile-fields: torch.compile could not compile {part} ("
        assert printed.count(message) == 1, (part, printed[-2000:])
    assert "no C++ compiler found" in printed and "it runs eagerly" in printed


def test_an_unknown_backend_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--pipeline\.model\.compile-backend: Invalid backend: 'inductr'"):
        build(tiny_config(compile_fields=True, compile_backend="inductr"))


def test_compile_fields_takes_the_torch_grid_and_refuses_tcnn():
    model = build(hash_config(compile_fields=True, compile_backend="aot_eager"))
    assert model.field.config.hash_grid.implementation == "torch"
    tcnn_grid = dataclasses.replace(SMALL_GRID, implementation="tcnn")
    tcnn_field = dataclasses.replace(hash_config().sdf_field, hash_grid=tcnn_grid)
    with pytest.raises(ValueError, match=r"--pipeline\.model\.compile-fields True needs .*implementation torch"):
        build(hash_config(compile_fields=True, sdf_field=tcnn_field))


@pytest.mark.parametrize("pad_matmuls, mix_order_reduction", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_inductor_options_reach_every_inductor_compile_of_the_model(
    monkeypatch, backend, pad_matmuls, mix_order_reduction
):
    """pad-matmuls and mix-order-reduction turn into inductor's options for each compiled part; other backends get
    no options (they would warn that they ignore them)."""
    calls = []
    real_compile = torch.compile

    def recording_compile(function, **kwargs):
        calls.append(kwargs.get("options"))
        return real_compile(function, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    config = tiny_config(
        compile_fields=True,
        compile_backend=backend,
        pad_matmuls=pad_matmuls,
        mix_order_reduction=mix_order_reduction,
    )
    build(config)
    # the SDF, the SDF gradient, the colour head, the background field, the prototypes
    assert len(calls) == 5
    expected = {**(PAD_MATMULS if pad_matmuls else {}), **({} if mix_order_reduction else NO_MIX_ORDER_REDUCTION)}
    assert calls == [expected if backend == "inductor" and expected else None] * 5
    assert PAD_MATMULS == {"force_shape_pad": True}
    assert NO_MIX_ORDER_REDUCTION == {"triton.mix_order_reduction": False}


def test_mix_order_reduction_off_is_an_option_inductor_accepts():
    """The option names a setting of this torch's inductor (torch.compile refuses unknown ones when it compiles)."""
    options = inductor_options(pad_matmuls=False, mix_order_reduction=False)
    assert options == NO_MIX_ORDER_REDUCTION
    with torch._inductor.config.patch(options):
        assert torch._inductor.config.triton.mix_order_reduction is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU kernels need CUDA")
@pytest.mark.parametrize("pad_matmuls, point_kernels", [(False, False), (True, False), (True, True)])
def test_inductor_kernels_on_gpu_match_eager(pad_matmuls, point_kernels):
    """The compiled field (padded products; the point-attention kernels) against the eager default field."""
    torch.manual_seed(0)
    prototypes = {head: torch.randn(256, 128, device="cuda", requires_grad=True) for head in HEADS}
    fields = []
    for index in range(2):
        torch.manual_seed(0)
        config = CocoFieldConfig()
        config.coordinate_attention.point_kernels = point_kernels and index == 1
        fields.append(config.setup(prototype_source=prototypes.__getitem__).cuda())
    fields[1].enable_torch_compile(pad_matmuls=pad_matmuls)  # padded: the 39-, 257- and 289-wide products
    points = torch.rand(4096, 3, device="cuda") * 2 - 1
    directions = torch.nn.functional.normalize(torch.randn(4096, 3, device="cuda"), dim=-1)
    results = []
    for field in fields:
        sdf, feature, gradient = field.sdf_and_gradient(points, create_graph=True)
        rgb = field.get_colors(points, directions, gradient, feature)
        loss = sdf.abs().mean() + rgb.mean() + ((gradient.norm(dim=-1) - 1.0) ** 2).mean()
        results.append((sdf, gradient, rgb, _grads(loss, field, prototypes)))
    # float32 with differently fused reductions: relative agreement well inside training noise
    for ours, theirs in zip(results[1][:3], results[0][:3], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(results[1][3], results[0][3], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-5 * max(1.0, float(theirs.abs().max())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor pads matrix products on GPUs only")
def test_pad_matmuls_pads_an_unaligned_product_in_the_generated_code():
    """The option must change the kernels, not just the options handed over: with it, inductor's code holds the
    colour head's 289-wide operand padded to 296 (bf16 alignment 8); without it, nothing 296 wide."""
    import re

    from torch._inductor.utils import run_and_get_code

    from cocoinr_nerfstudio.field_components.compilation import CompiledOrEager

    layer = torch.nn.Linear(289, 289).cuda()
    x = torch.randn(4096, 289, device="cuda")

    def colour_like(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(torch.relu(t)).float()

    for pad_matmuls in (False, True):
        torch._dynamo.reset()
        compiled = CompiledOrEager(colour_like, "inductor", "a 289-wide product", pad_matmuls=pad_matmuls)
        with torch.no_grad():
            out, code = run_and_get_code(compiled, x)
        assert not compiled.failed
        assert bool(re.search(r"\b296\b", "\n".join(code))) == pad_matmuls
        torch.testing.assert_close(out, colour_like(x), rtol=2e-2, atol=2e-2)


def test_the_first_whole_image_render_of_each_mode_says_it_compiles(capsys):
    """The viewer's first frame of a compiled model waits for compilation: the console says so before and how long it
    took after, once per render mode; an eager model says nothing."""
    camera = viewer_camera(6, 6)
    for compile_fields in (True, False):
        model = build(tiny_config(compile_fields=compile_fields, compile_backend="aot_eager"))
        model.eval()
        capsys.readouterr()
        for surface in (False, False, True, True):
            with model.surface_rendering() if surface else contextlib.nullcontext():
                assert model.get_outputs_for_camera(camera)["rgb"].shape == (6, 6, 3)
        printed = capsys.readouterr().out
        lines = [line for line in printed.splitlines() if line.startswith("First ")]
        if not compile_fields:
            assert lines == []
            continue
        assert [line.split(":")[0] if "compiling" in line else line.split(" done")[0] for line in lines] == [
            "First volume render",
            "First volume render",
            "First surface render",
            "First surface render",
        ]
        assert "compile-fields" in printed and all(line.endswith(" s.") for line in lines[1::2])
