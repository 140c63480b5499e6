"""diffedit.checkpoint on SDXL base: a single file without metadata (architecture from the shapes) and a diffusers
folder written by diffusers' own StableDiffusionXLPipeline.save_pretrained load strictly into the same weights and
outputs (UNet with y, both towers, VAE) as the model they came from and as diffusers / transformers (fp32, relative
error < 1e-4); the refiner (file or folder), folders whose numbers do not add up and truncated files fail in one line.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import oracles
from conftest import offline_hub_repo, randomize_, rel_err, report
from diffedit.checkpoint import CheckpointError, load_model
from diffedit.checkpoint.layout import ZERO_FILL
from diffedit.checkpoint.single_file import infer_config
from diffedit.models import StableDiffusion, preset, size_conditioning, tokenize

TOL = 1e-4
TE2 = "text_encoder_2/model.safetensors"
ORIGINAL, CROP, TARGET = (40, 24), (3, 5), (32, 48)  # distinct values: a swapped pair changes y
# tiny-sdxl with SDXL's choices for what shapes cannot tell (32 norm groups, 64-wide UNet and text heads, 1024 px),
# so that a file without metadata loads as exactly this. Wider where those choices need it: diffusers' config of a
# 32-channel UNet would have 0 heads at level 0, a 16-channel VAE cannot hold 32 groups.
_T = preset("tiny-sdxl")
ORIG = dataclasses.replace(
    _T, unet=dataclasses.replace(_T.unet, model_channels=64, norm_groups=32, num_head_channels=64),
    vae=dataclasses.replace(_T.vae, ch=32, norm_groups=32), text=dataclasses.replace(_T.text, heads=1),
    text_2=dataclasses.replace(_T.text_2, heads=1), resolution=1024)
# Keys real SDXL single files carry that are not network weights (sgm's denoiser buffer, CLIP's position ids, EMA).
NOT_WEIGHTS = {"denoiser.sigmas": torch.ones(1000), "model_ema.decay": torch.ones(()),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}


def random_model(cfg) -> StableDiffusion:
    """``cfg``'s model with every parameter random (zero-initialised layers and norms included)."""
    return randomize_(StableDiffusion(cfg), seed=0).eval()


