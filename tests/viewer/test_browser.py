"""The live viewer in a real browser: ``ns-train coco-inr`` on the CPU, driven by headless Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (the README's install command installs them); without them
the test fails with that message rather than skipping, so CI cannot pass it silently.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# WebGL runs on SwiftShader (software), asked for by name: Chromium deprecates falling back to it silently.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=800,600",
)
# The real architecture, narrowed (and with a light sampler) so the CPU renders a low-resolution frame in ~1 s.
TINY_MODEL_FLAGS = (
    "--pipeline.model.codebook-source random",
    "--pipeline.model.random-codebook-shape 64 16",
    "--pipeline.model.codebook-attention.num-latents 8",
    "--pipeline.model.codebook-attention.latent-dim 16",
    "--pipeline.model.codebook-attention.depth 1",
    "--pipeline.model.sdf-field.geometry-hidden-dims 32 32",
    "--pipeline.model.sdf-field.feature-dim 16",
    "--pipeline.model.sdf-field.coordinate-attention.heads 1",
    "--pipeline.model.sdf-field.coordinate-attention.dim-head 8",
    "--pipeline.model.background-field.hidden-dims 32",
    "--pipeline.model.background-field.feature-dim 16",
    "--pipeline.model.background-field.coordinate-attention.heads 1",
    "--pipeline.model.background-field.coordinate-attention.dim-head 8",
    "--pipeline.model.num-samples 8",
    "--pipeline.model.num-samples-eval 8",
    "--pipeline.model.num-samples-extra 2",
    "--pipeline.model.num-samples-outside 4",
    "--pipeline.model.max-total-iters 1",
    "--pipeline.model.beta-iters 3",
    "--pipeline.model.eval-num-rays-per-chunk 512",
    "--pipeline.datamanager.train-num-rays-per-batch 64",
)


# ns-train, with every thread's Python stack written to its log on SIGUSR1: what a stalled viewer was doing.
LAUNCH_TRAINING = (
    "import faulthandler, runpy, signal, sys; "
    "faulthandler.register(signal.SIGUSR1, all_threads=True); "
    "sys.argv[0] = 'ns-train'; "
    "runpy.run_module('nerfstudio.scripts.train', run_name='__main__', alter_sys=True)"
)
# Lines of the progress table that ns-train redraws every few steps (they bury everything else in its log).
PROGRESS_LINE = re.compile(r"^\s*(\d+ \(\d+\.\d+%\)|Step \(% Done\)|-{20,}|Viewer running locally)|^\s*$")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Training:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_without_progress(self, lines: int = 200) -> str:
        """The log's last ``lines`` lines other than the progress table: errors, warnings, thread stacks."""
        text = ANSI_CODE.sub("", self.log.read_text(errors="replace")) if self.log.exists() else ""
        kept = [line for line in text.splitlines() if not PROGRESS_LINE.search(line)]
        return "\n".join(kept[-lines:])

    def thread_stacks(self) -> str:
        """Every ns-train thread's stack (faulthandler, on SIGUSR1), with the rest of the log's non-progress lines."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGUSR1)
            time.sleep(1.0)
        return self.log_without_progress()


def _stop_process_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def training(tiny_scene, tmp_path, free_port) -> Iterator[Training]:
    """A coco-inr training on the CPU with the viewer on 127.0.0.1, long enough to outlast the test."""
    log = tmp_path / "ns-train.log"
    command = [
        sys.executable,
        "-c",
        LAUNCH_TRAINING,
        "coco-inr",
        "--data",
        str(tiny_scene.path),
        "--output-dir",
        str(tmp_path / "outputs"),
        "--machine.device-type",
        "cpu",
        "--vis",
        "viewer",
        "--viewer.websocket-host",
        "127.0.0.1",
        "--viewer.websocket-port",
        str(free_port),
        "--viewer.quit-on-train-completion",
        "True",
        "--max-num-iterations",
        "100000",
        *" ".join(TINY_MODEL_FLAGS).split(),
        "idr-data",
        "--num-views",
        "3",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    run = Training(url=f"http://127.0.0.1:{free_port}", process=process, log=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"ns-train exited ({process.returncode}) before its viewer came up:\n{run.log_tail()}")
            try:
                with urllib.request.urlopen(run.url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the viewer did not answer at {run.url} within 120 s:\n{run.log_tail()}")
            time.sleep(0.5)
        yield run
    finally:
        _stop_process_group(process)


@pytest.fixture
def browser(tmp_path):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"browser test needs {' and '.join(missing)}: install Debian's packages with "
            "`apt-get install -y chromium chromium-driver` (the README's install command does)",
            pytrace=False,
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("browser test needs selenium: pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path below, selenium-manager downloads nothing
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for failure reports
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The viewer page: its text, its controls and the render area of its 3D canvas."""

    def __init__(self, driver, training: Training, artifacts: Path) -> None:
        self.driver = driver
        self.training = training
        self.artifacts = artifacts

    def poll(self, condition: Callable[[], object], timeout: float, what: str):
        """Polls ``condition`` until it returns something other than None or False, and returns that; None once
        ``timeout`` has passed."""
        deadline = time.monotonic() + timeout
        while True:
            if self.training.process.poll() is not None:
                pytest.fail(f"ns-train exited while waiting for {what}:\n{self.training.log_tail()}")
            value = condition()
            if value is not None and value is not False:
                return value
            if time.monotonic() > deadline:
                return None
            time.sleep(0.25)

    def wait(self, condition: Callable[[], object], timeout: float, what: str):
        """:meth:`poll`, failing the test (with a screenshot, the page's text and the log) on a timeout."""
        value = self.poll(condition, timeout, what)
        if value is None:
            self.driver.save_screenshot(str(self.artifacts / "timeout.png"))
            pytest.fail(
                f"no {what} within {timeout:.0f} s (screenshot: {self.artifacts / 'timeout.png'});\n{self.report()}"
            )
        return value

    def report(self) -> str:
        """What a stalled run leaves to go on: the page's text and console, ns-train's threads and log."""
        return (
            f"page text:\n{self.text()}\n"
            f"browser console:\n{self.console()}\n"
            f"ns-train log without its progress table, and its threads' stacks:\n{self.training.thread_stacks()}"
        )

    def console(self) -> str:
        try:
            entries = self.driver.get_log("browser")
        except Exception as error:  # a driver without the log endpoint: say so instead of hiding the report
            return f"(unavailable: {error})"
        return "\n".join(f"{entry['level']}: {entry['message']}" for entry in entries)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def button(self, label: str):
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.XPATH, f"//button[normalize-space()='{label}']")
        return found[0] if found else None

    def input_after(self, label: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.XPATH, f"//label[normalize-space()='{label}']/following::input[1]")

    def step(self) -> int | None:
        """The training step the viewer last reported (its stats line)."""
        match = re.search(r"Step: (\d+)", self.text())
        return int(match[1]) if match else None

    def resolution(self) -> tuple[int, int] | None:
        match = re.search(r"Resolution: (\d+)x(\d+)px", self.text())
        return (int(match[1]), int(match[2])) if match else None

    def canvas(self):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, "canvas[data-engine]")

    def drag(self, *offsets: tuple[int, int]) -> None:
        """Drags on the 3D canvas by ``offsets`` in turn (pixels): the camera orbits."""
        from selenium.webdriver.common.action_chains import ActionChains

        chain = ActionChains(self.driver).move_to_element(self.canvas()).click_and_hold()
        for dx, dy in offsets:
            chain = chain.move_by_offset(dx, dy)
        chain.release().perform()

    def render_area(self, top: float = 0.03, bottom: float = 0.75) -> np.ndarray:
        """Pixels of the 3D canvas between two heights (fractions), above the axes gizmo in its lower corner."""

        rect = self.canvas().rect
        shot = np.asarray(Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB"), np.float32)
        scale = shot.shape[1] / self.driver.execute_script("return window.innerWidth")
        x, y, w, h = (scale * rect[k] for k in ("x", "y", "width", "height"))
        return shot[int(y + top * h) : int(y + bottom * h), int(x + 0.03 * w) : int(x + 0.97 * w)]

    def render_band(self) -> np.ndarray:
        """The upper band of the render area, away from viser's centred loading logo."""
        return self.render_area(0.03, 0.3)

    def settled(self, area: Callable[[], np.ndarray]) -> np.ndarray | None:
        """``area()`` if it stays the same for a second (no frame or scene change in flight), else None."""
        first = area()
        time.sleep(1.0)
        second = area()
        return second if np.abs(second - first).mean() < 0.5 else None


def test_live_viewer_renders_follows_the_camera_and_runs_the_method_panel(browser, training, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, training, tmp_path)
    browser.get(training.url)
    page.wait(lambda: page.button("Pause Training"), 60, "connected viewer")
    # clicked as soon as it shows, often before ns-train has drawn the cameras: nerfstudio's own viewer then froze
    # the page for the whole run (see cocoinr_nerfstudio.viewer.viewer)
    page.button("Hide Train Cams").click()  # the render area then shows the model's frames only
    max_res = browser.find_element(
        By.XPATH, "//label[normalize-space()='Max res']/following::input[starts-with(@id, 'mantine')][1]"
    )
    max_res.send_keys(Keys.CONTROL, "a")
    max_res.send_keys("64", Keys.TAB)  # keep full-resolution CPU renders short
    page.wait(lambda: (page.step() or 0) > 0, 60, "training step in the viewer")

    # a rendered frame: the viewer reports its size and the render area is no longer the empty dark canvas
    page.wait(lambda: page.resolution() not in (None, (0, 0)), 90, "rendered frame")
    band = page.wait(lambda: b if (b := page.render_band()).std() > 2.0 else None, 30, "non-blank render area")
    assert band.std() > 2.0
    Image.fromarray(band.astype(np.uint8)).save(tmp_path / "first_frame.png")

    # the method panel shows live training statistics: the eikonal term appears, beta leaves its initial value
    def panel_values():
        values = [page.input_after(label).get_attribute("value") for label in ("Laplace beta", "Eikonal term")]
        return values if values[0] != "0.1001" and values[1] != "–" else None

    beta, eikonal = (float(value) for value in page.wait(panel_values, 60, "training statistics in the panel"))
    assert beta > 0.0 and eikonal >= 0.0

    # freeze the model, let the full-resolution frame land and settle, then move the camera
    page.button("Pause Training").click()
    page.wait(lambda: page.button("Resume Training"), 10, "paused training")
    page.wait(lambda: max(page.resolution() or (0, 0)) == 64, 60, "full-resolution (64 px) frame")

    before = page.wait(lambda: page.settled(page.render_band), 60, "settled frame")
    page.drag((90, 30), (60, 20))
    after = page.wait(
        lambda: b if np.abs((b := page.render_band()) - before).mean() > 3.0 else None,
        60,
        "frame from the moved camera",
    )
    assert np.abs(after - before).mean() > 3.0
    Image.fromarray(after.astype(np.uint8)).save(tmp_path / "moved_frame.png")

    # the preview button meshes the current SDF, reports it in the panel and adds it to the 3D scene
    without_mesh = page.wait(lambda: page.settled(page.render_area), 60, "settled view")
    page.button("Extract preview mesh").click()
    status = page.wait(
        lambda: re.search(r"(Preview mesh at step \d+: (\d+) vertices|No surface yet|Preview failed).*", page.text()),
        60,
        "preview mesh status",
    )
    assert status[0].startswith("Preview mesh at step"), status[0]
    assert int(status[2]) > 100
    page.wait(
        lambda: b if np.abs((b := page.render_area()) - without_mesh).mean() > 2.0 else None, 30, "mesh in the view"
    )
    browser.save_screenshot(str(tmp_path / "preview_mesh.png"))
    assert training.process.poll() is None, training.log_tail()
