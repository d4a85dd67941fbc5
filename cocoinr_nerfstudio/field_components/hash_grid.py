"""A multiresolution hash grid (Instant-NGP) over a cube, for the geometry head's optional grid features.

tiny-cuda-nn is used when it imports (its fused kernels); otherwise a pure-torch grid with the same
number of levels and resolutions (tiny-cuda-nn places its vertices slightly differently, so the two are
not interchangeable). nerfstudio's ``HashEncoding`` has a torch fallback too, but it copies its constants
from the host on every call (a blocking transfer, and no CUDA-graph capture) and hashes even the coarse
levels that fit the table densely; this one keeps its constants on the device, indexes coarse levels
densely, and computes the eight cell corners in a few broadcast kernels.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from nerfstudio.field_components.encodings import HashEncoding
from torch import Tensor, nn

HASH_PRIMES = (1, 2654435761, 805459861)  # Instant-NGP's spatial hash


def _tinycudann() -> Any | None:
    """The tinycudann module when it imports and CUDA is there, else None (never required)."""
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module("tinycudann")
    except Exception:  # ImportError, or a build for another GPU architecture raising at import
        return None


@dataclass
class HashGridConfig:
    """Shape of the hash grid (Instant-NGP's defaults, scaled for a 400-1600 px few-view capture)."""

    num_levels: int = 16
    """Resolution levels, geometrically spaced from ``min_res`` to ``max_res``."""
    features_per_level: int = 2
    """Features stored per grid vertex and level."""
    log2_hashmap_size: int = 19
    """Entries per level are at most 2^this (fine levels share entries through the hash)."""
    min_res: int = 16
    """Cells per side of the coarsest level, over the whole bounding cube."""
    max_res: int = 2048
    """Cells per side of the finest level over the bounding cube (side 2 x scene radius: with VolSDF's
    radius 3 and the object in the unit sphere, about 680 cells across the object)."""
    init_scale: float = 1e-4
    """Entries start uniform in [-init_scale, init_scale] (torch grid; tiny-cuda-nn uses its own 1e-4). The SDF
    starts as the geometric-init sphere either way: the grid's input columns start at zero."""
    implementation: Literal["auto", "tcnn", "torch"] = "auto"
    """``auto``: tiny-cuda-nn when it imports on a CUDA machine, torch otherwise. The two store their
    tables differently: a checkpoint loads only into the implementation that trained it."""


class HashGrid(nn.Module):
    """Features at points of the cube ``[-bound, bound]^3`` (points outside are clamped to its faces).

    Trilinear interpolation of per-level vertex features, so the output is differentiable in the points
    (and its gradient in turn in the table: the eikonal loss's second derivative)."""

    def __init__(self, config: HashGridConfig, bound: float) -> None:
        super().__init__()
        if config.num_levels < 1 or config.features_per_level < 1:
            raise ValueError(
                f"hash grid: num_levels and features_per_level must be >= 1, got {config.num_levels} and "
                f"{config.features_per_level}"
            )
        if not 0 < config.min_res <= config.max_res:
            raise ValueError(
                f"hash grid: need 0 < min_res <= max_res, got min_res {config.min_res}, max_res {config.max_res}"
            )
        if bound <= 0:
            raise ValueError(f"hash grid: the bounding cube's half side must be positive, got {bound}")
        self.config = config
        self.bound = float(bound)
        levels = config.num_levels
        growth = math.exp((math.log(config.max_res) - math.log(config.min_res)) / max(levels - 1, 1))
        self.growth_factor = growth
        self.tcnn_encoding: nn.Module | None = None
        tcnn = _tinycudann() if config.implementation in ("auto", "tcnn") else None
        if config.implementation == "tcnn" and tcnn is None:
            raise ImportError(
                "hash grid: implementation 'tcnn' needs tinycudann importable on a CUDA machine; "
                "use --pipeline.model.sdf-field.hash-grid.implementation auto (torch when it is missing)."
            )
        if tcnn is not None:
            encoding_config = HashEncoding.get_tcnn_encoding_config(
                num_levels=levels,
                features_per_level=config.features_per_level,
                log2_hashmap_size=config.log2_hashmap_size,
                min_res=config.min_res,
                growth_factor=growth,
            )
            self.tcnn_encoding = tcnn.Encoding(n_input_dims=3, encoding_config=encoding_config)
            return

        table_size = 2**config.log2_hashmap_size
        resolutions = [math.floor(config.min_res * growth**level + 1e-6) for level in range(levels)]  # robust floor
        # a level whose vertices all fit its table is indexed densely (no collisions), as tiny-cuda-nn does
        sides = [resolution + 2 for resolution in resolutions]  # vertices per side, with one spare
        sizes = [min(side**3, table_size) for side in sides]
        offsets = [sum(sizes[:level]) for level in range(levels)]
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.float32), persistent=False)
        strides = [[1, side, side * side] for side in sides]  # dense row = x + side * (y + side * z)
        self.register_buffer("strides", torch.tensor(strides, dtype=torch.int64), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("dense", torch.tensor([side**3 <= table_size for side in sides]), persistent=False)
        self.register_buffer("primes", torch.tensor(HASH_PRIMES, dtype=torch.int64), persistent=False)
        self.register_buffer("steps", torch.tensor([0, 1], dtype=torch.int64), persistent=False)
        table = (torch.rand(sum(sizes), config.features_per_level) * 2.0 - 1.0) * config.init_scale
        self.table = nn.Parameter(table)

    def get_out_dim(self) -> int:
        return self.config.num_levels * self.config.features_per_level

    @property
    def implementation(self) -> str:
        return "tcnn" if self.tcnn_encoding is not None else "torch"

    def forward(self, points: Float[Tensor, "n 3"]) -> Float[Tensor, "n out_dim"]:
        unit = (points / (2.0 * self.bound) + 0.5).clamp(0.0, 1.0)
        if self.tcnn_encoding is not None:
            return self.tcnn_encoding(unit.contiguous()).float()
        scaled = unit[:, None, :] * self.resolutions[:, None]  # [n, levels, 3]
        cell = scaled.detach().floor()
        frac = scaled - cell  # differentiable in the points
        # per axis, the cell's two vertex coordinates and their interpolation weights: [n, levels, 3, 2]
        vertex = cell.long()[..., None] + self.steps
        weight = torch.stack([1.0 - frac, frac], dim=-1)
        # the eight corners at once, (x, y, z) -> [n, levels, 2, 2, 2]; rows as tiny-cuda-nn: dense or hashed
        dense = self._corners(vertex * self.strides[:, :, None], torch.add)
        hashed = self._corners(vertex * self.primes[:, None], torch.bitwise_xor)
        level = (slice(None), None, None, None)
        rows = torch.where(self.dense[level], dense, hashed) % self.sizes[level] + self.offsets[level]
        corner_weights = self._corners(weight, torch.mul).flatten(2)  # [n, levels, 8]
        values = self.table[rows.flatten(2)]  # [n, levels, 8, features]
        return (values * corner_weights[..., None]).sum(2).flatten(1)

    @staticmethod
    def _corners(per_axis: Tensor, combine) -> Tensor:
        """``combine(combine(a_x, a_y), a_z)`` over the 2 x 2 x 2 corners, from ``[..., 3, 2]`` per-axis values."""
        x, y, z = per_axis.unbind(-2)
        return combine(combine(x[..., :, None, None], y[..., None, :, None]), z[..., None, None, :])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        mine, other = (
            ("table", "tcnn_encoding.params") if self.tcnn_encoding is None else ("tcnn_encoding.params", "table")
        )
        if prefix + other in state_dict and prefix + mine not in state_dict:
            trained = "tiny-cuda-nn" if other.startswith("tcnn") else "torch"
            where = "on a CUDA machine where tinycudann imports" if trained == "tiny-cuda-nn" else "with the torch grid"
            raise RuntimeError(
                f"This checkpoint's hash grid ({prefix.rstrip('.')}) was trained with the {trained} implementation "
                f"and this process uses {self.implementation}: their tables are laid out differently. Load it "
                f"{where}: set `implementation: {'tcnn' if trained == 'tiny-cuda-nn' else 'torch'}` under "
                "pipeline.model.sdf_field.hash_grid in the run's config.yml (what ns-eval, ns-export and ns-viewer "
                "read), or pass --pipeline.model.sdf-field.hash-grid.implementation to ns-train."
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
