"""FLUX.1's memory: a float8 (e4m3fn) single file loads strictly and stays float8 in memory (each Linear's weights
upcast only while it runs), and computes exactly what the same weights upcast once compute: the math is the same
(e4m3 values are exact in bf16 and fp32), so the outputs are equal, not merely close. Tensors outside Linear layers
(the norms' scales) are upcast at load. The line logged before loading counts float8 weights at one byte, gives T5's
share, and says when the machine is short. fp32 compute (fast on any CPU)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from diffedit.checkpoint import load, load_model
from diffedit.models.flux import STORED_DTYPES, Flux, StoredLinear
from diffedit.pipeline import DiffEdit

pytest.importorskip("diffusers")
from test_flux_pipeline import flux_pipeline, picture  # noqa: E402

F8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(the float8 file, its tensors as stored): a tiny dev-style transformer saved in float8 beside the folder's
    VAE and text encoders, every tensor float8, the norms' scales included."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("flux_f8")
    flux_pipeline(root / "tokenizers", "tiny-flux", seed=4).save_pretrained(root / "repo")
    model, _ = load_model(str(root / "repo"), dtype=torch.float32)
    stored = {k: v.to(F8).contiguous() for k, v in model.transformer.state_dict().items()}
    path = root / "repo" / "flux1-tiny-fp8.safetensors"
    save_file(stored, str(path))
    return path, stored


def upcast_once(stored: dict, cfg, dtype) -> Flux:
    """The same transformer with every weight upcast to ``dtype`` once, as plain Linear layers."""
    with torch.device("meta"):
        flux = Flux(cfg)
    flux.load_state_dict({k: v.to(dtype) for k, v in stored.items()}, strict=True, assign=True)
    return flux.eval()


def inputs(cfg):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 16, 6, 10, generator=g), torch.tensor([700.0, 250.0]),
            torch.randn(2, 7, cfg.context_in_dim, generator=g), torch.randn(2, cfg.vec_in_dim, generator=g),
            torch.tensor([3.5, 1.0]))


def test_a_float8_file_loads_strictly_and_its_linear_weights_stay_float8(files):
    path, _ = files
    model, cfg = load_model(str(path), dtype=torch.float32)
    flux = model.transformer
    linears = [m for m in flux.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is StoredLinear and m.weight.dtype == F8 for m in linears)
    others = [p for n, p in flux.named_parameters() if n.endswith(".scale")]
    assert others and all(p.dtype == torch.float32 for p in others)  # norms' scales: upcast at load
    stored = sum(p.numel() for p in flux.parameters() if p.dtype == F8)
    assert stored / sum(p.numel() for p in flux.parameters()) > 0.99
    # the rest of the model (VAE, text encoders from the folder) is in the dtype asked for
    assert all(p.dtype == torch.float32 for p in [*model.first_stage_model.parameters(),
                                                  *model.text_encoders.parameters()])


@torch.no_grad()
def test_float8_weights_upcast_per_call_equal_the_weights_upcast_once(files):
    path, stored = files
    model, cfg = load_model(str(path), dtype=torch.float32)
    ours, once = model.transformer, upcast_once(stored, cfg.flux, torch.float32)
    args = inputs(cfg.flux)
    assert torch.equal(ours(*args), once(*args))


def test_moving_or_casting_the_model_keeps_float8_and_casts_the_rest(files):
    path, _ = files
    model, _ = load_model(str(path), dtype=torch.float32)
    model.to(torch.bfloat16)
    flux = model.transformer
    assert flux.img_in.weight.dtype == F8 and flux.img_in.bias.dtype == F8
    assert flux.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.bfloat16
    model.to("meta")  # a device move moves float8 weights too, still float8
    assert flux.img_in.weight.is_meta and flux.img_in.weight.dtype == F8


@torch.no_grad()
def test_diffedit_on_a_float8_file_keeps_it_float8_and_edits(files):
    path, _ = files
    de = DiffEdit.from_pretrained(str(path), dtype=torch.float32)
    assert de.dtype == torch.float32
    assert all(p.dtype in (F8, torch.float32) for p in de.network.parameters())
    assert any(p.dtype in STORED_DTYPES for p in de.network.parameters())
    out = de.edit(picture((32, 16)), "a green circle", "a red circle", steps=4, n=2, guidance=3.5)
    assert out.image.size == (32, 16) and torch.isfinite(out.latents).all()


def test_the_memory_line_counts_float8_at_one_byte_and_gives_t5s_share(files, monkeypatch, caplog):
    path, stored = files
    f8_bytes = sum(v.numel() for v in stored.values())
    model, _ = load_model(str(path), dtype=torch.float32)
    rest = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("model.diffusion_model."))
    t5 = sum(p.numel() * 4 for p in model.text_encoders.t5xxl.parameters())
    with caplog.at_level(logging.INFO, logger=load.__name__):
        load_model(str(path), dtype=torch.float32)
    line = next(r for r in caplog.records if r.name == load.__name__ and "the weights need" in r.getMessage())
    assert f"need {(f8_bytes + rest) / 1e9:.2f} GB in float32" in line.getMessage()
    assert f"T5 takes {t5 / 1e9:.2f} GB" in line.getMessage() and line.levelno == logging.INFO
    caplog.clear()
    monkeypatch.setattr(load.os, "sysconf", lambda name: 1 if name != "SC_PAGE_SIZE" else 4096)
    monkeypatch.setattr(load, "available_ram", lambda: 1000)  # a machine short of memory
    with caplog.at_level(logging.INFO, logger=load.__name__):
        load_model(str(path), dtype=torch.float32)
    short = next(r for r in caplog.records if r.name == load.__name__ and "the weights need" in r.getMessage())
    assert short.levelno == logging.WARNING and "short by" in short.getMessage()
