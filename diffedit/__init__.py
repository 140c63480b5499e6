"""diffedit: DiffEdit (Couairon et al., ICLR 2023) on hand-written Stable Diffusion networks."""
from .pipeline import DiffEdit, EditResult, MaskResult

__all__ = ["DiffEdit", "EditResult", "MaskResult"]
