"""Pictures for people: the difference map as a heat map, a mask over its image, and the four-tile panel

    input | D (difference map) | mask over input | edit

that shows at a glance what DiffEdit did (``diffedit edit --panel``). Only PIL and numpy are needed;
matplotlib, when installed, supplies the exact viridis colormap.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# viridis at 0, 0.25, 0.5, 0.75, 1: the fallback when matplotlib is not installed.
_VIRIDIS_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                          dtype=np.float64)
TILE_MIN = 256     # small images (the 64 px toy model's) are scaled up to this many pixels per tile ...
TILE_MAX = 1024    # ... by an integer factor that keeps a tile's longer side within this
_GAP = 4           # pixels between tiles
_PLACEHOLDER = (200, 200, 200)
_HATCH = ((0, 0, 0), (255, 255, 255))  # the mask's stripes


def _as_array(x) -> np.ndarray:
    """A (h, w) tensor or array -> float64 numpy, NaN as 0, clipped to [0, 1]."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a (h, w) map, got shape {arr.shape}")
    return np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0)


def colormap(values: np.ndarray, use_matplotlib: bool = True) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)) on viridis."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    if use_matplotlib:
        try:
            import matplotlib
            return (matplotlib.colormaps["viridis"](values)[..., :3] * 255).round().astype(np.uint8)
        except (ImportError, AttributeError, KeyError):
            pass
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS_STOPS))
    rgb = [np.interp(values, stops, _VIRIDIS_STOPS[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def heatmap(map, size: tuple[int, int] | None = None, use_matplotlib: bool = True) -> Image.Image:
    """A (h, w) map in [0, 1] (tensor or array) -> PIL RGB on viridis, upscaled to ``size`` (W, H) with
    nearest-neighbour so each latent cell stays a visible block."""
    image = Image.fromarray(colormap(_as_array(map), use_matplotlib), mode="RGB")
    return image if size is None or image.size == tuple(size) else image.resize(tuple(size), Image.NEAREST)


def overlay(image: Image.Image, mask: Image.Image, alpha: float = 0.5) -> Image.Image:
    """``image`` hatched where ``mask`` ("L", white = inside) is set: diagonal black and white stripes (opacity
    ``alpha``) and the mask's outline in the same stripes, opaque; one of the two shows over any colour."""
    image = image.convert("RGB")
    mask = mask.convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.NEAREST)
    w, h = image.size
    half = max(2, round(max(w, h) / 32))  # stripe width: 2 px at 64 px (half a toy latent cell), 1/32 of the side
    ys, xs = np.mgrid[0:h, 0:w]
    stripes = Image.fromarray(np.where((((xs + ys) // half) % 2 == 1)[..., None], _HATCH[1], _HATCH[0])
                              .astype(np.uint8), mode="RGB")
    inside = np.asarray(mask) >= 128
    core = inside.copy()
    for _ in range(max(1, half // 2)):  # the outline: what a few erosions remove (none along the image's border)
        c = core.copy()
        core[1:] &= c[:-1]
        core[:-1] &= c[1:]
        core[:, 1:] &= c[:, :-1]
        core[:, :-1] &= c[:, 1:]
    out = Image.composite(Image.blend(image, stripes, alpha), image, mask)
    out.paste(stripes, mask=Image.fromarray(((inside & ~core) * 255).astype(np.uint8), mode="L"))
    return out


def _font():
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis to fit ``width`` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while text and _text_size(draw, text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..." if text else ""


def _placeholder(size: tuple[int, int], text: str) -> Image.Image:
    tile = Image.new("RGB", size, _PLACEHOLDER)
    draw = ImageDraw.Draw(tile)
    font = _font()
    text = _fit(draw, text, font, size[0] - 4)
    w, h = _text_size(draw, text, font)
    draw.text(((size[0] - w) / 2, (size[1] - h) / 2), text, fill=(60, 60, 60), font=font)
    return tile


def tile_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size of a panel tile for an input of ``size`` (W, H): the input size, scaled up by an integer
    factor so the longer side reaches TILE_MIN (never past TILE_MAX)."""
    w, h = size
    factor = max(1, math.ceil(TILE_MIN / max(w, h)))
    factor = max(1, min(factor, TILE_MAX // max(w, h)))
    return w * factor, h * factor


def panel(input: Image.Image, mask_map, mask: Image.Image | None, edited: Image.Image,
          labels=("input", "D (difference map)", "mask", "edit")) -> Image.Image:
    """input | D heat map | mask over input | edit, side by side with a caption under each tile.

    ``mask_map``: (h, w) in [0, 1] at any resolution, or None; ``mask``: PIL "L" or None (the baselines):
    missing pictures show a grey "no mask" tile."""
    input = input.convert("RGB")
    size = tile_size(input.size)
    up = lambda im: im.convert("RGB").resize(size, Image.NEAREST)
    if mask_map is not None:
        map_tile = heatmap(mask_map, size)
    else:
        map_tile = _placeholder(size, "no mask" if mask is None else "no map (mask given)")
    mask_tile = _placeholder(size, "no mask") if mask is None else up(overlay(input, mask))
    tiles = [up(input), map_tile, mask_tile, up(edited)]

    font = _font()
    probe = ImageDraw.Draw(tiles[0])
    strip = max(_text_size(probe, label, font)[1] for label in labels) + 10
    width = len(tiles) * size[0] + (len(tiles) - 1) * _GAP
    out = Image.new("RGB", (width, size[1] + strip), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = i * (size[0] + _GAP)
        out.paste(tile, (x, 0))
        text = _fit(draw, str(label), font, size[0] - 4)
        w, h = _text_size(draw, text, font)
        draw.text((x + (size[0] - w) / 2, size[1] + (strip - h) / 2), text, fill=(0, 0, 0), font=font)
    return out
