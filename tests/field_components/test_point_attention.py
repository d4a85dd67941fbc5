"""Point attention (``point_kernels``): its formulas against autograd's derivatives of plain attention, its
derivatives under ``torch.func.grad`` and ``torch.compile``, and the Triton kernels against the formulas.

The kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton compiles a
kernel, hence a subprocess), and on CUDA where there is a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cocoinr_nerfstudio.field_components import point_attention as pa
from cocoinr_nerfstudio.field_components import triton_point_attention as kernels
from cocoinr_nerfstudio.field_components.attention import CoordinateAttention, attend


def _explicit(q, k, v, heads):
    """Plain multi-head attention of the ``[n, heads * d]`` layout, through torch's own autograd."""
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(0, 1)  # noqa: E731
    return attend(split(q), split(k), split(v), fused=False).transpose(0, 1).flatten(1)


def _inputs(n=9, m=7, heads=2, d=3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads * d, generator=generator, dtype=dtype) for rows in (n, m, m, n, n)]


SHAPES = [(9, 7, 2, 3), (1, 1, 1, 1), (12, 16, 4, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_formulas_are_autograds_derivatives_of_plain_attention(shape):
    n, m, heads, d = shape
    q, k, v, g, f = (x.requires_grad_(True) for x in _inputs(n, m, heads, d))
    out = _explicit(q, k, v, heads)
    torch.testing.assert_close(pa.reference_attend(q, k, v, heads), out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g, create_graph=True)
    torch.testing.assert_close(pa.reference_grad_q(q, k, v, g, heads), dq)
    torch.testing.assert_close(pa.reference_grad_kv(q, k, v, g, heads), (dk, dv))
    torch.testing.assert_close(pa.reference_grad_qkv(q, k, v, g, heads), (dq, dk, dv))
    second = torch.autograd.grad(dq, (q, k, v, g), f)  # the derivative of grad_q, given its cotangent f
    torch.testing.assert_close(pa.reference_grad_q_backward(q, k, v, g, f, heads), second)


def test_equal_scores_average_the_values_and_a_dominant_key_picks_its_value():
    v = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keys = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(
        pa.reference_attend(torch.zeros(3, 4, dtype=torch.float64), keys, v, 1), v.mean(0).expand(3, 4)
    )
    picks = torch.tensor([2, 0, 3])
    q = 40.0 * keys[picks]  # scores 20 against 0 (scale 1/2): weights 1 - 6e-9 on the picked key
    torch.testing.assert_close(pa.reference_attend(q, keys, v, 1), v[picks], atol=1e-7, rtol=0)


def test_point_attention_is_twice_differentiable():
    q, k, v, *_ = _inputs()
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: pa.point_attention(q, k, v, 2), (q,))
    assert torch.autograd.gradgradcheck(lambda q: pa.point_attention(q, k, v, 2), (q,))
    inputs = [x.requires_grad_(True) for x in _inputs()[:3]]
    assert torch.autograd.gradcheck(lambda q, k, v: pa.point_attention(q, k, v, 2), inputs)
    q, k, v, g, _ = (x.requires_grad_(True) for x in _inputs())
    assert torch.autograd.gradcheck(lambda *x: pa.PointAttentionGradQ.apply(*x, 2), (q, k, v, g))


def test_a_third_derivative_through_the_keys_gradient_raises_a_clear_error():
    q, k, v, g, _ = (x.requires_grad_(True) for x in _inputs())
    dk, _ = torch.autograd.grad(pa.point_attention(q, k, v, 2), (k, v), g, create_graph=True)
    with pytest.raises(RuntimeError, match=r"not implemented .* third derivative"):
        dk.sum().backward()


def test_a_backward_pass_nothing_differentiates_takes_one_combined_op(monkeypatch):
    calls = []
    for name in ("grad_q", "grad_kv", "grad_qkv"):
        op = getattr(pa, name)
        monkeypatch.setattr(pa, name, lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    q, k, v, g, _ = (x.requires_grad_(True) for x in _inputs())
    plain = torch.autograd.grad(pa.point_attention(q, k, v, 2), (q, k, v), g)
    assert calls == ["grad_qkv"]
    calls.clear()
    differentiable = torch.autograd.grad(pa.point_attention(q, k, v, 2), (q, k, v), g, create_graph=True)
    assert sorted(calls) == ["grad_kv", "grad_q"]
    torch.testing.assert_close(plain, differentiable)


def _value_and_gradient(attention, weights, k, v):
    """A small 'SDF' with attention inside, and its gradient by ``torch.func.grad``: the compiled field's form."""

    def run(x):
        def total(x):
            out = attention(torch.sin(x @ weights), k, v, 2)
            return (out.sum(-1) + out.square().sum(-1)).sum(), out

        return torch.func.grad(total, has_aux=True)(x)

    return run


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_derivative_of_the_func_grad_gradient_matches_plain_attention(compiled):
    """The loss of the output and its input gradient, differentiated to the keys, values and the projection:
    what the eikonal loss does with the SDF's gradient. Compiled, the ``autograd.Function`` must be kept whole in
    the graph (dynamo traces its backward without a derivative of its own: the gradient was silently wrong)."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(4)
    weights = torch.randn(3, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x = torch.randn(11, 3, generator=generator, dtype=torch.float64)
    results = []
    for attention in (_explicit, pa.point_attention):
        run = _value_and_gradient(attention, weights, k, v)
        if compiled and attention is pa.point_attention:
            run = torch.compile(run, backend="aot_eager", fullgraph=True)
        gradient, out = run(x)
        loss = out.square().sum() + gradient.square().sum() + (gradient * torch.cos(gradient)).sum()
        results.append((gradient, *torch.autograd.grad(loss, (weights, k, v))))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs)
    torch._dynamo.reset()


def test_coordinate_attention_with_point_kernels_matches_the_block_diagonal_path():
    torch.manual_seed(0)
    modules = [CoordinateAttention(10, 8, depth=2, heads=2, dim_head=4, block_diagonal=True).double()]
    modules.append(CoordinateAttention(10, 8, depth=2, heads=2, dim_head=4, point_kernels=True).double())
    modules[1].load_state_dict(modules[0].state_dict())
    prototypes = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(13, 10, dtype=torch.float64)
    results = []
    for module in modules:
        xx = x.clone().requires_grad_(True)
        out = module(xx, prototypes, fused=False)
        (gradient,) = torch.autograd.grad(out[:, 0].sum(), xx, create_graph=True)
        loss = out.square().sum() + gradient.square().sum()
        results.append((out, gradient, *torch.autograd.grad(loss, [prototypes, *module.parameters()])))
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, theirs)


def test_kernels_that_cannot_run_fall_back_to_the_formulas_once_and_say_so(monkeypatch, capsys):
    monkeypatch.setattr(pa, "_kernel_failure", [])
    monkeypatch.setattr(pa, "_kernels_apply", lambda q: True)  # as on a GPU

    def out_of_resources(*args):
        raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 101376")

    monkeypatch.setattr(kernels, "attend", out_of_resources)
    q, k, v, *_ = _inputs()
    for _ in range(2):
        torch.testing.assert_close(pa.attend(q, k, v, 2), pa.reference_attend(q, k, v, 2))
    printed = capsys.readouterr().out
    assert printed.count("Point-attention kernels failed") == 1 and "point-kernels" in printed
    assert "shared memory" in printed

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pa, "_kernel_failure", [])
    monkeypatch.setattr(kernels, "attend", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # chunked renders catch this one themselves
        pa.attend(q, k, v, 2)


def test_a_kernel_failure_during_graph_capture_is_raised_not_hidden(monkeypatch):
    monkeypatch.setattr(pa, "_kernel_failure", [])
    monkeypatch.setattr(pa, "_kernels_apply", lambda q: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def fails(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(kernels, "attend", fails)
    q, k, v, *_ = _inputs()
    with pytest.raises(RuntimeError, match="stream is capturing"):
        pa.attend(q, k, v, 2)
    assert pa._kernel_failure == []  # the kernels stay on


@pytest.mark.parametrize(
    "change, heads",
    [
        ({"q": (9,)}, 2),
        ({"k": (7, 8)}, 2),
        ({"v": (6, 6)}, 2),
        ({"g": (8, 6)}, 2),
        ({}, 4),
        ({}, 0),
        ({"k": (0, 6), "v": (0, 6)}, 2),
    ],
    ids=[
        "1-d queries",
        "key width",
        "fewer values than keys",
        "cotangent rows",
        "width not a multiple",
        "no heads",
        "no keys",
    ],
)
def test_inputs_of_the_wrong_shape_are_refused_naming_the_shapes(change, heads, monkeypatch):
    """Checked before any kernel runs (a kernel would read out of bounds), and not taken for a kernel failure."""
    monkeypatch.setattr(pa, "_kernel_failure", [])
    q, k, v, g, _ = _inputs()  # 9 points, 7 keys, width 6
    inputs = {"q": q, "k": k, "v": v, "g": g}
    for name, shape in change.items():
        inputs[name] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"point attention \(grad_q\): expected queries \[n, heads \* d\].*m >= 1.*got \("
    ):
        pa.grad_q(inputs["q"], inputs["k"], inputs["v"], inputs["g"], heads)
    assert pa._kernel_failure == []


def test_the_eager_sdf_gradient_skips_the_keys_pass(monkeypatch):
    """Without compile-fields, the SDF's gradient with point kernels goes through torch.func.grad too: only the
    points are differentiated there, so no pass sums the keys' gradients over every point."""
    from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig

    calls = []
    for name in ("grad_kv", "grad_qkv"):
        op = getattr(pa, name)
        monkeypatch.setattr(pa, name, lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    config = CocoFieldConfig(geometry_hidden_dims=(16,), feature_dim=8)
    config.coordinate_attention.point_kernels = True
    prototypes = torch.randn(8, 16, requires_grad=True)
    field = config.setup(prototype_source=lambda head: prototypes, prototype_dim=16)
    sdf, _, gradient = field.sdf_and_gradient(torch.rand(20, 3), create_graph=True)
    assert calls == [] and gradient.requires_grad
    (sdf.sum() + gradient.square().sum()).backward()  # the training backward: now the keys' gradients
    assert "grad_qkv" in calls and prototypes.grad is not None


INTERPRETER_CHECK = textwrap.dedent(
    """
    import torch
    from cocoinr_nerfstudio.field_components import point_attention as pa
    from cocoinr_nerfstudio.field_components import triton_point_attention as kernels

    torch.manual_seed(0)
    # (points, keys, heads, width, query scale): the geometry head's 256 x 4 x 32 at a ragged point count; widths
    # and key counts that are not powers of two (masked lanes); fewer points than a tile; no points at all; scores
    # spread wide (a key block's maximum far above the blocks before it: the online softmax's rescaling); fewer
    # keys than the smallest tile of keys; one key past a power of two, with more points than a tile
    cases = [(70, 256, 4, 32, 1), (45, 20, 2, 12, 1), (3, 100, 1, 16, 1), (0, 8, 2, 16, 1), (40, 100, 2, 16, 6)]
    cases += [(5, 7, 1, 12, 1), (65, 33, 1, 16, 8)]
    # the shipped tiles; every pass over whole rows with all keys in one step; then looping over blocks of 16 keys
    # (one to sixteen blocks here, ragged last blocks) with 32-point tiles
    one_step, looped = kernels.RowTile(points=16, keys=0, warps=4), kernels.RowTile(points=32, keys=16, warps=4)
    tile_sets = [dict(kernels.ROW_TILES)] + [{name: tile for name in kernels.ROW_TILES} for tile in (one_step, looped)]
    for tiles, (n, m, heads, d, spread) in [(tiles, case) for tiles in tile_sets for case in cases]:
        kernels.ROW_TILES.update(tiles)
        q, g, f = (torch.randn(n, heads * d) for _ in range(3))
        q = q * spread
        k, v = (torch.randn(m, heads * d) for _ in range(2))
        wide = [x.double() for x in (q, k, v, g, f)]  # the reference in float64: float32's own rounding aside
        pairs = [
            (kernels.attend(q, k, v, heads), pa.reference_attend(*wide[:3], heads)),
            (kernels.grad_q(q, k, v, g, heads), pa.reference_grad_q(*wide[:4], heads)),
            *zip(kernels.grad_kv(q, k, v, g, heads), pa.reference_grad_kv(*wide[:4], heads)),
            *zip(kernels.grad_qkv(q, k, v, g, heads), pa.reference_grad_qkv(*wide[:4], heads)),
            *zip(kernels.grad_q_backward(q, k, v, g, f, heads), pa.reference_grad_q_backward(*wide, heads)),
        ]
        for ours, theirs in pairs:
            assert ours.shape == theirs.shape and ours.dtype == torch.float32
            # float32 sums of terms up to the output's largest: an error relative to that, not to each element
            size = float(theirs.abs().max()) if theirs.numel() else 1.0
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=3e-6 * max(1.0, size))
        print("checked", n, m, heads, d, len(pairs), tiles["grad_q"].keys)
    """
)


def test_triton_kernels_match_the_formulas_in_the_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8):
        # seen with 3.6 (the GPU host's): a TypeError inside the interpreter; there the GPU test below checks them
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels; 3.8 can")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checked") == 21 and "checked 70 256 4 32 11 16" in result.stdout
    assert "checked 70 256 4 32 11 0" in result.stdout  # all 256 keys in one step


def _compile_for(kernel, target, pointers: set[str], warps: int, **constants):
    """``kernel`` compiled ahead of time (Triton's front end, LLVM and ptxas, which ship with Triton): no GPU needed."""
    import triton
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in pointers:
            signature[name] = "*fp32"
        elif name in ("n", "m", "width"):
            signature[name] = "i32"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "constexpr"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    return triton.compile(source, target=target, options={"num_warps": warps})


def _row_constants(tile, keys: int = 256) -> dict:
    block_keys = keys if tile.keys <= 0 else min(tile.keys, keys)
    return dict(BLOCK_N=tile.points, BLOCK_KEYS=block_keys, KEY_BLOCKS=-(-keys // block_keys))


@pytest.mark.parametrize("capability, shared_memory", [(90, 227 * 1024), (80, 163 * 1024)], ids=["sm90", "sm80"])
def test_kernels_compile_for_hopper_and_ampere_at_the_training_shape(capability, shared_memory):
    """Every kernel and variant the ops launch, at the geometry head's shape (256 keys, heads of 32) and with the
    shipped tiles, compiles for the GPU and fits its shared memory (H100: 227 KiB a block; A100: 163 KiB); so do
    the row passes with all keys in one step and looping over blocks of 64 keys, whichever is not shipped. CPU
    tests otherwise run the kernels only in the interpreter, which checks their arithmetic, not that Triton can
    build them."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    shapes = dict(D=32, BLOCK_D=32, PRECISION="tf32")
    tensors = {"q_ptr", "k_ptr", "v_ptr", "g_ptr", "f_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "dg_ptr"}
    tensors |= {"lse_ptr", "delta_ptr", "c_ptr", "e_ptr"}
    builds = []
    for tiles in (kernels.ROW_TILES, {"": kernels.RowTile(16, 0, 4)}, {"": kernels.RowTile(64, 64, 4)}):
        for name, tile in tiles.items():
            rows = dict(shapes, **_row_constants(tile))
            if name in ("attend", ""):
                builds.append(_compile_for(kernels._attend_kernel, target, tensors, tile.warps, **rows))
            if name in ("grad_q", ""):
                for write_dq, write_stats in [(True, False), (False, True), (True, True)]:
                    flags = dict(WRITE_DQ=write_dq, WRITE_STATS=write_stats)
                    builds.append(_compile_for(kernels._grad_q_kernel, target, tensors, tile.warps, **rows, **flags))
            if name in ("grad_q_backward", ""):
                kernel = kernels._grad_q_backward_rows_kernel
                builds.append(_compile_for(kernel, target, tensors, tile.warps, **rows))
    for second_order in (False, True):
        keys = dict(shapes, BLOCK_N=kernels.REDUCTION_ROWS, BLOCK_KEYS=kernels.KEYS_PER_PROGRAM)
        build = _compile_for(
            kernels._keys_kernel, target, tensors, kernels.REDUCTION_WARPS, **keys, SECOND_ORDER=second_order
        )
        builds.append(build)
    assert len(builds) == 3 * 5 + 2
    for build in builds:
        assert "mma" in build.asm["ptx"]  # the products run on tensor cores
        assert 0 < build.metadata.shared <= shared_memory


@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.AVAILABLE, reason="the kernels need a CUDA GPU")
@pytest.mark.parametrize(
    "shape", [(99328, 256, 4, 32), (1000, 20, 2, 12), (5, 100, 1, 16)], ids=["training", "ragged", "few"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_tile", [None, kernels.RowTile(16, 0, 4), kernels.RowTile(64, 64, 8)])
def test_triton_kernels_on_gpu_match_the_formulas_in_float64(row_tile, dtype, shape, monkeypatch):
    """The training shape, and key counts, widths and point counts that mask lanes (the interpreter test checks
    those too, but only on Triton 3.8 and later); with the shipped tiles, all keys in one step, and looping over
    blocks of keys."""
    monkeypatch.setattr(pa, "_kernel_failure", [])
    if row_tile is not None:
        monkeypatch.setattr(kernels, "ROW_TILES", {name: row_tile for name in kernels.ROW_TILES})
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # IEEE products in the kernels
    try:
        torch.manual_seed(0)
        n, m, heads, d = shape
        q, g, f = (torch.randn(n, heads * d, device="cuda", dtype=dtype) for _ in range(3))
        k, v = (torch.randn(m, heads * d, device="cuda", dtype=dtype) for _ in range(2))
        wide = [x.double() for x in (q, k, v, g, f)]
        pairs = [
            (pa.attend(q, k, v, heads), pa.reference_attend(*wide[:3], heads)),
            (pa.grad_q(q, k, v, g, heads), pa.reference_grad_q(*wide[:4], heads)),
            *zip(pa.grad_kv(q, k, v, g, heads), pa.reference_grad_kv(*wide[:4], heads), strict=True),
            *zip(pa.grad_qkv(q, k, v, g, heads), pa.reference_grad_qkv(*wide[:4], heads), strict=True),
            *zip(pa.grad_q_backward(q, k, v, g, f, heads), pa.reference_grad_q_backward(*wide, heads), strict=True),
        ]
    finally:
        torch.set_float32_matmul_precision(precision)
    assert not pa._kernel_failure
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the outputs' own rounding
    for ours, theirs in pairs:
        assert ours.dtype == dtype
        error = (ours.double() - theirs).abs().max() / theirs.abs().max()
        assert error < tolerance
