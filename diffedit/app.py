"""``diffedit app``: a local web app (gradio) where DiffEdit's knobs answer at once.

    pip install -e ".[app]" && diffedit app --model toy     # then open http://127.0.0.1:7860

The page: an image (or a drawn toy scene), the source and target texts and every knob of
``settings.KNOBS``; it shows D as a heat map, the mask (paint on it to add or erase), the edit, the
methods side by side and what the last action cost. Each browser session keeps its own cache
(``app_state.Session``, bounded in bytes), so the threshold and the strokes re-threshold a cached D without
any UNet evaluation and a ratio change only decodes again. The model works at its native size (the longer side
at ``cfg.resolution``; full size on request, within ``app_state.FULL_SIZE_BUDGET``) and results come back at
the input's size.

The model serves one action at a time, sessions in the order they asked, a page at most one action at a time (a
newer action of the page cancels the older). Stop, a cancelled action and a page that is closed set the session's
``stop``: its work ends at the next UNet call. Scripts use ``/mask`` (image, source, target, threshold, full) ->
(mask, D heat map), ``/edit`` (image, source, target, ratio, threshold, full) -> (edit, mask) and ``/stop``
through gradio_client (or ``Job.cancel()``), every other knob at its default.

This module imports neither torch nor gradio at load time: the command line builds its parser from it.
"""
import asyncio
import functools
import logging
import os
import weakref

from .frontend import HelpFormatter, UsageError, add_model_args, check_device, load_pipeline
from .settings import KNOBS, METHODS, EditSettings, SettingsError

log = logging.getLogger(__name__)

MISSING = 'the web app needs gradio: pip install -e ".[app]"'
LABELS = {"ratio": "encoding ratio r", "threshold": "threshold", "n": "noises n", "strength": "mask strength",
          "steps": "DDIM steps", "guidance": "guidance scale", "seed": "seed", "normalization": "normalisation",
          "method": "method"}
INFO = {"ratio": "how far the image is encoded before decoding: higher changes more",
        "threshold": "the mask is the rescaled D at or above it",
        "n": "noise draws averaged into D",
        "strength": "noise level of the mask pass",
        "steps": "of the full DDIM grid; r x steps are run",
        "guidance": "classifier-free, the source text as negative prompt",
        "seed": "of the mask noises and SDEdit's noise",
        "normalization": "how D's extremes are removed before rescaling (quantile: clip at the 98th percentile)",
        "method": "DiffEdit decodes from the encoding inside its mask, SDEdit from fresh noise everywhere"}
METHOD_LABELS = {"diffedit": "DiffEdit", "sdedit": "SDEdit", "encode-decode": "Encode-Decode",
                 "masked-sdedit": "masked SDEdit"}
KNOB_ORDER = ("ratio", "threshold", "n", "strength", "steps", "guidance", "seed", "normalization", "method")
APPLY_ON_EDIT = ("n", "strength", "steps", "seed")  # they redo the mask pass or the inversion: only Edit runs them
GUIDANCE_MAX = 20.0  # the slider's end; the knob itself has no upper bound
MAX_UPLOAD = "64mb"
# Sessions whose caches the server keeps: a state lives an hour, and past SESSIONS the oldest is dropped,
# so the whole server holds at most SESSIONS x app_state.CACHE_BYTES.
SESSION_SECONDS, SESSIONS = 3600, 32
# Small images (the toy model's 64 px) fill their box, scaled up without blur.
CSS = (".pixelated .image-frame { width: 100%; height: 100%; } "
       ".pixelated .image-frame img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }")
# The strokes' meaning is their colour, two colours no toy object or background has.
ADD, ERASE = (0, 255, 255), (255, 128, 0)
PAINTER_HELP = ("**Paint the mask** (brush tool, over the hatched mask): **cyan** adds cells, **orange** erases "
                "them; the eraser removes strokes.")
LOW_HIGH = "D: low &rarr; high (rescaled; the mask is D &ge; threshold)"
NO_ACTION = "**Last action:** none yet"
STOPPED = "**Last action:** stopped."


def add_app_parser(subparsers):
    p = subparsers.add_parser(
        "app", formatter_class=HelpFormatter,
        help="a local web app where DiffEdit's knobs answer at once (needs the 'app' extra)",
        description="Serve an interactive DiffEdit page on HOST:PORT (gradio; nothing leaves the machine). "
                    "Each browser session caches its work, so moving the threshold or painting the mask runs "
                    "no UNet evaluation.")
    add_model_args(p)
    p.add_argument("--port", type=int, default=7860, help="TCP port to serve on")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app to the network")
    p.set_defaults(run=run_app)
    return p


