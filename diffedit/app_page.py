"""The web app's page: its components and their layout, nothing they do (``app_handlers`` answers the events and
``app.build_app`` wires them).

Every knob of ``settings.KNOBS`` is an input with its range, default and the paper's value; the page shows D as a
heat map with its colour scale, the mask and a painter over it, the edit, the methods side by side and a status
line (what the last action cost, or why it was refused).
"""
import os
from dataclasses import dataclass

import gradio as gr
from PIL.Image import DecompressionBombError, UnidentifiedImageError

from .settings import KNOBS, METHOD_TABLE, METHODS, EditSettings

LABELS = {"ratio": "encoding ratio r", "threshold": "threshold", "n": "noises n", "strength": "mask strength",
          "steps": "DDIM steps", "guidance": "guidance scale", "seed": "seed", "normalization": "normalisation",
          "method": "method"}
INFO = {"ratio": "how far the image is encoded before decoding: higher changes more",
        "threshold": "the mask is the rescaled D above it",
        "n": "noise draws averaged into D",
        "strength": "noise level of the mask pass",
        "steps": "of the full DDIM grid; r x steps are run",
        "guidance": "classifier-free, the source text as negative prompt",
        "seed": "of the mask noises and SDEdit's noise",
        "normalization": "how D's extremes are removed before rescaling (quantile: clip at the 98th percentile)",
        "method": "DiffEdit decodes from the encoding inside its mask, SDEdit from fresh noise everywhere"}
KNOB_ORDER = ("ratio", "threshold", "n", "strength", "steps", "guidance", "seed", "normalization", "method")
APPLY_ON_EDIT = ("n", "strength", "steps", "seed")  # they redo the mask pass or the inversion: only Edit runs them
GUIDANCE_MAX = 20.0  # the slider's end; the knob itself has no upper bound
# Small images (the toy model's 64 px) fill their box, scaled up without blur.
CSS = (".pixelated .image-frame { width: 100%; height: 100%; } "
       ".pixelated .image-frame img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }")
# The strokes' meaning is their colour, two colours no toy object or background has.
ADD, ERASE = (0, 255, 255), (255, 128, 0)
BRUSH = dict(colors=[f"rgb{ADD}", f"rgb{ERASE}"], color_mode="fixed")
PAINTER_HELP = ("**Paint the mask** (brush tool, over the hatched mask): **cyan** adds cells, **orange** erases "
                "them; the eraser removes strokes.")
LOW_HIGH = "D: low &rarr; high (rescaled; the mask is D &gt; threshold)"
NO_ACTION = "**Last action:** none yet"
PICTURE = dict(format="png", height=256, elem_classes="pixelated")


@dataclass(frozen=True)
class Unreadable:
    """What an input holds when gradio could not read it (an upload that is no image, a number out of its slider's
    range): the reason, for the handlers to show."""
    reason: str


def readable(component, unreadable=()):
    """``component`` whose input errors (gradio's own range checks; ``unreadable`` exceptions of an upload) become an
    ``Unreadable`` value instead of an error raised before any handler runs. (The instance is patched: a subclass
    would make gradio write a .pyi stub next to this module.)"""
    preprocess = component.preprocess

    def run(payload):
        try:
            return preprocess(payload)
        except gr.Error as e:
            return Unreadable(e.message)
        except unreadable:
            return Unreadable("That file is not an image this app can read (try a PNG or JPEG).")
    component.preprocess = run
    return component


@dataclass
class Page:
    """The page's components by name: the Blocks, its inputs, buttons and outputs."""
    blocks: gr.Blocks
    state: gr.State           # the browser session's app_state.Session
    repaint: gr.State         # whether the last strokes changed the mask
    image: gr.Image
    scene: gr.Button
    scene_note: gr.Markdown
    source: gr.Textbox
    target: gr.Textbox
    full: gr.Checkbox
    run: gr.Button
    compare: gr.Button
    stop: gr.Button
    status: gr.Markdown       # the last action: its cost, that it stopped, or why it was refused
    knobs: dict               # knob name -> its input
    heat: gr.Image
    mask: gr.Image
    editor: gr.ImageEditor
    edited: gr.Image
    tiles: list               # one image per method, in METHODS order
    api_mask: gr.Button       # hidden: the /mask and /edit endpoints hang on them
    api_edit: gr.Button

    @property
    def inputs(self) -> set:
        """What every page action reads (a set: gradio then passes one dict by component)."""
        return {self.state, self.image, self.source, self.target, self.full, *self.knobs.values()}


