"""The coco-inr model: architecture, prototype caching, outputs, losses, checkpoints."""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from tiny_models import SCENE_BOX, build, tiny_config
from torchmetrics.image import PeakSignalNoiseRatio

from cocoinr_nerfstudio.codebook import CodebookError
from cocoinr_nerfstudio.engine.trainer import resolve_decay_lengths
from cocoinr_nerfstudio.field_components.attention import CodebookAttention
from cocoinr_nerfstudio.fields.coco_field import CocoFieldConfig
from cocoinr_nerfstudio.method_configs import coco_inr, coco_inr_fast, volsdf
from cocoinr_nerfstudio.models.coco_inr import CocoInrModel, CocoInrModelConfig


def rays(num: int = 32, seed: int = 0) -> RayBundle:
    generator = torch.Generator().manual_seed(seed)
    origins = torch.tensor([[0.0, 0.0, 2.5]]).expand(num, 3).contiguous()
    directions = torch.nn.functional.normalize(
        torch.tensor([0.0, 0.0, -1.0]) + 0.3 * (torch.rand(num, 3, generator=generator) - 0.5), dim=-1
    )
    return RayBundle(
        origins=origins,
        directions=directions,
        pixel_area=torch.ones(num, 1),
        camera_indices=torch.zeros(num, 1, dtype=torch.long),
    )


def count_codebook_attention_calls(model: CocoInrModel) -> list:
    calls = []
    for module in model.modules():
        if isinstance(module, CodebookAttention):
            module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_default_architecture_matches_the_original_layout():
    """6,159,741 parameters in the original, of which 312,101 are its four unused cross-attention modules."""
    model = build(CocoInrModelConfig(codebook_source="random", random_codebook_shape=(8, 256)))
    assert sum(p.numel() for p in model.parameters()) == 6_159_741 - 312_101
    assert sum(p.numel() for p in model.prior.parameters()) == 4 * 1_121_792
    assert model.field.sdf_mlp.layers[0].direction.shape == (256, 78)  # [enc(x), attended] = 2 x 39
    assert model.field.color_attention.blocks[0].norm.normalized_shape == (289,)  # x, dir(27), grad, feature
    assert model.field_background.density_mlp.layers[0].in_features == 168  # 2 x 84


def test_volsdf_baseline_has_no_prior_and_no_attention():
    model = build(volsdf.config.pipeline.model)
    assert model.prior is None
    assert not any("attention" in name for name, _ in model.named_parameters())
    assert model.field.sdf_mlp.skip_in == (4,) and len(model.field.sdf_mlp.layers) == 9


def test_missing_codebook_stops_training_before_any_work(tmp_path):
    trainer_context = {"grad_scaler": torch.amp.GradScaler("cpu", enabled=False)}  # what nerfstudio's Trainer passes
    with pytest.raises(CodebookError, match="does not exist"):
        CocoInrModelConfig(codebook_path=tmp_path / "absent.ckpt").setup(
            scene_box=SCENE_BOX, num_train_data=4, **trainer_context
        )


def test_reloading_without_the_codebook_file_uses_the_checkpoints(tmp_path):
    """ns-eval / ns-export on another machine: the file is gone, the checkpoint carries the codebook."""
    codebook = torch.randn(32, 16)
    path = tmp_path / "codebook.pt"
    torch.save(codebook, path)
    trained = build(tiny_config(codebook_source="file", codebook_path=path, codebook_dim=16))
    state = {"model": trained.state_dict()}
    path.unlink()
    reloaded = build(tiny_config(codebook_source="file", codebook_path=path, codebook_dim=16))  # eval_setup's way
    reloaded.eval()
    with pytest.raises(CodebookError, match="no checkpoint"):
        reloaded(rays(4))
    reloaded.load_model(state)
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(rays(8))["rgb"], trained(rays(8))["rgb"], atol=0, rtol=0)


def test_codebook_width_must_match_the_config(tmp_path):
    path = tmp_path / "codebook.npy"
    np.save(path, np.ones((8, 12), dtype=np.float32))
    with pytest.raises(CodebookError, match="codebook-dim 12"):
        build(tiny_config(codebook_source="file", codebook_path=path, codebook_dim=16))


def test_codebook_file_is_used_and_stored_once(tmp_path):
    codebook = torch.randn(32, 16)
    path = tmp_path / "codebook.pt"
    torch.save(codebook, path)
    model = build(tiny_config(codebook_source="file", codebook_path=path, codebook_dim=16))
    torch.testing.assert_close(model.prior.codebook, codebook)
    assert [key for key in model.state_dict() if "codebook" in key] == ["prior.codebook"]
    assert not model.prior.codebook.requires_grad
    assert "prior.codebook" in model._ddp_params_and_buffers_to_ignore  # never broadcast by DDP


