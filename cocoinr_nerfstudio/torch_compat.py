"""Names that moved between the torch versions the package supports (``torch>=2.1``)."""

from __future__ import annotations

import torch

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
"""torch.OutOfMemoryError from torch 2.5; before it, CUDA's alone (``torch.cuda.OutOfMemoryError``)."""
