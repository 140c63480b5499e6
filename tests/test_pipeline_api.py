"""The public API of DiffEdit (pipeline.py, images.py) on a tiny random model: any image in, the same size out;
a list of targets equals editing each alone; seeds reproduce bits; external masks; argument checks."""
import numpy as np
import pytest
import torch
from PIL import Image

import diffedit.pipeline as pipeline_module
from diffedit import images, masking
from diffedit.models import StableDiffusion, preset
from diffedit.pipeline import DiffEdit

from conftest import rel_err

KW = dict(steps=4, n=2)


@pytest.fixture(scope="module")
def de():
    torch.manual_seed(0)
    return DiffEdit(StableDiffusion(preset("tiny")))


def picture(size=(24, 16), mode="RGB", seed=0) -> Image.Image:
    """A random picture of ``size`` (W, H) converted to ``mode``."""
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), mode="RGBA")
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)


def prepared_x0(de, image) -> torch.Tensor:
    """x_0 of ``image`` exactly as the pipeline prepares it."""
    return de.encode_image(images.to_tensor(images.load_image(image), de.multiple, de.device, de.dtype))[0]


# --- any image in, the input size out ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,size", [("RGB", (37, 53)), ("RGBA", (20, 12)), ("L", (16, 16)), ("P", (13, 9)),
                                       ("LA", (16, 8)), ("1", (8, 16)), ("CMYK", (12, 12)), ("RGB", (3, 2))])