def test_prototypes_computed_once_per_training_step():
    model = build(tiny_config())
    calls = count_codebook_attention_calls(model)
    model.train()
    outputs = model(rays())
    loss = sum(model.get_loss_dict(outputs, {"image": torch.rand(32, 3)}).values())
    loss.backward()
    assert len(calls) == 4  # one per head, although the geometry head ran ~5 times
    assert model.prior.attentions["geometry"].latents.grad is not None


def test_prototypes_cached_while_rendering_and_refreshed_after_training():
    model = build(tiny_config())
    calls = count_codebook_attention_calls(model)
    model.eval()
    bundle = rays(64)
    with torch.no_grad():
        for chunk in range(4):
            model(bundle[chunk * 16 : (chunk + 1) * 16])
    assert len(calls) == 4
    model.train()
    model.eval()
    with torch.no_grad():
        model(bundle[:16])
    assert len(calls) == 8


def test_prototypes_do_not_depend_on_the_query_points():
    model = build(tiny_config())
    model.eval()
    before = {head: model.prior.get(head).clone() for head in model.prior.attentions}
    points = torch.randn(40, 3)
    with torch.no_grad():
        alone = model.field.forward_geonetwork(points[:5])
        together = model.field.forward_geonetwork(points)
        permuted = model.field.forward_geonetwork(points.flip(0))
    for head, value in before.items():
        torch.testing.assert_close(model.prior.get(head), value)
    torch.testing.assert_close(alone, together[:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted, together.flip(0), atol=1e-5, rtol=1e-5)


def test_outputs_follow_nerfstudio_conventions():
    """rgb/accumulation in [0,1]; ``normals`` in [0,1] for ns-export; ``depth`` is distance along the ray."""
    # a sharp surface and the paper's sample counts: the expected depth sits at the SDF's crossing
    model = build(
        tiny_config(beta_init=0.01, max_total_iters=5, num_samples=64, num_samples_eval=128, num_samples_extra=32)
    )
    model.eval()
    bundle = rays(16)
    with torch.no_grad():
        outputs = model(bundle)
    assert set(outputs) == {"rgb", "accumulation", "depth", "normal", "normals"}  # per-ray only
    for name in ("rgb", "accumulation", "normals"):
        assert outputs[name].min() >= 0 and outputs[name].max() <= 1 + 1e-6, name  # float rounding of sums
    # the initial SDF is a rough sphere: find its first zero crossing along each ray and compare
    t = torch.linspace(0.0, 5.0, 2001)
    points = bundle.origins[:, None, :] + t[None, :, None] * bundle.directions[:, None, :]
    with torch.no_grad():
        sdf = model.field.get_sdf_values(points)[..., 0]
    crossing = t[(sdf < 0).float().argmax(dim=1)]
    hit = outputs["accumulation"][:, 0] > 0.95
    assert hit.sum() >= 8
    assert (outputs["depth"][hit, 0] - crossing[hit]).abs().max() < 0.05  # grazing rays: up to ~3 beta early
    # the rendered normal points back towards the camera at the hit
    normals = outputs["normals"][hit] * 2 - 1
    assert ((normals * bundle.directions[hit]).sum(-1) < 0).all()


def test_rendering_shortcut_matches_full_evaluation():
    model = build(tiny_config())
    model.eval()
    bundle = rays(24)
    with torch.no_grad():
        shortcut = model(bundle)
        model.config.eval_weight_threshold = 0.0
        full = model(bundle)
    for name in ("rgb", "depth", "accumulation"):
        torch.testing.assert_close(shortcut[name], full[name], atol=2e-3, rtol=0)


def test_renders_skip_the_background_where_the_object_hides_it():
    """Rays whose light reaching the background is at most eval_weight_threshold skip the background field; each
    pixel then differs from the full render by at most the threshold."""
    model = build(tiny_config())
    model.eval()
    hitting, missing = rays(12), rays(12, seed=1)
    missing.directions = torch.nn.functional.normalize(missing.directions + torch.tensor([3.0, 0.0, 0.0]), dim=-1)
    bundle = RayBundle(
        origins=torch.cat([hitting.origins, missing.origins]),
        directions=torch.cat([hitting.directions, missing.directions]),
        pixel_area=torch.ones(24, 1),
        camera_indices=torch.zeros(24, 1, dtype=torch.long),
    )
    evaluated = []
    render_background = model._render_background

    def counted(ray_bundle, *args):
        evaluated.append(ray_bundle.origins.reshape(-1, 3).shape[0])
        return render_background(ray_bundle, *args)

    model._render_background = counted
    threshold = model.config.eval_weight_threshold
    with torch.no_grad():
        shortcut = model(bundle)
        # the same render with the background on every ray (the foreground's own shortcut unchanged)
        model._background_term = lambda ray_bundle, transmittance: transmittance * counted(ray_bundle)
        full = model(bundle)
    hidden = 1.0 - full["accumulation"][:, 0] <= threshold  # the light left for the background
    assert hidden[:12].sum() >= 6 and not hidden[12:].any()  # a mix: rays through the sphere, rays past it
    assert evaluated == [int((~hidden).sum()), 24]
    assert (shortcut["rgb"] - full["rgb"]).abs().max() <= threshold
    assert (shortcut["rgb"][hidden] != full["rgb"][hidden]).any()
    torch.testing.assert_close(shortcut["rgb"][~hidden], full["rgb"][~hidden], atol=0, rtol=0)


def test_renders_split_their_field_passes_without_changing_the_image():
    """render_points_per_pass bounds every field pass of a render (the SDF at the final samples, the gradient and
    colour at the visible ones, the background's samples): memory, not the image. Training passes stay whole."""
    model = build(tiny_config())
    bundle = rays(24)
    passes = {"sdf": [], "gradient and colour": [], "background": []}
    recorded = {
        "sdf": (model.field, "forward_geonetwork"),
        "gradient and colour": (model.field, "get_outputs"),
        "background": (model.field_background, "forward"),
    }
    for kind, (module, name) in recorded.items():
        original = getattr(module, name)

        def record(points, *args, _original=original, _kind=kind, **kwargs):
            # the sampler's own SDF queries go in its chunks (sampler_chunk_size); a pass's inner calls are its own
            if not sampling and not inside:
                size = points.frustums.shape.numel() if _kind == "gradient and colour" else points.shape[0]
                passes[_kind].append(size)
            inside.append(_kind)
            try:
                return _original(points, *args, **kwargs)
            finally:
                inside.pop()

        setattr(module, name, record)
    sampling, inside = [], []
    generate = model.sampler.generate_ray_samples

    def sample(*args, **kwargs):
        sampling.append(True)
        try:
            return generate(*args, **kwargs)
        finally:
            sampling.clear()

    model.sampler.generate_ray_samples = sample

    def render(points_per_pass: int) -> dict:
        for sizes in passes.values():
            sizes.clear()
        model.config.render_points_per_pass = points_per_pass
        with torch.no_grad():
            return model(bundle)

    model.eval()
    whole = render(1 << 19)
    assert [len(sizes) for sizes in passes.values()] == [1, 1, 1]
    total = {kind: sum(sizes) for kind, sizes in passes.items()}
    split = render(7)
    assert all(max(sizes) <= 7 for sizes in passes.values())
    assert {kind: sum(sizes) for kind, sizes in passes.items()} == total  # every point, once
    assert len(passes["sdf"]) == -(-total["sdf"] // 7)
    assert len(passes["background"]) == total["background"] // 4  # one ray (4 samples) a pass
    for name in ("rgb", "depth", "accumulation", "normal"):
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=0)
    model.config.eval_weight_threshold = 0.0  # every sample: one field pass does it all, split the same way
    every = render(1 << 19)
    assert len(passes["gradient and colour"]) == 1 and not passes["sdf"]
    every_split = render(7)
    assert max(passes["gradient and colour"]) <= 7 and sum(passes["gradient and colour"]) == total["sdf"]
    for name in ("rgb", "depth", "accumulation", "normal"):
        torch.testing.assert_close(every_split[name], every[name], atol=1e-6, rtol=0)
    model.train()
    model.config.train_weight_threshold = 1e-4  # training's own shortcut: its passes stay whole too
    for sizes in passes.values():
        sizes.clear()
    model(bundle)
    assert passes["background"] == [24 * 4] and passes["sdf"][0] == total["sdf"]
    assert len(passes["gradient and colour"]) == 1 and passes["gradient and colour"][0] > 7


@pytest.mark.parametrize("option", ["render-points-per-pass", "sdf-field.coordinate-attention.flash-sequence-length"])
def test_pass_and_sequence_sizes_below_one_are_refused_naming_the_option(option):
    config = tiny_config()
    if option == "render-points-per-pass":
        config.render_points_per_pass = 0
    else:
        config.sdf_field.coordinate_attention.flash_sequence_length = -4
    with pytest.raises(ValueError, match=f"--pipeline.model.{option} must be at least 1, got"):
        build(config)


def test_eikonal_points_lie_on_the_rays_and_in_the_cube():
    """The original put near-surface points at dir + z*dir; ours are origin + z*dir."""
    model = build(tiny_config())
    bundle = rays(10)
    z = torch.rand(10, 1) * 3.0
    points = model._eikonal_points(bundle, z)
    uniform, near = points[:10], points[10:]
    assert uniform.abs().max() <= model.scene_radius
    torch.testing.assert_close(near, bundle.origins + z * bundle.directions)


def test_eikonal_points_share_the_geometry_pass_of_the_samples():
    """In training the eikonal points' gradient comes from the samples' pass of the geometry head (one pass: a second
    one over a few thousand points costs as many launches); it is what a pass of their own gives. With
    train_weight_threshold the points keep a pass of their own."""
    model = build(tiny_config())
    model.train()
    calls = []
    original = model.field.sdf_and_gradient

    def counting(points, create_graph):
        calls.append(len(points))
        return original(points, create_graph)

    model.field.sdf_and_gradient = counting
    bundle = rays(16)
    outputs = model(bundle)
    samples = outputs["weights"].shape[:2].numel()
    assert calls == [samples + 32]  # 16 rays' samples and two eikonal points a ray, together
    ray_samples = model.sampler(bundle, sdf_fn=model._sampler_sdf, density=model.density)[0]
    points = torch.randn(32, 3)
    merged, gradients = model.field.outputs_and_gradient_at(ray_samples, points)
    alone = model.field.get_outputs(ray_samples)
    for name, value in alone.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradients, original(points, create_graph=True)[2], rtol=1e-5, atol=1e-6)

    calls.clear()
    model.config.train_weight_threshold = 1e-4
    model(rays(16))
    assert len(calls) == 2 and calls[-1] == 32


