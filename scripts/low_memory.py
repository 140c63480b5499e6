#!/usr/bin/env python
"""The low-memory mode at a real size: the resident memory of one edit on SD3.5 Medium with T5-XXL (random weights),
with T5 and the MMDiT both loaded, and taking turns (``low_memory=True``, ``checkpoint.build.Swap``).

    python scripts/low_memory.py --json docs/results/low_memory_sd3.json
    python scripts/low_memory.py --preset tiny-sd3 --px 32 --json /tmp/l.json      # a smoke run

The model is written once as a single file in Stability's keys and --file-dtype (float16, as the released T5
files), T5 inside and ``tokenizer_3/`` beside it (a small offline vocabulary: no hub here). Each mode then runs in a
process of its own: load in --dtype, one DiffEdit edit of a --px image (--steps steps, --n noises), and report the
memory line logged before loading, the resident set as each T5 and transformer call begins, split into anonymous
memory (RssAnon: weights converted to --dtype, activations) and file pages (RssFile: weights used as stored, mapped
from the file, which the kernel can drop and read again), the high-water mark (VmHWM) and a digest of the edited
latents: the two modes must give the same bits. Weights are random (measure.random_model); memory and bits do not
depend on them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffedit.models import PRESETS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # measure.py, the offline T5 tokenizer
from measure import _status_kb, random_model  # noqa: E402

GIB = 2 ** 30


def make(preset: str, folder: Path, dtype: torch.dtype) -> Path:
    """``folder/model.safetensors`` (every part, T5 inside) and ``folder/tokenizer_3/``."""
    from safetensors.torch import save_file
    from test_sd3_text import t5_tokenizer
    model = random_model(preset, dtype=dtype)
    t5_tokenizer(folder / "tokenizer_3")
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def gib(kb: int | None) -> float | None:
    return None if kb is None else round(kb * 1024 / GIB, 2)


@torch.no_grad()
def run_mode(path: Path, low: bool, px: int, steps: int, n: int, dtype: str) -> dict:
    """One process's edit in one mode (what ``--child`` prints)."""
    from PIL import Image

    from diffedit.pipeline import DiffEdit
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    for name in ("diffedit.checkpoint.load", "diffedit.checkpoint.build"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    t0 = time.perf_counter()
    de = DiffEdit.from_pretrained(str(path), dtype=dtype, low_memory=low)
    loaded = time.perf_counter() - t0
    rss = {"t5": [], "transformer": []}
    for part, module in (("t5", de.model.text_encoders.t5xxl), ("transformer", de.model.model.diffusion_model)):
        module.register_forward_pre_hook(
            lambda *_, part=part: rss[part].append({k: gib(_status_kb(k)) for k in ("RssAnon", "RssFile")}))
    image = Image.fromarray(torch.randint(0, 256, (px, px, 3), generator=torch.Generator().manual_seed(0))
                            .to(torch.uint8).numpy())
    t0 = time.perf_counter()
    out = de.edit(image, "a red circle on a lawn", source="a blue square on a lawn", steps=steps, n=n, seed=0)
    return {"low_memory": low, "memory_line": next((l for l in lines if "the weights need" in l), None),
            "swaps": [l for l in lines if l.startswith("low-memory mode")],
            "load_seconds": round(loaded, 1), "edit_seconds": round(time.perf_counter() - t0, 1),
            "rss_at_t5_calls_gib": rss["t5"], "rss_at_transformer_calls_gib": rss["transformer"],
            "peak_rss_gib": gib(_status_kb("VmHWM")),
            "latents_sha1": hashlib.sha1(out.latents.float().numpy().tobytes()).hexdigest(),
            "finite": bool(torch.isfinite(out.latents).all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd35-medium", help="an SD3 preset with T5 (diffedit.models.PRESETS)")
    p.add_argument("--file-dtype", default="float16", help="the dtype the file stores")
    p.add_argument("--dtype", default="bfloat16", help="the compute dtype the model is loaded in")
    p.add_argument("--px", type=int, default=128, help="the image's side")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--json", required=True)
    p.add_argument("--child", nargs=2, metavar=("FILE", "LOW"), help=argparse.SUPPRESS)
    p.add_argument("--make", metavar="FOLDER", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    with_t5 = sorted(name for name, c in PRESETS.items() if c.family == "sd3" and c.text_3 is not None)
    if a.preset not in with_t5:
        p.error(f"--preset {a.preset}: an SD3 preset with T5 is needed ({', '.join(with_t5)})")
    if a.make:  # in a process of its own: the whole model in memory at once is not held by the measuring ones
        make(a.preset, Path(a.make), getattr(torch, a.file_dtype))
        return 0
    if a.child:
        r = run_mode(Path(a.child[0]), a.child[1] == "1", a.px, a.steps, a.n, a.dtype)
        Path(a.json).write_text(json.dumps(r))
        return 0
    with tempfile.TemporaryDirectory(prefix="diffedit-low-memory-") as tmp:
        folder = Path(tmp)
        me = [sys.executable, __file__, "--preset", a.preset, "--file-dtype", a.file_dtype, "--dtype", a.dtype,
              "--px", str(a.px),
              "--steps", str(a.steps), "--n", str(a.n)]
        subprocess.run([*me, "--make", str(folder), "--json", str(folder / "made.json")], check=True)
        path = folder / "model.safetensors"
        modes = {}
        for low in (False, True):
            out = folder / f"mode{int(low)}.json"
            subprocess.run([*me, "--child", str(path), str(int(low)), "--json", str(out)], check=True)
            modes["low_memory" if low else "both_loaded"] = json.loads(out.read_text())
        sizes = {"file_gib": round(path.stat().st_size / GIB, 2)}
    same = modes["both_loaded"]["latents_sha1"] == modes["low_memory"]["latents_sha1"]
    anon = {name: max(c["RssAnon"] for c in m["rss_at_transformer_calls_gib"]) for name, m in modes.items()}
    report = {"what": "resident memory of one edit with T5 and the MMDiT both loaded, and taking turns "
                      "(low_memory=True); random weights, each mode in its own process",
              "preset": a.preset, "file_dtype": a.file_dtype, "dtype": a.dtype, "image_px": a.px, "steps": a.steps, "n": a.n, **sizes,
              "same_bits": same, **modes,
              # what the transformer's calls hold beyond file pages the kernel may drop
              "anonymous_at_transformer_calls_gib": anon,
              "anonymous_saved_gib": round(anon["both_loaded"] - anon["low_memory"], 2)}
    Path(a.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("preset", "file_dtype", "dtype", "same_bits", "anonymous_saved_gib")}))
    for name, m in modes.items():
        print(f"{name}: peak {m['peak_rss_gib']} GiB; at T5 calls {m['rss_at_t5_calls_gib']}")
        print(f"  at transformer calls {m['rss_at_transformer_calls_gib']}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
