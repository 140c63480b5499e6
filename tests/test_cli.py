"""The ``diffedit`` command line (cli.py) and its pictures (viz.py), on a tiny random checkpoint.

Bad input must end in one line ``diffedit: error: ...`` on stderr with exit status 2, before the model is
loaded where the arguments alone show the problem, and the input image must never change."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import cli, viz
from diffedit.engine import Engine
from diffedit.pipeline import DiffEdit
from diffedit.settings import UsageError

FAST = ["--steps", "4", "--n", "2", "-q"]


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (53, 37, 4), dtype=np.uint8), mode="RGBA").save(path)  # 37 x 53, odd
    return path


def fingerprint(path: Path):
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def run(argv, capsys):
    """cli.main in-process -> (exit status, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: arguments must be checked first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(DiffEdit, "from_pretrained", classmethod(refuse))


# --- bad input -----------------------------------------------------------------------------------------------

def _setup(tmp_path: Path, image: Path) -> dict:
    """Files the bad cases refer to, by name."""
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_bytes(b"")
    (tmp_path / "link.png").symlink_to(image)
    Image.new("L", (10, 40)).save(tmp_path / "tall_mask.png")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    return {"IMG": image, "T": tmp_path}


BAD = [  # (argv with IMG / T placeholders, words the one-line message must contain)
    (["edit", "T/missing.png", "--target", "a dog"], ["missing.png", "not found"]),
    (["edit", "T/junk.png", "--target", "a dog"], ["junk.png", "cannot read"]),
    (["edit", "T/folder", "--target", "a dog"], ["folder"]),
    (["edit", "IMG"], ["--target", "required"]),
    (["edit", "IMG", "--target", ""], ["--target", "non-empty"]),
    (["edit", "IMG", "--target", "   "], ["--target", "non-empty"]),
    (["edit", "IMG", "--target", "a dog", "--ratio", "0"], ["--ratio", "(0, 1]"]),
    (["edit", "IMG", "--target", "a dog", "--ratio", "1.5"], ["--ratio", "(0, 1]", "1.5"]),
    (["edit", "IMG", "--target", "a dog", "--ratio", "nan"], ["--ratio", "(0, 1]"]),
    (["edit", "IMG", "--target", "a dog", "--ratio", "abc"], ["--ratio", "invalid float", "abc"]),
    (["edit", "IMG", "--target", "a dog", "--threshold", "-0.1"], ["--threshold", "[0, 1]"]),
    (["edit", "IMG", "--target", "a dog", "--threshold", "1.5"], ["--threshold", "[0, 1]"]),
    (["edit", "IMG", "--target", "a dog", "--strength", "0"], ["--strength", "(0, 1]"]),
    (["edit", "IMG", "--target", "a dog", "--n", "0"], ["--n", ">= 1"]),
    (["edit", "IMG", "--target", "a dog", "--n", "100000"], ["--n", "at most 256", "100000"]),
    (["edit", "IMG", "--target", "a dog", "--steps", "5000"], ["--steps", "at most 1000", "5000"]),
    (["edit", "IMG", "--target", "a dog", "--steps", "0"], ["--steps", ">= 1"]),
    (["edit", "IMG", "--target", "a dog", "--steps", "2.5"], ["--steps", "invalid int"]),
    (["edit", "IMG", "--target", "a dog", "--guidance", "-1"], ["--guidance", ">= 0"]),
    (["edit", "IMG", "--target", "a dog", "--method", "foo"], ["--method", "invalid choice", "foo"]),
    (["edit", "IMG", "--target", "a dog", "--device", "gpu0"], ["--device", "unknown device", "gpu0"]),
    (["edit", "IMG", "--target", "a dog", "--device", "meta"], ["--device", "unsupported"]),
    (["edit", "IMG", "--target", "a dog", "--dtype", "float8"], ["--dtype", "invalid choice"]),
    (["edit", "IMG", "--target", "a dog", "--out", "IMG"], ["--out", "input image", "cat.png"]),
    (["edit", "IMG", "--target", "a dog", "--out", "T/folder/../cat.png"], ["--out", "input image"]),
    (["edit", "IMG", "--target", "a dog", "--out", "T/link.png"], ["--out", "input image"]),
    (["edit", "IMG", "--target", "a dog", "--mask-out", "IMG"], ["--mask-out", "input image"]),
    (["edit", "IMG", "--target", "a dog", "--panel", "IMG"], ["--panel", "input image"]),
    (["edit", "IMG", "--target", "a dog", "--out", "T/folder"], ["--out", "is a folder"]),
    (["edit", "IMG", "--target", "a dog", "--out", "T/a_file/x.png"], ["--out", "a_file is a file"]),
    (["edit", "IMG", "--target", "a dog", "--out", "T/out.xyz"], ["--out", "unknown image format", ".xyz"]),
    (["edit", "IMG", "--target", "a dog", "--panel", "T/out.psd"], ["--panel", "unknown image format", ".psd"]),
    (["edit", "IMG", "--target", "a dog", "--out", "T/noext"], ["--out", "no extension"]),
    (["edit", "IMG", "--target", "a dog", "--out", "T/o.png", "--mask-out", "T/o.png"], ["--mask-out", "same file"]),
    (["edit", "IMG", "--target", "a dog", "--mask", "T/missing_mask.png"], ["--mask", "missing_mask.png"]),
    (["edit", "IMG", "--target", "a dog", "--mask", "T/junk.png"], ["--mask", "junk.png"]),
    (["edit", "IMG", "--target", "a dog", "--mask", "T/tall_mask.png"], ["--mask", "10x40", "37x53"]),
    (["edit", "IMG", "--target", "a dog", "--method", "sdedit", "--mask", "T/tall_mask.png"],
     ["--mask", "masked methods (diffedit, masked-sdedit)"]),
    (["edit", "IMG", "--target", "a dog", "--method", "encode-decode", "--mask-out", "T/m.png"],
     ["--mask-out", "masked methods (diffedit, masked-sdedit)"]),
    (["mask", "IMG", "--target", "a dog", "--out", "IMG"], ["--out", "input image"]),
    (["mask", "IMG", "--target", "a dog", "--map-out", "IMG"], ["--map-out", "input image"]),
    (["mask", "IMG", "--target", "a dog", "--threshold", "2"], ["--threshold", "[0, 1]"]),
    (["edit", "IMG", "--target", "a dog", "--dilate", "-1"], ["--dilate", ">= 0", "-1"]),
    (["edit", "IMG", "--target", "a dog", "--dilate", "1.5"], ["--dilate", "invalid int"]),
    (["mask", "IMG", "--target", "a dog", "--dilate", "17"], ["--dilate", "at most 16", "17"]),
    (["mask", "T/missing.png", "--target", "a dog"], ["missing.png", "not found"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    ([], ["required"]),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_before_loading_the_model(argv, words, tmp_path, image, capsys, no_model_load):
    names = _setup(tmp_path, image)
    argv = [names.get(a, a) if a in names else a.replace("T/", f"{tmp_path}/") for a in argv]
    before = fingerprint(image)
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("diffedit: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err and out == ""
    assert fingerprint(image) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["cat.png", "junk.png", "folder", "a_file", "link.png", "tall_mask.png", "garbage.safetensors"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(image, capsys, no_model_load):
    code, _, err = run(["edit", image, "--target", "a dog", "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda" in err and "not available" in err


@pytest.mark.parametrize("model,words", [("nope.safetensors", ["--model", "no such file", "nope.safetensors"]),
                                         ("garbage.safetensors", ["--model", "garbage.safetensors", "safetensors"])])
def test_an_unknown_or_broken_model_is_one_line_exit_2(model, words, tmp_path, image, capsys):
    _setup(tmp_path, image)
    before = fingerprint(image)
    code, out, err = run(["edit", image, "--target", "a dog", "--model", tmp_path / model, "--out",
                          tmp_path / "o.png"], capsys)
    assert code == 2 and err.startswith("diffedit: error: ") and err.count("\n") == 1
    assert all(w in err for w in words), err
    assert fingerprint(image) == before and not (tmp_path / "o.png").exists()


def test_a_subprocess_shows_no_traceback(tmp_path, image):
    """Through the interpreter, as a user runs it: a broken checkpoint (found only when loading)."""
    (tmp_path / "broken.safetensors").write_bytes(b"\x01" * 100)
    before = fingerprint(image)
    proc = subprocess.run([sys.executable, "-m", "diffedit.cli", "edit", str(image), "--target", "a dog",
                           "--model", str(tmp_path / "broken.safetensors"), "--out", str(tmp_path / "o.png")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("diffedit: error: --model") and proc.stderr.count("\n") == 1, proc.stderr
    assert "broken.safetensors" in proc.stderr
    assert fingerprint(image) == before


class _Stub:
    """Stands in for DiffEdit: its edit raises what it is told to."""

    def __init__(self, error):
        self.error = error

    def edit(self, *args, **kwargs):
        raise self.error


def test_usage_errors_from_the_run_are_one_line_but_bugs_propagate(image, tmp_path, capsys, monkeypatch):
    argv = ["edit", image, "--target", "a dog", "--out", tmp_path / "o.png"]
    monkeypatch.setattr(DiffEdit, "from_pretrained", classmethod(lambda cls, *a, **k: _Stub(UsageError("bad\nthing"))))
    code, _, err = run(argv, capsys)
    assert code == 2 and err == "diffedit: error: bad thing\n"
    monkeypatch.setattr(DiffEdit, "from_pretrained", classmethod(lambda cls, *a, **k: _Stub(OSError(28, "No space"))))
    code, _, err = run(argv, capsys)
    assert code == 2 and "No space" in err and err.count("\n") == 1
    for bug in (ValueError("an internal check"), RuntimeError("shapes differ"), ZeroDivisionError("bug")):
        monkeypatch.setattr(DiffEdit, "from_pretrained", classmethod(lambda cls, *a, bug=bug, **k: _Stub(bug)))
        with pytest.raises(type(bug), match=str(bug)):
            cli.main([str(a) for a in argv])


def test_an_unreadable_image_or_checkpoint_is_bad_input():
    from diffedit.checkpoint import CheckpointError
    from diffedit.images import ImageError
    assert issubclass(ImageError, UsageError) and issubclass(CheckpointError, UsageError)


def test_demo_with_a_toy_model_of_an_unknown_world_is_one_line_exit_2(tmp_path, capsys, no_model_load):
    import json

    from safetensors.numpy import save_file
    model = tmp_path / "v9.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(model), metadata={"recipe": json.dumps({"world": "v9"})})
    code, _, err = run(["demo", "--model", model, "--out", tmp_path / "demo", "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--model" in err and "toy world 'v9'" in err


@pytest.mark.parametrize("command, method", [("edit", "edits"), ("mask", "masks")])
def test_a_value_error_inside_the_engine_is_a_bug_not_bad_input(command, method, tiny_checkpoint, image, tmp_path,
                                                                 monkeypatch):
    """Bad input is a UsageError; a plain ValueError from below the front end propagates with its traceback."""
    def broken(self, *args, **kwargs):
        raise ValueError("the engine's own check failed")
    monkeypatch.setattr(Engine, method, broken)
    with pytest.raises(ValueError, match="the engine's own check failed") as e:
        cli.main([command, str(image), "--target", "a dog", "--model", str(tiny_checkpoint), "--out",
                  str(tmp_path / "o.png"), *FAST])
    assert not isinstance(e.value, UsageError)


# --- it works ------------------------------------------------------------------------------------------------

def test_a_tiny_edit_writes_the_image_mask_and_panel_at_the_input_size(tiny_checkpoint, image, tmp_path, capsys,
                                                                      monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default --out goes to the current folder
    before = fingerprint(image)
    nested = tmp_path / "new" / "folders"
    code, out, err = run(["edit", image, "--target", "a dog", "--source", "a cat", "--model", tiny_checkpoint,
                          "--mask-out", nested / "mask.png", "--panel", nested / "panel.png", "--steps", "4",
                          "--n", "2"], capsys)
    assert code == 0, err
    assert fingerprint(image) == before
    edited, mask, panel = work / "cat_edited.png", nested / "mask.png", nested / "panel.png"
    assert f"wrote {edited}" in out and f"wrote {mask}" in out
    with Image.open(edited) as e, Image.open(mask) as m, Image.open(panel) as p:
        assert e.size == m.size == (37, 53) and m.mode == "L"
        assert set(np.unique(np.asarray(m))) <= {0, 255}
        tile = viz.tile_size((37, 53))
        assert tile[0] >= 37 and max(tile) >= viz.TILE_MIN
        assert p.size[0] == 4 * tile[0] + 3 * 4 and p.size[1] > tile[1]


def test_an_external_mask_and_the_baselines(tiny_checkpoint, image, tmp_path, capsys):
    Image.new("L", (37, 53), 0).save(tmp_path / "black.png")
    code, _, err = run(["edit", image, "--target", "a dog", "--model", tiny_checkpoint, "--mask", tmp_path / "black.png",
                        "--out", tmp_path / "e.png", "--mask-out", tmp_path / "m.png", *FAST], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "m.png") as m:
        assert m.size == (37, 53) and not np.asarray(m).any()
    code, _, err = run(["edit", image, "--target", "a dog", "--model", tiny_checkpoint, "--method", "sdedit",
                        "--out", tmp_path / "s.jpg", "--panel", tmp_path / "sp.png", *FAST], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "s.jpg") as s:
        assert s.size == (37, 53)


def test_mask_writes_the_mask_and_the_heat_map(tiny_checkpoint, image, tmp_path, capsys):
    code, out, err = run(["mask", image, "--target", "a dog", "--model", tiny_checkpoint, "--out", tmp_path / "m.png",
                          "--map-out", tmp_path / "d.png", "--steps", "4", "--n", "2"], capsys)
    assert code == 0, err
    assert out.count("wrote") == 2 and not (tmp_path / "cat_edited.png").exists()
    with Image.open(tmp_path / "m.png") as m, Image.open(tmp_path / "d.png") as d:
        assert m.size == d.size == (37, 53) and m.mode == "L" and d.mode == "RGB"


def test_cli_choices_are_the_library_ones():  # one definition, in the torch-free settings module
    from diffedit import masking
    from diffedit.settings import METHOD_TABLE
    edit = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["edit"]._actions
                if "--method" in a.option_strings)
    mask = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["mask"]._actions
                if "--normalization" in a.option_strings)
    assert tuple(edit.choices) == tuple(METHOD_TABLE) and tuple(mask.choices) == masking.NORMALIZATIONS


def test_mask_normalization_flag_reaches_the_pipeline(tiny_checkpoint, image, tmp_path, capsys, monkeypatch):
    from diffedit import masking
    seen, normalize = [], masking.normalize
    monkeypatch.setattr(masking, "normalize", lambda d, mode="quantile", *a: seen.append(mode) or normalize(d, mode, *a))
    for mode in ("clamp", "quantile"):
        code, _, err = run(["mask", image, "--target", "a dog", "--model", tiny_checkpoint, "--out",
                            tmp_path / f"{mode}.png", "--steps", "4", "--n", "2", "--normalization", mode], capsys)
        assert code == 0, err
    assert seen == ["clamp", "quantile"]
    code, _, err = run(["mask", image, "--target", "a dog", "--normalization", "percentile"], capsys)
    assert code == 2 and "--normalization" in err and "quantile" in err


def test_dilate_flag_reaches_the_pipeline_for_edit_and_mask(tiny_checkpoint, image, tmp_path, capsys, monkeypatch):
    from diffedit import masking
    seen, dilate = [], masking.dilate
    monkeypatch.setattr(masking, "dilate", lambda m, cells=0: seen.append(cells) or dilate(m, cells))
    common = ["--target", "a dog", "--model", tiny_checkpoint, *FAST]
    for argv in (["edit", image, "--out", tmp_path / "e.png", "--mask-out", tmp_path / "m.png", "--dilate", "2"],
                 ["mask", image, "--out", tmp_path / "m1.png", "--dilate", "1"],
                 ["mask", image, "--out", tmp_path / "m0.png"]):
        code, _, err = run([*argv, *common], capsys)
        assert code == 0, err
    assert seen == [2, 1, 0]


def test_help_lists_every_flag_with_its_default(capsys):
    code, out, _ = run(["edit", "--help"], capsys)
    assert code == 0
    for flag in ["--target", "--source", "--model", "--out", "--mask-out", "--panel", "--ratio", "--threshold",
                 "--n", "--strength", "--steps", "--guidance", "--seed", "--method", "--mask", "--device",
                 "--dtype", "--prediction-type", "--normalization", "--dilate"]:
        assert f"{flag} " in out, flag
    for default in ["(default: 0.7)", "(default: 0.5)", "(default: 10)", "(default: 50)", "(default: 7.5)",
                    "(default: toy)", "(default: diffedit)", "(default: auto)", "(default: cpu)",
                    "(default: quantile)"]:
        assert default in out, default
    code, out, _ = run(["mask", "--help"], capsys)
    assert code == 0 and "--map-out" in out and "--ratio" not in out
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "edit" in out and "mask" in out


# --- viz -----------------------------------------------------------------------------------------------------

def test_heatmap_colours_and_sizes():
    d = torch.linspace(0, 1, 16).reshape(4, 4)
    h = viz.heatmap(d, (64, 32))
    assert h.mode == "RGB" and h.size == (64, 32)
    ends = viz.colormap(np.array([0.0, 1.0]))
    assert tuple(ends[0]) == pytest.approx((68, 1, 84), abs=2) and tuple(ends[1]) == pytest.approx((253, 231, 37),
                                                                                                   abs=2)
    grid = np.linspace(0, 1, 101)
    assert np.abs(viz.colormap(grid, use_matplotlib=False).astype(int) - viz.colormap(grid).astype(int)).max() < 40
    assert viz.heatmap(torch.full((2, 2), float("nan"))).size == (2, 2)  # NaN drawn as 0, no crash


def test_overlay_marks_only_inside_the_mask():
    base = Image.new("RGB", (16, 16), (0, 0, 255))
    mask = Image.new("L", (4, 4), 0)
    mask.paste(255, (0, 0, 2, 4))  # left half, at a lower resolution
    arr = np.asarray(viz.overlay(base, mask))
    assert (arr[:, 8:] == (0, 0, 255)).all()  # outside: the image untouched
    assert (arr[:, :8] != (0, 0, 255)).any(axis=-1).mean() > 0.25  # inside: hatched


def test_panel_scales_small_images_up_and_marks_missing_masks():
    small, big = Image.new("RGB", (64, 64)), Image.new("L", (600, 300))
    p = viz.panel(small, torch.rand(16, 16), Image.new("L", (64, 64), 255), small)
    assert viz.tile_size((64, 64)) == (256, 256) and p.size[0] == 4 * 256 + 12
    p = viz.panel(big, None, None, big.convert("RGB"))
    assert viz.tile_size((600, 300)) == (600, 300) and p.size[0] == 4 * 600 + 12
    grey = np.asarray(p)[150, 600 + 4 + 5]
    assert tuple(grey) == (200, 200, 200)  # the "no mask" placeholder


def test_captions_files_give_the_mean_embedding_and_bad_files_are_named(tiny_checkpoint, image, tmp_path, capsys):
    """--target-file with one caption twice equals --target with it (the mean of equal rows is the row); a file with
    two captions runs; a missing or blank file is a one-line error before the model loads."""
    one, two, blank = tmp_path / "one.txt", tmp_path / "two.txt", tmp_path / "blank.txt"
    one.write_text("a dog\n\na dog\n")
    two.write_text("a dog\na puppy on grass\n")
    blank.write_text("\n  \n")
    base = ["edit", image, "--model", tiny_checkpoint, "--steps", "4", "--n", "2", "--dtype", "float32", "-q"]
    outs = {}
    for name, flags in (("text", ["--target", "a dog", "--source", "a cat"]),
                        ("file", ["--target-file", one, "--source", "a cat"]),
                        ("two", ["--target-file", two, "--source-file", one])):
        outs[name] = tmp_path / f"{name}.png"
        code, _, err = run([*base, *flags, "--out", outs[name]], capsys)
        assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(outs["text"])), np.asarray(Image.open(outs["file"])))
    for flags, words in ((["--target-file", tmp_path / "none.txt"], ["--target-file", "not found"]),
                         (["--target-file", blank], ["--target-file", "no caption"]),
                         (["--target", "a dog", "--source-file", blank], ["--source-file", "no caption"]),
                         (["--target", "a dog", "--target-file", one], ["not allowed with"])):
        code, _, err = run([*base, *flags], capsys)
        assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
