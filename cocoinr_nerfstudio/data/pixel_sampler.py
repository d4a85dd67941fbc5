"""Draws every ray of a step from a few images, as the original trains (one image x 1024 pixels)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from nerfstudio.data.pixel_samplers import PixelSampler, PixelSamplerConfig
from torch import Tensor


@dataclass
class PerImagePixelSamplerConfig(PixelSamplerConfig):
    """Pixel sampler drawing a step's rays from ``images_per_batch`` random images."""

    _target: type = field(default_factory=lambda: PerImagePixelSampler)
    images_per_batch: int = 1
    """Images a step's rays come from (the original: 1); -1 = any image per ray (nerfstudio's default)."""


class PerImagePixelSampler(PixelSampler):
    """Uniform pixels within ``images_per_batch`` images chosen uniformly per step.

    Images stay cached in memory, so choosing a new image each step costs nothing (the original
    reloads one, and its worker processes froze the sampled pixels for a whole epoch).
    """

    config: PerImagePixelSamplerConfig

    def sample_method(
        self,
        batch_size: int,
        num_images: int,
        image_height: int,
        image_width: int,
        mask: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> Int[Tensor, "batch_size 3"]:
        per_step = self.config.images_per_batch
        if isinstance(mask, Tensor) and not self.config.ignore_mask:
            return super().sample_method(batch_size, num_images, image_height, image_width, mask, device)
        if per_step < 1 or per_step >= num_images:
            # every ray from any image, nerfstudio's distribution; its own draw scales uniforms by a tensor it
            # builds from host memory each step, a copy that waits for the GPU
            image = torch.randint(0, num_images, (batch_size,), device=device)
        else:
            chosen = torch.randperm(num_images, device=device)[:per_step]
            image = chosen[torch.arange(batch_size, device=device) % per_step]
        y = torch.randint(0, image_height, (batch_size,), device=device)
        x = torch.randint(0, image_width, (batch_size,), device=device)
        return torch.stack([image, y, x], dim=-1)
