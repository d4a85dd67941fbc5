"""Reads of device values (and copies to the device) that do not drain the GPU's queue.

A plain read (``.item()``, ``.tolist()``) waits until the GPU has finished everything queued so far, and the GPU then
idles until the host has prepared and launched the next step. A copy into pinned host memory is queued like any
other work instead, and an event marks its arrival. Issued one step before the values are needed, its wait ends
while the step queued in between still runs, so the GPU never runs dry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def copy_to_host(values: Tensor) -> tuple[Tensor, Any]:
    """``values`` on the host, and an event that completes when they have arrived (None: they already have). A CUDA
    tensor is copied into pinned memory without waiting for the GPU; the copy is ordered after the work queued so
    far, so it holds their values as of now."""
    if not values.is_cuda:
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def copy_to_device(host: Tensor, device: torch.device | str) -> Tensor:
    """``host`` on ``device``. To a GPU the copy goes through pinned memory without waiting: one from pageable
    memory waits for everything queued on the device first."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class DeferredRead:
    """Device values as of when this was made, to read later (:meth:`result`) without waiting for later work."""

    def __init__(self, values: Tensor) -> None:
        values = values.detach()
        # a host tensor is copied now: the caller may change ``values`` in place once this is made (reset a count)
        self._host, self._copied = copy_to_host(values if values.is_cuda else values.clone())

    def result(self) -> Tensor:
        """The values on the host; waits only for their copy (and the work queued before it)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host
