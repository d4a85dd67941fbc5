#!/usr/bin/env python
"""Times the per-step prototypes (codebook attention of every head, forward + backward) as training runs them.

Compares the heads computed one after another against the batched pass that ``--pipeline.model.compile-fields``
uses (``PrototypeBank._compute_all``: one ``vmap`` over the heads' stacked weights), each compiled, with fused or
explicit attention to the codebook. On CUDA each is also captured in a CUDA graph and replayed, as the
``cuda-graph`` training step does: that column is what a training step pays. Prints a markdown table.

    python scripts/benchmark_prototypes.py --device cuda
    python scripts/benchmark_prototypes.py --device cpu --entries 256 --repeats 2 --backend aot_eager   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
from torch import Tensor

from cocoinr_nerfstudio.benchmarks.timing import median_ms
from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings, PrototypeBank
from cocoinr_nerfstudio.models.coco_inr import PRIOR_HEADS


def _time_variant(args, codebook: Tensor, fused: bool, batched: bool) -> tuple[float, float]:
    """(ms launched one by one, ms replayed in a CUDA graph or NaN off CUDA) of one forward + backward."""
    torch._dynamo.reset()
    bank = (
        PrototypeBank(codebook, PRIOR_HEADS, CodebookAttentionSettings(), fused_attention=fused).to(args.device).train()
    )
    if not batched:
        bank._compute_all = bank._compute_each  # type: ignore[method-assign]  # the unbatched form, compiled
    bank.enable_torch_compile(args.backend)
    params = list(bank.parameters())

    def step() -> None:
        bank.refresh()
        sum(bank.get(head).mean() for head in PRIOR_HEADS).backward()

    cuda = args.device == "cuda"
    stream = torch.cuda.Stream() if cuda else None
    if stream is not None:  # warm-up on a side stream, as CUDA-graph capture asks
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for _ in range(3):
            for param in params:
                param.grad = None
            step()
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    launched = median_ms(step, args.device, args.repeats)
    if not cuda:
        return launched, float("nan")
    for param in params:
        param.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return launched, median_ms(graph.replay, args.device, args.repeats)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--entries", type=int, default=16384, help="codebook entries (VQGAN: 16384)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.backends.cuda.matmul.allow_tf32 = True
    codebook = torch.randn(args.entries, 256, generator=torch.Generator().manual_seed(0))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"Device: {device_name}; TF32 on; backend {args.backend}; {len(PRIOR_HEADS)} heads, codebook {args.entries}x256; "
        f"median of {args.repeats}",
        "",
        "| attention to the codebook | heads | fwd+bwd ms, launched | fwd+bwd ms, replayed in a CUDA graph |",
        "|---|---|---:|---:|",
    ]
    for fused in (True, False):
        for batched in (False, True):
            launched, replayed = _time_variant(args, codebook, fused, batched)
            lines.append(
                f"| {'fused' if fused else 'explicit'} | {'batched (vmap)' if batched else 'one after another'} | "
                f"{launched:.2f} | {'-' if math.isnan(replayed) else f'{replayed:.2f}'} |"
            )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
