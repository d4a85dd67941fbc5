"""coco-inr trains from nerfstudio's own formats too: sdfstudio-data (DTU as ns-download-data ships it) and
nerfstudio-data (transforms.json, e.g. from ns-process-data / COLMAP). The tiny generated scene is rewritten in
each format, in the normalised frame the README asks users to provide (object inside the unit sphere)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.dataparsers.sdfstudio_dataparser import SDFStudioDataParserConfig

from cocoinr_nerfstudio.field_components.prototypes import CodebookAttentionSettings
from cocoinr_nerfstudio.method_configs import coco_inr


def _normalised_poses(scene) -> np.ndarray:
    """OpenCV camera-to-world matrices in the frame where the object fits the unit sphere."""
    inverse = np.linalg.inv(scene.scale_mat)
    poses = []
    for c2w in scene.c2w_opencv:
        pose = inverse @ c2w
        pose[:3, :3] /= np.linalg.norm(pose[:3, :3], axis=0, keepdims=True)  # drop the scale, keep the rotation
        poses.append(pose)
    return np.stack(poses)


def _copy_images(scene, target: Path) -> list:
    names = []
    (target / "image").mkdir(parents=True)
    for path in sorted((scene.path / "image").iterdir()):
        shutil.copy(path, target / "image" / path.name)
        names.append(f"image/{path.name}")
    return names


def write_sdfstudio(scene, target: Path) -> Path:
    names = _copy_images(scene, target)
    intrinsics = np.eye(4)
    intrinsics[:3, :3] = scene.intrinsics
    frames = [
        {"rgb_path": name, "camtoworld": pose.tolist(), "intrinsics": intrinsics.tolist()}
        for name, pose in zip(names, _normalised_poses(scene), strict=True)
    ]
    meta = {
        "camera_model": "OPENCV",
        "height": scene.height,
        "width": scene.width,
        "has_mono_prior": False,
        "scene_box": {"aabb": [[-1, -1, -1], [1, 1, 1]], "near": 0.05, "far": 6.0, "radius": 1.0},
        "frames": frames,
    }
    (target / "meta_data.json").write_text(json.dumps(meta))
    return target


def write_nerfstudio(scene, target: Path) -> Path:
    names = _copy_images(scene, target)
    poses = _normalised_poses(scene)
    poses[:, :3, 1:3] *= -1  # OpenCV -> OpenGL/nerfstudio camera axes
    k = scene.intrinsics
    transforms = {
        "fl_x": k[0, 0],
        "fl_y": k[1, 1],
        "cx": k[0, 2] + 0.5,  # IDR pixel (0, 0) is at the pixel's centre; nerfstudio's at its corner
        "cy": k[1, 2] + 0.5,
        "w": scene.width,
        "h": scene.height,
        "frames": [{"file_path": n, "transform_matrix": p.tolist()} for n, p in zip(names, poses, strict=True)],
    }
    (target / "transforms.json").write_text(json.dumps(transforms))
    return target


def _train_two_steps(dataparser, tmp_path: Path):
    config = copy.deepcopy(coco_inr.config)
    config.output_dir = tmp_path / "outputs"
    config.vis = "tensorboard"
    config.machine.device_type = "cpu"
    config.pipeline.datamanager.dataparser = dataparser
    config.pipeline.datamanager.train_num_rays_per_batch = 32
    model = config.pipeline.model
    model.codebook_source, model.random_codebook_shape = "random", (32, 16)
    model.codebook_attention = CodebookAttentionSettings(num_latents=8, latent_dim=16, depth=1, ff_mult=2)
    model.sdf_field.geometry_hidden_dims, model.sdf_field.feature_dim = (32, 32), 16
    model.background_field.hidden_dims, model.background_field.feature_dim = (32,), 16
    model.num_samples, model.num_samples_eval, model.num_samples_extra, model.num_samples_outside = 8, 16, 4, 4
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    losses = [float(trainer.train_iteration(step)[0]) for step in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    pipeline = trainer.pipeline
    pipeline.eval()
    camera = pipeline.datamanager.train_dataset.cameras[0:1]
    camera.rescale_output_resolution(0.25)
    outputs = pipeline.model.get_outputs_for_camera(camera)
    assert outputs["rgb"].shape == (12, 16, 3) and torch.isfinite(outputs["rgb"]).all()
    return pipeline


@pytest.mark.slow
def test_trains_from_sdfstudio_data(tiny_scene, tmp_path):
    data = write_sdfstudio(tiny_scene, tmp_path / "sdfstudio")
    pipeline = _train_two_steps(SDFStudioDataParserConfig(data=data, auto_orient=False), tmp_path)
    centres = pipeline.datamanager.train_dataset.cameras.camera_to_worlds[:, :3, 3]
    assert centres.norm(dim=-1).max() < pipeline.model.scene_radius  # cameras inside the bounding sphere


@pytest.mark.slow
def test_trains_from_nerfstudio_data(tiny_scene, tmp_path):
    data = write_nerfstudio(tiny_scene, tmp_path / "nerfstudio")
    pipeline = _train_two_steps(NerfstudioDataParserConfig(data=data, eval_mode="fraction"), tmp_path)
    centres = pipeline.datamanager.train_dataset.cameras.camera_to_worlds[:, :3, 3]
    assert centres.norm(dim=-1).max() < pipeline.model.scene_radius
