"""diffedit.checkpoint: every source kind loads exactly, and every broken input fails with a message naming it."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit.checkpoint import CheckpointError, detect_prediction_type, load, load_model, sources
from diffedit.checkpoint.diffusers_folder import network_configs
from diffedit.checkpoint.diffusers_names import ldm_names
from diffedit.checkpoint.layout import ZERO_FILL
from diffedit.checkpoint.single_file import infer_config
from diffedit.models import ModelConfig, StableDiffusion, TextConfig, UNetConfig, VAEConfig, preset

# Small models with the originals' choices for what shapes cannot tell (32 norm groups, 8 UNet heads for SD1,
# 64-wide heads for SD2 and for the text encoders), so that files without metadata load too.
ORIG_SD1 = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                    context_dim=64),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text=TextConfig(width=64, heads=1, layers=2, projection_dim=64))
ORIG_SD2 = ModelConfig(
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                    num_head_channels=64, context_dim=64, use_linear_in_transformer=True),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text=TextConfig(kind="openclip", width=64, heads=1, layers=2, projection_dim=32, skip_last_layer=True))
# Keys of real single files that are not network weights.
NOT_WEIGHTS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance",
               "model_ema.decay", "model_ema.num_updates",
               "cond_stage_model.transformer.text_model.embeddings.position_ids"]


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """All parameters random (no zero biases or unit norms that could hide a mix-up)."""
    torch.manual_seed(seed)
    model = StableDiffusion(cfg)
    return {k: torch.randn(v.shape) for k, v in model.state_dict().items()}


def save(path: Path, state: dict, cfg: ModelConfig | None = None) -> Path:
    meta = {"diffedit_config": json.dumps(cfg.to_dict())} if cfg else None
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return path


def assert_same_weights(model: StableDiffusion, state: dict):
    loaded = model.state_dict()
    assert loaded.keys() == {k for k in state if k in loaded}
    for k, v in loaded.items():
        assert torch.equal(v, state[k].to(v.dtype)), k


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset with random weights, saved with our metadata."""
    state = random_state(preset("tiny"))
    return state, save(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", state, preset("tiny"))


# --- single files ---------------------------------------------------------------------------------------------------

def test_single_file_with_metadata_loads_bit_identically_frozen_in_eval_mode(tiny):
    state, path = tiny
    model, cfg = load_model(path)
    assert cfg == preset("tiny") and model.cfg == cfg
    assert_same_weights(model, state)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("orig", [ORIG_SD1, ORIG_SD2, dataclasses.replace(ORIG_SD1, text=dataclasses.replace(
    ORIG_SD1.text, mlp_width=37))], ids=["sd1", "sd2", "sd1-mlp-37"])
def test_single_file_without_metadata_reads_architecture_from_shapes_and_ignores_non_weights(tmp_path, orig):
    state = random_state(orig)
    extra = {k: torch.zeros(3) for k in NOT_WEIGHTS}
    path = save(tmp_path / "model.safetensors", {**state, **extra})
    model, cfg = load_model(path, prediction_type="epsilon")
    assert (cfg.unet, cfg.vae, cfg.text) == (orig.unet, orig.vae, orig.text)
    assert (cfg.prediction_type, cfg.resolution) == ("epsilon", 512)
    assert_same_weights(model, state)


@pytest.mark.parametrize("name", ["sd15", "sd21-base"])
def test_architecture_read_from_shapes_of_a_full_size_checkpoint_is_the_preset(name):
    with torch.device("meta"):  # shapes only: no memory
        shapes = {k: tuple(v.shape) for k, v in StableDiffusion(preset(name)).state_dict().items()}
    cfg = infer_config(Path(f"{name}.safetensors"), shapes)
    assert (cfg.unet, cfg.vae, cfg.text) == (preset(name).unet, preset(name).vae, preset(name).text)


def test_ckpt_state_dict_loads_bit_identically(tmp_path, tiny):
    state, _ = tiny
    noise = {k: torch.zeros(2) for k in NOT_WEIGHTS}
    torch.save({"state_dict": {**random_state(ORIG_SD1, seed=1), **noise}, "global_step": 5}, tmp_path / "m.ckpt")
    model, cfg = load_model(tmp_path / "m.ckpt")
    assert cfg.family == "sd1" and cfg.prediction_type == "epsilon"
    assert_same_weights(model, random_state(ORIG_SD1, seed=1))


def test_float16_load_gives_fp16_parameters_and_no_meta_tensors(tiny):
    state, path = tiny
    model, _ = load_model(path, dtype=torch.float16)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" and not t.is_meta for t in tensors)
    assert_same_weights(model, state)
    with torch.no_grad():  # runs in fp16 (values are meaningless: std-1 random weights overflow fp16)
        out = model.unet(torch.randn(1, 4, 8, 8).half(), torch.tensor([10]), torch.randn(1, 3, 32).half())
    assert out.dtype == torch.float16 and out.shape == (1, 4, 8, 8)


# --- SD2 prediction type ------------------------------------------------------------------------------------------

def test_detect_prediction_type_is_a_function_of_the_unet_output():
    assert detect_prediction_type(lambda x, t, c: x + 0.1 * torch.randn_like(x), 64)[0] == "epsilon"
    assert detect_prediction_type(lambda x, t, c: -3 * x - 0.5, 64)[0] == "v_prediction"  # mean(out - x) = -2.5
    kind, stat = detect_prediction_type(lambda x, t, c: torch.full_like(x, -0.5) + 0 * c.mean(), 64)
    assert (kind, stat) == ("epsilon", pytest.approx(-1.0))


def sd2_file_with_constant_output(tmp_path: Path, value: float) -> Path:
    """An SD2 file (no metadata) whose UNet outputs ``value`` everywhere: its last conv is zero but the bias."""
    state = random_state(ORIG_SD2)
    state["model.diffusion_model.out.2.weight"].zero_()
    state["model.diffusion_model.out.2.bias"].fill_(value)
    return save(tmp_path / f"sd2_{value}.safetensors", state)


def test_sd2_file_prediction_type_detected_from_unet_behaviour_and_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="diffedit.checkpoint"):
        _, cfg = load_model(sd2_file_with_constant_output(tmp_path, -5.0))  # mean(out - x) = -5.5: v-like
    assert (cfg.prediction_type, cfg.resolution) == ("v_prediction", 768)
    message = next(r.getMessage() for r in caplog.records if "prediction" in r.getMessage())
    assert "'v_prediction'" in message and "prediction_type=" in message and "--prediction-type" in message
    model, cfg = load_model(sd2_file_with_constant_output(tmp_path, 0.5))  # output = x: epsilon-like
    assert (cfg.prediction_type, cfg.resolution, model.cfg.prediction_type) == ("epsilon", 512, "epsilon")


