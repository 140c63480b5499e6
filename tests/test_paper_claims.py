"""scripts/paper_claims.py: the verdicts follow from the rows (synthetic rows with known answers)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("paper_claims", Path(__file__).parents[1] / "scripts" / "paper_claims.py")
pc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pc)


def rows(knob, values_per_image, metric="iou", method="diffedit"):
    return [{"image": f"img{i}", "method": method, knob: k, metric: v}
            for i, per in enumerate(values_per_image) for k, v in per.items()]


def test_paired_difference_mean_and_standard_error_match_hand_computation():
    r = rows("threshold", [{0.5: 0.6, 0.25: 0.5}, {0.5: 0.7, 0.25: 0.4}, {0.5: 0.5, 0.25: 0.5}])
    got = pc.paired(r, "threshold", 0.5, 0.25, "iou")
    # diffs 0.1, 0.3, 0.0: mean 0.1333, sample sd 0.1528, SE = sd / sqrt(3) = 0.0882
    assert got["mean_diff"] == pytest.approx(0.4 / 3)
    assert got["se"] == pytest.approx(0.0881917, rel=1e-5)
    assert got["verdict"] == "within noise" and got["images"] == 3


def test_paired_verdict_is_yes_no_or_within_noise_by_two_standard_errors():
    better = rows("n", [{10: 0.6 + 0.01 * i, 1: 0.4} for i in range(5)])
    assert pc.paired(better, "n", 10, 1, "iou")["verdict"] == "yes"
    assert pc.paired(better, "n", 1, 10, "iou")["verdict"] == "no"


def test_paired_ignores_other_methods_and_images_missing_a_side():
    r = rows("strength", [{0.5: 0.9, 0.25: 0.1}, {0.5: 0.8}]) + rows("strength", [{0.5: 0.0, 0.25: 1.0}], method="sdedit")
    got = pc.paired(r, "strength", 0.5, 0.25, "iou")
    assert got["images"] == 1 and got["mean_diff"] == pytest.approx(0.8)


def test_paired_without_comparable_rows_stops_with_a_message():
    with pytest.raises(SystemExit, match="no diffedit rows with reference = 'caption' and 'empty' to compare"):
        pc.paired(rows("reference", [{"caption": 0.5}]), "reference", "caption", "empty", "iou")


def _curve(method, points):
    return [{"image": "a", "method": method, "ratio": r, "bg_ssim": 1 - d, "success": s} for r, (d, s) in points.items()]


def test_dominated_when_every_baseline_point_has_a_nearer_and_better_diffedit_point():
    ours = _curve("diffedit", {0.5: (0.1, 0.5), 0.9: (0.2, 0.8)})
    base = _curve("sdedit", {0.5: (0.3, 0.4), 0.9: (0.5, 0.8)})
    got = pc.dominated(ours + base, "sdedit")
    assert got["verdict"] == "yes" and got["points_dominated"] == 2


def test_not_dominated_when_a_baseline_point_is_more_successful_than_every_diffedit_point():
    ours = _curve("diffedit", {0.5: (0.1, 0.5), 0.9: (0.2, 0.8)})
    base = _curve("sdedit", {0.5: (0.3, 0.4), 0.9: (0.5, 0.9)})
    got = pc.dominated(ours + base, "sdedit")
    assert got["verdict"] == "no" and got["points_dominated"] == 1 and got["points"] == 2


def test_the_dilate_ablation_is_judged_on_success_and_background_psnr_not_iou(tmp_path):
    assert pc.SWEEPS["dilate"] == ["--dilate", "0,1,2"]
    kinds = ["shape", "colour"] * 3
    rows = [{"image": f"img{i}", "method": "diffedit", "kind": kind, "dilate": d, "iou": 0.5 - 0.1 * d,
             "success": float(d > 0 and kind == "shape"), "bg_psnr": 30.0 - d - 0.1 * i}
            for i, kind in enumerate(kinds) for d in (0, 1, 2)]
    (tmp_path / "dilate").mkdir()
    (tmp_path / "dilate" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    success, psnr = pc.beyond(tmp_path)
    assert (success["metric"], success["a"], success["b"]) == ("success", 1, 0)
    assert success["mean_diff"] == pytest.approx(0.5) and success["verdict"] == "yes"
    assert "shape edits 0.000 at 0, 1.000 at 1, 1.000 at 2" in success["evidence"]
    assert (psnr["metric"], psnr["a"], psnr["b"], psnr["verdict"]) == ("bg_psnr", 0, 1, "yes")
    assert psnr["mean_diff"] == pytest.approx(1.0)


def test_paper_claims_and_evaluate_toy_refuse_a_missing_model_in_one_line_before_any_work(tmp_path):
    root, missing = Path(__file__).parents[1], str(tmp_path / "none.safetensors")
    for script, flags in (("paper_claims", ["--out", str(tmp_path / "out")]), ("evaluate_toy", ["--n", "1"])):
        proc = subprocess.run([sys.executable, str(root / "scripts" / f"{script}.py"), "--model", missing, *flags],
                              cwd=root, capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert err[-1].endswith(f"--model no such file or folder: {missing}")
    assert not (tmp_path / "out").exists()  # stopped before the first sweep


def test_the_tradeoff_sweep_runs_every_method_and_dominance_is_judged_per_kind():
    assert pc.SWEEPS["tradeoff"][-1] == ",".join(pc.METHODS) and "masked-sdedit" in pc.METHODS
    ours = _curve("diffedit", {0.5: (0.1, 0.5)})
    base = _curve("sdedit", {0.5: (0.3, 0.4)})
    kinds = {"colour": (ours, base),
             "shape": (_curve("diffedit", {0.5: (0.1, 0.1)}), _curve("sdedit", {0.5: (0.3, 0.9)}))}
    rows = [dict(r, image=kind, kind=kind) for kind, (a, b) in kinds.items() for r in a + b]
    assert pc.dominated(rows, "sdedit", "colour")["verdict"] == "yes"
    shape = pc.dominated(rows, "sdedit", "shape")
    assert (shape["verdict"], shape["kind"], shape["images"]) == ("no", "shape", 1)
    assert pc.dominated(rows, "sdedit", "remove")["images"] == 0  # no such edits: claims() leaves the kind out


def test_synergy_pairs_diffedit_with_masked_sdedit_per_image_at_the_papers_ratio():
    r = pc.SYNERGY_RATIO
    rows = [{"image": f"img{i}", "kind": kind, "method": m, "ratio": ratio, "success": s, "bg_psnr": p}
            for i, kind in enumerate(["colour", "shape"] * 3)
            for m, s, p in (("diffedit", 1.0, 30.0 + i), ("masked-sdedit", float(kind == "shape"), 30.0 + i))
            for ratio in (r, 0.9)]
    rows.append({"image": "lonely", "kind": "colour", "method": "diffedit", "ratio": r, "success": 0.0, "bg_psnr": 0.0})
    success, psnr = pc.synergy(rows)
    got = (success["sweep"], success["a"], success["b"], success["ratio"])
    assert got == ("synergy", "diffedit", "masked-sdedit", r)
    # diffs 1, 0, 1, 0, 1, 0: mean 0.5, SE 0.224
    assert success["images"] == 6 and success["mean_diff"] == pytest.approx(0.5) and success["verdict"] == "yes"
    assert success["by_kind"]["colour"] == {"diffedit": 0.75, "masked-sdedit": 0.0}  # means include every image
    assert (psnr["mean_diff"], psnr["verdict"]) == (0.0, "within noise")
    with pytest.raises(SystemExit, match="no rows of both diffedit and masked-sdedit at ratio 0.3"):
        pc.versus(rows, "diffedit", "masked-sdedit", "success", 0.3)


def test_kind_plots_draw_one_tradeoff_figure_per_kind_present(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"image": f"{kind}{i}", "kind": kind, "method": m, "ratio": r, "reference": "caption",
             "threshold": 0.5 if m == "diffedit" else None, "n": 10 if m == "diffedit" else None,
             "strength": 0.5 if m == "diffedit" else None, "dilate": 0 if m == "diffedit" else None,
             "bg_ssim": 0.9 - r / 10, "success": r} for kind in ("colour", "remove") for i in range(2)
            for m in ("diffedit", "sdedit") for r in (0.5, 0.9)]
    (tmp_path / "tradeoff").mkdir()
    (tmp_path / "tradeoff" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pc.kind_plots(tmp_path) == ["tradeoff_colour.png", "tradeoff_remove.png"]
    assert (tmp_path / "tradeoff" / "plots" / "tradeoff_remove.png").stat().st_size > 0
