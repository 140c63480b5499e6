"""docs/walkthrough.py, the teaching page, runs end to end on a tiny random checkpoint, so it cannot rot."""
from __future__ import annotations

import html
import importlib.util
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffedit.models import StableDiffusion, preset
from diffedit.toy import world

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.py"


def test_walkthrough_writes_a_page_that_shows_every_png(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = preset("tiny")
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in StableDiffusion(cfg).state_dict().items()}, str(ckpt),
              metadata={"diffedit_config": json.dumps(cfg.to_dict())})
    spec = importlib.util.spec_from_file_location("walkthrough", SCRIPT)
    walkthrough = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walkthrough)

    out = tmp_path / "walkthrough"
    tiny = ["--model", str(ckpt), "--steps", "4", "--n", "2", "--size", "16"]
    # a random model edits nothing right: a judge that fails edit 0 alone makes the rule pick edit 1
    first = world.edits(1, world.EVAL_SEED, size=16)[0]
    monkeypatch.setattr(walkthrough.judge, "edit_success", lambda edited, edit: edit != first)
    assert walkthrough.main(["--out", str(out), *tiny, "--grid", "2"]) == 0

    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 15
    assert all(name in page for name in pngs), [n for n in pngs if n not in page]
    referenced = set(re.findall(r"src='([^']+)'", page))
    assert referenced <= set(pngs), referenced - set(pngs)  # no broken image on the page
    for name in ("input.png", "eps_query.png", "eps_reference.png", "d.png", "mask.png", "result_diffedit.png",
                 "result_sdedit.png", "result_encode_decode.png", "result_masked_sdedit.png"):
        assert name in pngs
    assert any(n.startswith("encoded_") for n in pngs) and any(n.startswith("decoding_") for n in pngs)
    # the edit shown is reference.edit's, and DiffEdit.edit (the engine) gives the same bits on it
    assert "<code>reference.edit</code>" in page and "gives the same latents, bit for bit" in page
    # 4 steps at r = 0.7, k = round(2.8) = 3: 2n = 4 mask rows, k = 3 encoding rows, 2k = 6 guided decoding rows
    assert "The edit ran 13 model rows: 2n = 4 for the mask, k = 3 for the encoding and 6 for" in " ".join(page.split())

    # the grid: every method on edits 0 and 1, and a count per method
    for i in range(2):
        for part in ("input", "target", "mask", "diffedit", "sdedit", "encode-decode", "masked-sdedit"):
            assert f"grid_{i:02d}_{part}.png" in pngs and f"grid_{i:02d}_{part}.png" in page
    assert "grid_02_input.png" not in pngs
    assert re.search(r"Successes: DiffEdit \d / 2, SDEdit \d / 2, Encode-Decode \d / 2, masked SDEdit \d / 2\.", page)
    # what the toy world shows, per kind, from the shipped model's measurements in docs/results/toy_kinds
    assert "What the toy world shows, kind by kind" in page and "Why shape edits fail" in page
    for kind in ("colour", "shape", "background", "remove"):
        assert f"<tr><td>{kind} (" in page
    # the selection rule, on the page and in --help
    assert html.escape(walkthrough.RULE) in page and "held-out edit 1, chosen by a fixed rule" in page
    assert "Edit 0 failed." in page
    assert walkthrough.RULE in " ".join(walkthrough.build_parser().format_help().split())

    # the fallback: a judge that fails every edit
    monkeypatch.setattr(walkthrough.judge, "edit_success", lambda edited, edit: False)
    assert walkthrough.main(["--out", str(tmp_path / "fallback"), *tiny, "--grid", "0",
                             "--results", str(tmp_path / "none")]) == 0
    page = (tmp_path / "fallback" / "index.html").read_text()
    assert "What the toy world shows" not in page  # no measurements, no section
    assert f"None of the first {walkthrough.SEARCH} held-out edits succeeded" in page
    assert "(edit 0), a failed edit" in page
    assert "grid_" not in page
