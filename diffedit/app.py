"""``diffedit app``: a local web app (gradio) where DiffEdit's knobs answer at once.

    pip install -e ".[app]" && diffedit app --model toy     # then open http://127.0.0.1:7860

Three parts: the page (``app_page``: components and layout), the handlers (``app_handlers``: what each event does, on
plain values) and each browser session's cached work (``app_state``); this module wires events to handlers and
serves the page. Each session keeps its own cache (bounded in bytes), so the threshold and the strokes re-threshold
a cached D without any UNet evaluation and a ratio change only decodes again. The model works at its native size
(the longer side at ``cfg.resolution``; full size on request, within ``app_state.FULL_SIZE_BUDGET``) and results
come back at the input's size.

The model serves one action at a time, sessions in the order they asked, a page at most one action at a time (a
newer action of the page cancels the older). Stop, a cancelled action and a page that is closed set the session's
``stop``: its work ends at the next UNet call. Scripts use ``/mask`` (image, source, target, threshold, full) ->
(mask, D heat map), ``/edit`` (image, source, target, ratio, threshold, full) -> (edit, mask) and ``/stop``
through gradio_client (or ``Job.cancel()``), every other knob at its default.

The command line's ``app`` subcommand (``cli.add_app_parser``) imports this module only when it runs.
"""
import asyncio

import gradio as gr

from .app_handlers import Form, Handlers
from .app_page import CSS, Page, build_page
from .app_state import CACHE_BYTES, AppModel, Session
from .frontend import UsageError, load_pipeline
from .settings import EditSettings

MAX_UPLOAD = "64mb"
# Sessions whose caches the server keeps: a state lives an hour, and past SESSIONS the oldest is dropped,
# so the whole server holds at most SESSIONS x app_state.CACHE_BYTES.
SESSION_SECONDS, SESSIONS = 3600, 32