def test_losses_and_training_metrics():
    model = build(tiny_config())
    model.train()
    outputs = model(rays())
    assert outputs["eik_grad"].shape == (64, 3)  # a uniform and a near-surface point per ray
    losses = model.get_loss_dict(outputs, {"image": torch.rand(32, 3)})
    assert set(losses) == {"rgb_loss", "eikonal_loss"}
    image = torch.rand(32, 3)
    metrics = model.get_metrics_dict(outputs, {"image": image})
    torch.testing.assert_close(metrics["beta"], torch.tensor(0.1 + 1e-4))
    # the training PSNR is torchmetrics' (what SurfaceModel reported), computed without a host round trip
    torch.testing.assert_close(metrics["psnr"], PeakSignalNoiseRatio(data_range=1.0)(outputs["rgb"], image))
    expected = ((outputs["eik_grad"].norm(dim=-1) - 1) ** 2).mean() * 0.1
    torch.testing.assert_close(losses["eikonal_loss"], expected)
    torch.testing.assert_close(metrics["sampler_refined"], (outputs["sampler_rounds"] > 1).float().mean())
    assert metrics["sampler_truncated"] == 0.0  # no ray budget outside CUDA-graph training


def test_sampler_budget_reaches_the_sampler_and_its_metric():
    model = build(tiny_config(cuda_graph=True, static_refine_budget=0.25, beta_init=0.001))
    model.train()
    assert model.sampler.static_shapes and model.sampler.static_refine_budget == 0.25
    outputs = model(rays())
    metrics = model.get_metrics_dict(outputs, {"image": torch.rand(32, 3)})
    # at a small beta most of the 32 rays (aimed at the initial sphere) need a second round; 8 places
    refined = int((outputs["sampler_rounds"] > 1).sum())
    assert refined <= 8 < refined + int(outputs["sampler_truncated"])
    torch.testing.assert_close(metrics["sampler_truncated"], outputs["sampler_truncated"].float() / 32)


