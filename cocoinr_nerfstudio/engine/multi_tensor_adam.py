"""Adam that updates all of a parameter group's tensors in one Triton launch, in small blocks over the whole GPU.

torch's fused Adam (``multi_tensor_apply``) packs a few dozen tensors into each launch and gives every 65,536-element
chunk of a tensor to one thread block. coco-inr trains 299 small tensors (5.8M values): its step made 10 launches of
about 36 blocks each, so a 132-multiprocessor H200 ran a quarter full, launch after launch, for 0.39 ms a step; this
kernel took 0.07 ms in its two launches (docs/benchmarks.md, round twenty-two). Here each tensor is cut into blocks of
:data:`BLOCK` values and one launch runs every block of the group. A table on the device lists each tensor's size and
the addresses of the parameter, its gradient, both moments and its step count; it is rebuilt only when one of those
moves (a CUDA-graph step keeps its gradients in place, so it is built once per capture).

The arithmetic and the optimizer's state are those of ``torch.optim.Adam(fused=True)``: checkpoints load into
either. Anything the kernel does not cover (CPU tensors, other dtypes, amsgrad, a gradient scaler's unscaling,
learning rates held in tensors, no Triton) takes torch's own step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cocoinr_nerfstudio.model_components.host_reads import copy_to_device

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    AVAILABLE = False

BLOCK = 2048
"""Values per program: 5.8M values make about 2,900 programs, enough to keep every multiprocessor reading."""
TABLE_COLUMNS = 6
"""Per tensor: its size, then the addresses of the parameter, gradient, first and second moments and step count."""


if AVAILABLE:

    @triton.jit
    def _adam_kernel(
        table,
        block_tensor,
        block_start,
        lr,
        beta1,
        beta2,
        log2_beta1,
        log2_beta2,
        eps,
        weight_decay,
        MAXIMIZE: tl.constexpr,
        DECAY: tl.constexpr,
        BLOCK: tl.constexpr,
        COLUMNS: tl.constexpr,
    ):
        """One block of one tensor: torch's fused Adam update (``_fused_adam_``), step count already advanced."""
        pid = tl.program_id(0)
        row = table + tl.load(block_tensor + pid).to(tl.int64) * COLUMNS
        numel = tl.load(row)
        param = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        grad = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        exp_avg = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        exp_avg_sq = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
        offsets = tl.load(block_start + pid) + tl.arange(0, BLOCK)
        mask = offsets < numel
        p = tl.load(param + offsets, mask=mask)
        g = tl.load(grad + offsets, mask=mask)
        m = tl.load(exp_avg + offsets, mask=mask)
        v = tl.load(exp_avg_sq + offsets, mask=mask)
        if MAXIMIZE:
            g = -g
        if DECAY:
            g = g + weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        correction1 = 1.0 - tl.exp2(step * log2_beta1)  # 1 - beta1 ** step
        correction2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * log2_beta2))
        # IEEE square roots and quotients (Triton's defaults are approximate), as torch's kernel computes them
        denominator = tl.div_rn(tl.sqrt_rn(v), correction2_sqrt) + eps
        p = p - tl.div_rn(tl.div_rn(lr, correction1) * m, denominator)
        tl.store(param + offsets, p, mask=mask)
        tl.store(exp_avg + offsets, m, mask=mask)
        tl.store(exp_avg_sq + offsets, v, mask=mask)


def block_tables(numels: list[int], device: torch.device | str, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """For tensors of ``numels`` values cut into blocks of ``block``: each block's tensor (int32) and first value
    (int64), every block of the first tensor first. A tensor with no values has no block."""
    counts = torch.tensor([-(-numel // block) for numel in numels], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first_block = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first_block[tensor.long()]) * block
    # without waiting for the GPU: from pageable memory the training loop saw a wait per table at each capture
    return copy_to_device(tensor, device), copy_to_device(start, device)


def kernel_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    tables: tuple[Tensor, Tensor, Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Advances ``steps`` and updates ``params`` and the moments in place: one launch for every tensor.
    ``tables``: :func:`pointer_table`'s and :func:`block_tables`' tensors for these tensors."""
    torch._foreach_add_(steps, 1.0)
    table, block_tensor, block_start = tables
    beta1, beta2 = betas
    _adam_kernel[(block_tensor.numel(),)](
        table,
        block_tensor,
        block_start,
        lr,
        beta1,
        beta2,
        math.log2(beta1) if beta1 > 0 else -math.inf,
        math.log2(beta2) if beta2 > 0 else -math.inf,
        eps,
        weight_decay,
        MAXIMIZE=maximize,
        DECAY=weight_decay != 0,
        BLOCK=BLOCK,
        COLUMNS=TABLE_COLUMNS,
    )


def pointer_table(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[Tensor]
) -> Tensor:
    """The kernel's table (see :data:`TABLE_COLUMNS`), int64, on the parameters' device."""
    rows = [
        (p.numel(), p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr())
        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True)
    ]
    return copy_to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1, TABLE_COLUMNS), params[0].device)


class MultiTensorAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose step runs one Triton launch per parameter group where it can (see the module's
    docstring), and torch's step otherwise. ``multi_tensor_kernel=False`` always takes torch's step."""

    KERNEL_DEVICES = ("cuda",)
    """Devices whose parameters the kernel updates (the tests add ``cpu`` under Triton's interpreter)."""

    def __init__(self, params: Any, *args: Any, multi_tensor_kernel: bool = True, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self.multi_tensor_kernel = multi_tensor_kernel
        self._tables: dict[int, tuple[tuple, tuple[Tensor, Tensor, Tensor]]] = {}
        """Per group: the key of the tensors its tables were built for, and the tables."""

    def _kernel_applies(self) -> bool:
        if not (self.multi_tensor_kernel and AVAILABLE):
            return False
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False  # a GradScaler's unscaling and skipped steps: torch's fused step does them
        for group in self.param_groups:
            if group["amsgrad"] or group["differentiable"] or group.get("decoupled_weight_decay", False):
                return False
            if isinstance(group["lr"], Tensor):
                return False
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if param.device.type not in self.KERNEL_DEVICES:
                    return False
                if param.dtype != torch.float32 or not param.is_contiguous():
                    return False
                if grad.is_sparse or grad.dtype != torch.float32 or not grad.is_contiguous():
                    return False
        return True

    def _group_state(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The moments and step counts of ``params``, created as torch's fused Adam creates them (step counts as
        float32 on the parameter's device, where a loaded checkpoint may have left them elsewhere)."""
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            elif state["step"].device != param.device or state["step"].dtype != torch.float32:
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps

    def _tables_for(self, index: int, tensors: tuple[list[Tensor], ...]) -> tuple[Tensor, Tensor, Tensor]:
        key = tuple((t.data_ptr(), t.numel()) for group in tensors for t in group)
        cached = self._tables.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        params = tensors[0]
        block_tensor, block_start = block_tables([p.numel() for p in params], params[0].device)
        tables = (pointer_table(*tensors), block_tensor, block_start)
        self._tables[index] = (key, tables)
        return tables

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not self._kernel_applies():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs, steps = self._group_state(params)
            tensors = (params, grads, exp_avgs, exp_avg_sqs, steps)
            kernel_step(
                *tensors,
                self._tables_for(index, tensors),
                lr=float(group["lr"]),
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
        return loss
