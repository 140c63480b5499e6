"""The engine's plan (plan.py) is its one cost model: for random mixes of images, queries, methods, recipes and
settings, the model rows counted per phase and the VAE images encoded and decoded equal ``Plan.cost`` exactly; work
the memo holds is planned at no cost and runs no model call; the jobs are named and grouped as documented."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import images
from diffedit.app_state import LRUCache
from diffedit.models import StableDiffusion, preset
from diffedit.pipeline import DiffEdit
from diffedit.plan import Cost, Input, Request
from diffedit.settings import METHODS, EditSettings

TEXTS = ["a red circle", "a blue square", "a photo", ""]


@pytest.fixture(scope="module")
def de():
    torch.manual_seed(0)
    return DiffEdit(StableDiffusion(preset("tiny")))


class Counted:
    """An engine's model rows per phase and VAE images, as they run."""

    def __init__(self, de, monkeypatch):
        self.rows = dict.fromkeys(("mask", "inversion", "decoding"), 0)
        self.encodes = self.decodes = 0
        self.phase = None
        decode = de.decode_latents

        def decode_latents(latents):
            self.decodes += latents.shape[0]
            return decode(latents)
        monkeypatch.setattr(de, "decode_latents", decode_latents)

    def on_phase(self, phase):
        if phase == "encode":
            self.encodes += 1
        else:
            self.phase = phase

    def wrap(self, model):
        def call(x, t, c):
            self.rows[self.phase] += x.shape[0]
            return model(x, t, c)
        return call

    def cost(self) -> Cost:
        return Cost(**self.rows, vae_encodes=self.encodes, vae_decodes=self.decodes)


def picture(rng: random.Random) -> torch.Tensor:
    w, h = rng.choice([(16, 16), (24, 16)])
    pixels = np.random.default_rng(rng.randrange(1000)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return images.to_tensor(Image.fromarray(pixels), 8, "cpu", torch.float32)


def random_mix(de, rng: random.Random):
    inputs = [Input(picture(rng), key=f"image{i}") for i in range(rng.randint(1, 3))]
    requests = []
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(inputs))
        method = rng.choice(METHODS)
        s = EditSettings(method=method, ratio=rng.choice([0.3, 0.5, 0.8]), steps=rng.choice([4, 5]),
                         n=rng.choice([1, 2, 3]), strength=rng.choice([0.4, 0.6]), seed=rng.choice([0, 1]),
                         guidance=rng.choice([1.0, 5.0]), threshold=rng.choice([0.3, 0.6]),
                         compat=rng.choice([None, "diffusers"]))
        target, source = rng.choice(TEXTS[:3]), rng.choice(TEXTS[2:])
        mask = None
        if method in ("diffedit", "masked-sdedit") and rng.random() < 0.2:
            mask = torch.rand(de.latent_shape(inputs[i].pixels)[-2:]) > 0.5
        requests.append(Request(i, target, source, s, mask))
    return inputs, requests


@pytest.mark.parametrize("seed", range(6))
def test_counted_model_rows_and_vae_images_equal_the_plans_cost(de, monkeypatch, seed):
    rng = random.Random(seed)
    inputs, requests = random_mix(de, rng)
    counted = Counted(de, monkeypatch)
    engine = de.engine(wrap=counted.wrap, on_phase=counted.on_phase)
    planned = engine.plan(inputs, requests).cost
    engine.edits(inputs, requests)
    assert counted.cost() == planned
    assert planned.rows > 0 and planned.vae_decodes == len(requests)


def test_work_the_memo_holds_is_planned_free_and_runs_no_model_call(de, monkeypatch):
    inputs, requests = random_mix(de, random.Random(11))
    memo = LRUCache()
    de.engine(memo=memo).edits(inputs, requests)
    counted = Counted(de, monkeypatch)
    engine = de.engine(memo=memo, wrap=counted.wrap, on_phase=counted.on_phase)
    again = engine.plan(inputs, requests)
    assert again.cost.mask == again.cost.inversion == again.cost.vae_encodes == 0
    assert all(not m.run for p in again.masks for m in p.maps) and not again.encodings
    engine.edits(inputs, requests)
    assert counted.cost() == again.cost


def test_the_plan_shares_one_draw_one_map_and_one_encoding_as_documented(de):
    pixels = picture(random.Random(0))
    s = EditSettings(steps=5, n=3, ratio=0.5)
    requests = [Request(0, "a red circle", "a photo", s.replace(threshold=t, ratio=r))
                for t in (0.3, 0.6) for r in (0.4, 0.8)]
    requests.append(Request(0, "a blue square", "a photo", s.replace(n=2)))
    plan = de.engine().plan([Input(pixels)], requests)
    (mask_pass,) = plan.masks  # one image, one (strength, seed, steps): one draw
    assert mask_pass.draw == 3 and [len(m.requests) for m in mask_pass.maps] == [4, 1]
    assert plan.cost.mask == 3 * 3  # three texts over the first 3 noises
    (encoding,) = plan.encodings  # one encoding, to the largest ratio
    assert encoding.k == 4 and encoding.cost.inversion == 4
    # one decoding per grid k: ratio 0.8 gives k 4; 0.4 and 0.5 both give k 2 (round half to even)
    assert sorted((d.k, len(d.requests)) for d in plan.decodings) == [(2, 3), (4, 2)]


def test_a_target_equal_to_its_source_costs_no_mask_rows(de):
    plan = de.engine().plan([Input(picture(random.Random(0)))], [Request(0, "a photo", "a photo", EditSettings(steps=4))])
    assert plan.cost.mask == 0 and plan.masks[0].maps[0].empty


@pytest.fixture(scope="module")
def flux_de(tmp_path_factory):
    """A tiny FLUX.1-dev-style model: guidance embedded, so a guided sample is one row unless true CFG is on."""
    from diffedit.models import FluxModel, T5Tokenizer
    from test_sd3_text import t5_tokenizer
    folder = tmp_path_factory.mktemp("flux_t5")
    t5_tokenizer(folder)
    torch.manual_seed(0)
    model = FluxModel(preset("tiny-flux"))
    model.t5_tokenizer = T5Tokenizer(folder / "tokenizer.json")
    return DiffEdit(model, dtype=torch.float32)


@pytest.mark.parametrize("true_cfg", [1.0, 2.5], ids=["embedded", "true-cfg"])
@pytest.mark.parametrize("seed", range(2))
def test_counted_flux_rows_equal_the_plans_cost(flux_de, monkeypatch, seed, true_cfg):
    monkeypatch.setattr(flux_de, "true_cfg_scale", true_cfg)
    inputs, requests = random_mix(flux_de, random.Random(seed))
    counted = Counted(flux_de, monkeypatch)
    engine = flux_de.engine(wrap=counted.wrap, on_phase=counted.on_phase)
    planned = engine.plan(inputs, requests).cost
    engine.edits(inputs, requests)
    assert counted.cost() == planned and planned.rows > 0
