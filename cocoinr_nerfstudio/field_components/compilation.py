"""``torch.compile`` with an eager fallback: a machine that cannot compile still trains, and says why."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config
from nerfstudio.utils.rich_utils import CONSOLE

LOGGER = logging.getLogger(__name__)

PAD_MATMULS = {"force_shape_pad": True}
"""Inductor options that pad every matrix product's widths with zeros to the tensor-core alignment. cuBLAS runs
products of unaligned widths (the 39-, 257-, 283- and 289-wide layers) with slow one-element-aligned kernels: on an
H200, 100k x 289 @ 289 x 289 takes 206 us in bf16 as is and 52 us on padded operands. Inductor decides on its own
only where it judges a product compute-bound, which these are not; forced, it writes the padding into the producing
kernels. The zeros add nothing, so results change only by the order of float sums."""

NO_MIX_ORDER_REDUCTION = {"triton.mix_order_reduction": False}
"""Inductor options that keep a layer norm's backward pass as two kernels: one over rows (the input's gradient) and
split reductions over columns (the weight's and bias's). Since torch 2.10 inductor fuses both into one "mix-order"
kernel whose programs each loop over a slice of the rows; on the colour head's [99328, 289] rows (H200, torch 2.11)
it took 0.65 ms, about six times what its reads need at the card's bandwidth. Off, the layer-norm kernels took
1.58 ms of a training step instead of 2.10, +1.6% a step (docs/benchmarks.md, round twenty-two)."""


def inductor_options(pad_matmuls: bool, mix_order_reduction: bool = True) -> dict[str, Any] | None:
    """The inductor options of :class:`CompiledOrEager` (None: inductor's defaults). ``mix_order_reduction=False``
    is dropped on a torch whose inductor has no such fusion (before 2.10): there is nothing to turn off."""
    options: dict[str, Any] = {}
    if pad_matmuls:
        options.update(PAD_MATMULS)
    if not mix_order_reduction and hasattr(torch._inductor.config.triton, "mix_order_reduction"):
        options.update(NO_MIX_ORDER_REDUCTION)
    return options or None


def _backward_compiled_with_forward() -> contextlib.AbstractContextManager:
    """Lowers the backward graph when the forward compiles (torch otherwise waits for the first backward pass),
    so that a backward the backend cannot compile fails where the fallback can still catch it."""
    config = torch._functorch.config
    if hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


class CompiledOrEager:
    """Calls ``torch.compile(function)``; if the backend cannot compile it, forward or backward (no C++ compiler
    for inductor on CPU, no working Triton on GPU, a lowering error), prints why once and calls ``function``
    itself from then on.

    Only backend failures fall back: an error in the traced code itself would also fail eagerly, and is raised.
    ``option``: the command-line option that message names. ``eager``: what to call instead, when the form worth
    compiling is not the one that runs best eagerly (the default is ``function`` itself). ``recompile_limit``:
    specialisations kept for ``function`` (torch's default is 8), for one called at several fixed shapes.
    ``dynamic``: as ``torch.compile``'s. ``pad_matmuls``: inductor pads the widths of every matrix product to a
    multiple of the tensor-core alignment (8 in bf16, 4 in tf32) with zero rows and columns (see
    :data:`PAD_MATMULS`); ``mix_order_reduction=False``: inductor does not fuse row and column reductions (see
    :data:`NO_MIX_ORDER_REDUCTION`). Other backends ignore both.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        backend: str,
        name: str,
        option: str = "--pipeline.model.compile-fields",
        eager: Callable[..., Any] | None = None,
        recompile_limit: int | None = None,
        dynamic: bool | None = None,
        pad_matmuls: bool = False,
        mix_order_reduction: bool = True,
    ) -> None:
        self.function = function if eager is None else eager
        self.traced = function
        self.backend = backend
        self.options = inductor_options(pad_matmuls, mix_order_reduction) if backend == "inductor" else None
        self.dynamic = dynamic
        self.recompile_limit = recompile_limit
        self.name = name
        self.option = option
        self.failed = False
        self._wrap()

    def _wrap(self) -> None:
        self.compiled = torch.compile(self.traced, backend=self.backend, dynamic=self.dynamic, options=self.options)
        self._limit: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.recompile_limit is not None:  # torch < 2.7 calls it cache_size_limit
            config = torch._dynamo.config
            key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            self._limit = config.patch(**{key: self.recompile_limit})

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy`` of a model, ``torch.save`` of a field) carry the functions and
        settings, not torch.compile's wrapper (it holds locks): the copy wraps its own methods (rebound to the copy)
        again. Dynamo keys compiled code by the function's code object, so the copy may reuse graphs compiled for
        the original; parameters are graph inputs, so it computes with its own. A wrapper that fell back to eager
        stays eager in the copy."""
        return {key: value for key, value in self.__dict__.items() if key not in ("compiled", "_limit")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._wrap()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.function(*args, **kwargs)
        try:
            with _backward_compiled_with_forward(), self._limit:
                return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self.failed = True
            cause = getattr(error, "inner_exception", None) or error  # dynamo wraps what the backend raised
            first_line = next(iter(str(cause).strip().splitlines()), "")
            LOGGER.debug("torch.compile of %s failed", self.name, exc_info=error)
            CONSOLE.print(
                f"[bold yellow]{self.option}: torch.compile could not compile {self.name} "
                f"({type(cause).__name__}: {first_line}); it runs eagerly (same results, without the speed-up)."
            )
            return self.function(*args, **kwargs)
