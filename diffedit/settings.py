"""Every knob of an edit: its default, its allowed range and the paper's value, checked in one place.

Torch-free, so the command line can build and check settings before torch loads. The API, the CLI, the
sweep and the toy evaluation all go through ``check`` / ``EditSettings``; front ends translate a
``SettingsError``'s field name into their own spelling (``--n``, a slider label) with ``message_for``.

A recipe names a way of running the same algorithm: ``paper`` (the defaults) or ``diffusers`` (the choices
of the diffusers DiffEdit pipeline, reproduced so it can be checked against it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace



@dataclass(frozen=True)
class Method:
    """An editing method as two choices: whether it decodes inside a mask only (DiffEdit's step 1, or a given mask),
    and where its decoding starts: the DDIM encoding x_r of the input (Sec. 3.2) or the input noised to r with
    fresh noise (SDEdit). The four combinations are DiffEdit and the ablations of its abstract."""
    name: str
    label: str  # how figures, tables and the app name it
    masked: bool
    start: str  # "encoding" or "noise"


METHOD_TABLE = {m.name: m for m in (
    Method("diffedit", "DiffEdit", masked=True, start="encoding"),
    Method("sdedit", "SDEdit", masked=False, start="noise"),                      # Meng et al., 2022
    Method("encode-decode", "Encode-Decode", masked=False, start="encoding"),     # DiffEdit with M = 1
    Method("masked-sdedit", "masked SDEdit", masked=True, start="noise"),  # the mask, fresh noise (Blended Latent Diffusion)
)}
METHODS = tuple(METHOD_TABLE)
NORMALIZATIONS = ("quantile", "clamp", "minmax", "clamp-mean")
REFERENCES = ("empty", "caption")  # the reference text R: "" or the source caption

# Bounds that protect the user: the mask pass runs 2n UNet rows, and the schedule has 1000 timesteps.
MAX_N = 256
MAX_STEPS = 1000


class UsageError(ValueError):
    """A mistake in what the user asked for (an argument, a file, a knob): front ends show its message alone. Any other
    exception is a bug and shows with its traceback."""


class SettingsError(UsageError):
    """A knob out of its range; ``field`` names it, ``detail`` says what is wrong."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field} {detail}")
        self.field, self.detail = field, detail

    def message_for(self, name: str) -> str:
        """The same message under another name for the knob (a flag, a label)."""
        return f"{name} {self.detail}"


