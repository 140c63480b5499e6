"""The web app served (diffedit/app.py): its API through gradio_client, its page in a real browser, its working size,
stopping a run, its one-line errors and its command line. The handlers alone, without a server, are tested in
test_app_handlers.py, the session state in test_app_state.py.

One server on a free loopback port serves the shipped toy model (64 px scenes, 10 DDIM steps, 4 noises to keep
the module near a minute on 2 cores); gradio, gradio_client and (for the browser) Playwright with the system
Chromium are the 'app' extra's test dependencies. Timings are printed (pytest -s).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # gradio's own pandas deprecations
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from diffedit.app import build_app, launch  # noqa: E402
from diffedit.app_state import FULL_SIZE_BUDGET, AppModel  # noqa: E402
from diffedit.cli import APP_MISSING, add_app_parser, run_app  # noqa: E402
from diffedit.frontend import UsageError  # noqa: E402
from diffedit.settings import METHODS, EditSettings  # noqa: E402
from diffedit.toy import world  # noqa: E402

STEPS, N = 10, 4
ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Gate:
    """Around the model's eps: each call's start time and latent size (h, w) in ``calls``; ``delay`` s of sleep in
    each call, to make a run long enough to stop."""

    def __init__(self, eps):
        self.eps, self.delay, self.calls = eps, 0.0, []

    def __call__(self, x, t, context):
        self.calls.append((time.perf_counter(), tuple(x.shape[-2:])))
        time.sleep(self.delay)
        return self.eps(x, t, context)

    def sizes(self, since: int = 0) -> set:
        return {size for _, size in self.calls[since:]}


@pytest.fixture(scope="module")
def server():
    """(url, model, gate): the app on the toy model; ``model.evals.count`` counts every UNet evaluation."""
    from diffedit.pipeline import DiffEdit
    de = DiffEdit.from_pretrained("toy")
    gate = de.eps = Gate(de.eps)
    model = AppModel(de)
    demo = build_app(model, EditSettings(steps=STEPS, n=N), toy=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, "127.0.0.1", port, quiet=True)
    yield f"http://127.0.0.1:{port}/", model, gate
    demo.close()


def client(url) -> Client:
    return Client(url, analytics_enabled=False, verbose=False)


def scene_file(folder: Path, index: int, size=None, kinds=("colour",)):
    """(path, source caption, target caption) of a held-out toy edit, resized to ``size`` if given."""
    e = world.edits(index + 1, world.EVAL_SEED, kinds=kinds)[index]
    image = Image.fromarray(e.source.render())
    if size is not None:
        image = image.resize(size, Image.NEAREST)
    path = folder / f"scene{index}.png"
    image.save(path)
    return path, e.source_caption, e.target_caption


def white(path_or_bytes) -> int:
    image = Image.open(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes)
    return int((np.asarray(image.convert("L")) > 127).sum())


def counted(model, call):
    """(result, UNet evaluations it ran)."""
    before = model.evals.count
    out = call()
    return out, model.evals.count - before


def wait_for(condition, timeout=30.0, sleep=time.sleep):
    t = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t < timeout, "timed out"
        sleep(0.005)


# --- the API ------------------------------------------------------------------------------------------------

def test_mask_and_edit_come_back_at_the_input_size_and_leave_the_file_alone(server, tmp_path):
    url, model, _ = server
    path, source, target = scene_file(tmp_path, 0, size=(72, 40))  # not multiples of the model's 16
    digest = hashlib.sha1(path.read_bytes()).digest()
    c = client(url)
    mask, heat = c.predict(handle_file(str(path)), source, target, 0.5, api_name="/mask")
    edited, mask2 = c.predict(handle_file(str(path)), source, target, 0.7, 0.5, api_name="/edit")
    for out in (mask, heat, edited, mask2):
        assert Image.open(out).size == (72, 40)
    assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(mask2)))
    assert hashlib.sha1(path.read_bytes()).digest() == digest


def test_a_photo_is_worked_at_the_models_size_and_returned_at_its_own(server, tmp_path):
    """451 x 300 on the 64 px toy model: the UNet sees 64 x 48 px (16 x 12 latent cells), the results are 451 x 300;
    full size is worked at the input's size within the budget and refused above it in one line."""
    url, _, gate = server
    path, source, target = scene_file(tmp_path, 5, size=(451, 300))
    c, before = client(url), len(gate.calls)
    t = time.perf_counter()
    edited, mask = c.predict(handle_file(str(path)), source, target, 0.7, 0.5, api_name="/edit")
    print(f"[app] 451 x 300 /edit at the native 64 px: {time.perf_counter() - t:.2f} s")
    assert gate.sizes(before) == {(12, 16)}
    assert Image.open(edited).size == Image.open(mask).size == (451, 300)
    small, _, _ = scene_file(tmp_path, 6, size=(96, 80))  # 7680 px: within 4 x 64 x 64
    before = len(gate.calls)
    edited, _ = c.predict(handle_file(str(small)), source, target, 0.7, 0.5, True, api_name="/edit")
    assert gate.sizes(before) == {(20, 24)} and Image.open(edited).size == (96, 80)
    assert FULL_SIZE_BUDGET * 64 ** 2 < 451 * 300
    before = len(gate.calls)
    with pytest.raises(AppError, match="Full size is 451 x 300 px"):
        c.predict(handle_file(str(path)), source, target, 0.7, 0.5, True, api_name="/edit")
    assert len(gate.calls) == before


