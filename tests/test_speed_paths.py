"""The speed paths (no GPU needed): no host syncs in the sampling loops, batched == unbatched, chunked VAE attention,
the fp16 path (fp32 attention for SD2 768-v, the VAE's fp32 fallback), prompts encoded once, torch.compile.

Host syncs are caught on the ``meta`` device: a meta tensor has no data, so anything that reads a value back to
the host (``.item()``, ``int(t)``, ``bool(t)``, indexing with a 0-d tensor) raises there. The same code on CUDA
would stall the host once per step.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from conftest import rel_err

from diffedit import ddim, masking
from diffedit.denoiser import Denoiser
from diffedit.edit import decode
from diffedit.model_call import eps_model
from diffedit.inversion import encode
from diffedit.model_call import EvalCounter
from measure import ModuleCounter
from diffedit.models import ModelConfig, StableDiffusion, UNetConfig, preset
from diffedit.models.unet import CrossAttention, UNetModel
from diffedit.models.vae import AttnBlock
from diffedit.pipeline import DiffEdit


def picture(side: int = 32, seed: int = 0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(side, side, 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiny_de():
    torch.manual_seed(0)
    return DiffEdit(StableDiffusion(preset("tiny")))


# --- host syncs -----------------------------------------------------------------------------------------------------

def test_sampling_loops_make_no_host_sync():
    """Inversion (plain and CFG), masked decoding, a fresh-noise start and the mask noises on meta tensors: any
    read-back raises."""
    dev = torch.device("meta")
    alpha_bar = ddim.alphas_cumprod().to(dev)
    for ptype in ("epsilon", "v_prediction"):
        eps = eps_model(lambda x, t, c: 0.1 * x, ptype, alpha_bar)
        d = Denoiser(eps, alpha_bar, max_batch=3)
        x0, ctx = torch.zeros(1, 4, 8, 8, device=dev), torch.zeros(3, 7, 16, device=dev)
        levels = d.levels(0.8, 10)
        traj = encode(d, x0, ctx[:1], levels, 10)
        traj = encode(d.with_model(eps), x0, ctx[:1], levels, 10, guidance=7.5, uncond=ctx[:1])
        mask = torch.ones(2, 1, 8, 8, device=dev)
        xs = traj.latents
        for keep in (xs, xs[1:]):  # at the same level, and one step late (diffusers' recipe)
            y0 = decode(d, xs[-1].expand(2, 4, 8, 8), levels, ctx[1:], ctx[:1], 7.5, keep, mask)
            assert y0.shape == (2, 4, 8, 8) and y0.is_meta
        decode(d, d.add_noise(x0, torch.zeros_like(x0), levels[-1]), levels, ctx[1:2], ctx[:1], 7.5)
        noises = masking.noised_latents(d, x0, 3, 0.5, 10, torch.Generator().manual_seed(0))
        assert noises.x_t.is_meta  # (the mask pass itself is one batched call, not a loop: it may compare texts)


def test_networks_make_no_host_sync():
    """The UNet (both transformer kinds, fp32 attention on) and the VAE with chunked attention, on meta tensors."""
    for name in ("tiny", "sd21"):
        cfg = preset("tiny")
        if name == "sd21":  # SD2-like: linear projections, fixed head width
            cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, num_head_channels=8,
                                                                   use_linear_in_transformer=True))
        with torch.device("meta"):
            model = StableDiffusion(cfg)
        for m in model.modules():
            if isinstance(m, CrossAttention):
                m.attention_dtype = torch.float32
            if isinstance(m, AttnBlock):
                m.max_scores = 100  # forces the chunked path
        x = torch.zeros(2, 4, 8, 8, device="meta", dtype=torch.float16)
        t = torch.tensor([1, 981], device="meta")
        model.half()
        assert model.unet(x, t, torch.zeros(2, 77, 32, device="meta", dtype=torch.float16)).shape == x.shape
        vae = model.first_stage_model
        img = vae.decode(x)
        assert vae.encode(img)[0].shape == x.shape


# --- batching -------------------------------------------------------------------------------------------------------

def test_batched_equals_unbatched_through_edit():
    """max_batch 1 (every row alone) and 64 (one call per pass) give the same mask bits and latents within 1e-5.
    In float64: in float32 the batch size changes the kernels' summation order and CFG 7.5 amplifies it (~6e-5)."""
    torch.manual_seed(0)
    de = DiffEdit(StableDiffusion(preset("tiny")).double(), dtype=torch.float64)
    out = {}
    for mb in (1, 64):
        de.max_batch = mb
        out[mb] = de.edit(picture(), ["a red circle", "a blue square"], "a photo", ratio=0.8, n=3, steps=5)
    for a, b in zip(out[1], out[64]):
        assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask)) and torch.equal(a.mask_map > 0.5, b.mask_map > 0.5)
        assert (a.latents - b.latents).abs().max().item() < 1e-5
        assert (a.trajectory.latents - b.trajectory.latents).abs().max().item() < 1e-5