def run_app(args) -> int:
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    try:
        _gradio()
    except ImportError:
        raise UsageError(MISSING) from None
    check_device(args.device)
    from .app_state import Engine
    from .toy import model_world
    demo = build_app(Engine(load_pipeline(args)), toy=args.model == "toy", toy_world=model_world(args.model))
    try:
        launch(demo, args.host, args.port, block=True)
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot serve there ({e})") from None
    return 0


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio loads: no telemetry, no version check
    import gradio
    return gradio


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = False, quiet: bool = False):
    """Serve ``demo`` locally (never a share link); model work runs one event at a time."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       quiet=quiet, css=CSS, max_file_size=MAX_UPLOAD, footer_links=["api"],
                       state_session_capacity=SESSIONS, show_error=True)


def split_strokes(layer):
    """The editor's stroke layer -> (add, erase) RGBA layers: each painted pixel goes to its nearer brush colour."""
    import numpy as np
    from PIL import Image
    rgba = np.asarray(layer.convert("RGBA")).copy()
    rgb = rgba[..., :3].astype(np.int32)
    nearer_add = ((rgb - ADD) ** 2).sum(-1) <= ((rgb - ERASE) ** 2).sum(-1)
    add, erase = rgba.copy(), rgba
    add[~nearer_add, 3] = 0
    erase[nearer_add, 3] = 0
    return [Image.fromarray(add, "RGBA"), Image.fromarray(erase, "RGBA")]


def legend_html() -> str:
    """A viridis bar, low to high, under the heat map."""
    import numpy as np

    from .viz import colormap
    stops = ", ".join(f"rgb{tuple(int(c) for c in rgb)}" for rgb in colormap(np.linspace(0, 1, 9)))
    return (f'<div style="height: 10px; background: linear-gradient(to right, {stops});"></div>'
            f'<div style="font-size: 0.85em;">{LOW_HIGH}</div>')


def _knob_inputs(gr, d: EditSettings) -> dict:
    """One input per knob, its range and default from ``settings.KNOBS`` (and ``d``)."""
    out = {}
    for name in KNOB_ORDER:
        k, value = KNOBS[name], getattr(d, name)
        info = INFO[name] + ("" if k.paper is None else f" (paper: {k.paper})")
        if name in APPLY_ON_EDIT:
            info += "; press Edit to apply"
        if k.choices is not None:
            out[name] = gr.Radio(list(k.choices), value=value or k.default, label=LABELS[name], info=info,
                                 elem_id=f"knob-{name}")
        elif name == "seed":
            out[name] = gr.Number(value, label=LABELS[name], info=info, precision=0, minimum=k.lo,
                                  elem_id=f"knob-{name}")
        else:
            step = 1 if k.kind is int else 0.01
            hi = GUIDANCE_MAX if k.hi is None else k.hi
            out[name] = gr.Slider(k.lo + step if k.lo_open else k.lo, hi, value=value, step=step,
                                  label=LABELS[name], info=info, elem_id=f"knob-{name}")
    return out


