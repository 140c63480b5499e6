"""A checked sweep run: the ``Config`` the parser (cli.py) builds, this rank's missing rows, then the report.

Rank r takes images r::world_size and appends to ``results.rank{r}.jsonl``; after a gloo barrier rank 0 merges
them into ``results.jsonl`` and writes the report. Nothing here reads the command line: ``Config`` holds it all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..settings import UsageError
from .plan import row_key, separate_cost, setting_key, shared_cost
from .report import example_knobs, finalize, save_examples
from .results import append, check_fingerprint, read_rows


@dataclass
class Config:
    """Everything a sweep needs, checked: the images, the grid, the fixed settings, the model (``model``,
    ``device``, ``dtype``, ``prediction_type``: what ``frontend.load_pipeline`` reads), the perceptual metrics'
    weights and the output folder."""
    items: list               # items.Item
    settings: list            # plan.Setting: the grid points
    steps: int
    guidance: float
    seed: int
    n_draw: int               # mask noises drawn per image: the largest n of a masked method, 0 without one
    max_batch: int
    examples: int
    fingerprint: dict         # what every row depends on beyond its key (results.check_fingerprint)
    out: Path
    model: str
    device: str
    dtype: str
    prediction_type: str | None = None
    normalization: str = "quantile"
    lpips_weights: str | None = None
    clip_weights: str | None = None
    clip_model: str | None = None
    perceptual: str = ""      # what the report says about the perceptual metrics
    quiet: bool = False
    pie_weights: dict | None = None  # a PIE-Bench run: the metric networks' weights given by flag (None: the env's)


def _dist_env() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise UsageError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT too (launch with torchrun)")
    return rank, world


def _scorers(cfg: Config, device) -> dict:
    """The perceptual metrics asked for (a PIE-Bench run: its metric networks, "piebench"); a bad weights file stops
    the sweep before any work or file."""
    from ..perceptual import PerceptualError
    if cfg.pie_weights is not None:
        return {"piebench": _pie_networks(cfg, device)}
    scorers = {}
    try:
        if cfg.lpips_weights:
            from ..perceptual import LPIPS
            scorers["lpips"] = LPIPS(cfg.lpips_weights, device)
        if cfg.clip_weights:
            from ..perceptual import CLIPScore
            scorers["clip_score"] = CLIPScore(cfg.clip_weights, cfg.clip_model, device)
    except PerceptualError as e:  # a missing file, package or model name: the user's to fix
        raise UsageError(str(e)) from None
    return scorers


def _pie_networks(cfg: Config, device):
    """PIE-Bench's metric networks from local files; one line names those absent (their columns stay empty)."""
    import sys

    from ..piebench.metrics import load_networks
    try:
        nets = load_networks(**cfg.pie_weights, device=device)
    except UsageError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # a weights file that cannot be read as one
        raise UsageError(f"PIE-Bench metric networks: {e}") from None
    for line in nets.missing:  # each names the metrics, the file and the flag
        print(f"diffedit sweep: PIE-Bench: {line}", file=sys.stderr)
    return nets


def read_model(model: str, read):
    """``read(model)``: a ``checkpoint`` function that reads the model's configs or keys, never its weights; a
    CheckpointError becomes the usage error of --model."""
    from ..checkpoint import CheckpointError
    from ..frontend import model_error
    try:
        return read(model)
    except CheckpointError as e:
        raise model_error(model, e) from None


def _guided_rows(cfg: Config):
    """The model's rows per guided sample, for the plan's costs, known without reading its weights: FLUX.1 embeds its
    guidance (one row); None: classifier-free guidance's two."""
    from ..checkpoint import is_flux
    if not read_model(cfg.model, is_flux):
        return None
    from ..flux_flow import FluxDenoiser
    return FluxDenoiser(None).guided_rows  # the sweep runs no true CFG


