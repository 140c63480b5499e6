"""One image edited at every setting of a grid (through the engine), and the metrics of its rows.

The engine shares the work across the grid (``diffedit.engine``): one VAE encode; one encoding to the largest
ratio; per strength one mask pass whose rows serve every reference, every n, threshold and dilate; per ratio one
batched decoding. Image i of a sweep uses the seed S * 1000 + i for its mask noises and SDEdit's noise, as
``DiffEdit.edit(seed=...)``, so a row equals the API's edit of the same setting.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan import METRICS, Setting, requests


@dataclass
class Output:
    setting: Setting
    latents: object        # torch (C, h, w): the edited y_0
    image: object          # PIL, at the input size
    map: object = None     # torch (h, w) float in [0, 1]: D (masked methods)
    mask: object = None    # torch (h, w) bool: M (masked methods)


def edit_grid(de, image, source: str, target: str, settings, steps: int = 50, guidance: float = 7.5,
              seed: int = 0, n_draw: int | None = None, wrap=None, normalization: str = "quantile",
              annotation=None) -> list[Output]:
    """Edit one image (PIL) towards ``target`` at every setting, sharing the work (see the module docstring).

    ``source`` is the text of reference "caption" ("empty" is ""); ``n_draw`` the number of mask noises drawn
    (default: the largest n of ``settings``; rows use the first n); ``wrap`` wraps the model call (a
    ``model_call.EvalCounter`` class or factory, to count); ``normalization`` the rule that removes D's extremes
    (``masking.normalize``); ``annotation`` (bool (H, W), any size of the image's shape) the mask of the settings whose
    mask_source is "annotated", brought to latent size by ``latent_mask``. Returns one Output per setting, in order."""
    from .. import images
    from ..engine import Input

    settings = list(settings)
    inputs = [Input(images.to_tensor(image, de.multiple, de.device, de.dtype))]
    mask = None
    if annotation is not None and any(s.mask_source == "annotated" for s in settings):
        f = de.cfg.vae.downsampling
        mask = latent_mask(annotation, tuple(s // f for s in inputs[0].pixels.shape[-2:])).to(de.device)
    reqs = requests(settings, target, source, steps, guidance, seed, normalization, mask)
    out = de.engine(wrap=wrap).edits(inputs, reqs, n_draw=n_draw)
    return [Output(s, o.latents, images.to_pil(o.pixels, image.size), o.map, o.mask) for s, o in zip(settings, out)]


def latent_mask(annotation, latent_size: tuple[int, int]):
    """A bool (H, W) annotated mask at latent size (h, w), torch: a cell is in when at least half of its pixels are
    (``metrics.downsample_mask``'s majority rule where H / h = W / w is a whole number; the same rule on a box
    resize otherwise)."""
    import numpy as np
    import torch
    from PIL import Image

    from .. import images, metrics
    m = np.asarray(annotation, dtype=bool)
    (H, W), (h, w) = m.shape, latent_size
    if H % h == 0 and W % w == 0 and H // h == W // w:
        return torch.from_numpy(metrics.downsample_mask(m, H // h))
    return images.mask_from_pil(Image.fromarray(m.astype(np.uint8) * 255), (h, w))


def rows_for(item, image, outputs: list[Output], seed: int, steps: int | None = None,
             guidance: float | None = None, scorers: dict | None = None) -> list[dict]:
    """One results row per output: the knobs, the fixed settings, and the metrics (toy ground truth when the item
    has it: the changed pixels and the edited object's footprint; ``scorers``: optional "lpips" (edit, input) and
    "clip_score" (edit, target text) callables)."""
    import numpy as np

    from .. import metrics
    from ..toy import judge
    src = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tgt = gt = footprint = None
    if item.edit is not None:
        tgt, gt, footprint = item.edit.target.render(), item.edit.mask(), item.edit.footprint()
    rows = []
    for out in outputs:
        edited = np.asarray(out.image.convert("RGB"), dtype=np.uint8)
        pred = None if out.mask is None else out.mask.cpu().numpy()
        m = metrics.edit_metrics(edited, src, tgt, gt, pred, footprint=footprint)
        if item.edit is not None:
            m["success"] = float(judge.edit_success(edited, item.edit))
        if scorers and "lpips" in scorers:
            m["lpips"] = scorers["lpips"](edited, src)
        if scorers and "clip_score" in scorers:
            m["clip_score"] = scorers["clip_score"](edited, item.target)
        rows.append({"image": item.id, "index": item.index, "kind": getattr(item.edit, "kind", None),
                     **out.setting.knobs(), "seed": seed, "steps": steps, "guidance": guidance,
                     **{k: m[k] for k in METRICS if k in m}})
    return rows