def test_auto_refine_budget_follows_the_demand_and_asks_for_a_new_graph():
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

    model = build(tiny_config(cuda_graph=True, static_refine_budget="auto", num_samples_eval=128))
    model.train()
    assert model.sampler.static_refine_budget == 1.0 and model.refine_budget is not None
    callbacks = model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, None))
    adapting = [c for c in callbacks if getattr(c.func, "__name__", "") == "_adapt_refine_budget"]
    assert len(adapting) == 1 and adapting[0].update_every_num_iters == 50
    # at the same point of the step as the precision check: the GPU drains for both at once
    assert adapting[0].where_to_run == [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION]
    key = model.cuda_graph_key()
    demands = []
    for seed in range(model.refine_budget.min_observations):  # fewer steps than that: the check keeps observing
        bundle = rays(seed=seed)  # 8 rays at the initial sphere (a second round each), 24 past it (done at once)
        bundle.directions[8:] = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, -0.2]), dim=-1)
        outputs = model(bundle)
        metrics = model.get_metrics_dict(outputs, {"image": torch.rand(32, 3)})
        assert metrics["sampler_truncated"] == 0.0 and metrics["sampler_budget"] == 1.0
        rounds = outputs["sampler_rounds"]  # the demand of each round 2.. is the rays that ran it (none cut)
        later = torch.arange(2, model.sampler.max_total_iters + 1)
        assert outputs["sampler_round_demand"].tolist() == [int((rounds >= k).sum()) for k in later]
        demands.append(outputs["sampler_round_demand"].float() / 32)
    highest = torch.stack(demands).max(0).values.tolist()
    assert highest[0] == 0.25 == float(metrics["sampler_refined"])
    adapting[0].run_callback(step=50)
    assert highest == [0.25, 0.0]  # the tiny model has 3 rounds: no ray needed the third
    assert model.sampler.refine_budgets == (13 / 32, 1 / 32)  # the roomy target 0.25 * 1.5 + 1/32, and the floor
    assert model.cuda_graph_key() != key  # a captured step sees the change and captures again
    with pytest.raises(ValueError, match="static-refine-budget must be in"):
        build(tiny_config(static_refine_budget=1.5))
    with pytest.raises(ValueError, match=r"needs --pipeline\.model\.per-ray-convergence"):
        build(tiny_config(cuda_graph=True, static_refine_budget="auto", per_ray_convergence=False))
    with pytest.raises(ValueError, match=r"--pipeline\.model\.refine-budget-shrink-checks must be at least 1"):
        build(tiny_config(cuda_graph=True, static_refine_budget="auto", refine_budget_shrink_checks=0))
    held = build(tiny_config(cuda_graph=True, static_refine_budget="auto", refine_budget_shrink_checks=4))
    assert held.refine_budget is not None and held.refine_budget.shrink_checks == 4
    with pytest.raises(ValueError, match=r"--pipeline\.model\.num-samples-extra \(17\) must not exceed "):
        build(tiny_config(num_samples_extra=17))  # the tiny model's first round has 16