@dataclass(frozen=True)
class Knob:
    """One knob: type, default, range ((lo, hi) with open/closed ends) or choices, and the paper's value."""
    name: str
    kind: type
    default: object
    paper: object
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple | None = None
    limit: str | None = None  # why ``hi`` is there when it bounds cost, not meaning

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        lo, hi = (f"{v:g}" if self.kind is float and v is not None else str(v) for v in (self.lo, self.hi))
        if self.hi is None or self.limit:
            low = f"{'>' if self.lo_open else '>='} {lo}"
            return low if self.hi is None else f"{low} and at most {hi} ({self.limit})"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}]"

    def check(self, value):
        """The value, converted to the knob's type; SettingsError naming the knob if it is not allowed."""
        if self.choices is not None:
            if value not in self.choices:
                raise SettingsError(self.name, f"must be {self.range_text()}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(self.name, f"must be a number {self.range_text()}, got {value!r}")
        if self.kind is int and value != int(value):
            raise SettingsError(self.name, f"must be an integer {self.range_text()}, got {value!r}")
        value = self.kind(value) if math.isfinite(value) else value
        below = value <= self.lo if self.lo_open else value < self.lo
        above = self.hi is not None and value > self.hi
        if not math.isfinite(value) or below or above:
            raise SettingsError(self.name, f"must be {self.range_text()}, got {value}")
        return value


_KNOBS = (
    Knob("method", str, "diffedit", "diffedit", "the editing method", choices=METHODS),
    Knob("ratio", float, 0.7, "swept (0.8 in the ablations)", "encoding ratio r (how far to noise)", 0, 1, True),
    Knob("steps", int, 50, 50, "DDIM steps of the full grid", 1, MAX_STEPS,
         limit=f"the schedule has {MAX_STEPS} timesteps"),
    Knob("guidance", float, 7.5, 7.5, "classifier-free guidance scale", 0),
    Knob("threshold", float, 0.5, 0.5, "binarisation threshold of the rescaled map D", 0, 1),
    Knob("n", int, 10, 10, "number of noises averaged into D", 1, MAX_N,
         limit="the mask pass runs 2n UNet evaluations per image; the paper uses 10"),
    Knob("strength", float, 0.5, 0.5, "noise level of the mask pass", 0, 1, True),
    Knob("normalization", str, "quantile", "unnamed ('remove extreme values')",
         "removing D's extremes before rescaling (quantile: clip at the 98th percentile)",
         choices=NORMALIZATIONS),
    Knob("dilate", int, 0, "not in the paper (0)", "grow the mask by this many latent cells (max-pool)", 0, 16,
         limit="16 cells grow one cell into a 33 x 33 square, half of a 512 px SD latent"),
    Knob("seed", int, 0, None, "random seed (mask noises, SDEdit noise)", 0, 2 ** 63 - 1,
         limit="the generator's seed range"),
)
KNOBS = {k.name: k for k in _KNOBS}


def check(name: str, value):
    """Check one knob's value (by its field name); returns it converted to the knob's type."""
    return KNOBS[name].check(value)


@dataclass(frozen=True)
class Recipe:
    """What differs between ways of running DiffEdit; each field is one choice."""
    name: str
    inversion_guidance: bool   # invert with CFG under the source prompt (else: unconditional, no guidance)
    blend_late: bool           # after the step to t', blend with the encoded latent at t (one step late)
    floor_grid: bool           # k = int(r * steps) grid steps (else round(r * steps))
    normalization: str         # the rule that removes D's extremes when none is asked for
    posterior_sample: bool     # x_0 a VAE posterior sample drawn from the generator (else the posterior mean)
    inversion_v_late: bool     # a v-prediction model's inversion turns v into eps at the level a step starts from


RECIPES = {
    "paper": Recipe("paper", inversion_guidance=False, blend_late=False, floor_grid=False, normalization="quantile",
                    posterior_sample=False, inversion_v_late=False),
    "diffusers": Recipe("diffusers", inversion_guidance=True, blend_late=True, floor_grid=True,
                        normalization="clamp-mean", posterior_sample=True, inversion_v_late=True),
}


def recipe(name: str | None) -> Recipe:
    """The recipe called ``name`` (None: the paper's)."""
    if name is None:
        return RECIPES["paper"]
    if name not in RECIPES:
        raise SettingsError("compat", f"must be one of {', '.join(RECIPES)} (or None), got {name!r}")
    return RECIPES[name]


@dataclass(frozen=True)
class EditSettings:
    """The knobs of one edit, checked when built. ``normalization`` None means the recipe's rule."""
    method: str = KNOBS["method"].default
    ratio: float = KNOBS["ratio"].default
    steps: int = KNOBS["steps"].default
    guidance: float = KNOBS["guidance"].default
    threshold: float = KNOBS["threshold"].default
    n: int = KNOBS["n"].default
    strength: float = KNOBS["strength"].default
    normalization: str | None = None
    dilate: int = KNOBS["dilate"].default
    seed: int = KNOBS["seed"].default
    compat: str | None = field(default=None)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in KNOBS and not (f.name == "normalization" and value is None):
                object.__setattr__(self, f.name, check(f.name, value))
        recipe(self.compat)

    @property
    def recipe(self) -> Recipe:
        return recipe(self.compat)

    @property
    def mask_normalization(self) -> str:
        return self.normalization or self.recipe.normalization

    def replace(self, **changes) -> "EditSettings":
        return replace(self, **changes)


def resolve(s: EditSettings, estimates_mask: bool) -> EditSettings:
    """The settings as the recipe runs them: the paper's as given; diffusers' takes int(f * steps) grid steps for
    the ratio and, when the mask is estimated, its strength (ours rounds: 3.5 -> 3, not 4); D's extremes removed by
    the recipe's rule when none is asked for."""
    if s.recipe.floor_grid:
        s = s.replace(ratio=_floor_fraction("ratio", s.ratio, s.steps))
        if estimates_mask:
            s = s.replace(strength=_floor_fraction("strength", s.strength, s.steps))
    return s.replace(normalization=s.mask_normalization)


def _floor_fraction(name: str, fraction: float, steps: int) -> float:
    k = int(fraction * steps)
    if k < 1:
        raise SettingsError(name, f"{fraction} x {steps} steps is below one grid step: diffusers runs no step (compat)")
    return k / steps


__all__ = ["Method", "METHOD_TABLE", "METHODS", "NORMALIZATIONS", "REFERENCES", "MAX_N", "MAX_STEPS", "UsageError",
           "SettingsError",
           "Knob", "KNOBS",
           "check", "Recipe", "RECIPES", "recipe", "EditSettings", "resolve"]
