"""The coco-inr method panel in nerfstudio's viewer: Laplace beta, the eikonal term and a preview mesh.

nerfstudio's viewer collects every ``ViewerElement`` and ``ViewerControl`` reachable from the pipeline through
attributes of ``nn.Module`` objects, so the panel is a module (holding no parameters or buffers: checkpoints
do not change) that the model stores as ``model.viewer_panel``. Its elements appear under
*Custom Elements / model / viewer_panel* in the viewer's Control tab.

Threads: training statistics are written by the training thread (from ``get_metrics_dict`` and a training
callback); the preview mesh is extracted in a worker thread started by the button, under the trainer's train
lock, and shown in the viser scene. Any failure of the preview is reported in the panel, never raised into
training or the viewer.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import trimesh
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.utils.rich_utils import CONSOLE
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerControl,
    ViewerDropdown,
    ViewerSlider,
)
from torch import Tensor, nn
from viser import MeshHandle, ViserServer

from cocoinr_nerfstudio.mesh.extraction import NoSurfaceError, Vec3
from cocoinr_nerfstudio.model_components.host_reads import copy_to_host
from cocoinr_nerfstudio.viewer.elements import ReadOnlyText, ViewerMarkdown
from cocoinr_nerfstudio.viewer.preview import extract_preview_mesh

if TYPE_CHECKING:
    from nerfstudio.viewer.viewer import Viewer

    from cocoinr_nerfstudio.models.coco_inr import CocoInrModel

PREVIEW_NODE = "/cocoinr/preview_mesh"
"""Scene-tree name of the preview mesh (a new preview replaces the previous one)."""
PREVIEW_COLOR = (200, 205, 215)
NOT_YET = "–"


def format_value(value: float) -> str:
    """Four significant digits: beta spans 0.1 to 1e-4 over training, the eikonal term as much."""
    return f"{value:.4g}"


class _PanelControl(ViewerControl):
    """nerfstudio's handle on the viser server, with a hook for when the viewer has set it up."""

    def __init__(self, on_setup: Callable[[Viewer], None]) -> None:
        self._on_setup = on_setup

    def _setup(self, viewer: Viewer) -> None:
        super()._setup(viewer)
        self._on_setup(viewer)


