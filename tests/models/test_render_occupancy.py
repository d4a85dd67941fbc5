"""Whole-image renders with the occupancy grid (render_occupancy_resolution): what they skip, and what they give."""

from contextlib import contextmanager

import pytest
import torch
from nerfstudio.model_components import renderers
from tiny_models import build, tiny_config, viewer_camera

from cocoinr_nerfstudio.models import coco_inr

BETA = 0.005  # a sharp surface, as late in training: the band is thin and most rays miss it


def _model(beta: float = BETA, **overrides):
    model = build(tiny_config(**overrides))
    model.eval()
    with torch.no_grad():
        model.density.beta_param.fill_(beta - model.density.beta_min)
    return model


@contextmanager
def _sampled_rays(model):
    """A list that gets the number of rays of each call of the model's sampler inside the block."""
    rays = []
    generate = model.sampler.generate_ray_samples

    def counted(*args, **kwargs):
        samples, info = generate(*args, **kwargs)
        rays.append(info.num_rounds.numel())
        return samples, info

    model.sampler.generate_ray_samples = counted
    try:
        yield rays
    finally:
        del model.sampler.generate_ray_samples


def _render(model, camera):
    """The frame's outputs and the number of rays that reached the sampler."""
    with _sampled_rays(model) as rays:
        return model.get_outputs_for_camera(camera), sum(rays)


def _skipped(model, camera):
    """The pixels whose rays the model's grid for this image rules out."""
    bundle = model.collider(camera.generate_rays(camera_indices=0))
    grid = model._render_occupancy_grid(len(bundle))
    flat = bundle.flatten()
    hit, _, _ = grid.ray_bounds(flat.origins, flat.directions, flat.nears, flat.fars)
    return ~hit.reshape(bundle.shape)


@pytest.fixture
def full_size_grid(monkeypatch):
    """Small test images would get a coarse grid (its cost follows the image's): let them have the configured one."""
    monkeypatch.setattr(coco_inr, "GRID_COST_SHARE", 1e-3)


def test_rays_that_miss_the_band_skip_the_foreground_and_keep_their_pixels(full_size_grid):
    """At beta 0.005 most of the frame is background. The grid sends only the rays near the sphere to the sampler;
    the others get the background alone, which is what the full render gives them to 1e-4 (its foreground there
    accumulates nothing); outputs keep their names and shapes."""
    camera = viewer_camera(24, 32)
    reference, all_rays = _render(_model(render_occupancy_resolution=0), camera)
    outputs, sampled = _render(_model(render_occupancy_resolution=48), camera)
    assert all_rays == 24 * 32 and 0 < sampled < 0.5 * all_rays
    assert {name: value.shape for name, value in outputs.items()} == {
        name: value.shape for name, value in reference.items()
    }
    skipped = _skipped(_model(render_occupancy_resolution=48), camera)
    assert int(skipped.sum()) == all_rays - sampled
    assert float(outputs["accumulation"][skipped].abs().max()) == 0.0
    assert float(reference["accumulation"][skipped].max()) <= 1e-4
    torch.testing.assert_close(outputs["rgb"][skipped], reference["rgb"][skipped], atol=1e-4, rtol=0)
    fars = _model().collider(camera.generate_rays(camera_indices=0)).fars
    torch.testing.assert_close(outputs["depth"][skipped], fars[skipped], atol=0, rtol=0)  # nothing seen: the far end


def test_the_grid_render_is_as_close_to_a_dense_render_as_the_full_one(full_size_grid):
    """The rays the grid keeps are sampled over less of their length, so the sampler's samples are denser where
    the surface is: against a render with 32 times the samples, the grid's frame errs no more than the full one."""
    camera = viewer_camera(24, 32)
    dense_settings = dict(num_samples_eval=512, num_samples=256, num_samples_extra=0, max_total_iters=8)
    dense, _ = _render(_model(render_occupancy_resolution=0, **dense_settings), camera)
    full, _ = _render(_model(render_occupancy_resolution=0), camera)
    grid, _ = _render(_model(render_occupancy_resolution=48), camera)
    full_error, grid_error = ((outputs["rgb"] - dense["rgb"]).abs() for outputs in (full, grid))
    assert float(grid_error.mean()) <= float(full_error.mean())
    assert float(grid_error.max()) <= float(full_error.max())


