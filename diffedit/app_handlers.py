"""What the web app's events do: ``Handlers``, one method per event, on plain values (a ``Form`` of the page's
inputs, a session), returning the outputs' values; no server is needed to call them.

A page action that is refused (no image, an empty target, a knob out of range, full size over the budget) or stopped
leaves its panes as they were and says why in the status line, which stays on the page; the API endpoints (/mask,
/edit) raise ``gr.Error`` instead, which a client receives as its error.
"""
import functools
import logging
import weakref
from dataclasses import dataclass, field

import gradio as gr
import numpy as np
from PIL import Image

from . import images, viz
from .app_page import ADD, BRUSH, ERASE, LABELS, NO_ACTION, Unreadable
from .app_state import FULL_SIZE_BUDGET, MAX_SIDE, AppModel, Cancelled, Session
from .settings import METHODS, EditSettings, SettingsError

log = logging.getLogger(__name__)

STOPPED = "**Last action:** stopped."


class Refused(Exception):
    """An action that cannot run as asked; its message is the one line the user sees."""


@dataclass
class Form:
    """The page's inputs for one action. ``image``: a path, a PIL image or None; ``knobs``: knob name -> value (those
    missing: the defaults); ``strokes``: the mask painter's value; ``repaint``: whether the strokes changed the mask.
    Any input may be ``app_page.Unreadable``."""
    session: Session
    image: object
    source: str
    target: str
    full: bool = False
    knobs: dict = field(default_factory=dict)
    strokes: dict | None = None
    repaint: bool = False


def _refusal(e: Exception) -> str:
    log.warning("refused: %s", e)
    return str(e)


def page_action(panes: int):
    """A page action whose last output is the status line: refused or stopped, its first ``panes`` outputs are
    kept as they were and the status says why."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Refused as e:
                return (*(gr.skip() for _ in range(panes)), f"**Refused:** {_refusal(e)}")
            except Cancelled:
                log.info("stopped: %s", method.__name__)
                return (*(gr.skip() for _ in range(panes)), STOPPED)
        return run
    return wrap


def api_action(method):
    """An API endpoint: refused or stopped, the client gets the reason as its error (one line, no traceback)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Refused as e:
            raise gr.Error(_refusal(e), print_exception=False) from None
        except Cancelled:
            log.info("stopped: %s", method.__name__)
            raise gr.Error("Stopped before the end.", print_exception=False) from None
    return run


def split_strokes(layer):
    """The editor's stroke layer -> (add, erase) RGBA layers: each painted pixel goes to its nearer brush colour."""
    rgba = np.asarray(layer.convert("RGBA")).copy()
    rgb = rgba[..., :3].astype(np.int32)
    nearer_add = ((rgb - ADD) ** 2).sum(-1) <= ((rgb - ERASE) ** 2).sum(-1)
    add, erase = rgba.copy(), rgba
    add[~nearer_add, 3] = 0
    erase[nearer_add, 3] = 0
    return [Image.fromarray(add, "RGBA"), Image.fromarray(erase, "RGBA")]


