"""InputDataset that adds foreground masks as ``batch["fg_mask"]`` and resizes in memory.

Masks come from ``metadata["fg_mask_filenames"]`` (set by the IDR dataparser), not from
nerfstudio's ``mask_filenames``, which would make the pixel sampler draw rays only inside the
object. Images and masks are resized to the size of their (already downscaled) camera, so the
dataparser's ``downscale_factor`` and the datamanager's ``camera_res_scale_factor`` both work
without writing files. Works with any dataparser: without ``fg_mask_filenames`` it is a plain
InputDataset (RGB images, resized to their cameras if needed).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.datasets.base_dataset import InputDataset
from PIL import Image


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Area-average when shrinking (exact block means for integer factors), bilinear when enlarging."""
    if image.size == size:
        return image
    shrink = size[0] < image.size[0]
    return image.resize(size, resample=Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)


class IDRDataset(InputDataset):
    """Images plus ``fg_mask`` [H, W, 1] float in {0, 1} when the dataparser found masks."""

    def __init__(self, dataparser_outputs: DataparserOutputs, scale_factor: float = 1.0):
        super().__init__(dataparser_outputs, scale_factor)
        # An instance list: nerfstudio's datamanager edits this list in place.
        self.exclude_batch_keys_from_device = [*InputDataset.exclude_batch_keys_from_device, "fg_mask"]
        self.fg_mask_filenames = self.metadata.get("fg_mask_filenames")

    def _size(self, image_idx: int) -> tuple[int, int]:
        return int(self.cameras.width[image_idx]), int(self.cameras.height[image_idx])

    def get_numpy_image(self, image_idx: int) -> npt.NDArray[np.uint8]:
        with Image.open(self._dataparser_outputs.image_filenames[image_idx]) as pil_image:
            keep_alpha = pil_image.mode == "RGBA" and self._dataparser_outputs.alpha_color is not None
            pil_image = pil_image.convert("RGBA" if keep_alpha else "RGB")
        return np.asarray(_resize(pil_image, self._size(image_idx)), dtype=np.uint8)

    def get_metadata(self, data: dict) -> dict:
        if self.fg_mask_filenames is None:
            return {}
        image_idx = data["image_idx"]
        with Image.open(self.fg_mask_filenames[image_idx]) as pil_mask:
            grey = np.asarray(pil_mask.convert("L"))
        if grey.max() <= 1:  # masks stored as 0/1 instead of 0/255
            grey = grey * np.uint8(255)
        mask = np.asarray(_resize(Image.fromarray(grey), self._size(image_idx))) > 127
        return {"fg_mask": torch.from_numpy(mask.astype(np.float32))[..., None]}
