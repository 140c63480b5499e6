"""An edit that gives no steps or guidance runs the model's own defaults: FLUX.1-dev 28 steps at embedded guidance 3.5
(FluxPipeline's), schnell 4 steps without guidance; SD1/2/XL/SD3 keep the knobs' 50 steps and CFG 7.5. FLUX.1-dev's
unguided estimates (mask, encoding) run at the default embedded guidance, the decoding's."""
from __future__ import annotations

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