def test_small_images_and_exact_renders_go_without_a_grid():
    """An image whose first sampler round would cost less than 8 times a grid of 8 cells a side gets no grid, nor
    does a render with eval_weight_threshold 0 (every sample evaluated): the frame is the full render's, bit for
    bit, and every ray is sampled."""
    camera = viewer_camera(12, 16)  # 192 rays x 16 samples / 8 = 384 < 8^3
    reference, _ = _render(_model(render_occupancy_resolution=0), camera)
    small, sampled = _render(_model(), camera)
    assert sampled == 12 * 16
    for name, value in reference.items():
        torch.testing.assert_close(small[name], value, atol=0, rtol=0)
    _, sampled = _render(_model(eval_weight_threshold=0.0), viewer_camera(48, 64))
    assert sampled == 48 * 64


def test_the_viewers_crop_background_reaches_the_skipped_rays(full_size_grid):
    """The viewer's crop box paints a background colour through RGBRenderer on every ray: skipped rays too."""
    camera = viewer_camera(24, 32)
    colour = torch.tensor([0.0, 1.0, 0.0])
    with renderers.background_color_override_context(colour):
        reference, _ = _render(_model(render_occupancy_resolution=0), camera)
        outputs, _ = _render(_model(render_occupancy_resolution=48), camera)
    skipped = _skipped(_model(render_occupancy_resolution=48), camera)
    assert bool(skipped.any())
    torch.testing.assert_close(outputs["rgb"][skipped], reference["rgb"][skipped], atol=1e-4, rtol=0)


def test_the_grid_lives_for_one_image_and_training_never_sees_it(full_size_grid):
    """After a render nothing of its grid remains; and even with a grid in place, a training step samples every
    ray (the grid is for whole-image renders only)."""
    model = _model(render_occupancy_resolution=48)
    camera = viewer_camera(24, 32)
    _, sampled = _render(model, camera)
    assert sampled < 24 * 32
    assert getattr(model._frame_grid, "grid", None) is None
    model._frame_grid.grid = model._render_occupancy_grid(24 * 32)  # as if a render were under way in this thread
    model.train()
    with _sampled_rays(model) as rays:
        outputs = model(camera.generate_rays(camera_indices=0).flatten())
    assert rays == [24 * 32] and "eik_grad" in outputs


@pytest.mark.parametrize("resolution", [-1, 1, 7])
def test_a_grid_resolution_that_cannot_work_is_refused(resolution):
    with pytest.raises(ValueError, match=r"render-occupancy-resolution must be 0 \(off\) or at least 8"):
        build(tiny_config(render_occupancy_resolution=resolution))


@pytest.mark.parametrize("background", ["nerf++", "none"])
def test_rays_that_miss_the_bounding_sphere_render_as_before(full_size_grid, background):
    """From outside the bounding sphere the frame's corners miss it (the collider gives them no length): with the
    grid they are skipped, and their pixels are the full render's."""
    c2w = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 5.0]]])
    camera = viewer_camera(24, 32)
    camera.camera_to_worlds = c2w
    reference, _ = _render(_model(render_occupancy_resolution=0, background_model=background), camera)
    outputs, _ = _render(_model(render_occupancy_resolution=48, background_model=background), camera)
    misses = _model().collider(camera.generate_rays(camera_indices=0)).fars[..., 0] <= 0
    assert bool(misses.any())
    for name in ("rgb", "accumulation"):
        torch.testing.assert_close(outputs[name][misses], reference[name][misses], atol=1e-6, rtol=0)


def test_a_grid_that_runs_out_of_memory_leaves_the_image_to_the_full_render(full_size_grid, monkeypatch, capsys):
    """Out of GPU memory while building the grid: one message naming the option, and the image rendered in full."""
    from cocoinr_nerfstudio.model_components.occupancy_grid import OccupancyGrid
    from cocoinr_nerfstudio.torch_compat import OutOfMemoryError

    def fail(*args, **kwargs):
        raise OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(OccupancyGrid, "from_sdf", fail)
    camera = viewer_camera(24, 32)
    reference, _ = _render(_model(render_occupancy_resolution=0), camera)
    outputs, sampled = _render(_model(render_occupancy_resolution=48), camera)
    assert sampled == 24 * 32
    torch.testing.assert_close(outputs["rgb"], reference["rgb"], atol=0, rtol=0)
    assert "render-occupancy-resolution" in capsys.readouterr().out