def test_explicit_prediction_type_overrides_detection_and_the_file(tmp_path, tiny, monkeypatch, caplog):
    monkeypatch.setattr(load, "detect_prediction_type", lambda *a, **k: pytest.fail("detection ran"))
    with caplog.at_level(logging.INFO, logger="diffedit.checkpoint"):
        _, cfg = load_model(sd2_file_with_constant_output(tmp_path, -5.0), prediction_type="epsilon")
    assert (cfg.prediction_type, cfg.resolution) == ("epsilon", 512)
    assert not any("prediction" in r.getMessage() for r in caplog.records)
    assert load_model(tiny[1], prediction_type="v_prediction")[1].prediction_type == "v_prediction"
    with pytest.raises(CheckpointError, match="'sample'"):
        load_model(tiny[1], prediction_type="sample")


# --- diffusers folders ----------------------------------------------------------------------------------------------

def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised layers become non-zero too
    return module.eval()


SD1_STYLE = dict(
    unet=dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32,
              attention_head_dim=4, norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    vae=dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
    text=dict(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
              hidden_act="quick_gelu", bos_token_id=998, eos_token_id=999, pad_token_id=1),  # 37: as diffusers' tests
    prediction_type="epsilon")
SD2_STYLE = dict(  # linear projections, per-level head counts of a fixed width (16), GELU text encoder
    unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
              attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    text=dict(hidden_size=48, intermediate_size=37, num_attention_heads=3, num_hidden_layers=3, vocab_size=1000,
              hidden_act="gelu", projection_dim=24, bos_token_id=998, eos_token_id=999, pad_token_id=0),
    prediction_type="v_prediction")