def test_prompts_are_encoded_once_per_edit(tiny_de, monkeypatch):
    """Each distinct text encoded once per edit, alone (so its embedding never depends on the other texts); the
    default source "" is also the inversion's."""
    calls = []
    text = tiny_de.model.cond_stage_model
    orig = type(text).forward
    monkeypatch.setattr(type(text), "forward", lambda self, ids: calls.append(ids.shape[0]) or orig(self, ids))
    for compat in (None, "diffusers"):
        for source in ("", "a photo"):
            calls.clear()
            tiny_de.edit(picture(), "a red circle", source, ratio=0.4, n=2, steps=5, compat=compat)
            assert calls == [1] * (2 if source == "" else 3), (compat, source, calls)


def test_eval_counter_and_module_counter_count_the_same_rows(tiny_de, monkeypatch):
    """The eps wrapper (the sweep's) and the forward pre-hook (the benchmark's, on any module) agree: an edit at
    n = 2, k = round(0.4 * 5) = 2 costs 2n + k + 2k = 10 UNet rows; the hook is gone after the block."""
    counted = EvalCounter(tiny_de.eps)
    monkeypatch.setattr(tiny_de, "eps", counted)
    with ModuleCounter(tiny_de.model.unet) as hooked:
        tiny_de.edit(picture(), "a red circle", "a photo", ratio=0.4, n=2, steps=5)
    assert counted.count == counted.rows == hooked.rows == 10 and counted.calls == hooked.calls
    tiny_de.edit(picture(), "a red circle", "a photo", ratio=0.4, n=2, steps=5)
    assert hooked.rows == 10 and counted.count == 20


# --- VAE attention chunked over queries -----------------------------------------------------------------------------

def test_chunked_vae_attention_equals_unchunked():
    torch.manual_seed(0)
    block = AttnBlock(64, 8).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(2, 64, 12, 10)
        full = block(x)
        block.max_scores = 2 * 120 * 7  # 7 queries per chunk: 18 chunks, the last one short
        chunked = block(x)
    assert rel_err(chunked, full) < 1e-5


# --- float16: fp32 attention for SD2 768-v, the VAE's fp32 fallback -------------------------------------------------

SD2_V = ModelConfig(  # a tiny SD2.1-768-v: linear projections, 8-wide heads, OpenCLIP-style text, v-prediction
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                    num_head_channels=8, context_dim=32, use_linear_in_transformer=True, norm_groups=8),
    vae=preset("tiny").vae,
    text=dataclasses.replace(preset("tiny").text, kind="openclip"),
    prediction_type="v_prediction", resolution=32)


