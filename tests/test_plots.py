"""plots.py: a figure is drawn for each knob the grid varied, and none along a knob it did not."""
import pytest
from PIL import Image

from diffedit import plots

pytest.importorskip("matplotlib")


def rows(strengths=(0.5,), references=("caption",), thresholds=(0.5,), ns=(10,)):
    return [{"method": "diffedit", "ratio": 0.7, "threshold": th, "n": n, "strength": s, "reference": ref,
             "iou": 0.3 + 0.1 * s + (0.05 if ref == "caption" else 0.0)}
            for s in strengths for ref in references for th in thresholds for n in ns]


def test_mask_vs_strength_draws_one_line_per_reference(tmp_path):
    path = plots.mask_vs_strength(rows(strengths=(0.25, 0.5, 0.75), references=("empty", "caption")),
                                  tmp_path / "s.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_no_figure_along_a_knob_the_grid_did_not_vary(tmp_path):
    single = rows(references=("empty", "caption"))  # lines, but nothing along the x axis
    assert plots.mask_vs_strength(single, tmp_path / "s.png") is None
    assert plots.mask_vs_threshold(single, tmp_path / "t.png") is None
    assert plots.mask_vs_n(single, tmp_path / "n.png") is None
    assert plots.mask_vs_threshold(rows(thresholds=(0.25, 0.5)), tmp_path / "t.png") is not None
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "n.png").exists()
