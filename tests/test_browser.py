"""The Loop's widget in a real JupyterLab, clicked by a real browser (Debian chromium + playwright).

Skipped with a reason when chromium or playwright is missing; to run it:
`apt-get install -y chromium && .venv/bin/pip install playwright` (never `playwright install`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from _lab import CHROMIUM, jupyter_lab, launch_chromium

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="chromium is not installed (apt-get install -y chromium)")

SETUP = """
import time
import jax, jax.numpy as jnp, numpy as np
from researchlab import ArrayDataProvider, Callback, Clock, Config, Loop, State

class Reg(Config):
    lr: float = 0.1

class RegState(State):
    w: jax.Array
    clock: Clock

def sgd_step(state, config, batch):
    loss, g = jax.value_and_grad(lambda w: jnp.mean((batch["x"] @ w - batch["y"]) ** 2))(state.w)
    return RegState(w=state.w - config.lr * g, clock=state.clock), {"loss": loss}

xs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
provider = ArrayDataProvider({"x": xs, "y": xs @ np.array([1.0, -2.0, 0.5], np.float32)}, batch_size=16)
loop = Loop(Reg(), RegState(w=jnp.zeros(3), clock=Clock()), sgd_step, provider, log_every=1, progress=False,
            callbacks=[Callback(1, lambda lp: time.sleep(0.01))])
"""

LONG_RUN = """
loop.progress = True
state = loop.run(1_000_000)  # stopped by Kernel > Interrupt
print(f"returned at {loop.step_count} with clock {int(state.clock.step)}")
"""


CLOSED_TELEMETRY = """
from researchlab import Telemetry

class ClosesLikeMLflow(Telemetry):
    "Refuses points once closed, as MLFlowTelemetry does."
    shut = False
    def log_metrics(self, metrics, step):
        if self.shut:
            raise RuntimeError("ClosesLikeMLflow is closed; create a new one to log more")
    def log_params(self, params):
        pass
    def close(self):
        self.shut = True

telemetry = ClosesLikeMLflow()
loop.telemetry = telemetry
loop.step()
telemetry.close()  # as the tutorial does before it shows the widget
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    "A fresh JupyterLab server on 127.0.0.1 serving a temp folder with the widget notebook."
    yield from _lab(tmp_path, [SETUP, 'loop.widget(metrics=["loss"], num_steps=40)', LONG_RUN])


@pytest.fixture
def lab_closed_telemetry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    "The same server, with a notebook whose Loop's telemetry was closed before its widget is shown."
    yield from _lab(tmp_path, [SETUP, CLOSED_TELEMETRY, 'loop.widget(metrics=["loss"], num_steps=40)'])


PRIMARY = """
def three_metrics(state, config, batch):
    loss, g = jax.value_and_grad(lambda w: jnp.mean((batch["x"] @ w - batch["y"]) ** 2))(state.w)
    return (RegState(w=state.w - config.lr * g, clock=state.clock),
            {"loss": loss, "wnorm": jnp.linalg.norm(state.w), "gnorm": jnp.linalg.norm(g)})
three_metrics.primary_metrics = ("gnorm", "loss")  # not the first logged ones: the widget must use these

named = Loop(Reg(), RegState(w=jnp.zeros(3), clock=Clock()), three_metrics, provider, log_every=1, progress=False)
named.run(300)
"""

CLIPS = """
from researchlab import Visualizer, clip_slider

class Bar(Visualizer):
    "A bar at the weights' first coordinate; the clip of step s lasts (1 + s // 20) seconds at 10 fps."
    def draw(self, state):
        img = np.zeros((48, 64, 3), np.uint8)
        img[:, 8 + int(abs(float(state.w[0])) * 20) % 48] = 255
        return img
    def clip(self, state):
        return np.stack([self.draw(state)] * (10 * (1 + int(state.clock.step) // 20)))

bar = Bar(clips=True, fps=10)
filmed = Loop(Reg(), RegState(w=jnp.zeros(3), clock=Clock()), sgd_step, provider, visualizer=bar, render_every=20,
              progress=False)
filmed.run(60)
print("clips at", sorted(bar.clips))
"""