class Handlers:
    """The events of the page and the API on ``model`` (``app_state.AppModel``); ``defaults``: the knobs a form does
    not give (the paper's by default, with the model's own steps and guidance: ``DiffEdit.defaults``); ``toy``:
    offer to draw scenes of ``toy_world`` (a ``world.WorldSpec``; None: v1)."""

    def __init__(self, model: AppModel, defaults: EditSettings | None = None, toy: bool = False, toy_world=None):
        self.model = model
        self.defaults = defaults or EditSettings(**model.de.defaults(steps=None, guidance=None))
        self.toy, self.toy_world = toy, toy_world
        self.native = model.de.cfg.resolution
        self.budget = FULL_SIZE_BUDGET * self.native ** 2  # full size: at most this many pixels
        self.pages = weakref.WeakValueDictionary()  # a page's id -> its Session, to stop its work when it closes

    # --- reading a form -----------------------------------------------------------------------------------

    def _begin(self, form: Form, progress=None, quiet: bool = False):
        """(work, picture at its working size, settings) for an action; Refused if it cannot run, or (quiet: a knob
        moved) None when the image or the target is missing."""
        report = None if progress is None else (
            lambda phase, done, total: progress((done, total), desc=phase, unit="UNet evaluations"))
        work = self.model.work(form.session, report)
        if form.image is None or not (form.target or "").strip():
            if quiet:
                return None
            if form.image is None:
                raise Refused("No image yet: upload one" + (" or draw a toy scene." if self.toy else "."))
            raise Refused("The target text is empty: say what the edited image should show.")
        if isinstance(form.image, Unreadable):
            raise Refused(form.image.reason)
        try:
            pic = work.picture(form.image)
        except images.ImageError as e:
            raise Refused(str(e).replace(str(form.image), "the upload")) from None
        if form.full and pic.size[0] * pic.size[1] > self.budget:
            raise Refused(f"Full size is {pic.size[0]} x {pic.size[1]} px, over this model's {self.budget:,} px "
                          f"({FULL_SIZE_BUDGET} x {self.native} x {self.native}): untick full size to work at "
                          f"{self.native} px.")
        return work, pic.at(None if form.full else self.native, self.model.de.multiple), self._settings(form.knobs)

    def _settings(self, knobs: dict) -> EditSettings:
        for name, value in knobs.items():
            if isinstance(value, Unreadable):
                raise Refused(f"{LABELS.get(name, name)}: {value.reason}")
        try:
            return self.defaults.replace(**knobs)
        except SettingsError as e:
            raise Refused(e.message_for(LABELS.get(e.field, e.field))) from None

    def _status(self, work, pic) -> str:
        """The status line after an action: its cost, the working size and the size shown."""
        w, h = pic.pil.size
        how = f"the model's {self.native} px" if max(w, h) == self.native else "full size"
        text = (f"**Last action:** {work.finish().text()}; worked at {w} x {h} px ({how}), "
                f"shown at {pic.size[0]} x {pic.size[1]}")
        if pic.shrunk_from is not None:
            text += f" (the upload is {pic.shrunk_from[0]} x {pic.shrunk_from[1]} px: sides over {MAX_SIDE} are shrunk)"
        return text

    def _mask(self, work, pic, form: Form, s: EditSettings, size=None):
        """(D, the mask as an image at ``size`` (the picture's size by default), the mask tensor)."""
        d, m = work.mask(pic, form.source, form.target, s)
        return d, images.mask_to_pil(m, size or pic.size), m

    # --- the page -----------------------------------------------------------------------------------------

    @page_action(panes=3)
    def edit(self, form: Form, progress=None, quiet: bool = False):
        """Edit: (D heat map, mask, edit, status). ``quiet`` (a knob moved): nothing happens without an image and
        a target."""
        work, pic, s = self._begin(form, progress, quiet) or (None,) * 3
        if pic is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        d, mask, m = self._mask(work, pic, form, s)
        edited = work.edit(pic, form.source, form.target, s, m)
        return viz.heatmap(d, pic.size), mask, pic.restore(edited), self._status(work, pic)

    def knob_moved(self, form: Form, progress=None):
        """A knob that needs no new mask pass nor encoding: the edit again, as Edit would show it."""
        return self.edit(form, progress, quiet=True)

    @page_action(panes=1)
    def threshold_moved(self, form: Form):
        """(mask, status) at a new threshold from the cached D (no UNet); nothing before the first edit."""
        work, pic, s = self._begin(form, quiet=True) or (None,) * 3
        if pic is None or not work.has_difference(pic, form.source, form.target, s):
            return gr.skip(), gr.skip()
        return self._mask(work, pic, form, s)[1], self._status(work, pic)

    @page_action(panes=2)
    def painted(self, form: Form):
        """New strokes: (whether the edit must follow, the mask they make with the cached D, status), at once (no
        UNet). Setting the editor's picture echoes an input event with the same strokes: nothing to do then."""
        work, pic, s = self._begin(form, quiet=True) or (None,) * 3
        layers = (form.strokes or {}).get("layers")
        if pic is None or not layers or not work.has_difference(pic, form.source, form.target, s) or not work.paint(
                pic, split_strokes(layers[0])):
            return False, gr.skip(), gr.skip()
        return True, self._mask(work, pic, form, s)[1], self._status(work, pic)

    def edit_painted(self, form: Form, progress=None):
        """The edit decoded with the painted mask, when the strokes changed it."""
        return self.knob_moved(form, progress) if form.repaint else (gr.skip(),) * 4

    def painter(self, form: Form):
        """The mask painter: the hatched mask over the working picture, the session's strokes kept (costly to resend:
        after a release); a brush one toy latent cell wide at the toy model's 64 px, scaled with the working size."""
        try:
            work, pic, s = self._begin(form, quiet=True) or (None,) * 3
        except Refused:  # the action it follows has said why
            return gr.skip()
        if pic is None or not work.has_difference(pic, form.source, form.target, s):
            return gr.skip()
        over = viz.overlay(pic.pil, self._mask(work, pic, form, s, pic.pil.size)[1])
        add, erase = form.session.strokes.get(pic.digest, (None, None, [None, None]))[2]
        layers = [] if add is None else [Image.alpha_composite(add, erase)]
        size = max(2, max(pic.pil.size) // 32)
        return gr.ImageEditor({"background": over, "layers": layers, "composite": None},
                              brush=gr.Brush(default_size=size, **BRUSH), eraser=gr.Eraser(default_size=size))

    @page_action(panes=len(METHODS))
    def compare(self, form: Form, progress=None):
        """Every method side by side, each with the knobs and the mask of the page, all in one engine call: (one
        edit per method in METHODS order, status)."""
        work, pic, s = self._begin(form, progress)
        m = self._mask(work, pic, form, s)[2]
        edits = work.edits(pic, form.source, form.target, [s.replace(method=method) for method in METHODS], m)
        return (*(pic.restore(e) for e in edits), self._status(work, pic))

    def stop(self, session: Session) -> str:
        """Stop: the session's running work ends at its next UNet call (the page also cancels its queued ones)."""
        session.stop.set()
        log.info("stop asked")
        return STOPPED

    def page_opened(self, session: Session, page: str):
        self.pages[page] = session

    def page_closed(self, page: str):
        """The browser left (closed or reloaded the page): its running work stops."""
        session = self.pages.get(page)
        if session is not None:
            session.stop.set()
            log.info("page closed: its work stops")

    def draw_scene(self, session: Session):
        """A new held-out toy edit (the next each press): (picture, source, target, a note naming the kind of edit,
        then ``cleared``)."""
        from .toy import world
        session.scenes += 1
        e = world.edits(1, world.EVAL_SEED + session.scenes, spec=self.toy_world or world.V1)[0]
        note = f"Drawn: a **{e.kind}** edit ({e.description})."
        return (e.source.render(), e.source_caption, e.target_caption, note, *self.cleared())

    def cleared(self):
        """The outputs of the last picture cleared: (heat map, mask, edit, painter, one per method, status)."""
        return (None,) * (4 + len(METHODS)) + (NO_ACTION,)

    # --- the API ------------------------------------------------------------------------------------------

    @api_action
    def api_mask(self, session: Session, image, source: str, target: str, threshold: float, full: bool):
        """/mask: (mask, D heat map), every knob but the threshold at its default."""
        form = Form(session, image, source, target, full, {"threshold": threshold})
        work, pic, s = self._begin(form)
        d, mask, _ = self._mask(work, pic, form, s)
        work.finish()
        return mask, viz.heatmap(d, pic.size)

    @api_action
    def api_edit(self, session: Session, image, source: str, target: str, ratio: float, threshold: float,
                 full: bool):
        """/edit: (DiffEdit's edit, mask), every other knob at its default."""
        form = Form(session, image, source, target, full, {"ratio": ratio, "threshold": threshold,
                                                           "method": "diffedit"})
        work, pic, s = self._begin(form)
        _, mask, m = self._mask(work, pic, form, s)
        edited = work.edit(pic, source, target, s, m)
        work.finish()
        return pic.restore(edited), mask
