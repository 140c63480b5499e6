"""dtype "auto" and half-precision networks under float32 latents."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import DiffEdit, precision
from diffedit.models import StableDiffusion, preset
from diffedit.toy import world


@pytest.mark.parametrize("native,device,want", [(True, "cpu", torch.bfloat16), (False, "cpu", torch.float32),
                                                (True, "cuda", torch.float16), (False, "mps", torch.float32)])
def test_auto_picks_bf16_on_native_cpus_fp16_on_cuda_else_fp32(monkeypatch, native, device, want):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_dtype("auto", device) == want
    assert precision.resolve_dtype("float32", device) == torch.float32  # an explicit choice always wins
    assert precision.resolve_dtype(torch.float64, device) == torch.float64


def test_native_bf16_detection_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split()
    assert precision.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_an_unknown_dtype_name_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="dtype must be auto or one of float32, float16, bfloat16"):
        precision.resolve_dtype("float8", "cpu")


def test_bf16_networks_keep_latents_and_the_map_in_float32():
    de = DiffEdit(StableDiffusion(preset("tiny")), dtype=torch.bfloat16)
    assert next(de.model.parameters()).dtype == torch.bfloat16 and de.latent_dtype == torch.float32
    image = Image.new("RGB", (16, 16), (200, 40, 40))
    r = de.edit(image, "a dog", source="a cat", steps=3, n=2)
    assert r.trajectory.latents.dtype == r.latents.dtype == r.mask_map.dtype == torch.float32


def test_the_model_keeps_its_own_dtype_unless_told():
    assert DiffEdit(StableDiffusion(preset("tiny")).double()).dtype == torch.float64


def test_bf16_toy_edits_agree_with_fp32():
    """Held-out seed 4242 (used for nothing else), 6 edits at 10 steps: masks IoU >= 0.95 on average and every
    edit within 30 dB PSNR of the fp32 one (measured at 20 steps: mean IoU 0.99, PSNR 34-54 dB)."""
    fp32, bf16 = (DiffEdit.from_pretrained("toy", dtype=d) for d in ("float32", "bfloat16"))
    ious = []
    for i, ed in enumerate(world.edits(6, 4242)):
        image = Image.fromarray(ed.source.render())
        a, b = (de.edit(image, ed.target_caption, source=ed.source_caption, steps=10, seed=i) for de in (fp32, bf16))
        ma, mb = np.asarray(a.mask) > 127, np.asarray(b.mask) > 127
        ious.append((ma & mb).sum() / max((ma | mb).sum(), 1))
        x, y = (np.asarray(r.image, dtype=np.float64) for r in (a, b))
        assert 10 * np.log10(255 ** 2 / max(((x - y) ** 2).mean(), 1e-12)) >= 30, (i, ed.kind)
    assert np.mean(ious) >= 0.95, ious


def test_channels_last_is_on_for_cpu_bf16_only_and_changes_no_result():
    model = StableDiffusion(preset("tiny"))
    weight = lambda de: next(p for p in de.model.unet.parameters() if p.dim() == 4)
    assert weight(DiffEdit(model, dtype=torch.bfloat16)).is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    plain = DiffEdit(StableDiffusion(preset("tiny")).double())
    assert weight(plain).is_contiguous()
    torch.manual_seed(0)
    cl = DiffEdit(StableDiffusion(preset("tiny")).double(), channels_last=True)
    image = Image.new("RGB", (16, 16), (30, 90, 200))
    a, b = (de.edit(image, "a dog", source="a cat", steps=3, n=2, seed=1) for de in (plain, cl))
    # float64, so that the layouts' different summation orders stay far below any tolerance
    assert (a.mask_map - b.mask_map).abs().max() < 1e-9
    assert ((a.latents - b.latents).norm() / a.latents.norm()) < 1e-9
