"""The one-launch Adam: its block tables, its update against torch's Adam (in Triton's interpreter on a CPU, and on a
GPU), its fallbacks, and checkpoints shared with torch's fused Adam."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cocoinr_nerfstudio.engine import multi_tensor_adam
from cocoinr_nerfstudio.engine.multi_tensor_adam import MultiTensorAdam, block_tables
from cocoinr_nerfstudio.engine.optimizers import FusedAdamOptimizerConfig


def test_block_tables_cut_each_tensor_into_whole_blocks():
    tensor, start = block_tables([5, 0, 4100, 2048], "cpu", block=2048)
    assert tensor.tolist() == [0, 2, 2, 2, 3]  # the empty tensor has no block
    assert start.tolist() == [0, 0, 2048, 4096, 0]
    assert (tensor.dtype, start.dtype) == (torch.int32, torch.int64)


def _adam_runs(kernel_devices: tuple[str, ...], device: str = "cpu", shapes=((7, 5), (5,), (3000,), ()), **options):
    """Parameters after four steps (the learning rate changed after two) of MultiTensorAdam and of torch's Adam, and
    MultiTensorAdam's optimizer."""
    torch.manual_seed(0)
    start = [torch.randn(shape, device=device) for shape in shapes]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    results = []
    for ours in (True, False):
        params = [p.clone().requires_grad_(True) for p in start]
        kwargs = dict(lr=1e-2, eps=1e-8, **options)
        if ours:
            MultiTensorAdam.KERNEL_DEVICES = kernel_devices
            optimizer = MultiTensorAdam(params, fused=True, **kwargs)
        else:
            optimizer = torch.optim.Adam(params, foreach=False, **kwargs)
        for index, step_grads in enumerate(grads):
            if index == 2:
                optimizer.param_groups[0]["lr"] = 3e-3
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append(([p.detach() for p in params], optimizer))
    MultiTensorAdam.KERNEL_DEVICES = ("cuda",)
    return start, results[0], results[1]


INTERPRETER_CHECK = textwrap.dedent(
    """
    import sys

    import torch

    sys.path.insert(0, "tests/engine")
    from test_multi_tensor_adam import _adam_runs
    from cocoinr_nerfstudio.engine import multi_tensor_adam

    calls = []
    real = multi_tensor_adam.kernel_step
    multi_tensor_adam.kernel_step = lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs)
    for options in ({}, {"weight_decay": 0.1}, {"maximize": True}, {"betas": (0.5, 0.9)}):
        start, (ours, optimizer), (theirs, _) = _adam_runs(("cuda", "cpu"), **options)
        for a, b, before in zip(ours, theirs, start, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # 1/20000 of what the steps moved
            assert (a - before).abs().max() > 1e-4  # the steps moved every tensor
        steps = [optimizer.state[p]["step"] for p in optimizer.param_groups[0]["params"]]
        assert all(s.dtype == torch.float32 and float(s) == 4.0 for s in steps)
        print("checked", sorted(options))
    assert len(calls) == 16, calls
    """
)


def test_kernel_matches_torch_adam_in_the_interpreter():
    """Four steps on tensors of 35, 5, 3000 (two blocks, the second ragged) and 1 values, with a learning-rate
    change, weight decay, maximize and other betas: the kernel's update is torch's to float rounding."""
    pytest.importorskip("triton")
    if not multi_tensor_adam.AVAILABLE:
        pytest.skip("no Triton")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETER_CHECK],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checked") == 4


def test_on_a_cpu_it_is_torchs_fused_adam_exactly():
    start, (ours, optimizer), _ = _adam_runs(("cuda",))
    torch.manual_seed(0)
    params = [p.clone().requires_grad_(True) for p in start]
    reference = torch.optim.Adam(params, lr=1e-2, eps=1e-8, fused=True)
    torch.manual_seed(0)
    [torch.randn(p.shape) for p in start]  # the same draws as _adam_runs
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    for index, step_grads in enumerate(grads):
        if index == 2:
            reference.param_groups[0]["lr"] = 3e-3
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        reference.step()
    for a, b in zip(ours, params, strict=True):
        assert torch.equal(a, b.detach())
    assert not optimizer._tables  # the kernel never ran


