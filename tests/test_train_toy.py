"""scripts/train_toy.py end to end at a few steps: phases, resume, the decoder phases' fixed encoder, the export,
--world and --init."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffedit.checkpoint import load_model
from diffedit.toy import world

spec = importlib.util.spec_from_file_location("train_toy", Path(__file__).parents[1] / "scripts" / "train_toy.py")
tt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tt)

SMALL = ["--n-scenes", "6", "--batch", "2", "--vae-steps", "2", "--unet-steps", "2", "--save-every", "1"]


def assert_only_the_decoder_moved(before: dict, after: dict):
    """The encoder (hence the UNet's latents) is bit-identical, the decoder has moved."""
    for k, v in after.items():
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("decoder."))


def exported(export: Path, decoder_state: dict) -> dict:
    """The export's recipe, after checking it loads strictly and carries ``decoder_state``'s decoder."""
    with safe_open(str(export), "pt") as f:
        recipe = json.loads(f.metadata()["recipe"])
    model, cfg = load_model(str(export))
    assert cfg.resolution == 64
    got = model.first_stage_model.decoder.conv_in.weight
    assert torch.allclose(got.float(), decoder_state["decoder.conv_in.weight"].half().float())
    return recipe


def test_phases_resume_and_export_a_checkpoint_the_loader_reads_strictly(tmp_path):
    out, export = tmp_path / "run", tmp_path / "toy.safetensors"
    tt.main(["--out", str(out), *SMALL])
    assert torch.load(out / "unet_state.pt", weights_only=False)["step"] == 2
    tt.main(["--out", str(out), *SMALL[:-4], "--unet-steps", "3", "--save-every", "1"])  # resumes at step 2
    assert torch.load(out / "unet_state.pt", weights_only=False)["step"] == 3
    vae_before = torch.load(out / "vae_state.pt", weights_only=False)["vae"]
    tt.main(["--out", str(out), *SMALL[:-4], "--unet-steps", "3", "--save-every", "1", "--phases", "decoder",
             "--decoder-steps", "2", "--export", str(export)])
    decoder = torch.load(out / "decoder_state.pt", weights_only=False)
    assert decoder["step"] == 2
    assert_only_the_decoder_moved(vae_before, decoder["vae"])
    recipe = exported(export, decoder["vae"])
    assert recipe["unet_steps_done"] == 3 and recipe["decoder_steps_done"] == 2 and recipe["decoder_steps"] == 2


def test_unknown_phase_is_refused_with_the_allowed_names(tmp_path):
    import pytest
    with pytest.raises(SystemExit, match=r"--phases: unknown phase\(s\) \['vea'\]; choose from vae, unet, decoder, splice"):
        tt.main(["--out", str(tmp_path / "run"), *SMALL, "--phases", "vea"])


def test_splice_masks_cover_every_changed_pixel_so_the_spliced_image_is_the_target_render():
    eds = world.edits(12, 99)
    src = world.render_batch([e.source for e in eds])
    tgt = world.render_batch([e.target for e in eds])
    for grow in (0, 1):
        m = tt.splice_masks(src, tgt, 4, np.full(len(eds), grow))
        assert m.shape == (12, 1, 16, 16)
        pixels = m.repeat_interleave(4, -2).repeat_interleave(4, -1)[:, 0, :, :, None].numpy()
        assert np.array_equal(np.where(pixels > 0, tgt, src), tgt)  # nothing the edit changed lies outside
        cells = torch.from_numpy(np.stack([e.mask() for e in eds])).float()[:, None]
        any_cell = torch.nn.functional.max_pool2d(cells, 4)
        assert torch.equal(m >= any_cell, torch.ones_like(m, dtype=torch.bool))
        assert (m.sum() > any_cell.sum()) == bool(grow)  # dilation grows the mask by whole cells