@pytest.fixture
def lab_plot(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    "A notebook whose Loop's kernel names its primary metrics, shown by `loop.widget()` with no metrics=..."
    yield from _lab(tmp_path, [SETUP, PRIMARY, "named.widget(num_steps=40)"])


@pytest.fixture
def lab_clips(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    "A notebook that records a clip every 20 steps and shows them with `clip_slider`."
    yield from _lab(tmp_path, [SETUP, CLIPS, "clip_slider(bar)"])


def _lab(tmp_path: Path, cells: list[str]) -> Iterator[tuple[str, Path]]:
    "Start JupyterLab on a notebook of `cells`; yield its URL and the temp folder; stop it afterwards."
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, root / "loop.ipynb")
    with jupyter_lab(tmp_path, root, "loop.ipynb") as url:
        yield url, tmp_path


def test_widget_buttons_drive_the_loop_in_jupyterlab(lab: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, _ = lab
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator(".jp-StatusBar-TextItem", has_text="(ipykernel) | Idle")).to_be_visible(timeout=90_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
            page.locator('li.lm-Menu-item[data-command="runmenu:run-all"]').click()
            counter = page.locator(".step-counter input")
            expect(page.locator("button.step-button")).to_be_visible(timeout=90_000)
            expect(counter).to_have_value("0")

            # Jupyter's interrupt stops the long run after a step; the cell goes on and prints
            expect(page.locator(".jp-OutputArea-output .progress")).to_be_visible(timeout=60_000)  # tqdm.auto bar
            page.wait_for_timeout(1500)
            page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").click()
            page.locator('li.lm-Menu-item[data-command="kernelmenu:interrupt"]').click()
            out = page.locator(".jp-OutputArea-output", has_text="returned at")
            expect(out).to_be_visible(timeout=60_000)
            expect(page.locator(".jp-OutputArea-output", has_text="Loop: stopped at step")).to_be_visible()
            found = re.search(r"returned at (\d+) with clock (\d+)", out.inner_text())
            assert found and found.group(1) == found.group(2), out.inner_text()
            stopped = int(found.group(1))
            assert 0 < stopped < 1_000_000
            expect(page.locator(".jp-StatusBar-TextItem", has_text="(ipykernel) | Idle")).to_be_visible(timeout=30_000)

            page.locator("button.step-button").click()
            expect(counter).to_have_value(str(stopped + 1), timeout=60_000)
            expect(page.locator(".loop-status")).to_contain_text("loss=")

            page.locator("button.run-button").click()  # N = 40
            expect(page.locator(".loop-status")).to_contain_text(f"done at step {stopped + 41}", timeout=60_000)
            expect(counter).to_have_value(str(stopped + 41))
            # plotly.js draws the new points asynchronously after the status text changes: wait for them
            page.wait_for_function("() => document.querySelector('.loop-plot .scatterlayer path.js-line')"
                                   "?.getAttribute('d')?.length > 0", timeout=30_000)

            page.locator(".run-steps input").fill("100000")
            page.locator(".run-steps input").press("Enter")
            page.locator("button.run-button").click()
            expect(page.locator("button.stop-button")).to_be_enabled(timeout=30_000)
            page.wait_for_timeout(1500)
            page.locator("button.stop-button").click()
            expect(page.locator(".loop-status")).to_contain_text("paused at step", timeout=60_000)
            paused = int(re.search(r"paused at step (\d+)", page.locator(".loop-status").inner_text()).group(1))
            assert stopped + 41 < paused < stopped + 100_041
            expect(counter).to_have_value(str(paused))  # the counter's last refresh follows the status text
            expect(page.locator("button.run-button")).to_be_enabled()
        finally:
            browser.close()


def test_widget_shows_an_error_of_its_worker_and_gives_the_buttons_back(lab_closed_telemetry: tuple[str, Path]) -> None:
    "Run N on a Loop whose telemetry was closed: the status line says why it stopped, and the buttons come back."
    from playwright.sync_api import expect, sync_playwright

    url, _ = lab_closed_telemetry
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator(".jp-StatusBar-TextItem", has_text="(ipykernel) | Idle")).to_be_visible(timeout=90_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
            page.locator('li.lm-Menu-item[data-command="runmenu:run-all"]').click()
            expect(page.locator("button.run-button")).to_be_visible(timeout=90_000)
            expect(page.locator(".step-counter input")).to_have_value("1")
            page.locator("button.run-button").click()
            status = page.locator(".loop-status")
            expect(status).to_contain_text("error: RuntimeError: Loop: the telemetry ClosesLikeMLflow could not log",
                                           timeout=60_000)
            expect(status).to_contain_text("ClosesLikeMLflow is closed")
            expect(page.locator("button.run-button")).to_be_enabled()
            expect(page.locator("button.step-button")).to_be_enabled()
            expect(page.locator("button.stop-button")).to_be_disabled()
            expect(page.locator(".step-counter input")).to_have_value("3")  # the steps that ran are kept
        finally:
            browser.close()


def _run_all(page: object, url: str) -> None:
    "Open the notebook, wait for its kernel, and run all cells."
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.locator(".jp-StatusBar-TextItem", has_text="(ipykernel) | Idle")).to_be_visible(timeout=90_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
    page.locator('li.lm-Menu-item[data-command="runmenu:run-all"]').click()


def test_default_plot_is_sharp_svg_of_the_primary_metrics(lab_plot: tuple[str, Path]) -> None:
    "The live plot is vector (SVG at its display size, on a 2x screen), shows the kernel's primary metrics, hovers."
    from playwright.sync_api import expect, sync_playwright

    url, _ = lab_plot
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=2)
            _run_all(page, url)
            svg = page.locator(".loop-plot svg.main-svg").first
            expect(svg).to_be_visible(timeout=90_000)
            page.wait_for_function("() => document.querySelectorAll('.loop-plot .scatterlayer path.js-line').length >= 2"
                                   " && [...document.querySelectorAll('.loop-plot .scatterlayer path.js-line')]"
                                   ".every(p => (p.getAttribute('d') || '').length > 100)", timeout=60_000)
            titles = page.evaluate("() => [...document.querySelectorAll('.loop-plot .annotation-text')]"
                                   ".map(t => t.textContent)")
            assert titles == ["gnorm", "loss"], titles  # the primary metrics, in their order, not the first logged
            geometry = page.evaluate("""() => {
                const plot = document.querySelector('.loop-plot');
                const svg = plot.querySelector('svg.main-svg'), box = svg.getBoundingClientRect();
                return {dpr: window.devicePixelRatio, w: +svg.getAttribute('width'), h: +svg.getAttribute('height'),
                        bw: box.width, bh: box.height, bitmaps: plot.querySelectorAll('img, canvas').length,
                        plotWidth: plot.getBoundingClientRect().width};
            }""")
            assert geometry["dpr"] == 2 and geometry["bitmaps"] == 0, geometry  # vector only: sharp at any density
            assert abs(geometry["w"] - geometry["bw"]) < 1 and abs(geometry["h"] - geometry["bh"]) < 1, geometry
            # two panels side by side, inside the output area and well under the screen's height
            assert 600 <= geometry["bw"] <= geometry["plotWidth"] and geometry["bh"] < 600, geometry
            # hover over the first panel shows plotly's read-out
            drag = page.locator(".loop-plot .nsewdrag").first
            drag.scroll_into_view_if_needed()
            box = drag.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=4)
            expect(page.locator(".loop-plot .hoverlayer .hovertext").first).to_be_visible(timeout=10_000)
            # Run N adds points: the widget's plot follows
            line = "() => document.querySelector('.loop-plot .scatterlayer path.js-line').getAttribute('d')"
            before = page.evaluate(line)
            page.locator("button.run-button").click()
            expect(page.locator(".loop-status")).to_contain_text("done at step 340", timeout=60_000)
            page.wait_for_function(f"b => ({line})() !== b", arg=before, timeout=30_000)
        finally:
            browser.close()


