"""CocoViewer: nerfstudio's viewer, usable from a browser that opens it while ns-train starts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import pytest
import viser
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine import trainer as nerfstudio_trainer
from nerfstudio.viewer.viewer import Viewer
from tiny_models import tiny_config
from viser._messages import ViewerCameraMessage
from websockets.sync.client import connect

from cocoinr_nerfstudio.data.datamanager import CocoDataManagerConfig
from cocoinr_nerfstudio.data.idr_dataparser import IDRDataParserConfig
from cocoinr_nerfstudio.engine.trainer import CocoTrainer
from cocoinr_nerfstudio.pipelines.coco_pipeline import CocoPipelineConfig
from cocoinr_nerfstudio.viewer.viewer import CocoViewer, released_on_errors


def enters_from_another_thread(atomic, timeout: float = 10.0) -> bool:
    """Whether another thread gets into ``atomic()`` within ``timeout`` seconds (False: the lock is held)."""
    entered = threading.Event()

    def enter() -> None:
        with atomic():
            entered.set()

    threading.Thread(target=enter, daemon=True).start()
    return entered.wait(timeout)


@pytest.fixture
def server(free_port):
    server = viser.ViserServer(host="127.0.0.1", port=free_port, verbose=False)
    yield server
    server.stop()


def test_viser_keeps_its_atomic_lock_after_a_block_raises(server):
    """The bug repaired here, in viser 0.2.7 itself (if this starts failing, viser fixed it)."""
    with pytest.raises(KeyError):
        with server.atomic():
            raise KeyError("client")
    assert not enters_from_another_thread(server.atomic, timeout=0.5)
    server._websock_server._atomic_lock.release()  # let the server stop


def test_released_on_errors_lets_other_threads_in_after_a_block_raises(server):
    atomic = released_on_errors(server.atomic)
    with pytest.raises(KeyError, match="client"):
        with atomic():
            raise KeyError("client")
    assert enters_from_another_thread(atomic)
    assert enters_from_another_thread(server.atomic)  # the lock itself is free, not just the wrapper's view of it

    with atomic():  # nested in one thread: viser ignores the inner call, and so does the wrapper, raising or not
        with pytest.raises(KeyError):
            with atomic():
                raise KeyError("inner")
        with atomic():
            pass
        assert not enters_from_another_thread(atomic, timeout=0.5)  # the outer block still holds the lock
    assert enters_from_another_thread(atomic)


@pytest.fixture
def viewer(tiny_scene, tmp_path, free_port) -> CocoViewer:
    pipeline = CocoPipelineConfig(
        datamanager=CocoDataManagerConfig(dataparser=IDRDataParserConfig(data=tiny_scene.path, num_views=3)),
        model=tiny_config(),
    ).setup(device="cpu")
    viewer = CocoViewer(
        ViewerConfig(websocket_host="127.0.0.1", websocket_port=free_port),
        log_filename=tmp_path / "viewer_log.txt",
        datapath=Path(tiny_scene.path),
        pipeline=pipeline,
        train_lock=threading.Lock(),
    )
    yield viewer
    # stop the clients' render threads before the server (a disconnect stops and drops its own thread meanwhile)
    for render_thread in list(viewer.render_statemachines.values()):
        render_thread.running = False
        render_thread.join(timeout=30)
    viewer.viser_server.stop()


def test_hiding_the_training_cameras_before_they_are_drawn_hides_them_once_drawn(viewer):
    viewer.set_camera_visibility(False)  # the button, clicked before init_scene (nerfstudio raised here)
    assert enters_from_another_thread(viewer.viser_server.atomic)

    datamanager = viewer.pipeline.datamanager
    viewer.init_scene(train_dataset=datamanager.train_dataset, train_state="training")
    assert len(viewer.camera_handles) == 3
    assert [handle.visible for handle in viewer.camera_handles.values()] == [False] * 3

    viewer.set_camera_visibility(True)
    assert [handle.visible for handle in viewer.camera_handles.values()] == [True] * 3


def test_a_click_while_the_cameras_are_drawn_hides_all_of_them(viewer, monkeypatch):
    scene = viewer.viser_server.scene
    add_camera_frustum = scene.add_camera_frustum

    added = []

    def add_and_click_during_the_second(*args, **kwargs):
        added.append(add_camera_frustum(*args, **kwargs))
        if len(added) == 2:
            viewer.set_camera_visibility(False)  # one camera drawn and registered, one being drawn, one to come
        return added[-1]

    monkeypatch.setattr(scene, "add_camera_frustum", add_and_click_during_the_second)
    datamanager = viewer.pipeline.datamanager
    viewer.init_scene(train_dataset=datamanager.train_dataset, train_state="training")
    assert len(viewer.camera_handles) == 3
    assert [handle.visible for handle in viewer.camera_handles.values()] == [False] * 3


def connect_a_client(server: viser.ViserServer) -> viser.ClientHandle:
    """What a browser does to become a client: open the websocket and send its camera."""
    camera = ViewerCameraMessage(
        wxyz=(1.0, 0.0, 0.0, 0.0),
        position=(0.0, 0.0, 3.0),
        fov=1.0,
        aspect=1.0,
        look_at=(0.0, 0.0, 0.0),
        up_direction=(0.0, 1.0, 0.0),
    )
    socket = connect(f"ws://127.0.0.1:{server.get_port()}")
    socket.send(msgspec.msgpack.encode(camera.as_serializable_dict()))
    deadline = time.monotonic() + 10
    while not server.get_clients():
        assert time.monotonic() < deadline, "the server did not take the client on within 10 s"
        time.sleep(0.05)
    (client,) = server.get_clients().values()
    client.socket = socket
    return client


def test_the_viewers_server_and_clients_release_the_lock_on_errors(viewer):
    with pytest.raises(AttributeError):
        with viewer.viser_server.atomic():
            raise AttributeError("camera_handles")
    assert enters_from_another_thread(viewer.viser_server.atomic)

    viewer.ready = False  # the client's render thread then waits instead of rendering: this test is about locks
    client = connect_a_client(viewer.viser_server)
    try:
        with pytest.raises(KeyError):
            with client.atomic():
                raise KeyError("render state machine")
        assert enters_from_another_thread(client.atomic)
    finally:
        client.socket.close()


def test_coco_trainer_builds_the_repaired_viewer(monkeypatch):
    seen = []
    monkeypatch.setattr(
        nerfstudio_trainer.Trainer, "setup", lambda self, test_mode: seen.append(nerfstudio_trainer.ViewerState)
    )
    CocoTrainer.__new__(CocoTrainer).setup()
    assert seen == [CocoViewer]
    assert nerfstudio_trainer.ViewerState is Viewer  # restored for anything else in the process


def test_coco_trainer_restores_nerfstudios_viewer_when_setup_fails(monkeypatch):
    def failing_setup(self, test_mode):
        raise FileNotFoundError("cameras.npz")

    monkeypatch.setattr(nerfstudio_trainer.Trainer, "setup", failing_setup)
    with pytest.raises(FileNotFoundError, match=r"cameras\.npz"):
        CocoTrainer.__new__(CocoTrainer).setup()
    assert nerfstudio_trainer.ViewerState is Viewer