def test_mask_loss_only_when_asked():
    batch = {"image": torch.rand(32, 3), "fg_mask": torch.ones(32, 1)}
    model = build(tiny_config())
    model.train()
    assert "fg_mask_loss" not in model.get_loss_dict(model(rays()), batch)
    model = build(tiny_config(fg_mask_loss_mult=0.01))
    model.train()
    assert "fg_mask_loss" in model.get_loss_dict(model(rays()), batch)


def test_checkpoint_roundtrip_gives_identical_renders():
    model = build(tiny_config())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        outputs = model(rays(seed=_))
        sum(model.get_loss_dict(outputs, {"image": torch.rand(32, 3)}).values()).backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict()}, buffer)
    buffer.seek(0)
    # a model built from another (random) codebook: the checkpoint's codebook must win
    reloaded = build(tiny_config(random_codebook_seed=7))
    reloaded.load_model(torch.load(buffer, weights_only=True))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a, b = model(rays(20, seed=5)), reloaded(rays(20, seed=5))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_image_metrics_with_mask_and_without_lpips_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no AlexNet on disk: LPIPS skipped
    model = build(tiny_config())
    h, w = 16, 20
    image = torch.rand(h, w, 3)
    outputs = {
        "rgb": image.clone(),
        "accumulation": torch.ones(h, w, 1),
        "depth": torch.ones(h, w, 1),
        "normals": torch.full((h, w, 3), 0.5),
    }
    outputs["rgb"][0, 0] = 0.0  # one wrong pixel, outside the mask
    mask = torch.ones(h, w, 1)
    mask[0, 0] = 0
    metrics, images = model.get_image_metrics_and_images(outputs, {"image": image, "fg_mask": mask})
    assert "lpips" not in metrics
    assert metrics["psnr_masked"] > 90 and metrics["psnr"] < 40
    assert images["img"].shape == (h, 2 * w, 3) and images["normal"].shape == (h, w, 3)


