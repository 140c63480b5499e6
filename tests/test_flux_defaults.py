"""An edit that gives no steps or guidance runs the model's own defaults: FLUX.1-dev 28 steps at embedded guidance 3.5
(FluxPipeline's), schnell 4 steps without guidance; SD1/2/XL/SD3 keep the knobs' 50 steps and CFG 7.5. FLUX.1-dev's
unguided estimates (mask, encoding) run at the default embedded guidance, the decoding's. A guidance given to schnell,
which has no guidance input, is warned of."""
from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from diffedit.engine import Engine
from diffedit.models import PRESETS, FluxModel, T5Tokenizer, preset
from diffedit.pipeline import DiffEdit
from diffedit.settings import KNOBS, EditSettings

pytest.importorskip("tokenizers")
from test_sd3_text import t5_tokenizer  # noqa: E402


def tiny_flux(name: str, folder) -> DiffEdit:
    t5_tokenizer(folder)
    torch.manual_seed(0)
    model = FluxModel(preset(name))
    model.t5_tokenizer = T5Tokenizer(folder / "tokenizer.json")
    return DiffEdit(model, dtype=torch.float32)


@pytest.mark.parametrize("name, steps, guidance", [("tiny-flux", 28, 3.5), ("tiny-flux-schnell", 4, 1.0)])
def test_a_flux_edit_without_steps_or_guidance_runs_the_models_defaults(name, steps, guidance, tmp_path, monkeypatch):
    de = tiny_flux(name, tmp_path)
    seen, edits = [], Engine.edits
    monkeypatch.setattr(Engine, "edits",
                        lambda self, inputs, reqs, **kw: seen.extend(reqs) or edits(self, inputs, reqs, **kw))
    image = Image.new("RGB", (16, 16), (120, 40, 200))
    de.edit(image, "a dog", n=1)
    de.edit(image, "a dog", n=1, steps=2, guidance=2.0)  # given values win
    assert [(r.settings.steps, r.settings.guidance) for r in seen] == [(steps, guidance), (2, 2.0)]
    assert de.defaults(steps=None, guidance=None, ratio=None) == {"steps": steps, "guidance": guidance,
                                                                  "ratio": KNOBS["ratio"].default}


def test_flux_dev_estimates_without_guidance_at_the_default_embedded_scale(tmp_path):
    de = tiny_flux("tiny-flux", tmp_path)
    dev = PRESETS["flux-dev"].flux_schedule.guidance
    assert de.denoiser.unguided == PRESETS["tiny-flux"].flux_schedule.guidance == dev == 3.5


@pytest.mark.parametrize("name", [n for n, c in PRESETS.items() if c.family != "flux"])
def test_stable_diffusion_defaults_are_unchanged(name):
    assert PRESETS[name].edit_defaults() == {}
    s = EditSettings()
    knobs = tuple(KNOBS[k].default for k in ("steps", "guidance", "ratio"))
    assert (s.steps, s.guidance, s.ratio) == (50, 7.5, 0.7) == knobs


@pytest.mark.parametrize("name, guidance, warned", [("tiny-flux-schnell", 2.0, True), ("tiny-flux-schnell", None, False),
                                                    ("tiny-flux", 2.0, False)])
def test_a_guidance_schnell_cannot_take_is_warned_of_and_changes_nothing(name, guidance, warned, tmp_path, caplog):
    de = tiny_flux(name, tmp_path)
    image = Image.new("RGB", (16, 16), (120, 40, 200))
    kw = dict(n=1, steps=2, method="sdedit", seed=3)
    with caplog.at_level(logging.WARNING, logger="diffedit.engine"):
        out = de.edit(image, "a dog", guidance=guidance, **kw)
    said = [r.getMessage() for r in caplog.records if "no guidance input" in r.getMessage()]
    assert said == ([f"guidance {guidance:g} has no effect: this model has no guidance input (FLUX.1-schnell)"]
                    if warned else [])
    if warned:
        assert torch.equal(out.latents, de.edit(image, "a dog", guidance=1.0, **kw).latents)
