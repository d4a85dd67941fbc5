"""What the live viewer asks of the model: a frame of cheap per-ray outputs, rendered without autograd state."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from tiny_models import viewer_camera as camera

VIEWER_OUTPUTS = {"rgb", "accumulation", "depth", "normal", "normals"}


def render_like_the_viewer(model, cam: Cameras) -> dict[str, torch.Tensor]:
    """nerfstudio's RenderStateMachine._render_img: eval mode and no_grad around get_outputs_for_camera."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.get_outputs_for_camera(cam)
    finally:
        if was_training:
            model.train()


def test_a_viewer_frame_is_per_ray_outputs_without_an_autograd_graph(tiny_model):
    tiny_model.train()
    outputs = render_like_the_viewer(tiny_model, camera())
    assert set(outputs) == VIEWER_OUTPUTS  # nothing per sample (weights, eik_grad) is gathered into the frame
    for name, channels in (("rgb", 3), ("accumulation", 1), ("depth", 1), ("normal", 3), ("normals", 3)):
        value = outputs[name]
        assert value.shape == (12, 16, channels), name
        assert not value.requires_grad and value.grad_fn is None, name  # no graph kept alive by the frame
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())  # the normals' autograd call left no gradients
    assert torch.is_grad_enabled()

    normals, hit = outputs["normals"], outputs["accumulation"][..., 0] > 0.9
    assert normals.min() >= 0.0 and normals.max() <= 1.0  # the viewer shows [0, 1] normals as colours
    assert hit.sum() > 20
    # normals come from the SDF gradient (computed with autograd inside the field), so they vary over the sphere
    assert normals[hit].std(dim=0).min() > 0.05
    assert (outputs["depth"][hit] > 1.0).all() and (outputs["depth"][hit] < 2.5).all()  # ray distance to the sphere


def test_a_frame_does_not_depend_on_the_chunk_size(tiny_model):
    """Per-ray sampling: the chunk size is a speed/memory setting only, so any value shows the same picture."""
    tiny_model.config.eval_num_rays_per_chunk = 1024
    whole = render_like_the_viewer(tiny_model, camera(8, 12))
    tiny_model.config.eval_num_rays_per_chunk = 29
    chunked = render_like_the_viewer(tiny_model, camera(8, 12))
    for name in VIEWER_OUTPUTS:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-5, rtol=1e-5)


def test_a_frame_that_runs_out_of_gpu_memory_is_rendered_in_smaller_chunks(tiny_model, monkeypatch, capsys):
    """A chunk too large for the GPU halves the chunk size (down to MIN_RENDER_CHUNK) instead of failing the frame;
    the message names the option, later frames start at the size that fitted, and the config keeps its value."""
    import cocoinr_nerfstudio.models.coco_inr as coco_inr

    monkeypatch.setattr(coco_inr, "MIN_RENDER_CHUNK", 8)
    forward, chunk_sizes = tiny_model.forward, []

    def forward_that_fits_20_rays(ray_bundle):
        chunk_sizes.append(len(ray_bundle))
        if len(ray_bundle) > 20:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(ray_bundle=ray_bundle)

    tiny_model.config.eval_num_rays_per_chunk = 29
    expected = render_like_the_viewer(tiny_model, camera(8, 12))
    tiny_model.config.eval_num_rays_per_chunk = 80
    monkeypatch.setattr(tiny_model, "forward", forward_that_fits_20_rays)
    frame = render_like_the_viewer(tiny_model, camera(8, 12))
    assert chunk_sizes[:3] == [80, 40, 20]  # 80 and 40 fail, 20 fits: 96 rays in chunks of 20
    assert chunk_sizes[2:] == [20, 20, 20, 20, 16]
    for name in VIEWER_OUTPUTS:
        torch.testing.assert_close(frame[name], expected[name], atol=1e-5, rtol=1e-5)
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.count("Rendering ran out of GPU memory") == 2
    assert (
        "at 40 rays per chunk; retrying with 20 (--pipeline.model.eval-num-rays-per-chunk 20 starts there; or lower "
        "--pipeline.model.render-points-per-pass)" in printed
    )
    assert tiny_model.config.eval_num_rays_per_chunk == 80

    chunk_sizes.clear()
    render_like_the_viewer(tiny_model, camera(8, 12))
    assert chunk_sizes == [20, 20, 20, 20, 16] and "out of GPU memory" not in capsys.readouterr().out

    tiny_model.config.eval_num_rays_per_chunk = 12  # a setting below the lowered size wins
    chunk_sizes.clear()
    render_like_the_viewer(tiny_model, camera(8, 12))
    assert chunk_sizes == [12] * 8

    def forward_that_never_fits(ray_bundle):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tiny_model, "forward", forward_that_never_fits)
    with pytest.raises(torch.OutOfMemoryError, match=r"even at 8 rays per chunk \(--pipeline\.model\.eval-num-rays"):
        render_like_the_viewer(tiny_model, camera(8, 12))  # at the smallest chunk the error is the user's to see
    assert tiny_model._render_chunks["eval-num-rays-per-chunk"] == 8
