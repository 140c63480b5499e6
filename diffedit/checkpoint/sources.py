"""Where the files are: the packaged toy model, a local file or folder, or a Hugging Face repo id."""
from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

from .diffusers_folder import WEIGHTS
from .errors import CheckpointError

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


def _from_hub(spec: str) -> Path:
    """A diffusers folder (SD 1.x/2.x or SDXL) from the hub, or from the local cache when the hub cannot be
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

    root = fetch(["model_index.json", "scheduler/scheduler_config.json", *(f"{s}/config.json" for s in WEIGHTS),
                  *(f"{s}/{w}.safetensors" for s, w in WEIGHTS.items())])
    # the fp16 variant where a component (text_encoder_2: SDXL only) has a config but no full-precision weights
    fp16 = [f"{s}/{w}.fp16.safetensors" for s, w in WEIGHTS.items()
            if (root / s / "config.json").is_file() and not (root / s / f"{w}.safetensors").exists()]
    return fetch(fp16) if fp16 else root