def test_method_defaults_are_the_originals():
    trainer = coco_inr.config
    model = trainer.pipeline.model
    assert trainer.method_name == "coco-inr" and trainer.max_num_iterations == 200_000
    assert trainer.pipeline.datamanager.train_num_rays_per_batch == 1024
    assert trainer.pipeline.datamanager.pixel_sampler.images_per_batch == 1
    assert trainer.optimizers["fields"]["optimizer"].lr == 5e-4
    assert trainer.optimizers["fields"]["scheduler"].final_ratio == 0.1
    # the decay spans the run, whatever --max-num-iterations says (the original decays over its whole run)
    for steps in (200_000, 2_000):
        resolved = resolve_decay_lengths(trainer.optimizers, steps)
        assert {group["scheduler"].max_steps for group in resolved.values()} == {steps}
    assert trainer.optimizers["fields"]["scheduler"].max_steps is None  # the method's own config is untouched
    assert (model.num_samples, model.num_samples_eval, model.num_samples_extra) == (64, 128, 32)
    assert (model.error_bound_eps, model.beta_iters, model.max_total_iters) == (0.1, 10, 5)
    assert (model.beta_init, model.eikonal_loss_mult, model.fg_mask_loss_mult) == (0.1, 0.1, 0.0)
    assert model.scene_radius is None and trainer.pipeline.datamanager.dataparser.scene_radius == 3.0  # one source
    assert model.sdf_field.bias == 0.6 and model.num_samples_outside == 32


def _differing_fields(a, b, prefix: str = "") -> set[str]:
    """Dotted names of the (nested) dataclass fields whose values differ between ``a`` and ``b``."""
    instances = not isinstance(a, type) and not isinstance(b, type)  # a _target is a dataclass type, not a config
    if not (instances and dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b)) or type(a) is not type(b):
        return set() if a == b else {prefix.rstrip(".")}
    names = set()
    for field in dataclasses.fields(a):
        names |= _differing_fields(getattr(a, field.name), getattr(b, field.name), f"{prefix}{field.name}.")
    return names


def test_fast_preset_changes_speed_options_only():
    """coco-inr-fast is coco-inr with the recipe's speed options and nothing else (hyperparameters, data, optimizers,
    trainer), and building it leaves coco-inr's config (and the model's defaults) as they were."""
    fast, base = coco_inr_fast.config, coco_inr.config
    assert _differing_fields(fast, base) == {
        "method_name",
        *(
            f"pipeline.model.{name}"
            for name in (
                "tf32_matmul",
                "cuda_graph",
                "compile_sampler",
                "static_refine_budget",
                "compile_fields",
                "mix_order_reduction",
                "sampler_autocast",
                "bf16_color_heads",
                "geometry_autocast",
                "sdf_field.coordinate_attention.fused_without_grad",
                "background_field.coordinate_attention.fused_without_grad",
                "sdf_field.coordinate_attention.point_kernels",
                "background_field.coordinate_attention.point_kernels",
                "sdf_field.coordinate_attention.flash_first_order",
                "background_field.coordinate_attention.flash_first_order",
            )
        ),
    }
    model = fast.pipeline.model
    assert fast.method_name == "coco-inr-fast"
    assert (model.tf32_matmul, model.cuda_graph, model.compile_sampler, model.compile_fields) == (True,) * 4
    assert model.static_refine_budget == "auto" and model.sampler_autocast == "float16" and model.bf16_color_heads
    assert model.geometry_autocast == "float16" and model.geometry_gradient_scale == 1024.0
    assert model.mix_order_reduction is False
    assert model.sdf_field.coordinate_attention.fused_without_grad
    assert model.background_field.coordinate_attention.fused_without_grad
    assert model.sdf_field.coordinate_attention.point_kernels
    assert model.background_field.coordinate_attention.point_kernels
    assert model.sdf_field.coordinate_attention.flash_first_order
    assert model.background_field.coordinate_attention.flash_first_order
    assert base.pipeline.model == CocoInrModelConfig()  # no nested config shared with the preset
    assert model.sdf_field is not base.pipeline.model.sdf_field
    assert model.background_field is not base.pipeline.model.background_field


def test_fast_preset_from_the_command_line():
    """``ns-train coco-inr-fast`` parses to the preset, and each of its options can still be switched off."""
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    parsed = tyro.cli(AnnotatedBaseConfigUnion, args=["coco-inr-fast"])
    assert parsed.method_name == "coco-inr-fast" and parsed.pipeline.model == coco_inr_fast.config.pipeline.model
    args = ["coco-inr-fast", "--pipeline.model.cuda-graph", "False"]
    args += ["--pipeline.model.sdf-field.coordinate-attention.fused-without-grad", "False"]
    model = tyro.cli(AnnotatedBaseConfigUnion, args=args).pipeline.model
    assert not model.cuda_graph and not model.sdf_field.coordinate_attention.fused_without_grad
    assert model.compile_fields and model.background_field.coordinate_attention.fused_without_grad


