#!/usr/bin/env python
"""Peak resident memory of one edit on the CPU (targets for a 512 px SD1.5-size edit: 8 GB in fp32, 4.5 GB in bf16).

    python scripts/cpu_memory.py --size 512 --steps 2 [--dtype auto] [--max-batch 64] [--json PATH]
    python scripts/cpu_memory.py --preset sdxl --size 1024 --steps 4 --threads 1 \
        --json docs/results/cpu_memory_sdxl.json

A --preset model (sd15, sdxl; tiny, tiny-sdxl for a smoke run) with random weights made directly in --dtype
(measure.random_model's distribution without its float32 copy, which is 13.9 GB for SDXL; auto: bf16 on a CPU with
native bf16, else fp32; diffedit.precision), the paper's defaults (r 0.8, n 10, strength 0.5, guidance 7.5) on the
astronaut (oracles.astronaut). The peak is the mask pass (2n latents in calls of n, at most --max-batch), which the
number of DDIM steps does not change, so few steps suffice (SDXL at 1024 px: 6.8 TFLOP a row). Reported: the
process's resident set with the weights loaded and the high-water mark over the edit above it (measure.PeakMemory:
VmHWM, reset through /proc/self/clear_refs), in MiB, and the UNet rows of the edit and of its largest call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles and measure.py
import oracles  # noqa: E402
from measure import ModuleCounter, PeakMemory, random_model
from diffedit.pipeline import DiffEdit
from diffedit.precision import DTYPES, resolve_dtype


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="image side in px (multiple of 64)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=64, help="most latents per UNet call")
    p.add_argument("--preset", "--model", default="sd15", help="model preset (sd15, sdxl; tiny, tiny-sdxl: smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="the networks' dtype")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.size < 64 or args.size % 64:
        raise SystemExit(f"cpu_memory: --size must be a multiple of 64, got {args.size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cpu = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, cpu)
    de = DiffEdit(random_model(args.preset, dtype=dtype), device=cpu, max_batch=args.max_batch)
    image = oracles.astronaut(args.size)
    t0 = time.perf_counter()
    calls = []
    with ModuleCounter(de.model.unet, on_rows=calls.append) as rows, PeakMemory(cpu) as mem:
        de.edit(image, oracles.TARGET, oracles.SOURCE, ratio=0.8, n=10, strength=0.5, steps=args.steps, guidance=7.5,
                seed=0)
    with_weights = mem.base / 2 ** 20
    out = {"preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "size": args.size, "steps": args.steps,
           "max_batch": args.max_batch, "unet_rows": rows.rows, "largest_unet_call_rows": max(calls),
           "threads": torch.get_num_threads(), "rss_with_weights_mib": round(with_weights),
           "peak_rss_mib": round(with_weights + mem.peak_mb), "peak_above_weights_mib": round(mem.peak_mb),
           "method": mem.method, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
