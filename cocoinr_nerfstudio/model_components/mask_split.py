"""Both sides of a boolean mask as index tensors, for one host read.

Every boolean-mask index (``x[mask]``, ``x[mask] = y``) counts the mask's true entries on the host, so a render
that gathers five tensors by one mask waits for the GPU five times; each wait idles the GPU while the host
launches what follows. The render paths gather by the indices from here instead.
"""

from __future__ import annotations

import torch
from torch import Tensor


def split_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The flat indices where ``mask`` is true and where it is false, each in increasing order (what boolean
    indexing would gather), reading the GPU once."""
    flat = mask.reshape(-1)
    order = torch.sort((~flat).to(torch.uint8), stable=True).indices  # the true entries first, in order
    count = int(flat.sum())  # the wait, after the sort is launched
    return order[:count], order[count:]
