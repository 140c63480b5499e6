"""The shared computation: one image edited at every setting of a grid, and the metrics of its rows.

Shared across the grid: one VAE encode; one DDIM inversion to the largest ratio (smaller ratios and
Encode-Decode use its prefix, ``Trajectory.truncate``); per strength one mask pass whose query rows serve every
reference, whose first n noises give every n and whose map D serves every threshold and every dilate (the
mask grown by ``masking.dilate``, not in the paper); per ratio one batched decoding of every mask
(Encode-Decode: the all-ones mask). SDEdit runs once per (ratio, reference).
Image i of a sweep uses the seed S * 1000 + i for its mask noises and SDEdit, as ``DiffEdit.edit(seed=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan import METRICS, Setting, ordered


@dataclass
class Output:
    setting: Setting
    latents: object        # torch (C, h, w): the edited y_0
    image: object          # PIL, at the input size
    map: object = None     # torch (h, w) float in [0, 1]: D (DiffEdit)
    mask: object = None    # torch (h, w) bool: M (DiffEdit)


def edit_grid(de, image, source: str, target: str, settings, steps: int = 50, guidance: float = 7.5,
              seed: int = 0, n_draw: int | None = None, eps=None, normalization: str = "quantile") -> list[Output]:
    """Edit one image (PIL) towards ``target`` at every setting, sharing the work (see the module docstring).

    ``source`` is the text of reference "caption" ("empty" is ""); ``n_draw`` the number of mask noises
    drawn (default: the largest n of ``settings``; rows use the first n); ``eps`` the eps function to call
    (default ``de.eps``; pass a ``measure.EvalCounter`` to count); ``normalization`` the rule that removes D's
    extremes (``masking.normalize``). Returns one Output per setting, in order."""
    import torch

    from .. import images
    from ..edit import masked_decode, sdedit
    from ..inversion import ddim_encode

    eps = eps or de.eps
    settings = list(settings)
    with torch.no_grad():
        x0 = de.encode_image(images.to_tensor(image, de.multiple, de.device, de.dtype))
        size = de.image_size(x0)
        query = de.encode_prompt([target], size)
        refs = {r: de.encode_prompt(["" if r == "empty" else source], size)
                for r in ordered(s.reference for s in settings)}
        maps, masks = _masks(de, eps, x0, query, refs, settings, steps, seed, n_draw, normalization)

        # Steps 2 and 3: one inversion to the largest ratio; per ratio one batched masked decoding.
        latents: dict[Setting, torch.Tensor] = {}
        traj_settings = [s for s in settings if s.method != "sdedit"]
        if traj_settings:
            trajectory = ddim_encode(eps, x0, de.encode_prompt([""], size), max(s.ratio for s in traj_settings), steps,
                                     de.alpha_bar, max_batch=de.max_batch)
            for ratio in ordered(s.ratio for s in traj_settings):
                group = [s for s in traj_settings if s.ratio == ratio]
                blend = torch.stack([masks[s] if s.method == "diffedit" else torch.ones_like(x0[0, 0], dtype=torch.bool)
                                     for s in group])[:, None].to(x0.dtype)  # Encode-Decode: M = 1 keeps y exactly
                y0 = masked_decode(eps, trajectory.truncate(ratio), query.expand(len(group), -1, -1),
                                   torch.cat([refs[s.reference] for s in group]), guidance, de.alpha_bar, blend,
                                   None, de.max_batch)
                latents.update(zip(group, y0))
        for s in settings:
            if s.method == "sdedit":
                latents[s] = sdedit(eps, x0, query, refs[s.reference], s.ratio, steps, guidance, de.alpha_bar,
                                    torch.Generator().manual_seed(seed), de.max_batch)[0]

        y = torch.stack([latents[s] for s in settings])
        decoded = torch.cat([de.decode_latents(y[i:i + 8]) for i in range(0, len(settings), 8)])
    return [Output(s, y[i], images.to_pil(decoded[i], image.size),
                   maps.get((s.strength, s.reference, s.n)) if s.method == "diffedit" else None, masks.get(s))
            for i, s in enumerate(settings)]


def _masks(de, eps, x0, query, refs: dict, settings, steps: int, seed: int, n_draw: int | None, normalization: str):
    """Step 1: per strength one mask pass. D is symmetric in its two texts, so the references go in as
    ``noise_difference_maps``' queries against the target text: its rows are evaluated once for all of them.
    Returns the rescaled maps by (strength, reference, n) and the masks by setting."""
    import torch

    from .. import masking
    maps, masks = {}, {}
    masked = [s for s in settings if s.method == "diffedit"]
    n_draw = n_draw or max((s.n for s in masked), default=1)
    for strength in ordered(s.strength for s in masked):
        group = [s for s in masked if s.strength == strength]
        names = ordered(s.reference for s in group)
        noises = masking.noised_latents(x0, n_draw, strength, steps, de.alpha_bar, torch.Generator().manual_seed(seed))
        d = masking.noise_difference_maps(eps, noises, torch.cat([refs[r] for r in names]), query, de.max_batch,
                                          ns=ordered(s.n for s in group))
        for s in group:
            mk = (strength, s.reference, s.n)
            if mk not in maps:
                maps[mk] = masking.normalize(d[s.n][names.index(s.reference)][None].float(), normalization)[0]
            masks[s] = masking.dilate(masking.binarize(maps[mk], s.threshold), s.dilate)
    return maps, masks


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
