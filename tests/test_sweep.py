"""``diffedit sweep`` (diffedit/sweep/, plots.py) on a tiny random checkpoint and 16 px toy scenes (8 x 8 latents).

The sweep must share work for real (the UNet-evaluation counter equals the shared-work formula and is below
the cost of separate edits), give what ``DiffEdit.edit`` gives for the same settings and seed, resume without
redoing rows, give the same rows split over two torchrun processes, read prompts files, and refuse bad input
with a UsageError naming the flag (any other exception is a bug and propagates)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import cli as diffedit_cli
from diffedit import frontend, images, plots, precision, sweep
from diffedit.engine import Engine
from diffedit.frontend import load_pipeline
from diffedit.pipeline import DiffEdit
from diffedit.settings import MAX_N, MAX_STEPS, NORMALIZATIONS, UsageError
from diffedit.sweep import Setting, cli

STEPS = 4  # grid 1, 251, 501, 751: ratio 0.5 -> k = 2, ratio 1 -> k = 4
THREE = ("diffedit", "sdedit", "encode-decode")  # the paper's method and its two baselines
GRID = ["--ratio", "0.5,1", "--threshold", "0.25,0.5", "--n", "1,2", "--method", ",".join(THREE)]
# Per image: inversion 4 (to r = 1) + mask 2 noises x (query + caption) 4 + decoding with CFG (2 rows a step):
# DiffEdit 4 masks x (2 x 2 + 2 x 4) = 48, Encode-Decode 2 x 2 + 2 x 4 = 12, SDEdit 12.
SHARED_PER_IMAGE = 4 + 4 + 48 + 12 + 12
# Separate edits: DiffEdit k + 2n + 2k for each of 2 thresholds x n in (1, 2), at k = 2 and 4; SDEdit 2k; E-D 3k.
SEPARATE_PER_IMAGE = 2 * ((2 + 2 + 4) + (2 + 4 + 4)) + 2 * ((4 + 2 + 8) + (4 + 4 + 8)) + (4 + 8) + (6 + 12)
METRIC_TOL = 1e-6


def parse(argv) -> argparse.Namespace:
    """As diffedit.cli parses: a subparsers registry with add_sweep_parser."""
    parser = argparse.ArgumentParser(prog="diffedit")
    sweep.add_sweep_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *map(str, argv)])


def toy_argv(tiny_checkpoint, out, *extra):
    return ["--images", "toy:2", *GRID, "--model", tiny_checkpoint, "--steps", STEPS, "--toy-size", 16, "--out", out,
            "--dtype", "float32", "-q", *extra]


def rows_of(out: Path) -> dict[str, dict]:
    return {sweep.row_key(r): r for r in sweep.read_rows(out / "results.jsonl")}


def assert_same_rows(a: dict, b: dict, tol: float = METRIC_TOL):
    assert a.keys() == b.keys()
    for key in a:
        fixed = ("kind", "seed", "index", "steps", "guidance")
        assert {k: a[key][k] for k in fixed} == {k: b[key][k] for k in fixed}
        for metric in sweep.METRICS:
            assert (metric in a[key]) == (metric in b[key]), (key, metric)
            if metric in a[key]:
                assert a[key][metric] == pytest.approx(b[key][metric], abs=tol, rel=tol), (key, metric)


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory):
    """One sweep over 2 toy images x 12 settings, shared by the tests below."""
    out = tmp_path_factory.mktemp("base")
    assert sweep.run_sweep(parse(toy_argv(tiny_checkpoint, out))) == 0
    return out


def test_the_reuse_is_real_the_counter_equals_the_shared_formula(base):
    cost = json.loads((base / "cost.json").read_text())
    settings = sweep.grid([0.5, 1.0], [0.25, 0.5], [1, 2], [0.5], ["caption"], THREE)
    shared = sweep.shared_cost(settings, STEPS, 7.5, "Q", "R")  # the engine's plan of one image's requests
    separate = sweep.separate_cost(settings, STEPS, 7.5, "Q", "R")  # one plan per setting
    assert shared.rows == SHARED_PER_IMAGE and separate.rows == SEPARATE_PER_IMAGE
    assert (shared.vae_encodes, separate.vae_encodes) == (1, len(settings))
    assert cost["vae_encodes_per_image"] == {"shared": 1, "separate": len(settings)}
    assert cost["unet_evaluations_run"] == cost["shared_formula_this_run"] == 2 * SHARED_PER_IMAGE
    assert cost["separate_edits_this_run"] == 2 * SEPARATE_PER_IMAGE
    assert cost["unet_evaluations_run"] < cost["separate_edits_this_run"]
    assert cost["rows_computed_this_run"] == cost["rows_total"] == 2 * len(settings)


def test_outputs_summary_plots_and_page(base):
    rows = sweep.read_rows(base / "results.jsonl")
    assert len(rows) == 24 and all(r["kind"] in ("colour", "shape", "background") for r in rows)
    diffedit = [r for r in rows if r["method"] == "diffedit"]
    assert all({"iou", "iou_footprint", "mask_area", "bg_psnr", "bg_ssim", "target_psnr", "success"} <= r.keys()
               for r in diffedit)
    assert all("iou" not in r and "iou_footprint" not in r and "success" in r
               for r in rows if r["method"] != "diffedit")
    summary = (base / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 12 and summary[0].startswith("method,ratio,threshold,n,strength,reference,dilate,count")
    assert all(line.split(",")[7] == "2" for line in summary[1:])
    page = (base / "index.html").read_text()
    assert sweep.perceptual_note(None, None) in page
    pngs = sorted(p.relative_to(base).as_posix() for p in base.rglob("*.png"))
    for name in ("plots/tradeoff.png", "plots/mask_vs_threshold.png", "plots/mask_vs_n.png", "plots/example.png"):
        assert name in pngs
    assert any(p.startswith("examples/toy-12345-1_") for p in pngs)
    assert all(p in page for p in pngs), [p for p in pngs if p not in page]


def test_a_sweep_row_is_the_single_edit_with_the_same_settings_and_seed(base, tiny_checkpoint):
    item = sweep.load_items("toy:1", 12345, 16)[0]
    image, seed = item.load(), 12345 * 1000 + 0
    settings = sweep.grid([0.5, 1.0], [0.25, 0.5], [1, 2], [0.5], ["caption"], THREE)
    # The rows the command wrote are edit_grid's outputs, measured.
    de = DiffEdit.from_pretrained(str(tiny_checkpoint), dtype="float32")
    outputs = sweep.edit_grid(de, image, item.source, item.target, settings, STEPS, 7.5, seed)
    mine = {sweep.row_key(r): r for r in sweep.rows_for(item, image, outputs, seed, STEPS, 7.5)}
    assert_same_rows(mine, {k: r for k, r in rows_of(base).items() if r["index"] == 0})
    # And edit_grid computes what separate edits compute. In float64: in float32 the batched decoding rounds
    # differently from a batch of one (kernels depend on the batch size), ~5e-5 after guidance on this model.
    de = DiffEdit.from_pretrained(str(tiny_checkpoint), dtype=torch.float64)
    outputs = sweep.edit_grid(de, image, item.source, item.target, settings, STEPS, 7.5, seed)
    checks = [Setting("diffedit", 1.0, "caption", 0.5, 2, 0.5),   # n = n_max: the same noises by construction
              Setting("diffedit", 0.5, "caption", 0.25, 2, 0.5),
              Setting("diffedit", 0.5, "caption", 0.5, 1, 0.5),   # n < n_max: the generator's prefix property
              Setting("sdedit", 0.5, "caption"), Setting("encode-decode", 1.0, "caption")]
    by_setting = {o.setting: o for o in outputs}
    for s in checks:
        kw = dict(ratio=s.ratio, steps=STEPS, guidance=7.5, seed=seed, method=s.method)
        if s.method == "diffedit":
            kw.update(threshold=s.threshold, n=s.n, strength=s.strength)
        ref = de.edit(image, item.target, source=item.source, **kw)
        got = by_setting[s]
        assert (got.latents - ref.latents).abs().max().item() < 1e-10, s
        if s.method == "diffedit":
            assert torch.equal(got.mask, ref.mask_map > s.threshold), s
            if s.n == 2:  # n_max: the same rows in the same batch, bit for bit
                assert torch.equal(got.map, ref.mask_map), s
            assert torch.allclose(got.map, ref.mask_map, rtol=0, atol=1e-10), s
            assert np.array_equal(np.asarray(images.mask_to_pil(got.mask, image.size)), np.asarray(ref.mask)), s


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 4, 16, 16), (1, 4, 64, 64)])
def test_the_first_n_of_n_max_noises_are_the_n_noises_of_a_single_edit(shape):
    """What makes a sweep row at n < n_max equal DiffEdit.edit(n=n).

    Image i of a sweep uses the seed S * 1000 + i (as diffedit/evaluation.py); its mask noises come from a generator
    seeded with it, drawn as ONE tensor of the grid's n_max noises, and a row with n noises uses the first n.
    A row at n = n_max is therefore exactly ``de.edit(..., n=n_max, seed=S * 1000 + i)``. For smaller n it
    equals ``de.edit(..., n=n)`` only because torch's CPU normal generator fills a tensor of a multiple of 16
    numbers in order (every SD and toy latent), so a prefix of a larger draw is the smaller draw: checked here,
    not a documented guarantee. SDEdit draws its noise from the same seed, as ``de.edit`` does.
    The same computation is not the same rounding: CPU kernels round differently for other batch sizes (~1e-6)
    and guidance amplifies it, so in float32 a row's latents can differ from a separate ``de.edit`` by ~1e-5
    relative (5e-5 on the random tiny model; in float64 they agree to ~1e-12, checked above), and a row
    recomputed on resume, in a smaller batch than first planned, can differ from an uninterrupted run's by as
    much. Rows computed in the same grouping (a torchrun rank takes whole images) are bit-identical."""
    big = torch.randn((10, *shape), generator=torch.Generator().manual_seed(5))
    for n in (1, 2, 5):
        assert torch.equal(big[:n], torch.randn((n, *shape), generator=torch.Generator().manual_seed(5)))


def test_an_interrupted_sweep_resumes_computing_only_the_missing_rows(base, tiny_checkpoint, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(base, out)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    keep = len(lines) // 2 - 1  # image 0 loses its last row, image 1 all of its rows
    (out / "results.jsonl").write_text("".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])  # + a torn line
    missing = {}
    for r in map(json.loads, lines[keep:]):
        missing.setdefault(r["index"], []).append(Setting(r["method"], r["ratio"], r["reference"], r["threshold"],
                                                          r["n"], r["strength"]))
    assert sweep.run_sweep(parse(toy_argv(tiny_checkpoint, out))) == 0
    cost = json.loads((out / "cost.json").read_text())
    expected = sum(sweep.shared_cost(m, STEPS, 7.5, "Q", "R").rows for m in missing.values())
    assert cost["rows_computed_this_run"] == len(lines) - keep
    assert cost["unet_evaluations_run"] == expected < 2 * SHARED_PER_IMAGE
    resumed, first = rows_of(out), rows_of(base)
    kept = {sweep.row_key(json.loads(line)) for line in lines[:keep]}
    assert_same_rows({k: resumed[k] for k in kept}, {k: first[k] for k in kept})  # not recomputed: unchanged
    # Image 1 is recomputed whole (the same batches as the first run: bit-identical); image 0's last row alone,
    # in a smaller batch: the same up to float32 rounding (see the docstring of the noise-prefix test).
    assert_same_rows(resumed, first, tol=1e-2)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)
    # Nothing left: a third run computes nothing.
    assert sweep.run_sweep(parse(toy_argv(tiny_checkpoint, out))) == 0
    assert json.loads((out / "cost.json").read_text())["unet_evaluations_run"] == 0


def test_resuming_with_other_fixed_settings_is_refused(base, tiny_checkpoint, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(base, out)
    args = parse(toy_argv(tiny_checkpoint, out, "--steps", 5))
    with pytest.raises(UsageError, match="--out .*steps 4 -> 5"):
        sweep.run_sweep(args)
    with pytest.raises(ValueError, match="--out .*normalization 'quantile' -> 'clamp'"):
        sweep.run_sweep(parse(toy_argv(tiny_checkpoint, out, "--normalization", "clamp")))
    with pytest.raises(ValueError, match="--out .*dtype 'float32' -> 'bfloat16'"):  # auto may mean another dtype
        sweep.run_sweep(parse(toy_argv(tiny_checkpoint, out, "--dtype", "bfloat16")))


def test_a_sweep_with_another_normalization_gives_the_single_edit_masks_of_that_rule(tiny_checkpoint):
    item = sweep.load_items("toy:1", 12345, 16)[0]
    image, seed = item.load(), 12345 * 1000
    de = DiffEdit.from_pretrained(str(tiny_checkpoint), dtype=torch.float64)
    settings = sweep.grid([0.5], [0.3, 0.5], [2], [0.5], ["caption"], ["diffedit"])
    for rule in ("clamp", "minmax", "quantile"):
        outputs = sweep.edit_grid(de, image, item.source, item.target, settings, STEPS, 7.5, seed, normalization=rule)
        for o in outputs:
            ref = de.edit(image, item.target, source=item.source, ratio=0.5, threshold=o.setting.threshold, n=2,
                          steps=STEPS, seed=seed, normalization=rule)
            assert torch.equal(o.map, ref.mask_map) and torch.equal(o.mask, ref.mask_map > o.setting.threshold), rule


def test_a_sweep_row_at_dilate_d_is_the_single_edit_at_dilate_d_and_shares_d(tiny_checkpoint):
    item = sweep.load_items("toy:1", 12345, 16)[0]
    image, seed = item.load(), 12345 * 1000
    de = DiffEdit.from_pretrained(str(tiny_checkpoint), dtype=torch.float64)
    settings = sweep.grid([0.5], [0.3], [2], [0.5], ["caption"], ["diffedit"], [0, 1, 2])
    assert [s.dilate for s in settings] == [0, 1, 2]
    assert sweep.shared_cost(settings, STEPS, 7.5, "Q", "R").rows == 2 + 2 * 2 + 3 * 2 * 2  # one encoding, one D
    outputs = sweep.edit_grid(de, image, item.source, item.target, settings, STEPS, 7.5, seed)
    assert outputs[0].map is outputs[1].map is outputs[2].map  # one D for every dilate
    for o in outputs:
        ref = de.edit(image, item.target, source=item.source, ratio=0.5, threshold=0.3, n=2, steps=STEPS, seed=seed,
                      dilate=o.setting.dilate)
        assert torch.equal(o.map, ref.mask_map)
        assert np.array_equal(np.asarray(images.mask_to_pil(o.mask, image.size)), np.asarray(ref.mask))
        assert (o.latents - ref.latents).abs().max().item() < 1e-10, o.setting
    assert outputs[1].mask.sum() > outputs[0].mask.sum()


def test_rows_written_before_dilate_existed_resume_as_dilate_0(base, tiny_checkpoint, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(base, out)
    old = [{k: v for k, v in r.items() if k != "dilate"} for r in sweep.read_rows(out / "results.jsonl")]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert sweep.run_sweep(parse(toy_argv(tiny_checkpoint, out))) == 0
    assert json.loads((out / "cost.json").read_text())["unet_evaluations_run"] == 0  # the same rows: none redone
    assert rows_of(out).keys() == rows_of(base).keys()
    assert all(r["dilate"] == (0 if r["method"] == "diffedit" else None) for r in rows_of(out).values())
    assert sweep.plan.upgrade({"method": "masked-sdedit"})["dilate"] == 0  # masked: the paper's mask, as DiffEdit


def test_masked_sdedit_alone_draws_its_noises_and_shows_the_mask_diffedit_would(tiny_checkpoint, tmp_path):
    common = ["--images", "toy:1", "--toy-size", 16, "--steps", 2, "--ratio", "0.5", "--n", "2", "--model",
              tiny_checkpoint, "--dtype", "float32", "-q"]
    alone, both = tmp_path / "alone", tmp_path / "both"
    assert sweep.run_sweep(parse([*common, "--method", "masked-sdedit", "--out", alone])) == 0
    assert sweep.run_sweep(parse([*common, "--method", "masked-sdedit,diffedit", "--out", both])) == 0
    assert json.loads((alone / "sweep.json").read_text())["n_max"] == 2
    stem = f"examples/toy-{12345}-0"
    for name in ("map.png", "mask.png", "map.npy", "mask.npy"):
        assert (alone / f"{stem}_{name}").read_bytes() == (both / f"{stem}_{name}").read_bytes(), name
    assert (alone / "plots" / "example.png").is_file()
    assert f"{stem}_mask.png" in (alone / "index.html").read_text()
    assert plots.mask_method(sweep.summarize(sweep.read_rows(alone / "results.jsonl"))) == "masked-sdedit"


def test_torchrun_with_two_processes_merges_to_the_single_process_rows(base, tiny_checkpoint, tmp_path):
    out = tmp_path / "ddp"
    argv = ["--noises" if a == "--n" else str(a) for a in toy_argv(tiny_checkpoint, out)]  # torchrun reads --n as its own
    cmd = ["nice", "-n", "15", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffedit.sweep", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("results.rank*.jsonl"))
    assert_same_rows(rows_of(out), rows_of(base))
    cost = json.loads((out / "cost.json").read_text())
    assert cost["unet_evaluations_run"] == 2 * SHARED_PER_IMAGE  # summed over the ranks
    assert (out / "index.html").is_file() and (out / "summary.csv").is_file()


def _prompt_images(folder: Path, sizes=((16, 16), (20, 12))) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(0)
    (folder / "img").mkdir()
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "img" / f"p{i}.png")
        rows.append((f"img/p{i}.png", f"a blue circle number {i}", f"a red square number {i}"))
    return rows


def test_prompts_files_csv_and_jsonl_give_the_same_rows(tiny_checkpoint, tmp_path):
    records = _prompt_images(tmp_path)
    (tmp_path / "p.csv").write_text("image,source,target\n" + "".join(f'{a},"{b}",{c}\n' for a, b, c in records))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(dict(image=a, source=b, target=c)) + "\n"
                                              for a, b, c in records))
    results = []
    for name in ("p.csv", "p.jsonl"):
        out = tmp_path / f"out_{name}"
        argv = ["--images", tmp_path / name, "--ratio", "0.5", "--n", "1", "--steps", 2, "--method",
                "diffedit,encode-decode", "--model", tiny_checkpoint, "--out", out, "-q", "--examples", 1]
        assert sweep.run_sweep(parse(argv)) == 0
        results.append(rows_of(out))
        rows = list(results[-1].values())
        assert len(rows) == 4 and {r["image"] for r in rows} == {"0:img/p0.png", "1:img/p1.png"}
        assert all({"psnr", "ssim"} <= r.keys() and "iou" not in r and "success" not in r for r in rows)
        assert all(("mask_area" in r) == (r["method"] == "diffedit") for r in rows)
        page = (out / "index.html").read_text()
        assert sweep.perceptual_note(None, None) in page and "examples/0_img_p0.png_input.png" in page
    assert_same_rows(*results)


@pytest.mark.parametrize("extra, flag", [
    (["--images", "toy:2", "--seed", "0"], "--seed"),
    (["--images", "toy:x"], "--images"),
    (["--images", "no/such/prompts.csv"], "--images"),
    (["--ratio", "0.5,abc"], "--ratio"),
    (["--ratio", "1.5"], "--ratio"),
    (["--ratio", "0"], "--ratio"),
    (["--threshold", "0.5,"], "--threshold"),
    (["--n", "0,2"], "--n"),
    (["--n", "2.5"], "--n"),
    (["--strength", "nan"], "--strength"),
    (["--method", "diffedit,inpaint"], "--method"),
    (["--reference", "none"], "--reference"),
    (["--steps", "0"], "--steps"),
    (["--world", "v3"], "--world: 'v3' is not a toy world"),
    (["--dilate", "0,-1"], "--dilate must be >= 0"),
    (["--dilate", "1.5"], "--dilate: '1.5' is not an integer"),
    (["--dilate", "17"], "--dilate must be >= 0 and at most 16 "),
    (["--dilate", "0,,1"], "--dilate"),
    (["--n", f"2,{MAX_N + 1}"], f"--n must be >= 1 and at most {MAX_N} "),
    (["--steps", str(MAX_STEPS + 1)], f"--steps must be >= 1 and at most {MAX_STEPS} "),
])
def test_bad_input_is_a_usage_error_naming_the_flag(tmp_path, extra, flag):
    argv = ["--images", "toy:2", "--out", tmp_path / "o", "--model", tmp_path / "never-loaded.safetensors", *extra]
    with pytest.raises(UsageError, match=flag):
        sweep.run_sweep(parse(argv))


def _model_file(path: Path, recipe: dict | None) -> Path:
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(1, np.float32)}, str(path), metadata=recipe and {"recipe": json.dumps(recipe)})
    return path


def test_a_toy_models_world_is_its_recipes_and_v1_without_one(tmp_path):
    from diffedit.toy import model_world, world
    assert model_world(str(_model_file(tmp_path / "v2.safetensors", {"world": "v2", "batch": 32}))) is world.V2
    assert model_world(str(_model_file(tmp_path / "old.safetensors", {"batch": 32}))) is world.V1
    assert model_world(str(_model_file(tmp_path / "sd.safetensors", None))) is world.V1
    assert model_world("org/some-diffusers-model") is world.V1
    assert model_world("toy") in world.WORLDS.values()
    with pytest.raises(ValueError, match="toy world 'v9'"):
        model_world(str(_model_file(tmp_path / "v9.safetensors", {"world": "v9"})))


def test_the_world_option_reaches_the_items_a_v2_sweep_draws_v2_scenes(tmp_path):
    from diffedit.toy import world
    v2_model = str(_model_file(tmp_path / "v2.safetensors", {"world": "v2"}))
    argv = ["--images", "toy:6", "--out", tmp_path / "o", "--toy-size", 64, "--steps", 50, "--guidance", 7.5]
    chosen = cli.parse_config(parse([*argv, "--world", "v2", "--model", tmp_path / "never-loaded.safetensors"]))
    by_recipe = cli.parse_config(parse([*argv, "--model", v2_model]))
    plain = cli.parse_config(parse([*argv, "--model", tmp_path / "never-loaded.safetensors"]))
    want = world.edits(6, world.EVAL_SEED, spec=world.V2)
    for cfg in (chosen, by_recipe):
        assert cfg.fingerprint["world"] == "v2" and [i.edit for i in cfg.items] == want
        assert cfg.items[0].id == f"toy-v2-{world.EVAL_SEED}-0"
    assert all(world.V2.radius[0] <= o.r for i in chosen.items for o in i.edit.source.objects)
    assert plain.fingerprint["world"] == "v1" and [i.edit for i in plain.items] == world.edits(6, world.EVAL_SEED)
    assert plain.items[0].id == f"toy-{world.EVAL_SEED}-0"  # v1 ids as before the choice


def test_importing_the_sweep_and_building_its_parser_load_neither_torch_nor_numpy():
    """``diffedit --help`` builds this parser: it must stay fast."""
    probe = "import sys, diffedit.sweep as s; s.build_parser(); print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_dtype_and_normalisation_choices_follow_precision_and_settings():
    from diffedit import frontend  # the front ends' one list of --dtype choices
    assert set(frontend.DTYPES) == {"auto", *precision.DTYPES} - {"float64"}
    assert cli.NORMALIZATIONS == ("quantile", "clamp", "minmax")  # settings' rules but the diffusers recipe's
    assert set(cli.NORMALIZATIONS) < set(NORMALIZATIONS)


def test_bad_prompts_files_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("image,text\nx.png,hello\n")
    with pytest.raises(UsageError, match="--images .*image,source,target"):
        sweep.load_items(str(tmp_path / "bad.csv"), 1, 64)
    (tmp_path / "gone.jsonl").write_text(json.dumps({"image": "gone.png", "source": "a", "target": "b"}) + "\n")
    with pytest.raises(UsageError, match="line 1: image not found"):
        sweep.load_items(str(tmp_path / "gone.jsonl"), 1, 64)
    (tmp_path / "latin1.csv").write_bytes("image,source,target\nx.png,caf\xe9,b\n".encode("latin-1"))
    with pytest.raises(UsageError, match="--images .*latin1.csv: not UTF-8"):
        sweep.load_items(str(tmp_path / "latin1.csv"), 1, 64)


def test_main_reports_bad_input_in_one_line_and_lets_a_bug_propagate(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    assert sweep.main(["--images", "toy:2", "--ratio", "1.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ratio" in err
    assert sweep.main(["--images", "toy:1", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "none.safetensors" in err

    def bug(self, *args, **kwargs):
        raise ValueError("an engine bug, not the user's mistake")
    monkeypatch.setattr(Engine, "edits", bug)
    argv = ["--images", "toy:1", "--toy-size", "16", "--steps", "2", "--n", "1", "--model", str(tiny_checkpoint),
            "--out", str(tmp_path / "bug"), "-q"]
    with pytest.raises(ValueError, match="an engine bug"):
        sweep.main(argv)
    with pytest.raises(ValueError, match="an engine bug"):
        diffedit_cli.main(["sweep", *argv])


def test_the_sweep_loads_its_model_as_the_other_front_ends_from_its_config_alone(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """The parsed arguments stop at the parser: the loader (frontend.load_pipeline, as the CLI and the app use it)
    gets the sweep's Config."""
    seen = []

    def spy(choice, device=None, **options):
        seen.append((choice, device, options))
        return load_pipeline(choice, device, **options)
    monkeypatch.setattr(frontend, "load_pipeline", spy)
    argv = ["--images", "toy:1", "--toy-size", 16, "--steps", 2, "--n", 1, "--model", tiny_checkpoint, "--out",
            tmp_path, "--max-batch", 3, "--prediction-type", "epsilon", "-q"]
    assert sweep.run_sweep(parse(argv)) == 0
    (choice, device, options), = seen
    assert isinstance(choice, sweep.Config)
    assert (choice.model, choice.prediction_type, device, options) == (str(tiny_checkpoint), "epsilon", "cpu",
                                                                       {"max_batch": 3})


