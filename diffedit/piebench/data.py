"""A PIE-Bench folder: ``mapping_file.json`` and ``annotation_images/``, read as the official evaluation reads them.

Per key of the mapping file: ``image_path`` (under ``annotation_images/``, nested folders allowed),
``original_prompt`` and ``editing_prompt`` (the changed words in [brackets], removed for editing and scoring),
``editing_instruction``, ``editing_type_id`` (a string "0".."9"), ``blended_word`` and ``mask``: a flat list of
(start, length) runs of ones over the row-major 512 x 512 image. The official decoder clips a run at the image's end
and then sets the border rows and columns to 1; ``decode_mask`` does the same, ``encode_mask`` is its inverse on the
interior. Every problem of a folder is one ``UsageError`` naming the file and the key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..settings import UsageError

SIZE = 512  # PIE-Bench's images and masks
MAPPING = "mapping_file.json"
IMAGES = "annotation_images"
# editing_type_id -> (folder name in PIE-Bench, what the edit does)
CATEGORIES = {
    "0": ("0_random_140", "random"), "1": ("1_change_object_80", "change object"),
    "2": ("2_add_object_80", "add object"), "3": ("3_delete_object_80", "delete object"),
    "4": ("4_change_attribute_content_40", "change content"), "5": ("5_change_attribute_pose_40", "change pose"),
    "6": ("6_change_attribute_color_40", "change colour"), "7": ("7_change_attribute_material_40", "change material"),
    "8": ("8_change_background_80", "change background"), "9": ("9_change_style_80", "change style")}
NETWORKS = ("dino", "clip", "lpips")  # the metric networks (metrics.load_networks' arguments, env DIFFEDIT_<NAME>_WEIGHTS)
FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")


def strip_brackets(prompt: str) -> str:
    """A prompt as the official evaluation scores it: the [ and ] around the changed words removed."""
    return prompt.replace("[", "").replace("]", "")


@dataclass(frozen=True)
class Entry:
    """One image of the benchmark; ``index`` is its position in the mapping file (stable under any selection)."""
    key: str
    index: int
    image_path: str
    source: str            # original_prompt, brackets removed: R
    target: str            # editing_prompt, brackets removed: Q
    editing_type_id: str
    runs: tuple            # the mask's flat (start, length) list
    instruction: str = ""
    blended_word: str = ""

    def mask(self):
        """Bool (512, 512): the annotated edit region, border included (``decode_mask``)."""
        return decode_mask(self.runs)


def decode_mask(runs, size: int = SIZE):
    """Bool (size, size) from a flat (start, length) list over the row-major image; runs clipped at the image's
    end, then the border rows and columns set, as the official decoder does."""
    import numpy as np
    flat = np.zeros(size * size, bool)
    for start, length in zip(runs[0::2], runs[1::2]):
        flat[start:start + length] = True  # slicing clips at the end, as the official min(...) does
    mask = flat.reshape(size, size)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask) -> list[int]:
    """The flat (start, length) list of a bool (H, W) mask, row-major: the inverse of ``decode_mask`` inside the
    border."""
    import numpy as np
    flat = np.concatenate([[0], np.asarray(mask, bool).reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def _check_runs(where: str, runs) -> tuple:
    if not isinstance(runs, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in runs):
        raise UsageError(f"{where}: mask must be a list of integers (start, length pairs)")
    if len(runs) % 2:
        raise UsageError(f"{where}: mask has {len(runs)} numbers, not (start, length) pairs")
    bad = next(((s, n) for s, n in zip(runs[0::2], runs[1::2]) if not 0 <= s < SIZE * SIZE or n < 0), None)
    if bad:
        raise UsageError(f"{where}: mask run (start {bad[0]}, length {bad[1]}) lies outside the {SIZE} x {SIZE} "
                         "image (the mask is for another size)")
    return tuple(runs)


def _check_size(where: str, image: Path):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(image) as im:  # reads the header only
            size = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{where}: cannot read image {image}: {e}") from None
    if size != (SIZE, SIZE):
        raise UsageError(f"{where}: image {image} is {size[0]} x {size[1]}, not {SIZE} x {SIZE} as its mask")


def _entry(mapping: Path, key: str, index: int, rec, images: Path) -> Entry:
    where = f"{mapping} key {key!r}"
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: expected an object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        raise UsageError(f"{where}: missing {', '.join(missing)}")
    texts = {f: rec[f] for f in ("image_path", "original_prompt", "editing_prompt")}
    bad = [f for f, v in texts.items() if not isinstance(v, str) or (f != "original_prompt" and not v.strip())]
    if bad:
        raise UsageError(f"{where}: {', '.join(bad)} must be a non-empty text")
    kind = str(rec["editing_type_id"])
    if kind not in CATEGORIES:
        raise UsageError(f"{where}: editing_type_id {kind!r} is not one of 0..9")
    image = images / texts["image_path"]
    if not image.is_file():
        raise UsageError(f"{where}: image not found: {image}")
    _check_size(where, image)
    return Entry(str(key), index, texts["image_path"], strip_brackets(texts["original_prompt"]),
                 strip_brackets(texts["editing_prompt"]), kind, _check_runs(where, rec["mask"]),
                 str(rec.get("editing_instruction", "")), str(rec.get("blended_word", "")))


def read_mapping(folder) -> dict:
    """The mapping file of a PIE-Bench folder, parsed (a UsageError naming it when absent or not JSON)."""
    folder = Path(folder).expanduser()
    mapping = folder / MAPPING
    if not mapping.is_file():
        raise UsageError(f"{folder}: no {MAPPING} (a PIE-Bench folder holds {MAPPING} and {IMAGES}/)")
    try:
        data = json.loads(mapping.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{mapping}: not JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{mapping}: expected an object of entries keyed by id")
    return data


def load_entries(folder, categories=None, subset: int | None = None) -> list[Entry]:
    """The entries of a PIE-Bench folder, in the mapping file's order: those of ``categories`` (editing_type_id
    strings; None: all), the first ``subset`` of each category (None: all). Every entry picked is checked."""
    folder = Path(folder).expanduser()
    data = read_mapping(folder)
    picked, taken = [], {}
    for index, (key, rec) in enumerate(data.items()):
        kind = str(rec.get("editing_type_id")) if isinstance(rec, dict) else None
        if categories is not None and kind not in categories:
            continue
        if subset is not None and taken.get(kind, 0) >= subset:
            continue
        taken[kind] = taken.get(kind, 0) + 1
        picked.append(_entry(folder / MAPPING, key, index, rec, folder / IMAGES))
    if not picked:
        raise UsageError(f"{folder / MAPPING}: no entry of categories {', '.join(categories or [])}")
    return picked


def category_name(kind: str) -> str:
    return CATEGORIES[kind][1] if kind in CATEGORIES else kind