def test_threshold_and_smaller_ratio_reuse_the_session_cache(server, tmp_path):
    url, model, _ = server
    path, source, target = scene_file(tmp_path, 1)
    c, image = client(url), handle_file(str(path))
    (mask_05, _), first = counted(model, lambda: c.predict(image, source, target, 0.5, api_name="/mask"))
    assert first == 2 * N                                    # the mask pass: query and reference rows
    t = time.perf_counter()
    (mask_02, _), again = counted(model, lambda: c.predict(image, source, target, 0.2, api_name="/mask"))
    print(f"[app] /mask at a new threshold: {time.perf_counter() - t:.3f} s round trip, {again} UNet evaluations")
    assert again == 0 and white(mask_02) > white(mask_05)
    _, edit_08 = counted(model, lambda: c.predict(image, source, target, 0.8, 0.5, api_name="/edit"))
    assert edit_08 == STEPS + 2 * 8                          # inversion to ratio 1, then 8 guided decoding steps
    t = time.perf_counter()
    _, edit_04 = counted(model, lambda: c.predict(image, source, target, 0.4, 0.5, api_name="/edit"))
    print(f"[app] /edit at a smaller ratio: {time.perf_counter() - t:.3f} s round trip, {edit_04} UNet evaluations")
    assert edit_04 == 2 * 4                                  # decoding only: no inversion step, no mask pass


def test_two_clients_do_not_share_state(server, tmp_path):
    url, model, _ = server
    path, source, target = scene_file(tmp_path, 2)
    a, b = client(url), client(url)
    _, cost_a = counted(model, lambda: a.predict(handle_file(str(path)), source, target, 0.5, api_name="/mask"))
    _, cost_b = counted(model, lambda: b.predict(handle_file(str(path)), source, target, 0.5, api_name="/mask"))
    _, again_a = counted(model, lambda: a.predict(handle_file(str(path)), source, target, 0.4, api_name="/mask"))
    assert cost_a == cost_b == 2 * N and again_a == 0        # b found nothing of a's in its own session


