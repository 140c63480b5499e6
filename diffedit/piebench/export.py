"""Held-out toy-world edits written as a PIE-Bench folder, so the whole PIE-Bench harness runs on the toy model:

    python -m diffedit.piebench.export --out pie-toy/ --n 16 --seed 12345

Each scene is upscaled to 512 px (nearest: the flat world stays exact) and saved as PNG (lossless) under
``annotation_images/<category folder>/toy_<world>/<key>.png``; its annotation is the edited object's footprint
(``toy.world.Edit.footprint``: what an editor is asked to repaint, as PIE's annotators mark it), encoded as PIE
encodes masks. The toy world's kinds map to PIE's categories (``KIND_CATEGORY``); the prompts carry the changed
words in [brackets], as PIE's do.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from ..settings import UsageError
from .data import CATEGORIES, IMAGES, MAPPING, SIZE, encode_mask

KIND_CATEGORY = {"colour": "6", "shape": "1", "background": "8", "remove": "3"}


def bracketed(source: str, target: str) -> tuple[str, str]:
    """Both captions with the words that differ between them in [brackets] (a word diff)."""
    a, b = source.split(), target.split()
    a2, b2 = list(a), list(b)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            a2[i1] = "[" + a2[i1]
            a2[i2 - 1] += "]"
        if op in ("replace", "insert"):
            b2[j1] = "[" + b2[j1]
            b2[j2 - 1] += "]"
    return " ".join(a2), " ".join(b2)


def _instruction(edit) -> tuple[str, str]:
    """(editing_instruction, blended_word) of a toy edit."""
    i = edit.edited_object_index
    if edit.kind == "background":
        return f"Change the background to {edit.target.background}", "background background"
    old = edit.source.objects[i]
    if edit.kind == "remove":
        return f"Remove the {old.colour} {old.shape}", old.shape
    new = edit.target.objects[i]
    if edit.kind == "colour":
        return f"Make the {old.colour} {old.shape} {new.colour}", f"{old.shape} {new.shape}"
    return f"Turn the {old.colour} {old.shape} into a {new.shape}", f"{old.shape} {new.shape}"


def _upscale(array, size: int):
    from PIL import Image
    return Image.fromarray(array).resize((size, size), Image.NEAREST)


def export(out, n: int, seed: int, spec=None) -> Path:
    """Write ``n`` held-out edits of the toy world ``spec`` (default V1) drawn at ``seed`` as a PIE-Bench folder
    ``out``; returns the mapping file's path."""
    import numpy as np

    from ..toy import world
    spec = spec or world.V1
    if seed == world.TRAIN_SEED:
        raise UsageError(f"--seed {seed} is the toy world's training seed; export held-out edits "
                         f"(e.g. --seed {world.EVAL_SEED})")
    if n < 1:
        raise UsageError(f"--n must be a positive integer, got {n}")
    out = Path(out).expanduser()
    mapping = {}
    for i, edit in enumerate(world.edits(n, seed, size=spec.size, spec=spec)):
        kind = KIND_CATEGORY[edit.kind]
        key = f"{kind}{i:011d}"
        image_path = f"{CATEGORIES[kind][0]}/toy_{spec.name}/{key}.png"
        path = out / IMAGES / image_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _upscale(edit.source.render(), SIZE).save(path)
        footprint = np.asarray(_upscale(edit.footprint().astype(np.uint8) * 255, SIZE)) > 127
        original, editing = bracketed(edit.source_caption, edit.target_caption)
        instruction, blended = _instruction(edit)
        mapping[key] = {"image_path": image_path, "original_prompt": original, "editing_prompt": editing,
                        "editing_instruction": instruction, "editing_type_id": kind, "blended_word": blended,
                        "mask": encode_mask(footprint)}
    path = out / MAPPING
    path.write_text(json.dumps(mapping, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    from ..toy import world
    p = argparse.ArgumentParser(prog="python -m diffedit.piebench.export",
                                description="Write held-out toy-world edits as a PIE-Bench folder (mapping_file.json "
                                            "and annotation_images/), for diffedit sweep --images piebench:DIR.")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--n", type=int, default=16, help="edits, the four kinds dealt in turn (default 16)")
    p.add_argument("--seed", type=int, default=world.EVAL_SEED, help=f"draw seed (default {world.EVAL_SEED}; "
                   f"never the training seed {world.TRAIN_SEED})")
    p.add_argument("--world", default="v1", choices=sorted(world.WORLDS), help="toy world (default v1, the toy "
                   "model's)")
    args = p.parse_args(argv)
    try:
        path = export(args.out, args.n, args.seed, world.WORLDS[args.world])
    except (UsageError, OSError) as e:
        sys.stderr.write(f"{p.prog}: error: {e}\n")
        return 2
    print(f"wrote {path} and {args.n} images under {path.parent / IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
