"""Measuring tools of the benchmark scripts and the tests (torch only; diffusers only in ``race_setup``, which the
race scripts call); outside the installed package.

``ModuleCounter`` applies the counting rule of ``diffedit.model_call.Rows`` (a call adds its first tensor's batch
size) to any module's forward (ours or diffusers'). Also: random full-size weights, peak memory, interleaved median
timing, a race of ours against diffusers and its table, the matmul rate (a dtype's practical peak), FLOP counts and
the agreement of two edits (mask IoU, PSNR).
"""
from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from pathlib import Path

from diffedit.model_call import Rows


# --- counting UNet evaluations ------------------------------------------------------------------------------------

class ModuleCounter(Rows):
    """Counts the forward calls of modules (a pre-hook: the first tensor argument's batch size); a context manager
    that removes its hooks on exit (or call ``remove``)."""

    def __init__(self, *modules, on_rows=None):
        super().__init__(on_rows)
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs):
        self.add(next(a for a in (*args, *kwargs.values()) if hasattr(a, "shape")))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# --- random full-size weights -------------------------------------------------------------------------------------

def random_model(name: str, device="cpu", dtype=None, seed: int = 0, parts=None):
    """A preset's model (StableDiffusion, StableDiffusion3 or FluxModel) with random weights, made on the device
    straight in ``dtype`` (meta first: no CPU init pass, no float32 copy of the whole model), by ``random_weights_``.
    ``parts``: the attribute names that get weights (e.g. ("model", "first_stage_model")); the others stay on meta.
    None: all."""
    import torch
    from diffedit.models import FluxModel, StableDiffusion, StableDiffusion3, preset
    cfg = preset(name)
    with torch.device("meta"):
        model = {"sd3": StableDiffusion3, "flux": FluxModel}.get(cfg.family, StableDiffusion)(cfg)
        model = model.to(dtype or torch.float32)
    gen = torch.Generator(device).manual_seed(seed)
    for part in [model] if parts is None else [getattr(model, p) for p in parts]:
        random_weights_(part, gen, device)
    return model.eval().requires_grad_(False)


def random_weights_(module, gen, device="cpu", buffer_scale: float = 0.02):
    """Give a meta ``module`` random values on ``device`` in its dtype, drawn from ``gen`` in float32 one tensor at a
    time (the same weights in every dtype): matrices and kernels N(0, 1/fan_in) (activations stay O(1) through the
    full-size networks), norms the identity, other vectors N(0, 0.02^2), float buffers (SD3's position table)
    N(0, buffer_scale^2). Returns ``module``, eval and frozen."""
    import torch
    module.to_empty(device=device)
    norms = {id(p) for m in module.modules() if type(m).__name__.endswith("Norm")  # GroupNorm, RMSNorm, T5's
             for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if id(p) in norms:
                p.fill_(1.0 if pname.endswith(("weight", "scale")) else 0.0)
            else:
                scale = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * scale)
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen, device=device) * buffer_scale)
    return module.eval().requires_grad_(False)


# --- memory -------------------------------------------------------------------------------------------------------

def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def tune_malloc() -> str:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS. By default every buffer above
    32 MB is mmapped and unmapped per call, and oneDNN reorders each big conv weight (59 MB for a 1280-channel 3x3
    conv) into a fresh buffer on every call: half the UNet's CPU time went to page faults (measured: sys time equal
    to user time, 1.8 M minor faults per forward at 8 x 8 latents; 2.3x faster with this). Process-wide: it helps
    ours and diffusers' alike. The same from the shell: MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=..."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return "default (not glibc)"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 2 ** 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 34) == 1
    return "glibc mallopt: mmap threshold 1 GiB, trim threshold 16 GiB" if ok else "glibc default (mallopt refused)"


class PeakMemory:
    """Peak memory of a block above what was in use when it began, in MiB (``peak_mb``; ``base`` in bytes).

    CUDA: torch.cuda.max_memory_allocated(). CPU: the resident-set high-water mark (VmHWM in /proc/self/status,
    reset by writing 5 to /proc/self/clear_refs after malloc_trim(0) hands the heap's free pages back); tracemalloc
    would miss torch's allocations, and psutil has no peak on Linux."""

    def __init__(self, device):
        import torch
        self.device = torch.device(device)
        self.method = "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "/proc/self/status VmHWM"

    def __enter__(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)  # hand freed heap back, or reused pages would hide the block's peak from the RSS
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.method = "/proc/self/status VmHWM (not resettable here: a process-wide high-water mark)"
        self.base = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        self.peak_mb = max(0, peak - self.base) / 2 ** 20


