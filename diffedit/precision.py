"""Which dtype the networks run in: ``"auto"`` picks the fastest one that keeps edits intact on the device.

    bf16 on a CPU with native bf16 (avx512_bf16 or AMX), fp16 on CUDA, fp32 otherwise.

Only the networks run in it: latents, the DDIM arithmetic and the mask's difference map stay in float32
(``latent_dtype``), so a bf16 UNet changes the noise estimates and nothing else.

A CPU without native bf16 emulates it, far slower than fp32: "auto" never picks it there, and bf16 asked for
explicitly on such a CPU logs a one-line warning (once per process). ``DIFFEDIT_NO_NATIVE_BF16=1`` in the
environment makes ``cpu_has_native_bf16`` answer False on any CPU, so that this path runs (and is tested) anywhere;
with ``ONEDNN_MAX_CPU_ISA=AVX2`` as well, oneDNN stops using the bf16 instructions too, and bf16 is as slow as there.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NO_NATIVE_BF16_ENV = "DIFFEDIT_NO_NATIVE_BF16"
# bf16 matmuls where the CPU emulates bf16, relative to fp32: a 2048^3 matmul on a 2-core AVX2-only AMD EPYC ran at
# 1.3 GFLOP/s in bf16 against 56-90 GFLOP/s in fp32, 43-69x (the design notes, "Machines differ").
EMULATED_BF16_SLOWDOWN = 50


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (the /proc/cpuinfo flags, else oneDNN's own check); False whenever
    DIFFEDIT_NO_NATIVE_BF16 is set to anything but "" or "0". Cached: call ``cache_clear()`` after changing it."""
    if os.environ.get(NO_NATIVE_BF16_ENV, "") not in ("", "0"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
        return any(f in flags for f in _BF16_FLAGS)
    except OSError:  # not Linux
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=1)
def warn_emulated_bf16() -> None:
    """The warning that bf16 is emulated on this CPU; once per process (cached: one line however often it is asked)."""
    log.warning("bfloat16 on a CPU without native bf16 (avx512_bf16 or AMX) is emulated: its matmuls run about %dx "
                "slower than float32's (dtype float32 or auto avoids it)", EMULATED_BF16_SLOWDOWN)


def auto_dtype(device) -> tuple[torch.dtype, str]:
    """What "auto" means on ``device``, and why."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16, "CUDA"
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, "this CPU has native bf16"
    return torch.float32, f"no fast half precision known on {kind}"


def native_dtypes(device) -> list[str]:
    """The dtypes ``device`` runs at full speed, by name: float32, then the half dtype "auto" picks there, if any
    (bf16 on a CPU with native bf16, fp16 on CUDA). The measuring scripts' default rows."""
    half = auto_dtype(device)[0]
    return ["float32"] + ([str(half).removeprefix("torch.")] if half != torch.float32 else [])


def resolve_dtype(dtype, device) -> torch.dtype:
    """A torch dtype from a dtype, its name, or "auto" (``auto_dtype``). bf16 asked for on a CPU without native bf16
    is granted, with a warning (``warn_emulated_bf16``)."""
    if dtype == "auto":
        return auto_dtype(device)[0]
    if not isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        warn_emulated_bf16()
    return dtype


def latent_dtype(network_dtype: torch.dtype) -> torch.dtype:
    """The dtype of latents and of the DDIM arithmetic: float32, or float64 when the networks run in float64."""
    return torch.float64 if network_dtype == torch.float64 else torch.float32
