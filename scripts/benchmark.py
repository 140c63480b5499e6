#!/usr/bin/env python
"""Our DiffEdit against diffusers' StableDiffusionDiffEditPipeline: same process, same weights, same inputs.

    python scripts/benchmark.py --device cpu --json bench_cpu.json          # 128 px, 10 steps, fp32 (and bf16)
    python scripts/benchmark.py --cases toy --repeats 1 --matmul-n 256       # quick: the toy model, seconds
    python scripts/benchmark.py --device cuda --json bench_gpu.json          # 512 px, 50 steps, fp32 and fp16

Runs, per case (``toy``: the packaged toy model, 64 px; ``sd15``: an SD1.5-size model, random weights):
  * ``ours_default``: the paper-faithful edit, ``de.edit(image, target, source, ratio=0.8, n=10, strength=0.5,
    steps, guidance=7.5)``;
  * ``ours_matched``: the same with ``compat="diffusers"`` (CFG inversion under the source prompt, diffusers'
    blending): the same settings and the same DDIM steps as diffusers';
  * ``diffusers``: ``generate_mask`` + ``invert`` + ``__call__`` with their defaults (10 maps, mask strength 0.5,
    inpaint strength 0.8, CFG 7.5 in all three; negative prompt = source in ``__call__``, as in its docs example)
    and the same step count.
Each case runs the three in every dtype of --dtype, a comma list. The default is the dtypes the device runs natively
(precision.native_dtypes): fp32, and bf16 on a CPU with native bf16 (elsewhere bf16 is emulated, far slower; ask for
it with --dtype, and a warning says so); fp32 and fp16 on CUDA. The figures:
  speedup_default       t(diffusers at its documented default dtype: fp32 on a CPU, fp16 on CUDA)
                        / t(ours_default at ours, dtype "auto": bf16 on a CPU with native bf16, fp16 on CUDA,
                        else fp32; ``dtype_default`` says which);
  speedup_matched       t(diffusers) / t(ours_matched), both in fp32;
  speedup_matched_bf16  (or _fp16) the same in half precision.
A figure is null when its dtypes were not run. In bf16 on a CPU our UNet's weights are channels-last
(``DiffEdit(channels_last="auto")``). The diffusers twin shares those tensors, so its convolutions get the same layout.

What "matched" means, in UNet sample evaluations ("rows": one latent through the UNet; a call may hold many),
with k = round(0.8 * steps) decoding steps (= diffusers' int(0.8 * steps) for the step counts used here):
    ours_default   mask 2n (Q and R, no CFG)       + inversion k (no CFG)  + decoding 2k (CFG)  = 2n + 3k
    ours_matched   mask 2n                          + inversion 2k (CFG)    + decoding 2k        = 2n + 4k
    diffusers      mask 4n (Q, R, each with CFG)   + inversion 2k          + decoding 2k        = 4n + 4k
so "matched" has the same inversion and decoding work; the mask pass still costs 2n rows against 4n (diffusers'
mask CFG only rescales D, which the normalisation cancels). n = 10: 140 / 180 / 200 rows at 50 steps, 44 / 52 / 72 at
10. VAE: ours encodes once (posterior mean); diffusers encodes n + 1 images (a batch of n in generate_mask, one in
invert); both decode once. All counts are measured (forward pre-hooks on the UNet, VAE encoder and decoder of both)
and reported next to the times.

The tools are ``diffedit.measure``'s (counters, peak memory, timing, rates, random weights) and the oracles are
``oracles``' (the diffusers twin on our weights, the offline CLIP tokenizer, the astronaut photograph).

Timing: one warm-up run of each (--warmup-steps steps), then --repeats rounds of all the runs of a case (every
dtype) in alternation, so that a change in a shared host's load hits them alike, and the median of each (fewer
rounds if --budget-s would be exceeded: the number done is reported). Peak memory (measure.PeakMemory): CUDA:
torch.cuda.max_memory_allocated() above the memory allocated before the run. CPU: the resident-set high-water mark
(VmHWM, reset before each run through /proc/self/clear_refs after malloc_trim(0)) above the resident set before the
run.

FLOP rate: the FLOPs of one UNet forward of a CFG pair (batch 2, the commonest call) counted by
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention), divided by its median wall time, against
the rate of a large square matmul in the same dtype on the same device (the practical peak), measured in the same run
right after the case's forwards of that dtype (a shared host's speed drifts over minutes; one rate from the start can
halve the ratio).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles and measure.py
import oracles  # noqa: E402
from measure import (ModuleCounter, PeakMemory, flop_rate, interleaved, matmul_rate, random_model, timed,  # noqa: E402
                     tune_malloc, unet_inputs)
from diffedit import images  # noqa: E402
from diffedit.pipeline import DiffEdit  # noqa: E402
from diffedit.plan import Input, Request  # noqa: E402
from diffedit.settings import EditSettings  # noqa: E402
from diffedit.precision import native_dtypes, resolve_dtype

N, STRENGTH, RATIO, GUIDANCE, SEED = 10, 0.5, 0.8, 7.5, 0


def toy_edit():
    """A toy-world scene with its source and target captions (the toy model's own kind of edit)."""
    import numpy as np
    from PIL import Image
    from diffedit.toy import world
    e = world.sample_edit(np.random.default_rng(SEED), size=world.SIZE)
    return Image.fromarray(e.source.render()), e.source_caption, e.target_caption


def edit_runs(de: DiffEdit, pipe, image, source: str, target: str, steps: int) -> dict:
    """The three timed runs, each a function of the step count."""
    def ours(compat):
        return lambda steps=steps: de.edit(image, target, source, ratio=RATIO, n=N, strength=STRENGTH, steps=steps,
                                           guidance=GUIDANCE, seed=SEED, compat=compat)

    def theirs(steps=steps):
        gen = torch.Generator("cpu").manual_seed(SEED)
        mask = pipe.generate_mask(image=image, source_prompt=source, target_prompt=target,
                                  num_inference_steps=steps, generator=gen)
        inv = pipe.invert(prompt=source, image=image, num_inference_steps=steps, generator=gen).latents
        return pipe(prompt=target, mask_image=mask, image_latents=inv, negative_prompt=source,
                    num_inference_steps=steps, generator=gen).images[0]

    return {"ours_default": ours(None), "ours_matched": ours("diffusers"), "diffusers": theirs}


def planned_rows(de: DiffEdit, image, source: str, target: str, steps: int, compat) -> int:
    """The UNet rows our edit runs, from the engine's plan."""
    s = EditSettings(ratio=RATIO, n=N, strength=STRENGTH, steps=steps, guidance=GUIDANCE, seed=SEED, compat=compat)
    pixels = images.to_tensor(image, de.multiple, de.device, de.dtype)
    return de.engine().plan([Input(pixels)], [Request(0, target, source, s)]).cost.rows


def run_case(contenders: dict, image, source: str, target: str, args, device, budget_end: float) -> dict:
    """Every run of a case in every dtype, timed in alternation; ``contenders``: dtype name -> (DiffEdit, twin)."""
    runs = {(d, key): fn for d, (de, pipe) in contenders.items()
            for key, fn in edit_runs(de, pipe, image, source, target, args.steps).items()}
    result = {key: {"times_s": [], "warmup_s": timed(lambda: fn(args.warmup_steps), device)}
              for key, fn in runs.items()}
    modules = {"unet": [], "vae_encode": [], "vae_decode": []}
    for de, pipe in contenders.values():
        vae = de.model.first_stage_model
        for what, ours, theirs in (("unet", de.model.unet, pipe.unet), ("vae_encode", vae.encoder, pipe.vae.encoder),
                                   ("vae_decode", vae.decoder, pipe.vae.decoder)):
            modules[what] += [ours, theirs]
    with contextlib.ExitStack() as stack:  # one counter per network over all its copies (one run at a time)
        counters = {what: stack.enter_context(ModuleCounter(*ms)) for what, ms in modules.items()}

        @contextlib.contextmanager
        def watched(key):  # one timed run: its counts and its peak memory
            for c in counters.values():
                c.reset()
            with PeakMemory(device) as mem:
                yield
            r = result[key]
            r["peak_mem_mb"] = max(r.get("peak_mem_mb", 0.0), mem.peak_mb)
            r["peak_mem_method"] = mem.method
            r.update({what: c.get() for what, c in counters.items()})

        times = interleaved(runs, device, args.repeats, warmup=0, deadline=budget_end, around=watched)
    k = round(RATIO * args.steps)
    de = next(iter(contenders.values()))[0]
    expected = {"ours_default": planned_rows(de, image, source, target, args.steps, None),
                "ours_matched": planned_rows(de, image, source, target, args.steps, "diffusers"),
                "diffusers": 4 * N + 4 * k}  # its mask pass runs CFG (4n rows); its inversion CFG too
    for (d, key), r in result.items():
        r["times_s"] = times[(d, key)]
        r["time_s"] = statistics.median(times[(d, key)])
        r["unet"]["expected_rows"] = expected[key]
    by_dtype = {}
    for d, (de, pipe) in contenders.items():
        r = {key: result[(d, key)] for key in expected}
        by_dtype[d] = {"runs": r, "speedup_default_same_dtype": r["diffusers"]["time_s"] / r["ours_default"]["time_s"],
                       "speedup_matched": r["diffusers"]["time_s"] / r["ours_matched"]["time_s"],
                       "unet_forward": unet_forward(de, pipe, image.size[1] // de.cfg.vae.downsampling, device,
                                                    args.matmul_n)}
    return {"image_px": list(image.size), "steps": args.steps, "ratio": RATIO, "n": N, "strength": STRENGTH,
            "guidance": GUIDANCE, "repeats_done": len(next(iter(times.values()))), "dtypes": by_dtype,
            **speedups(by_dtype, args.dtype_default, args.diffusers_dtype)}


def speedups(by_dtype: dict, ours: str, theirs: str) -> dict:
    """The headline ratios of a case; None where a dtype they need was not run."""
    def matched(d):
        return by_dtype[d]["speedup_matched"] if d in by_dtype else None
    default = None
    if ours in by_dtype and theirs in by_dtype:
        default = by_dtype[theirs]["runs"]["diffusers"]["time_s"] / by_dtype[ours]["runs"]["ours_default"]["time_s"]
    return {"speedup_default": default, "speedup_matched": matched("float32"),
            "speedup_matched_bf16": matched("bfloat16"), "speedup_matched_fp16": matched("float16")}


def unet_forward(de: DiffEdit, pipe, side: int, device, mm_n: int) -> dict:
    """One UNet forward of a CFG pair, ours and diffusers', at this case's latent size: FLOPs, time, rate, and its
    fraction of the matmul peak in this dtype, measured right after (a shared host's speed drifts over minutes)."""
    x, t, c = unet_inputs(de.cfg.unet, 2, side, device, de.dtype)
    fwd = {"batch": 2, "latent": [side, side], "ours": flop_rate(lambda: de.model.unet(x, t, c), device),
           "diffusers": flop_rate(lambda: pipe.unet(x, t, encoder_hidden_states=c), device),
           "matmul_tflop_per_s": matmul_rate(device, de.dtype, mm_n) / 1e12}
    for who in ("ours", "diffusers"):
        fwd[who]["fraction_of_matmul"] = fwd[who]["tflop_per_s"] / fwd["matmul_tflop_per_s"]
    return fwd


def load_case(case: str, args, device):
    """({dtype name: (DiffEdit, diffusers twin)}, image, source, target) of a case, or why it is skipped."""
    if case == "toy":
        from diffedit.checkpoint import _toy_path
        if not _toy_path().is_file():
            return f"{_toy_path()} does not exist (train it: scripts/train_toy.py)"
        load = lambda dtype: DiffEdit.from_pretrained("toy", device=device, dtype=dtype)
        image, source, target = toy_edit()
    elif case == "sd15":
        load = lambda dtype: DiffEdit(random_model("sd15", device, dtype), device=device)
        image, source, target = oracles.astronaut(args.size), oracles.SOURCE, oracles.TARGET
    else:
        raise SystemExit(f"unknown case {case!r}: choose from toy, sd15")
    contenders = {}
    for d in args.dtypes:
        de = load(getattr(torch, d))
        if args.channels_last:
            de.model.unet.to(memory_format=torch.channels_last)
        if args.compile:
            de.compile()
        contenders[d] = (de, oracles.diffusers_twin(de, Path(tempfile.mkdtemp(prefix="diffedit-bench-tok-"))))
    return contenders, image, source, target


def parse_args(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None,
                   help="comma list of dtypes every case runs in (auto, float32, float16, bfloat16); default: the "
                        "device's native ones: float32 (and bfloat16 where the CPU has native bf16) on cpu, "
                        "float32,float16 on cuda")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--size", type=int, default=None, help="SD1.5 case image side (default: 128 cpu, 512 cuda)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 10 cpu, 50 cuda)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--cases", default="toy,sd15")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop repeating once this many seconds would be exceeded (default: 900 cpu, none cuda)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="DDIM steps of the warm-up runs (default: 2 on cpu, --steps on cuda)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="cpu: keep glibc's default mmap threshold (see diffedit.measure.tune_malloc)")
    p.add_argument("--channels-last", action="store_true",
                   help="our UNet in channels_last memory format in every dtype (default: bf16 on a CPU only)")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (DiffEdit.compile())")
    p.add_argument("--matmul-n", type=int, default=None,
                   help="side of the square matmul that measures the peak (default: 2048 cpu, 8192 cuda; small for "
                        "a quick run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    names = args.dtype.split(",") if args.dtype else native_dtypes(device)
    try:
        dtypes = [str(resolve_dtype(name.strip(), device)).removeprefix("torch.") for name in names if name.strip()]
    except ValueError as e:
        p.error(f"--dtype: {e}")
    args.dtypes = list(dict.fromkeys(dtypes))
    args.dtype_default = str(resolve_dtype("auto", device)).removeprefix("torch.")
    args.diffusers_dtype = "float32" if cpu else "float16"  # diffusers' documented default on each device
    args.size = args.size or (128 if cpu else 512)
    args.steps = args.steps or (10 if cpu else 50)
    args.warmup_steps = args.warmup_steps or (2 if cpu else args.steps)
    args.budget_s = args.budget_s if args.budget_s is not None else (900.0 if cpu else float("inf"))
    args.matmul_n = args.matmul_n or (2048 if cpu else 8192)
    return args


def summary(case: str, res: dict) -> str:
    lines = [f"{case}: {res['image_px'][0]} px, {res['steps']} steps, {res['repeats_done']} repeats | speedup default "
             f"{res['speedup_default'] or float('nan'):.2f}"]
    for d, r in res["dtypes"].items():
        fwd = r["unet_forward"]["ours"]
        lines.append(f"  {d}: " + " | ".join(
            f"{k} {v['time_s']:.2f}s {v['unet']['rows']} rows/{v['unet']['calls']} calls enc {v['vae_encode']['rows']} "
            f"dec {v['vae_decode']['rows']} peak {v['peak_mem_mb']:.0f}MB" for k, v in r["runs"].items())
            + f" | speedup matched {r['speedup_matched']:.2f} | UNet fwd {fwd['tflop_per_s']:.3f} TFLOP/s = "
            f"{fwd['fraction_of_matmul']:.2f} of matmul")
    return "\n".join(lines)


DEFINITIONS = {
    "speedup_default": "t(diffusers: generate_mask + invert + __call__, defaults, in its documented default dtype: "
                       "float32 on a CPU, float16 on CUDA) / t(ours: paper-faithful edit, dtype auto = dtype_default)",
    "speedup_matched": "t(diffusers) / t(ours, compat='diffusers'), both float32: same steps and CFG inversion; our "
                       "mask pass still evaluates 2n rows where diffusers' evaluates 4n (expected_rows per run)",
    "speedup_matched_bf16": "speedup_matched with both in bfloat16 (speedup_matched_fp16: float16)",
    "speedup_default_same_dtype": "per dtype: t(diffusers) / t(ours paper-faithful), both in that dtype",
    "unet_flop_rate_fraction": "FLOPs of one UNet forward of a CFG pair (batch 2) / its median time, over the "
                               "median-of-5 rate of a large square matmul in the same dtype on the same device, "
                               "measured right after the case's forwards; the headline is ours in dtype_default",
    "rows": "UNet sample evaluations (latents through the UNet); calls: UNet invocations",
    "peak_mem_mb": "peak memory above what was in use before the run (weights excluded)"}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "default"
    if cpu:
        torch.set_flush_denormal(True)  # random weights can produce denormals, which are slow on x86
        malloc = "glibc default" if args.no_malloc_tuning else tune_malloc()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    import diffusers
    out = {"device": args.device, "dtypes": args.dtypes, "dtype_default": args.dtype_default,
           "diffusers_dtype_default": args.diffusers_dtype,
           "device_name": torch.cuda.get_device_name(device) if not cpu else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_allocator": malloc,
           "loadavg_start": list(os.getloadavg()),
           "note": ("CPU timings on a shared machine: other jobs (e.g. a training run) may hold cores, so compare "
                    "ratios and the matmul peak measured in this same run, not absolute times") if cpu else "",
           "cases": {}, "diffusers": diffusers.__version__}
    out["matmul"] = {"n": args.matmul_n, "tflop_per_s": {}}
    for d in args.dtypes:
        out["matmul"]["tflop_per_s"][d] = matmul_rate(device, getattr(torch, d), args.matmul_n) / 1e12
        print(f"matmul {args.matmul_n}^3 {d}: {out['matmul']['tflop_per_s'][d]:.3f} TFLOP/s", flush=True)

    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        t0 = time.perf_counter()
        loaded = load_case(case, args, device)
        if isinstance(loaded, str):
            out["cases"][case] = {"skipped": loaded}
            print(f"{case}: skipped, {loaded}", flush=True)
            continue
        contenders, image, source, target = loaded
        res = run_case(contenders, image, source, target, args, device, start + args.budget_s)
        res["setup_and_total_s"] = time.perf_counter() - t0
        res["warmup_steps"] = args.warmup_steps
        res["prompts"] = {"source": source, "target": target}
        out["cases"][case] = res
        print(summary(case, res), flush=True)
        del contenders, loaded

    out["headline_case"] = "sd15" if "dtypes" in out["cases"].get("sd15", {}) else "toy"
    main_case = out["cases"].get(out["headline_case"], {})
    out.update({k: main_case.get(k) for k in ("speedup_default", "speedup_matched", "speedup_matched_bf16",
                                              "speedup_matched_fp16")})
    fractions = {d: r["unet_forward"]["ours"]["fraction_of_matmul"] for d, r in main_case.get("dtypes", {}).items()}
    out["unet_flop_rate_fraction"] = fractions.get(args.dtype_default)
    out["unet_flop_rate_fraction_by_dtype"] = fractions
    out["total_s"] = time.perf_counter() - start
    out["loadavg_end"] = list(os.getloadavg())
    out["definitions"] = DEFINITIONS
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
