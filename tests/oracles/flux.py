"""diffusers' FLUX.1 networks on our weights: the test oracles of the Flux family (never imported by ``diffedit``)."""
from __future__ import annotations

import contextlib
import types

import torch

from . import _on_meta


@contextlib.contextmanager
def _converter_at_widths(hidden: int, mlp: int):
    """diffusers' converter splits single_blocks.N.linear1 at FLUX.1's widths, written into it (3 x 3072 + 12288):
    for another width the same split is made at that width (the one place the converter is adapted)."""
    from diffusers.loaders import single_file_utils as sfu
    real = sfu.torch

    def split(t, sizes, dim=0):
        if isinstance(sizes, tuple) and len(sizes) == 4 and sizes[0] == 3072 and t.shape[dim] == 3 * hidden + mlp:
            sizes = (hidden, hidden, hidden, mlp)
        return real.split(t, sizes, dim)
    sfu.torch = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    sfu.torch.split = split
    try:
        yield sfu.convert_flux_transformer_checkpoint_to_diffusers
    finally:
        sfu.torch = real


def diffusers_flux_state(flux) -> dict:
    """Our ``Flux``'s state dict under diffusers' names, through diffusers' own single-file converter, which must
    use every key."""
    c = flux.cfg
    single_file = {f"model.diffusion_model.{k}": v for k, v in flux.state_dict().items()}
    with _converter_at_widths(c.hidden_size, c.mlp_width) as convert:
        converted = convert(single_file)
    if single_file:
        raise RuntimeError(f"keys diffusers' converter did not use: {sorted(single_file)[:5]}")
    return converted


def flux_transformer_config(c) -> dict:
    return dict(patch_size=1, in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
                attention_head_dim=c.head_dim, num_attention_heads=c.heads, joint_attention_dim=c.context_in_dim,
                pooled_projection_dim=c.vec_in_dim, guidance_embeds=c.guidance_embed, axes_dims_rope=tuple(c.axes_dim))


def flux_transformer(flux):
    """diffusers' FluxTransformer2DModel holding our ``Flux``'s tensors (shared where the converter passes them)."""
    from diffusers import FluxTransformer2DModel
    return _on_meta(FluxTransformer2DModel, flux_transformer_config(flux.cfg), diffusers_flux_state(flux))


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), FluxPipeline's _pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline's _prepare_latent_image_ids for an h x w latent: (h/2 * w/2, 3) of (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


@torch.no_grad()
def diffusers_velocity(net, x, t, context, y, guidance=None) -> torch.Tensor:
    """diffusers' transformer on our inputs: x (B, C, h, w), t = 1000 s, guidance the scale; the velocity unpacked."""
    h, w = x.shape[-2:]
    b = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float32).expand(b)
    g = None if guidance is None else torch.as_tensor(guidance, dtype=torch.float32).expand(b)
    out = net(hidden_states=pack(x), timestep=t / 1000, guidance=g, pooled_projections=y,
              encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3), img_ids=image_ids(h, w),
              return_dict=False)[0]
    return unpack(out, h, w)
