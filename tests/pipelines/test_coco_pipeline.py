"""Held-out metric averages skip images where a metric is undefined (psnr_masked of an empty mask)."""

from __future__ import annotations

import math

import pytest

from cocoinr_nerfstudio.method_configs import coco_inr, volsdf
from cocoinr_nerfstudio.pipelines.coco_pipeline import CocoPipeline, average_defined

NAN = float("nan")


def test_nan_averages_are_recomputed_over_the_defined_images():
    per_image = [
        {"psnr": 20.0, "psnr_masked": 18.0},
        {"psnr": 22.0, "psnr_masked": NAN},
        {"psnr": 24.0, "psnr_masked": 22.0},
    ]
    nerfstudio = {"psnr": 22.0, "psnr_std": 2.0, "psnr_masked": NAN, "psnr_masked_std": NAN}
    fixed, skipped = average_defined(nerfstudio, per_image, get_std=True)
    assert fixed["psnr"] == 22.0 and fixed["psnr_std"] == 2.0  # defined everywhere: untouched
    assert fixed["psnr_masked"] == pytest.approx(20.0)
    assert fixed["psnr_masked_std"] == pytest.approx(math.sqrt(8.0))  # unbiased, as torch.std_mean
    assert skipped == {"psnr_masked": 1}


def test_a_metric_undefined_everywhere_stays_nan():
    per_image = [{"psnr_masked": NAN}, {"psnr_masked": NAN}]
    fixed, skipped = average_defined({"psnr_masked": NAN}, per_image, get_std=False)
    assert math.isnan(fixed["psnr_masked"]) and skipped == {}


def test_the_methods_use_the_pipeline():
    for method in (coco_inr, volsdf):
        assert method.config.pipeline._target is CocoPipeline
