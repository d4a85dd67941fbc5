"""``torch.compile`` with an eager fallback: a machine that cannot compile still trains, and says why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from nerfstudio.utils.rich_utils import CONSOLE


class CompiledOrEager:
    """Calls ``torch.compile(function)``; if the backend cannot compile it (no C++ compiler for inductor on CPU,
    no working Triton on GPU), prints why once and calls ``function`` itself from then on.

    Only backend failures fall back: an error in the traced code itself would also fail eagerly, and is raised.
    """

    def __init__(self, function: Callable[..., Any], backend: str, name: str) -> None:
        self.function = function
        self.compiled = torch.compile(function, backend=backend)
        self.name = name
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.function(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self.failed = True
            cause = getattr(error, "inner_exception", None) or error  # dynamo wraps what the backend raised
            reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            CONSOLE.print(
                f"[bold yellow]--pipeline.model.compile-fields: torch.compile could not compile {self.name} "
                f"({reason}); it runs eagerly (same results, without the speed-up)."
            )
            return self.function(*args, **kwargs)
