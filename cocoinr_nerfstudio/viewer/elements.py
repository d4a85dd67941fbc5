"""Display-only viewer elements: values the program writes and the user only reads.

nerfstudio's ``Viewer`` rewires the callback of every element it installs so that an update takes the trainer's
train lock and then re-renders every client. That suits inputs, but a value refreshed by the training thread
(which holds the train lock while it runs callbacks) must neither restart the render nor queue for the lock at
each refresh. These elements therefore install without registering any update callback.
"""

from __future__ import annotations

from nerfstudio.viewer.viewer_elements import ViewerElement, ViewerText
from viser import GuiMarkdownHandle, ViserServer


class ReadOnlyText(ViewerText):
    """A disabled text field showing a value written by the program (e.g. a formatted training statistic)."""

    def __init__(self, name: str, default_value: str, hint: str | None = None) -> None:
        super().__init__(name, default_value, disabled=True, hint=hint)

    def install(self, viser_server: ViserServer) -> None:
        self._create_gui_handle(viser_server)  # no on_update: writes never trigger a re-render or take the lock


class ViewerMarkdown(ViewerElement[str]):
    """A block of markdown (status and progress messages); ``content`` can be reassigned at any time."""

    gui_handle: GuiMarkdownHandle | None  # type: ignore[assignment]

    def __init__(self, name: str, content: str, visible: bool = True) -> None:
        super().__init__(name, visible=visible)
        self._content = content

    def _create_gui_handle(self, viser_server: ViserServer) -> None:
        assert self.gui_handle is None, "gui_handle should be initialized once"
        self.gui_handle = viser_server.gui.add_markdown(self._content, visible=self.visible)

    def install(self, viser_server: ViserServer) -> None:
        self._create_gui_handle(viser_server)

    @property
    def content(self) -> str:
        return self._content

    @content.setter
    def content(self, content: str) -> None:
        self._content = content
        if self.gui_handle is not None:
            self.gui_handle.content = content