def test_float32_attention_survives_scores_beyond_float16_range():
    """q.k = 8 x 300^2 = 7e5 > 65504: with attention_dtype float32 the fp16 module matches the fp32 one."""
    torch.manual_seed(0)
    attn = CrossAttention(16, 16, heads=2, dim_head=8).eval()
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(16))
        attn.to_k.weight.copy_(torch.eye(16))
        x = 300 * torch.randn(1, 5, 16).sign()
        ref = attn(x)
        half = attn.half()
        half.attention_dtype = torch.float32
        out = half(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 1e-2


def test_float16_edit_of_a_tiny_sd2_768_v_model_has_no_nan():
    torch.manual_seed(0)
    model = StableDiffusion(SD2_V)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1, 981]), torch.randn(2, 77, 32)
    with torch.no_grad():
        out32 = model.unet(x, t, c)
    de = DiffEdit(model.half(), dtype=torch.float16)
    assert de.attention_dtype == torch.float32  # chosen automatically for SD2 / v-prediction in fp16
    assert all(m.attention_dtype == torch.float32 for m in model.unet.modules() if isinstance(m, CrossAttention))
    with torch.no_grad():
        out16 = model.unet(x.half(), t, c.half())
    assert rel_err(out16.float(), out32) < 1e-2
    for compat in (None, "diffusers"):
        result = de.edit(picture(), "a red circle", "a photo", ratio=0.8, n=2, steps=5, compat=compat)
        assert result.latents.dtype == de.latent_dtype == torch.float32  # fp16 networks, fp32 latents
        assert torch.isfinite(result.latents).all() and torch.isfinite(result.trajectory.latents).all()
        assert torch.isfinite(result.mask_map).all()


def test_vae_falls_back_to_float32_when_float16_overflows(caplog):
    torch.manual_seed(0)
    model = StableDiffusion(preset("tiny"))
    vae32 = DiffEdit(model)
    z = 1e4 * torch.randn(1, 4, 8, 8)  # / 0.18215 and one conv later: beyond float16's 65504
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    ref_img, ref_z = vae32.decode_latents(z), vae32.encode_image(1e5 * img)
    de = DiffEdit(model.half(), dtype=torch.float16)
    with torch.no_grad():  # the float16 VAE alone really overflows on these inputs
        assert not torch.isfinite(model.first_stage_model.decode(z.half() / 0.18215)).all()
        assert not torch.isfinite(model.first_stage_model.encode((1e5 * img).half())[0]).all()
    assert de._vae32 is None
    with caplog.at_level(logging.WARNING, logger="diffedit.pipeline"):
        out, lat = de.decode_latents(z), de.encode_image(1e5 * img)
    assert "overflowed in float16" in caplog.text and de._vae32 is not None
    assert out.dtype == torch.float16 and lat.dtype == de.latent_dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lat).all()
    assert rel_err(out.float(), ref_img) < 1e-2 and rel_err(lat.float(), ref_z) < 1e-2
    caplog.clear()
    ok = de.decode_latents(torch.randn(1, 4, 8, 8))  # ordinary latents: no fallback, no warning
    assert torch.isfinite(ok).all() and "overflowed" not in caplog.text


# --- torch.compile --------------------------------------------------------------------------------------------------

def _compiled_equals_eager(backend: str):
    """max_batch=1: every UNet call has one shape, so one compilation (each new batch size would add one)."""
    torch.manual_seed(0)
    eager = DiffEdit(StableDiffusion(preset("tiny")), max_batch=1)
    torch.manual_seed(0)
    compiled = DiffEdit(StableDiffusion(preset("tiny")), max_batch=1)
    try:
        compiled.compile(backend=backend)
        got = compiled.edit(picture(), "a red circle", "a photo", ratio=0.4, n=2, steps=5)
    except Exception as e:  # no working compiler on this machine (e.g. inductor without a C++ toolchain)
        pytest.skip(f"torch.compile(backend={backend!r}) does not work here: {type(e).__name__}: {e}"[:300])
    want = eager.edit(picture(), "a red circle", "a photo", ratio=0.4, n=2, steps=5)
    assert np.array_equal(np.asarray(got.mask), np.asarray(want.mask))
    assert rel_err(got.latents, want.latents) < 1e-4


def test_compiled_unet_equals_eager_graph_capture():
    """Dynamo captures the UNet (backend aot_eager: the graphs run eagerly, no C++ compiler needed)."""
    _compiled_equals_eager("aot_eager")


@pytest.mark.slow
def test_compiled_unet_equals_eager_inductor():
    """The default backend, inductor: generated C++ kernels on CPU (minutes on a busy 2-core machine)."""
    _compiled_equals_eager("inductor")
