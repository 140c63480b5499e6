"""diffedit: DiffEdit (Couairon et al., ICLR 2023) on hand-written Stable Diffusion networks."""