def write_diffusers_folder(root: Path, spec: dict, seed: int):
    """A diffusers folder written by diffusers' and transformers' own save_pretrained; returns the modules."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    nets = {"unet": randomized(UNet2DConditionModel(**spec["unet"]), seed),
            "vae": randomized(AutoencoderKL(**spec["vae"]), seed + 1),
            "text_encoder": randomized(CLIPTextModel(CLIPTextConfig(**spec["text"])), seed + 2)}
    for sub, net in nets.items():
        net.save_pretrained(root / sub)
    DDIMScheduler(prediction_type=spec["prediction_type"]).save_pretrained(root / "scheduler")
    return nets


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1-diffusers")
    return root, write_diffusers_folder(root, SD1_STYLE, seed=0)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """Also the layouts of older or fp16-only folders: ``text_model.``-prefixed text keys, old VAE attention
    names (query/key/value/proj_attn), a UNet stored as the ``fp16`` variant only."""
    root = tmp_path_factory.mktemp("sd2-diffusers")
    nets = write_diffusers_folder(root, SD2_STYLE, seed=10)
    te = root / "text_encoder" / "model.safetensors"
    save_file({"text_model." + k: v for k, v in load_file(te).items()}, str(te))
    vae = root / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    renamed = {}
    for k, v in load_file(vae).items():
        for new, legacy in old.items():
            k = k.replace("attentions.0." + new, "attentions.0." + legacy)
        renamed[k] = v
    save_file(renamed, str(vae))
    unet = root / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    return root, nets


@pytest.mark.parametrize("folder", ["sd1_folder", "sd2_folder"])
def test_diffusers_folder_gives_the_outputs_of_diffusers_and_transformers(folder, request):
    root, nets = request.getfixturevalue(folder)
    spec = SD1_STYLE if folder == "sd1_folder" else SD2_STYLE
    model, cfg = load_model(root)
    assert cfg.prediction_type == spec["prediction_type"] and cfg.family == folder[:3]
    assert cfg.text.mlp_width == spec["text"]["intermediate_size"]  # read, not a multiple of the width
    assert cfg.resolution == spec["unet"]["sample_size"] * cfg.vae.downsampling
    torch.manual_seed(1)
    ctx_dim = spec["unet"]["cross_attention_dim"]
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 7, ctx_dim)
    img, z = torch.randn(1, 3, 16, 16).clamp(-1, 1), torch.randn(1, 4, 4, 4)
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert rel_err(model.unet(x, t, ctx), nets["unet"](x, t, encoder_hidden_states=ctx).sample) < 1e-4
        assert rel_err(model.first_stage_model.encode(img)[0], nets["vae"].encode(img).latent_dist.mean) < 1e-4
        assert rel_err(model.first_stage_model.decode(z), nets["vae"].decode(z).sample) < 1e-4
        assert rel_err(model.cond_stage_model(ids), nets["text_encoder"](input_ids=ids).last_hidden_state) < 1e-4


def test_diffusers_sd2_text_encoder_gets_zero_projection_and_runs_all_its_layers(sd2_folder):
    model, cfg = load_model(sd2_folder[0])
    text = model.cond_stage_model.model
    assert cfg.text.kind == "openclip" and not cfg.text.skip_last_layer and cfg.text.layers == 3
    assert text.text_projection.shape == (48, 48) and not text.text_projection.any() and text.logit_scale == 0


FULL_SIZE = {  # the config.json fields of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
    "sd15": dict(unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                           attention_head_dim=8),
                 text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                           projection_dim=768, hidden_act="quick_gelu")),
    "sd21": dict(unet=dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                           attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
                 text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                           projection_dim=512, hidden_act="gelu"))}


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_diffusers_configs_and_names_map_onto_the_preset(name):
    """On the meta device (no memory): configs give the preset, renamed keys give exactly its shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        nets = {"unet": UNet2DConditionModel(**FULL_SIZE[name]["unet"]), "vae": AutoencoderKL(**vae),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**FULL_SIZE[name]["text"]))}
    configs = [json.loads(nets[k].config.to_json_string() if k == "text_encoder" else json.dumps(nets[k].config))
               for k in ("unet", "vae", "text_encoder")]
    unet, vae_cfg, text = network_configs(Path(name), *configs)
    want = preset(name)
    assert (unet, vae_cfg) == (want.unet, want.vae)
    # diffusers' SD2 text encoder stops one layer early, so all its layers run
    layers = want.text.layers - want.text.skip_last_layer
    assert text == dataclasses.replace(want.text, layers=layers, skip_last_layer=False)
    renamed = ldm_names({k: {n: (tuple(v.shape), None) for n, v in net.state_dict().items()}
                         for k, net in nets.items()}, unet, vae_cfg, text)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in StableDiffusion(ModelConfig(unet, vae_cfg, text)).state_dict().items()
                if k not in ZERO_FILL}
    assert renamed.keys() == ours.keys()
    for k, (found, _) in renamed.items():  # the VAE attention's linear weights become 1x1 convs
        assert found == ours[k] or ("attn_1" in k and found + (1, 1) == ours[k]), k


