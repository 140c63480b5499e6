#!/usr/bin/env python
"""diffedit.StableDiffusionDiffEditPipeline against diffusers' StableDiffusionDiffEditPipeline: the same three calls
(generate_mask, invert, __call__), the same weights (diffusers' networks share our tensors), the same generator.

    python scripts/bench_diffusers_api.py --json docs/results/bench_diffusers_api.json   # SD1.5-size, 128 px, 10 steps
    python scripts/bench_diffusers_api.py --dry-run                                       # the tiny model, seconds

Contenders, each calling the three with diffusers' defaults (10 maps, mask strength 0.5, inpaint strength 0.8,
CFG 7.5; negative prompt = source in __call__, as in diffusers' docs) at --steps steps:
  * ``diffusers``: diffusers' deprecated pipeline;
  * ``ours``: ours with recipe "diffusers" (the default: the same images for the same generator);
  * ``ours_paper``: ours with recipe "paper" (no CFG in the mask or the inversion, one VAE encode).
Per dtype (fp32, and bf16 where ``precision.cpu_has_native_bf16()``), per call and in total: UNet rows (latents
through the UNet), VAE encoder rows, and the median wall time over --repeats rounds run in alternation (a shared
host's load hits all alike); ratios t(diffusers) / t(ours). ``speedup_auto``: diffusers at its default dtype (fp32)
against ours at dtype "auto" (bf16 on a CPU with native bf16). ``parity``: ours (recipe diffusers) against diffusers
in each dtype: mask equality and the largest pixel difference of the edit (0-255).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles and measure.py
import oracles  # noqa: E402
from diffedit import StableDiffusionDiffEditPipeline  # noqa: E402
from measure import ModuleCounter, interleaved, random_model, timed  # noqa: E402
from diffedit.pipeline import DiffEdit  # noqa: E402
from diffedit.precision import cpu_has_native_bf16  # noqa: E402

CALLS = ("generate_mask", "invert", "call")


def three_calls(pipe, image, steps: int, n: int) -> dict:
    """The three calls as diffusers' docs chain them, each a function returning its output."""
    state = {}

    def mask():
        getattr(pipe, "_posteriors", {}).clear()  # a new edit: no VAE encoding kept from the round before
        state["mask"] = pipe.generate_mask(image=image, source_prompt=oracles.SOURCE, target_prompt=oracles.TARGET,
                                           num_maps_per_mask=n, num_inference_steps=steps,
                                           generator=torch.Generator().manual_seed(0))
        return state["mask"]

    def invert():
        state["latents"] = pipe.invert(prompt=oracles.SOURCE, image=image, num_inference_steps=steps,
                                       generator=torch.Generator().manual_seed(1)).latents
        return state["latents"]

    def call():
        return pipe(prompt=oracles.TARGET, mask_image=state["mask"], image_latents=state["latents"],
                    negative_prompt=oracles.SOURCE, num_inference_steps=steps, output_type="np").images

    return {"generate_mask": mask, "invert": invert, "call": call}


def contenders(case: str, dtype: torch.dtype) -> dict:
    de = DiffEdit(random_model(case, "cpu", dtype), device="cpu")
    theirs = oracles.diffusers_twin(de, Path(tempfile.mkdtemp(prefix="diffedit-bench-tok-")))
    ours, paper = StableDiffusionDiffEditPipeline(de), StableDiffusionDiffEditPipeline(de, recipe="paper")
    for p in (ours, paper):
        p.set_progress_bar_config(disable=True)
    encoder = de.model.first_stage_model.encoder
    return {"diffusers": (theirs, theirs.unet, theirs.vae.encoder), "ours": (ours, de.model.unet, encoder),
            "ours_paper": (paper, de.model.unet, encoder)}