def test_entry_points_are_registered():
    from nerfstudio.configs.dataparser_configs import all_dataparsers
    from nerfstudio.configs.method_configs import all_methods

    assert {"coco-inr", "coco-inr-fast", "volsdf"} <= set(all_methods)
    assert "idr-data" in all_dataparsers


def _train_outputs(model: CocoInrModel, seed: int = 3, device: str = "cpu"):
    torch.manual_seed(seed)
    model.train()
    outputs = model(rays(32, seed=seed).to(device))
    loss = sum(model.get_loss_dict(outputs, {"image": torch.rand(32, 3).to(device)}).values())
    loss.backward()
    return outputs


def test_training_shortcut_keeps_gradients_and_colours():
    """Skipping negligible samples in training changes the render by at most their summed weight."""
    config = tiny_config(beta_init=0.02, num_samples=32, num_samples_eval=64, num_samples_extra=8)
    full = _train_outputs(build(config))
    config.train_weight_threshold = 1e-4
    model = build(config)
    pruned = _train_outputs(model)
    torch.testing.assert_close(pruned["rgb"], full["rgb"], atol=5e-3, rtol=0)
    torch.testing.assert_close(pruned["depth"], full["depth"], atol=1e-5, rtol=0)
    assert all(p.grad is not None for n, p in model.named_parameters() if "device_indicator" not in n)


def test_bfloat16_colour_heads_stay_close_to_float32():
    config = tiny_config()
    reference = _train_outputs(build(config))
    config.bf16_color_heads = True
    model = build(config)
    outputs = _train_outputs(model)
    assert outputs["rgb"].dtype == torch.float32 and outputs["eik_grad"].dtype == torch.float32
    torch.testing.assert_close(outputs["rgb"], reference["rgb"], atol=2e-2, rtol=0)
    torch.testing.assert_close(outputs["eik_grad"], reference["eik_grad"])  # the SDF path is untouched


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_flash_first_order_takes_sequences_in_the_bf16_heads_only(monkeypatch, device):
    """flash-first-order with bf16 colour heads: in a training step the colour head's attention blocks and the
    background field's two run the fused kernels as sequences, with gradients; the geometry head (differentiated
    twice) never does. rgb and every parameter's gradient stay near the float32 heads': within 6% of each
    gradient's largest entry (CPU: torch's math kernel computes the bf16 attention in bf16 throughout, 4.2% at
    most here, where the explicit path's bf16 heads err by 1.3%; CUDA: torch's fused kernels, as in
    ``coco-inr-fast``). Without bf16 heads the option changes nothing."""
    from cocoinr_nerfstudio.field_components import attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(q, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), q.shape[0], q.dtype))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)

    def step(flash: bool, bf16: bool):
        config = tiny_config(fused_prototype_attention=False, bf16_color_heads=bf16)  # SDPA: coordinate attention
        for field_config in (config.sdf_field, config.background_field):
            field_config.coordinate_attention.flash_first_order = flash
            field_config.coordinate_attention.flash_sequence_length = 16
        model = build(config).to(device)
        calls.clear()
        outputs = _train_outputs(model, device=device)  # the forward pass and the loss's backward
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return outputs, gradients, list(calls)

    outputs, gradients, calls_float32 = step(flash=True, bf16=False)
    assert calls_float32 == []
    flash_outputs, flash_gradients, calls = step(flash=True, bf16=True)
    # the colour head's two blocks (the paper's depth 2), the background's density and colour blocks
    assert len(calls) == 4 and all(grad and dtype == torch.bfloat16 for grad, _, dtype in calls)
    assert all(sequences > 1 for _, sequences, _ in calls)  # more points than 16: several sequences
    torch.testing.assert_close(flash_outputs["rgb"], outputs["rgb"], atol=2e-2, rtol=0)
    torch.testing.assert_close(flash_outputs["eik_grad"], outputs["eik_grad"])  # the SDF path is untouched
    assert flash_gradients.keys() == gradients.keys()
    for name, gradient in gradients.items():
        scale = float(gradient.abs().max()) + 1e-8
        assert float((flash_gradients[name] - gradient).abs().max()) <= 0.06 * scale, name
    assert step(flash=False, bf16=True)[2] == []