def test_a_torn_last_line_is_cut_and_complete_rows_are_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert sweep.read_rows(path, repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a": 2}')  # complete but unterminated: kept, and terminated
    assert sweep.read_rows(path, repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_local_lpips_and_clip_weights_add_both_metrics_to_every_row(tiny_checkpoint, alexnet_file, tiny_clip,
                                                                       tmp_path):
    pytest.importorskip("lpips")
    from diffedit.perceptual import CLIPScore, LPIPS
    records = _prompt_images(tmp_path, sizes=[(32, 32), (48, 32)])  # AlexNet (LPIPS) needs >= 32 px
    (tmp_path / "p.csv").write_text("image,source,target\n" + "".join(f'{a},"{b}",{c}\n' for a, b, c in records))
    out = tmp_path / "out"
    argv = ["--images", tmp_path / "p.csv", "--ratio", "0.5", "--n", "1", "--steps", 2, "--method",
            "diffedit,sdedit", "--model", tiny_checkpoint, "--out", out, "-q", "--examples", 1,
            "--lpips-weights", alexnet_file[0], "--clip-weights", tiny_clip[0], "--clip-model", "diffedit-test-clip"]
    assert sweep.run_sweep(parse(argv)) == 0
    rows = list(rows_of(out).values())
    assert len(rows) == 4 and all(r["lpips"] >= 0 and 0 <= r["clip_score"] <= 100 for r in rows)
    # the example files hold the edit of the first image at the paper-closest DiffEdit setting: recompute on them
    first = next(r for r in rows if r["index"] == 0 and r["method"] == "diffedit")
    edit = Image.open(next((out / "examples").glob("0_*diffedit*.png")))
    source = Image.open(out / "examples" / "0_img_p0.png_input.png")
    assert first["lpips"] == pytest.approx(LPIPS(alexnet_file[0])(edit, source), rel=1e-5, abs=1e-7)
    assert first["clip_score"] == pytest.approx(
        CLIPScore(tiny_clip[0], "diffedit-test-clip")(edit, records[0][2]), rel=1e-5, abs=1e-5)
    page = (out / "index.html").read_text()
    assert "LPIPS to the input computed; CLIP score with the target computed" in page
    # resuming the same folder without the metrics would mix rows with and without them: refused
    with pytest.raises(UsageError, match="lpips 'alexnet-v0.1' -> None; clip_model 'diffedit-test-clip' -> None"):
        sweep.run_sweep(parse(argv[:-6]))


def test_a_bad_weights_file_stops_the_sweep_in_one_line_before_any_work(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert sweep.main(["--images", "toy:1", "--toy-size", "16", "--model", str(tiny_checkpoint), "--out", str(out),
                       "--clip-weights", str(tmp_path / "none.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--clip-weights" in err and "none.bin: no such file" in err
    assert not out.exists()


def test_a_figure_the_grid_no_longer_supports_is_removed_not_left_stale(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "mask_vs_n.png").write_bytes(b"an earlier run's figure")
    argv = ["--images", "toy:1", "--toy-size", 16, "--steps", 2, "--n", "2", "--model", tiny_checkpoint, "--out", out,
            "-q"]
    assert sweep.run_sweep(parse(argv)) == 0
    assert not (out / "plots" / "mask_vs_n.png").exists()
    assert "mask_vs_n.png" not in (out / "index.html").read_text()
