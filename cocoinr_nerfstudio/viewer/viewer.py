"""nerfstudio's viewer, repaired for a browser that opens it while ``ns-train`` is still starting.

nerfstudio 1.1.5 shows the *Hide Train Cams* button before ``init_scene`` has drawn the training cameras. A click
in that window raised ``AttributeError`` (no ``camera_handles`` yet) inside ``viser_server.atomic()``, and viser
0.2.7's ``atomic`` does not release its lock when its block raises. Every later broadcast then waited for that lock
for the rest of the run: the page stayed half built (no method panel, step 0, no frames), reloads included, while
training went on. This happened in CI, where the browser test clicks the button as soon as it appears.

:class:`CocoViewer` fixes both: the button works before and while the cameras are drawn, and any exception inside
an ``atomic`` block of this viewer's server or clients releases the lock (the traceback is still printed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import viser
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.viewer.viewer import Viewer

Atomic = Callable[[], AbstractContextManager[None]]


def released_on_errors(atomic: Atomic) -> Atomic:
    """``atomic``, except that a block that raises also leaves it (viser 0.2.7 skips its unlock then).

    The original context is always exited as if the block had ended normally, so viser's own bookkeeping (the
    owning thread, nested calls) runs unchanged; the block's exception then propagates as usual."""

    @contextlib.contextmanager
    def atomic_released_on_errors() -> Iterator[None]:
        context = atomic()
        context.__enter__()
        try:
            yield
        finally:
            context.__exit__(None, None, None)

    return atomic_released_on_errors


class CocoViewer(Viewer):
    """nerfstudio's :class:`Viewer` with the repairs described in this module's docstring."""

    _train_cams_visible: bool = True
    """What the user last asked of the training cameras; a class default, as a click can come during ``__init__``."""

    @property
    def viser_server(self) -> viser.ViserServer:
        return self._viser_server

    @viser_server.setter
    def viser_server(self, server: viser.ViserServer) -> None:
        # nerfstudio's __init__ assigns the server, then adds the buttons: repaired before any callback can run.
        server.atomic = released_on_errors(server.atomic)

        @server.on_client_connect
        def _repair_client(client: viser.ClientHandle) -> None:
            client.atomic = released_on_errors(client.atomic)

        self._viser_server = server

    @check_main_thread
    def set_camera_visibility(self, visible: bool) -> None:
        """Shows or hides the training cameras drawn so far; ``init_scene`` applies the choice to the rest."""
        with self.viser_server.atomic():  # the choice and the handles change together (clicks come from worker threads)
            self._train_cams_visible = visible
            for handle in list(getattr(self, "camera_handles", {}).values()):
                handle.visible = visible

    def init_scene(self, *args, **kwargs) -> None:
        super().init_scene(*args, **kwargs)
        with self.viser_server.atomic():  # a click before (or while) the cameras were drawn
            for handle in self.camera_handles.values():
                handle.visible = self._train_cams_visible
