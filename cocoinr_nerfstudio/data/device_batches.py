"""Training batches drawn on the training device: pixels, their colours and pinhole rays, with no host round trip.

nerfstudio's training batch reads GPU values back on the host every step. Its ray generation calls
``torch.unique`` on the camera types, writes through boolean masks and copies a small tensor from pageable
memory. Each read-back waits until the GPU has finished the previous step, so the host cannot prepare step
n + 1 while step n runs. :class:`DeviceBatchSampler` keeps the training images on the device and repeats
nerfstudio's arithmetic for undistorted pinhole cameras using only device-side indices. The rays and colours
are those nerfstudio gives for the same pixels. Only the random draws happen on the device, so their stream
differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.pixel_samplers import PixelSampler
from torch import Tensor

_NORM_EPS = float(np.finfo(float).eps * 4.0)
"""nerfstudio's floor on a ray direction's norm (``camera_utils._EPS``)."""


def device_batches_blocker(image_batch: dict[str, Any], cameras: Cameras, sampler: PixelSampler) -> str | None:
    """Why the device path cannot reproduce nerfstudio's batches for this data (None: it can)."""
    if not isinstance(image_batch.get("image"), Tensor):
        return "the training images differ in size (nerfstudio passes them as a list)"
    if image_batch.get("mask") is not None and not sampler.config.ignore_mask:
        return "a sampling mask restricts the pixels (nerfstudio samples those on the host)"
    if sampler.config.is_equirectangular or getattr(sampler.config, "fisheye_crop_radius", None) is not None:
        return "the pixel sampler is set for equirectangular or fisheye images"
    if sampler.config.keep_full_image:
        return "the pixel sampler keeps the full image"
    if (
        type(sampler).collate_image_dataset_batch is not PixelSampler.collate_image_dataset_batch
        or type(sampler).sample is not PixelSampler.sample
    ):
        return f"{type(sampler).__name__} collates pixels its own way"
    if len(cameras.shape) != 1:
        return f"the cameras are batched as {tuple(cameras.shape)}, not as one list"
    if not bool((cameras.camera_type == CameraType.PERSPECTIVE.value).all()):
        return "not every camera is a pinhole (perspective) camera"
    if cameras.distortion_params is not None and bool((cameras.distortion_params != 0).any()):
        return "the cameras have lens distortion"
    if any(value.dtype != torch.float32 for value in (cameras.fx, cameras.fy, cameras.cx, cameras.cy)) or (
        cameras.camera_to_worlds.dtype != torch.float32
    ):
        return "the cameras are not float32 (nerfstudio rounds their rays to float32)"
    if cameras.times is not None or cameras.metadata:
        return "the cameras carry times or metadata"
    return None


def pinhole_rays(cameras: Cameras, indices: Int[Tensor, "n 3"]) -> RayBundle:
    """Rays through pixel centres (``indices`` rows: camera, row, column), as ``RayGenerator`` and
    ``Cameras.generate_rays`` compute them for undistorted perspective cameras, without any host read-back.

    The operations follow nerfstudio's order, so for float32 cameras the results agree bit for bit on the CPU,
    including ``pixel_area`` from the neighbouring pixels' directions and ``metadata["directions_norm"]``.
    """
    camera = indices[:, 0]
    y = indices[:, 1].to(cameras.fx.dtype) + 0.5
    x = indices[:, 2].to(cameras.fx.dtype) + 0.5
    fx, fy = cameras.fx[camera].squeeze(-1), cameras.fy[camera].squeeze(-1)
    cx, cy = cameras.cx[camera].squeeze(-1), cameras.cy[camera].squeeze(-1)
    coord = torch.stack([(x - cx) / fx, (y - cy) / fy], -1)
    coord_x_offset = torch.stack([(x - cx + 1) / fx, (y - cy) / fy], -1)
    coord_y_offset = torch.stack([(x - cx) / fx, (y - cy + 1) / fy], -1)
    coord_stack = torch.stack([coord, coord_x_offset, coord_y_offset], dim=0)
    coord_stack[..., 1] *= -1  # image y points down, camera y up
    directions_stack = torch.cat([coord_stack, torch.full_like(coord_stack[..., :1], -1.0)], dim=-1)
    c2w = cameras.camera_to_worlds[camera]
    directions_stack = torch.sum(directions_stack[..., None, :] * c2w[..., :3, :3], dim=-1)
    norm = torch.linalg.vector_norm(directions_stack, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    directions_stack = directions_stack / norm
    directions = directions_stack[0]
    dx = torch.sqrt(torch.sum((directions - directions_stack[1]) ** 2, dim=-1))
    dy = torch.sqrt(torch.sum((directions - directions_stack[2]) ** 2, dim=-1))
    return RayBundle(
        origins=c2w[..., :3, 3],
        directions=directions,
        pixel_area=(dx * dy)[..., None],
        camera_indices=camera[:, None].long(),
        metadata={"directions_norm": norm[0].detach()},
    )


class DeviceBatchSampler:
    """Draws training batches from images kept on ``device``: nerfstudio's ``PixelSampler.sample`` followed by
    ``RayGenerator``, for one stacked image batch and undistorted pinhole cameras.

    Args:
        image_batch: the collated training images (every cached image: ``image``, ``image_idx`` and per-pixel
            extras such as ``fg_mask``), as the training dataloader returns it.
        cameras: the training cameras (moved to ``device`` here).
        sampler: the configured pixel sampler; its ``sample_method`` (the pixel draw) runs on ``device``, and its
            ``num_rays_per_batch`` sets the batch size.
    """

    def __init__(
        self,
        image_batch: dict[str, Any],
        cameras: Cameras,
        sampler: PixelSampler,
        device: torch.device | str,
    ) -> None:
        blocker = device_batches_blocker(image_batch, cameras, sampler)
        if blocker is not None:
            raise ValueError(f"batches on the device are not possible: {blocker}")
        self.device = torch.device(device)
        self.sampler = sampler
        self.cameras = cameras.to(self.device)
        self.image_idx = image_batch["image_idx"].to(self.device)
        self.per_pixel = {
            key: value.to(self.device)
            for key, value in image_batch.items()
            if key != "image_idx" and isinstance(value, Tensor)
        }
        self.num_images, self.height, self.width = self.per_pixel["image"].shape[:3]

    def sample(self) -> tuple[RayBundle, dict[str, Tensor]]:
        """One batch: the rays and ``{image, indices, ...}`` with nerfstudio's keys, every tensor on the device."""
        indices = self.sampler.sample_method(
            self.sampler.num_rays_per_batch, self.num_images, self.height, self.width, device=self.device
        ).long()
        c, y, x = indices.unbind(-1)
        batch = {key: value[c, y, x] for key, value in self.per_pixel.items()}
        indices = torch.stack([self.image_idx[c], y, x], dim=-1)  # camera indices, as nerfstudio rewrites them
        batch["indices"] = indices
        return pinhole_rays(self.cameras, indices), batch