def save(path: Path, state: dict) -> Path:
    """A single file in sgm names, without our metadata."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_folder(model: StableDiffusion, root: Path) -> tuple[Path, object]:
    """diffusers' StableDiffusionXLPipeline on ``model``'s weights (diffusers' converters), saved by diffusers."""
    pipe = oracles.sdxl_pipeline(model, root / "tokenizers")
    pipe.unet.register_to_config(sample_size=model.cfg.resolution // model.cfg.vae.downsampling)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline", pipe


def assert_same_state(model: StableDiffusion, state: dict, zero_filled: tuple[str, ...] = ()):
    """The same keys and values, except ``zero_filled`` ones, which must be zero."""
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in loaded.items():
        assert not v.any() if k in zero_filled else torch.equal(v, state[k]), k


def inputs(cfg):
    """UNet, text and VAE inputs at the config's widths."""
    gen = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(2, 4, 8, 12, generator=gen), t=torch.tensor([999, 17]),
                context=torch.randn(2, 77, cfg.unet.context_dim, generator=gen),
                pooled=torch.randn(2, cfg.text_2.projection_dim, generator=gen),
                texts=["a photo of a cat on a bench", ""],
                img=torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1, z=torch.randn(1, 4, 8, 8, generator=gen))


@torch.no_grad()
def ours(model: StableDiffusion, inp: dict) -> dict:
    """Every network's output: UNet (with y), CLIP-L context, bigG context and pooled, VAE encode and decode."""
    cfg = model.cfg
    y = size_conditioning(inp["pooled"], ORIGINAL, CROP, TARGET, cfg.size_embed_dim)
    emb = model.conditioner.embedders
    big_g, pooled = emb[1](tokenize(inp["texts"], cfg.text_2))
    return {"unet": model.unet(inp["x"], inp["t"], inp["context"], y),
            "clip_l": emb[0](tokenize(inp["texts"], cfg.text)), "big_g": big_g, "pooled": pooled, "encode": model.first_stage_model.encode(inp["img"])[0],
            "decode": model.first_stage_model.decode(inp["z"])}


@torch.no_grad()
def theirs(pipe, cfg, inp: dict) -> dict:
    """The same outputs from diffusers' and transformers' networks."""
    time_ids = torch.tensor([[*ORIGINAL, *CROP, *TARGET]], dtype=torch.float32).expand(2, -1)
    l = pipe.text_encoder(tokenize(inp["texts"], cfg.text), output_hidden_states=True)
    g = pipe.text_encoder_2(tokenize(inp["texts"], cfg.text_2), output_hidden_states=True)
    return {"unet": pipe.unet(inp["x"], inp["t"], encoder_hidden_states=inp["context"],
                              added_cond_kwargs={"text_embeds": inp["pooled"], "time_ids": time_ids}).sample,
            "clip_l": l.hidden_states[-2], "big_g": g.hidden_states[-2], "pooled": g.text_embeds,
            "encode": pipe.vae.encode(inp["img"]).latent_dist.mean, "decode": pipe.vae.decode(inp["z"]).sample}


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    """ORIG with random weights, as a single file without metadata and as a diffusers folder."""
    root = tmp_path_factory.mktemp("sdxl")
    model = random_model(ORIG)
    state = model.state_dict()
    single = save(root / "sdxl.safetensors", {**state, **NOT_WEIGHTS})
    folder, pipe = write_folder(model, root)
    return model, state, single, folder, pipe


# --- the architecture from the shapes ---------------------------------------------------------------------------

def test_shapes_of_sdxl_base_give_exactly_the_sdxl_preset():
    with torch.device("meta"):  # shapes only: no memory
        shapes = {k: tuple(v.shape) for k, v in StableDiffusion(preset("sdxl")).state_dict().items()}
    assert infer_config(Path("sd_xl_base_1.0.safetensors"), shapes) == preset("sdxl")


def test_shapes_of_tiny_sdxl_give_tiny_sdxl_with_sdxl_defaults_where_shapes_cannot_tell():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StableDiffusion(preset("tiny-sdxl")).state_dict().items()}
    cfg, want, xl = infer_config(Path("tiny.safetensors"), shapes), preset("tiny-sdxl"), preset("sdxl")
    assert cfg.unet.transformer_depth == (0, 2) and cfg.unet.adm_in_channels == 80 and cfg.unet.context_dim == 48
    assert cfg == dataclasses.replace(  # unknowable from shapes: groups, head widths, resolution; SDXL's values
        want, unet=dataclasses.replace(want.unet, norm_groups=xl.unet.norm_groups,
                                       num_head_channels=xl.unet.num_head_channels),
        vae=dataclasses.replace(want.vae, norm_groups=xl.vae.norm_groups),
        text=dataclasses.replace(want.text, heads=1), text_2=dataclasses.replace(want.text_2, heads=1),
        resolution=xl.resolution)
    assert (cfg.vae.scaling_factor, cfg.vae.force_upcast) == (0.13025, True)


# --- both sources against the original and diffusers ------------------------------------------------------------

def test_single_file_and_diffusers_folder_load_strictly_to_the_original_weights_and_config(orig):
    model, state, single, folder, _ = orig
    for source in (single, folder):
        loaded, cfg = load_model(source)
        assert cfg == ORIG and loaded.cfg == ORIG, source
        assert_same_state(loaded, state, ZERO_FILL if source == folder else ())  # diffusers has no logit_scale


def test_both_sources_give_the_originals_outputs_and_diffusers_outputs(orig):
    model, _, single, folder, pipe = orig
    inp = inputs(ORIG)
    want, oracle = ours(model, inp), theirs(pipe, ORIG, inp)
    for source in (single, folder):
        got = ours(load_model(source)[0], inp)
        for name, value in got.items():
            assert torch.equal(value, want[name]), (source.name, name)
            err = rel_err(value, oracle[name])
            report(f"sdxl {source.name} {name} vs diffusers", err)
            assert err < TOL, (source.name, name, err)


def test_tiny_sdxl_folder_configs_give_tiny_sdxl_itself_with_8_wide_heads_and_8_groups(tmp_path):
    model = random_model(preset("tiny-sdxl"))
    folder, pipe = write_folder(model, tmp_path)
    loaded, cfg = load_model(folder)
    assert cfg == preset("tiny-sdxl")
    assert_same_state(loaded, model.state_dict(), ZERO_FILL)
    inp = inputs(cfg)
    got, oracle = ours(loaded, inp), theirs(pipe, cfg, inp)
    for name in got:
        assert rel_err(got[name], oracle[name]) < TOL, name


