"""Training batches drawn on the device: nerfstudio's rays and colours for the same pixels, no host read-back."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.model_components.ray_generators import RayGenerator

from cocoinr_nerfstudio.data.datamanager import CocoDataManager, CocoDataManagerConfig
from cocoinr_nerfstudio.data.device_batches import DeviceBatchSampler, device_batches_blocker, pinhole_rays
from cocoinr_nerfstudio.data.idr_dataparser import IDRDataParserConfig
from cocoinr_nerfstudio.data.pixel_sampler import PerImagePixelSamplerConfig
from cocoinr_nerfstudio.data.scene_generator import SceneInfo

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create", "ignore:Using a non-tuple sequence")


def _cameras(num: int = 3, height: int = 6, width: int = 8) -> Cameras:
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(num, 3, 3, generator=generator))
    c2w = torch.cat([rotation, torch.randn(num, 3, 1, generator=generator)], dim=-1)
    return Cameras(
        camera_to_worlds=c2w,
        fx=torch.tensor([[5.0], [7.5], [6.25]])[:num],
        fy=torch.tensor([[5.5], [7.0], [6.0]])[:num],
        cx=torch.tensor([[4.0], [3.7], [4.2]])[:num],
        cy=torch.tensor([[3.0], [2.9], [3.1]])[:num],
        width=width,
        height=height,
        camera_type=CameraType.PERSPECTIVE,
    )


def _indices(num_rays: int, num_cameras: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            torch.randint(0, num_cameras, (num_rays,), generator=generator),
            torch.randint(0, height, (num_rays,), generator=generator),
            torch.randint(0, width, (num_rays,), generator=generator),
        ],
        dim=-1,
    )


def _assert_same_rays(ours, theirs) -> None:
    for name in ("origins", "directions", "pixel_area", "camera_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.metadata.keys() == theirs.metadata.keys() == {"directions_norm"}
    assert torch.equal(ours.metadata["directions_norm"], theirs.metadata["directions_norm"])
    assert ours.times is None and theirs.times is None and ours.nears is None and theirs.fars is None


def test_pinhole_rays_are_nerfstudios_rays_bit_for_bit():
    cameras = _cameras()
    indices = _indices(500, 3, 6, 8)
    _assert_same_rays(pinhole_rays(cameras, indices), RayGenerator(cameras)(indices))


def test_pinhole_ray_through_the_principal_point_is_the_camera_axis():
    """A known projection: with cx, cy on a pixel centre, that pixel's ray is the camera's -z axis, and its
    pixel area is the product of the chords to its neighbours' directions, at angles atan(1 / fx) and atan(1 / fy)."""
    c2w = torch.eye(4)[:3][None]
    cameras = Cameras(camera_to_worlds=c2w, fx=100.0, fy=50.0, cx=10.5, cy=4.5, width=20, height=10)
    rays = pinhole_rays(cameras, torch.tensor([[0, 4, 10], [0, 4, 11]]))
    torch.testing.assert_close(rays.directions[0], torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(
        rays.directions[1], torch.nn.functional.normalize(torch.tensor([0.01, 0.0, -1.0]), dim=0)
    )
    chord_x, chord_y = (2 * math.sin(math.atan(1 / focal) / 2) for focal in (100.0, 50.0))
    torch.testing.assert_close(rays.pixel_area[0], torch.tensor([chord_x * chord_y]), rtol=1e-5, atol=0)
    assert torch.equal(rays.origins, torch.zeros(2, 3)) and rays.metadata["directions_norm"][0].item() == 1.0


def _manager(scene: SceneInfo, **overrides) -> CocoDataManager:
    config = CocoDataManagerConfig(
        dataparser=IDRDataParserConfig(data=scene.path, num_views=3),
        train_num_rays_per_batch=256,
        pixel_sampler=PerImagePixelSamplerConfig(images_per_batch=1),
        **overrides,
    )
    return config.setup(device="cpu")


def test_device_batches_match_nerfstudios_batches_for_the_same_pixels(tiny_scene: SceneInfo, monkeypatch):
    manager = _manager(tiny_scene)
    assert manager.device_batches is None  # on a CPU the host path is kept
    sampler = manager.train_pixel_sampler
    draws = _indices(256, 3, 48, 64, seed=3)
    monkeypatch.setattr(sampler, "sample_method", lambda *args, **kwargs: draws.clone())
    host_rays, host_batch = manager.next_train(0)
    assert manager.use_device_batches() is None and manager.device_batches is not None
    rays, batch = manager.next_train(1)
    assert manager.train_count == 2
    assert batch.keys() == host_batch.keys() == {"image", "fg_mask", "indices"}
    for key in batch:
        assert torch.equal(batch[key], host_batch[key]), key
    _assert_same_rays(rays, host_rays)


def test_the_pixel_draw_follows_the_samplers_batch_size(tiny_scene: SceneInfo):
    manager = _manager(tiny_scene)
    assert manager.use_device_batches() is None
    torch.manual_seed(0)
    rays, batch = manager.next_train(0)
    assert rays.shape == (256,) and batch["image"].shape == (256, 3)
    assert batch["indices"][:, 0].unique().numel() == 1  # one image per step, as the original trains
    manager.train_pixel_sampler.set_num_rays_per_batch(128)
    assert manager.next_train(1)[0].shape == (128,)


def test_an_unsupported_setup_is_named_and_keeps_the_host_path(tiny_scene: SceneInfo):
    manager = _manager(tiny_scene, train_num_images_to_sample_from=2)
    assert "--pipeline.datamanager.train-num-images-to-sample-from" in manager.use_device_batches()
    assert manager.device_batches is None
    assert manager.next_train(0)[0].shape == (256,)
    assert _manager(tiny_scene, train_num_images_to_sample_from=3).use_device_batches() is None  # all 3 cached


def test_a_config_saved_before_the_option_still_sets_up_for_evaluation(tiny_scene: SceneInfo):
    """ns-eval puts the registered datamanager's target into the run's saved (older) config."""
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig

    config = VanillaDataManagerConfig(
        _target=CocoDataManager, dataparser=IDRDataParserConfig(data=tiny_scene.path, num_views=3)
    )
    manager = config.setup(device="cpu", test_mode="test")
    assert manager.device_batches is None and manager.next_eval(0)[0].shape == (1024,)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c, b, s: setattr(c, "distortion_params", torch.full((3, 6), 0.1)), "lens distortion"),
        (lambda c, b, s: c.camera_type.fill_(CameraType.FISHEYE.value), "pinhole"),
        (lambda c, b, s: b.__setitem__("mask", torch.ones(3, 6, 8, 1, dtype=torch.bool)), "sampling mask"),
        (lambda c, b, s: b.__setitem__("image", list(b["image"])), "differ in size"),
        (lambda c, b, s: setattr(s.config, "keep_full_image", True), "full image"),
        (lambda c, b, s: setattr(c, "fx", c.fx.double()), "float32"),
        (lambda c, b, s: setattr(s, "__class__", type("OwnSample", (type(s),), {"sample": lambda self, b: b})), "own"),
    ],
)
def test_the_blocker_names_what_nerfstudio_would_do_differently(change, expected):
    from nerfstudio.data.pixel_samplers import PixelSamplerConfig

    cameras = _cameras()
    batch = {"image": torch.rand(3, 6, 8, 3), "image_idx": torch.arange(3)}
    sampler = PixelSamplerConfig(num_rays_per_batch=16).setup()
    assert device_batches_blocker(batch, cameras, sampler) is None
    change(cameras, batch, sampler)
    assert expected in device_batches_blocker(batch, cameras, sampler)
    with pytest.raises(ValueError, match=expected):
        DeviceBatchSampler(batch, cameras, sampler, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host read-backs only exist with a GPU")
@pytest.mark.parametrize("images_per_batch", [1, -1])  # -1: any image per ray, where nerfstudio's draw copies in
def test_a_device_batch_never_reads_back_to_the_host(tiny_scene: SceneInfo, images_per_batch: int):
    config = CocoDataManagerConfig(
        dataparser=IDRDataParserConfig(data=tiny_scene.path, num_views=3),
        train_num_rays_per_batch=256,
        pixel_sampler=PerImagePixelSamplerConfig(images_per_batch=images_per_batch),
    )
    manager = config.setup(device="cuda")
    assert manager.device_batches is not None
    manager.next_train(0)  # first call: lazy CUDA set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rays, batch = manager.next_train(1)
        copy.copy(rays)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rays.origins.is_cuda and batch["image"].is_cuda and batch["indices"].is_cuda