def test_what_the_kernel_does_not_cover_takes_torchs_step(monkeypatch):
    """amsgrad, decoupled weight decay, a tensor learning rate, a gradient scaler's attributes, float64 and the
    option turned off: torch's step, never the kernel."""
    monkeypatch.setattr(MultiTensorAdam, "KERNEL_DEVICES", ("cuda", "cpu"))
    cases = [
        dict(amsgrad=True),
        dict(decoupled_weight_decay=True, weight_decay=0.1),
        dict(lr=torch.tensor(1e-3)),
        dict(multi_tensor_kernel=False),
    ]
    for options in [*cases, "scaler", "float64"]:
        dtype = torch.float64 if options == "float64" else torch.float32
        param = torch.randn(4, dtype=dtype, requires_grad=True)
        param.grad = torch.randn_like(param)
        optimizer = MultiTensorAdam([param], **(options if isinstance(options, dict) else {}))
        if options == "scaler":
            optimizer.grad_scale = torch.ones(())
        assert not optimizer._kernel_applies(), options
    plain = torch.randn(4, requires_grad=True)
    plain.grad = torch.randn_like(plain)
    assert MultiTensorAdam([plain], weight_decay=0.1, maximize=True)._kernel_applies()


def test_the_method_builds_it_with_torch_fused_adams_settings():
    params = [torch.randn(3, requires_grad=True)]
    optimizer = FusedAdamOptimizerConfig(lr=5e-4, eps=1e-8).setup(params)
    assert isinstance(optimizer, MultiTensorAdam) and optimizer.multi_tensor_kernel
    assert "multi_tensor_kernel" not in optimizer.param_groups[0]  # checkpoints stay torch's Adam's
    assert FusedAdamOptimizerConfig(multi_tensor_kernel=False).setup(params).multi_tensor_kernel is False


@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
def test_kernel_compiles_for_hopper_and_ampere(capability):
    """Triton's front end, LLVM and ptxas build the kernel (its addresses read from a table) for the GPU, no GPU
    needed; the interpreter test checks its arithmetic."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"table": "*i64", "block_tensor": "*i32", "block_start": "*i64"}
    signature |= {name: "fp32" for name in ("lr", "beta1", "beta2", "log2_beta1", "log2_beta2", "eps", "weight_decay")}
    for maximize, decay in [(False, False), (True, True)]:
        constants = dict(
            MAXIMIZE=maximize, DECAY=decay, BLOCK=multi_tensor_adam.BLOCK, COLUMNS=multi_tensor_adam.TABLE_COLUMNS
        )
        source = ASTSource(
            fn=multi_tensor_adam._adam_kernel,
            signature={**signature, **dict.fromkeys(constants, "constexpr")},
            constexprs=constants,
        )
        build = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
        assert "st.global" in build.asm["ptx"]


@pytest.mark.skipif(not torch.cuda.is_available() or not multi_tensor_adam.AVAILABLE, reason="needs a CUDA GPU")
def test_on_a_gpu_it_matches_torchs_fused_adam_and_keeps_its_tables():
    shapes = [(256, 256), (257,), (1024, 128), (3,), (), (289, 289), (70000,)]
    _, (ours, optimizer), (theirs, _) = _adam_runs(("cuda",), device="cuda", shapes=shapes)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # as in the interpreter
    # gradients in new tensors (eager steps): new tables; the same tensors (a replayed graph's): the same tables
    params = optimizer.param_groups[0]["params"]
    before = optimizer._tables[0][1]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    moved = optimizer._tables[0][1]
    assert moved[0] is not before[0]
    for p in params:
        p.grad.normal_()
    optimizer.step()
    assert optimizer._tables[0][1][0] is moved[0]
    loaded = torch.optim.Adam(params, lr=1e-2, fused=True)
    loaded.load_state_dict(optimizer.state_dict())  # torch's fused Adam takes the state as it is
    assert all(loaded.state[p]["step"].is_cuda for p in params)