def test_surface_preview_finds_the_volume_renders_surface():
    """The viewer's fast mode: sphere tracing lands where the volume render puts the depth."""
    model = build(tiny_config(beta_init=0.01, max_total_iters=5, num_samples=64, num_samples_eval=128))
    model.eval()
    bundle = rays(24)
    with torch.no_grad():
        volume = model(bundle)
        with model.surface_rendering():
            surface = model(bundle)
        # the viewer's choice reaches only the viewer's render threads, never metrics or exports
        model.viewer_render_mode = "surface"
        torch.testing.assert_close(model(bundle)["depth"], volume["depth"])
        results = {}
        thread = threading.Thread(target=lambda: results.update(model(bundle)))
        thread.start()
        thread.join()
        torch.testing.assert_close(results["depth"], surface["depth"])
    assert set(surface) == set(volume)
    hit = (volume["accumulation"][:, 0] > 0.99) & (surface["accumulation"][:, 0] == 1)
    assert hit.sum() >= 12
    assert (surface["depth"][hit] - volume["depth"][hit]).abs().max() < 0.05
    assert ((surface["normals"][hit] - volume["normals"][hit]).abs().max(-1).values < 0.2).all()
    assert surface["rgb"].min() >= 0 and surface["rgb"].max() <= 1


def test_a_relative_codebook_path_is_stored_absolute(tmp_path, monkeypatch):
    """ns-train writes config.yml from the config object; ns-eval may run from another folder."""
    monkeypatch.chdir(tmp_path)
    assert CocoInrModelConfig(codebook_path=Path("ckpts/cb.pt")).codebook_path == tmp_path / "ckpts" / "cb.pt"
    assert CocoInrModelConfig().codebook_path is None  # the default locations are searched at training time


def test_the_bounding_sphere_comes_from_the_data_unless_set():
    assert build(tiny_config()).scene_radius == 3.0
    model = tiny_config().setup(scene_box=SCENE_BOX, num_train_data=4, metadata={"scene_radius": 2.0})
    assert model.scene_radius == 2.0 and model.collider.radius == 2.0
    model = tiny_config(scene_radius=2.5).setup(scene_box=SCENE_BOX, num_train_data=4, metadata={"scene_radius": 2.0})
    assert model.scene_radius == 2.5


def test_fused_attention_settings_choose_the_kernel_by_derivative():
    """``fused``: everywhere but under a second derivative; ``fused_without_grad``: only where no gradient is
    taken; neither: always explicit."""
    cases = {
        (False, False): [False] * 4,
        (True, False): [True, True, False, False],
        (False, True): [False, True, False, False],
    }
    for (fused, fused_without_grad), expected in cases.items():
        config = CocoFieldConfig().coordinate_attention
        config.fused, config.fused_without_grad = fused, fused_without_grad
        chosen = [config.use_fused(grad, second) for second in (False, True) for grad in (True, False)]
        assert chosen == expected, (fused, fused_without_grad)


def test_fused_without_grad_takes_the_fused_kernels_only_where_nothing_is_differentiated(monkeypatch):
    """The sampler's SDF queries and renders without autograd use SDPA; the training pass stays explicit; the
    results are the explicit model's up to float rounding."""
    from cocoinr_nerfstudio.field_components import attention

    grad_modes = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    results = []
    for fused_without_grad in (False, True):
        config = tiny_config(fused_prototype_attention=False)  # SDPA calls then come from coordinate attention
        config.sdf_field.coordinate_attention.fused_without_grad = fused_without_grad
        config.background_field.coordinate_attention.fused_without_grad = fused_without_grad
        model = build(config)
        grad_modes.clear()
        train = _train_outputs(model)
        training_calls = list(grad_modes)
        model.eval()
        grad_modes.clear()
        with torch.no_grad():
            render = model(rays(seed=3))
        results.append((train, render, training_calls, list(grad_modes)))
    (train, render, training_calls, render_calls), (fused_train, fused_render, fused_training, fused_rendering) = (
        results
    )
    assert training_calls == [] and render_calls == []
    assert fused_training and not any(fused_training)  # the sampler's queries, under no_grad
    assert fused_rendering and not any(fused_rendering)
    # SDF queries, colour head, background density and colour of a render: all four attention sites
    assert len(fused_rendering) >= 4
    torch.testing.assert_close(fused_train["rgb"], train["rgb"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_render["rgb"], render["rgb"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_render["depth"], render["depth"], rtol=1e-4, atol=1e-5)
