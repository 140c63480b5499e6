"""The SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel on shared random weights.

Ours holds the weights in Stability's single-file names; diffusers' own converter
(convert_sd3_transformer_checkpoint_to_diffusers) turns its state dict into diffusers' names, which must load with
strict=True and use every key: that proves our names, and the direction a single-file loader reads them in. Each test
also runs a wrong variant (a plausible mistake) and checks that it misses by far more than the tolerance.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from diffedit.models.configs import MMDIT_PRESETS, MMDiTConfig
from diffedit.models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")
from oracles import sd3_transformer  # noqa: E402

TOL, WRONG = 1e-4, 1e-3
SD3 = dataclasses.replace(MMDIT_PRESETS["tiny-sd3"], qk_norm=False, dual_attention_layers=())
SD35 = MMDIT_PRESETS["tiny-sd3"]


def randomize(model: MMDiT, seed: int = 0) -> MMDiT:
    """Every parameter and the position table random (matrices N(0, 1/fan_in), vectors N(0, 0.1^2), RMS-norm
    weights around 1), so that a swapped or missing piece changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), ("pos_embed", model.pos_embed)]:
            r = torch.randn(p.shape, generator=gen)
            if name == "pos_embed":
                p.copy_(r)
            elif ".ln_" in name:
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(r * (p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1))
    return model.eval().requires_grad_(False)


def inputs(cfg: MMDiTConfig, h: int, w: int, batch: int = 2, tokens: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=gen)
    t = torch.tensor([981.0, 120.5])[:batch]
    context = torch.randn(batch, tokens, cfg.context_dim, generator=gen)
    y = torch.randn(batch, cfg.pooled_dim, generator=gen)
    return x, t, context, y


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def compare(ours, theirs, x, t, context, y, wrong):
    """Relative error of ours and of the wrong variant (a callable with ours' signature) against diffusers."""
    ref = theirs(x, context, y, t).sample
    err, err_wrong = rel(ours(x, t, context, y), ref), rel(wrong(x, t, context, y), ref)
    print(f"relative error {err:.2e}, wrong variant {err_wrong:.2e}")
    assert err < TOL
    assert err_wrong > WRONG
    return err, err_wrong