def test_clip_slider_shows_the_clip_of_the_chosen_step(lab_clips: tuple[str, Path]) -> None:
    "Clips at steps 20, 40, 60 last 2, 3 and 4 s; moving the slider to the left end plays step 20's."
    from playwright.sync_api import expect, sync_playwright

    url, _ = lab_clips
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _run_all(page, url)
            expect(page.locator(".jp-OutputArea-output", has_text="clips at [20, 40, 60]")).to_be_visible(timeout=90_000)
            caption = page.locator(".clip-caption")
            expect(caption).to_contain_text("step 60", timeout=60_000)
            duration = "() => document.querySelector('video.clip-video')?.duration"
            page.wait_for_function(f"() => ({duration})() > 0", timeout=30_000)
            assert page.evaluate(duration) == pytest.approx(4.0, abs=0.15)
            handle = page.locator(".clip-slider .noUi-handle").first.bounding_box()
            track = page.locator(".clip-slider .noUi-target").first.bounding_box()
            page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] - 20, handle["y"] + handle["height"] / 2, steps=5)
            page.mouse.up()
            expect(caption).to_contain_text("step 20", timeout=30_000)
            expect(caption).to_contain_text("step_000020.mp4")
            page.wait_for_function(f"() => Math.abs(({duration})() - 2.0) < 0.15", timeout=30_000)
        finally:
            browser.close()