def legend_html() -> str:
    """A viridis bar, low to high, under the heat map."""
    import numpy as np

    from .viz import colormap
    stops = ", ".join(f"rgb{tuple(int(c) for c in rgb)}" for rgb in colormap(np.linspace(0, 1, 9)))
    return (f'<div style="height: 10px; background: linear-gradient(to right, {stops});"></div>'
            f'<div style="font-size: 0.85em;">{LOW_HIGH}</div>')


def knob_inputs(d: EditSettings) -> dict:
    """One input per knob, its range and default from ``settings.KNOBS`` (and ``d``)."""
    out = {}
    for name in KNOB_ORDER:
        k, value = KNOBS[name], getattr(d, name)
        info = INFO[name] + ("" if k.paper is None else f" (paper: {k.paper})")
        if name in APPLY_ON_EDIT:
            info += "; press Edit to apply"
        if k.choices is not None:
            c = gr.Radio(list(k.choices), value=value or k.default, label=LABELS[name], info=info,
                         elem_id=f"knob-{name}")
        elif name == "seed":
            c = gr.Number(value, label=LABELS[name], info=info, precision=0, minimum=k.lo, elem_id=f"knob-{name}")
        else:
            step = 1 if k.kind is int else 0.01
            hi = GUIDANCE_MAX if k.hi is None else k.hi
            c = gr.Slider(k.lo + step if k.lo_open else k.lo, hi, value=value, step=step, label=LABELS[name],
                          info=info, elem_id=f"knob-{name}")
        out[name] = readable(c)
    return out


def build_page(session, d: EditSettings, toy: bool, native: int, budget: int, state_seconds: int) -> Page:
    """The page: ``session`` the state each browser session starts from (a copy), kept ``state_seconds``; knobs
    at ``d``; the toy scene button when ``toy``; ``native``, ``budget``: the model's side and full-size pixel
    limit, for the full-size box's help."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # gradio reads it when Blocks are built and served: no telemetry
    with gr.Blocks(title="DiffEdit", analytics_enabled=False) as blocks:
        state = gr.State(session, time_to_live=state_seconds)
        repaint = gr.State(False)
        gr.Markdown("## DiffEdit\nMask from the disagreement of two texts, DDIM encoding, masked decoding "
                    "(Couairon et al., ICLR 2023). Move the threshold or paint the mask: nothing is recomputed "
                    "but the mask and the decoding.")
        with gr.Row():
            with gr.Column():
                image = readable(gr.Image(label="input image", type="filepath", image_mode=None,
                                          sources=["upload", "clipboard"], elem_id="input-image", **PICTURE),
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
                    compare = gr.Button("Compare the methods", elem_id="compare")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown(NO_ACTION, elem_id="status")
            with gr.Column():
                knobs = knob_inputs(d)
        with gr.Row():
            with gr.Column(min_width=160):
                heat = gr.Image(label="D (difference map)", interactive=False, elem_id="heat", **PICTURE)
                gr.HTML(legend_html(), elem_id="heat-legend")
            mask = gr.Image(label="mask", interactive=False, image_mode="L", elem_id="mask", **PICTURE)
            with gr.Column(min_width=160):
                gr.Markdown(PAINTER_HELP, elem_id="painter-help")
                editor = gr.ImageEditor(
                    label="mask strokes", type="pil", format="png", height=256, sources=[], transforms=[],
                    elem_classes="pixelated", elem_id="editor", brush=gr.Brush(**BRUSH),
                    layers=gr.LayerOptions(allow_additional_layers=False, layers=["strokes"], disabled=True))
            edited = gr.Image(label="edit", interactive=False, elem_id="edit", **PICTURE)
        with gr.Row():
            tiles = [gr.Image(label=METHOD_TABLE[m].label, interactive=False, elem_id=f"method-{m}", **PICTURE)
                     for m in METHODS]
        api_mask, api_edit = gr.Button(visible=False), gr.Button(visible=False)
    return Page(blocks, state, repaint, image, scene, scene_note, source, target, full, run, compare, stop, status,
                knobs, heat, mask, editor, edited, tiles, api_mask, api_edit)
