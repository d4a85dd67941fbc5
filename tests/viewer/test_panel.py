"""The coco-inr viewer panel: discovery by nerfstudio's viewer, training statistics, the preview mesh."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import viser
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.viewer.utils import parse_object
from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

from cocoinr_nerfstudio.mesh.extraction import NoSurfaceError
from cocoinr_nerfstudio.viewer import MethodPanel
from cocoinr_nerfstudio.viewer.panel import PREVIEW_NODE, format_value
from cocoinr_nerfstudio.viewer.preview import extract_preview_mesh

AFTER_STEP = TrainingCallbackLocation.AFTER_TRAIN_ITERATION


def rays(num: int = 32) -> RayBundle:
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(
        torch.tensor([0.0, 0.0, -1.0]) + 0.3 * (torch.rand(num, 3, generator=generator) - 0.5), dim=-1
    )
    return RayBundle(
        origins=torch.tensor([[0.0, 0.0, 2.5]]).expand(num, 3).contiguous(),
        directions=directions,
        pixel_area=torch.ones(num, 1),
        camera_indices=torch.zeros(num, 1, dtype=torch.long),
    )


def training_metrics(model) -> dict[str, torch.Tensor]:
    model.train()
    return model.get_metrics_dict(model(rays()), {"image": torch.rand(32, 3)})


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def server(free_port):
    server = viser.ViserServer(host="127.0.0.1", port=free_port, verbose=False)
    yield server
    server.stop()


def install_like_the_viewer(model, server: viser.ViserServer, train_lock: threading.Lock | None) -> None:
    """What nerfstudio's Viewer does with a pipeline: install every element it finds, then set up the controls."""
    for _, element in parse_object(model, ViewerElement, "Custom Elements"):
        element.install(server)
    for _, control in parse_object(model, ViewerControl, "Custom Elements"):
        control._setup(SimpleNamespace(viser_server=server, train_lock=train_lock))


def test_model_builds_without_a_viewer_and_checkpoints_do_not_change(tiny_model):
    panel = tiny_model.viewer_panel
    assert isinstance(panel, MethodPanel)
    assert list(panel.parameters()) == [] and list(panel.buffers()) == []
    assert not any("viewer_panel" in key for key in tiny_model.state_dict())
    grouped = sum(p.numel() for group in tiny_model.get_param_groups().values() for p in group)
    assert grouped == sum(p.numel() for p in tiny_model.parameters())
    # not installed anywhere: values live in the elements, the preview has nowhere to show and does not need to
    assert panel.beta.gui_handle is None
    assert panel.beta.value == format_value(0.1 + 1e-4)
    tiny_model.eval()
    tiny_model.train()
    assert panel.training


def test_nerfstudio_viewer_finds_the_panel_and_its_control(tiny_model):
    elements = dict(parse_object(tiny_model, ViewerElement, "Custom Elements"))
    prefix = "Custom Elements/viewer_panel/"
    assert set(elements) == {
        prefix + name
        for name in ("beta", "eikonal", "mesh_grid", "mesh_preview", "mesh_status", "mesh_visible", "render_mode")
    }
    assert elements[prefix + "beta"] is tiny_model.viewer_panel.beta
    controls = [control for _, control in parse_object(tiny_model, ViewerControl, "Custom Elements")]
    assert controls == [tiny_model.viewer_panel.viewer_control]


def test_render_mode_dropdown_switches_the_models_rendering(tiny_model, server):
    install_like_the_viewer(tiny_model, server, threading.Lock())
    panel = tiny_model.viewer_panel
    assert panel.render_mode.value == "volume"
    panel.render_mode.gui_handle.value = "surface"  # what a click in the browser does
    panel._on_render_mode_changed(panel.render_mode)
    assert tiny_model.viewer_render_mode == "surface"


def test_panel_shows_beta_and_the_latest_eikonal_term_from_training(tiny_model, server):
    with torch.no_grad():
        tiny_model.density.beta_param.fill_(0.05)  # e.g. ns-viewer: a checkpoint loaded after construction
    install_like_the_viewer(tiny_model, server, threading.Lock())
    panel = tiny_model.viewer_panel
    assert panel.beta.gui_handle.value == format_value(0.05 + 1e-4)
    with torch.no_grad():
        tiny_model.density.beta_param.fill_(0.1)
    callbacks = tiny_model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, None))
    assert len(callbacks) == 1

    metrics = training_metrics(tiny_model)
    assert panel.eikonal.value == "–"  # recorded, not yet pushed: pushing is the callback's job
    callbacks[0].run_callback_at_location(0, AFTER_STEP)
    assert panel.eikonal.value == format_value(float(metrics["eikonal"]))
    assert panel.eikonal.gui_handle.value == panel.eikonal.value  # what the browser is sent
    assert panel.beta.gui_handle.value == format_value(0.1 + 1e-4)

    # an optimizer step changes beta; the next push shows it, at most every refresh_interval seconds
    with torch.no_grad():
        tiny_model.density.beta_param.fill_(0.02)
    assert not panel.publish(step=1)
    assert panel.beta.value == format_value(0.1 + 1e-4)
    panel.refresh_interval = 0.0
    metrics = training_metrics(tiny_model)
    callbacks[0].run_callback_at_location(2, AFTER_STEP)
    assert panel.beta.gui_handle.value == format_value(0.02 + 1e-4)
    assert panel.eikonal.gui_handle.value == format_value(float(metrics["eikonal"]))


