"""diffedit: DiffEdit (Couairon et al., ICLR 2023) on hand-written Stable Diffusion networks."""
__all__ = ["DiffEdit", "EditResult", "MaskResult", "EditSettings", "StableDiffusionDiffEditPipeline", "DiffEditPipeline"]


def __getattr__(name):
    # Lazy, so that ``import diffedit.cli`` and ``diffedit --help`` do not import torch.
    if name in ("DiffEdit", "EditResult", "MaskResult"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "EditSettings":
        from .settings import EditSettings
        return EditSettings
    if name in ("StableDiffusionDiffEditPipeline", "DiffEditPipeline"):
        from . import diffusers_api
        return getattr(diffusers_api, name)
    raise AttributeError(f"module 'diffedit' has no attribute {name!r}")
