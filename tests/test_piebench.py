"""PIE-Bench in the sweep (diffedit/piebench/, ``diffedit sweep --images piebench:DIR``) on the toy model.

The mask decoder against masks the tests encode (borders included), prompts with brackets and nested folders, the toy
world exported in PIE's layout, one sweep end to end over a small export (piebench.csv, the summaries, the plots, the
oracle-mask row, the edits in PIE's layout), a resumed run adding nothing, and bad folders refused in one line naming
the file and the key. The metric networks are absent here: only the background PSNR / MSE / SSIM and mask_iou fill.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit import metrics
from diffedit.piebench import data, export
from diffedit.piebench.metrics import METRICS
from diffedit.piebench.score import setting_dir
from diffedit.settings import UsageError
from diffedit.sweep import Setting, cli, shared_cost
from diffedit.toy import world

SIZE = data.SIZE
STEPS = 4
SEED = 4242  # the export's draw: held out from training
GRID = ["--ratio", "0.5,0.8", "--n", "2", "--method", "diffedit,masked-sdedit,sdedit",
        "--mask-source", "estimated,annotated"]
SETTINGS = 2 * (2 * 2 + 1)  # ratios x (masked methods x mask sources + SDEdit)


def bordered(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = True
    return out


def test_the_decoder_reads_masks_encoded_here_and_sets_the_border():
    rng = np.random.default_rng(0)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[100:300, 50:420] = True
    mask[rng.random((SIZE, SIZE)) < 0.01] = True
    mask[SIZE - 1, SIZE - 3:] = True  # a run that ends on the last pixel
    assert np.array_equal(data.decode_mask(data.encode_mask(mask)), bordered(mask))
    # by hand: three ones from pixel 0, four from row 5 column 10; a run past the end is clipped, as officially
    runs = [0, 3, SIZE * 5 + 10, 4, SIZE * SIZE - 2, 100]
    m = data.decode_mask(runs)
    assert m[5, 10:14].all() and not m[5, 14] and not m[5, 9] and m[0, :].all() and m[:, -1].all()
    assert m[-1, -2:].all() and m.sum() == 4 * SIZE - 4 + 4
    assert np.array_equal(data.decode_mask([]), bordered(np.zeros((SIZE, SIZE), bool)))


def write_folder(root: Path, entries: dict, images: dict | None = None) -> Path:
    """A PIE-Bench folder: the mapping file and a 512 px image per entry (``images``: a size per image path)."""
    for rec in entries.values():
        if isinstance(rec, dict) and "image_path" in rec:
            path = root / data.IMAGES / rec["image_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            size = (images or {}).get(rec["image_path"], SIZE)
            Image.new("RGB", (size, size), (90, 120, 30)).save(path)
    (root / data.MAPPING).write_text(json.dumps(entries))
    return root


def entry(path: str, kind: str = "0", mask=(1000, 20)) -> dict:
    return {"image_path": path, "original_prompt": "a [cat] sitting on a [wooden] floor",
            "editing_prompt": "a [dog] sitting on a [marble] floor", "editing_instruction": "Make the cat a dog",
            "editing_type_id": kind, "blended_word": "cat dog", "mask": list(mask)}


def test_prompts_lose_their_brackets_and_nested_folders_are_read(tmp_path):
    folder = write_folder(tmp_path, {"000000000000": entry("0_random_140/000000000000.jpg"),
                                     "111000000000": entry("1_change_object_80/1_artificial/1_animal/111000000000.jpg",
                                                           "1"),
                                     "111000000001": entry("1_change_object_80/1_artificial/1_animal/111000000001.jpg",
                                                           "1")})
    es = data.load_entries(folder)
    assert [e.key for e in es] == ["000000000000", "111000000000", "111000000001"] and [e.index for e in es] == [0, 1, 2]
    assert es[0].source == "a cat sitting on a wooden floor" and es[0].target == "a dog sitting on a marble floor"
    assert es[1].image_path == "1_change_object_80/1_artificial/1_animal/111000000000.jpg"
    assert es[1].mask()[1000 // SIZE, 1000 % SIZE] and es[1].mask().sum() == 4 * SIZE - 4 + 20
    picked = data.load_entries(folder, ["1"], subset=1)  # a category, its first image; the index stays its own
    assert [(e.key, e.index) for e in picked] == [("111000000000", 1)]
    assert [i.id for i in cli.piebench_items(folder, ["0", "1"], 1)] == ["000000000000", "111000000000"]


@pytest.mark.parametrize("make, says", [
    (lambda root: root, "no mapping_file.json"),
    (lambda root: write_folder(root, {"k1": entry("a/k1.jpg")}) and (root / data.IMAGES / "a/k1.jpg").unlink(),
     "'k1': image not found"),
    (lambda root: write_folder(root, {"k2": entry("k2.jpg", mask=(10, 5, 20))}), "'k2': mask has 3 numbers"),
    (lambda root: write_folder(root, {"k3": entry("k3.jpg", mask=(SIZE * SIZE + 5, 2))}), "'k3': mask run"),
    (lambda root: write_folder(root, {"k4": entry("k4.jpg")}, {"k4.jpg": 256}), "'k4': image"),
    (lambda root: write_folder(root, {"k5": entry("k5.jpg", kind="12")}), "'k5': editing_type_id '12'"),
    (lambda root: write_folder(root, {"k6": {"image_path": "k6.jpg"}}), "'k6': missing original_prompt"),
])
def test_a_bad_folder_is_one_line_naming_the_file_and_key(tmp_path, capsys, make, says):
    folder = tmp_path / "pie"
    folder.mkdir()
    make(folder)
    with pytest.raises(UsageError, match=says):
        data.load_entries(folder)
    assert cli.main(["--images", f"piebench:{folder}", "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says.strip("'") in err and str(folder) in err
    assert not (tmp_path / "out").exists()


def test_the_toy_export_is_a_pie_folder_with_the_ground_truth_as_annotation(tmp_path):
    export.export(tmp_path, 4, SEED)
    es = data.load_entries(tmp_path)
    edits = world.edits(4, SEED)
    assert sorted(e.editing_type_id for e in es) == ["1", "3", "6", "8"]
    for e, edit in zip(es, edits):
        assert e.editing_type_id == export.KIND_CATEGORY[edit.kind] and "/toy_v1/" in e.image_path
        up = np.kron(edit.footprint(), np.ones((SIZE // 64, SIZE // 64), bool))
        assert np.array_equal(e.mask(), bordered(up))
        img = np.asarray(Image.open(tmp_path / data.IMAGES / e.image_path))
        assert np.array_equal(img[::8, ::8], edit.source.render())
        assert (e.source, e.target) == (edit.source_caption, edit.target_caption)
    rec = json.loads((tmp_path / data.MAPPING).read_text())[es[0].key]
    assert "[" in rec["editing_prompt"] or edits[0].kind == "remove"
    with pytest.raises(UsageError, match="training seed"):
        export.export(tmp_path / "x", 2, world.TRAIN_SEED)


def test_the_annotated_mask_plans_no_mask_pass():
    est = shared_cost([Setting("diffedit", 0.5, "caption", 0.5, 2, 0.5)], STEPS, 7.5, "Q", "R")
    given = shared_cost([Setting("diffedit", 0.5, "caption", mask_source="annotated")], STEPS, 7.5, "Q", "R")
    assert est.mask == 2 * 2 and given.mask == 0 and (given.inversion, given.decoding) == (est.inversion, est.decoding)


def argv(folder, out, *extra):
    return ["--images", f"piebench:{folder}", *GRID, "--steps", STEPS, "--out", out, "--dtype", "float32", "-q",
            *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A toy export of 4 images (one per category) swept once: (folder, out)."""
    folder = tmp_path_factory.mktemp("pie")
    export.export(folder, 4, SEED)
    out = tmp_path_factory.mktemp("pie_out")
    assert cli.main([str(a) for a in argv(folder, out)]) == 0
    return folder, out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def folder_of(row: dict) -> str:
    """The setting folder of a CSV row (its knobs read back as numbers)."""
    num = {"ratio": float, "threshold": float, "strength": float, "n": int, "dilate": int}
    return setting_dir({k: (num[k](v) if k in num and v else v or None) for k, v in row.items()})


