"""Which dtype the networks run in: ``"auto"`` picks the fastest one that keeps edits intact on the device.

    bf16 on a CPU with native bf16 (avx512_bf16 or AMX), fp16 on CUDA, fp32 otherwise.

Only the networks run in it: latents, the DDIM arithmetic and the mask's difference map stay in float32
(``latent_dtype``), so a bf16 UNet changes the noise estimates and nothing else.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (the /proc/cpuinfo flags, else oneDNN's own check)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
        return any(f in flags for f in _BF16_FLAGS)
    except OSError:  # not Linux
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def auto_dtype(device) -> tuple[torch.dtype, str]:
    """What "auto" means on ``device``, and why."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16, "CUDA"
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, "this CPU has native bf16"
    return torch.float32, f"no fast half precision known on {kind}"


def resolve_dtype(dtype, device) -> torch.dtype:
    """A torch dtype from a dtype, its name, or "auto" (``auto_dtype``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)[0]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def latent_dtype(network_dtype: torch.dtype) -> torch.dtype:
    """The dtype of latents and of the DDIM arithmetic: float32, or float64 when the networks run in float64."""
    return torch.float64 if network_dtype == torch.float64 else torch.float32
