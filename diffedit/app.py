"""``diffedit app``: a local web app (gradio) where DiffEdit's knobs answer at once.

    pip install -e ".[app]" && diffedit app --model toy     # then open http://127.0.0.1:7860

The page: an image (or a drawn toy scene), the source and target texts and every knob of
``settings.KNOBS``; it shows D as a heat map, the mask (paint on it to add or erase), the edit, the three
methods side by side and what the last action cost. Each browser session keeps its own cache
(``app_state.Session``, bounded in bytes), so the threshold and the strokes re-threshold a cached D without
any UNet evaluation and a ratio change only decodes again. Scripts use ``/mask`` (image, source, target,
threshold) -> (mask, D heat map) and ``/edit`` (image, source, target, ratio, threshold) -> (edit, mask)
through gradio_client, every other knob at its default.

This module imports neither torch nor gradio at load time: the command line builds its parser from it.
"""
from __future__ import annotations

import os

from .settings import KNOBS, METHODS, EditSettings, SettingsError

MISSING = 'the web app needs gradio: pip install -e ".[app]"'
LABELS = {"ratio": "encoding ratio r", "threshold": "threshold", "n": "n (noises)", "strength": "mask strength",
          "steps": "steps", "guidance": "guidance", "seed": "seed", "normalization": "normalisation",
          "method": "method"}
KNOB_ORDER = ("ratio", "threshold", "n", "strength", "steps", "guidance", "seed", "normalization", "method")
GUIDANCE_MAX = 20.0  # the slider's end; the knob itself has no upper bound
MAX_UPLOAD = "64mb"
# Sessions whose caches the server keeps: a state lives an hour, and past SESSIONS the oldest is dropped,
# so the whole server holds at most SESSIONS x app_state.CACHE_BYTES.
SESSION_SECONDS, SESSIONS = 3600, 32
# Small images (the toy model's 64 px) fill their box, scaled up without blur.
CSS = (".pixelated .image-frame { width: 100%; height: 100%; } "
       ".pixelated .image-frame img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }")
PAINT_LAYERS = ["add to the mask", "erase from the mask"]
BRUSH = dict(colors=["rgb(255, 255, 255)"], color_mode="fixed")


def add_app_parser(subparsers):
    from .frontend import HelpFormatter, add_model_args  # the same --model / --device / --dtype as elsewhere
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
    from .frontend import UsageError, check_device, load_pipeline
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
                       state_session_capacity=SESSIONS)


