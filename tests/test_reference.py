"""The one-screen DiffEdit (reference.py) and the engine that every front end runs are the same algorithm: for one
image and one query, the engine's edit, map D and mask M equal the reference's bit for bit (fp32, same seeds), for
each of the four methods and both recipes, on SD1-, SDXL-, SD3- and FLUX.1-style (dev and schnell) models (random weights). A wrong variant of
the reference (blending one step late under the paper's recipe) is shown to differ, so the comparison can fail."""
import dataclasses

import pytest
import torch

from conftest import randomize_

from diffedit import reference
from diffedit.engine import Input, Request
from diffedit.models import FluxModel, StableDiffusion, StableDiffusion3, T5Tokenizer, preset
from diffedit.pipeline import DiffEdit
from diffedit.settings import METHODS, RECIPES, EditSettings

Q, R = "a red circle", "a photo"
SIZES = {"tiny": (1, 4, 8, 8), "tiny-sdxl": (1, 4, 4, 8), "tiny-sd3": (1, 16, 6, 8), "tiny-flux": (1, 16, 6, 8),
         "tiny-flux-schnell": (1, 16, 6, 8)}  # x_0 of each family


@pytest.fixture(scope="module", params=list(SIZES))
def de(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = preset(request.param)
    if cfg.family == "flux":  # T5 needs a tokenizer file: the test-made one
        from test_sd3_text import t5_tokenizer
        folder = tmp_path_factory.mktemp("t5")
        t5_tokenizer(folder)
        model = FluxModel(cfg)
        model.t5_tokenizer = T5Tokenizer(folder / "tokenizer.json")
    elif cfg.family == "sd3":  # without the optional T5 tower (it needs a tokenizer file): SD3 then pads with zeros
        model = StableDiffusion3(dataclasses.replace(cfg, text_3=None))
    else:
        model = StableDiffusion(cfg)
    return DiffEdit(randomize_(model, seed=1), dtype=torch.float32), request.param


def x_0(name: str) -> torch.Tensor:
    return torch.randn(SIZES[name], generator=torch.Generator().manual_seed(5))


def conditionings(de: DiffEdit, x0: torch.Tensor):
    size = de.image_size(x0)
    return [de.encode_prompt([text], size) for text in (Q, R, "")]


def settings(method: str, compat: str | None, name: str = "tiny") -> EditSettings:
    # a ratio and a strength that diffusers' recipe floors to other grid steps than the paper rounds to; thresholds
    # that cut each recipe's rescaled D of these random models inside its range (FLUX.1's lies higher)
    paper, diffusers = (0.8, 0.32) if "flux" in name else (0.7, 0.25)
    return EditSettings(method=method, ratio=0.55, steps=5, n=3, strength=0.5, guidance=4.0, seed=7,
                        threshold=diffusers if compat else paper, compat=compat)


@pytest.mark.parametrize("compat", [None, "diffusers"])
@pytest.mark.parametrize("method", METHODS)
def test_the_engine_equals_the_one_screen_reference_bit_for_bit(de, method, compat):
    de, name = de
    x0 = x_0(name)
    s = settings(method, compat, name)
    y_0, D, M = reference.edit(de.denoiser, x0, *conditionings(de, x0), s)
    (out,) = de.engine().edits([Input(x0=x0)], [Request(0, Q, R, s)], decode_pixels=False)
    assert torch.equal(out.latents, y_0[0])
    assert (out.map is None) == (D is None) and (out.mask is None) == (M is None)
    if D is not None:
        assert torch.equal(out.map, D) and torch.equal(out.mask, M)
        assert 0 < M.sum() < M.numel()  # a mask that keeps some cells and edits others: the blend is exercised


@pytest.mark.parametrize("method", ["diffedit", "masked-sdedit"])
def test_a_given_mask_replaces_step_one_in_both(de, method):
    de, name = de
    x0 = x_0(name)
    M = torch.zeros(x0.shape[-2:], dtype=torch.bool)
    M[: M.shape[0] // 2] = True
    s = settings(method, None)
    y_0, D, M_out = reference.edit(de.denoiser, x0, *conditionings(de, x0), s, M=M)
    (out,) = de.engine().edits([Input(x0=x0)], [Request(0, Q, R, s, mask=M)], decode_pixels=False)
    assert D is None and out.map is None and torch.equal(M_out, M)
    assert torch.equal(out.latents, y_0[0])


def test_blending_one_step_late_is_a_different_edit_so_the_comparison_can_fail(de):
    de, name = de
    x0 = x_0(name)
    s = settings("diffedit", None)
    late = dataclasses.replace(RECIPES["paper"], blend_late=True)
    y_0, _, _ = reference.edit(de.denoiser, x0, *conditionings(de, x0), s)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(RECIPES, "paper", late)
        y_late, _, _ = reference.edit(de.denoiser, x0, *conditionings(de, x0), s)
    assert not torch.equal(y_late, y_0)
    assert (y_late - y_0).abs().max() > 1e-3