# --- Hugging Face repo ids ------------------------------------------------------------------------------------------

@pytest.fixture
def offline_hub(tmp_path, monkeypatch, sd1_folder):
    """An offline Hugging Face cache holding org/tiny-sd (the SD1-style folder) at one commit."""
    from huggingface_hub import constants
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny-sd"
    shutil.copytree(sd1_folder[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, value in (("HF_HOME", str(tmp_path)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub reads the environment on import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return commit


def test_repo_id_loads_from_the_offline_cache(offline_hub, sd1_folder):
    reference, _ = load_model(sd1_folder[0])
    for spec in ("org/tiny-sd", f"org/tiny-sd@{offline_hub}"):
        model, cfg = load_model(spec)
        assert cfg.family == "sd1" and cfg.prediction_type == "epsilon"
        assert_same_weights(model, reference.state_dict())


def test_repo_id_neither_cached_nor_downloadable_is_a_clear_error(offline_hub):
    with pytest.raises(CheckpointError, match=r"'org/absent-model'.*cache.*weights\.md"):
        load_model("org/absent-model")


# --- errors --------------------------------------------------------------------------------------------------------

def test_missing_file_and_toy_not_built(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"no such file or folder: .*nothing\.safetensors"):
        load_model(tmp_path / "nothing.safetensors")
    assert sources.toy_path().parts[-3:] == ("diffedit", "toy", "toy.safetensors")
    monkeypatch.setattr(sources, "toy_path", lambda: tmp_path / "toy.safetensors")
    with pytest.raises(CheckpointError, match=r"toy\.safetensors is not built yet: run python scripts/train_toy\.py"):
        load_model("toy")


def test_toy_resolves_to_the_packaged_file(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(sources, "toy_path", lambda: tiny[1])
    assert load_model("toy")[1] == preset("tiny")


@pytest.mark.skipif(not sources.toy_path().is_file(), reason="toy model not built (scripts/train_toy.py)")
def test_packaged_toy_model_loads_in_its_own_architecture():
    model, cfg = load_model("toy")
    assert (cfg.unet, cfg.text) == (preset("toy").unet, preset("toy").text) and cfg.resolution == 64
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_not_a_safetensors_file_and_truncated_file(tmp_path, tiny):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not tensors\n" * 10)
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: not a readable safetensors file"):
        load_model(text)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny[1].read_bytes()[: tiny[1].stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file \(truncated"):
        load_model(cut)
    cut_ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(100)}}, cut_ckpt)
    cut_ckpt.write_bytes(cut_ckpt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a readable PyTorch checkpoint"):
        load_model(cut_ckpt)


def test_checkpoints_of_other_architectures_are_named_as_such(tmp_path):
    sdxl_like = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                 "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
                 "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768)}
    with pytest.raises(CheckpointError, match=r"xl\.safetensors: not a Stable Diffusion 1\.x/2\.x checkpoint.*"
                                              r"conditioner"):
        load_model(save(tmp_path / "xl.safetensors", sdxl_like))
    with pytest.raises(CheckpointError, match=r"mlp\.safetensors: not a Stable Diffusion 1\.x/2\.x checkpoint.*fc"):
        load_model(save(tmp_path / "mlp.safetensors", {"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}))
    broken = random_state(ORIG_SD1)  # SD-like names but a part the shapes cannot be read without
    del broken["model.diffusion_model.middle_block.1.proj_in.weight"]
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion 1\.x/2\.x checkpoint.*middle_block\.1\.proj_in"):
        load_model(save(tmp_path / "broken.safetensors", broken))


def test_missing_and_unexpected_keys_are_named_and_counted(tmp_path, tiny):
    state = dict(tiny[0])
    dropped = [k for k in state if "output_blocks.1." in k][:4]
    for k in dropped:
        del state[k]
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    state["model.diffusion_model.extra.bias"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_model(save(tmp_path / "holes.safetensors", state, preset("tiny")))
    msg = str(err.value)
    assert "holes.safetensors" in msg and "4 missing keys" in msg and dropped[0] in msg
    assert "2 unexpected keys" in msg and "model.diffusion_model.extra.weight" in msg and "\n" not in msg


def test_shape_mismatch_names_key_expected_and_found_shapes(tmp_path, tiny):
    state = dict(tiny[0])
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 16, 3, 3)
    with pytest.raises(CheckpointError, match=r"shape\.safetensors: model\.diffusion_model\.out\.2\.weight has shape "
                                              r"\[4, 16, 3, 3\], expected \[4, 32, 3, 3\]"):
        load_model(save(tmp_path / "shape.safetensors", state, preset("tiny")))


class TrainerCallback:  # stands for the pytorch_lightning objects of original .ckpt files
    pass


def test_ckpt_needing_pickle_beyond_weights_only_is_refused_with_advice(tmp_path, tiny):
    torch.save({"state_dict": tiny[0], "callbacks": TrainerCallback()}, tmp_path / "lightning.ckpt")
    with pytest.raises(CheckpointError, match=r"lightning\.ckpt: holds pickled objects besides tensors "
                                              r"\(.*TrainerCallback\).*\.safetensors"):
        load_model(tmp_path / "lightning.ckpt")


def test_broken_diffusers_folders_are_named(tmp_path, sd1_folder):
    root = tmp_path / "copy"
    shutil.copytree(sd1_folder[0], root)
    unet_cfg = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "addition_embed_type": "text_time"}))
    with pytest.raises(CheckpointError, match=r"unet/config\.json: not a Stable Diffusion 1\.x/2\.x network: "
                                              r"addition_embed_type='text_time'"):
        load_model(root)
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae: no diffusion_pytorch_model\.safetensors"):
        load_model(root)
    (root / "text_encoder" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"not a diffusers folder .*: text_encoder/config\.json missing"):
        load_model(root)


# --- the UNet block layout the key maps index -----------------------------------------------------------------------

def test_block_index_names_the_blocks_the_unet_builds():
    from diffedit.models.unet import Downsample, UNetModel, Upsample, block_index
    n, levels = 2, 3
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=n, attention_resolutions=(2,),
                     num_heads=2, context_dim=16, norm_groups=8)
    with torch.device("meta"):
        unet = UNetModel(cfg)
    downs = [i for i, b in enumerate(unet.input_blocks) if isinstance(b[0], Downsample)]
    ups = [i for i, b in enumerate(unet.output_blocks) if isinstance(b[-1], Upsample)]
    assert downs == [block_index(level, n, n, levels) for level in range(levels - 1)]
    assert ups == [block_index(level, n, n, levels, output=True) for level in reversed(range(1, levels))]
    assert len(unet.input_blocks) == block_index(levels - 1, n - 1, n, levels) + 1
    assert len(unet.output_blocks) == block_index(0, n, n, levels, output=True) + 1
