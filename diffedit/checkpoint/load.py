"""``load_model``: a source to a frozen model, and the SD2 prediction type that tensor shapes cannot tell."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import logging
from pathlib import Path
from typing import Callable

import torch

from ..models import FluxModel, ModelConfig, StableDiffusion, StableDiffusion3, T5Tokenizer
from .build import Swap, build
from .diffusers_folder import read_folder
from .errors import CheckpointError
from .layout import UNET_PREFIX
from .flux import file_defaults, flux_file_tensors, read_flux_file, read_flux_folder, release_defaults, t5_tokenizer
from .sd3 import t5_tokenizer_file
from .sd3_folder import read_sd3_folder
from .single_file import open_safetensors, read_file
from .sources import resolve

log = logging.getLogger(__name__)


def load_model(source: str | Path, device="cpu", dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
               low_memory: bool | str = "auto") -> tuple[StableDiffusion | StableDiffusion3 | FluxModel, ModelConfig]:
    """Load ``source`` (see ``diffedit.checkpoint``) as an eval-mode, frozen model; ``prediction_type``
    ("epsilon" or "v_prediction") overrides what the checkpoint says or what is detected (not for SD3, a
    flow-matching model). ``low_memory`` (FLUX.1, and SD3 with T5; "auto": when the memory line says the machine is
    short): the transformer is left unread and ``model.swap`` (``build.Swap``) lets T5 and it take turns in memory."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise CheckpointError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if low_memory not in (True, False, "auto"):
        raise CheckpointError(f"low_memory must be True, False or 'auto', got {low_memory!r}")
    path = resolve(str(source))
    if path.is_dir():
        cfg, tensors, guessed = _folder_reader(path)(path)
    elif (bfl := flux_file_tensors(path)) is not None:
        cfg, tensors, guessed = read_flux_file(path, bfl)
    else:
        cfg, tensors, guessed = read_file(path)
    if cfg.family in ("sd3", "flux") and prediction_type is not None:
        raise CheckpointError(f"{path}: an {cfg.family.upper()} model predicts the flow's velocity; prediction_type does not apply")
    cfg = dataclasses.replace(cfg, prediction_type=prediction_type or cfg.prediction_type)
    if low_memory is True and not takes_turns(cfg):
        this = "SD3 without T5" if cfg.family == "sd3" else cfg.family.upper()
        raise CheckpointError(f"{path}: low_memory applies to FLUX.1 and to SD3 with T5, this is {this}")
    line, short, low = memory_line(cfg, tensors, torch.device(device), dtype, low_memory)
    log.log(logging.WARNING if short else logging.INFO, "%s", line)
    lazy = Swap.PARTS["transformer"] + "." if low else None  # read on the transformer's first call
    model = build(cfg, tensors, str(path), torch.device(device), dtype, lazy=lazy)
    if low:
        model.swap = Swap(model, tensors, str(path), torch.device(device), dtype)
    if cfg.family == "sd3" and cfg.text_3 is not None:
        model.t5_tokenizer = T5Tokenizer(t5_tokenizer_file(path))
    if cfg.family == "flux":
        model.t5_tokenizer = T5Tokenizer(t5_tokenizer(path))
    if guessed and cfg.family == "sd2":  # 512 px epsilon and 768 px v models have identical shapes
        if prediction_type is None:
            prediction_type, stat = detect_prediction_type(model.unet, cfg.unet.context_dim, cfg.unet.in_channels)
            log.info("%s: an SD2 file that does not say its prediction type; the UNet test (mean(out - x) = %.2f at "
                     "t=999, v if below -1) chose %r. If that is wrong pass prediction_type= (CLI: --prediction-type)",
                     path.name, stat, prediction_type)
        cfg = dataclasses.replace(cfg, prediction_type=prediction_type,
                                  resolution=768 if prediction_type == "v_prediction" else 512)
        model.cfg = cfg
    return model, cfg


def takes_turns(cfg: ModelConfig) -> bool:
    """Whether T5 and the transformer can take turns in memory (``build.Swap``): FLUX.1, and SD3 with T5."""
    return cfg.family == "flux" or (cfg.family == "sd3" and cfg.text_3 is not None)


