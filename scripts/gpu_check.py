#!/usr/bin/env python
"""The checks for a day with a GPU: DiffEdit's speed, precision and memory at paper scale, in one run and one JSON.

    python scripts/gpu_check.py --json gpu.json [--compile]    # one H100 / H200: under 8 minutes
    python scripts/gpu_check.py --json dry.json --dry-run      # tiny sizes on any device (CPU here): under a minute

An SD1.5-size model with random weights (measure.random_model, seed 0: no weights can be downloaded) edits the
astronaut (oracles.astronaut) at 512 px with the paper's defaults: r 0.8, 50 DDIM steps, n 10, strength 0.5, CFG 7.5.
The JSON holds:
  matmul     the measured peak per half dtype: an 8192^3 matmul, TFLOP/s.
  edits      per dtype (float16, bfloat16) and mode: eager; with --compile also "compiled", torch.compile mode
             "reduce-overhead" (CUDA graphs), whose first edit (compile_s) pays the compilation. Each gives the median
             seconds over --repeats, UNet rows (sample evaluations) and calls, seconds per row, and the UNet's rate
             (rows x FLOPs of one row / time, the VAE and text encoder counted as overhead). It also gives the rate's
             fraction of that dtype's matmul peak and of the fp16 one.
  diffusers  diffusers' DiffEdit pipeline in fp16 on the same weights (oracles.diffusers_twin), with its defaults
             (200 rows at 50 steps), and speedup = its time / ours in fp16 eager (and compiled).
  agreement  fp16 and bf16 edits against the fp32 edit of the same inputs: mask IoU, output PSNR
             (measure.edit_agreement).
  memory     a 2048 px fp16 edit at 2 steps: peak memory above the weights (the mask pass of 2n rows at 256 x 256
             latents sets it), and seconds.
--dry-run: the tiny preset, 16 px (32 px for the memory row), 3 steps, n 2, a 128^3 matmul, on --device; the same
keys. It checks the script, not speed: on a CPU, fp16 (and bf16 without native bf16) is emulated, and on a shared CPU
its timings are noise (OMP_NUM_THREADS=1 keeps them from spinning).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles and measure.py
import oracles  # noqa: E402
from measure import ModuleCounter, PeakMemory, count_flops, edit_agreement, matmul_rate, random_model
from measure import timed, unet_inputs
from diffedit.pipeline import DiffEdit

HALF = ("float16", "bfloat16")


def sizes(dry_run: bool) -> dict:
    if dry_run:
        return dict(preset="tiny", px=16, steps=3, n=2, big_px=32, big_steps=2, matmul_n=128)
    return dict(preset="sd15", px=512, steps=50, n=10, big_px=2048, big_steps=2, matmul_n=8192)


def edit_fn(de: DiffEdit, image, s: dict, steps=None):
    return lambda: de.edit(image, oracles.TARGET, oracles.SOURCE, ratio=0.8, n=s["n"], strength=0.5,
                           steps=steps or s["steps"], guidance=7.5, seed=0)


def diffusers_fn(pipe, image, s: dict):
    """generate_mask + invert + __call__ with their defaults (10 maps unless n says otherwise, CFG 7.5 in all)."""
    def run():
        gen = torch.Generator("cpu").manual_seed(0)
        kw = dict(num_inference_steps=s["steps"], generator=gen)
        mask = pipe.generate_mask(image=image, source_prompt=oracles.SOURCE, target_prompt=oracles.TARGET,
                                  num_maps_per_mask=s["n"], **kw)
        latents = pipe.invert(prompt=oracles.SOURCE, image=image, **kw).latents
        return pipe(prompt=oracles.TARGET, mask_image=mask, image_latents=latents, negative_prompt=oracles.SOURCE,
                    **kw).images[0]
    return run


def timing(fn, unet, device, repeats: int, flops_per_row: int, peaks: dict, dtype: str) -> dict:
    """The first call (warm-up; compilation when compiled), then the median of ``repeats``, rows and rates."""
    with ModuleCounter(unet) as rows:
        first = timed(fn, device)
        rows.reset()
        times = [timed(fn, device) for _ in range(repeats)]
    t = statistics.median(times)
    count = {k: v // repeats for k, v in rows.get().items()}  # per edit
    rate = count["rows"] * flops_per_row / t / 1e12
    return {"time_s": t, "times_s": times, "first_s": first, "unet_rows": count["rows"], "unet_calls": count["calls"],
            "s_per_row": t / count["rows"], "unet_tflop_per_s": rate,
            "fraction_of_matmul": rate / peaks[dtype], "fraction_of_fp16_matmul": rate / peaks["float16"]}


def compiled_row(de: DiffEdit, dtype: str, edit_row) -> dict:
    """``edit_row(de, dtype)`` with de's UNet compiled in place (mode "reduce-overhead": CUDA graphs); the first edit pays the
    compilation (compile_s). The half-precision UNet's output is cast to float32 at once, so no graph output is
    held across replays. A failure is recorded, not raised: a GPU day is rare, the other figures still count."""
    try:
        r = edit_row(de.compile(mode="reduce-overhead"), dtype)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    r["compile_s"] = r.pop("first_s")
    return r


def memory_row(s: dict, device) -> dict:
    """Peak memory above the weights of a big_px fp16 edit at big_steps steps (the mask pass sets it)."""
    de = DiffEdit(random_model(s["preset"], device, torch.float16), device=device)
    with PeakMemory(device) as mem:
        t = timed(edit_fn(de, oracles.astronaut(s["big_px"]), s, s["big_steps"]), device)
    return {"px": s["big_px"], "steps": s["big_steps"], "dtype": "float16", "peak_above_weights_mb": mem.peak_mb,
            "method": mem.method, "time_s": t}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on any device, same keys")
    p.add_argument("--compile", action="store_true", help='also torch.compile(mode="reduce-overhead")')
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed edits after the first (default: 3; 1 dry)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.dry_run else 3)
    device, s = torch.device(args.device), sizes(args.dry_run)
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA device; --dry-run runs the tiny sizes on the CPU")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
           "torch": torch.__version__, "dry_run": args.dry_run, "compile": args.compile, **s,
           "settings": {"ratio": 0.8, "strength": 0.5, "guidance": 7.5, "seed": 0}}
    peaks = {d: matmul_rate(device, getattr(torch, d), s["matmul_n"]) / 1e12 for d in HALF}
    out["matmul"] = {"n": s["matmul_n"], "tflop_per_s": peaks}
    image = oracles.astronaut(s["px"])
    models = {d: DiffEdit(random_model(s["preset"], device, getattr(torch, d)), device=device)
              for d in ("float32", *HALF)}
    x, t, c = unet_inputs(models["float16"].cfg.unet, 2, s["px"] // models["float16"].cfg.vae.downsampling, device,
                          torch.float16)
    flops_per_row = count_flops(lambda: models["float16"].model.unet(x, t, c)) // 2
    out["unet_flops_per_row"] = flops_per_row

    with torch.no_grad():
        results = {d: edit_fn(de, image, s)() for d, de in models.items()}
    out["agreement"] = {f"{d}_vs_float32": edit_agreement([(results["float32"], results[d])]) for d in HALF}

    pipe = oracles.diffusers_twin(models["float16"], Path(tempfile.mkdtemp(prefix="diffedit-gpu-tok-")))
    row = lambda fn, unet, d: timing(fn, unet, device, args.repeats, flops_per_row, peaks, d)
    edit_row = lambda de, d: row(edit_fn(de, image, s), de.model.unet, d)
    out["edits"] = {d: {"eager": edit_row(models[d], d)} for d in HALF}
    theirs = row(diffusers_fn(pipe, image, s), pipe.unet, "float16")
    out["diffusers"] = {"float16": theirs,
                        "speedup": {"eager": theirs["time_s"] / out["edits"]["float16"]["eager"]["time_s"]}}
    del pipe
    print(f"eager done at {time.perf_counter() - start:.0f} s", flush=True)
    if args.compile:
        for d in HALF:
            out["edits"][d]["compiled"] = compiled_row(models[d], d, edit_row)
        if "time_s" in out["edits"]["float16"]["compiled"]:
            out["diffusers"]["speedup"]["compiled"] = theirs["time_s"] / out["edits"]["float16"]["compiled"]["time_s"]
        print(f"compiled done at {time.perf_counter() - start:.0f} s", flush=True)
    del models, results  # the 2048 px edit runs on a fresh eager fp16 model: a compiled one would compile anew
    out["memory"] = memory_row(s, device)
    out["total_s"] = time.perf_counter() - start
    text = json.dumps(out, indent=1)
    args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
