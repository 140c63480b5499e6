"""Our FLUX.1 transformer (diffedit/models/flux.py) equals diffusers' FluxTransformer2DModel on the same weights
(diffusers' own single-file converter maps our state dict onto its names and must use every key): with and without
the guidance embedding, on non-square latents, fp32. Each wrong variant — the RoPE axes swapped, text ids that are not
zero, the single-stream MLP applied after the attention instead of beside it — differs from diffusers by more than
1e-3, so the comparison can fail."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

from conftest import randomize_, rel_err, report
from diffedit.models import flux as fluxmod
from diffedit.models.configs import FLUX_PRESETS
from diffedit.models.flux import Flux

pytest.importorskip("diffusers")
from oracles.flux import diffusers_velocity, flux_transformer  # noqa: E402


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-flux-schnell"])
def pair(request):
    torch.manual_seed(0)
    ours = randomize_(Flux(FLUX_PRESETS[request.param]), seed=1).eval().requires_grad_(False)
    sharpen_attention_(ours)
    return ours, flux_transformer(ours), request.param


def sharpen_attention_(flux, factor: float = 6.0):
    """Scale the q and k norms so attention is peaked: with random weights it is near uniform over the tokens, and
    where every token is attended alike, positions (RoPE, ids) hardly matter and their mistakes hide."""
    for name, p in flux.named_parameters():
        if name.endswith(("query_norm.scale", "key_norm.scale")):
            p.mul_(factor)


def inputs(cfg, h=8, w=20):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, h, w, generator=g), torch.randn(2, 7, cfg.context_in_dim, generator=g)
    y = torch.randn(2, cfg.vec_in_dim, generator=g)
    guidance = torch.tensor([3.5, 1.0]) if cfg.guidance_embed else None
    return x, torch.tensor([700.0, 250.0]), context, y, guidance


@torch.no_grad()
def test_transformer_equals_diffusers_flux_on_non_square_latents(pair):
    ours, theirs, name = pair
    args = inputs(ours.cfg)
    err = rel_err(ours(*args), diffusers_velocity(theirs, *args))
    report(f"{name} transformer (8 x 20 latents) vs FluxTransformer2DModel", err)
    assert err < 1e-4





def _text_ids_counting(length, device=None):
    return torch.arange(length, device=device, dtype=torch.float32)[:, None].expand(length, 3).clone()


def _mlp_after_attention(self, x, vec, pe):
    shift, scale, gate = self.modulation(vec)
    qkv, mlp_w = self.linear1.weight.split([3 * self.hidden, self.mlp_width])
    qkv_b, mlp_b = self.linear1.bias.split([3 * self.hidden, self.mlp_width])
    x_mod = fluxmod.modulate(self.pre_norm(x), shift, scale)
    q, k, v = rearrange(torch.nn.functional.linear(x_mod, qkv, qkv_b), "b l (three h d) -> three b h l d",
                        three=3, h=self.heads)
    attn = fluxmod.attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
    after = fluxmod.modulate(self.pre_norm(x + attn), shift, scale)  # the MLP reads the attention's output
    return x + gate * self.linear2(torch.cat([attn, self.mlp_act(torch.nn.functional.linear(after, mlp_w, mlp_b))],
                                             dim=-1))


WRONG = {"rope-axes-swapped": ("image_ids", lambda h, w, device=None: _swapped(h, w, device)),
         "text-ids-not-zero": ("text_ids", _text_ids_counting),
         "single-stream-mlp-after-attention": None}
_real_image_ids = fluxmod.image_ids


def _swapped(h, w, device=None):
    return _real_image_ids(h, w, device)[:, [0, 2, 1]]


@pytest.mark.parametrize("variant", list(WRONG))
@torch.no_grad()
def test_a_wrong_variant_differs_from_diffusers_flux(pair, variant, monkeypatch):
    ours, theirs, name = pair
    args = inputs(ours.cfg)
    if variant == "single-stream-mlp-after-attention":
        monkeypatch.setattr(fluxmod.SingleStreamBlock, "forward", _mlp_after_attention)
    else:
        monkeypatch.setattr(fluxmod, *WRONG[variant])
    err = rel_err(ours(*args), diffusers_velocity(theirs, *args))
    report(f"{name} wrong variant {variant} vs FluxTransformer2DModel", err)
    assert err > 1e-3


@torch.no_grad()
def test_guidance_embedding_changes_the_velocity_only_on_dev(pair):
    ours, _, name = pair
    x, t, context, y, g = inputs(ours.cfg)
    if not ours.cfg.guidance_embed:
        assert not hasattr(ours, "guidance_in")
        return
    a, b = ours(x, t, context, y, torch.tensor(1.0)), ours(x, t, context, y, torch.tensor(4.0))
    assert rel_err(a, b) > 1e-3
