"""Loading Stable Diffusion 1.x/2.x, SDXL base and SD3 / SD3.5 weights: the one package that knows key layouts.

``load_model(source)`` takes
  * ``"toy"``: the packaged toy model ``diffedit/toy/toy.safetensors``;
  * a single file in the LDM / sgm names our networks use (``.safetensors``; ``.ckpt`` only through
    ``torch.load(weights_only=True)``). Our exports carry the architecture in their metadata
    (``diffedit_config``); for other files it is read from the tensor shapes;
  * a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, SDXL's ``text_encoder_2/``, ``scheduler/``; SD3:
    ``transformer/``, ``text_encoder_2/``, optional ``text_encoder_3/``): each ``config.json`` gives the
    architecture, and the diffusers names are mapped onto the single-file ones;
  * a Hugging Face repo id ``org/name[@revision]`` holding a diffusers folder (hub, else the local cache).
The model is built on the meta device and each tensor is read once, straight into the requested dtype. The SDXL
refiner (another model, conditioned on an aesthetic score) and SD3.5 Large Turbo (timestep-distilled) are refused
in one line.

Modules: ``sources`` (where the files are), ``single_file`` (LDM files, architecture from shapes),
``diffusers_folder`` (config.json files) and ``diffusers_names`` (the key map), ``layout`` (the prefixes),
``build`` (the strict load), ``load`` (``load_model``, the SD2 prediction type), ``sd3`` (SD3 files, Turbo) and
``sd3_folder`` (SD3 folders and the transformer's key map), ``flux`` (FLUX.1: Black Forest Labs' transformer files
with the parts beside them, diffusers folders, the transformer's key map).
"""
from .errors import CheckpointError
from .load import detect_prediction_type, edit_defaults, is_flux, load_model
from .sources import toy_path as _toy_path  # the name scripts/benchmark.py imports

__all__ = ["load_model", "CheckpointError", "detect_prediction_type", "edit_defaults", "is_flux"]
