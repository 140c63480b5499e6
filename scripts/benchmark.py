#!/usr/bin/env python
"""Our DiffEdit against diffusers' StableDiffusionDiffEditPipeline: same process, same weights, same inputs.

    python scripts/benchmark.py --device cpu --json bench_cpu.json          # 128 px, 10 steps (minutes)
    python scripts/benchmark.py --device cuda --dtype float16 --json bench_gpu.json  # 512 px, 50 steps

Runs, per case (``toy``: the packaged toy model, 64 px; ``sd15``: an SD1.5-size model, random weights):
  * ``ours_default``: the paper-faithful edit, ``de.edit(image, target, source, ratio=0.8, n=10, strength=0.5,
    steps, guidance=7.5)``;
  * ``ours_matched``: the same with ``compat="diffusers"`` (CFG inversion under the source prompt, diffusers'
    blending): the same settings and the same DDIM steps as diffusers';
  * ``diffusers``: ``generate_mask`` + ``invert`` + ``__call__`` with their defaults (10 maps, mask strength 0.5,
    inpaint strength 0.8, CFG 7.5 in all three; negative prompt = source in ``__call__``, as in its docs example)
    and the same step count.
speedup_default = t(diffusers) / t(ours_default); speedup_matched = t(diffusers) / t(ours_matched).

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

Timing: one warm-up run of each, then the median of --repeats runs (fewer if --budget-s would be exceeded: the
number done is reported). Peak memory: CUDA: torch.cuda.max_memory_allocated() above the memory allocated before
the run. CPU: the resident-set high-water mark (VmHWM in /proc/self/status, reset before each run by writing 5 to
/proc/self/clear_refs, after malloc_trim(0) hands the heap's free pages back) above the resident set before the run;
tracemalloc would miss torch's allocations, and psutil has no peak on Linux.

FLOP rate: the FLOPs of one UNet forward of a CFG pair (batch 2, the commonest call) counted by
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention), divided by its median wall time, against
the rate of a large square matmul in the same dtype on the same device (the practical peak), measured in the same run
right after the case's forwards (a shared host's speed drifts over minutes; one rate from the start can halve the ratio).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from diffedit.models import StableDiffusion, preset
from diffedit.pipeline import DiffEdit

N, STRENGTH, RATIO, GUIDANCE, SEED = 10, 0.5, 0.8, 7.5, 0
SOURCE, TARGET = "a photo of an astronaut", "a photo of a robot in a spacesuit"
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


# --- inputs and models ----------------------------------------------------------------------------------------------

def astronaut(side: int):
    from PIL import Image
    try:
        from skimage import data
        pil = Image.fromarray(data.astronaut())
    except ImportError:  # a synthetic stand-in with structure at every scale
        import numpy as np
        yy, xx = np.mgrid[0:512, 0:512] / 512.0
        rgb = np.stack([np.sin(20 * np.hypot(xx - .5, yy - .5)), xx, yy], -1) * 127.5 + 127.5
        pil = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    return pil.resize((side, side), Image.LANCZOS)


def toy_edit(side: int):
    """A toy-world scene with its source and target captions (the toy model's own kind of edit)."""
    import numpy as np
    from PIL import Image
    from diffedit.toy import world
    e = world.sample_edit(np.random.default_rng(SEED), size=side)
    return Image.fromarray(e.source.render()), e.source_caption, e.target_caption


def clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer built offline from open_clip's copy of the OpenAI BPE (as tests/test_tokenizer.py)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>", model_max_length=77)


@torch.no_grad()
def random_sd(name: str, device, dtype, seed: int = 0) -> StableDiffusion:
    """Our model with random weights, made on the device: matrices and kernels N(0, 1/fan_in) (activations stay
    O(1) through the full-size networks), norms the identity, other vectors N(0, 0.02^2)."""
    with torch.device("meta"):
        model = StableDiffusion(preset(name))
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    norms = {id(p) for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
             for p in m.parameters()}
    for pname, p in model.named_parameters():
        if id(p) in norms:
            p.fill_(1.0 if pname.endswith("weight") else 0.0)
        elif p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * p[0].numel() ** -0.5)
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=device))
    return model.to(dtype).eval().requires_grad_(False)