def run_dtype(case: str, dtype: torch.dtype, image, args, deadline: float) -> dict:
    pipes = contenders(case, dtype)
    out = {"parity": parity(pipes, image, args)}
    counts = {}
    for who, (p, unet, encoder) in pipes.items():  # the counts of one edit, per call (also a warm-up)
        counts[who] = {}
        for name, fn in three_calls(p, image, args.steps, args.n).items():
            with ModuleCounter(unet) as u, ModuleCounter(encoder) as v:
                fn()
            counts[who][name] = {"unet_rows": u.rows, "unet_calls": u.calls, "vae_encode_rows": v.rows}
    call_times: dict = {(who, c): [] for who in pipes for c in CALLS}

    def one_round(who):  # the three calls in order (each needs the one before), each timed
        fns = three_calls(pipes[who][0], image, args.steps, args.n)
        for c in CALLS:
            call_times[(who, c)].append(timed(fns[c]))

    totals = interleaved({who: (lambda who=who: one_round(who)) for who in pipes}, "cpu", args.repeats, warmup=0,
                         deadline=deadline)
    for who in pipes:
        out[who] = {c: {**counts[who][c], "time_s": statistics.median(call_times[(who, c)])} for c in CALLS}
        out[who]["total"] = {k: sum(out[who][c][k] for c in CALLS) for k in ("unet_rows", "vae_encode_rows")}
        out[who]["total"]["time_s"] = statistics.median(totals[who])
    for who in ("ours", "ours_paper"):
        out[f"speedup_{who}"] = {c: out["diffusers"][c]["time_s"] / out[who][c]["time_s"] for c in (*CALLS, "total")}
    out["repeats_done"] = len(totals["diffusers"])
    return out


def parity(pipes: dict, image, args) -> dict:
    """Ours (recipe diffusers) against diffusers with the same generators: masks and edits."""
    res = {who: [f() for f in three_calls(pipes[who][0], image, args.steps, args.n).values()]
           for who in ("diffusers", "ours")}
    (m_ref, _, img_ref), (m, _, img) = res["diffusers"], res["ours"]
    inter, union = (m.astype(bool) & m_ref.astype(bool)).sum(), (m.astype(bool) | m_ref.astype(bool)).sum()
    return {"mask_equal": bool(np.array_equal(m, m_ref)), "mask_iou": float(inter / max(union, 1)),
            "mask_pixels": int(m_ref.sum()), "image_max_diff_255": float(np.abs(img - img_ref).max() * 255)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="sd15", help="a preset with random weights (SD1-style text): sd15, tiny")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--n", type=int, default=10, help="num_maps_per_mask")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (median reported)")
    p.add_argument("--budget-s", type=float, default=1500, help="stop adding rounds past this many seconds")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 on a loaded host)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="the tiny model, 32 px, 2 steps, 2 maps, one round")
    args = p.parse_args(argv)
    if args.dry_run:
        args.case, args.size, args.steps, args.n, args.repeats = "tiny", 32, 2, 2, 1
        args.threads = args.threads or 1  # tiny kernels: a second thread only adds synchronisation
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    image = oracles.astronaut(args.size)
    deadline = time.perf_counter() + args.budget_s
    result = {"case": args.case, "image_px": args.size, "steps": args.steps, "n": args.n, "inpaint_strength": 0.8,
              "guidance_scale": 7.5, "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dtypes": {}}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        with contextlib.redirect_stderr(sys.stdout) if args.dry_run else contextlib.nullcontext():
            result["dtypes"][name] = run_dtype(args.case, dtype, image, args, deadline)
        r = result["dtypes"][name]
        print(f"{name}: total {r['diffusers']['total']['time_s']:.2f} s diffusers, "
              f"{r['ours']['total']['time_s']:.2f} s "
              f"ours ({r['speedup_ours']['total']:.2f}x), {r['ours_paper']['total']['time_s']:.2f} s paper "
              f"({r['speedup_ours_paper']['total']:.2f}x); UNet rows {r['diffusers']['total']['unet_rows']} / "
              f"{r['ours']['total']['unet_rows']} / {r['ours_paper']['total']['unet_rows']}; VAE encodes "
              f"{r['diffusers']['total']['vae_encode_rows']} / {r['ours']['total']['vae_encode_rows']} / "
              f"{r['ours_paper']['total']['vae_encode_rows']}; parity {r['parity']}")
    auto = "bfloat16" if "bfloat16" in result["dtypes"] else "float32"
    d = result["dtypes"]
    result["speedup_auto"] = {"ours_dtype": auto, "ours": d["float32"]["diffusers"]["total"]["time_s"]
                              / d[auto]["ours"]["total"]["time_s"],
                              "ours_paper": d["float32"]["diffusers"]["total"]["time_s"]
                              / d[auto]["ours_paper"]["total"]["time_s"]}
    print(f"auto dtype ({auto}) against diffusers fp32: {result['speedup_auto']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
