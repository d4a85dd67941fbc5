"""A model's Python-level training state as one tensor of a checkpoint (``nn.Module.get_extra_state``).

Some of what a run has learned is not a parameter or a buffer: whether the sampler's queries still run in half
precision, the refine budgets the rounds have grown to, the geometry head's loss scale. A run resumed without them
starts those over (a float32 switch undone until the next check, every budget back to 1 and re-sized, a loss scale
halved again through overflows that drop gradients). They go into the checkpoint as JSON in a uint8 tensor rather
than as a dict: every value of a state dict then stays a tensor (nerfstudio's tools and ours copy and compare them
as tensors), and torch's ``weights_only`` loader, nerfstudio's default under torch >= 2.6, reads it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

EXTRA_STATE_VERSION = 1


def encode_extra_state(state: dict[str, Any]) -> Tensor:
    """``state`` (JSON-serialisable: numbers, booleans, None, strings, lists, dicts) as a 1-D uint8 tensor on the CPU."""
    data = json.dumps({"version": EXTRA_STATE_VERSION, **state}, sort_keys=True).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_extra_state(encoded: Tensor, where: str) -> dict[str, Any]:
    """The dict :func:`encode_extra_state` encoded; ``where`` names the checkpoint entry in the error a tensor that
    is not such an encoding raises."""
    try:
        state = json.loads(bytes(encoded.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{where}: not this package's encoded training state ({error})") from error
    if not isinstance(state, dict) or state.get("version") != EXTRA_STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: training state version {found}, expected {EXTRA_STATE_VERSION}")
    return state