def test_any_mode_and_size_comes_back_at_the_input_size(de, mode, size):
    r = de.edit(picture(size, mode), "a red car", **KW)
    assert r.image.size == size and r.image.mode == "RGB"
    assert r.mask.size == size and r.mask.mode == "L"
    assert set(np.unique(np.asarray(r.mask))) <= {0, 255}
    h, w = (s // de.cfg.vae.downsampling for s in images.model_size(size, de.multiple)[::-1])
    assert r.mask_map.shape == (h, w) and r.latents.shape == (de.cfg.unet.out_channels, h, w)
    assert 0 <= r.mask_map.min() and r.mask_map.max() <= 1


def test_exif_orientation_is_applied(de, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored 40 x 24, shown 24 x 40
    picture((40, 24)).save(path, exif=exif)
    assert images.load_image(path).size == (24, 40)
    assert de.edit(path, "a dog", **KW).image.size == (24, 40)
    with Image.open(path) as opened:
        assert de.edit(opened, "a dog", **KW).image.size == (24, 40)


def test_16_bit_grayscale_keeps_its_brightness(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(path)  # 50 % grey in 16 bits
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    assert np.asarray(images.load_image(path)).mean() == pytest.approx(128, abs=1)


def test_palette_transparency_is_the_same_from_a_path_or_a_pil_image(tmp_path):
    p = Image.new("P", (8, 8), 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png")
    from_path, from_pil = images.load_image(tmp_path / "p.png"), images.load_image(p)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_pil))
    assert tuple(np.asarray(from_pil)[0, 0]) == (255, 255, 255)  # transparent -> composited on white


# --- a list of targets, seeds --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["diffedit", "encode-decode"])
def test_a_list_of_targets_equals_each_target_alone(de, method):
    """Masks exactly; latents to float32 rounding (the batch size changes the kernels' summation order, and
    guidance 7.5 amplifies it: ~2e-5 relative here; the float64 test below pins the equality itself)."""
    image, targets = picture((16, 24)), ["a dog", "a red car", "a bowl of fruit"]
    together = de.edit(image, targets, source="a cat", seed=3, method=method, **KW)
    assert isinstance(together, list) and len(together) == 3
    for target, t in zip(targets, together):
        alone = de.edit(image, target, source="a cat", seed=3, method=method, **KW)
        assert rel_err(t.latents, alone.latents) < 1e-4
        assert t.image.size == alone.image.size == image.size
        if method == "diffedit":  # the mask of one target must not depend on the others
            assert np.array_equal(np.asarray(t.mask), np.asarray(alone.mask))
            assert torch.equal(t.mask_map, alone.mask_map)
        else:
            assert t.mask is None and t.mask_map is None
    assert de.edit(image, ("a dog",), **KW)[0].image.size == image.size  # a tuple is a list too


def test_a_list_of_targets_equals_each_target_alone_in_float64():
    torch.manual_seed(0)
    de64 = DiffEdit(StableDiffusion(preset("tiny")).double(), dtype=torch.float64)
    image, targets = picture((16, 16)), ["a dog", "a red car"]
    together = de64.edit(image, targets, source="a cat", seed=3, **KW)
    for target, t in zip(targets, together):
        alone = de64.edit(image, target, source="a cat", seed=3, **KW)
        assert t.latents.dtype == torch.float64
        torch.testing.assert_close(t.latents, alone.latents, atol=1e-10, rtol=0)
        assert np.array_equal(np.asarray(t.mask), np.asarray(alone.mask))
        torch.testing.assert_close(t.mask_map, alone.mask_map, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["diffedit", "sdedit"])
def test_the_same_seed_gives_the_same_bits(de, method):
    image = picture((16, 16), "RGBA")
    a, b = (de.edit(image, "a dog", seed=7, method=method, **KW) for _ in range(2))
    assert torch.equal(a.latents, b.latents)
    assert a.image.tobytes() == b.image.tobytes()
    if method == "diffedit":
        assert torch.equal(a.mask_map, b.mask_map) and a.mask.tobytes() == b.mask.tobytes()
        assert not torch.equal(de.edit(image, "a dog", seed=8, **KW).mask_map, a.mask_map)


def test_mask_alone_is_the_mask_edit_uses(de):
    image = picture((16, 16))
    edited = de.edit(image, "a dog", source="a cat", seed=5, threshold=0.4, **KW)
    alone = de.mask(image, "a dog", source="a cat", seed=5, threshold=0.4, **KW)
    assert torch.equal(alone.map, edited.mask_map)
    assert alone.image.tobytes() == edited.mask.tobytes()
    both = de.mask(image, ["a dog", "a cat"], source="a cat", seed=5, **KW)
    assert isinstance(both, list) and len(both) == 2 and not both[1].binary.any()  # Q = R: D = 0


def test_dilate_grows_the_mask_of_edit_and_mask_and_leaves_d_as_it_is(de):
    image = picture((32, 32))
    call = dict(source="a cat", seed=3, threshold=0.6, **KW)
    plain, grown = (de.edit(image, "a dog", dilate=c, **call) for c in (0, 1))
    assert torch.equal(plain.mask_map, grown.mask_map)  # D is not touched
    m = plain.mask_map > 0.6
    assert 0 < m.sum() < m.numel()
    want = masking.dilate(m, 1)
    assert not torch.equal(want, m)
    assert np.array_equal(np.asarray(grown.mask), np.asarray(images.mask_to_pil(want, image.size)))
    assert np.asarray(plain.mask).tobytes() == np.asarray(images.mask_to_pil(m, image.size)).tobytes()
    alone = de.mask(image, "a dog", dilate=1, **call)
    assert torch.equal(alone.binary, want) and torch.equal(alone.map, plain.mask_map)


# --- external masks ------------------------------------------------------------------------------------------

def test_an_external_mask_skips_estimation_and_black_keeps_x0_exactly(de, monkeypatch):
    image = picture((20, 12))
    monkeypatch.setattr(masking, "noise_difference_maps", lambda *a, **k: pytest.fail("mask estimation ran despite mask="))
    x0 = prepared_x0(de, image)
    h, w = x0.shape[-2:]
    black_pil = Image.new("L", image.size, 0)
    for mask in (black_pil, black_pil.convert("RGB"), torch.zeros(h, w), torch.zeros(h, w, dtype=torch.bool)):
        r = de.edit(image, "a dog", mask=mask, **KW)
        assert r.mask_map is None and r.image.size == image.size
        assert torch.equal(r.latents, x0)
        assert not np.asarray(r.mask).any()
    one = torch.zeros(h, w, dtype=torch.bool)
    one[1, 1] = True  # dilate grows estimated masks only: a given mask is used as it is
    r = de.edit(image, "a dog", mask=one, dilate=2, **KW)
    assert np.array_equal(np.asarray(r.mask), np.asarray(images.mask_to_pil(one, image.size)))
    white = de.edit(image, "a dog", mask=torch.ones(h, w), **KW)
    assert white.mask_map is None and np.asarray(white.mask).min() == 255
    assert not torch.equal(white.latents, x0)


# --- argument checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,named", [
    (dict(ratio=0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(ratio=float("nan")), "ratio"),
    (dict(threshold=-0.1), "threshold"), (dict(threshold=1.1), "threshold"), (dict(n=0), "n"),
    (dict(strength=0), "strength"), (dict(steps=0), "steps"), (dict(method="foo"), "method"),
    (dict(target=""), "target"), (dict(target="  "), "target"), (dict(target=[]), "target"),
    (dict(target=["a dog", ""]), "target"), (dict(mask=torch.zeros(3, 3)), "mask"),
    (dict(normalization="percentile"), "normalization"),
    (dict(n=100000), "n"), (dict(steps=5000), "steps"), (dict(compat="a1111"), "compat"),
    (dict(dilate=-1), "dilate"), (dict(dilate=1.5), "dilate"), (dict(dilate=17), "dilate"),
])
def test_bad_arguments_raise_value_error_naming_them(de, kwargs, named):
    call = dict(target="a dog", steps=2, n=1) | kwargs
    with pytest.raises(ValueError, match=rf"\b{named}\b"):
        de.edit(picture((8, 8)), **call)


def test_unreadable_images_raise_image_error_naming_the_file(de, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not a png")
    for bad, named in [(tmp_path / "missing.png", "missing.png"), (tmp_path / "junk.png", "junk.png"),
                       (tmp_path, "folder"), (42, "int")]:
        with pytest.raises(images.ImageError, match=named):
            de.edit(bad, "a dog", **KW)


# --- progress ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,compat", [("diffedit", None), ("diffedit", "diffusers"), ("sdedit", None),
                                          ("encode-decode", None)])
def test_the_progress_bar_reaches_its_total(de, monkeypatch, method, compat):
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(pipeline_module, "tqdm", Bar)
    de.edit(picture((8, 8)), "a dog", method=method, compat=compat, progress=True, **KW)
    (bar,) = bars
    assert bar.closed and bar.n == bar.total > 0
