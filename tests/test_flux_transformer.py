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


def _fill_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights in place, on the CPU (a module on meta gets its storage here): the RMS-norm scales 1, matrices
    N(0, 1/fan_in) (activations stay O(1) through the 57 blocks), other vectors N(0, 0.02^2)."""
    module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("_norm.scale"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02, generator=gen)
    return module


@torch.no_grad()
def blockwise_outputs(cfg):
    """(ours, diffusers') velocities of a transformer of ``cfg`` with random weights, on 16 x 16 latents and 16 text
    tokens (guidance 3.5 where embedded), holding only the embedders and the final layer: each block is given its
    weights (drawn from its own seed) just before it runs and sent back to meta after, in ours and in diffusers' (the
    same block through diffusers' own converter), so the peak holds one block, not the model."""
    import dataclasses
    from diffusers import FluxTransformer2DModel
    from oracles.flux import diffusers_flux_state, flux_transformer_config
    with torch.device("meta"):
        ours = Flux(cfg).eval()
        theirs = FluxTransformer2DModel(**flux_transformer_config(cfg)).eval()
    blocks = ("double_blocks", "single_blocks")
    for i, (name, child) in enumerate(ours.named_children()):
        if name not in blocks:
            _fill_(child, seed=i)

    def converted(kind: str, block) -> dict:
        """diffusers' names and tensors of one of our blocks (a one-block model around it, the rest on meta)."""
        with torch.device("meta"):
            one = Flux(dataclasses.replace(cfg, depth=1, depth_single_blocks=1))
        getattr(one, kind)[0] = block
        for name, child in ours.named_children():
            if name not in blocks:
                setattr(one, name, child)
        return diffusers_flux_state(one)

    with torch.device("meta"):
        outer = converted("double_blocks", fluxmod.DoubleStreamBlock(cfg))
    outer = {k: v for k, v in outer.items() if not k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    missing, unexpected = theirs.load_state_dict(outer, strict=False, assign=True)
    assert not unexpected and all(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in missing)
    twins = {"double_blocks": theirs.transformer_blocks, "single_blocks": theirs.single_transformer_blocks}
    prefix = {"double_blocks": "transformer_blocks.0.", "single_blocks": "single_transformer_blocks.0."}

    def load_ours(module, _args):
        _fill_(module, seeds[module])

    def load_twin(module, _args):
        kind, seed = seeds[module]
        with torch.device("meta"):
            block = type(getattr(ours, kind)[0])(cfg)
        state = converted(kind, _fill_(block, seed))
        module.load_state_dict({n[len(prefix[kind]):]: v for n, v in state.items() if n.startswith(prefix[kind])},
                               strict=True, assign=True)

    def unload(module, _args, _out):
        module.to("meta")

    seeds, hooks = {}, []
    for k, kind in enumerate(blocks):
        for i, (mine, twin) in enumerate(zip(getattr(ours, kind), twins[kind])):
            seeds[mine], seeds[twin] = 1000 * (k + 1) + i, (kind, 1000 * (k + 1) + i)
            hooks += [mine.register_forward_pre_hook(load_ours), twin.register_forward_pre_hook(load_twin),
                      mine.register_forward_hook(unload), twin.register_forward_hook(unload)]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, cfg.context_in_dim, generator=g)
    y, t = torch.randn(1, cfg.vec_in_dim, generator=g), torch.tensor([500.0])
    guidance = torch.tensor([3.5]) if cfg.guidance_embed else None
    try:
        a = ours(x, t, context, y, guidance)
        b = diffusers_velocity(theirs, x, t, context, y, guidance)
    finally:
        for h in hooks:
            h.remove()
    return a, b


def test_blockwise_loading_equals_diffusers_on_tiny_flux():
    """The machinery of the full-size test below, on tiny-flux: blocks loaded one at a time agree as a whole model."""
    a, b = blockwise_outputs(FLUX_PRESETS["tiny-flux"])
    assert a.abs().mean() > 1e-2 and rel_err(a, b) < 1e-5


@pytest.mark.slow
def test_full_size_flux_dev_transformer_equals_diffusers_with_blocks_loaded_one_at_a_time():
    """FLUX.1-dev's transformer at full size (19 double + 38 single blocks, hidden 3072: 12B parameters, 48 GB in
    fp32; random weights, matrices N(0, 1/fan_in)) against diffusers' FluxTransformer2DModel, one block in memory at a
    time (``blockwise_outputs``). fp32 rounding through 57 residual blocks stays far below 1e-4."""
    a, b = blockwise_outputs(FLUX_PRESETS["flux-dev"])
    err = rel_err(a, b)
    report("flux-dev full size (57 blocks, one at a time) vs diffusers", err)
    assert a.abs().mean() > 1e-2 and err < 1e-4