def swapped_halves(w):
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def test_sd3_final_layer_order_and_pooled_text():
    ours = randomize(MMDiT(SD3))
    theirs = sd3_transformer(ours)
    x, t, ctx, y = inputs(SD3, 16, 16)
    # the final adaLN read as (scale, shift), the order diffusers stores it in
    wrong = copy.deepcopy(ours)
    lin = wrong.final_layer.adaLN_modulation[1]
    lin.weight.copy_(swapped_halves(lin.weight)), lin.bias.copy_(swapped_halves(lin.bias))
    compare(ours, theirs, x, t, ctx, y, wrong)
    # the pooled halves (CLIP-L | CLIP-G) swapped
    compare(ours, theirs, x, t, ctx, y, lambda x, t, c, y: ours(x, t, c, y.roll(SD3.pooled_dim // 2, dims=1)))


def test_sd3_keys_of_the_last_block():
    """The last block's context stream only feeds the joint attention: 2 modulations, no proj, no MLP."""
    sd = MMDiT(SD35).state_dict()
    last = {k.split("context_block.")[1] for k in sd if k.startswith(f"joint_blocks.{SD35.depth - 1}.context_block.")}
    assert last == {"adaLN_modulation.1.weight", "adaLN_modulation.1.bias", "attn.qkv.weight", "attn.qkv.bias",
                    "attn.ln_q.weight", "attn.ln_k.weight"}
    assert sd[f"joint_blocks.{SD35.depth - 1}.context_block.adaLN_modulation.1.weight"].shape[0] == 2 * SD35.hidden_size
    assert sd["joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape[0] == 9 * SD35.hidden_size
    assert "joint_blocks.1.x_block.attn2.qkv.weight" not in sd
    assert sd["pos_embed"].shape == (1, SD35.pos_embed_max_size ** 2, SD35.hidden_size)


def test_sd35_qk_norm_and_dual_attention():
    ours = randomize(MMDiT(SD35))
    theirs = sd3_transformer(ours)
    x, t, ctx, y = inputs(SD35, 16, 16)
    no_norm = copy.deepcopy(ours)
    for m in no_norm.modules():
        if hasattr(m, "ln_q"):
            m.ln_q, m.ln_k = torch.nn.Identity(), torch.nn.Identity()
    compare(ours, theirs, x, t, ctx, y, no_norm)
    no_attn2 = copy.deepcopy(ours)  # MMDiT-X's image-only attention silenced (its gate rows zeroed)
    h = SD35.hidden_size
    for i in SD35.dual_attention_layers:
        lin = no_attn2.joint_blocks[i].x_block.adaLN_modulation[1]
        lin.weight[8 * h:].zero_(), lin.bias[8 * h:].zero_()
    compare(ours, theirs, x, t, ctx, y, no_attn2)


def test_non_square_latent():
    ours = randomize(MMDiT(SD35), seed=2)
    theirs = sd3_transformer(ours)
    x, t, ctx, y = inputs(SD35, 12, 20, tokens=5)
    wrong = copy.deepcopy(ours)  # height and width of the position table swapped
    m = SD35.pos_embed_max_size
    wrong.pos_embed.copy_(ours.pos_embed.reshape(m, m, -1).transpose(0, 1).reshape(1, m * m, -1))
    compare(ours, theirs, x, t, ctx, y, wrong)


def test_pos_embed_centre_crop_below_max():
    ours = randomize(MMDiT(SD3), seed=3)
    theirs = sd3_transformer(ours)
    m = SD3.pos_embed_max_size
    x, t, ctx, y = inputs(SD3, 2 * (m - 6), 2 * (m - 4), batch=1)
    wrong = copy.deepcopy(ours)  # the top-left corner of the table instead of its centre
    wrong.cropped_pos_embed = lambda h, w: ours.pos_embed.reshape(m, m, -1)[:h, :w].reshape(1, h * w, -1)
    compare(ours, theirs, x, t, ctx, y, wrong)
    # the whole table at the largest latent; wrong: no position table at all
    x, t, ctx, y = inputs(SD3, 2 * m, 2 * m, batch=1)
    no_table = copy.deepcopy(ours)
    no_table.pos_embed.zero_()
    compare(ours, theirs, x, t, ctx, y, no_table)


def test_latent_sides_checked():
    ours = MMDiT(SD3)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ours(*inputs(SD3, 15, 16))
    with pytest.raises(ValueError, match="exceeds the position table"):
        ours(*inputs(SD3, 2 * SD3.pos_embed_max_size + 2, 16))


@pytest.mark.slow
def test_sd35_medium_full_size():
    """SD3.5 Medium at full width and depth (2.5B parameters, random weights) at 32 x 32 latents. Ours is made on
    meta and filled in place; diffusers' takes the converted tensors (only the split q, k, v and the swapped final
    modulations are new)."""
    cfg = MMDIT_PRESETS["sd35-medium"]
    with torch.device("meta"):
        ours = MMDiT(cfg)
    ours = randomize(ours.to_empty(device="cpu"))
    assert sum(p.numel() for p in ours.parameters()) > 2.2e9
    theirs = sd3_transformer(ours)
    x, t, ctx, y = inputs(cfg, 32, 32, batch=1, tokens=16)
    wrong = lambda x, t, c, y: ours(x, t, c, y.roll(cfg.pooled_dim // 2, dims=1))  # pooled halves swapped
    compare(ours, theirs, x, t, ctx, y, wrong)


def test_bench_dry_run(tmp_path):
    """scripts/bench_sd3.py on tiny-sd3 (float32: fast on every CPU): both models agree on shared tensors."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).parents[1] / "scripts" / "bench_sd3.py"
    spec = importlib.util.spec_from_file_location("bench_sd3", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    try:
        bench.main(["--dry-run", "--dtype", "float32", "--json", str(tmp_path / "bench.json")])
    finally:
        torch.set_flush_denormal(False)  # the script's process-wide setting; torch's default
    out = json.loads((tmp_path / "bench.json").read_text())
    run = out["dtypes"]["float32"]
    assert run["sides"]["8"]["relative_difference"] < TOL
    assert run["diffusers_bytes_shared"] > 0.5
    assert set(out["summary"]) == {"float32 8x8"}
