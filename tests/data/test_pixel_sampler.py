"""PerImagePixelSampler: a step's rays come from ``images_per_batch`` images, uniformly within them."""

from __future__ import annotations

import pytest
import torch

from cocoinr_nerfstudio.data.pixel_sampler import PerImagePixelSamplerConfig


def draw(images_per_batch: int, num_images: int = 5, batch_size: int = 3000, mask=None, seed: int = 0):
    torch.manual_seed(seed)
    sampler = PerImagePixelSamplerConfig(images_per_batch=images_per_batch, num_rays_per_batch=batch_size).setup()
    return sampler.sample_method(batch_size, num_images, 6, 8, mask=mask)


@pytest.mark.parametrize("images_per_batch", [1, 2, 4])
def test_a_step_draws_from_exactly_that_many_images_in_equal_shares(images_per_batch):
    indices = draw(images_per_batch)
    assert indices.shape == (3000, 3) and indices.dtype == torch.long
    images, counts = indices[:, 0].unique(return_counts=True)
    assert len(images) == images_per_batch
    assert counts.max() - counts.min() <= 1  # round-robin over the chosen images
    assert indices[:, 1].min() == 0 and indices[:, 1].max() == 5 and indices[:, 2].min() == 0
    assert indices[:, 2].max() == 7


def test_the_chosen_images_change_between_steps():
    chosen = {tuple(draw(1, seed=seed)[:, 0].unique().tolist()) for seed in range(20)}
    assert len(chosen) == 5  # every image gets its turn


@pytest.mark.parametrize("images_per_batch", [-1, 5, 9])
def test_any_image_per_ray_when_asked_or_when_there_are_too_few_images(images_per_batch):
    """-1, or at least as many images as exist: every ray from any image (nerfstudio's distribution), drawn
    without the host-memory tensor nerfstudio's own draw builds each step."""
    indices = draw(images_per_batch, batch_size=20000)
    images, counts = indices[:, 0].unique(return_counts=True)
    assert images.tolist() == [0, 1, 2, 3, 4]
    assert (counts - 4000).abs().max() < 300  # uniform: 4000 each, binomial sd ~57
    pixels = indices[:, 1] * 8 + indices[:, 2]
    assert pixels.unique().numel() == 48 and pixels.bincount().min() > 300  # every pixel, ~417 each


def test_any_image_per_ray_does_not_build_tensors_from_host_memory(monkeypatch):
    built = []
    real_tensor = torch.tensor

    def recording_tensor(*args, **kwargs):
        built.append(args)
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", recording_tensor)
    draw(-1)
    assert built == []


def test_a_sampling_mask_keeps_nerfstudios_masked_draw():
    mask = torch.zeros(5, 6, 8, 1, dtype=torch.bool)
    mask[2, :, 4:] = True
    mask[3, 0, 0] = True
    indices = draw(1, batch_size=20, mask=mask)
    assert mask[indices[:, 0], indices[:, 1], indices[:, 2]].all()  # only masked pixels, from any image