def build_app(engine, defaults: EditSettings | None = None, toy: bool = False, toy_world=None):
    """The page and its API on ``engine`` (``app_state.Engine``); ``defaults``: the knobs' starting values
    and what /mask and /edit use for the knobs they do not take (the paper's by default); ``toy``: offer to draw
    scenes of ``toy_world`` (a ``world.WorldSpec``; None: v1)."""
    gr = _gradio()
    from PIL import Image
    from PIL.Image import DecompressionBombError, UnidentifiedImageError

    from . import images, viz
    from .app_state import CACHE_BYTES, FULL_SIZE_BUDGET, MAX_SIDE, Cancelled, Session
    from .toy import world

    d = defaults or EditSettings()
    native = engine.de.cfg.resolution
    budget = FULL_SIZE_BUDGET * native ** 2
    pages = weakref.WeakValueDictionary()  # a page's session hash -> its Session, to stop its work when it closes

    def refuse(message: str):
        """A handled error: its message on the page, one line in the log, no traceback."""
        log.warning("refused: %s", message)
        return gr.Error(message, print_exception=False)

    def checked(component, unreadable=()):
        """Input errors of ``component`` (gradio's own range checks; an unreadable upload) are refused in one line.
        (The instance is patched: a subclass would make gradio write a .pyi stub next to this module.)"""
        preprocess = component.preprocess

        def run(payload):
            try:
                return preprocess(payload)
            except gr.Error as e:
                raise refuse(e.message) from None
            except unreadable:
                raise refuse("That file is not an image this app can read (try a PNG or JPEG).") from None
        component.preprocess = run
        return component

    def settings(values: dict) -> EditSettings:
        try:
            return d.replace(**values)
        except SettingsError as e:
            raise refuse(e.message_for(LABELS.get(e.field, e.field))) from None

    def begin(session, image, target, full=False, progress=None, quiet=False):
        """(work, picture at its working size) for an action; missing input is refused, or (quiet: a knob moved)
        skipped (picture None)."""
        report = None if progress is None else (
            lambda phase, done, total: progress((done, total), desc=phase, unit="UNet evaluations"))
        work = engine.work(session, report)
        if image is None or not (target or "").strip():
            if quiet:
                return work, None
            if image is None:
                raise refuse("No image yet: upload one" + (" or draw a toy scene." if toy else "."))
            raise refuse("The target text is empty: say what the edited image should show.")
        try:
            pic = work.picture(image)
        except images.ImageError as e:
            raise refuse(str(e).replace(str(image), "the upload")) from None
        if pic.shrunk_from is not None:
            gr.Warning(f"The image is {pic.shrunk_from[0]} x {pic.shrunk_from[1]} px; the app keeps it shrunk "
                       f"to {pic.size[0]} x {pic.size[1]} (sides up to {MAX_SIDE} px).")
        if full and pic.size[0] * pic.size[1] > budget:
            raise refuse(f"Full size is {pic.size[0]} x {pic.size[1]} px, over this model's {budget:,} px "
                         f"({FULL_SIZE_BUDGET} x {native} x {native}): untick full size to work at {native} px.")
        return work, pic.at(None if full else native, engine.de.multiple)

    def cost_text(work, pic) -> str:
        w, h = pic.pil.size
        how = f"the model's {native} px" if max(w, h) == native else "full size"
        return (f"**Last action:** {work.finish().text()}; worked at {w} x {h} px ({how}), "
                f"shown at {pic.size[0]} x {pic.size[1]}")

    def mask_picture(pic, m, size=None):
        return images.mask_to_pil(m, size or pic.size)

    def model_turn(fn, stopped=None):
        """``fn`` as one turn of the model queue, run in a thread. A cancellation (Stop, a newer action of the
        page, a client's Job.cancel()) sets the session's ``stop`` and waits for the work to end at its next UNet
        call, so the next turn starts on a free model; ``stopped()``: the outputs of a stopped action (None: an
        error, for the API)."""
        @functools.wraps(fn)
        async def run(*args):
            session = args[0][state] if isinstance(args[0], dict) else args[0]
            session.stop.clear()
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                session.stop.set()
                await asyncio.gather(work, return_exceptions=True)
                raise
            except Cancelled:
                log.info("stopped: %s", fn.__name__)
                if stopped is None:
                    raise gr.Error("Stopped before the end.", print_exception=False) from None
                return stopped()
        return run

    # --- the page's handlers: each gets a dict of every input (inputs given as a set) ----------------------

    def read(v, progress=None, quiet=False):
        """(work, picture, settings) from the page's inputs; picture None when quietly skipped."""
        work, pic = begin(v[state], v[image], v[target], v[full], progress, quiet)
        return work, pic, settings({k: v[knobs[k]] for k in KNOB_ORDER})

    def show_edit(v, progress=gr.Progress(), quiet=False):
        work, pic, s = read(v, progress, quiet)
        if pic is None:
            return gr.skip()
        dmap, m = work.mask(pic, v[source], v[target], s)
        edit = work.edit(pic, v[source], v[target], s, m)
        return viz.heatmap(dmap, pic.size), mask_picture(pic, m), pic.restore(edit), cost_text(work, pic)

    def edit_quietly(v, progress=gr.Progress()):
        return show_edit(v, progress, quiet=True)

    def threshold_moved(v):
        """The mask at a new threshold from the cached D (no UNet); nothing before the first edit."""
        work, pic, s = read(v, quiet=True)
        if pic is None or not work.has_difference(pic, v[source], v[target], s):
            return gr.skip()
        return mask_picture(pic, work.mask(pic, v[source], v[target], s)[1]), cost_text(work, pic)

    def painted(v):
        """New strokes: the mask they make with the cached D at once (no UNet), and whether the edit must follow.
        Setting the editor's picture echoes an input event with the same strokes: nothing to do then."""
        work, pic, s = read(v, quiet=True)
        if pic is None or v[editor] is None or not v[editor]["layers"] or not work.has_difference(
                pic, v[source], v[target], s) or not work.paint(pic, split_strokes(v[editor]["layers"][0])):
            return gr.skip(), gr.skip(), False
        return mask_picture(pic, work.mask(pic, v[source], v[target], s)[1]), cost_text(work, pic), True

    def edit_painted(v, progress=gr.Progress()):
        """The edit decoded with the painted mask, when the strokes changed it."""
        return show_edit(v, progress, quiet=True) if v[repaint] else gr.skip()

    def painter_view(v):
        """The editor: the hatched mask over the working picture, the session's strokes kept (costly to resend: on
        release); a brush one toy latent cell wide at the toy model's 64 px, scaled with the working size."""
        work, pic, s = read(v, quiet=True)
        if pic is None or not work.has_difference(pic, v[source], v[target], s):
            return gr.skip()
        over = viz.overlay(pic.pil, mask_picture(pic, work.mask(pic, v[source], v[target], s)[1], pic.pil.size))
        add, erase = v[state].strokes.get(pic.digest, (None, None, [None, None]))[2]
        layers = [] if add is None else [Image.alpha_composite(add, erase)]
        size = max(2, max(pic.pil.size) // 32)
        return gr.ImageEditor({"background": over, "layers": layers, "composite": None},
                              brush=gr.Brush(default_size=size, **brush), eraser=gr.Eraser(default_size=size))

    def compare(v, progress=gr.Progress()):
        work, pic, s = read(v, progress)
        m = work.mask(pic, v[source], v[target], s)[1]
        methods = [pic.restore(work.edit(pic, v[source], v[target], s.replace(method=method), m))
                   for method in METHODS]
        return (*methods, cost_text(work, pic))

    def stop_work(session):
        """Stop: the session's running work ends at its next UNet call (the page also cancels its queued ones)."""
        session.stop.set()
        log.info("stop asked")
        return STOPPED

    def page_opened(session, request: gr.Request):
        pages[request.session_hash] = session

    def page_closed(request: gr.Request):
        """The browser left (closed or reloaded the page): its running work stops."""
        session = pages.get(request.session_hash)
        if session is not None:
            session.stop.set()
            log.info("page closed: its work stops")

    def draw_scene(session):
        """A new held-out toy edit (the next each press): its picture and texts, the kind of edit named, the last
        scene's outputs cleared."""
        session.scenes += 1
        e = world.edits(1, world.EVAL_SEED + session.scenes, spec=toy_world or world.V1)[0]
        note = f"Drawn: a **{e.kind}** edit ({e.description})."
        return (e.source.render(), e.source_caption, e.target_caption, note, *cleared())

    def cleared():
        return (None,) * (len(outputs) - 1 + len(tiles) + 1) + (NO_ACTION,)

    # --- the API (gradio_client) -----------------------------------------------------------------------

    def api_mask(session, image, source, target, threshold, full):
        work, pic = begin(session, image, target, full)
        s = settings({"threshold": threshold})
        dmap, m = work.mask(pic, source, target, s)
        work.finish()
        return mask_picture(pic, m), viz.heatmap(dmap, pic.size)

    def api_edit(session, image, source, target, ratio, threshold, full):
        work, pic = begin(session, image, target, full)
        s = settings({"ratio": ratio, "threshold": threshold, "method": "diffedit"})
        m = work.mask(pic, source, target, s)[1]
        edited = work.edit(pic, source, target, s, m)
        work.finish()
        return pic.restore(edited), mask_picture(pic, m)

    # --- the page --------------------------------------------------------------------------------------

    picture = dict(format="png", height=256, elem_classes="pixelated")
    brush = dict(colors=[f"rgb{ADD}", f"rgb{ERASE}"], color_mode="fixed")
    with gr.Blocks(title="DiffEdit", analytics_enabled=False) as demo:
        state = gr.State(Session(CACHE_BYTES), time_to_live=SESSION_SECONDS)
        repaint = gr.State(False)  # whether the last strokes changed the mask
        gr.Markdown("## DiffEdit\nMask from the disagreement of two texts, DDIM encoding, masked decoding "
                    "(Couairon et al., ICLR 2023). Move the threshold or paint the mask: nothing is recomputed "
                    "but the mask and the decoding.")
        with gr.Row():
            with gr.Column():
                image = checked(gr.Image(label="input image", type="filepath", image_mode=None,
                                         sources=["upload", "clipboard"], elem_id="input-image", **picture),
                                (UnidentifiedImageError, OSError, ValueError, DecompressionBombError))
                scene = gr.Button("Draw a toy scene", visible=toy, elem_id="scene")
                scene_note = gr.Markdown("", visible=toy, elem_id="scene-note")
                source = gr.Textbox(label="source text (reference R: what the image shows)", elem_id="source")
                target = gr.Textbox(label="target text (query Q: what it should show)", elem_id="target")
                full = gr.Checkbox(False, label="full size", elem_id="full-size",
                                   info=f"work at the input's own size, up to {budget:,} px on this model "
                                        f"(default: its native {native} px); press Edit to apply")
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="run")
                    run_all = gr.Button("Compare the methods", elem_id="compare")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                cost = gr.Markdown(NO_ACTION, elem_id="cost")
            with gr.Column():
                knobs = {name: checked(c) for name, c in _knob_inputs(gr, d).items()}
        with gr.Row():
            with gr.Column(min_width=160):
                heat = gr.Image(label="D (difference map)", interactive=False, elem_id="heat", **picture)
                gr.HTML(legend_html(), elem_id="heat-legend")
            mask = gr.Image(label="mask", interactive=False, image_mode="L", elem_id="mask", **picture)
            with gr.Column(min_width=160):
                gr.Markdown(PAINTER_HELP, elem_id="painter-help")
                editor = gr.ImageEditor(
                    label="mask strokes", type="pil", format="png", height=256, sources=[], transforms=[],
                    elem_classes="pixelated", elem_id="editor", brush=gr.Brush(**brush),
                    layers=gr.LayerOptions(allow_additional_layers=False, layers=["strokes"], disabled=True))
            edited = gr.Image(label="edit", interactive=False, elem_id="edit", **picture)
        with gr.Row():
            tiles = [gr.Image(label=METHOD_LABELS.get(m, m), interactive=False, elem_id=f"method-{m}", **picture)
                     for m in METHODS]
        api_mask_button, api_edit_button = gr.Button(visible=False), gr.Button(visible=False)

        inputs = {state, image, source, target, full, *knobs.values()}
        model = dict(concurrency_id="model", concurrency_limit=1, api_visibility="undocumented")
        cheap = dict(concurrency_limit=None, show_progress="hidden", api_visibility="undocumented")
        refresh = dict(fn=painter_view, inputs=inputs, outputs=editor, **cheap)
        outputs = [heat, mask, edited, cost]
        stopped_edit = lambda: (gr.skip(),) * 3 + (STOPPED,)  # noqa: E731
        edit_turn, quiet_turn = model_turn(show_edit, stopped_edit), model_turn(edit_quietly, stopped_edit)
        turns = {run.click: run.click(edit_turn, inputs, outputs, **model)}
        turns[run.click].then(**refresh)
        turns[run_all.click] = run_all.click(model_turn(compare, lambda: (gr.skip(),) * len(tiles) + (STOPPED,)),
                                             inputs, [*tiles, cost], **model)
        knobs["threshold"].input(threshold_moved, inputs, [mask, cost], trigger_mode="always_last", **cheap)
        # knobs that need no new mask pass nor inversion redo the edit at once; those that move the mask also
        # refresh the editor, once, on release
        for name, event in (("threshold", "release"), ("normalization", "change"), ("ratio", "release"),
                            ("guidance", "release"), ("method", "change")):
            trigger = getattr(knobs[name], event)
            turns[trigger] = trigger(quiet_turn, inputs, outputs, trigger_mode="always_last", **model)
            if name in ("threshold", "normalization"):
                turns[trigger].then(**refresh)
        # a stroke shows its mask at once; the edit decoded with it waits for its turn (an echo finds it cached)
        paint_turn = editor.input(painted, inputs | {editor}, [mask, cost, repaint], trigger_mode="always_last",
                                  **cheap).then(model_turn(edit_painted, stopped_edit), inputs | {repaint}, outputs,
                                                trigger_mode="always_last", show_progress="hidden", **model)
        # one action per page: a newer one cancels the older (running: it stops at its next UNet call)
        every = [*turns.values(), paint_turn]
        for trigger, turn in turns.items():
            trigger(None, None, None, cancels=[t for t in every if t is not turn])
        stop.click(stop_work, state, cost, cancels=every, api_name="stop", concurrency_limit=None)
        demo.load(page_opened, state, None, **cheap)
        demo.unload(page_closed)
        scene.click(draw_scene, state, [image, source, target, scene_note, *outputs[:-1], editor, *tiles, cost],
                    api_visibility="undocumented", concurrency_limit=None)
        image.upload(cleared, None, [*outputs[:-1], editor, *tiles, cost], **cheap)
        api_mask_button.click(model_turn(api_mask), [state, image, source, target, knobs["threshold"], full],
                              [mask, heat], api_name="mask", concurrency_id="model", concurrency_limit=1)
        api_edit_button.click(model_turn(api_edit),
                              [state, image, source, target, knobs["ratio"], knobs["threshold"], full],
                              [edited, mask], api_name="edit", concurrency_id="model", concurrency_limit=1)
    return demo