class CopyInFlight:
    """A device-to-host copy's event that has not completed until the test says so."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def test_statistics_read_on_a_gpu_appear_once_copied_without_a_wait(tiny_model, server, monkeypatch):
    copies: list[CopyInFlight] = []

    def copy_in_flight(values):
        copies.append(CopyInFlight())
        return values.clone(), copies[-1]

    monkeypatch.setattr("cocoinr_nerfstudio.viewer.panel.copy_to_host", copy_in_flight)
    install_like_the_viewer(tiny_model, server, threading.Lock())
    panel = tiny_model.viewer_panel
    panel.refresh_interval = 0.0
    before = panel.beta.value
    metrics = training_metrics(tiny_model)
    with torch.no_grad():
        tiny_model.density.beta_param.fill_(0.03)
    assert panel.publish(step=1)  # read, still in flight: nothing shown, nobody waited
    assert panel.beta.value == before and panel.eikonal.value == "–" and not copies[0].waited
    copies[0].done = True
    panel.refresh_interval = 60.0
    assert not panel.publish(step=2)  # no new read, but the one that has arrived is shown
    assert panel.beta.value == format_value(0.03 + 1e-4)
    assert panel.eikonal.value == format_value(float(metrics["eikonal"]))
    with torch.no_grad():
        tiny_model.density.beta_param.fill_(0.04)
    assert panel.publish(step=3, force=True)  # force waits for its copy
    assert copies[1].waited and panel.beta.value == format_value(0.04 + 1e-4)


def test_without_a_viewer_the_statistics_are_not_read(tiny_model, monkeypatch):
    def unreadable():
        raise AssertionError("read without a viewer")

    monkeypatch.setattr(tiny_model.density, "get_beta", unreadable)
    panel = tiny_model.viewer_panel
    assert not panel.publish(step=4, force=True)
    assert panel._step == 4  # the preview still reports the step


def test_preview_button_waits_for_the_train_lock_and_leaves_training_state_alone(tiny_model, server, monkeypatch):
    train_lock = threading.Lock()
    added = []
    add_mesh_simple = server.scene.add_mesh_simple

    def recording_add_mesh_simple(name, **kwargs):
        added.append((name, kwargs))
        return add_mesh_simple(name, **kwargs)

    monkeypatch.setattr(server.scene, "add_mesh_simple", recording_add_mesh_simple)
    install_like_the_viewer(tiny_model, server, train_lock)
    panel = tiny_model.viewer_panel
    panel.mesh_grid.value = 32
    tiny_model.train()
    params = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    rng = torch.get_rng_state()

    with train_lock:  # a training step is running
        panel.mesh_preview.cb_hook(panel.mesh_preview)  # the button's click
        worker = panel._worker
        time.sleep(0.3)
        assert worker.is_alive() and panel.last_preview is None
        assert panel.mesh_status.content.startswith("Waiting")
        assert panel.mesh_preview.gui_handle.disabled
        assert panel.start_preview() is None  # a second click does not start a second extraction
    worker.join(timeout=60)
    assert not worker.is_alive()

    mesh = panel.last_preview
    assert mesh is not None and len(mesh.faces) > 100
    assert panel.mesh_status.content.startswith("Preview mesh: ") and "32³" in panel.mesh_status.content
    assert not panel.mesh_preview.gui_handle.disabled
    # it is the SDF's zero level set (within a grid cell) of the model as it is
    tiny_model.eval()
    with torch.no_grad():
        sdf = tiny_model.field.get_sdf_values(torch.as_tensor(mesh.vertices, dtype=torch.float32))
    tiny_model.train()
    assert sdf.abs().max() < 2.0 / 31
    # shown in the viser scene (whose units are nerfstudio's times 10), and hidden with the checkbox
    [(name, kwargs)] = added
    assert name == PREVIEW_NODE
    assert np.allclose(kwargs["vertices"], mesh.vertices * 10.0, atol=1e-5)
    assert np.array_equal(kwargs["faces"], mesh.faces)
    handle = panel.preview_handle
    assert isinstance(handle, viser.MeshHandle) and handle.visible
    panel.mesh_visible.gui_handle.value = False
    assert wait_for(lambda: not handle.visible)
    # training state untouched: mode, weights, gradients, random stream
    assert tiny_model.training
    for name, p in tiny_model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert p.grad is None, name
    assert torch.equal(torch.get_rng_state(), rng)


def test_preview_without_a_surface_shows_the_message(tiny_model):
    panel = tiny_model.viewer_panel
    panel.bounding_box_min, panel.bounding_box_max = (1.5, 1.5, 1.5), (2.5, 2.5, 2.5)  # outside the initial sphere
    tiny_model.train()
    assert panel.extract_preview() is None
    with pytest.raises(NoSurfaceError) as raised:
        extract_preview_mesh(tiny_model, 64, panel.bounding_box_min, panel.bounding_box_max)
    assert panel.mesh_status.content == f"No surface yet: {raised.value}"
    assert tiny_model.training and panel.last_preview is None


def test_preview_failure_is_reported_not_raised(tiny_model, monkeypatch):
    def broken(points, **options):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_model.field, "forward_geonetwork", broken)
    panel = tiny_model.viewer_panel
    panel.publish(step=7, force=True)
    tiny_model.train()
    worker = panel.start_preview()
    worker.join(timeout=30)
    assert panel.mesh_status.content == "Preview failed at step 7: RuntimeError: boom"
    assert tiny_model.training


def test_constructing_the_panel_alone_needs_no_viewer(make_tiny_model):
    model = make_tiny_model(eikonal_loss_mult=0.5)
    panel = MethodPanel(model, preview_resolution=96, bounding_box_min=(-2, -2, -2), bounding_box_max=(2, 2, 2))
    assert panel.mesh_grid.value == 96 and panel.bounding_box_max == (2.0, 2.0, 2.0)
    assert "eikonal_loss_mult=0.5" in panel.eikonal.hint
    assert panel.training_callbacks(TrainingCallbackAttributes(None, None, None, None))[0].where_to_run == [AFTER_STEP]