class MethodPanel(nn.Module):
    """Viewer panel of a :class:`CocoInrModel`; inert (just a few Python objects) when no viewer runs.

    Args:
        model: the model whose statistics and surface the panel shows (not registered as a submodule).
        preview_resolution: initial grid resolution of the preview mesh.
        bounding_box_min, bounding_box_max: box searched for the surface, in the model's (normalised) frame;
            the default is the unit cube that holds an IDR-normalised object, as for ``cocoinr-extract-mesh``.
        refresh_interval: seconds between two pushes of the training statistics to the viewer.
    """

    _model: CocoInrModel

    def __init__(
        self,
        model: CocoInrModel,
        preview_resolution: int = 64,
        bounding_box_min: Vec3 = (-1.0, -1.0, -1.0),
        bounding_box_max: Vec3 = (1.0, 1.0, 1.0),
        refresh_interval: float = 0.5,
    ) -> None:
        super().__init__()
        # A plain, private reference: as a submodule the model would make the module tree cyclic, and a public
        # attribute would send the viewer's element search (parse_object) from the panel back into the model.
        object.__setattr__(self, "_model", model)
        self.bounding_box_min: Vec3 = tuple(float(v) for v in bounding_box_min)  # type: ignore[assignment]
        self.bounding_box_max: Vec3 = tuple(float(v) for v in bounding_box_max)  # type: ignore[assignment]
        self.refresh_interval = float(refresh_interval)
        self._latest: dict[str, Tensor] = {}
        self._step: int | None = None
        self._last_push = -float("inf")
        self._pending: tuple[Tensor, Any] | None = None
        """The last read of the statistics and its copy's completion event (None: on the host already)."""
        self._trainer_lock: threading.Lock | None = None
        self._viewer: Viewer | None = None
        self._worker: threading.Thread | None = None
        self._worker_guard = threading.Lock()
        self.preview_handle: MeshHandle | None = None
        """The preview mesh in the viser scene (None until one was shown)."""
        self.last_preview: trimesh.Trimesh | None = None
        """The latest preview mesh, in the model's frame (None until one was extracted)."""

        # The viewer lists elements in the alphabetical order of their attribute names, hence these names.
        self.viewer_control = _PanelControl(self._on_viewer_ready)
        self.beta = ReadOnlyText(
            "Laplace beta", self._beta_text(), hint="Scale of the Laplace density: it shrinks as the surface sharpens"
        )
        self.eikonal = ReadOnlyText(
            "Eikonal term",
            NOT_YET,
            hint="Mean (|grad f| - 1)^2 of the latest training batch, before the weight "
            f"eikonal_loss_mult={model.config.eikonal_loss_mult:g}",
        )
        self.mesh_grid = ViewerSlider(
            "Preview resolution",
            int(preview_resolution),
            32,
            256,
            32,
            hint="Marching-cubes samples per axis of the preview mesh",
        )
        self.mesh_preview = ViewerButton("Extract preview mesh", cb_hook=self._on_preview_clicked)
        self.mesh_status = ViewerMarkdown("Preview status", self._idle_message())
        self.render_mode = ViewerDropdown(
            "Render mode",
            model.viewer_render_mode,
            ["volume", "surface"],
            cb_hook=self._on_render_mode_changed,
            hint="volume: the method's own rendering; surface: sphere-traced zero level set, a fast preview "
            "(viewer frames only: metrics and exports always volume-render)",
        )
        self.mesh_visible = ViewerCheckbox(
            "Show preview mesh",
            True,
            cb_hook=self._on_visibility_changed,
            hint="Turn off 'Composite depth' to see the mesh where it coincides with the rendered surface",
        )

    def _on_render_mode_changed(self, element: ViewerDropdown) -> None:
        self._model.viewer_render_mode = element.value

    # ---- training statistics -------------------------------------------------------------------------------

    def record_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Keeps the latest ``eikonal`` training metric (a detached tensor: no device sync here)."""
        value = metrics.get("eikonal")
        if isinstance(value, Tensor):
            self._latest["eikonal"] = value.detach()

    def training_callbacks(self, attributes: TrainingCallbackAttributes) -> list[TrainingCallback]:
        """One callback after every training iteration; it pushes the statistics at most every ``refresh_interval``."""
        trainer = attributes.trainer
        if trainer is not None:
            self._trainer_lock = getattr(trainer, "train_lock", None)
        return [TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.publish)]

    def publish(self, step: int, force: bool = False) -> bool:
        """Shows the current beta and the latest eikonal term, read at most every ``refresh_interval`` (at once
        with ``force``); returns whether it read them. Without a viewer nobody would see them, and nothing is read.

        A read on the GPU must not wait: ns-train keeps several steps queued ahead of the GPU, and a wait drains
        that queue (the GPU then idles while the host prepares the next step). The values travel to the host in
        the background and appear at the first later call that finds them there (``force`` waits for them)."""
        self._step = step
        self._show_arrived(wait=False)
        now = time.monotonic()
        if self._viewer is None or (not force and now - self._last_push < self.refresh_interval):
            return False
        self._last_push = now
        with torch.no_grad():
            values = [self._model.density.get_beta().detach().float().reshape(())]
        eikonal = self._latest.get("eikonal")
        if eikonal is not None:
            values.append(eikonal.float().reshape(()))
        self._pending = copy_to_host(torch.stack(values))
        self._show_arrived(wait=force)
        return True

    def _show_arrived(self, wait: bool) -> None:
        """Shows the values of the last read once they are on the host (or waits for them)."""
        if self._pending is None:
            return
        values, copied = self._pending
        if copied is not None and not copied.query():
            if not wait:
                return
            copied.synchronize()
        self._pending = None
        beta, *eikonal = values.tolist()
        self.beta.value = format_value(beta)
        if eikonal:
            self.eikonal.value = format_value(eikonal[0])

    def _beta_text(self) -> str:
        with torch.no_grad():
            return format_value(float(self._model.density.get_beta()))

    # ---- viewer wiring -------------------------------------------------------------------------------------

    def _on_viewer_ready(self, viewer: Viewer) -> None:
        self._viewer = viewer
        self.beta.value = self._beta_text()  # e.g. ns-viewer: the checkpoint was loaded after construction

    def _server(self) -> ViserServer | None:
        return getattr(self.viewer_control, "viser_server", None)

    def _train_lock(self) -> threading.Lock | None:
        """The lock that serialises training steps, renders and GUI callbacks (the trainer's, shared by its viewer)."""
        if self._viewer is not None and self._viewer.train_lock is not None:
            return self._viewer.train_lock
        return self._trainer_lock

    # ---- preview mesh --------------------------------------------------------------------------------------

    def _idle_message(self) -> str:
        lo, hi = self.bounding_box_min, self.bounding_box_max
        return (
            "Press **Extract preview mesh** to mesh the SDF's zero level set as it is now "
            f"(box {lo} to {hi}; training pauses meanwhile)."
        )

    def _set_status(self, text: str) -> None:
        self.mesh_status.content = text

    def _set_button_enabled(self, enabled: bool) -> None:
        if self.mesh_preview.gui_handle is not None:
            self.mesh_preview.set_disabled(not enabled)

    def _on_preview_clicked(self, _button: ViewerButton) -> None:
        # The viewer runs this inside the train lock: hand the work to a thread that takes the lock itself.
        self.start_preview()

    def start_preview(self) -> threading.Thread | None:
        """Starts extracting a preview mesh in the background; None if one is already being extracted."""
        with self._worker_guard:
            if self._worker is not None and self._worker.is_alive():
                return None
            self._worker = threading.Thread(target=self.extract_preview, name="cocoinr-preview-mesh", daemon=True)
            self._set_button_enabled(False)
            self._set_status("Waiting for the current training step or render to finish…")
            self._worker.start()
            return self._worker

    def extract_preview(self) -> trimesh.Trimesh | None:
        """Extracts, shows and returns the preview mesh; reports progress and any failure in the panel."""
        resolution = int(self.mesh_grid.value)
        step = f" at step {self._step}" if self._step is not None else ""
        start = time.perf_counter()
        mesh: trimesh.Trimesh | None = None
        try:
            mesh = extract_preview_mesh(
                self._model,
                resolution,
                self.bounding_box_min,
                self.bounding_box_max,
                lock=self._train_lock(),
                on_locked=lambda: self._set_status(f"Extracting a {resolution}³ preview mesh{step}…"),
            )
            self.last_preview = mesh
            self._show_mesh(mesh)
            status = (
                f"Preview mesh{step}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces "
                f"({resolution}³ grid, {time.perf_counter() - start:.1f} s)."
            )
        except NoSurfaceError as err:
            status = f"No surface yet{step}: {err}"
        except Exception as err:  # a preview must never take training or the viewer down
            CONSOLE.print(f"[bold red]coco-inr preview mesh failed:[/bold red]\n{traceback.format_exc()}")
            status = f"Preview failed{step}: {type(err).__name__}: {err}"
        finally:
            self._set_button_enabled(True)
        self._set_status(status)
        return mesh

    def _show_mesh(self, mesh: trimesh.Trimesh) -> None:
        server = self._server()
        if server is None:
            return
        from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO  # the scene is the model frame, scaled

        self.preview_handle = server.scene.add_mesh_simple(
            PREVIEW_NODE,
            vertices=(np.asarray(mesh.vertices) * VISER_NERFSTUDIO_SCALE_RATIO).astype(np.float32),
            faces=np.asarray(mesh.faces, dtype=np.uint32),
            color=PREVIEW_COLOR,
            side="double",
            visible=bool(self.mesh_visible.value),
        )

    def _on_visibility_changed(self, checkbox: ViewerCheckbox) -> None:
        if self.preview_handle is not None:
            self.preview_handle.visible = bool(checkbox.value)