def test_splice_phase_moves_only_the_decoder_and_the_export_records_it(tmp_path):
    out, export = tmp_path / "run", tmp_path / "toy.safetensors"
    tt.main(["--out", str(out), *SMALL, "--phases", "vae,unet,decoder", "--decoder-steps", "1"])
    decoder = torch.load(out / "decoder_state.pt", weights_only=False)["vae"]
    tt.main(["--out", str(out), *SMALL, "--decoder-steps", "1", "--phases", "splice", "--splice-steps", "2",
             "--export", str(export)])
    spliced = torch.load(out / "splice_state.pt", weights_only=False)
    assert spliced["step"] == 2
    assert_only_the_decoder_moved(decoder, spliced["vae"])  # starts from phase 4's decoder
    recipe = exported(export, spliced["vae"])
    assert recipe["splice_steps_done"] == 2 and recipe["decoder_steps_done"] == 1 and recipe["splice_gain"] == 2.0


def test_world_v2_trains_on_v2_scenes_and_the_export_records_the_world(tmp_path):
    out, export = tmp_path / "run", tmp_path / "toy.safetensors"
    tt.main(["--out", str(out), *SMALL, "--world", "v2", "--splice-steps", "1", "--export", str(export)])
    data = np.load(out / "data.npz")
    assert np.array_equal(data["images"], world.render_batch(world.scenes(6, world.TRAIN_SEED, spec=world.V2)))
    recipe = exported(export, torch.load(out / "splice_state.pt", weights_only=False)["vae"])
    assert recipe["world"] == "v2" and "--world v2" in recipe["command"] and "--init" not in recipe["command"]


def test_splice_batch_draws_its_edits_from_the_recipes_world():
    from diffedit.models import StableDiffusion, preset
    vae = StableDiffusion(preset("toy")).first_stage_model
    for name, spec in world.WORLDS.items():
        _, x = tt.splice_batch(tt.Recipe(world=name), vae, np.random.default_rng(3), 4, "cpu")
        rng = np.random.default_rng(3)
        want = world.render_batch([world.sample_edit(rng, spec=spec).target for _ in range(4)])
        assert torch.equal(x, tt.to_model_range(want, "cpu")), name


def test_init_starts_from_an_export_keeps_its_latent_scale_and_moves_only_what_is_trained(tmp_path):
    base, export = tmp_path / "base", tmp_path / "base.safetensors"
    tt.main(["--out", str(base), *SMALL, "--export", str(export)])
    start = load_file(str(export))
    out, warm = tmp_path / "warm", tmp_path / "warm.safetensors"
    tt.main(["--out", str(out), *SMALL, "--world", "v2", "--init", str(export), "--phases", "splice",
             "--splice-steps", "1", "--export", str(warm)])
    got = load_file(str(warm))
    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    scale, base_recipe = json.loads(meta["diffedit_config"])["vae"]["scaling_factor"], meta["recipe"]
    assert torch.load(out / "latents.pt")["scale"] == scale  # kept, not recomputed from v2 scenes
    moved = {k for k in got if not torch.equal(got[k], start[k])}
    assert moved and all(k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))
                         for k in moved)  # UNet, text encoder, encoder: the init's, bit for bit
    recipe = exported(warm, torch.load(out / "splice_state.pt", weights_only=False)["vae"])
    assert recipe["init"] == str(export) and f"--init {export}" in recipe["command"]
    assert recipe["init_recipe"] == json.loads(base_recipe) and len(recipe["init_sha256"]) == 64
    tt.main(["--out", str(out), *SMALL, "--world", "v2", "--init", str(export), "--phases", "unet"])
    unet = torch.load(out / "unet_state.pt", weights_only=False)
    assert unet["step"] == 2  # the UNet phase runs from the init (loaded strictly) and resumes as before


def test_init_refuses_the_vae_phase(tmp_path):
    import pytest
    with pytest.raises(SystemExit, match="--init keeps the VAE's encoder and latent scale: leave vae out of --phases"):
        tt.main(["--out", str(tmp_path / "run"), *SMALL, "--init", str(tmp_path / "any.safetensors")])
