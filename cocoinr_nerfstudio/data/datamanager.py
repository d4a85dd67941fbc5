"""nerfstudio's VanillaDataManager for IDR scenes, with training batches drawn on the GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from cocoinr_nerfstudio.data.device_batches import DeviceBatchSampler, device_batches_blocker
from cocoinr_nerfstudio.data.idr_dataset import IDRDataset


@dataclass
class CocoDataManagerConfig(VanillaDataManagerConfig):
    """VanillaDataManagerConfig whose training batches can be drawn on the GPU."""

    _target: type = field(default_factory=lambda: CocoDataManager)
    batches_on_device: bool = True
    """On CUDA, draw each training batch (pixels, colours, rays) on the GPU from training images kept there. The
    host then does not wait for the GPU between steps and prepares the next step while the current one runs
    (nerfstudio's own pixel draws, used where the per-image sampler draws from every image, still copy a
    three-number shape from host memory each step). Costs the training images' and masks' size in GPU memory
    (float32). Used only where it gives nerfstudio's rays (every image cached, undistorted float32 pinhole cameras,
    nerfstudio's pixel collation); otherwise it says why and uses nerfstudio's path."""


class CocoDataManager(VanillaDataManager[IDRDataset]):
    """VanillaDataManager (same datasets, dataloaders and evaluation batches); ``next_train`` comes from a
    :class:`DeviceBatchSampler` when ``batches_on_device`` applies."""

    config: CocoDataManagerConfig
    device_batches: DeviceBatchSampler | None = None

    def setup_train(self) -> None:
        super().setup_train()
        self.device_batches = None
        # configs saved before this option lack it (ns-eval swaps in this class's target); evaluation (test_mode
        # "test") never draws training batches, so it keeps its GPU memory
        wanted = getattr(self.config, "batches_on_device", False) and self.test_mode == "val"
        if wanted and str(self.device).startswith("cuda"):
            reason = self.use_device_batches()
            if reason is not None:
                CONSOLE.print(
                    f"[bold yellow]--pipeline.datamanager.batches-on-device: not used because {reason}; "
                    "training batches are drawn on the host."
                )

    def use_device_batches(self) -> str | None:
        """Switches ``next_train`` to batches drawn on ``self.device``; returns why it cannot (None: switched)."""
        if not self.train_image_dataloader.cache_all_images:
            return "--pipeline.datamanager.train-num-images-to-sample-from keeps only some images in memory"
        assert self.train_pixel_sampler is not None and self.train_dataset is not None
        image_batch = next(self.iter_train_image_dataloader)  # every training image: the cached collated batch
        cameras = self.train_dataset.cameras
        reason = device_batches_blocker(image_batch, cameras, self.train_pixel_sampler)
        if reason is None:
            self.device_batches = DeviceBatchSampler(image_batch, cameras, self.train_pixel_sampler, self.device)
        return reason

    def next_train(self, step: int):
        if self.device_batches is None:
            return super().next_train(step)
        self.train_count += 1
        return self.device_batches.sample()
