"""The shipped toy model: it loads through the normal loader, carries its recipe, and works (small evaluation)."""
import json
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from diffedit import DiffEdit, metrics
from diffedit.images import to_pil, to_tensor
from diffedit.cli import main as cli_main
from diffedit.models import preset
from diffedit import evaluation
from diffedit.toy import judge, world

TOY = resources.files("diffedit.toy") / "toy.safetensors"


@pytest.fixture(scope="module")
def toy():
    return DiffEdit.from_pretrained("toy")


def test_shipped_toy_checkpoint_is_small_and_holds_architecture_and_recipe():
    assert TOY.is_file(), "diffedit/toy/toy.safetensors is missing: run scripts/train_toy.py --export ..."
    assert TOY.stat().st_size < 25e6
    with safe_open(str(TOY), "pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in list(f.keys())[:5])
    cfg = json.loads(meta["diffedit_config"])
    recipe = json.loads(meta["recipe"])
    assert cfg["unet"]["model_channels"] == preset("toy").unet.model_channels
    assert recipe["data_seed"] == world.TRAIN_SEED and recipe["unet_steps_done"] > 0
    assert recipe["command"].startswith("python scripts/train_toy.py")


def test_toy_model_loads_through_the_normal_loader_by_name(toy):
    assert toy.cfg.vae.downsampling == 4 and toy.cfg.resolution == 64
    assert toy.cfg.vae.scaling_factor != preset("toy").vae.scaling_factor  # measured from the data at export
    x = torch.zeros(1, 3, 64, 64)
    assert toy.encode_image(x).shape == (1, 4, 16, 16)


def test_small_heldout_evaluation_meets_the_floor_that_proves_the_model_works(toy):
    out = evaluation.evaluate(toy, n=8, seed=world.EVAL_SEED + 1, steps=25, progress=False)
    print(json.dumps(out, indent=1))
    # measured with the shipped model (2 edits of each kind): IoU 0.58, bg PSNR 25.9 vs SDEdit 15.7 dB, success 0.5
    assert out["diffedit"]["iou"] > 0.5
    assert out["diffedit"]["bg_psnr"] > out["sdedit"]["bg_psnr"] + 3
    assert out["diffedit"]["success"] >= 0.375
    assert out["world"] == "v1" and 0 < out["diffedit"]["iou_footprint"] <= 1
    for kind in ("all", *world.EDIT_KINDS):  # the best a 4 x 4-cell mask can do, for both ground truths
        c = out["ceiling"][kind]
        assert c["count"] == 0 or (0 < c["iou"] <= 1 and 0 < c["iou_footprint"] <= 1 and c["vae_bg_psnr"] > 20)
    assert set(evaluation.METHODS) <= set(out) and out["masked_sdedit"]["count"] == 8  # all four methods ran
    assert "| all (8) |" in evaluation.table(out) and "masked SDEdit success" in evaluation.table(out)


@pytest.mark.parametrize("spec", [world.V1, world.V2])
def test_the_generation_shape_judge_names_the_shape_of_rendered_objects(spec):
    """Caption following of shapes: on renders, clean and degraded as by a lossy autoencoder (judge.degrade)."""
    right = total = 0
    for i, scene in enumerate(world.scenes(60, world.EVAL_SEED + 3, spec=spec)):
        for img in (scene.render(), judge.degrade(scene.render(), "noise_blur", np.random.default_rng(i))):
            for o in scene.objects:
                right += evaluation.shape_of(img, o.colour, scene.background) == o.shape
                total += 1
    assert right / total >= 0.98
    assert evaluation.shape_of(np.zeros((64, 64, 3), np.uint8), "red", "black") is None


def test_evaluation_refuses_the_training_seed(toy):
    with pytest.raises(ValueError, match="training seed"):
        evaluation.evaluate(toy, n=1, seed=world.TRAIN_SEED)


def test_demo_command_writes_input_edit_mask_and_panel(tmp_path):
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--steps", "10", "-q"]) == 0
    for name in ("input", "edited", "mask", "panel"):
        assert (tmp_path / "demo" / f"{name}.png").stat().st_size > 0


def test_shipped_decoder_keeps_the_unedited_region_when_an_edit_is_spliced_into_the_latents(toy):
    """DiffEdit decodes latents that are the input's outside the mask and new inside; the decoder must not tint
    the kept region. Splicing an edit's target latents into its source latents (mask: every latent cell the edit
    touches) must decode the unedited pixels nearly as well as the VAE reconstructs the target: phase 5 of
    train_toy.py (measured: 2.2 dB lost on average here; 5.0 dB with the decoder before that phase)."""
    def enc(a):
        return toy.encode_image(to_tensor(Image.fromarray(a), toy.multiple, "cpu", torch.float32))

    def dec(z):
        return np.asarray(to_pil(toy.decode_latents(z)[0], (world.SIZE, world.SIZE)).convert("RGB"))

    losses = []
    for ed in world.edits(12, world.EVAL_SEED + 2):
        src, tgt, gt = ed.source.render(), ed.target.render(), ed.mask()
        z_s, z_t = enc(src), enc(tgt)
        m = torch.from_numpy(metrics.downsample_mask(gt, world.SIZE // z_s.shape[-1], "any")).float()
        spliced = dec(m * z_t + (1 - m) * z_s)
        losses.append(metrics.psnr(dec(z_t), tgt, mask=~gt) - metrics.psnr(spliced, tgt, mask=~gt))
    print(f"kept-region PSNR lost by splicing, per edit (dB): {np.round(losses, 1)}")
    assert np.mean(losses) < 3.5


def test_a_removal_leaves_a_caption_of_the_form_the_toy_model_was_trained_on():
    """A removal's target caption names one object: the training scenes (the recipe's seed and max_objects) hold
    captions of one object, and every removal's target caption is one of them word for word."""
    with safe_open(str(TOY), "pt") as f:
        recipe = json.loads(f.metadata()["recipe"])
    trained = {s.caption for s in world.scenes(3000, recipe["data_seed"], max_objects=recipe["max_objects"])}
    for e in world.edits(40, world.EVAL_SEED, kinds=("remove",)):
        assert len(e.target.objects) == 1 and e.target_caption in trained, e.target_caption
