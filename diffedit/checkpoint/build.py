"""Building the model on the meta device and loading each tensor once, straight into the dtype, strictly."""
from __future__ import annotations

import torch
from safetensors import SafetensorError
from torch import nn

from ..models import FluxModel, ModelConfig, StableDiffusion, StableDiffusion3
from ..models.flux import STORED_DTYPES, keep_stored
from .errors import CheckpointError
from .layout import VAE_PREFIX, ZERO_FILL, Tensors


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def build(cfg: ModelConfig, tensors: Tensors, where: str, device: torch.device, dtype: torch.dtype
          ) -> StableDiffusion | StableDiffusion3 | FluxModel:
    """The eval-mode, frozen model of ``cfg`` holding ``tensors``; every key and shape must match. Each tensor is
    cast to ``dtype``, except a Linear layer's float8 weights: they stay float8 and are upcast when the layer runs
    (``models.flux.StoredLinear``), so a float8 file takes one byte a weight."""
    with torch.device("meta"):  # no memory: every parameter is assigned from the checkpoint below
        model = {"sd3": StableDiffusion3, "flux": FluxModel}.get(cfg.family, StableDiffusion)(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k in ZERO_FILL:
        if k in expected and k not in tensors:
            tensors[k] = (expected[k], lambda shape=expected[k]: torch.zeros(shape))
    missing, unexpected = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected]
    if missing or unexpected:
        problems = [f"{len(ks)} {what} key{'s' * (len(ks) > 1)} ({_few(ks)})"
                    for what, ks in (("missing", missing), ("unexpected", unexpected)) if ks]
        raise CheckpointError(f"{where}: {' and '.join(problems)} for the {cfg.family} architecture it describes")
    linear = {f"{n}.{p}" for n, m in model.named_modules() if type(m) is nn.Linear for p in ("weight", "bias")}
    state = {}
    for k, want in expected.items():
        found, read = tensors[k]
        if found != want and not (k.startswith(VAE_PREFIX) and found + (1, 1) == want):  # VAE attention as linear
            raise CheckpointError(f"{where}: {k} has shape {list(found)}, expected {list(want)}")
        try:
            t = read()
        except SafetensorError as e:
            raise CheckpointError(f"{where}: cannot read {k}: {e}") from None
        keep = not t.is_floating_point() or (t.dtype in STORED_DTYPES and k in linear)
        state[k] = t.reshape(want).to(device=device, dtype=t.dtype if keep else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    keep_stored(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {len(left)} tensors of the model were not loaded ({_few(left)})")
    return model.eval().requires_grad_(False)
