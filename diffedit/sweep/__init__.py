"""``diffedit sweep``: DiffEdit and its baselines over a grid of settings and a set of images, sharing work.

plan (grid points, row keys, their requests and cost: the engine's plan), items (the images), grid (``edit_grid``,
``rows_for``), results (rows files, means, resume fingerprint), report (summary.csv, cost.json, plots, index.html),
runner (a checked ``Config`` run: the rows missing, then the report), cli (the flags, checked into that ``Config``).
Outputs in --out: results.jsonl (one row per image x setting, appended and flushed per row, so an interrupted
sweep resumes), sweep.json, summary.csv, cost.json, plots/, examples/, index.html.
"""
from ..settings import METHODS, REFERENCES
from .cli import add_sweep_parser, build_parser, main, parse_config, run_sweep
from .grid import Output, edit_grid, rows_for
from .items import Item, load_items, toy_items
from .plan import GRID_KNOBS, METRICS, Setting, grid, row_key, separate_cost, setting_key, shared_cost
from .report import finalize, format_table, perceptual_note, write_summary_csv
from .results import group_means, mean_by, merge, read_rows, summarize
from .runner import Config

__all__ = ["METHODS", "REFERENCES", "GRID_KNOBS", "METRICS", "Setting", "grid", "row_key", "setting_key",
           "separate_cost", "shared_cost", "Item", "load_items", "toy_items", "Output", "edit_grid", "rows_for",
           "read_rows", "merge", "group_means", "summarize", "mean_by", "perceptual_note", "format_table",
           "write_summary_csv", "finalize", "Config", "add_sweep_parser", "build_parser", "parse_config", "run_sweep",
           "main"]
