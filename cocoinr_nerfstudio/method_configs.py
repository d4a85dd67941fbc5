"""nerfstudio method registrations: ``coco-inr``, its measured fastest recipe ``coco-inr-fast``, and the prior-free
baseline ``volsdf``.

Imported by every ``ns-*`` command through the ``nerfstudio.method_configs`` entry point: only
configuration lives here, and nothing optional (tinycudann, open3d) is imported.
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.plugins.types import MethodSpecification

from cocoinr_nerfstudio.data.datamanager import CocoDataManagerConfig
from cocoinr_nerfstudio.data.idr_dataparser import IDRDataParserConfig
from cocoinr_nerfstudio.data.pixel_sampler import PerImagePixelSamplerConfig
from cocoinr_nerfstudio.engine.optimizers import FusedAdamOptimizerConfig
from cocoinr_nerfstudio.engine.schedulers import ExponentialDecayToSchedulerConfig
from cocoinr_nerfstudio.engine.trainer import CocoTrainerConfig
from cocoinr_nerfstudio.fields.background_field import CocoBackgroundFieldConfig
from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig
from cocoinr_nerfstudio.models.coco_inr import CocoInrModelConfig
from cocoinr_nerfstudio.pipelines.coco_pipeline import CocoPipelineConfig

MAX_STEPS = 200_000
LEARNING_RATE = 5e-4
HASH_GRID_LEARNING_RATE = 5e-3
RAYS_PER_STEP = 1024


def _optimizers() -> dict:
    """Adam 5e-4 decaying exponentially to 0.1x over the run (200k steps by default), for both networks; the
    optional hash grid (``--pipeline.model.sdf-field.use-hash-grid True``) at 10x that rate, as grid methods do."""
    group = {
        "optimizer": FusedAdamOptimizerConfig(lr=LEARNING_RATE, eps=1e-8),
        "scheduler": ExponentialDecayToSchedulerConfig(final_ratio=0.1),  # over the whole run
    }
    grid = {
        "optimizer": FusedAdamOptimizerConfig(lr=HASH_GRID_LEARNING_RATE, eps=1e-15),
        "scheduler": ExponentialDecayToSchedulerConfig(final_ratio=0.1),
    }
    return {"fields": dict(group), "field_background": dict(group), "hash_grid": grid}


def _trainer(method_name: str, model: CocoInrModelConfig) -> CocoTrainerConfig:
    return CocoTrainerConfig(
        method_name=method_name,
        steps_per_eval_image=5000,
        steps_per_eval_batch=5000,
        steps_per_save=5000,
        steps_per_eval_all_images=1_000_000,  # ns-eval does the full held-out pass
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,
        pipeline=CocoPipelineConfig(
            datamanager=CocoDataManagerConfig(
                dataparser=IDRDataParserConfig(),
                train_num_rays_per_batch=RAYS_PER_STEP,
                eval_num_rays_per_batch=RAYS_PER_STEP,
                pixel_sampler=PerImagePixelSamplerConfig(images_per_batch=1),
            ),
            model=model,
        ),
        optimizers=_optimizers(),
        viewer=ViewerConfig(),
        vis="viewer",
    )


coco_inr = MethodSpecification(
    config=_trainer("coco-inr", CocoInrModelConfig()),
    description="CoCo-INR (NeurIPS 2022): VolSDF surface with a VQGAN codebook prior, for few-view reconstruction.",
)


def fast_recipe(model: CocoInrModelConfig) -> CocoInrModelConfig:
    """The fastest measured recipe that cuts no ray (docs/benchmarks.md, config
    ``graph+fields+bf16+sdpa+points+flash+fp16+geo16+split``), set on ``model`` and returned. Same method and
    hyperparameters; what changes is arithmetic (TF32 products; bf16 in the colour heads; float16 in the geometry
    head's training passes, with a loss scale, and where only samples are placed, while its SDF error is small
    against beta; fused attention where nothing is differentiated or, in the bf16 heads, differentiated once; the
    point-attention kernels where the SDF's second derivative runs through it) and scheduling (one CUDA graph a
    step, compiled fields and sampler rounds, layer norms' backward passes as row and column kernels, later
    sampler rounds only on the rays that need them). Off a single GPU the CUDA graph falls back to eager training
    with a message; the other options still apply there (compilation included) but do not pay on a CPU."""
    model.tf32_matmul = True
    model.cuda_graph = True
    model.compile_sampler = True
    model.static_refine_budget = "auto"
    model.compile_fields = True
    model.mix_order_reduction = False
    model.sampler_autocast = "float16"
    model.bf16_color_heads = True
    model.geometry_autocast = "float16"
    model.sdf_field.coordinate_attention.fused_without_grad = True
    model.background_field.coordinate_attention.fused_without_grad = True
    model.sdf_field.coordinate_attention.point_kernels = True
    model.background_field.coordinate_attention.point_kernels = True
    model.sdf_field.coordinate_attention.flash_first_order = True
    model.background_field.coordinate_attention.flash_first_order = True
    return model


coco_inr_fast = MethodSpecification(
    config=_trainer("coco-inr-fast", fast_recipe(CocoInrModelConfig())),
    description="CoCo-INR with the fastest measured recipe (compiled fields, CUDA graph, half precision where safe).",
)

volsdf = MethodSpecification(
    config=_trainer(
        "volsdf",
        CocoInrModelConfig(
            use_codebook_prior=False,
            # VolSDF's published network sizes, with the same sampler and NeRF++ background as coco-inr
            sdf_field=CocoFieldConfig(
                use_coordinate_attention=False,
                geometry_hidden_dims=(256,) * 8,
                geometry_skip_in=(4,),
                color_hidden_dims=(256,) * 4,
                color_weight_norm=True,
            ),
            background_field=CocoBackgroundFieldConfig(use_coordinate_attention=False),
        ),
    ),
    description="VolSDF baseline: coco-inr's backbone with the codebook prior and attention heads off.",
)
