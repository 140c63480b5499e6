"""The one engine under every surface (engine.py): batches of images equal each image alone, embeddings equal their
texts, a trajectory from ``invert`` is used as it is, and the API, the sweep and the app give the same edit.

Tolerance: fp32 relative error ||a - b|| / ||b|| < 1e-4 where rows of several images share a model call (CPU kernels
round differently for another batch size); masks are compared bit for bit (each image's mask pass is its own)."""
import inspect
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rel_err

from diffedit import app_state, sweep
from diffedit.conditioning import Conditioning, mean_embedding
from diffedit.model_call import EvalCounter
from diffedit.models import StableDiffusion, preset
from diffedit.pipeline import DiffEdit
from diffedit.settings import EditSettings

KW = dict(steps=4, n=2, ratio=0.5)


@pytest.fixture(scope="module")
def de():
    torch.manual_seed(0)
    return DiffEdit(StableDiffusion(preset("tiny")))


def picture(size=(16, 16), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def assert_same_edit(a, b, tol=1e-4):
    assert rel_err(a.latents, b.latents) < tol
    if b.mask_map is not None:
        assert torch.equal(a.mask_map, b.mask_map)
    assert (a.mask is None) == (b.mask is None)


@pytest.mark.parametrize("method", ["diffedit", "sdedit", "encode-decode", "masked-sdedit"])
def test_a_batch_of_images_equals_each_image_edited_alone(de, method):
    pics = [picture(seed=0), picture(seed=1), picture((24, 16), seed=2)]  # the third: another size, its own group
    targets = ["a red circle", "a blue square", "a green triangle"]
    batch = de.edit(pics, targets, source="a photo", method=method, **KW)
    assert isinstance(batch, list) and len(batch) == 3
    for pic, target, got in zip(pics, targets, batch):
        assert got.image.size == pic.size
        assert_same_edit(got, de.edit(pic, target, source="a photo", method=method, **KW))
    same = de.edit(pics[:2], "a red circle", source=["a photo", "a picture"], method=method, **KW)
    assert_same_edit(same[1], de.edit(pics[1], "a red circle", source="a picture", method=method, **KW))


def test_a_batch_of_masks_equals_each_mask_alone_bit_for_bit(de):
    pics = [picture(seed=0), picture(seed=1)]
    batch = de.mask(pics, ["a red circle", "a blue square"], n=3, steps=4)
    for pic, target, got in zip(pics, ["a red circle", "a blue square"], batch):
        alone = de.mask(pic, target, n=3, steps=4)
        assert torch.equal(got.map, alone.map) and torch.equal(got.binary, alone.binary)


def test_an_embedding_equals_its_text_and_an_average_of_equal_captions_equals_the_caption(de):
    pic = picture()
    text = de.edit(pic, "a red circle", source="a photo", **KW)
    q, r = de.encode_prompt(["a red circle"]), de.encode_prompt(["a photo"])
    emb = de.edit(pic, q, source=r, **KW)
    assert torch.equal(emb.latents, text.latents) and torch.equal(emb.mask_map, text.mask_map)
    mean = de.edit(pic, mean_embedding(de.encode_prompt(["a red circle", "a red circle"])), source=r, **KW)
    assert torch.equal(mean.latents, text.latents)
    both = mean_embedding(de.encode_prompt(["a red circle", "a blue square"]))
    assert torch.allclose(both, (q + de.encode_prompt(["a blue square"])) / 2)
    rows = de.edit(pic, torch.cat([q, both]), source=r, **KW)  # K rows: K targets, decoded in one batch
    assert len(rows) == 2 and torch.equal(rows[0].mask_map, text.mask_map)
    assert rel_err(rows[0].latents, text.latents) < 1e-4


def test_an_sdxl_conditioning_equals_its_text():
    torch.manual_seed(0)
    xl = DiffEdit(StableDiffusion(preset("tiny-sdxl")))
    pic = picture((32, 32))
    text = xl.edit(pic, "a red circle", **KW)
    size = xl.image_size(text.latents)
    cond = xl.encode_prompt(["a red circle"], size)
    assert isinstance(cond, Conditioning)
    emb = xl.edit(pic, cond, source=xl.encode_prompt([""], size), **KW)
    assert torch.equal(emb.latents, text.latents)
    avg = mean_embedding(xl.encode_prompt(["a red circle", "a red circle"], size))
    assert torch.equal(xl.edit(pic, avg, **KW).latents, text.latents)


def test_edit_takes_the_trajectory_invert_returned_and_runs_no_second_encoding(de, monkeypatch):
    pic = picture()
    plain = de.edit(pic, "a red circle", source="a photo", **KW)
    traj = de.invert(pic, ratio=0.8, steps=4)
    counter = EvalCounter(de.eps)
    monkeypatch.setattr(de, "eps", counter)
    given = de.edit(pic, "a red circle", source="a photo", trajectory=traj, **KW)
    assert torch.equal(given.latents, plain.latents)
    k = round(0.5 * 4)
    assert counter.count == 2 * 2 + 2 * k  # mask (n = 2, two texts) and decoding; no encoding
    many = de.invert([pic, picture(seed=1)], ratio=0.5, steps=4)
    assert isinstance(many, list) and rel_err(many[0].latents, traj.truncate(0.5).latents) < 1e-4  # one batch of 2
    with pytest.raises(ValueError, match="ratio"):
        de.edit(pic, "a red circle", trajectory=de.invert(pic, ratio=0.25, steps=4), **KW)


def test_a_sweep_row_an_app_edit_and_an_api_edit_of_the_same_setting_are_equal(de):
    pic, s = picture(), EditSettings(ratio=0.5, steps=4, n=2, seed=7, threshold=0.4)
    api = de.edit(pic, "a red circle", source="a photo", ratio=0.5, steps=4, n=2, seed=7, threshold=0.4)
    (row,) = sweep.edit_grid(de, pic, "a photo", "a red circle",
                             [sweep.Setting("diffedit", 0.5, "caption", 0.4, 2, 0.5, 0)], 4, 7.5, 7)
    work = app_state.AppModel(de).work(app_state.Session())
    p = work.picture(pic)
    d, m = work.mask(p, "a photo", "a red circle", s)
    app = work.edit(p, "a photo", "a red circle", s, m)
    assert torch.equal(row.latents, api.latents) and torch.equal(row.mask, m) and torch.equal(d, api.mask_map)
    assert np.array_equal(np.asarray(app), np.asarray(api.image)) and np.array_equal(np.asarray(row.image),
                                                                                      np.asarray(api.image))


def test_mask_and_edit_share_their_defaults(de):
    m, e = (inspect.signature(f).parameters for f in (de.mask, de.edit))
    shared = set(m) & set(e) - {"image", "target"}
    assert {"source", "n", "strength", "threshold", "seed", "steps", "normalization", "dilate", "compat"} <= shared
    assert all(m[k].default == e[k].default for k in shared)


def test_a_list_in_gives_a_list_out_and_bad_lists_are_named(de):
    pic = picture()
    assert not isinstance(de.edit(pic, "a red circle", **KW), list)
    assert isinstance(de.edit([pic], "a red circle", **KW), list)
    assert isinstance(de.edit(pic, ["a red circle"], **KW), list)
    with pytest.raises(ValueError, match="target: give one text for all 2 images"):
        de.edit([pic, pic], ["a", "b", "c"], **KW)
    with pytest.raises(ValueError, match="source: give one text"):
        de.edit([pic, pic], "a", source=["x", "y", "z"], **KW)
    with pytest.raises(ValueError, match="trajectory: give one per image"):
        de.edit([pic, pic], "a", trajectory=de.invert(pic, ratio=0.5, steps=4), **KW)
    with pytest.raises(ValueError, match="one row"):
        de.edit(pic, [de.encode_prompt(["a", "b"])], **KW)


def test_a_target_equal_to_its_source_warns_that_the_mask_will_be_empty(de, caplog):
    with caplog.at_level(logging.WARNING, logger="diffedit"):
        r = de.edit(picture(), "a photo", source="a photo", **KW)
    assert not r.mask_map.any() and "mask is empty" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffedit"):
        de.edit(picture(), de.encode_prompt(["a photo"]), source="a photo", **KW)
    assert "mask is empty" in caplog.text