@torch.no_grad()
def diffusers_twin(de: DiffEdit, tok_dir: Path):
    """diffusers' DiffEdit pipeline on OUR weights: the UNet and VAE state dicts through diffusers' own single-file
    converters (their tensors shared with ours, ``assign=True``: no second copy), the SD1 text encoder by name."""
    from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from diffusers.pipelines.deprecated.stable_diffusion_diffedit import StableDiffusionDiffEditPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg, m = de.cfg, de.model
    if cfg.text.kind != "openai":
        raise ValueError("the benchmark builds SD1-style (OpenAI CLIP) twins only")
    u, v = cfg.unet, cfg.vae
    unet_yaml = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                     attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
                     channel_mult=list(u.channel_mult), transformer_depth=u.transformer_depth,
                     context_dim=u.context_dim, use_linear_in_transformer=u.use_linear_in_transformer,
                     **({"num_head_channels": u.num_head_channels} if u.num_head_channels > 0
                        else {"num_heads": u.num_heads}))
    ddconfig = dict(in_channels=v.in_channels, out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult),
                    num_res_blocks=v.num_res_blocks, z_channels=v.z_channels, attn_resolutions=[])
    yaml = {"model": {"params": {"scale_factor": v.scaling_factor, "unet_config": {"params": unet_yaml},
                                 "first_stage_config": {"params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}}}}}
    ckpt = {k: t for k, t in m.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ucfg = create_unet_diffusers_config_from_ldm(yaml, ckpt)
        vcfg = create_vae_diffusers_config_from_ldm(yaml, ckpt, image_size=cfg.resolution)
    ucfg["norm_num_groups"], vcfg["norm_num_groups"] = u.norm_groups, v.norm_groups
    vcfg["scaling_factor"] = v.scaling_factor
    nets = {}
    for key, cls, config, sd in (("unet", UNet2DConditionModel, ucfg, convert_ldm_unet_checkpoint(ckpt, ucfg)),
                                 ("vae", AutoencoderKL, vcfg, convert_ldm_vae_checkpoint(ckpt, vcfg))):
        with torch.device("meta"):
            net = cls(**config)
        net.load_state_dict({k: t.to(de.dtype) for k, t in sd.items()}, strict=True, assign=True)
        left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"diffusers {key}: tensors left on meta: {left[:3]}")
        nets[key] = net.eval().requires_grad_(False)
    t = cfg.text
    text = CLIPTextModel(CLIPTextConfig(hidden_size=t.width, intermediate_size=t.width * t.mlp_ratio,
                                        num_attention_heads=t.heads, num_hidden_layers=t.layers,
                                        vocab_size=t.vocab_size, max_position_embeddings=t.context_length,
                                        projection_dim=t.projection_dim, hidden_act="quick_gelu",
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    ours_text = m.cond_stage_model.transformer.state_dict()
    hf_keys = set(text.state_dict())
    if not any(k.startswith("text_model.") for k in hf_keys):  # transformers 5.x drops the prefix
        ours_text = {k.removeprefix("text_model."): x for k, x in ours_text.items()}
    res = text.load_state_dict(ours_text, strict=False)
    if res.unexpected_keys or any("position_ids" not in k for k in res.missing_keys):
        raise RuntimeError(f"text encoder keys: {res}")
    text = text.to(de.device, de.dtype).eval().requires_grad_(False)
    scheduler = DDIMScheduler(**SCHEDULER)
    pipe = StableDiffusionDiffEditPipeline(
        vae=nets["vae"], text_encoder=text, tokenizer=clip_tokenizer(tok_dir), unet=nets["unet"], scheduler=scheduler,
        inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- measuring ------------------------------------------------------------------------------------------------------

class Counter:
    """Rows and calls through a module's forward (a pre-hook: the first tensor argument's batch size)."""

    def __init__(self, *modules):
        self.rows = self.calls = 0
        self.handles = [mod.register_forward_pre_hook(self._hook, with_kwargs=True) for mod in modules]

    def _hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.rows += x.shape[0]
        self.calls += 1

    def reset(self):
        self.rows = self.calls = 0

    def get(self):
        return {"rows": self.rows, "calls": self.calls}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "/proc/self/status VmHWM"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()  # hand freed heap back, or reused pages would hide the run's peak from the RSS
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                self.method = "/proc/self/status VmHWM (not resettable here: a process-wide high-water mark)"
            self.base = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        self.peak_mb = max(0, peak - self.base) / 2 ** 20


def tune_malloc() -> str:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS. By default every buffer above
    32 MB is mmapped and unmapped per call, and oneDNN reorders each big conv weight (59 MB for a 1280-channel 3x3
    conv) into a fresh buffer on every call: half the UNet's CPU time went to page faults (measured: sys time equal
    to user time, 1.8 M minor faults per forward at 8 x 8 latents; 2.3x faster with this). Process-wide: it helps
    ours and diffusers' alike. The same from the shell: MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=..."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 2 ** 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 34) == 1
        return "glibc mallopt: mmap threshold 1 GiB, trim threshold 16 GiB" if ok else "glibc default (mallopt refused)"
    except (OSError, AttributeError):
        return "default (not glibc)"


def _malloc_trim():
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device, dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n ** 3 / median_time(lambda: a @ b, device, 5)


@torch.no_grad()
def unet_rate(unet, call, device, repeats: int = 3) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        call()
    flops = fc.get_total_flops()
    t = median_time(call, device, repeats)
    return {"flops": flops, "time_s": t, "tflop_per_s": flops / t / 1e12}


# --- one case -------------------------------------------------------------------------------------------------------

def run_case(name: str, de: DiffEdit, image, source: str, target: str, args, device, budget_end: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="diffedit-bench-tok-"))
    pipe = diffusers_twin(de, tmp)
    steps = args.steps
    gen_device = "cpu"

    counters = {"unet": (Counter(de.model.unet), Counter(pipe.unet)),
                "vae_encode": (Counter(de.model.first_stage_model.encoder), Counter(pipe.vae.encoder)),
                "vae_decode": (Counter(de.model.first_stage_model.decoder), Counter(pipe.vae.decoder))}

    def ours(compat):
        return lambda steps=steps: de.edit(image, target, source, ratio=RATIO, n=N, strength=STRENGTH, steps=steps,
                                           guidance=GUIDANCE, seed=SEED, compat=compat)

    def theirs(steps=steps):
        gen = torch.Generator(gen_device).manual_seed(SEED)
        mask = pipe.generate_mask(image=image, source_prompt=source, target_prompt=target,
                                  num_inference_steps=steps, generator=gen)
        inv = pipe.invert(prompt=source, image=image, num_inference_steps=steps, generator=gen).latents
        return pipe(prompt=target, mask_image=mask, image_latents=inv, negative_prompt=source,
                    num_inference_steps=steps, generator=gen).images[0]

    runs = {"ours_default": ours(None), "ours_matched": ours("diffusers"), "diffusers": theirs}
    result = {k: {"times_s": []} for k in runs}
    for key, fn in runs.items():  # warm-up: every path and batch shape once (CPU kernels do not JIT: few steps do)
        t0 = time.perf_counter()
        fn(args.warmup_steps)
        sync(device)
        result[key]["warmup_s"] = time.perf_counter() - t0
    done = 0
    while done < args.repeats:
        last = sum(result[k]["times_s"][-1] for k in runs) if done else 0.0
        if done and time.perf_counter() + last > budget_end:
            break
        for key, fn in runs.items():
            side = 0 if key.startswith("ours") else 1
            for c in counters.values():
                c[side].reset()
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                fn()
                sync(device)
                dt = time.perf_counter() - t0
            r = result[key]
            r["times_s"].append(dt)
            r["peak_mem_mb"] = max(r.get("peak_mem_mb", 0.0), mem.peak_mb)
            r["peak_mem_method"] = mem.method
            for what, c in counters.items():
                r[what] = c[side].get()
        done += 1
    for r in result.values():
        r["time_s"] = statistics.median(r["times_s"])
    k = round(RATIO * steps)
    expected = {"ours_default": 2 * N + 3 * k, "ours_matched": 2 * N + 4 * k, "diffusers": 4 * N + 4 * k}
    for key, rows in expected.items():
        result[key]["unet"]["expected_rows"] = rows

    # one UNet forward of a CFG pair, ours and diffusers', at this case's latent size
    h = image.size[1] // de.cfg.vae.downsampling
    x = torch.randn(2, de.cfg.unet.in_channels, h, h, device=device).to(de.dtype)
    t = torch.tensor([481, 481], device=device)
    c = torch.randn(2, 77, de.cfg.unet.context_dim, device=device).to(de.dtype)
    fwd = {"batch": 2, "latent": [h, h],
           "ours": unet_rate(de.model.unet, lambda: de.model.unet(x, t, c), device),
           "diffusers": unet_rate(pipe.unet, lambda: pipe.unet(x, t, encoder_hidden_states=c), device)}
    for hs in counters.values():
        for ctr in hs:
            for hd in ctr.handles:
                hd.remove()
    return {"image_px": list(image.size), "steps": steps, "ratio": RATIO, "n": N, "strength": STRENGTH,
            "guidance": GUIDANCE, "repeats_done": done, "runs": result,
            "speedup_default": result["diffusers"]["time_s"] / result["ours_default"]["time_s"],
            "speedup_matched": result["diffusers"]["time_s"] / result["ours_matched"]["time_s"],
            "unet_forward": fwd}


# --- main -----------------------------------------------------------------------------------------------------------

def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on cpu, float16 on cuda")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--size", type=int, default=None, help="SD1.5 case image side (default: 128 cpu, 512 cuda)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 10 cpu, 50 cuda)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--cases", default="toy,sd15")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop repeating once this many seconds would be exceeded (default: 540 cpu, none cuda)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="DDIM steps of the warm-up runs (default: 2 on cpu, --steps on cuda)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="cpu: keep glibc's default mmap threshold (see tune_malloc)")
    p.add_argument("--channels-last", action="store_true", help="our UNet in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (DiffEdit.compile())")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "float16"))
    args.size = args.size or (128 if cpu else 512)
    args.steps = args.steps or (10 if cpu else 50)
    args.warmup_steps = args.warmup_steps or (2 if cpu else args.steps)
    budget = args.budget_s if args.budget_s is not None else (540.0 if cpu else float("inf"))
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "default"
    if cpu:
        torch.set_flush_denormal(True)  # random weights can produce denormals, which are slow on x86
        malloc = "glibc default" if args.no_malloc_tuning else tune_malloc()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    budget_end = start + budget

    out = {"device": args.device, "dtype": str(dtype).removeprefix("torch."),
           "device_name": torch.cuda.get_device_name(device) if not cpu else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_allocator": malloc,
           "loadavg_start": list(os.getloadavg()),
           "note": ("CPU timings on a shared machine: other jobs (e.g. a training run) may hold cores, so compare "
                    "ratios and the matmul peak measured in this same run, not absolute times") if cpu else "",
           "cases": {}}
    import diffusers
    out["diffusers"] = diffusers.__version__
    mm_n = 2048 if cpu else 8192
    out["matmul"] = {"n": mm_n, "tflop_per_s": matmul_rate(device, dtype, mm_n) / 1e12}
    print(f"matmul {mm_n}^3 {out['dtype']}: {out['matmul']['tflop_per_s']:.3f} TFLOP/s", flush=True)

    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        t0 = time.perf_counter()
        if case == "toy":
            from diffedit.checkpoint import _toy_path
            if not _toy_path().is_file():
                out["cases"]["toy"] = {"skipped": f"{_toy_path()} does not exist (train it: scripts/train_toy.py)"}
                print("toy: skipped, no toy.safetensors", flush=True)
                continue
            de = DiffEdit.from_pretrained("toy", device=device, dtype=dtype)
            image, source, target = toy_edit(de.cfg.resolution)
        elif case == "sd15":
            de = DiffEdit(random_sd("sd15", device, dtype), device=device, dtype=dtype)
            image, source, target = astronaut(args.size), SOURCE, TARGET
        else:
            raise SystemExit(f"unknown case {case!r}: choose from toy, sd15")
        if args.channels_last:
            de.model.unet.to(memory_format=torch.channels_last)
        if args.compile:
            de.compile()
        steps = args.steps
        res = run_case(case, de, image, source, target, args, device, budget_end)
        res["setup_and_total_s"] = time.perf_counter() - t0
        res["warmup_steps"] = args.warmup_steps
        res["prompts"] = {"source": source, "target": target}
        # the machine's speed drifts on a shared host: the peak is measured again next to this case's forwards
        res["unet_forward"]["matmul_tflop_per_s"] = matmul_rate(device, dtype, mm_n) / 1e12
        for who in ("ours", "diffusers"):
            res["unet_forward"][who]["fraction_of_matmul"] = (res["unet_forward"][who]["tflop_per_s"]
                                                               / res["unet_forward"]["matmul_tflop_per_s"])
        out["cases"][case] = res
        r = res["runs"]
        print(f"{case}: {image.size[0]} px, {steps} steps, {res['repeats_done']} repeats | "
              + " | ".join(f"{k} {v['time_s']:.2f}s {v['unet']['rows']} rows/{v['unet']['calls']} calls "
                           f"enc {v['vae_encode']['rows']} dec {v['vae_decode']['rows']} peak {v['peak_mem_mb']:.0f}MB"
                           for k, v in r.items())
              + f" | speedup default {res['speedup_default']:.2f} matched {res['speedup_matched']:.2f} | UNet fwd "
              f"{res['unet_forward']['ours']['tflop_per_s']:.3f} TFLOP/s = "
              f"{res['unet_forward']['ours']['fraction_of_matmul']:.2f} of matmul", flush=True)
        del de

    main_case = out["cases"].get("sd15") or out["cases"].get("toy") or {}
    out["headline_case"] = "sd15" if "runs" in out["cases"].get("sd15", {}) else "toy"
    out["speedup_default"] = main_case.get("speedup_default")
    out["speedup_matched"] = main_case.get("speedup_matched")
    out["unet_flop_rate_fraction"] = main_case.get("unet_forward", {}).get("ours", {}).get("fraction_of_matmul")
    out["total_s"] = time.perf_counter() - start
    out["loadavg_end"] = list(os.getloadavg())
    out["definitions"] = {
        "speedup_default": "t(diffusers: generate_mask + invert + __call__, defaults) / t(ours: paper-faithful edit)",
        "speedup_matched": "t(diffusers) / t(ours, compat='diffusers'): same steps and CFG inversion; our mask "
                           "pass still evaluates 2n rows where diffusers' evaluates 4n (expected_rows per run)",
        "unet_flop_rate_fraction": "FLOPs of one UNet forward of a CFG pair (batch 2) / its median time, over the "
                                   "median-of-5 rate of a large square matmul in the same dtype on the same device, "
                                   "measured right after the case's forwards",
        "rows": "UNet sample evaluations (latents through the UNet); calls: UNet invocations",
        "peak_mem_mb": "peak memory above what was in use before the run (weights excluded)"}
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
