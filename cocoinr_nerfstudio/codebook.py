"""Finding, reading and validating the prior codebook (a VQGAN quantizer embedding).

CoCo-INR's prior is the 16384 x 256 embedding of taming-transformers' ImageNet VQGAN (f16-16384).
It cannot be downloaded at run time, so users place it once; this module says clearly what went
wrong when the file is absent or not a codebook.
"""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

TAMING_KEY = "quantize.embedding.weight"
CODEBOOK_FILENAME = "model_16384x256_codebook.ckpt"
PAPER_CODEBOOK_SHAPE = (16384, 256)

HOW_TO_GET = (
    "The codebook is the quantizer embedding (state_dict['quantize.embedding.weight'], 16384 x 256) of "
    "taming-transformers' VQGAN 'ImageNet f16-16384' (https://github.com/CompVis/taming-transformers). "
    "Download that checkpoint, then run `cocoinr-extract-codebook --vqgan-checkpoint last.ckpt` to store "
    "the compact codebook at {cache}, or put the checkpoint at {cwd}, or pass "
    "--pipeline.model.codebook-path PATH. For a prior-free ablation, pass --pipeline.model.codebook-source random."
)


class CodebookError(ValueError):
    """A codebook file is missing, unreadable or does not hold a usable codebook."""


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cocoinr`` (default ``~/.cache/cocoinr``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cocoinr"


def default_codebook_locations() -> list[Path]:
    """Where a codebook is looked for when no path is given, in order."""
    return [Path.cwd() / "ckpts" / CODEBOOK_FILENAME, user_cache_dir() / CODEBOOK_FILENAME]


def locate_codebook(path: Path | None) -> Path:
    """Returns the codebook file to use, or raises a ``CodebookError`` that explains how to get one."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CodebookError(f"Codebook file {path} does not exist (from --pipeline.model.codebook-path).")
        return path
    candidates = default_codebook_locations()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise CodebookError(
        f"No codebook given and none found (searched {searched}). "
        + HOW_TO_GET.format(cache=candidates[1], cwd=candidates[0])
    )


class _InertObject:
    """Stands in for any non-tensor class found in a training checkpoint (callbacks, configs...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles a full Lightning/taming checkpoint without importing or running anything of theirs.

    ``weights_only`` loading refuses such files (they pickle callback objects); a plain load would
    need pytorch_lightning installed and would execute arbitrary code. Tensors, containers and
    numpy scalars are rebuilt; every other class becomes an inert placeholder.
    """

    _BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "bytearray"})
    _NUMPY = frozenset({"_reconstruct", "scalar", "ndarray", "dtype"})

    def _is_allowed(self, module: str, name: str) -> bool:
        if module == "builtins":
            return name in self._BUILTINS
        if module == "_codecs":
            return name == "encode"  # how protocol-2 pickles spell bytes (numpy scalars)
        if module == "collections":
            return name == "OrderedDict"
        if module == "torch._utils":
            return name.startswith("_rebuild_")
        if module in ("torch", "torch.storage"):
            return (
                name.endswith("Storage")
                or name in ("Size", "device")
                or isinstance(getattr(torch, name, None), torch.dtype)
            )
        if module.split(".")[0] == "numpy":
            return name in self._NUMPY or name.endswith("DType")
        return False

    def find_class(self, module: str, name: str) -> Any:
        if self._is_allowed(module, name):
            return super().find_class(module, name)
        return _InertObject


_tensor_only_pickle = types.SimpleNamespace(
    Unpickler=_TensorOnlyUnpickler, load=lambda f, **kw: _TensorOnlyUnpickler(f, **kw).load(), __name__="pickle"
)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tensor_only_pickle)


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj.keys())
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"a dict with keys [{shown}]"
    if isinstance(obj, (Tensor, np.ndarray)):
        return f"an array of shape {tuple(obj.shape)}"
    return f"an object of type {type(obj).__name__}"


def _find_matrix(obj: Any, path: Path) -> Any:
    """Picks the codebook out of the supported layouts."""
    if isinstance(obj, (Tensor, np.ndarray)):
        return obj
    if isinstance(obj, dict):
        for container in (obj.get("state_dict"), obj):
            if isinstance(container, dict) and TAMING_KEY in container:
                return container[TAMING_KEY]
        for key in ("codebook", "embedding", "weight"):
            if key in obj:
                return obj[key]
        arrays = [v for v in obj.values() if isinstance(v, (Tensor, np.ndarray))]
        if len(arrays) == 1:
            return arrays[0]
    raise CodebookError(
        f"{path} holds {_describe(obj)}; expected a taming-transformers checkpoint with "
        f"state_dict['{TAMING_KEY}'], a 2-D tensor, or a dict with exactly one tensor."
    )


def validate_codebook(matrix: Any, path: Path) -> Tensor:
    """Checks rank, emptiness and finiteness; returns a contiguous float32 tensor."""
    tensor = torch.as_tensor(np.asarray(matrix) if isinstance(matrix, np.ndarray) else matrix)
    if tensor.ndim != 2:
        raise CodebookError(f"{path}: codebook must be 2-D (entries x dim), found shape {tuple(tensor.shape)}.")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise CodebookError(f"{path}: codebook is empty (shape {tuple(tensor.shape)}).")
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise CodebookError(f"{path}: codebook must hold numbers, found dtype {tensor.dtype}.")
    tensor = tensor.float()
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise CodebookError(f"{path}: codebook has {bad} NaN/Inf values out of {tensor.numel()}.")
    return tensor.contiguous()


def load_codebook(path: Path) -> Tensor:
    """Reads a codebook from a taming checkpoint, a ``.pt``/``.pth``/``.ckpt`` tensor or dict, or a ``.npy``."""
    path = Path(path)
    if not path.is_file():
        raise CodebookError(f"Codebook file {path} does not exist.")
    try:
        if path.suffix.lower() == ".npy":
            obj = np.load(path, allow_pickle=False)
        else:
            obj = _torch_load(path)
    except CodebookError:
        raise
    except Exception as error:  # unreadable, truncated, not a torch/numpy file
        raise CodebookError(f"Could not read codebook file {path}: {type(error).__name__}: {error}") from error
    return validate_codebook(_find_matrix(obj, path), path)


def random_codebook(shape: tuple, seed: int) -> Tensor:
    """The prior-free ablation: N(0, 1) entries from a fixed seed, so reloading rebuilds the same one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def save_codebook(codebook: Tensor, path: Path) -> None:
    """Stores a codebook in the compact layout the original project shipped (taming key, nothing else)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {TAMING_KEY: codebook.detach().cpu().contiguous()}}, path)
