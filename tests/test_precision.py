"""dtype "auto" and half-precision networks under float32 latents; bf16 on CPUs with and without native bf16."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import DiffEdit, precision
from measure import edit_agreement
from diffedit.models import StableDiffusion, preset
from diffedit.toy import judge, world


@pytest.fixture
def fresh_detection(monkeypatch):
    """The detection and the warning recomputed for this test (both are cached per process), and again after it."""
    cached = (precision.cpu_has_native_bf16, precision.warn_emulated_bf16)  # before a test replaces one
    for fn in cached:
        fn.cache_clear()
    yield monkeypatch
    for fn in cached:
        fn.cache_clear()


@pytest.mark.parametrize("native,device,want", [(True, "cpu", torch.bfloat16), (False, "cpu", torch.float32),
                                                (True, "cuda", torch.float16), (False, "mps", torch.float32)])
def test_auto_picks_bf16_on_native_cpus_fp16_on_cuda_else_fp32(monkeypatch, native, device, want):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_dtype("auto", device) == want
    assert precision.resolve_dtype("float32", device) == torch.float32  # an explicit choice always wins
    assert precision.resolve_dtype(torch.float64, device) == torch.float64


def test_native_bf16_detection_reads_the_cpu_flags(fresh_detection):
    fresh_detection.delenv(precision.NO_NATIVE_BF16_ENV, raising=False)
    flags = open("/proc/cpuinfo").read().split()
    assert precision.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("value,native", [("1", False), ("yes", False), ("0", None), ("", None)])
def test_the_no_native_bf16_switch_turns_detection_off_on_any_cpu(fresh_detection, value, native):
    fresh_detection.setenv(precision.NO_NATIVE_BF16_ENV, value)
    flags = open("/proc/cpuinfo").read().split()
    detected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert precision.cpu_has_native_bf16() == (detected if native is None else native)
    if native is False:
        assert precision.resolve_dtype("auto", "cpu") == torch.float32


def test_bf16_asked_for_on_a_cpu_without_native_bf16_is_granted_with_one_warning(fresh_detection, caplog):
    fresh_detection.setenv(precision.NO_NATIVE_BF16_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="diffedit.precision"):
        assert precision.resolve_dtype("auto", "cpu") == torch.float32  # auto never picks it: no warning
        assert precision.resolve_dtype("bfloat16", "cuda") == torch.bfloat16  # not a CPU: no warning
        assert not caplog.records
        assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert precision.resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    (record,) = caplog.records  # once per process, however often it is asked
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert f"about {precision.EMULATED_BF16_SLOWDOWN}x slower than float32" in record.getMessage()


def test_bf16_on_a_cpu_with_native_bf16_warns_nothing(fresh_detection, caplog):
    fresh_detection.setattr(precision, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="diffedit.precision"):
        assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert not caplog.records


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


@pytest.mark.skipif(not precision.cpu_has_native_bf16(),
                    reason="bf16 is emulated on this CPU, too slow for 6 toy edits in the suite; the agreement is the "
                           "bf16 format's, tested where bf16 is native")
def test_bf16_toy_edits_agree_with_fp32_over_a_set_of_edits():
    """Held-out seed 4242 (used for nothing else), 6 edits at 6 steps, judged over the set as
    scripts/precision_agreement.py does (measure.edit_agreement)."""
    fp32, bf16 = (DiffEdit.from_pretrained("toy", dtype=d) for d in ("float32", "bfloat16"))
    pairs, verdicts_differ = [], 0
    for i, ed in enumerate(world.edits(6, 4242)):
        image = Image.fromarray(ed.source.render())
        a, b = (de.edit(image, ed.target_caption, source=ed.source_caption, steps=6, seed=i) for de in (fp32, bf16))
        pairs.append((a, b))
        verdicts_differ += judge.edit_success(np.asarray(a.image), ed) != judge.edit_success(np.asarray(b.image), ed)
    agreement = edit_agreement(pairs)
    # D is a mean over n noises and the channels, so bf16's rounding (2^-8 relative) flips only cells next to the
    # threshold: the masks agree. Inside the mask, sampling amplifies small differences, and an edit may draw another
    # object (12 dB at worst over 40 edits, docs/results/precision_cpu.json): the typical edit is judged (median PSNR,
    # the script's 30 dB target), and the judge's verdict may differ on one edit of the set.
    assert agreement["mask_iou"] >= 0.95 and agreement["psnr_median_db"] >= 30, agreement
    assert verdicts_differ <= 1


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