def serve(args) -> int:
    """Load --model and serve its page on --host:--port until interrupted."""
    from .toy import model_world
    demo = build_app(AppModel(load_pipeline(args)), toy=args.model == "toy", toy_world=model_world(args.model))
    try:
        launch(demo, args.host, args.port, block=True)
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot serve there ({e})") from None
    return 0


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = False, quiet: bool = False):
    """Serve ``demo`` locally (never a share link); model work runs one event at a time."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       quiet=quiet, css=CSS, max_file_size=MAX_UPLOAD, footer_links=["api"],
                       state_session_capacity=SESSIONS, show_error=True)


async def in_turn(session: Session, fn, *args):
    """``fn(*args)`` as one turn of the model queue, run in a thread. A cancellation (Stop, a newer action of the
    page, a client's Job.cancel()) sets the session's ``stop`` and waits for the work to end at its next UNet call,
    so the next turn starts on a free model."""
    session.stop.clear()
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        session.stop.set()
        while not work.done():  # a second cancellation must not free the model while the work still runs
            try:
                await asyncio.wait({work})
            except asyncio.CancelledError:
                pass
        raise


def build_app(model: AppModel, defaults: EditSettings | None = None, toy: bool = False, toy_world=None):
    """The page and its API on ``model``; ``defaults``: the knobs' starting values and what /mask and /edit use for
    the knobs they do not take (the paper's by default); ``toy``: offer to draw scenes of ``toy_world`` (a
    ``world.WorldSpec``; None: v1)."""
    h = Handlers(model, defaults, toy, toy_world)
    page = build_page(Session(CACHE_BYTES), h.defaults, toy, h.native, h.budget, SESSION_SECONDS)
    with page.blocks:
        _wire(page, h)
    return page.blocks


def _named(fn, name: str):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _wire(p: Page, h: Handlers):
    """Which event calls which handler, with which components (inside ``p.blocks``)."""
    def form(v: dict) -> Form:
        return Form(v[p.state], v[p.image], v[p.source], v[p.target], v[p.full],
                    {name: v[c] for name, c in p.knobs.items()}, v.get(p.editor), v.get(p.repaint, False))

    # gradio reads each function's signature (a gr.Progress default gets the progress bar) and names its endpoint
    # after it: these take gradio's arguments and carry the handler's name (a page's with "page_": /edit is the API's)
    def cheap(method):
        def run(v):
            return method(form(v))
        return _named(run, "page_" + method.__name__)

    def turn(method):
        async def run(v, progress=gr.Progress()):
            f = form(v)
            return await in_turn(f.session, method, f, progress)
        return _named(run, "page_" + method.__name__)

    def api_turn(method):
        async def run(session, *values):
            return await in_turn(session, method, session, *values)
        return _named(run, method.__name__)

    def opened(session, request: gr.Request):
        h.page_opened(session, request.session_hash)

    def closed(request: gr.Request):
        h.page_closed(request.session_hash)

    inputs, shown = p.inputs, [p.heat, p.mask, p.edited, p.status]
    model = dict(concurrency_id="model", concurrency_limit=1, api_visibility="undocumented")
    free = dict(concurrency_limit=None, show_progress="hidden", api_visibility="undocumented")
    refresh = dict(fn=cheap(h.painter), inputs=inputs, outputs=p.editor, **free)
    # a click while an older turn is still ending (Stop, a cancelled action) is kept, not dropped as "once" would
    turns = {p.run.click: p.run.click(turn(h.edit), inputs, shown, trigger_mode="always_last", **model)}
    turns[p.run.click].then(**refresh)
    turns[p.compare.click] = p.compare.click(turn(h.compare), inputs, [*p.tiles, p.status], trigger_mode="always_last",
                                             **model)
    p.knobs["threshold"].input(cheap(h.threshold_moved), inputs, [p.mask, p.status], trigger_mode="always_last",
                               **free)
    # knobs that need no new mask pass nor inversion redo the edit at once; those that move the mask also refresh
    # the painter, once, on release
    for name, event in (("threshold", "release"), ("normalization", "change"), ("ratio", "release"),
                        ("guidance", "release"), ("method", "change")):
        trigger = getattr(p.knobs[name], event)
        turns[trigger] = trigger(turn(h.knob_moved), inputs, shown, trigger_mode="always_last", **model)
        if name in ("threshold", "normalization"):
            turns[trigger].then(**refresh)
    # a stroke shows its mask at once; the edit decoded with it waits for its turn (an echo finds it cached)
    paint_turn = p.editor.input(cheap(h.painted), inputs | {p.editor}, [p.repaint, p.mask, p.status],
                                trigger_mode="always_last", **free).then(
        turn(h.edit_painted), inputs | {p.repaint}, shown, trigger_mode="always_last", show_progress="hidden", **model)
    # one action per page: a newer one cancels the older (running: it stops at its next UNet call)
    every = [*turns.values(), paint_turn]
    for trigger, event in turns.items():
        trigger(None, None, None, cancels=[e for e in every if e is not event])
    p.stop.click(h.stop, p.state, p.status, cancels=every, api_name="stop", concurrency_limit=None)
    p.blocks.load(opened, p.state, None, **free)
    p.blocks.unload(closed)
    cleared = [p.heat, p.mask, p.edited, p.editor, *p.tiles, p.status]
    p.scene.click(h.draw_scene, p.state, [p.image, p.source, p.target, p.scene_note, *cleared],
                  api_visibility="undocumented", concurrency_limit=None)
    p.image.upload(h.cleared, None, cleared, **free)
    api = dict(concurrency_id="model", concurrency_limit=1)
    p.api_mask.click(api_turn(h.api_mask), [p.state, p.image, p.source, p.target, p.knobs["threshold"], p.full],
                     [p.mask, p.heat], api_name="mask", **api)
    p.api_edit.click(api_turn(h.api_edit),
                     [p.state, p.image, p.source, p.target, p.knobs["ratio"], p.knobs["threshold"], p.full],
                     [p.edited, p.mask], api_name="edit", **api)