def run(cfg: Config) -> int:
    """Edit the rows of ``cfg`` that --out does not hold yet, then merge and report (rank 0). Returns 0."""
    rank, world = _dist_env()
    device = cfg.device
    if world > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    scorers = _scorers(cfg, device)
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(out, cfg.fingerprint)

    import torch

    if world > 1:
        import datetime

        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=24))
    try:
        own = out / ("results.jsonl" if world == 1 else f"results.rank{rank}.jsonl")
        read_rows(own, repair=True)
        done = {row_key(r) for p in [out / "results.jsonl", *out.glob("results.rank*.jsonl")] for r in read_rows(p)}
        todo = []
        for item in cfg.items[rank::world]:
            missing = [s for s in cfg.settings if setting_key(item.id, s) not in done]
            if missing:
                todo.append((item, missing))
        guided_rows = _guided_rows(cfg)
        stats = _run(cfg, todo, own, device, scorers, rank, world, guided_rows)
        if world > 1:
            import torch.distributed as dist
            t = torch.tensor(stats, dtype=torch.float64)
            dist.all_reduce(t)
            stats = [int(v) for v in t.tolist()]
            dist.barrier()
        if rank == 0:
            finalize(out, cfg, stats, guided_rows, quiet=cfg.quiet)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


def _run(cfg: Config, todo, own: Path, device, scorers, rank: int, world: int, guided_rows=None) -> list[int]:
    """Edit this rank's missing rows, appending each image's rows; returns [model rows run, planned (the engine's
    plan of each image's rows), as separate edits, rows computed]."""
    from tqdm import tqdm

    from ..frontend import load_pipeline
    from ..model_call import EvalCounter

    planned = sum(shared_cost(m, cfg.steps, cfg.guidance, item.target, item.source, guided_rows).rows
                  for item, m in todo)
    separate = sum(separate_cost(m, cfg.steps, cfg.guidance, item.target, item.source, guided_rows).rows
                   for item, m in todo)
    counter = EvalCounter(None)
    if todo:
        de = load_pipeline(cfg, device=device, max_batch=cfg.max_batch)
        rep = example_knobs(cfg.settings)
        bar = tqdm(total=planned, unit="eval", desc="sweep" if world == 1 else f"sweep rank {rank}",
                   position=rank, disable=cfg.quiet, dynamic_ncols=True)
        counter.on_rows = bar.update
        with open(own, "a", encoding="utf-8") as f:
            for i, (item, missing) in enumerate(todo):
                seed = cfg.seed * 1000 + item.index
                image, outputs, rows = _edit(cfg, de, item, missing, seed, counter, scorers)
                for row in rows:
                    append(f, row)
                if item.index < cfg.examples:
                    save_examples(cfg.out, item, image, outputs, rep)
                bar.set_postfix(images=f"{i + 1}/{len(todo)}")
        bar.close()
    return [counter.count, planned, separate, sum(len(m) for _, m in todo)]


def _edit(cfg: Config, de, item, settings, seed: int, counter, scorers) -> tuple:
    """One image at its missing ``settings``: (the image edited, the outputs, their rows). A PIE-Bench image is edited
    at the model's resolution and scored, and saved, at 512 px (``piebench.score``)."""
    from .grid import edit_grid, rows_for
    image = item.load()
    if item.entry is not None:
        from ..piebench import score
        image = score.work_image(image, de.cfg.resolution)
    annotated = any(s.mask_source == "annotated" for s in settings)
    outputs = edit_grid(de, image, item.source, item.target, settings, cfg.steps, cfg.guidance, seed,
                        cfg.n_draw or None, counter.around, cfg.normalization,
                        annotation=item.annotation() if annotated else None)
    if item.entry is not None:
        rows = score.rows(item, outputs, scorers["piebench"], seed, cfg.steps, cfg.guidance, cfg.out)
    else:
        rows = rows_for(item, image, outputs, seed, cfg.steps, cfg.guidance, scorers)
    return image, outputs, rows
