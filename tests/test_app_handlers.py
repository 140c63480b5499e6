"""The web app's handlers (diffedit/app_handlers.py) called directly, without a server or a browser: each event's
outputs from a form's plain values, a refused action's reason in the status line, Compare as one engine call, and the
page's labels and texts, the painter's strokes. The toy model at 10 DDIM steps and 4 noises.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from diffedit import engine as engine_module, masking, viz  # noqa: E402
from diffedit.app import build_app, in_turn  # noqa: E402
from diffedit.app_handlers import STOPPED, Form, Handlers, split_strokes  # noqa: E402
from diffedit.app_page import ADD, ERASE, LOW_HIGH, NO_ACTION, Unreadable  # noqa: E402
from diffedit.app_state import AppModel, Session  # noqa: E402
from diffedit.settings import METHOD_TABLE, METHODS, EditSettings  # noqa: E402
from diffedit.toy import world  # noqa: E402

STEPS, N = 10, 4
SKIP = {"__type__": "update"}  # what gr.skip() gives: the output is left as it is


@pytest.fixture(scope="module")
def model():
    from diffedit.pipeline import DiffEdit
    return AppModel(DiffEdit.from_pretrained("toy"))


@pytest.fixture
def handlers(model):
    return Handlers(model, EditSettings(steps=STEPS, n=N), toy=True)


def scene(index: int = 0, size=None):
    """(picture, source, target) of a held-out colour edit, resized to ``size`` if given."""
    e = world.edits(index + 1, world.EVAL_SEED, kinds=("colour",))[index]
    image = Image.fromarray(e.source.render())
    return (image if size is None else image.resize(size, Image.NEAREST)), e.source_caption, e.target_caption


def form(session=None, index=0, size=None, **changes) -> Form:
    image, source, target = scene(index, size)
    return Form(session or Session(), image, source, target, **changes)


def white(image: Image.Image) -> int:
    return int((np.asarray(image.convert("L")) > 127).sum())


class Progress:
    """A stand-in for gr.Progress: ``last[phase]`` is the last (done, total) reported."""

    def __init__(self):
        self.last = {}

    def __call__(self, fraction, desc, unit):
        self.last[desc] = fraction


def test_edit_shows_the_map_the_mask_the_edit_and_what_it_cost(handlers, model):
    before, progress = model.evals.count, Progress()
    heat, mask, edited, status = handlers.edit(form(size=(72, 40)), progress)
    assert heat.size == mask.size == edited.size == (72, 40)
    assert status.startswith("**Last action:** ") and "worked at 64 x 32 px (the model's 64 px)" in status
    k = round(0.7 * STEPS)
    rows = model.evals.count - before
    assert rows == 2 * N + STEPS + 2 * k and f"{rows} UNet evaluations" in status  # mask, encoding to 1, decoding
    assert progress.last == {"mask": (2 * N, 2 * N), "inversion": (STEPS, STEPS), "decoding": (2 * k, 2 * k)}


@pytest.mark.parametrize("change, reason", [
    (dict(image=None), "No image yet: upload one or draw a toy scene."),
    (dict(target="  "), "The target text is empty"),
    (dict(image=Unreadable("That file is not an image this app can read (try a PNG or JPEG).")), "not an image"),
    (dict(knobs={"threshold": Unreadable("Value 1.5 is greater than maximum value 1.")}), "threshold: Value 1.5"),
    (dict(knobs={"n": 0}), "noises n must be"),
    (dict(full=True), "Full size is 451 x 300 px, over this model's 16,384 px"),
])
def test_a_refused_action_keeps_its_panes_and_says_why_in_the_status(handlers, model, change, reason):
    f = form(size=(451, 300))
    for name, value in change.items():
        setattr(f, name, value)
    before = model.evals.count
    for outputs, panes in ((handlers.edit(f), 3), (handlers.compare(f), len(METHODS))):
        assert outputs[:panes] == (SKIP,) * panes
        assert outputs[-1].startswith("**Refused:** ") and reason in outputs[-1] and "\n" not in outputs[-1]
    assert model.evals.count == before


def test_an_api_call_refused_raises_its_reason_for_the_client(handlers):
    image, source, target = scene()
    with pytest.raises(gr.Error, match="The target text is empty"):
        handlers.api_mask(Session(), image, source, "", 0.5, False)
    with pytest.raises(gr.Error, match="No image yet"):
        handlers.api_edit(Session(), None, source, target, 0.7, 0.5, False)


def test_a_knob_moved_before_any_input_or_edit_changes_nothing(handlers, model):
    before = model.evals.count
    assert handlers.knob_moved(Form(Session(), None, "", "")) == (SKIP,) * 4
    assert handlers.threshold_moved(form()) == (SKIP, SKIP)      # no D yet: nothing to threshold
    assert handlers.painter(form()) == SKIP
    assert model.evals.count == before


def test_a_new_threshold_rethresholds_the_cached_map_without_the_unet(handlers, model):
    f = form(index=1)
    _, mask_05, _, _ = handlers.edit(f)
    before = model.evals.count
    f.knobs = {"threshold": 0.2}
    mask_02, status = handlers.threshold_moved(f)
    assert model.evals.count == before and white(mask_02) > white(mask_05) and "0 UNet evaluations" in status
    f.knobs = {"ratio": 0.4}
    handlers.knob_moved(f)
    assert model.evals.count - before == 2 * round(0.4 * STEPS)  # a smaller ratio: decoding only


def test_strokes_grow_the_mask_at_once_and_an_echo_of_them_does_nothing(handlers, model):
    f = form(index=2)
    _, mask, edited, _ = handlers.edit(f)
    editor = handlers.painter(f)
    assert isinstance(editor, gr.ImageEditor) and editor.brush.colors[0] == f"rgb{ADD}"
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((*ADD, 255), (0, 0, 64, 16))                     # a band of cells added along the top
    f.strokes = {"layers": [layer]}
    before = model.evals.count
    repaint, painted, status = handlers.painted(f)
    assert repaint and white(painted) > white(mask) and model.evals.count == before
    assert handlers.painted(f) == (False, SKIP, SKIP)            # the same strokes again
    f.repaint = True
    _, _, repainted, _ = handlers.edit_painted(f)
    assert model.evals.count - before == 2 * round(0.7 * STEPS)  # the decoding with the painted mask only
    assert not np.array_equal(np.asarray(repainted), np.asarray(edited))
    f.repaint = False
    assert handlers.edit_painted(f) == (SKIP,) * 4


def test_compare_runs_every_method_in_one_engine_call_with_the_results_of_each_alone(handlers, model, monkeypatch):
    calls = []
    edits = engine_module.Engine.edits

    def counted(self, inputs, requests, *args, **kwargs):
        calls.append([r.settings.method for r in requests])
        return edits(self, inputs, requests, *args, **kwargs)
    monkeypatch.setattr(engine_module.Engine, "edits", counted)
    progress = Progress()
    *tiles, status = handlers.compare(form(index=3), progress)
    assert calls == [list(METHODS)] and len(tiles) == len(METHODS) and "UNet evaluations" in status
    k = round(0.7 * STEPS)
    assert progress.last == {"mask": (2 * N, 2 * N), "inversion": (STEPS, STEPS),  # the plan's totals: what ran
                             "decoding": (len(METHODS) * 2 * k, len(METHODS) * 2 * k)}
    for method, tile in zip(METHODS, tiles):
        f = form(index=3, knobs={"method": method})                # a fresh session: nothing shared
        _, _, alone, _ = handlers.edit(f)
        diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(tile, dtype=int))
        assert diff.max() <= 1, method  # batched rows equal rows alone to float rounding (a grey level at most)
    calls.clear()
    handlers.compare(f)                                            # its session holds the masked SDEdit only
    assert calls == [[m for m in METHODS if m != "masked-sdedit"]]


def test_stop_ends_the_sessions_work_and_the_action_says_stopped(handlers, model):
    f = form(index=4)
    assert handlers.stop(f.session) == STOPPED and f.session.stop.is_set()
    before = model.evals.count
    assert handlers.edit(f) == (SKIP,) * 3 + (STOPPED,)         # its first UNet call asks the session and ends
    assert model.evals.count == before
    with pytest.raises(gr.Error, match="Stopped"):
        handlers.api_mask(f.session, f.image, f.source, f.target, 0.5, False)
    other = Session()
    handlers.page_opened(other, "page-1")
    handlers.page_closed("page-1")
    assert other.stop.is_set()


def test_a_cancelled_turn_sets_stop_and_holds_the_model_until_its_work_ends_even_cancelled_twice():
    """A turn frees the model (its gradio slot) only when its work has ended, however often it is cancelled."""
    import asyncio
    import threading
    import time

    session, ended = Session(), threading.Event()

    def work():  # a UNet loop: it ends at its next call once the session says stop
        while not session.stop.is_set():
            time.sleep(0.01)
        time.sleep(0.2)  # the call running when stop came
        ended.set()

    async def main():
        turn = asyncio.ensure_future(in_turn(session, work))
        await asyncio.sleep(0.05)
        for _ in range(2):
            turn.cancel()
            await asyncio.sleep(0.02)
        with pytest.raises(asyncio.CancelledError):
            await turn
        return ended.is_set()

    assert asyncio.run(main()) and session.stop.is_set()


def test_draw_scene_gives_a_picture_its_texts_and_clears_every_output(handlers):
    session = Session()
    image, source, target, note, *outputs = handlers.draw_scene(session)
    assert image.shape == (world.SIZE, world.SIZE, 3) and source != target and "edit (" in note
    assert outputs == list(handlers.cleared()) == [None] * (4 + len(METHODS)) + [NO_ACTION]
    assert handlers.draw_scene(session)[1:3] != (source, target)  # each press draws the next held-out edit


def test_the_page_names_the_methods_from_the_table_and_the_mask_rule_as_binarize_applies_it(handlers):
    demo = build_app(handlers.model, EditSettings(steps=STEPS, n=N), toy=True)
    labels = {c.elem_id: c.label for c in demo.blocks.values() if str(getattr(c, "elem_id", "")).startswith("method-")}
    assert labels == {f"method-{m}": METHOD_TABLE[m].label for m in METHODS}
    assert "D &gt; threshold" in LOW_HIGH and not masking.binarize(torch.tensor([0.5]), 0.5).any()
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"mask", "edit", "stop", "draw_scene"} <= names


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
