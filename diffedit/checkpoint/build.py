"""Building the model on the meta device and loading each tensor once, straight into the dtype, strictly; and
the low-memory mode of FLUX.1 and SD3 with T5 (``Swap``), in which T5 and the transformer take turns in memory."""
from __future__ import annotations

import gc
import logging

import torch
from safetensors import SafetensorError
from torch import nn

from ..models import FluxModel, ModelConfig, StableDiffusion, StableDiffusion3
from ..models.flux import STORED_DTYPES, StoredLinear, keep_stored
from .errors import CheckpointError
from .layout import VAE_PREFIX, ZERO_FILL, Tensors

log = logging.getLogger(__name__)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def build(cfg: ModelConfig, tensors: Tensors, where: str, device: torch.device, dtype: torch.dtype,
          lazy: str | None = None) -> StableDiffusion | StableDiffusion3 | FluxModel:
    """The eval-mode, frozen model of ``cfg`` holding ``tensors``; every key and shape must match. Each tensor is
    cast to ``dtype``, except a Linear layer's float8 weights: they stay float8 and are upcast when the layer runs
    (``models.flux.StoredLinear``), so a float8 file takes one byte a weight. The tensors under the prefix ``lazy``
    are checked but not read: that part stays on the meta device until ``materialize`` fills it."""
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
    skipped = {k for k in expected if lazy and k.startswith(lazy)}
    for k in skipped:  # the shapes are checked now, so that reading them later cannot fail on a shape
        _check_shape(k, tensors[k][0], expected[k], where)
    state = _read({k: v for k, v in expected.items() if k not in skipped}, tensors, _linear(model), where, device,
                  dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) != skipped:  # strict, but for the part left lazy
        raise CheckpointError(f"{where}: the model's keys changed while loading ({_few(result.missing_keys)})")
    keep_stored(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n not in skipped]
    if left:
        raise CheckpointError(f"{where}: {len(left)} tensors of the model were not loaded ({_few(left)})")
    return model.eval().requires_grad_(False)


def materialize(module: nn.Module, tensors: Tensors, where: str, device: torch.device, dtype: torch.dtype) -> None:
    """Fill ``module`` (on the meta device, or holding weights to replace) with ``tensors`` (keys relative to it),
    strictly and as ``build`` does: cast to ``dtype``, a Linear's float8 weights kept as stored."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if set(expected) != set(tensors):
        raise CheckpointError(f"{where}: the tensors do not match the module's keys "
                              f"({_few(sorted(set(expected) ^ set(tensors)))})")
    module.load_state_dict(_read(expected, tensors, _linear(module), where, device, dtype), strict=True, assign=True)
    keep_stored(module)
    module.requires_grad_(False)


def _linear(model: nn.Module) -> set[str]:
    """The names of the Linear layers' weights and biases: the tensors that may stay float8."""
    return {f"{n}.{p}" for n, m in model.named_modules() if type(m) in (nn.Linear, StoredLinear)
            for p in ("weight", "bias")}


def _check_shape(k: str, found: tuple, want: tuple, where: str) -> None:
    if found != want and not (k.startswith(VAE_PREFIX) and found + (1, 1) == want):  # VAE attention as linear
        raise CheckpointError(f"{where}: {k} has shape {list(found)}, expected {list(want)}")


def _read(expected: dict, tensors: Tensors, linear: set[str], where: str, device: torch.device, dtype: torch.dtype
          ) -> dict[str, torch.Tensor]:
    """Each tensor of ``expected`` read once from ``tensors``, shape-checked and cast (float8 Linear weights kept)."""
    state = {}
    for k, want in expected.items():
        found, read = tensors[k]
        _check_shape(k, found, want, where)
        try:
            t = read()
        except SafetensorError as e:
            raise CheckpointError(f"{where}: cannot read {k}: {e}") from None
        keep = not t.is_floating_point() or (t.dtype in STORED_DTYPES and k in linear)
        state[k] = t.reshape(want).to(device=device, dtype=t.dtype if keep else dtype)
    return state


class Swap:
    """The low-memory mode of FLUX.1 and SD3 with T5 (both models name these modules alike): which of T5 and the
    transformer is in memory (``resident``), and how to read either again. The model is built with T5 loaded and the
    transformer left on the meta device (``build(lazy=...)``); the first transformer call frees T5 and reads the
    transformer, a new text after that frees the transformer and reads T5 again. Each is read as ``build`` reads it,
    so the results equal those of the model holding both, and the peak holds the larger of the two instead of both.
    ``dtype``: the networks' compute dtype (``DiffEdit`` sets it)."""

    PARTS = {"text": "text_encoders.t5xxl", "transformer": "model.diffusion_model"}  # the modules that take turns
    NAMES = {"text": "T5", "transformer": "the transformer"}

    def __init__(self, model: nn.Module, tensors: Tensors, where: str, device: torch.device, dtype: torch.dtype):
        self.model, self.where, self.device, self.dtype = model, where, device, dtype
        self.tensors = {part: {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                        for part, name in self.PARTS.items()}
        self.resident = "text"

    def module(self, part: str) -> nn.Module:
        return self.model.get_submodule(self.PARTS[part])

    def hold(self, part: str) -> None:
        """Make ``part`` ("text" or "transformer") resident, freeing the other one first."""
        if self.resident == part:
            return
        other = next(p for p in self.PARTS if p != part)
        self.module(other).to("meta")  # drops its weights; they are read again from the file when needed
        self.resident = None
        gc.collect()
        materialize(self.module(part), self.tensors[part], self.where, self.device, self.dtype)
        self.resident = part
        log.info("low-memory mode: %s freed, %s loaded", self.NAMES[other], self.NAMES[part])