def test_a_stopped_run_ends_within_one_unet_call_and_the_next_session_goes_on(server, tmp_path):
    """Stop through the API (/stop, and Job.cancel()) while the model is slowed to 0.2 s a call: the run starts
    no UNet call after it, and another session's edit, queued behind, starts at once."""
    url, _, gate = server
    path, source, target = scene_file(tmp_path, 7)                    # 64 x 64: 16 x 16 latent cells
    other, _, _ = scene_file(tmp_path, 8, size=(64, 32))             # 16 x 8: its calls are told apart
    a, b = client(url), client(url)
    gate.delay = 0.2
    try:
        for stop in ("/stop", "cancel"):
            before = len(gate.calls)
            job = a.submit(handle_file(str(path)), source + stop, target, 1.0, 0.5, api_name="/edit")
            wait_for(lambda: len(gate.calls) >= before + 2)
            queued = b.submit(handle_file(str(other)), source + stop, target, 0.7, 0.5, api_name="/edit")
            time.sleep(0.3)
            t_stop = time.perf_counter()
            if stop == "/stop":
                a.predict(api_name="/stop")
            else:
                job.cancel()
            wait_for(lambda: (8, 16) in gate.sizes(before))
            next_start = min(t for t, size in gate.calls[before:] if size == (8, 16)) - t_stop
            late = [t for t, size in gate.calls[before:] if size == (16, 16) and t > t_stop]
            print(f"[app] {stop}: stop -> another session's edit starts in {next_start:.2f} s "
                  f"(model slowed to {gate.delay} s a call)")
            assert len(late) <= 1  # at most a call that began while the stop was on its way
            assert next_start < 2 * gate.delay + 2.0  # the running UNet call ends, then the queue moves on
            if stop == "/stop":
                with pytest.raises(AppError, match="Stopped"):
                    job.result(timeout=30)
            assert Image.open(queued.result(timeout=60)[0]).size == (64, 32)
    finally:
        gate.delay = 0.0
    edited, _ = a.predict(handle_file(str(path)), source, target, 0.7, 0.5, api_name="/edit")  # the flag cleared
    assert Image.open(edited).size == (64, 64)


def test_bad_input_gets_a_one_line_message_and_the_server_lives(server, tmp_path, caplog, capfd):
    url, _, _ = server
    path, source, target = scene_file(tmp_path, 3)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    c = client(url)
    caplog.set_level(logging.INFO, logger="diffedit")
    for image, tgt, threshold, expected in (
            (None, target, 0.5, "No image"), (handle_file(str(text)), target, 0.5, "not an image"),
            (handle_file(str(path)), "  ", 0.5, "target text is empty"),
            (handle_file(str(path)), target, 1.5, "1.5")):  # gradio checks the slider's range itself
        with pytest.raises(AppError, match=expected):
            c.predict(image, source, tgt, threshold, api_name="/mask")
    refused = [r.getMessage() for r in caplog.records if r.name.startswith("diffedit.app")]
    assert len(refused) == 4 and all(m.startswith("refused: ") and "\n" not in m for m in refused)
    assert "Traceback" not in capfd.readouterr().err
    wide = tmp_path / "wide.png"
    Image.open(path).resize((2100, 20)).save(wide)       # over the 2048 px side cap: shrunk, not refused
    mask, _ = c.predict(handle_file(str(wide)), source, target, 0.5, api_name="/mask")
    assert max(Image.open(mask).size) == 2048
    assert Image.open(c.predict(handle_file(str(path)), source, target, 0.5, api_name="/mask")[0]).size == (64, 64)


def test_draw_a_toy_scene_names_its_edit_and_clears_the_last_outputs(server):
    image, source, target, note, *outputs, cost = client(server[0]).predict(api_name="/draw_scene")
    assert Image.open(image).size == (world.SIZE, world.SIZE) and source != target and "background" in source
    assert any(f"**{kind}** edit" in note for kind in world.EDIT_KINDS)
    assert outputs == [None] * len(outputs) and "none yet" in cost


def test_four_clients_editing_at_once_all_succeed(server, tmp_path):
    url, _, _ = server
    jobs = [scene_file(tmp_path, 10 + i) for i in range(20)]
    results, errors = [], []

    def work(k):
        c = client(url)
        for path, source, target in jobs[5 * k: 5 * k + 5]:
            try:
                results.append(c.predict(handle_file(str(path)), source, target, 0.7, 0.5, api_name="/edit"))
            except Exception as e:  # reported below with the others
                errors.append(e)
    t = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(f"[app] 4 clients x 5 edits: {time.perf_counter() - t:.1f} s")
    assert not errors and len(results) == 20
    assert all(Image.open(edited).size == (64, 64) for edited, _ in results)


