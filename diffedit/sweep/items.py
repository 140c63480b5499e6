"""The images a sweep edits: ``toy:N`` held-out toy-world edits (with ground truth), a PIE-Bench folder
``piebench:DIR`` (with annotated masks; ``diffedit.piebench.data``) or a prompts file."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..settings import UsageError


@dataclass
class Item:
    """One image to edit: id (stable across runs), global index, texts, and where the pixels come from."""
    id: str
    index: int
    source: str
    target: str
    path: Path | None = None
    edit: object | None = None   # toy.world.Edit: ground truth
    entry: object | None = None  # piebench.data.Entry: the benchmark's record, its annotated mask

    def load(self):
        from PIL import Image

        from ..images import load_image
        if self.edit is not None:
            return Image.fromarray(self.edit.source.render())
        return load_image(self.path)

    @property
    def annotated(self) -> bool:
        return self.edit is not None or self.entry is not None

    def annotation(self):
        """Bool (H, W) at the image's size: the region to edit as annotated (PIE-Bench's mask; a toy edit's
        footprint, what its PIE export annotates)."""
        if self.entry is not None:
            return self.entry.mask()
        if self.edit is not None:
            return self.edit.footprint()
        raise ValueError(f"image {self.id} has no annotated mask")


def piebench_items(folder, categories=None, subset: int | None = None) -> list[Item]:
    """The entries of a PIE-Bench folder (``piebench.data.load_entries``) as items: R the source prompt, Q the
    editing prompt (brackets removed), index the position in the mapping file, id the mapping key."""
    from ..piebench.data import IMAGES, load_entries
    folder = Path(folder).expanduser().resolve()
    return [Item(e.key, e.index, e.source, e.target, path=folder / IMAGES / e.image_path, entry=e)
            for e in load_entries(folder, categories, subset)]


def toy_items(n: int, seed: int, size: int, world=None) -> list[Item]:
    """The first n edits drawn at ``seed`` in the toy world ``world`` (a ``toy.world.WorldSpec``, default V1), at
    ``size`` px. Ids name the world but for V1 (whose ids predate the choice)."""
    from ..toy.world import V1, edits
    world = world or V1
    prefix = "toy" if world == V1 else f"toy-{world.name}"
    return [Item(f"{prefix}-{seed}-{i}", i, e.source_caption, e.target_caption, edit=e)
            for i, e in enumerate(edits(n, seed, size=size, spec=world))]


def load_items(spec: str, seed: int, toy_size: int, world=None) -> list[Item]:
    """``toy:N`` (edits of the toy world ``world``, default V1) or a prompts file (CSV / JSON lines with image,
    source, target); errors name --images. Image paths are relative to the file."""
    from ..toy import world as toy_world
    if spec.startswith("toy:"):
        if seed == toy_world.TRAIN_SEED:
            raise UsageError(f"--seed {seed} is the toy world's training seed; sweep held-out edits "
                             f"(e.g. --seed {toy_world.EVAL_SEED}, the default)")
        try:
            n = int(spec[4:])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--images {spec}: toy:N needs a positive integer N")
        try:
            return toy_items(n, seed, toy_size, world)
        except ValueError as e:  # a world whose objects do not fit at this size
            raise UsageError(f"--images {spec} at --toy-size {toy_size}: {e}") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"--images {spec}: prompts file not found (expected toy:N, or a .csv / .jsonl file "
                         "with image, source, target)")
    records = _records(spec, path)
    items = []
    for index, (line, rec) in enumerate(records):
        image, source, target = (rec.get(k) for k in ("image", "source", "target"))
        if not isinstance(image, str) or not image.strip():
            raise UsageError(f"--images {spec} line {line}: missing image path")
        if not isinstance(target, str) or not target.strip():
            raise UsageError(f"--images {spec} line {line}: missing target text")
        if source is not None and not isinstance(source, str):
            raise UsageError(f"--images {spec} line {line}: source must be a text")
        img = (path.parent / image).expanduser()
        if not img.is_file():
            raise UsageError(f"--images {spec} line {line}: image not found: {img}")
        items.append(Item(f"{index}:{image}", index, source or "", target, path=img))
    return items


def _records(spec: str, path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a CSV with the header image,source,target, or of JSON lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"--images {spec}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"image", "source", "target"} - set(reader.fieldnames or ())
        if missing:
            raise UsageError(f"--images {spec}: the CSV header must hold image,source,target "
                             f"(missing {', '.join(sorted(missing))})")
        records = [(i + 2, r) for i, r in enumerate(reader)]
    else:
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"--images {spec} line {i + 1}: not JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise UsageError(f"--images {spec} line {i + 1}: expected an object with image, source, target")
                records.append((i + 1, rec))
    if not records:
        raise UsageError(f"--images {spec}: no rows")
    return records
