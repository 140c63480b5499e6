"""FLUX.1 behind the front ends: the app's work (one session's cached engine) edits a tiny FLUX.1 model and gives the
API's image; a hub repo id resolves to a FLUX.1 folder in the offline hub cache and loads as the folder does; the
sweep and the app start from the model's own steps and guidance, as an edit does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import offline_hub_repo
from diffedit import checkpoint, sweep
from diffedit.app_handlers import Handlers
from diffedit.app_state import AppModel, Session
from diffedit.checkpoint import edit_defaults, load_model
from diffedit.pipeline import DiffEdit
from diffedit.settings import EditSettings

pytest.importorskip("diffusers")
from test_flux_defaults import tiny_flux  # noqa: E402
from test_flux_pipeline import flux_pipeline  # noqa: E402


@pytest.mark.parametrize("method", ["diffedit", "sdedit"])
def test_the_apps_work_on_flux_equals_the_api(method, tmp_path):
    de = tiny_flux("tiny-flux", tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    s = EditSettings(method=method, steps=4, guidance=3.5, n=2, ratio=0.5)
    work = AppModel(de).work(Session())
    app = work.edit(work.picture(image).at(None, de.multiple), "a cat", "a dog", s)
    api = de.edit(image, "a dog", source="a cat", method=method, steps=4, guidance=3.5, n=2, ratio=0.5).image
    assert app.size == api.size == image.size
    assert np.array_equal(np.asarray(app), np.asarray(api))
    assert sum(work.finish().rows.values()) > 0


def test_repo_id_of_a_flux_folder_loads_from_the_offline_cache(tmp_path, monkeypatch):
    folder = tmp_path / "pipeline"
    flux_pipeline(tmp_path / "tokenizers", "tiny-flux").save_pretrained(folder)
    offline_hub_repo(folder, "org/tiny-flux", tmp_path, monkeypatch)
    loaded, cfg = load_model("org/tiny-flux")
    local, local_cfg = load_model(str(folder))
    assert cfg.family == "flux" and cfg == local_cfg
    assert loaded.state_dict().keys() == local.state_dict().keys()
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert DiffEdit.from_pretrained("org/tiny-flux").defaults(steps=None, guidance=None) == {"steps": 28,
                                                                                             "guidance": 3.5}


@pytest.mark.parametrize("name, steps, guidance", [("tiny-flux", 28, 3.5), ("tiny-flux-schnell", 4, 1.0)])
def test_the_sweep_and_the_app_start_from_the_flux_models_own_steps_and_guidance(name, steps, guidance, tmp_path,
                                                                                   monkeypatch):
    folder = tmp_path / "pipeline"
    flux_pipeline(tmp_path / "tokenizers", name).save_pretrained(folder)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("image,source,target\nin.png,a red circle,a green circle\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    argv = ["--images", str(prompts), "--model", str(folder), "--out", str(tmp_path / "out")]
    with monkeypatch.context() as m:  # read from the configs: no weight file is opened
        m.setattr(checkpoint.flux, "open_weights", lambda *a: pytest.fail("a weight file was read"))
        assert edit_defaults(folder) == {"steps": steps, "guidance": guidance}
        cfg = sweep.parse_config(sweep.build_parser().parse_args(argv))
        given = sweep.parse_config(sweep.build_parser().parse_args(argv + ["--steps", "3", "--guidance", "2"]))
    assert (cfg.steps, cfg.guidance) == (steps, guidance) and (given.steps, given.guidance) == (3, 2.0)
    assert (cfg.fingerprint["steps"], cfg.fingerprint["guidance"]) == (steps, guidance)
    de = DiffEdit.from_pretrained(str(folder))
    assert de.defaults(steps=None, guidance=None) == edit_defaults(folder)
    h = Handlers(AppModel(de))
    assert (h.defaults.steps, h.defaults.guidance) == (steps, guidance)


def test_stable_diffusion_and_the_toy_keep_the_knobs_steps_and_guidance_in_the_sweep(tmp_path):
    assert edit_defaults("toy") == {}
    cfg = sweep.parse_config(sweep.build_parser().parse_args(["--images", "toy:1", "--out", str(tmp_path)]))
    assert (cfg.steps, cfg.guidance) == (50, 7.5)