# The config.json fields of stabilityai/stable-diffusion-xl-base-1.0's text encoders and VAE (transcribed).
SDXL_BASE_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      projection_dim=768, hidden_act="quick_gelu")
SDXL_BASE_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                        projection_dim=1280, hidden_act="gelu")
SDXL_BASE_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.13025,
                     force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4)


def test_full_size_sdxl_base_diffusers_configs_and_names_map_onto_the_sdxl_preset():
    """On the meta device (no memory): the configs give the preset, the renamed keys exactly its shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffedit.checkpoint.diffusers_folder import sdxl_configs
    from diffedit.checkpoint.diffusers_names import ldm_names
    from test_sdxl_models import SDXL_BASE_DIFFUSERS
    with torch.device("meta"):
        nets = {"unet": UNet2DConditionModel(**SDXL_BASE_DIFFUSERS), "vae": AutoencoderKL(**SDXL_BASE_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_BASE_TEXT)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BASE_TEXT_2))}
        want = {k: tuple(v.shape) for k, v in StableDiffusion(preset("sdxl")).state_dict().items()}
    configs = [net.config.to_dict() if hasattr(net.config, "to_dict") else dict(net.config) for net in nets.values()]
    unet, vae, text, text_2 = sdxl_configs(Path("sdxl-base"), *json.loads(json.dumps(configs)))
    xl = preset("sdxl")
    assert (unet, vae, text, text_2) == (xl.unet, xl.vae, xl.text, xl.text_2)
    renamed = ldm_names({k: {n: (tuple(v.shape), None) for n, v in net.state_dict().items()}
                         for k, net in nets.items()}, unet, vae, text, text_2)
    assert renamed.keys() == want.keys() - set(ZERO_FILL)
    for k, (found, _) in renamed.items():  # the VAE attention's linear weights become 1x1 convs
        assert found == want[k] or ("attn_1" in k and found + (1, 1) == want[k]), k


def test_transposed_text_projection_in_a_folder_changes_pooled_output(orig, tmp_path):
    """diffusers stores W.T of the single file's square W: the wrong orientation loads silently, so values tell."""
    _, state, _, folder, pipe = orig
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    te2 = load_file(str(bad / TE2))
    te2["text_projection.weight"] = te2["text_projection.weight"].T.contiguous()
    save_file(te2, str(bad / TE2))
    inp = inputs(ORIG)
    good_pooled, bad_model = ours(load_model(folder)[0], inp)["pooled"], load_model(bad)[0]
    oracle = theirs(pipe, ORIG, inp)["pooled"]
    assert rel_err(good_pooled, oracle) < TOL and rel_err(ours(bad_model, inp)["pooled"], oracle) > 0.1
    key = "conditioner.embedders.1.model.text_projection"
    assert torch.equal(bad_model.state_dict()[key], state[key].T)


def test_repo_id_of_an_sdxl_folder_loads_from_the_offline_cache(orig, tmp_path, monkeypatch):
    _, state, _, folder, _ = orig
    offline_hub_repo(folder, "org/tiny-sdxl", tmp_path, monkeypatch)
    model, cfg = load_model("org/tiny-sdxl")
    assert cfg == ORIG
    assert_same_state(model, state, ZERO_FILL)


# --- refused inputs ---------------------------------------------------------------------------------------------

def one_line_error(source, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(source)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_refiner_single_file_is_refused_as_the_refiner_not_a_key_error(orig, tmp_path):
    """The refiner's conditioner.embedders.0 is bigG in open_clip names; it has no CLIP-L."""
    _, state, _, _, _ = orig
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in state.items()
               if not k.startswith("conditioner.embedders.0.")}
    msg = one_line_error(save(tmp_path / "sd_xl_refiner.safetensors", refiner), r"sd_xl_refiner\.safetensors: an SDXL "
                                                                                 r"refiner.*aesthetic.*base model")
    assert "missing" not in msg and "shape" not in msg


