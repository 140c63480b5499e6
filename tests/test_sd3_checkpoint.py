"""diffedit.checkpoint on SD3 / SD3.5: a folder written by diffusers' StableDiffusion3Pipeline.save_pretrained (with
and without T5) loads strictly, and its MMDiT, VAE and text encoders give diffusers' and transformers' outputs (fp32,
relative error < 1e-4; a VAE without its shift factor misses by more); a single file in Stability's layout holding the
same weights loads to the same model; Turbo models, files without text encoders and T5 without its tokenizer fail in
one line.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import offline_hub_repo, rel_err, report
from diffedit.checkpoint import CheckpointError, load_model
from diffedit.models import tokenize
from test_sd3_text import CFG, TEXTS, TOL, WRONG, sd3_pipeline

pytest.importorskip("diffusers")

T5_TIED = "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"
CLIP_L_PROJECTION = "text_encoders.clip_l.transformer.text_projection.weight"


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no-t5"])
def sd3(request, tmp_path_factory):
    """(folder saved by diffusers, the pipeline, with T5, our model loaded from the folder)."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = sd3_pipeline(root / "tokenizers", with_t5=request.param)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline", pipe, request.param, load_model(root / "pipeline")[0]


def save(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def one_line_error(source, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as err:
        load_model(source)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_folder_gives_its_architecture_and_flow_shift(sd3):
    folder, _, with_t5, model = sd3
    want = CFG if with_t5 else dataclasses.replace(CFG, text_3=None)
    assert model.cfg == want and model.cfg.family == "sd3" and model.cfg.flow_shift == 3.0
    assert (model.cfg.text.pad_id, model.cfg.text_2.pad_id) == (49407, 0)  # from tokenizer/ and tokenizer_2/
    assert (model.t5_tokenizer is not None) == with_t5
    assert not any(t.is_meta or t.requires_grad for t in model.parameters())


@torch.no_grad()
def test_folder_networks_give_diffusers_and_transformers_outputs(sd3):
    _, pipe, with_t5, model = sd3
    gen = torch.Generator().manual_seed(1)
    m = CFG.mmdit
    x, t = torch.randn(2, m.in_channels, 8, 12, generator=gen), torch.tensor([999.0, 17.0])
    ctx, y = torch.randn(2, 7, m.context_dim, generator=gen), torch.randn(2, m.pooled_dim, generator=gen)
    img = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    z = torch.randn(1, CFG.vae.z_channels, 8, 8, generator=gen)
    enc, vae = model.text_encoders, model.first_stage_model
    ids_l, ids_g = tokenize(TEXTS, CFG.text), tokenize(TEXTS, CFG.text_2)
    ref_l, ref_g = (te(ids, output_hidden_states=True) for te, ids in ((pipe.text_encoder, ids_l),
                                                                        (pipe.text_encoder_2, ids_g)))
    mean, ref_mean = vae.encode(img)[0], pipe.vae.encode(img).latent_dist.mean
    pairs = {
        "mmdit": (model.mmdit(x, t, ctx, y), pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                                              pooled_projections=y).sample),
        "clip_l": (enc.clip_l(ids_l)[0], ref_l.hidden_states[-2]),
        "clip_l pooled": (enc.clip_l(ids_l)[1], ref_l.text_embeds),
        "clip_g": (enc.clip_g(ids_g)[0], ref_g.hidden_states[-2]),
        "clip_g pooled": (enc.clip_g(ids_g)[1], ref_g.text_embeds),
        "vae encode": (mean, ref_mean), "vae decode": (vae.decode(z), pipe.vae.decode(z).sample),
        "latent": (vae.scale(mean), (ref_mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor),
        "unscaled": (vae.decode(vae.unscale(z)), pipe.vae.decode(z / pipe.vae.config.scaling_factor
                                                                  + pipe.vae.config.shift_factor).sample)}
    if with_t5:
        ids = torch.randint(0, CFG.text_3.vocab_size, (2, 30), generator=gen)
        pairs["t5"] = (enc.t5xxl(ids), pipe.text_encoder_3(input_ids=ids).last_hidden_state)
    for name, (ours, theirs) in pairs.items():
        err = rel_err(ours, theirs)
        report(f"sd3 folder {name}", err)
        assert err < TOL, (name, err)
    no_shift = mean * CFG.vae.scaling_factor  # the shift factor left out
    assert rel_err(no_shift, pairs["latent"][1]) > WRONG


def test_single_file_in_stability_layout_loads_the_same_weights(sd3, tmp_path):
    """Our loaded folder's state is Stability's layout; diffusers' own converter turns its transformer back into
    the folder's tensors exactly. Shapes cannot tell CLIP's head count (64-wide heads assumed) nor the resolution;
    CLIP-L's projection is the identity, whatever the file holds."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    folder, pipe, with_t5, model = sd3
    state = model.state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v for k, v in state.items()
                                                           if k.startswith("model.diffusion_model.")})
    theirs = pipe.transformer.state_dict()
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    extra = {"text_encoders.clip_l.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    if with_t5:
        extra[T5_TIED] = state["text_encoders.t5xxl.transformer.shared.weight"].clone()
        shutil.copytree(folder / "tokenizer_3", tmp_path / "tokenizer_3")
    file = save(tmp_path / "sd3_tiny.safetensors", {**state, **extra, CLIP_L_PROJECTION: torch.randn(16, 16)})
    loaded, cfg = load_model(file)
    heads_1 = lambda t: dataclasses.replace(t, heads=1)
    assert cfg == dataclasses.replace(model.cfg, text=heads_1(model.cfg.text), text_2=heads_1(model.cfg.text_2),
                                      resolution=1024)
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    for k, v in got.items():
        assert torch.equal(v, torch.eye(16) if k == CLIP_L_PROJECTION else state[k]), k


def test_single_file_without_text_encoders_takes_them_from_a_text_encoders_folder(sd3, tmp_path):
    _, _, with_t5, model = sd3
    state = model.state_dict()
    core = {k: v for k, v in state.items() if not k.startswith("text_encoders.")}
    file = save(tmp_path / "sd3.5_tiny.safetensors", core)
    msg = one_line_error(file, r"sd3\.5_tiny\.safetensors: an SD3 file without its text encoders.*text_encoders/")
    assert "clip_l.safetensors" in msg
    for name in ("clip_l", "clip_g", "t5xxl"):
        prefix = f"text_encoders.{name}.transformer."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            save(tmp_path / "text_encoders" / f"{name}.safetensors", part)
    if with_t5:
        one_line_error(file, r"has T5-XXL weights but no T5 tokenizer at .*tokenizer_3/tokenizer\.json")
        shutil.copytree(sd3[0] / "tokenizer_3", tmp_path / "tokenizer_3")
    loaded, cfg = load_model(file)
    assert (cfg.text_3 is not None) == with_t5
    got = loaded.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(v, torch.eye(16) if k == CLIP_L_PROJECTION else state[k]) for k, v in got.items())


def test_turbo_models_are_refused_by_name(sd3, tmp_path):
    folder, _, _, model = sd3
    (tmp_path / "stable-diffusion-3.5-large-turbo").symlink_to(folder, target_is_directory=True)
    one_line_error(tmp_path / "stable-diffusion-3.5-large-turbo", r"large-turbo: a timestep-distilled Turbo model")
    file = save(tmp_path / "sd3.5_large_turbo.safetensors", model.state_dict())
    one_line_error(file, r"sd3\.5_large_turbo\.safetensors: a timestep-distilled Turbo model.*3\.5-large")


def test_repo_id_of_an_sd3_folder_loads_from_the_offline_cache(sd3, tmp_path, monkeypatch):
    folder, _, _, model = sd3
    offline_hub_repo(folder, "org/tiny-sd3", tmp_path, monkeypatch)
    loaded, cfg = load_model("org/tiny-sd3")
    assert cfg == model.cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_sd3_refuses_a_prediction_type(sd3):
    with pytest.raises(CheckpointError, match="predicts the flow's velocity; prediction_type does not apply"):
        load_model(sd3[0], prediction_type="epsilon")


@pytest.mark.parametrize("name", ["sd3-medium", "sd35-medium", "sd35-large"])
def test_shapes_of_the_released_models_give_their_presets(name, tmp_path):
    """On the meta device (no memory): Stability's full-size layouts, T5-XXL included, read back as the presets."""
    from diffedit.checkpoint.single_file import infer_config
    from diffedit.models import PRESETS, StableDiffusion3
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StableDiffusion3(PRESETS[name]).state_dict().items()}
    (tmp_path / "tokenizer_3").mkdir()
    (tmp_path / "tokenizer_3" / "tokenizer.json").write_text("{}")  # only its presence is checked here
    assert infer_config(tmp_path / f"{name}.safetensors", shapes) == PRESETS[name]
