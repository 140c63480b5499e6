"""Shared helpers for the test suite: seeding, random re-initialisation, relative error, oracle fixtures."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


# The CI / dev machine has 2 cores shared with other jobs: with several intra-op threads a busy co-tenant makes
# OpenMP barriers spin, and small forwards run ~50x slower (5 s instead of 0.1 s). One thread unless told otherwise.
torch.set_num_threads(int(os.environ.get("DIFFEDIT_TEST_THREADS", "1")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def seed_all(seed: int = 0) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Re-initialise EVERY parameter (zero-inited output layers, norms, biases included) with random normals, so
    that no path of the network is trivially zero or identity. Matrices / conv kernels get std 1/sqrt(fan_in)
    (keeps activations O(1) through the full-size networks), norm scales 1 + N(0, std), everything else N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            value = noise * (p[0].numel() ** -0.5)
        elif p.ndim == 1 and name.endswith("weight"):  # GroupNorm / LayerNorm scale
            value = 1.0 + std * noise
        else:
            value = std * noise
        p.copy_(value.to(p.dtype))
    return module


def report(name: str, err: float) -> None:
    """Print a measured error (shown with pytest -s, or in the captured output of a failure)."""
    print(f"[parity] {name}: rel err {err:.3e}")


@pytest.fixture(autouse=True)
def _seed_everything():
    seed_all(0)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model exported like the toy model: LDM names, the architecture in the metadata."""
    import json

    from safetensors.torch import save_file

    from diffedit.models import StableDiffusion, preset
    torch.manual_seed(0)
    cfg = preset("tiny")
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    state = {k: v.contiguous() for k, v in StableDiffusion(cfg).state_dict().items()}
    save_file(state, str(path), metadata={"diffedit_config": json.dumps(cfg.to_dict())})
    return path


@pytest.fixture(scope="session")
def hf_clip_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer for SD1, built offline from open_clip's BPE (``oracles.clip_tokenizer``)."""
    pytest.importorskip("transformers")
    import oracles
    return oracles.clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="session")
def alexnet_file(tmp_path_factory):
    """A random torchvision AlexNet saved under its hub file name (the LPIPS backbone), and the net."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.alexnet()
    path = tmp_path_factory.mktemp("hub") / "alexnet-owt-7be5be79.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """Two random-weight files of a tiny open_clip model registered as 'diffedit-test-clip'."""
    import open_clip
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "diffedit-test-clip.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(folder)
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = open_clip.create_model("diffedit-test-clip")
        files.append(folder / f"weights{seed}.pt")
        torch.save(model.state_dict(), files[-1])
    return files


def offline_hub_repo(folder, repo_id: str, tmp_path, monkeypatch, commit: str = "0123456789abcdef" * 2 + "76543210"):
    """``folder`` served as hub repo ``repo_id`` from a fake offline cache under ``tmp_path`` (the layout
    huggingface_hub writes: snapshots/<commit>, refs/main), for the loaders' hub-id path; nothing is fetched."""
    import shutil

    from huggingface_hub import constants
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, value in (("HF_HOME", str(tmp_path)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def cli_edit_and_sweep(model_file, tmp_path, image, *edit_flags) -> Path:
    """``diffedit edit`` (with ``edit_flags``) and a small ``diffedit sweep`` (2 ratios x 2 n, DiffEdit and SDEdit) of
    ``image`` (a PIL image) on ``model_file``, checked: the outputs at the input size, six finite rows. Returns the
    sweep's folder."""
    import numpy as np
    from PIL import Image

    from diffedit import cli, sweep
    path = tmp_path / "in.png"
    image.save(path)
    argv = ["edit", path, "--model", model_file, "--target", "a green circle", "--source", "a red circle",
            "--steps", 4, "--n", 2, *edit_flags, "--dtype", "float32", "--out", tmp_path / "out.png",
            "--mask-out", tmp_path / "m.png"]
    assert cli.main([str(a) for a in argv]) == 0
    assert Image.open(tmp_path / "out.png").size == image.size and Image.open(tmp_path / "m.png").size == image.size
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("image,source,target\nin.png,a red circle,a green circle\n")
    out = tmp_path / "sweep"
    argv = ["sweep", "--images", prompts, "--model", model_file, "--steps", 4, "--ratio", "0.5,1", "--n", "1,2",
            "--method", "diffedit,sdedit", "--dtype", "float32", "--out", out, "-q"]
    assert cli.main([str(a) for a in argv]) == 0
    rows = sweep.read_rows(out / "results.jsonl")
    assert len(rows) == 2 * 2 + 2 and all(np.isfinite(r["psnr"]) for r in rows)
    return out

