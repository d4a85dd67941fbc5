"""``torch.compile`` with an eager fallback: a machine that cannot compile still trains, and says why."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from nerfstudio.utils.rich_utils import CONSOLE

LOGGER = logging.getLogger(__name__)


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
    ``eager``: what to call instead, when the form worth compiling is not the one that runs best eagerly (the
    default is ``function`` itself).
    """

    def __init__(
        self, function: Callable[..., Any], backend: str, name: str, eager: Callable[..., Any] | None = None
    ) -> None:
        self.function = function if eager is None else eager
        self.compiled = torch.compile(function, backend=backend)
        self.name = name
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.function(*args, **kwargs)
        try:
            with _backward_compiled_with_forward():
                return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self.failed = True
            cause = getattr(error, "inner_exception", None) or error  # dynamo wraps what the backend raised
            first_line = next(iter(str(cause).strip().splitlines()), "")
            LOGGER.debug("torch.compile of %s failed", self.name, exc_info=error)
            CONSOLE.print(
                f"[bold yellow]--pipeline.model.compile-fields: torch.compile could not compile {self.name} "
                f"({type(cause).__name__}: {first_line}); it runs eagerly (same results, without the speed-up)."
            )
            return self.function(*args, **kwargs)
