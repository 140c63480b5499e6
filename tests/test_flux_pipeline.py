"""DiffEdit on FLUX.1 end to end, on tiny random folders written by diffusers' FluxPipeline.save_pretrained (CLIP-L
with a 37-wide MLP, a small T5 with its own tokenizer, the 16-channel VAE with shift 0.1159 and scale 0.3611):
``generate`` equals FluxPipeline's (same weights and initial noise) for dev-style (guidance embedded) and schnell-style
(none) models, with true CFG on and off; a BFL single file beside the folder's other parts loads strictly and equals
the folder; the plan counts the rows the denoiser runs; an all-zero mask gives back the VAE reconstruction, an
all-ones mask Encode-Decode, a list of targets each target alone, a batch each image alone; every method runs; the
command line edits and sweeps with a FLUX.1 file. fp32."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_edit_and_sweep, randomize_, rel_err, report
from diffedit import images
from diffedit.checkpoint import edit_defaults
from diffedit.engine import Input, Request
from diffedit.model_call import EvalCounter
from diffedit.models import preset
from diffedit.pipeline import DiffEdit
from diffedit.settings import KNOBS, EditSettings

pytest.importorskip("diffusers")
import oracles  # noqa: E402
from oracles.flux import pack, unpack  # noqa: E402
from test_sd3_text import t5_tokenizer  # noqa: E402

KW = dict(steps=4, n=2)
THRESHOLD = KNOBS["threshold"].default
PROMPT = "a red circle and a blue square"


def flux_pipeline(folder, name: str, seed: int = 0):
    """diffusers' FluxPipeline of ``name``'s (tiny-flux or tiny-flux-schnell) sizes, every network random."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    cfg = preset(name)
    f, v, t, c = cfg.flux, cfg.vae, cfg.text_3, cfg.text
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=f.in_channels, num_layers=f.depth, num_single_layers=f.depth_single_blocks,
        attention_head_dim=f.head_dim, num_attention_heads=f.heads, joint_attention_dim=f.context_in_dim,
        pooled_projection_dim=f.vec_in_dim, guidance_embeds=f.guidance_embed, axes_dims_rope=f.axes_dim)
    vae = AutoencoderKL(block_out_channels=[v.ch * k for k in v.ch_mult], layers_per_block=v.num_res_blocks,
                        latent_channels=v.z_channels, norm_num_groups=v.norm_groups, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=v.scaling_factor, shift_factor=v.shift_factor,
                        force_upcast=False, down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                        up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult))
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=c.width, intermediate_size=c.mlp_width, num_attention_heads=c.heads,
                                        num_hidden_layers=c.layers, projection_dim=c.projection_dim,
                                        hidden_act="quick_gelu", vocab_size=c.vocab_size, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    t5 = T5EncoderModel(T5Config(vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff,
                                 num_layers=t.num_layers, num_heads=t.num_heads, feed_forward_proj="gated-gelu",
                                 relative_attention_num_buckets=t.relative_attention_num_buckets))
    s = cfg.flux_schedule
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=s.dynamic, shift=s.shift, base_shift=s.base_shift, max_shift=s.max_shift,
        base_image_seq_len=s.base_image_seq_len, max_image_seq_len=s.max_image_seq_len)
    for sub in ("1", "2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=randomize_(vae, seed + 11).eval(),
                        text_encoder=randomize_(clip, seed + 1).eval(), tokenizer=oracles.clip_tokenizer(folder / "1"),
                        text_encoder_2=randomize_(t5, seed + 2).eval(), tokenizer_2=t5_tokenizer(folder / "2"),
                        transformer=randomize_(transformer, seed + 10).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokens(name: str) -> int:
    """T5's padded length: FluxPipeline's 512 for dev, the 256 schnell is run with."""
    return 512 if preset(name).flux.guidance_embed else 256


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-flux-schnell"])
def flux(request, tmp_path_factory):
    """(diffusers' pipeline, our DiffEdit loaded from the folder the pipeline saved, the folder, the preset)."""
    root = tmp_path_factory.mktemp("flux")
    pipe = flux_pipeline(root / "tokenizers", request.param)
    pipe.save_pretrained(root / "pipeline")
    return pipe, DiffEdit.from_pretrained(str(root / "pipeline"), dtype=torch.float32), root / "pipeline", request.param


@pytest.fixture(scope="module")
def de(tmp_path_factory):
    """DiffEdit on a tiny dev-style FLUX.1 folder (the edits' tests)."""
    root = tmp_path_factory.mktemp("flux_edit")
    flux_pipeline(root / "tokenizers", "tiny-flux", seed=2).save_pretrained(root / "pipeline")
    return DiffEdit.from_pretrained(str(root / "pipeline"), dtype=torch.float32)


def picture(size=(40, 24), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("true_cfg", [1.0, 2.5], ids=["true-cfg-off", "true-cfg-on"])
@torch.no_grad()
def test_generate_equals_flux_pipeline(flux, true_cfg):
    pipe, de, _, name = flux
    assert de.cfg.flux_schedule.t5_tokens == tokens(name)
    px, steps, seed, guidance = 32, 4, 7, 3.5
    side = px // de.cfg.vae.downsampling
    noise = torch.randn((1, de.latent_channels, side, side), generator=torch.Generator().manual_seed(seed))
    args = dict(prompt=PROMPT, negative_prompt="", height=px, width=px, num_inference_steps=steps,
                guidance_scale=guidance, true_cfg_scale=true_cfg, latents=pack(noise), max_sequence_length=tokens(name))
    de.true_cfg_scale = true_cfg
    try:
        latents = de.engine().generate(noise, PROMPT, steps, guidance)
        ours = np.asarray(images.to_pil(de.decode_latents(latents)[0]), np.float64) / 255
    finally:
        de.true_cfg_scale = 1.0
    err = rel_err(latents, unpack(pipe(**args, output_type="latent").images, side, side))
    theirs = pipe(**args, output_type="np").images[0].astype(np.float64)
    diff = np.abs(ours - theirs)
    report(f"{name} generate (true CFG {true_cfg}) latents vs FluxPipeline", err)
    print(f"[parity] {name} generate (true CFG {true_cfg}) image: max abs {diff.max():.2e} of [0, 1]")
    assert theirs.std() > 0.05, "the random model's image is flat: the comparison would prove nothing"
    assert err < 1e-4
    assert diff.max() <= 2 / 255


@torch.no_grad()
def test_a_bfl_single_file_loads_strictly_and_equals_the_folder(flux, tmp_path):
    """The transformer in Black Forest Labs' names (our state dict, which diffusers' converter maps onto the folder's
    tensors) in a file beside the folder's VAE and text encoders."""
    from safetensors.torch import save_file
    from oracles.flux import diffusers_flux_state
    pipe, de, folder, name = flux
    ours = de.model.transformer
    converted = diffusers_flux_state(ours)
    theirs = pipe.transformer.state_dict()
    assert converted.keys() == theirs.keys() and all(torch.equal(converted[k], theirs[k]) for k in theirs)
    path = folder / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    try:
        single = DiffEdit.from_pretrained(str(path), dtype=torch.float32)
    finally:
        path.unlink()
    assert single.cfg.flux == de.cfg.flux and single.cfg.flux_schedule == de.cfg.flux_schedule
    a, b = single.model.state_dict(), de.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_the_plan_counts_the_rows_the_flux_denoiser_runs(de, true_cfg):
    """Guidance embedded: one row per guided sample; true CFG: two."""
    de.true_cfg_scale = true_cfg
    try:
        x0 = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(1))
        s = EditSettings(steps=4, n=2, ratio=0.75, guidance=3.5)
        counter = EvalCounter(None)
        engine = de.engine(wrap=counter.around)
        plan = engine.plan([Input(x0=x0)], [Request(0, "a green circle", "a red circle", s)])
        engine.edits([Input(x0=x0)], [Request(0, "a green circle", "a red circle", s)], decode_pixels=False)
    finally:
        de.true_cfg_scale = 1.0
    assert counter.count == plan.cost.rows
    assert plan.cost.decoding == 3 * (2 if true_cfg > 1 else 1) and plan.cost.inversion == 3


def x0_of(de, image):
    return de.encode_image(images.to_tensor(image, de.multiple, de.device, de.dtype))


def test_an_all_zero_mask_returns_the_vae_reconstruction(de):
    image = picture()
    x0 = x0_of(de, image)
    r = de.edit(image, "a green circle", mask=torch.zeros(x0.shape[-2:]), guidance=3.5, **KW)
    assert torch.equal(r.latents, x0[0])
    expected = images.to_pil(de.decode_latents(x0)[0], image.size)
    assert np.array_equal(np.asarray(r.image), np.asarray(expected))


def test_an_all_ones_mask_equals_encode_decode(de):
    image = picture()
    h, w = x0_of(de, image).shape[-2:]
    masked = de.edit(image, "a green circle", source="a red circle", mask=torch.ones(h, w), guidance=3.5, **KW)
    plain = de.edit(image, "a green circle", source="a red circle", method="encode-decode", guidance=3.5, **KW)
    err = rel_err(masked.latents, plain.latents)
    report("flux diffedit with an all-ones mask vs encode-decode", err)
    assert err < 1e-6


def _agree(a, b, tol):
    """As on SD3: batch sizes change CPU summation order; latents compared where the two masks agree."""
    assert rel_err(a.mask_map, b.mask_map) < tol
    same = (a.mask_map > THRESHOLD) == (b.mask_map > THRESHOLD)
    assert same[(b.mask_map - THRESHOLD).abs() >= tol].all()
    return rel_err(a.latents * same, b.latents * same)


def test_a_list_of_targets_equals_each_target_alone(de):
    image, targets = picture(), ["a green circle", "a yellow square"]
    both = de.edit(image, targets, source="a red circle", guidance=3.5, **KW)
    for target, r in zip(targets, both):
        err = _agree(r, de.edit(image, target, source="a red circle", guidance=3.5, **KW), 1e-4)
        report(f"flux list of targets vs {target!r} alone", err)
        assert err < 1e-4


def test_a_batch_equals_each_image_alone(de):
    pics = [picture(seed=0), picture(seed=1)]
    batch = de.edit(pics, "a green circle", source="a red circle", guidance=3.5, **KW)
    for p, r in zip(pics, batch):
        err = _agree(r, de.edit(p, "a green circle", source="a red circle", guidance=3.5, **KW), 1e-4)
        report("flux batch vs each image alone", err)
        assert err < 1e-4


def test_every_method_and_the_mask_run_on_flux(de):
    image = picture()
    for method in ("diffedit", "sdedit", "encode-decode", "masked-sdedit"):
        r = de.edit(image, "a green circle", source="a red circle", method=method, guidance=3.5, **KW)
        assert r.image.size == image.size and torch.isfinite(r.latents).all(), method
        assert (r.mask is None) == (method in ("sdedit", "encode-decode")), method
    m = de.mask(image, "a green circle", source="a red circle", n=2, steps=4)
    assert m.binary.shape == m.map.shape == x0_of(de, image).shape[-2:] and m.image.size == image.size
    assert m.map.min() < m.map.max()  # the map varies (a random model's binary mask may cover everything)


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    """A tiny dev-style FLUX.1 as BFL ships it: the transformer file, bare keys, beside the folder's other parts."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("flux_file")
    flux_pipeline(root / "tokenizers", "tiny-flux", seed=3).save_pretrained(root / "repo")
    de = DiffEdit.from_pretrained(str(root / "repo"), dtype=torch.float32)
    path = root / "repo" / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in de.model.transformer.state_dict().items()}, str(path))
    return path


def test_the_command_line_edits_and_sweeps_with_a_flux_file(flux_file, tmp_path):
    assert edit_defaults(flux_file) == {"steps": 28, "guidance": 3.5}  # the sweep's, from the file's keys
    out = cli_edit_and_sweep(flux_file, tmp_path, picture((40, 24)), "--guidance", 3.5)
    cost = json.loads((out / "cost.json").read_text())  # the plan counts one row per guided sample, as Flux runs
    assert cost["unet_evaluations_run"] == cost["shared_formula_this_run"] == cost["full_grid_shared"]