def _knob_inputs(gr, d: EditSettings) -> dict:
    """One input per knob, its range and default from ``settings.KNOBS`` (and ``d``)."""
    out = {}
    for name in KNOB_ORDER:
        k, value = KNOBS[name], getattr(d, name)
        info = k.help if k.paper is None else f"{k.help} (paper: {k.paper})"
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
    from PIL.Image import DecompressionBombError, UnidentifiedImageError

    from . import images, viz
    from .app_state import CACHE_BYTES, MAX_SIDE, Session
    from .toy import world

    d = defaults or EditSettings()

    def readable_upload(component):
        """Unreadable uploads end in a message on the page, not a server error. (The instance is patched: a
        gr.Image subclass would make gradio write a .pyi stub next to this module.)"""
        preprocess = component.preprocess

        def checked(payload):
            try:
                return preprocess(payload)
            except (UnidentifiedImageError, OSError, ValueError, DecompressionBombError):
                raise gr.Error("That file is not an image this app can read (try a PNG or JPEG).") from None
        component.preprocess = checked
        return component

    def settings(values: dict) -> EditSettings:
        try:
            return d.replace(**values)
        except SettingsError as e:
            raise gr.Error(e.message_for(LABELS.get(e.field, e.field))) from None

    def begin(session, image, target, progress=None, quiet=False):
        """(work, picture) for an action; missing input is an error, or (quiet: a slider moved) a skip."""
        report = None if progress is None else (
            lambda phase, done, total: progress((done, total), desc=phase, unit="UNet evaluations"))
        work = engine.work(session, report)
        if image is None or not (target or "").strip():
            if quiet:
                return work, None
            if image is None:
                raise gr.Error("No image yet: upload one" + (" or draw a toy scene." if toy else "."))
            raise gr.Error("The target text is empty: say what the edited image should show.")
        try:
            pic = work.picture(image)
        except images.ImageError as e:
            raise gr.Error(str(e).replace(str(image), "the upload")) from None
        if pic.shrunk_from is not None:
            gr.Warning(f"The image is {pic.shrunk_from[0]} x {pic.shrunk_from[1]} px; the app works on it shrunk "
                       f"to {pic.pil.width} x {pic.pil.height} (sides up to {MAX_SIDE} px).")
        return work, pic

    def cost_text(work) -> str:
        return f"**Last action:** {work.finish().text()}"

    def mask_picture(pic, m):
        return images.mask_to_pil(m, pic.pil.size)

    # --- the page's handlers: each gets a dict of every input (inputs given as a set) ----------------------

    def read(v, progress=None, quiet=False):
        """(work, picture, settings) from the page's inputs; picture None when quietly skipped."""
        work, pic = begin(v[state], v[image], v[target], progress, quiet)
        return work, pic, settings({k: v[knobs[k]] for k in KNOB_ORDER})

    def show_edit(v, progress=gr.Progress(), quiet=False):
        work, pic, s = read(v, progress, quiet)
        if pic is None:
            return gr.skip()
        dmap, m = work.mask(pic, v[source], v[target], s)
        edit = work.edit(pic, v[source], v[target], s, m)
        return viz.heatmap(dmap, pic.pil.size), mask_picture(pic, m), edit, cost_text(work)

    def edit_quietly(v, progress=gr.Progress()):
        return show_edit(v, progress, quiet=True)

    def threshold_moved(v):
        """The mask at a new threshold from the cached D (no UNet); nothing before the first edit."""
        work, pic, s = read(v, quiet=True)
        if pic is None or not work.has_difference(pic, v[source], v[target], s):
            return gr.skip()
        return mask_picture(pic, work.mask(pic, v[source], v[target], s)[1]), cost_text(work)

    def painted(v, progress=gr.Progress()):
        """New strokes: the mask they make with the cached D at once (no UNet), then the edit decoded with it.
        Setting the editor's picture echoes an input event with the same strokes: nothing to do then."""
        work, pic, s = read(v, quiet=True)
        if pic is None or v[editor] is None or not work.paint(pic, v[editor]["layers"]):
            yield gr.skip()
            return
        if work.has_difference(pic, v[source], v[target], s):
            yield gr.skip(), mask_picture(pic, work.mask(pic, v[source], v[target], s)[1]), gr.skip(), gr.skip()
            yield show_edit(v, progress, quiet=True)

    def painter_view(v):
        """The editor: the mask over the input, the session's strokes kept (costly to resend: on release)."""
        work, pic, s = read(v, quiet=True)
        if pic is None or not work.has_difference(pic, v[source], v[target], s):
            return gr.skip()
        over = viz.overlay(pic.pil, mask_picture(pic, work.mask(pic, v[source], v[target], s)[1]))
        layers = v[state].strokes.get(pic.digest, (None, None, []))[2]
        value = {"background": over, "layers": layers, "composite": None}
        # a brush 1/32 of the image's side (half a latent cell at the toy model's 64 px): "auto" sizes it by the
        # 800 px canvas, one stroke then covers most of a small image
        return gr.ImageEditor(value, brush=gr.Brush(default_size=max(1, max(pic.pil.size) // 32), **BRUSH))

    def compare(v, progress=gr.Progress()):
        work, pic, s = read(v, progress)
        m = work.mask(pic, v[source], v[target], s)[1]
        methods = [work.edit(pic, v[source], v[target], s.replace(method=method), m) for method in METHODS]
        return (*methods, cost_text(work))

    def draw_scene(session):
        session.scenes += 1  # held-out seeds, a new scene each press
        e = world.edits(1, world.EVAL_SEED + session.scenes, spec=toy_world or world.V1)[0]
        return e.source.render(), e.source_caption, e.target_caption

    # --- the API (gradio_client) -----------------------------------------------------------------------

    def api_mask(session, image, source, target, threshold):
        work, pic = begin(session, image, target)
        s = settings({"threshold": threshold})
        dmap, m = work.mask(pic, source, target, s)
        work.finish()
        return mask_picture(pic, m), viz.heatmap(dmap, pic.pil.size)

    def api_edit(session, image, source, target, ratio, threshold):
        work, pic = begin(session, image, target)
        s = settings({"ratio": ratio, "threshold": threshold, "method": "diffedit"})
        m = work.mask(pic, source, target, s)[1]
        edited = work.edit(pic, source, target, s, m)
        work.finish()
        return edited, mask_picture(pic, m)

    # --- the page --------------------------------------------------------------------------------------

    picture = dict(format="png", height=256, elem_classes="pixelated")
    with gr.Blocks(title="DiffEdit", analytics_enabled=False) as demo:
        state = gr.State(Session(CACHE_BYTES), time_to_live=SESSION_SECONDS)
        gr.Markdown("## DiffEdit\nMask from the disagreement of two texts, DDIM encoding, masked decoding "
                    "(Couairon et al., ICLR 2023). Move the threshold or paint the mask: nothing is recomputed "
                    "but the mask and the decoding.")
        with gr.Row():
            with gr.Column():
                image = readable_upload(gr.Image(label="input image", type="filepath", image_mode=None,
                                                 sources=["upload", "clipboard"], elem_id="input-image", **picture))
                scene = gr.Button("Draw a toy scene", visible=toy, elem_id="scene")
                source = gr.Textbox(label="source text (reference R: what the image shows)", elem_id="source")
                target = gr.Textbox(label="target text (query Q: what it should show)", elem_id="target")
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="run")
                    run_all = gr.Button("Compare the three methods", elem_id="compare")
                cost = gr.Markdown("**Last action:** none yet", elem_id="cost")
            with gr.Column():
                knobs = _knob_inputs(gr, d)
        with gr.Row():
            heat = gr.Image(label="D (difference map)", interactive=False, elem_id="heat", **picture)
            mask = gr.Image(label="mask", interactive=False, image_mode="L", elem_id="mask", **picture)
            editor = gr.ImageEditor(
                label="mask over the input: paint on 'add' or 'erase'", type="pil", format="png", height=256,
                sources=[], transforms=[], elem_classes="pixelated", elem_id="editor",
                layers=gr.LayerOptions(allow_additional_layers=False, layers=PAINT_LAYERS),
                brush=gr.Brush(**BRUSH))
            edited = gr.Image(label="edit", interactive=False, elem_id="edit", **picture)
        with gr.Row():
            tiles = [gr.Image(label=label, interactive=False, elem_id=f"method-{m}", **picture)
                     for m, label in zip(METHODS, ("DiffEdit", "SDEdit", "Encode-Decode"))]
        api_mask_button, api_edit_button = gr.Button(visible=False), gr.Button(visible=False)

        inputs = {state, image, source, target, *knobs.values()}
        model = dict(concurrency_id="model", concurrency_limit=1, api_visibility="undocumented")
        cheap = dict(concurrency_limit=None, show_progress="hidden", api_visibility="undocumented")
        refresh = dict(fn=painter_view, inputs=inputs, outputs=editor, **cheap)
        outputs = [heat, mask, edited, cost]
        run.click(show_edit, inputs, outputs, **model).then(**refresh)
        run_all.click(compare, inputs, [*tiles, cost], **model)
        knobs["threshold"].input(threshold_moved, inputs, [mask, cost], trigger_mode="always_last", **cheap)
        # knobs that need no new mask pass nor inversion redo the edit at once; those that move the mask also
        # refresh the editor, once, on release
        for name, event in (("threshold", "release"), ("normalization", "change"), ("ratio", "release"),
                            ("guidance", "release"), ("method", "change")):
            listener = getattr(knobs[name], event)(edit_quietly, inputs, outputs, trigger_mode="always_last", **model)
            if name in ("threshold", "normalization"):
                listener.then(**refresh)
        editor.input(painted, inputs | {editor}, outputs, trigger_mode="always_last", show_progress="hidden", **model)
        scene.click(draw_scene, state, [image, source, target], api_visibility="undocumented")
        api_mask_button.click(api_mask, [state, image, source, target, knobs["threshold"]], [mask, heat],
                              api_name="mask", concurrency_id="model", concurrency_limit=1)
        api_edit_button.click(api_edit, [state, image, source, target, knobs["ratio"], knobs["threshold"]],
                              [edited, mask], api_name="edit", concurrency_id="model", concurrency_limit=1)
    return demo