def memory_line(cfg: ModelConfig, tensors, device: torch.device, dtype: torch.dtype, low_memory: bool | str = False
                ) -> tuple[str, bool, bool]:
    """One line, before loading: what the weights need in ``dtype`` (float8 tensors at one byte: they stay float8)
    and what the machine has (RAM, or the GPU's); whether that is short; and whether a model with T5 runs in
    low-memory mode (``low_memory`` True, or "auto" and short): T5 and the transformer take turns, so the larger of
    them counts."""
    t5_prefix = Swap.PARTS["text"] + "."
    need, t5 = _bytes(tensors, dtype), _bytes({k: v for k, v in tensors.items() if k.startswith(t5_prefix)}, dtype)
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        where = f"{device} has {total / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
    else:
        total, free = (os.sysconf("SC_PAGE_SIZE") * os.sysconf(n) for n in ("SC_PHYS_PAGES", "SC_AVPHYS_PAGES"))
        free = available_ram() or free  # MemAvailable counts reclaimable page cache; MemFree does not
        where = f"this machine has {total / 1e9:.1f} GB of RAM, {free / 1e9:.1f} GB available"
    in_place = _in_place_bytes(tensors, dtype, device)
    line = (f"{cfg.family}: the weights need {need / 1e9:.2f} GB in {str(dtype).removeprefix('torch.')} (plus "
            f"activations)" + (f", {in_place / 1e9:.2f} GB of them used in place as the file's pages, which the "
                               "kernel can drop and read again" if in_place else "") + f"; {where}")
    low = takes_turns(cfg) and (low_memory is True or (low_memory == "auto" and need > free))
    if low:
        transformer = _bytes({k: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}, dtype)
        need -= min(t5, transformer)
        line += (f"; T5 takes {t5 / 1e9:.2f} GB of them: low-memory mode, T5 is freed before the transformer is "
                 f"loaded (and read again for a new text), so {need / 1e9:.2f} GB are held at once")
    elif takes_turns(cfg):
        line += (f"; T5 takes {t5 / 1e9:.2f} GB of them and stays loaded beside the transformer "
                 "(low_memory=True frees it first)")
    short = need > free
    if short:
        line += (f": short by {(need - free) / 1e9:.1f} GB (expect swapping or the process to be killed; a float8 "
                 "transformer file takes half of bf16)")
    return line, short, low


def _bytes(tensors, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * (1 if getattr(read, "dtype", "").startswith("F8") else size)
               for shape, read in tensors.values())


SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _in_place_bytes(tensors, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of the weights a CPU load leaves in the file's mapped pages: those stored in the compute dtype."""
    if device.type != "cpu" or dtype not in SAFETENSORS_NAMES:
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * size for shape, read in tensors.values()
               if getattr(read, "dtype", None) == SAFETENSORS_NAMES[dtype])


def available_ram() -> int:
    """Bytes of RAM the kernel can give without swapping (``MemAvailable``: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0


def is_flux(source: str | Path) -> bool:
    """Whether ``source`` holds a FLUX.1 model, from its transformer's config or its keys (no weight is read)."""
    return _flux_defaults(resolve(str(source))) is not None


def edit_defaults(source: str | Path) -> dict:
    """The knobs whose default is ``source``'s own (``ModelConfig.edit_defaults``: FLUX.1-dev's or schnell's steps
    and guidance; empty for SD), from its configs or keys: no weight is read."""
    return _flux_defaults(resolve(str(source))) or {}


def _flux_defaults(path: Path) -> dict | None:
    """FLUX.1's knob defaults if ``path`` holds FLUX.1, else None."""
    if path.is_dir():
        if _folder_reader(path) is not read_flux_folder:
            return None
        return release_defaults(bool(json.loads((path / "transformer" / "config.json").read_text())
                                     .get("guidance_embeds", False)))
    if path.suffix == ".safetensors" and "diffedit_config" in (meta := open_safetensors(path)[0]):
        cfg = ModelConfig.from_dict(json.loads(meta["diffedit_config"]))  # our exports
        return cfg.edit_defaults() if cfg.family == "flux" else None
    tensors = flux_file_tensors(path)
    return None if tensors is None else file_defaults(tensors)


def _folder_reader(path: Path):
    """A diffusers folder's reader: FLUX.1's (a FluxTransformer2DModel), SD3's (another transformer/) or SD's."""
    config = path / "transformer" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel":
        return read_flux_folder
    return read_sd3_folder if (path / "transformer").is_dir() else read_folder


@torch.no_grad()
def detect_prediction_type(unet: Callable, context_dim: int, in_channels: int = 4) -> tuple[str, float]:
    """Epsilon or v prediction, from one UNet evaluation: the empirical test of AUTOMATIC1111's web UI
    (``is_using_v_parameterization_for_sd2``). At t = 999 a latent is nearly pure noise, so on a constant
    x = 0.5 an epsilon model returns about x itself, while a v model (v = sqrt(ab) eps - sqrt(1 - ab) x0,
    about -x0 there) returns far less: v if mean(out - x) < -1. Returns (type, mean(out - x))."""
    p = next(unet.parameters()) if isinstance(unet, torch.nn.Module) else torch.empty(())
    x = torch.full((1, in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, context_dim), 0.5, device=p.device, dtype=p.dtype)
    stat = (unet(x, torch.tensor([999], device=p.device), context) - x).float().mean().item()
    return ("v_prediction" if stat < -1 else "epsilon"), stat
