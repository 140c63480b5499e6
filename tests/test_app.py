"""The web app (diffedit/app.py): its API through gradio_client, its page in a real browser, its cache bound, its
working size, stopping a run and its one-line errors.

One server on a free loopback port serves the shipped toy model (64 px scenes, 10 DDIM steps, 4 noises to keep
the module near a minute on 2 cores); gradio, gradio_client and (for the browser) Playwright with the system
Chromium are the 'app' extra's test dependencies. Timings are printed (pytest -s).
"""
from __future__ import annotations

import argparse
import copy
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
import torch
from PIL import Image

pytest.importorskip("gradio")
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # gradio's own pandas deprecations
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from diffedit import viz  # noqa: E402
from diffedit.app import ADD, ERASE, MISSING, add_app_parser, build_app, launch, run_app, split_strokes  # noqa: E402
from diffedit.app_state import FULL_SIZE_BUDGET, Cancelled, LRUCache, Session, _picture  # noqa: E402
from diffedit.frontend import UsageError  # noqa: E402
from diffedit.settings import EditSettings  # noqa: E402
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
    """(url, engine, gate): the app on the toy model; ``engine.evals.count`` counts every UNet evaluation."""
    from diffedit.app_state import Engine
    from diffedit.pipeline import DiffEdit
    de = DiffEdit.from_pretrained("toy")
    gate = de.eps = Gate(de.eps)
    engine = Engine(de)
    demo = build_app(engine, EditSettings(steps=STEPS, n=N), toy=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, "127.0.0.1", port, quiet=True)
    yield f"http://127.0.0.1:{port}/", engine, gate
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


def counted(engine, call):
    """(result, UNet evaluations it ran)."""
    before = engine.evals.count
    out = call()
    return out, engine.evals.count - before


def wait_for(condition, timeout=30.0):
    t = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t < timeout, "timed out"
        time.sleep(0.005)


# --- the API ------------------------------------------------------------------------------------------------

def test_mask_and_edit_come_back_at_the_input_size_and_leave_the_file_alone(server, tmp_path):
    url, engine, _ = server
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
    url, engine, _ = server
    path, source, target = scene_file(tmp_path, 1)
    c, image = client(url), handle_file(str(path))
    (mask_05, _), first = counted(engine, lambda: c.predict(image, source, target, 0.5, api_name="/mask"))
    assert first == 2 * N                                    # the mask pass: query and reference rows
    t = time.perf_counter()
    (mask_02, _), again = counted(engine, lambda: c.predict(image, source, target, 0.2, api_name="/mask"))
    print(f"[app] /mask at a new threshold: {time.perf_counter() - t:.3f} s round trip, {again} UNet evaluations")
    assert again == 0 and white(mask_02) > white(mask_05)
    _, edit_08 = counted(engine, lambda: c.predict(image, source, target, 0.8, 0.5, api_name="/edit"))
    assert edit_08 == STEPS + 2 * 8                          # inversion to ratio 1, then 8 guided decoding steps
    t = time.perf_counter()
    _, edit_04 = counted(engine, lambda: c.predict(image, source, target, 0.4, 0.5, api_name="/edit"))
    print(f"[app] /edit at a smaller ratio: {time.perf_counter() - t:.3f} s round trip, {edit_04} UNet evaluations")
    assert edit_04 == 2 * 4                                  # decoding only: no inversion step, no mask pass


