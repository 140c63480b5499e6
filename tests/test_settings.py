"""The settings module: every knob checked in one place, errors that name the knob, the recipes, no torch."""
import dataclasses
import subprocess
import sys

import pytest

from diffedit import settings
from diffedit.settings import KNOBS, MAX_N, MAX_STEPS, EditSettings, SettingsError


@pytest.mark.parametrize("name,bad", [
    ("ratio", 0), ("ratio", 1.01), ("ratio", float("nan")), ("threshold", -0.1), ("threshold", 1.1),
    ("strength", 0), ("strength", float("inf")), ("n", 0), ("n", MAX_N + 1), ("n", 2.5), ("steps", 0),
    ("steps", MAX_STEPS + 1), ("guidance", -1), ("guidance", float("inf")), ("seed", -1), ("seed", 2 ** 63),
    ("method", "inpaint"), ("normalization", "percentile"), ("threshold", "0.5"), ("n", True),
    ("dilate", -1), ("dilate", 17), ("dilate", 1.5),
])
def test_a_bad_value_is_refused_naming_the_knob_and_its_range(name, bad):
    with pytest.raises(SettingsError) as e:
        EditSettings(**{name: bad})
    assert e.value.field == name and str(e.value).startswith(f"{name} must be ")
    assert KNOBS[name].range_text() in str(e.value)
    assert e.value.message_for(f"--{name}").startswith(f"--{name} must be ")


def test_every_field_default_is_the_knob_default_and_allowed():
    s = EditSettings()
    for f in dataclasses.fields(s):
        if f.name in KNOBS and f.name != "normalization":
            assert getattr(s, f.name) == KNOBS[f.name].default, f.name
            assert settings.check(f.name, KNOBS[f.name].default) == KNOBS[f.name].default
    assert s.mask_normalization == "quantile" and s.recipe is settings.RECIPES["paper"]


def test_limits_that_protect_the_user_name_the_limit():
    with pytest.raises(SettingsError, match=rf"at most {MAX_N} \(the mask pass runs 2n UNet evaluations"):
        EditSettings(n=100000)
    with pytest.raises(SettingsError, match=rf"at most {MAX_STEPS} \(the schedule has {MAX_STEPS} timesteps\)"):
        EditSettings(steps=5000)


def test_dilate_is_off_by_default_and_says_it_is_not_in_the_paper():
    k = KNOBS["dilate"]
    assert (k.kind, k.default, EditSettings().dilate) == (int, 0, 0) and "not in the paper" in k.paper
    assert EditSettings(dilate=16).dilate == 16 and "at most 16 (" in k.range_text()


def test_integers_given_as_whole_floats_become_integers():
    s = EditSettings(n=3.0, steps=20.0)
    assert (s.n, s.steps) == (3, 20) and all(isinstance(v, int) for v in (s.n, s.steps))


def test_the_recipes_say_what_differs_from_the_paper():
    paper, diffusers = settings.recipe(None), settings.recipe("diffusers")
    assert paper == settings.recipe("paper")
    assert (paper.inversion_guidance, paper.blend_late, paper.floor_grid, paper.normalization) == \
        (False, False, False, "quantile")
    assert (diffusers.inversion_guidance, diffusers.blend_late, diffusers.floor_grid, diffusers.normalization) == \
        (True, True, True, "clamp-mean")
    assert EditSettings(compat="diffusers").mask_normalization == "clamp-mean"
    assert EditSettings(compat="diffusers", normalization="minmax").mask_normalization == "minmax"
    with pytest.raises(SettingsError, match="compat must be one of paper, diffusers"):
        EditSettings(compat="a1111")


@pytest.mark.parametrize("code", ["import diffedit.cli", "import diffedit.settings",
                                  "from diffedit.cli import build_parser; build_parser()"])
def test_the_command_line_and_the_settings_import_no_torch(code):
    probe = f"import sys; {code}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