def test_refiner_folders_are_refused_as_the_refiner(orig, tmp_path):
    _, _, _, folder, _ = orig
    flagged = tmp_path / "flagged"  # model_index.json as the refiner pipeline writes it
    shutil.copytree(folder, flagged)
    shutil.rmtree(flagged / "text_encoder")
    index = json.loads((flagged / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
    (flagged / "model_index.json").write_text(json.dumps(index))
    one_line_error(flagged, r"flagged: an SDXL refiner.*base model")
    (flagged / "model_index.json").unlink()  # no model_index.json: text_encoder_2 without text_encoder
    one_line_error(flagged, r"flagged: an SDXL refiner")
    scored = tmp_path / "scored"  # adm = pooled + 5 x size: an aesthetic score in place of a size embedding
    shutil.copytree(folder, scored)
    unet = json.loads((scored / "unet/config.json").read_text())
    unet["projection_class_embeddings_input_dim"] = ORIG.text_2.projection_dim + 5 * ORIG.size_embed_dim
    (scored / "unet/config.json").write_text(json.dumps(unet))
    one_line_error(scored, r"scored: an SDXL refiner.*projection_class_embeddings_input_dim 72")


def test_folder_whose_y_widths_do_not_add_up_is_one_clear_error(orig, tmp_path):
    _, _, _, folder, _ = orig
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    unet = json.loads((odd / "unet/config.json").read_text())
    (odd / "unet/config.json").write_text(json.dumps({**unet, "addition_time_embed_dim": 6}))
    one_line_error(odd, r"unet/config\.json: projection_class_embeddings_input_dim 80 is not text_encoder_2's "
                        r"projection_dim 32 \+ 6 x addition_time_embed_dim 6 .*do not add up")


def test_single_file_whose_y_widths_do_not_add_up_or_without_projection_is_one_clear_error(orig, tmp_path):
    _, state, _, _, _ = orig
    proj = "conditioner.embedders.1.model.text_projection"
    wide = {**state, proj: torch.zeros(32, 38)}  # 80 - 38 = 42: not six even widths
    one_line_error(save(tmp_path / "wide.safetensors", wide), r"wide\.safetensors: .*label_emb\.0\.0\.weight takes 80 "
                                                              r"inputs.*pooled text \(38")
    bare = {k: v for k, v in state.items() if k != proj}  # the pooled tower needs its projection: never zero-filled
    one_line_error(save(tmp_path / "bare.safetensors", bare),
                   r"bare\.safetensors: not a Stable Diffusion XL base checkpoint: cannot read its architecture"
                   r".*text_projection")


def test_truncated_sdxl_file_is_the_truncated_file_error(orig, tmp_path):
    _, _, single, _, _ = orig
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    one_line_error(cut, r"cut\.safetensors: not a readable safetensors file \(truncated")


@torch.no_grad()
def test_folder_towers_with_mlp_widths_of_37_load_and_match_transformers(orig, tmp_path):
    """diffusers' tiny test pipelines give their CLIP towers intermediate_size 37: a width read from the config, not
    a multiple of the tower's width."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    _, _, _, folder, _ = orig
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    towers = {}
    for sub, cls, t, act, ids in (
            ("text_encoder", CLIPTextModel, ORIG.text, "quick_gelu", dict(bos_token_id=49406, eos_token_id=49407)),
            ("text_encoder_2", CLIPTextModelWithProjection, ORIG.text_2, "gelu", dict(bos_token_id=0, eos_token_id=2))):
        config = CLIPTextConfig(hidden_size=t.width, intermediate_size=37, num_attention_heads=t.heads,
                                num_hidden_layers=t.layers, projection_dim=t.projection_dim, hidden_act=act,
                                vocab_size=t.vocab_size, **ids)
        towers[sub] = randomize_(cls(config), seed=5).eval()
        shutil.rmtree(odd / sub)
        towers[sub].save_pretrained(odd / sub)
    model, cfg = load_model(odd)
    assert cfg.text.mlp_width == cfg.text_2.mlp_width == 37
    texts = inputs(cfg)["texts"]
    ids, ids_2 = tokenize(texts, cfg.text), tokenize(texts, cfg.text_2)
    l = towers["text_encoder"](ids, output_hidden_states=True)
    g = towers["text_encoder_2"](ids_2, output_hidden_states=True)
    emb = model.conditioner.embedders
    big_g, pooled = emb[1](ids_2)
    for name, got, want in (("clip_l", emb[0](ids), l.hidden_states[-2]), ("big_g", big_g, g.hidden_states[-2]),
                            ("pooled", pooled, g.text_embeds)):
        err = rel_err(got, want)
        report(f"sdxl mlp 37 {name} vs transformers", err)
        assert err < TOL, (name, err)
