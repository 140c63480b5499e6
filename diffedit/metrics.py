"""Image and mask metrics: pure numpy functions.

Images are (H, W, C) or (H, W), uint8 or float, on the scale given by ``data_range`` (255 for
uint8-like values).  Masks are (H, W) bool.  Anything ``np.asarray`` takes is accepted; torch
tensors are detached and moved to the CPU first (without importing torch).
"""
from __future__ import annotations

import numpy as np


def _arr(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor: np.asarray fails on cuda / requires_grad tensors
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _mask(mask, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    m = _arr(mask)
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got values outside {{0, 1}}")
        m = m.astype(bool)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} shape {m.shape} does not match image shape {tuple(shape)}")
    return m


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _arr(a, np.float64), _arr(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"images must be (H, W) or (H, W, C), got shape {a.shape}")
    return a, b


def psnr(a, b, mask=None, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, over all pixels or those where ``mask`` is True
    (all channels of a selected pixel count).  +inf when the selected pixels are identical."""
    a, b = _pair(a, b)
    err = (a - b) ** 2
    if mask is not None:
        m = _mask(mask, a.shape[:2])
        if not m.any():
            raise ValueError("mask selects no pixel")
        err = err[m]
    mse = float(err.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def iou(pred_mask, true_mask) -> float:
    """Intersection over union of two (H, W) bool masks; 1.0 when both are empty."""
    p, t = _arr(pred_mask), _arr(true_mask)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: pred_mask {p.shape} vs true_mask {t.shape}")
    p, t = _mask(p, p.shape, "pred_mask"), _mask(t, t.shape, "true_mask")
    union = np.count_nonzero(p | t)
    return 1.0 if union == 0 else np.count_nonzero(p & t) / union


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur over axes 0 and 1 with symmetric padding; the same as
    scipy.ndimage.gaussian_filter(mode="reflect", truncate=3.5) used by scikit-image."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        p = np.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        x = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return x


def ssim(a, b, mask=None, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window 11 (sigma 1.5), K1 0.01, K2 0.03,
    population covariances, averaged over channels.

    mask None: mean of the SSIM map without a 5-px border, exactly as
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=..., channel_axis=-1)``.
    mask given: mean of the full SSIM map (borders symmetric-padded) over the mask's pixels,
    so a mask touching the border counts it, and an all-True mask differs slightly from None."""
    a, b = _pair(a, b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    s = s.mean(axis=-1)
    if mask is None:
        if min(s.shape) < 11:
            raise ValueError(f"ssim needs images of at least 11 x 11 px, got shape {a.shape[:2]}")
        return float(s[5:-5, 5:-5].mean())
    m = _mask(mask, s.shape)
    if not m.any():
        raise ValueError("mask selects no pixel")
    return float(s[m].mean())


def resize_mask(mask, size) -> np.ndarray:
    """Nearest-neighbour resize of a bool (h, w) mask to ``size`` = H or (H, W): output pixel
    (i, j) takes input pixel (floor(i * h / H), floor(j * w / W)); for an integer upscale factor
    every input pixel becomes a factor x factor block."""
    m = _arr(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be (h, w), got shape {m.shape}")
    H, W = (size, size) if np.isscalar(size) else tuple(size)
    rows = np.arange(H) * m.shape[0] // H
    cols = np.arange(W) * m.shape[1] // W
    return m[rows[:, None], cols[None, :]]


def downsample_mask(mask, factor: int, rule: str = "majority") -> np.ndarray:
    """Bool (H / factor, W / factor) mask from a bool (H, W) one, block by block.
    rule "majority": a block is True when at least half its pixels are (ties count as True);
    rule "any": True when any pixel of the block is.  H and W must be multiples of factor."""
    m = _arr(mask).astype(bool)
    if m.ndim != 2 or m.shape[0] % factor or m.shape[1] % factor:
        raise ValueError(f"mask shape {m.shape} is not (H, W) with H and W multiples of {factor}")
    blocks = m.reshape(m.shape[0] // factor, factor, m.shape[1] // factor, factor)
    if rule == "any":
        return blocks.any(axis=(1, 3))
    if rule == "majority":
        return 2 * blocks.sum(axis=(1, 3)) >= factor * factor
    raise ValueError(f"rule must be 'majority' or 'any', got {rule!r}")


def edit_metrics(edited, source, target=None, gt_mask=None, pred_mask=None, data_range: float = 255.0,
                 footprint=None) -> dict:
    """The per-edit numbers of an evaluation row (used by ``diffedit sweep``).

    Always: ``psnr`` / ``ssim`` of ``edited`` to ``source`` (the input; higher = closer to it).
    With ``pred_mask`` (bool (h, w), any resolution, e.g. DiffEdit's latent-resolution mask): ``mask_area``,
    the fraction of it that is set.  With ``gt_mask`` (bool (H, W) at image size, True = should change):
    ``bg_psnr`` / ``bg_ssim`` outside it (NaN when it covers everything), and with ``pred_mask`` too,
    ``iou`` of the nearest-neighbour upsampled ``pred_mask`` with it; with ``footprint`` (bool (H, W): the region
    an editor is asked to repaint, e.g. the edited object in the source or the target) and ``pred_mask``,
    ``iou_footprint`` likewise.  With ``target`` (the ground-truth edited image): ``target_psnr``."""
    out = {"psnr": psnr(edited, source, data_range=data_range),
           "ssim": ssim(edited, source, data_range=data_range)}
    if gt_mask is not None:
        bg = ~_mask(gt_mask, _arr(source).shape[:2], "gt_mask")
        out["bg_psnr"] = psnr(edited, source, mask=bg, data_range=data_range) if bg.any() else float("nan")
        out["bg_ssim"] = ssim(edited, source, mask=bg, data_range=data_range) if bg.any() else float("nan")
    if target is not None:
        out["target_psnr"] = psnr(edited, target, data_range=data_range)
    if pred_mask is not None:
        p = _arr(pred_mask).astype(bool)
        out["mask_area"] = float(p.mean())
        for key, truth in (("iou", gt_mask), ("iou_footprint", footprint)):
            if truth is not None:
                out[key] = iou(resize_mask(p, _arr(truth).shape), truth)
    return out