def test_two_clients_do_not_share_state(server, tmp_path):
    url, engine, _ = server
    path, source, target = scene_file(tmp_path, 2)
    a, b = client(url), client(url)
    _, cost_a = counted(engine, lambda: a.predict(handle_file(str(path)), source, target, 0.5, api_name="/mask"))
    _, cost_b = counted(engine, lambda: b.predict(handle_file(str(path)), source, target, 0.5, api_name="/mask"))
    _, again_a = counted(engine, lambda: a.predict(handle_file(str(path)), source, target, 0.4, api_name="/mask"))
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
    caplog.set_level(logging.INFO, logger="diffedit.app")
    for image, tgt, threshold, expected in (
            (None, target, 0.5, "No image"), (handle_file(str(text)), target, 0.5, "not an image"),
            (handle_file(str(path)), "  ", 0.5, "target text is empty"),
            (handle_file(str(path)), target, 1.5, "1.5")):  # gradio checks the slider's range itself
        with pytest.raises(AppError, match=expected):
            c.predict(image, source, tgt, threshold, api_name="/mask")
    refused = [r.getMessage() for r in caplog.records if r.name == "diffedit.app"]
    assert len(refused) == 4 and all(m.startswith("refused: ") and "\n" not in m for m in refused)
    assert "Traceback" not in capfd.readouterr().err
    wide = tmp_path / "wide.png"
    Image.open(path).resize((2100, 20)).save(wide)       # over the 2048 px side cap: shrunk, with a warning
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
    """Upload a 451 x 300 photo, type, edit (the working size is shown); drag the threshold (the mask changes), paint
    a stroke (the mask grows); slowed edits stop on Stop and when the page is closed; no request leaves loopback.
    Saves a screenshot: to $DIFFEDIT_APP_SCREENSHOT when set (docs/app.png is made so), else into the test's folder,
    so a test run leaves the tree as it was."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system Chromium (apt-get install -y chromium chromium-driver)")
    url, engine, gate = server
    path, source, target = scene_file(tmp_path, 4, size=(451, 300))
    start, outside = time.perf_counter(), []

    def only_loopback(route):
        parts = urlparse(route.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in LOOPBACK:
            outside.append(route.request.url)
            return route.abort()
        return route.continue_()

    with sync_api.sync_playwright() as p:
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
        assert "worked at 64 x 48 px (the model's 64 px), shown at 451 x 300" in page.locator("#cost").inner_text()

        def mask_src():
            return page.locator("#mask img").get_attribute("src")

        def changed(locator_src, old, timeout=30.0):
            t = time.perf_counter()
            while locator_src() == old:
                assert time.perf_counter() - t < timeout, "the page did not update"
                time.sleep(0.005)
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
        edit, before = edit_src(), engine.evals.count
        page.mouse.click(ratio["x"] + 0.5 * ratio["width"], ratio["y"] + ratio["height"] / 2)
        ratio_trip = changed(edit_src, edit)
        k = round(float(page.locator("#knob-ratio input[type=number]").input_value()) * STEPS)
        assert engine.evals.count - before == 2 * k  # decoding only: no inversion step
        page.locator("#compare").click()
        page.wait_for_selector("#method-encode-decode img", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=os.environ.get("DIFFEDIT_APP_SCREENSHOT", str(tmp_path / "app.png")), full_page=True)

        gate.delay = 0.2  # slow edits (new seeds: the mask pass again): one stopped by Stop, one by closing the page
        after = []
        try:
            for seed, stop in (("7", page.locator("#stop").click), ("8", page.close)):
                page.locator("#knob-seed input").fill(seed)
                before = len(gate.calls)
                page.locator("#run").click()
                wait_for(lambda: len(gate.calls) >= before + 2)
                asked = time.perf_counter()
                stop()
                time.sleep(2.0)
                after.append(len([t for t, _ in gate.calls[before:] if t > asked]))
                if seed == "7":
                    assert "stopped" in page.locator("#cost").inner_text()
        finally:
            gate.delay = 0.0
        browser.close()
    print(f"[app] browser: threshold drag -> mask {slider_trip * 1000:.0f} ms, stroke -> mask {paint_trip * 1000:.0f} "
          f"ms, ratio click -> edit {ratio_trip * 1000:.0f} ms; UNet calls begun after Stop, after closing the page: "
          f"{after}; whole test {time.perf_counter() - start:.1f} s")
    assert max(after) <= 1 and outside == []


# --- the pieces ---------------------------------------------------------------------------------------------

def test_cache_stays_within_its_byte_limit_and_a_session_stops_on_request():
    cache = LRUCache(limit=1000)
    for i in range(5):
        cache.cached(i, lambda: torch.zeros(100))            # 400 bytes each
    assert cache.bytes <= 1000 and len(cache) == 2 and cache.has(4) and not cache.has(0)
    big = cache.cached("big", lambda: torch.zeros(1000))      # larger than the limit: returned, not kept
    assert big.numel() == 1000 and not cache.has("big")
    session = Session(limit=1000)
    session.cache.cached("x", lambda: torch.zeros(1))
    session.stop.set()
    with pytest.raises(Cancelled):
        session.check_stop()
    fresh = copy.deepcopy(session)                           # what gr.State does for each new browser session
    assert len(fresh.cache) == 0 and fresh.cache.limit == 1000 and not fresh.stop.is_set()
    fresh.check_stop()


def test_picture_working_sizes_and_their_keys():
    photo = _picture(Image.new("RGB", (451, 300), (200, 30, 30)))
    native, again, full = photo.at(64, 16), photo.at(64, 16), photo.at(None, 16)
    assert native.pil.size == (64, 48) and native.size == (451, 300) and native.pil is again.pil
    assert full.pil.size == (448, 304) and len({native.digest, full.digest, photo.digest}) == 3
    assert native.restore(Image.new("RGB", (64, 48))).size == (451, 300)
    assert photo.at(451, 1).pil is photo.original


def test_strokes_split_by_colour_and_the_overlay_shows_over_every_object_colour():
    layer = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    layer.paste((*ADD, 255), (0, 0, 4, 4))
    layer.paste((*ERASE, 255), (4, 0, 8, 2))
    add, erase = (np.asarray(im.getchannel("A")) > 0 for im in split_strokes(layer))
    assert add[:, :4].all() and not add[:, 4:].any() and erase[:2, 4:].all() and erase.sum() == 8
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for colour in (*world.OBJECT_COLOURS.values(), *world.BACKGROUND_COLOURS.values()):
        shown = np.asarray(viz.overlay(Image.new("RGB", (64, 64), colour), mask), dtype=float)[16:48, 16:48]
        assert np.abs(shown - colour).sum(-1).max() > 150   # some stripes stand out from the colour


def test_command_line_flags_and_missing_extra(monkeypatch):
    parser = argparse.ArgumentParser()
    add_app_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["app"])
    assert (args.model, args.device, args.port, args.host) == ("toy", "cpu", 7860, "127.0.0.1") and args.dtype
    assert args.run is run_app
    import diffedit.app

    def no_gradio():
        raise ImportError("No module named 'gradio'")
    monkeypatch.setattr(diffedit.app, "_gradio", no_gradio)
    with pytest.raises(UsageError, match=r'pip install -e "\.\[app\]"'):
        run_app(parser.parse_args(["app"]))
    assert "[app]" in MISSING
    code = ("import sys, diffedit.app; assert not {'torch', 'gradio', 'diffedit.cli'} & set(sys.modules), "
            "sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
