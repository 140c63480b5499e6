"""The results files: append-only JSON-lines rows (one per image x setting), their repair after an interrupted
write, the merge of torchrun ranks' files, the means per setting, and the fingerprint a resumed sweep must match."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..settings import METHODS, REFERENCES, UsageError
from .plan import GRID_KNOBS, METRICS, row_key, upgrade


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a JSON-lines file. An unfinished last line (an interrupted write) is skipped and, with
    ``repair``, cut off, so that appending continues on a fresh line; a bad line elsewhere is skipped."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else the last, unterminated line
    rows = []
    for line in lines:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"diffedit sweep: skipping a malformed line of {path}", file=sys.stderr)
    if tail.strip():
        try:
            rows.append(json.loads(tail))
            complete = True
        except json.JSONDecodeError:
            complete = False
        if repair:
            with open(path, "r+b") as f:
                if complete:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(len(data) - len(tail))
    return rows


def append(f, row: dict):
    """One row, flushed: an interrupted sweep loses at most the row being written."""
    f.write(json.dumps(row) + "\n")
    f.flush()


def _sort_key(row):
    return (row["index"], METHODS.index(row["method"]), row["ratio"], REFERENCES.index(row["reference"]),
            row.get("mask_source") == "annotated", row["strength"] or 0, row["n"] or 0, row["threshold"] or 0,
            row.get("dilate") or 0)


def merge(out: Path) -> list[dict]:
    """results.jsonl + every results.rank*.jsonl -> results.jsonl (deduplicated, sorted, older rows given the
    knobs added since: ``plan.upgrade``), atomically."""
    rows, seen = [], set()
    rank_files = sorted(out.glob("results.rank*.jsonl"))
    for path in [out / "results.jsonl", *rank_files]:
        for row in read_rows(path):
            if (key := row_key(row)) not in seen:
                seen.add(key)
                rows.append(upgrade(row))
    rows.sort(key=_sort_key)
    tmp = out / f"results.jsonl.tmp{os.getpid()}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "results.jsonl")
    for path in rank_files:
        path.unlink()
    return rows


def group_means(rows: list[dict], keys, metrics=METRICS) -> list[dict]:
    """Per distinct value of ``keys``: those values, ``count`` (rows) and the mean of every metric over the rows
    that have it (success: the success rate); in the order of first appearance."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for values, rs in groups.items():
        s = {**dict(zip(keys, values)), "count": len(rs)}
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                s[m] = float(np.mean(vals))
        out.append(s)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """The mean of every metric per setting, with the row count, in the grid's order (rows of older sweeps
    upgraded to today's knobs)."""
    return sorted(group_means([upgrade(r) for r in rows], GRID_KNOBS), key=lambda r: _sort_key({**r, "index": 0}))


def mean_by(rows: list[dict], knob: str, metric: str, method: str = "diffedit") -> dict:
    """{value of ``knob``: mean ``metric``} over ``method``'s rows."""
    rows = [r for r in rows if r["method"] == method]
    return {g[knob]: g[metric] for g in group_means(rows, (knob,), (metric,)) if metric in g}


def check_fingerprint(out: Path, fp: dict):
    """Write ``sweep.json``, what every row depends on beyond its own key; refuse to resume a sweep made with
    other values (``n_max`` may be unknown on either side: a grid without a masked method draws no noises)."""
    path = out / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k} {old.get(k)!r} -> {fp[k]!r}" for k in fp if k != "n_max" and old.get(k) != fp[k]]
        if old.get("n_max") and fp["n_max"] and old["n_max"] != fp["n_max"]:
            diff.append(f"largest --n {old['n_max']} -> {fp['n_max']} (rows use the first n of n_max noises)")
        if diff:
            raise UsageError(f"--out {out} holds a sweep made with other settings ({'; '.join(diff)}); resume it "
                             "with the same --images/--seed/--steps/--guidance/--normalization/--model/--dtype/"
                             "largest --n, or use another --out")
        fp = {**fp, "n_max": old.get("n_max") or fp["n_max"]}
    tmp = out / f"sweep.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(fp, indent=1) + "\n")
    os.replace(tmp, path)
