"""Where the files are: the packaged toy model, a local file or folder, or a Hugging Face repo id."""
from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

from .diffusers_folder import WEIGHTS
from .errors import CheckpointError
from .sd3_folder import SD3_WEIGHTS

_HOWTO = "see weights.md, \"Getting the files on a machine without hub access\""


def toy_path() -> Path:
    """The packaged toy model's file (it may not be built yet)."""
    return Path(str(importlib.resources.files("diffedit.toy"))) / "toy.safetensors"


def resolve(source: str) -> Path:
    """The file or folder ``source`` names: "toy", a path, or ``org/name[@revision]``."""
    if source == "toy":
        if not toy_path().is_file():
            raise CheckpointError(f"the toy model {toy_path()} is not built yet: run "
                                  "python scripts/train_toy.py --export diffedit/toy/toy.safetensors")
        return toy_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", source) and path.suffix not in (".safetensors", ".ckpt"):
        return _from_hub(source)
    raise CheckpointError(f"no such file or folder: {source}")


def _weight_files(sub: str, stem: str, variant: str = "") -> list[str]:
    """Patterns of a component's weights: one file, or shards and their index."""
    return [f"{sub}/{stem}{variant}.safetensors", f"{sub}/{stem}.safetensors.index{variant}.json",
            f"{sub}/{stem}{variant}-*-of-*.safetensors"]


def _from_hub(spec: str) -> Path:
    """A diffusers folder (SD 1.x/2.x, SDXL or SD3) from the hub, or from the local cache when the hub cannot be
    reached; only the files the loader reads."""
    from huggingface_hub import constants, snapshot_download
    repo_id, _, revision = spec.partition("@")

    def fetch(patterns):
        try:
            return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
        except Exception as online:  # no network, offline mode, hub down, unknown repo: try the cache alone
            try:
                return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                              local_files_only=True))
            except Exception:
                reason = f"{type(online).__name__}: {str(online).splitlines()[0] if str(online) else ''}"
                raise CheckpointError(f"{spec!r} is not a local file or folder, nor a Hugging Face repo in the cache "
                                      f"({constants.HF_HUB_CACHE}) or downloadable now ({reason}); {_HOWTO}") from None

    subs = {**WEIGHTS, **SD3_WEIGHTS}
    root = fetch(["model_index.json", "scheduler/scheduler_config.json", "tokenizer*/*.json",
                  *(f"{s}/config.json" for s in subs), *(p for s, w in subs.items() for p in _weight_files(s, w))])
    # the fp16 variant where a component (not every pipeline has them all) has a config but no full-precision weights
    fp16 = [p for s, w in subs.items() if (root / s / "config.json").is_file()
            and not any((root / s / f).exists() for f in (f"{w}.safetensors", f"{w}.safetensors.index.json"))
            for p in _weight_files(s, w, ".fp16")]
    return fetch(fp16) if fp16 else root