def test_piebench_csv_has_one_row_per_image_and_setting(run):
    folder, out = run
    rows = read_csv(out / "piebench.csv")
    assert list(rows[0]) == ["file_id", "editing_type_id", "method", "ratio", "threshold", "n", "strength",
                             "reference", "dilate", "mask_source", *METRICS, "mask_iou"]
    assert len(rows) == 4 * SETTINGS and len({(r["file_id"], folder_of(r)) for r in rows}) == len(rows)
    for r in rows:
        for m in ("psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"):
            assert np.isfinite(float(r[m]))
        assert all(r[m] == "" for m in ("structure_distance", "lpips_unedit_part", "clip_similarity_target_image"))
        assert (r["mask_iou"] == "") == (r["method"] == "sdedit")
    es = {e.key: e for e in data.load_entries(folder)}
    for r in rows:  # the edits in PIE's layout, at 512 px
        path = out / folder_of(r) / "annotation_images" / es[r["file_id"]].image_path
        assert Image.open(path).size == (SIZE, SIZE)
    assert {r["editing_type_id"] for r in rows} == {"1", "3", "6", "8"}


def test_the_oracle_row_decodes_with_the_annotated_mask_at_latent_size(run):
    folder, out = run
    es = {e.key: e for e in data.load_entries(folder)}
    oracle = [r for r in read_csv(out / "piebench.csv") if r["mask_source"] == "annotated"]
    assert len(oracle) == 4 * 2 * 2 and all(r["threshold"] == r["n"] == "" for r in oracle)
    for r in oracle:  # the project's downsampling rule (majority of 32 x 32 px blocks: 512 px to 16 x 16 latents)
        truth = es[r["file_id"]].mask()
        used = metrics.resize_mask(metrics.downsample_mask(truth, SIZE // 16), SIZE)
        assert float(r["mask_iou"]) == pytest.approx(metrics.iou(used, truth), abs=1e-7)
    # one mask for both masked methods: the pair isolates the encoding against fresh noise
    iou = {(r["file_id"], r["method"], r["ratio"]): r["mask_iou"] for r in oracle}
    assert all(iou[(f, "diffedit", q)] == iou[(f, "masked-sdedit", q)] for f, _, q in iou)


def test_summaries_pairs_and_plots(run):
    _, out = run
    summary = read_csv(out / "piebench_summary.csv")
    assert {r["category"] for r in summary} == {"all", "1", "3", "6", "8"}
    assert all(int(r["count"]) == (4 if r["category"] == "all" else 1) for r in summary)
    assert len([r for r in summary if r["category"] == "all"]) == SETTINGS
    page = (out / "piebench.md").read_text()
    for title in ("## All images", "## Category 6: change colour", "## Category 3: delete object", "Paired per image",
                  "Metrics not computed"):
        assert title in page
    paired = read_csv(out / "piebench_paired.csv")
    kinds = {r["comparison"] for r in paired}
    assert kinds == {"diffedit - masked-sdedit (same mask)", "diffedit estimated - annotated mask (oracle)"}
    for r in paired:
        assert float(r["ci95_low"]) <= float(r["mean_a_minus_b"]) <= float(r["ci95_high"])
        assert int(r["a_above"]) + int(r["a_below"]) <= int(r["images"])
    assert (out / "plots" / "piebench_background_vs_ratio.png").is_file()
    assert not (out / "plots" / "piebench_tradeoff.png").exists()  # no CLIP weights: no edit axis to plot
    assert "piebench_background_vs_ratio.png" in (out / "index.html").read_text()


def test_a_resumed_run_adds_nothing(run):
    folder, out = run
    before = (out / "results.jsonl").read_text()
    assert cli.main([str(a) for a in argv(folder, out)]) == 0
    assert (out / "results.jsonl").read_text() == before
    assert json.loads((out / "cost.json").read_text())["unet_evaluations_run"] == 0
    assert len(read_csv(out / "piebench.csv")) == 4 * SETTINGS


@pytest.mark.parametrize("extra, says", [
    (["--mask-source", "annotated", "--method", "sdedit"], "needs a masked method"),
    (["--categories", "1,11"], "--categories: '11'"),
    (["--subset", "0"], "--subset must be >= 1"),
])
def test_piebench_options_are_checked(run, tmp_path, capsys, extra, says):
    folder, _ = run
    assert cli.main([str(a) for a in argv(folder, tmp_path / "o", *extra)]) == 2
    assert says in capsys.readouterr().err


def test_options_of_other_sources_are_refused(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    prompts.write_text("image,source,target\na.png,a cat,a dog\n")
    for extra, says in ((["--mask-source", "annotated"], "needs images with annotated masks"),
                        (["--subset", "2"], "only with --images piebench:DIR")):
        assert cli.main(["--images", str(prompts), "--out", str(tmp_path / "o"), *extra, "-q"]) == 2
        assert says in capsys.readouterr().err
