"""Held-out image metrics that never touch the network: LPIPS only when its weights are on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor


def batch_psnr(pred: Float[Tensor, "*batch 3"], target: Float[Tensor, "*batch 3"]) -> Tensor:
    """PSNR of colours in [0, 1], as a device tensor. torchmetrics' PSNR builds its pixel count with
    ``torch.tensor(n, device=...)``, a copy from host memory that waits for the GPU, once per training step."""
    mse = torch.mean((pred - target) ** 2)
    return -10.0 * torch.log10(mse)


def masked_psnr(
    pred: Float[Tensor, "h w 3"], target: Float[Tensor, "h w 3"], mask: Float[Tensor, "h w 1"]
) -> float | None:
    """PSNR over the object's pixels only (mean squared error over masked pixels and channels)."""
    weight = (mask > 0.5).to(pred.dtype).expand_as(pred)
    count = weight.sum()
    if count == 0:
        return None
    mse = ((pred - target) ** 2 * weight).sum() / count
    return float(-10.0 * torch.log10(mse.clamp(min=1e-10)))


def _alexnet_weights_file() -> Path:
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name


class OptionalLPIPS:
    """torchmetrics LPIPS (AlexNet) when its backbone is already cached; otherwise skipped, warned once.

    nerfstudio's SurfaceModel constructs LPIPS eagerly, which downloads AlexNet and fails offline.
    Inputs are [0, 1] images, so ``normalize=True`` (torchmetrics expects [-1, 1] otherwise).
    """

    def __init__(self) -> None:
        self._metric = None
        self._unavailable = False

    def __call__(self, pred: Float[Tensor, "1 3 h w"], target: Float[Tensor, "1 3 h w"]) -> float | None:
        if self._unavailable:
            return None
        if self._metric is None:
            weights = _alexnet_weights_file()
            if not weights.is_file():
                self._unavailable = True
                CONSOLE.print(
                    f"[bold yellow]LPIPS skipped: AlexNet weights not found at {weights} (nothing is downloaded)."
                )
                return None
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self._metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
        metric = self._metric.to(pred.device)
        return float(metric(pred.clamp(0, 1), target.clamp(0, 1)))