# --- the page in a browser ----------------------------------------------------------------------------------

def test_page_in_a_browser(server, tmp_path):
    """Upload a 451 x 300 photo, type, edit (the working size is shown); a refused full-size edit keeps its reason on
    the page and the panes as they were; drag the threshold (the mask changes), paint
    a stroke (the mask grows); slowed edits stop on Stop and when the page is closed; no request leaves loopback.
    Saves a screenshot: to $DIFFEDIT_APP_SCREENSHOT when set (docs/app.png is made so), else into the test's folder,
    so a test run leaves the tree as it was."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system Chromium (apt-get install -y chromium chromium-driver)")
    url, model, gate = server
    path, source, target = scene_file(tmp_path, 4, size=(451, 300))
    start, outside = time.perf_counter(), []

    def only_loopback(route):
        parts = urlparse(route.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in LOOPBACK:
            outside.append(route.request.url)
            return route.abort()
        return route.continue_()

    with sync_api.sync_playwright() as p:
        # Every request of the page waits for only_loopback, which runs only while the test is inside a Playwright
        # call: the test waits in page.wait_for_timeout (pump), never in time.sleep, or a click's request is held
        def pump(seconds):
            page.wait_for_timeout(seconds * 1000)

        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.route("**/*", only_loopback)
        page.goto(url)
        page.locator("#input-image input[type=file]").set_input_files(str(path))
        page.locator("#source textarea").fill(source)
        page.locator("#target textarea").fill(target)
        page.wait_for_selector("#input-image img")
        page.locator("#run").click()
        page.wait_for_selector("#edit img", timeout=60_000)
        page.wait_for_selector("#mask img")
        assert "worked at 64 x 48 px (the model's 64 px), shown at 451 x 300" in page.locator("#status").inner_text()

        # refused (full size over the budget): the reason stays in the status line, the panes keep the last edit
        shown = {pane: page.locator(f"#{pane} img").get_attribute("src") for pane in ("heat", "mask", "edit")}
        page.locator("#full-size input").check()
        page.locator("#run").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('Refused')")
        page.wait_for_timeout(2000)  # a toast would be fading by now
        assert "Full size is 451 x 300 px" in page.locator("#status").inner_text()
        assert page.locator("#status").is_visible() and page.locator(".toast-body").count() == 0
        for pane, src in shown.items():
            assert page.locator(f"#{pane} img").get_attribute("src") == src
            assert "Error" not in page.locator(f"#{pane}").inner_text()
        page.locator("#full-size input").uncheck()

        def mask_src():
            return page.locator("#mask img").get_attribute("src")

        def changed(locator_src, old, timeout=30.0):
            t = time.perf_counter()
            while locator_src() == old:
                assert time.perf_counter() - t < timeout, "the page did not update"
                pump(0.005)
            return time.perf_counter() - t

        def mask_white():
            return white(urllib.request.urlopen(mask_src()).read())

        src, before = mask_src(), mask_white()
        slider = page.locator("#knob-threshold input[type=range]").bounding_box()
        y = slider["y"] + slider["height"] / 2
        page.mouse.move(slider["x"] + 0.5 * slider["width"], y)
        page.mouse.down()
        page.mouse.move(slider["x"] + 0.85 * slider["width"], y)
        slider_trip = changed(mask_src, src)
        page.mouse.up()
        page.wait_for_timeout(1500)  # the release: the edit decodes again and the editor is refreshed
        raised = mask_white()
        assert raised < before

        def edit_src():
            return page.locator("#edit img").get_attribute("src")

        page.locator("#editor button[aria-label=Brush]").click()
        canvas = page.locator("#editor canvas").first.bounding_box()
        src, edit = mask_src(), edit_src()
        page.mouse.move(canvas["x"] + 0.3 * canvas["width"], canvas["y"] + 0.2 * canvas["height"])
        page.mouse.down()
        page.mouse.move(canvas["x"] + 0.7 * canvas["width"], canvas["y"] + 0.8 * canvas["height"], steps=20)
        page.mouse.up()
        paint_trip = changed(mask_src, src)
        assert mask_white() > raised
        changed(edit_src, edit)  # then the edit, decoded with the painted mask
        page.wait_for_timeout(300)  # let the page settle, so the ratio's round trip is measured alone

        page.locator("#knob-ratio input[type=range]").scroll_into_view_if_needed()  # a stroke scrolls the page
        ratio = page.locator("#knob-ratio input[type=range]").bounding_box()
        edit, before = edit_src(), model.evals.count
        page.mouse.click(ratio["x"] + 0.5 * ratio["width"], ratio["y"] + ratio["height"] / 2)
        ratio_trip = changed(edit_src, edit)
        k = round(float(page.locator("#knob-ratio input[type=number]").input_value()) * STEPS)
        assert model.evals.count - before == 2 * k  # decoding only: no inversion step
        page.locator("#compare").click()
        for method in METHODS:  # Compare done before the next action, which would otherwise cancel it
            page.wait_for_selector(f"#method-{method} img", timeout=60_000)
        wait_for(lambda: "Last action" in page.locator("#status").inner_text()
                 and not page.locator("#status .progress-text, #status .eta-bar").count(), sleep=pump)
        page.wait_for_timeout(500)
        page.screenshot(path=os.environ.get("DIFFEDIT_APP_SCREENSHOT", str(tmp_path / "app.png")), full_page=True)

        gate.delay = 0.2  # slow edits (new seeds: the mask pass again): one stopped by Stop, one by closing the page
        after = []
        try:
            for seed, stop in (("7", page.locator("#stop").click), ("8", page.close)):
                page.locator("#knob-seed input").fill(seed)
                before = len(gate.calls)
                page.locator("#run").click()
                try:
                    wait_for(lambda: len(gate.calls) >= before + 2, sleep=pump)
                except AssertionError:  # say where it stuck: which run, what the page shows
                    status = page.locator("#status").inner_text()
                    raise AssertionError(f"seed {seed}: no model call after Run; status {status!r}") from None
                asked = time.perf_counter()
                stop()
                (pump if seed == "7" else time.sleep)(2.0)  # a closed page has no requests left to hold
                after.append(len([t for t, _ in gate.calls[before:] if t > asked]))
                if seed == "7":
                    assert "stopped" in page.locator("#status").inner_text()
        finally:
            gate.delay = 0.0
        browser.close()
    print(f"[app] browser: threshold drag -> mask {slider_trip * 1000:.0f} ms, stroke -> mask {paint_trip * 1000:.0f} "
          f"ms, ratio click -> edit {ratio_trip * 1000:.0f} ms; UNet calls begun after Stop, after closing the page: "
          f"{after}; whole test {time.perf_counter() - start:.1f} s")
    assert max(after) <= 1 and outside == []


# --- the command line --------------------------------------------------------------------------------------

def test_command_line_flags_and_the_app_module_loads_only_when_it_runs():
    parser = argparse.ArgumentParser()
    add_app_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app"])
    assert (args.model, args.device, args.port, args.host) == ("toy", "cpu", 7860, "127.0.0.1") and args.dtype
    assert args.run is run_app
    with pytest.raises(UsageError, match="--port"):
        run_app(parser.parse_args(["app", "--port", "70000"]))
    code = ("import sys, diffedit.cli; assert not {'torch', 'gradio', 'diffedit.app'} & set(sys.modules), "
            "sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_app_without_gradio_says_how_to_install_it_in_one_line():
    code = "import sys; sys.modules['gradio'] = None; from diffedit.cli import main; main(['app'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == f"diffedit: error: {APP_MISSING}\n"
