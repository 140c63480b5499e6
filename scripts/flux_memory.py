#!/usr/bin/env python
"""Peak resident memory of the FLUX.1 transformer at its real size, with and without float8 storage, and the
estimate for a 1024 px edit.

    python scripts/flux_memory.py --threads 2 --json docs/results/flux_cpu_memory.json
    python scripts/flux_memory.py --preset tiny-flux --text-tokens 8 --json /tmp/f.json   # a smoke run

Random weights (uniform, fan-in scaled) made layer by layer straight into their dtype, on the --preset transformer
(flux-dev: 19 double and 38 single blocks, 3072 wide). Two runs of the same calls (the transformer on a --latent x
--latent latent with --text-tokens T5 tokens, at 1 and 2 rows): ``float8``: every Linear's weight stored in float8
(e4m3fn) and upcast per call (models.flux.StoredLinear), the whole transformer resident; ``bf16`` (the compute dtype,
auto: bf16 where native, else fp32): the weights in the compute dtype, too large to hold with the rest on a 24 GB
machine, so each block is made just before it runs and freed after (its bytes are in the peak above the resident
weights, and are taken out of the activations). Attention runs in PyTorch's fused kernel, linear in the tokens, so
the activations grow with rows x tokens: the 1024 px estimate scales the measured per-row increase to the largest
call of a default edit (--rows rows of 4096 image + 512 text tokens). Resident set: measure.PeakMemory (VmHWM).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # measure.py
from measure import PeakMemory, _status_kb  # noqa: E402
from diffedit.models import PRESETS
from diffedit.models.flux import Flux, keep_stored
from diffedit.precision import DTYPES, resolve_dtype

F8 = torch.float8_e4m3fn
MIB = 2 ** 20
POOL = 2 ** 24  # random numbers drawn once
# The parts of an edit beside the transformer, in parameters (CLIP-L text, T5-v1.1-XXL encoder, the 16-channel VAE)
OTHERS = {"clip_l": 123_060_480, "t5xxl": 4_762_310_656, "vae": 83_819_683}


def materialize_(module: nn.Module, dtype: torch.dtype, float8: bool, seed: int) -> nn.Module:
    """Give ``module``'s meta parameters random values in ``dtype`` (Linear weights in float8 when ``float8``), one
    tensor at a time, so no copy of the whole in a wider dtype ever exists. The values are cut from one random pool
    at random offsets, scaled by 1 / sqrt(fan-in) (drawing 12 billion numbers would take longer than the run)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL, dtype=dtype).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if p.ndim == 1 and name == "scale":
                t = torch.ones(p.shape, dtype=dtype)
            else:
                if p.numel() < POOL:
                    start = int(torch.randint(0, POOL - p.numel(), (), generator=g))
                    t = pool[start:start + p.numel()]
                else:
                    t = pool.roll(int(torch.randint(0, POOL, (), generator=g))).repeat(-(-p.numel() // POOL))
                t = (t[:p.numel()] * (1 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.02)).reshape(p.shape)
            stored = float8 and type(m) is nn.Linear and name == "weight"
            setattr(m, name, nn.Parameter(t.to(F8) if stored else t, requires_grad=False))
    keep_stored(module)
    return module


def one_block_at_a_time(flux: Flux, dtype: torch.dtype) -> None:
    """Make each block just before it runs and free it after (back to the meta device)."""
    for i, block in enumerate([*flux.double_blocks, *flux.single_blocks]):
        block.register_forward_pre_hook(lambda b, args, i=i: materialize_(b, dtype, False, 1000 + i) and None)
        block.register_forward_hook(lambda b, args, out: b.to_empty(device="meta") and None)


def inputs(cfg, rows: int, latent: int, text_tokens: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cfg.in_channels // 4, latent, latent, generator=g).to(dtype)
    context = torch.randn(rows, text_tokens, cfg.context_in_dim, generator=g).to(dtype)
    y = torch.randn(rows, cfg.vec_in_dim, generator=g).to(dtype)
    return x, torch.full((rows,), 500.0), context, y, torch.full((rows,), 3.5) if cfg.guidance_embed else None


def block_bytes(cfg, dtype: torch.dtype) -> int:
    """The largest block's bytes in ``dtype`` (a double block)."""
    with torch.device("meta"):
        flux = Flux(cfg)
    size = torch.empty((), dtype=dtype).element_size()
    return max(sum(p.numel() for p in b.parameters()) * size for b in [*flux.double_blocks, *flux.single_blocks])


@torch.no_grad()
def measure(cfg, mode: str, dtype: torch.dtype, latent: int, text_tokens: int) -> dict:
    """Resident set with the weights, and the peak above it for calls of 1 and 2 rows, in MiB."""
    before = (_status_kb("VmRSS") or 0) * 1024
    with torch.device("meta"):
        flux = Flux(cfg).eval()
    if mode == "float8":
        materialize_(flux, dtype, True, 0)
    else:  # everything but the blocks now; the blocks during the call
        for part in (flux.img_in, flux.time_in, flux.vector_in, flux.txt_in, flux.final_layer,
                     *([flux.guidance_in] if cfg.guidance_embed else [])):
            materialize_(part, dtype, False, 0)
        one_block_at_a_time(flux, dtype)
    resident = [p for p in flux.parameters() if not p.is_meta]
    out = {"resident_parameter_mib": round(sum(p.numel() * p.element_size() for p in resident) / MIB),
           "float8_parameters": sum(p.numel() for p in resident if p.dtype == F8),
           "rss_with_weights_mib": round((_status_kb("VmRSS") or 0) * 1024 / MIB),
           "rss_before_weights_mib": round(before / MIB)}
    for rows in (1, 2):
        t0 = time.perf_counter()
        args = inputs(cfg, rows, latent, text_tokens, dtype)
        with PeakMemory("cpu") as mem:
            v = flux(*args)
        assert torch.isfinite(v).all(), "non-finite velocity"
        out[f"peak_above_weights_mib_{rows}_row{'s' * (rows > 1)}"] = round(mem.peak_mb)
        out[f"seconds_{rows}_row{'s' * (rows > 1)}"] = round(time.perf_counter() - t0, 1)
    del flux, resident
    return out


def estimate(cfg, runs: dict, dtype: torch.dtype, tokens: int, rows: int) -> dict:
    """Peak resident memory of a 1024 px edit in MiB: the runtime, every weight, and the transformer's largest call
    (the measured activations of one row plus the per-row increase, scaled by tokens and rows)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in Flux(cfg).parameters())
    size = torch.empty((), dtype=dtype).element_size()
    others = sum(OTHERS.values()) * size
    out = {}
    for mode, r in runs.items():
        # Activations do not depend on how weights are stored: read them off the float8 run where there is one, whose
        # peak holds no block being made (the one-at-a-time run's also holds a block's bytes and their temporaries).
        a = runs.get("float8", r)
        block = block_bytes(cfg, dtype) / MIB if a is not runs.get("float8") else 0
        one, two = a["peak_above_weights_mib_1_row"] - block, a["peak_above_weights_mib_2_rows"] - block
        per_row, base = max(two - one, 0), max(2 * one - two, 0)
        activations = base + per_row * rows * tokens["1024"] / tokens["measured"]
        weights = (n if mode == "float8" else n * size) / MIB  # float8: one byte each (the non-Linear rest is small)
        runtime = r["rss_before_weights_mib"]
        out[mode] = {"transformer_weights_mib": round(weights), "others_weights_mib": round(others / MIB),
                     "runtime_mib": runtime, "activations_mib": round(activations),
                     "peak_rss_mib": round(runtime + weights + others / MIB + activations),
                     "peak_rss_without_t5_mib": round(runtime + weights + (others - OTHERS["t5xxl"] * size) / MIB
                                                      + activations)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-dev", help="the transformer's size (flux-dev, flux-schnell; tiny-flux)")
    p.add_argument("--latent", type=int, default=16, help="latent side (16: a 128 px image, 64 image tokens)")
    p.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (dev: 512)")
    p.add_argument("--rows", type=int, default=20, help="rows of the largest call at 1024 px (mask pass: 2n, n 10)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="the compute dtype")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.latent < 2 or args.latent % 2:
        raise SystemExit(f"flux_memory: --latent must be even, got {args.latent}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cfg, dtype = PRESETS[args.preset].flux, resolve_dtype(args.dtype, "cpu")
    tokens = {"measured": (args.latent // 2) ** 2 + args.text_tokens, "1024": 64 * 64 + 512}
    runs = {mode: measure(cfg, mode, dtype, args.latent, args.text_tokens)
            for mode in ("float8", str(dtype).removeprefix("torch."))}
    out = {"what": "FLUX.1 transformer on the CPU, random weights: resident set with the weights and the peak above "
                   "it for one call of 1 and 2 rows; float8: Linear weights stored in float8_e4m3fn, upcast per call, "
                   "all blocks resident; the compute dtype's run: blocks made and freed one at a time (one block's "
                   "bytes in its peak). Estimate: a 1024 px edit's peak = runtime + all weights (T5-XXL, CLIP-L, VAE "
                   "in the compute dtype) + the largest call's activations (per-row increase x rows x tokens).",
           "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "latent": args.latent,
           "text_tokens": args.text_tokens, "tokens": tokens, "rows_at_1024": args.rows,
           "threads": torch.get_num_threads(), "method": "tests/measure.py PeakMemory (/proc/self/status VmHWM)",
           "measured": runs, "estimate_1024px_mib": estimate(cfg, runs, dtype, tokens, args.rows)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
