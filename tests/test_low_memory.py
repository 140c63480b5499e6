"""The low-memory mode of FLUX.1 and SD3 with T5: T5 and the transformer take turns in memory. The transformer is not
read until its first call, which frees T5 first; a new text afterwards frees the transformer and reads T5 again. The
edits equal those of the model holding both, bit for bit; "auto" picks the mode when the machine has less memory than
the weights. fp32, a tiny dev-style FLUX.1 folder and a tiny SD3 folder with T5."""
from __future__ import annotations

import logging

import pytest
import torch

from diffedit.checkpoint import CheckpointError, load
from diffedit.checkpoint import build as swap_module
from diffedit.pipeline import DiffEdit

pytest.importorskip("diffusers")
from test_flux_pipeline import flux_pipeline, picture  # noqa: E402
from test_sd3_text import sd3_pipeline  # noqa: E402

KW = dict(source="a red circle", steps=4, n=2, guidance=3.5)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"{request.param}_low_memory")
    if request.param == "flux":
        pipe = flux_pipeline(root / "tokenizers", "tiny-flux", seed=5)
    else:
        pipe = sd3_pipeline(root / "tokenizers", with_t5=True, seed=5)
    pipe.save_pretrained(root / "pipeline")
    return str(root / "pipeline")


def on_meta(module: torch.nn.Module) -> bool:
    return all(p.is_meta for p in module.parameters())


@torch.no_grad()
def test_low_memory_edits_equal_the_normal_modes_and_t5_never_sits_beside_the_transformer(folder, caplog):
    normal = DiffEdit.from_pretrained(folder, dtype=torch.float32, low_memory=False)
    low = DiffEdit.from_pretrained(folder, dtype=torch.float32, low_memory=True)
    assert normal.swap is None and low.swap is not None
    t5, transformer = low.model.text_encoders.t5xxl, low.model.model.diffusion_model
    assert on_meta(transformer) and not any(p.is_meta for p in t5.parameters())  # before the first edit
    seen = []
    transformer.register_forward_pre_hook(lambda module, args: seen.append(on_meta(t5) and not on_meta(module)))
    image = picture((32, 24))
    with caplog.at_level(logging.INFO, logger=swap_module.__name__):
        for target in ("a green circle", "a blue square"):  # the second text needs T5 again: a swap back and forth
            a, b = normal.edit(image, target, **KW), low.edit(image, target, **KW)
            assert torch.equal(a.latents, b.latents) and torch.equal(a.mask_map, b.mask_map)
            assert a.image.tobytes() == b.image.tobytes()
    assert seen and all(seen)
    swaps = [r.getMessage() for r in caplog.records if r.name == swap_module.__name__]
    assert swaps == ["low-memory mode: T5 freed, the transformer loaded",
                     "low-memory mode: the transformer freed, T5 loaded",
                     "low-memory mode: T5 freed, the transformer loaded"]


@pytest.mark.parametrize("ram, low", [(1000, True), (10 ** 15, False)], ids=["short", "plenty"])
def test_auto_picks_low_memory_when_the_machine_is_short(folder, monkeypatch, caplog, ram, low):
    monkeypatch.setattr(load, "available_ram", lambda: ram)
    with caplog.at_level(logging.INFO, logger=load.__name__):
        de = DiffEdit.from_pretrained(folder, dtype=torch.float32)
    assert (de.swap is not None) == low and on_meta(de.model.model.diffusion_model) == low
    line = next(r.getMessage() for r in caplog.records if "the weights need" in r.getMessage())
    assert ("low-memory mode" in line) == low


def test_low_memory_is_refused_for_other_families_and_bad_values(folder):
    with pytest.raises(CheckpointError, match="low_memory"):
        DiffEdit.from_pretrained(folder, dtype=torch.float32, low_memory="yes")
    with pytest.raises(CheckpointError, match="FLUX.1 and to SD3 with T5, this is SD1"):
        DiffEdit.from_pretrained("toy", dtype=torch.float32, low_memory=True)


def test_sd3_without_t5_has_nothing_to_take_turns_with(tmp_path):
    sd3_pipeline(tmp_path / "tokenizers", with_t5=False).save_pretrained(tmp_path / "pipeline")
    with pytest.raises(CheckpointError, match="this is SD3 without T5"):
        DiffEdit.from_pretrained(str(tmp_path / "pipeline"), dtype=torch.float32, low_memory=True)
    assert DiffEdit.from_pretrained(str(tmp_path / "pipeline"), dtype=torch.float32).swap is None


def test_the_memory_line_says_which_weights_are_used_in_place_as_the_files_pages(folder, caplog):
    """A CPU load in the dtype the file stores keeps those weights as the file's mapped pages (no copy), as
    scripts/low_memory.py measured at SD3.5 Medium's size; converted ones are copies."""
    lines = {}
    for dtype in (torch.float32, torch.bfloat16):  # the tiny folders are stored in float32
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=load.__name__):
            DiffEdit.from_pretrained(folder, dtype=dtype, low_memory=False)
        lines[dtype] = next(r.getMessage() for r in caplog.records if "the weights need" in r.getMessage())
    assert "used in place as the file's pages" in lines[torch.float32]
    assert "in place" not in lines[torch.bfloat16]