# --- time, rates, FLOPs -------------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    """Wall seconds of one call, the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, device="cpu", repeats: int = 3, warmup: int = 1, deadline: float | None = None,
                around=None) -> dict[str, list[float]]:
    """Times each of ``fns`` (name -> callable) ``repeats`` times in alternation, after ``warmup`` untimed calls
    of each: a change in a shared machine's load hits all of them alike. Stops early when one more round (as long
    as the last) would pass ``deadline`` (a time.perf_counter() value). ``around(name)``: a context manager
    entered around each timed call (peak memory, counters)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for done in range(repeats):
        last = sum(ts[-1] for ts in times.values()) if done else 0.0
        if done and deadline is not None and time.perf_counter() + last > deadline:
            break
        for k, fn in fns.items():
            with around(k) if around else contextlib.nullcontext():
                times[k].append(timed(fn, device))
    return times


def median_time(fn, device="cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    return statistics.median(interleaved({"fn": fn}, device, repeats, warmup)["fn"])


def shared_fraction(ours, theirs) -> float:
    """The fraction of the bytes of the tensors ``theirs`` (a diffusers twin's) stored in the storages of ``ours``."""
    mine = {t.untyped_storage().data_ptr() for t in ours}
    return sum(t.nbytes for t in theirs if t.untyped_storage().data_ptr() in mine) / sum(t.nbytes for t in theirs)


def race_line(dtype, side: int, r: dict) -> str:
    """One printed line of a race at a latent side (``race_summary``'s fields)."""
    return (f"{str(dtype)[6:]} {side}x{side}: ours {r['ours']['ms_per_row']:.0f} ms/row, diffusers "
            f"{r['diffusers']['ms_per_row']:.0f} ms/row, speedup {r['speedup']:.3f}, ours "
            f"{r['ours']['fraction_of_matmul']:.2f} of matmul {r['matmul_tflop_per_s']:.3f} TFLOP/s, "
            f"rel diff {r['relative_difference']:.1e}")


def race_setup(threads: int | None):
    """The CPU and the logs as every race runs: ``threads`` (None: torch's), denormals flushed (random weights make
    them, and they are slow on x86), diffusers' logs and warnings quiet. Returns the diffusers module."""
    import logging
    import warnings

    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import diffusers
    return diffusers


def race_table(dtypes: dict, fields=("ms_per_row", "fraction_of_matmul")) -> dict:
    """One row per dtype and latent side of races (``dtypes``: name -> {"sides": {side: timed_race's dict}}): the
    speedups, then each contender's ``fields``."""
    return {f"{d} {side}x{side}": {k: r[k] for k in ("speedup", "speedup_of_minima")} | {
        f"{who}_{k}": r[who][k] for who in ("ours", "diffusers") for k in fields}
        for d, v in dtypes.items() for side, r in v["sides"].items()}


def timed_race(fns: dict, flops: int, dtype, matmul_n: int, repeats: int, deadline: float, rows: int) -> dict:
    """Ours against diffusers on the CPU (``fns``: "ours" and "diffusers" -> a call returning its output): each one's
    warm-up call with its FLOPs counted, the ``interleaved`` times, the matmul rate in ``dtype`` before and after
    (the better is the peak), the outputs' relative difference, then ``race_summary``'s figures."""
    out = {}
    calls = {who: (lambda who=who, fn=fn: out.__setitem__(who, fn())) for who, fn in fns.items()}
    peaks = [matmul_rate("cpu", dtype, matmul_n) / 1e12]
    t0 = time.perf_counter()
    counted = {who: count_flops(fn) for who, fn in calls.items()}  # the warm-up call of each
    a, b = out["ours"].float(), out["diffusers"].float()
    times = interleaved(calls, "cpu", repeats, warmup=0, deadline=deadline)
    warmup = time.perf_counter() - t0 - sum(map(sum, times.values()))
    peaks.append(matmul_rate("cpu", dtype, matmul_n) / 1e12)
    peak = max(peaks)
    res = {"warmup_s": warmup, "matmul_tflop_per_s": peak, "matmul_tflop_per_s_before_after": peaks,
           "relative_difference": float((a - b).norm() / b.norm()), "repeats_done": len(times["ours"])}
    return {**res, **race_summary(times, flops, counted, peak, rows)}


def race_summary(times: dict, flops: int, counted: dict, peak: float, rows: int) -> dict:
    """Per contender of an ``interleaved`` race of ``rows``-row forwards: its times, the median, ms per row, the
    FLOP rate and its fraction of the matmul ``peak`` (TFLOP/s); then diffusers' median and fastest over ours."""
    res = {}
    for who in times:
        med = statistics.median(times[who])
        res[who] = {"flops_counted_on_cpu": counted[who], "times_s": times[who], "time_s": med,
                    "ms_per_row": 1e3 * med / rows, "min_ms_per_row": 1e3 * min(times[who]) / rows,
                    "tflop_per_s": flops / med / 1e12, "fraction_of_matmul": flops / med / 1e12 / peak}
    res["speedup"] = res["diffusers"]["time_s"] / res["ours"]["time_s"]
    res["speedup_of_minima"] = min(times["diffusers"]) / min(times["ours"])
    return res


def matmul_rate(device="cpu", dtype=None, n: int = 2048) -> float:
    """FLOP/s of an n^3 square matmul in ``dtype`` on ``device`` (median of 5): the dtype's practical peak."""
    import torch
    a, b = (torch.randn(n, n, device=device).to(dtype or torch.float32) for _ in range(2))
    return 2 * n ** 3 / median_time(lambda: a @ b, device, 5)


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def flop_rate(fn, device="cpu", repeats: int = 3) -> dict:
    """FLOPs of one call, its median time and the rate in TFLOP/s."""
    import torch
    flops = count_flops(fn)
    with torch.no_grad():
        t = median_time(fn, device, repeats)
    return {"flops": flops, "time_s": t, "tflop_per_s": flops / t / 1e12}


def unet_inputs(cfg, batch: int = 2, side: int = 16, device="cpu", dtype=None, t: int = 481):
    """Random inputs of one UNet forward (``cfg``: a UNetConfig): latents (batch, C, side, side), timesteps,
    context (batch, 77, context_dim). Batch 2 is a classifier-free guidance pair, the commonest call."""
    import torch
    dtype = dtype or torch.float32
    x = torch.randn(batch, cfg.in_channels, side, side, device=device).to(dtype)
    c = torch.randn(batch, 77, cfg.context_dim, device=device).to(dtype)
    return x, torch.full((batch,), t, device=device), c


# --- agreement of two edits ---------------------------------------------------------------------------------------

def edit_agreement(pairs) -> dict:
    """How far apart pairs of edits of the same inputs are (``pairs``: (EditResult, EditResult), e.g. fp32 and
    bf16 networks): IoU of their binary masks (1 when both are empty), mean and worst; PSNR of their outputs, pooled
    (from the mean squared error over every edit, so one bad edit shows), median and worst; and the pooled PSNR
    outside both masks (the background, which blending pins to the input). An MSE of 0 counts as 1e-10 (160 dB),
    which keeps the figures finite for JSON."""
    import numpy as np
    ious, mses, bg_err, bg_count = [], [], 0.0, 0
    for a, b in pairs:
        ma, mb = (np.asarray(r.mask) > 127 for r in (a, b))
        ious.append((ma & mb).sum() / (ma | mb).sum() if (ma | mb).any() else 1.0)
        x, y = (np.asarray(r.image.convert("RGB"), dtype=np.float64) for r in (a, b))
        err = ((x - y) ** 2).mean(axis=-1)
        mses.append(float(err.mean()))
        bg_err, bg_count = bg_err + float(err[~(ma | mb)].sum()), bg_count + int((~(ma | mb)).sum())
    db = lambda mse: float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))
    return {"edits": len(ious), "mask_iou": float(np.mean(ious)), "mask_iou_min": float(min(ious)),
            "psnr_db": db(float(np.mean(mses))), "psnr_median_db": db(float(np.median(mses))),
            "psnr_min_db": db(max(mses)), "psnr_outside_masks_db": db(bg_err / max(bg_count, 1))}
