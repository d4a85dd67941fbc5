"""nerfstudio's VanillaPipeline, with image-metric averages that skip undefined values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE


def average_defined(
    averages: dict[str, float], per_image: list[dict[str, Any]], get_std: bool
) -> tuple[dict[str, float], dict[str, int]]:
    """Recomputes every NaN average over the images where the metric is defined.

    A metric can be undefined for some images (``psnr_masked`` of a view whose mask is empty): nerfstudio's mean
    is then NaN for the whole set. Returns the corrected averages and, per corrected metric, how many images
    were left out. A metric undefined everywhere stays NaN.
    """
    fixed, skipped = dict(averages), {}
    for key, value in averages.items():
        if key.endswith("_std") or not math.isnan(value):
            continue
        values = [float(m[key]) for m in per_image if key in m and not math.isnan(float(m[key]))]
        if not values or len(values) == len(per_image):
            continue  # undefined everywhere, or NaN for another reason: leave nerfstudio's answer
        std, mean = torch.std_mean(torch.tensor(values, dtype=torch.float64))
        fixed[key] = float(mean)
        if get_std:
            fixed[f"{key}_std"] = float(std)  # NaN for a single value, as torch.std_mean gives
        skipped[key] = len(per_image) - len(values)
    return fixed, skipped


@dataclass
class CocoPipelineConfig(VanillaPipelineConfig):
    """VanillaPipelineConfig whose pipeline averages image metrics over the images where they are defined."""

    _target: type = field(default_factory=lambda: CocoPipeline)


class CocoPipeline(VanillaPipeline):
    """VanillaPipeline whose evaluation averages (ns-eval, the trainer's all-images evaluation) skip undefined
    per-image values instead of turning NaN, and say how many images a metric was undefined on."""

    def get_average_image_metrics(
        self,
        data_loader,
        image_prefix: str,
        step: int | None = None,
        output_path: Path | None = None,
        get_std: bool = False,
    ):
        model = self.model
        model.image_metrics_log = []
        try:
            averages = super().get_average_image_metrics(data_loader, image_prefix, step, output_path, get_std)
            averages, skipped = average_defined(averages, model.image_metrics_log, get_std)
        finally:
            model.image_metrics_log = None
        for key, count in skipped.items():
            CONSOLE.print(
                f"[bold yellow]{key}: undefined on {count} image(s) (e.g. an empty mask), averaged over the rest."
            )
        return averages
