"""Image plumbing around the algorithm: loading, the size rule, conversions between PIL and tensors.

Size rule: each side is rounded to the nearest multiple of m (the VAE's downsampling times the UNet's,
64 for Stable Diffusion, 16 for the toy model), at least m, by a bicubic resize; results are resized back
to the input size, so callers always get images the size they gave.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .settings import UsageError


class ImageError(UsageError):
    """An image that cannot be read; the message names the file and the reason."""


def load_image(image) -> Image.Image:
    """A path or a PIL image -> an RGB PIL image, EXIF orientation applied (RGBA / grayscale converted)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot read image {path}: {e}") from None
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected an image path or a PIL image, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":  # a transparent palette entry is composited below like an alpha channel
        image = image.convert("RGBA")
    elif image.mode.startswith("I") or image.mode == "F":  # 16-bit / 32-bit grayscale: convert("RGB") clips
        image = Image.fromarray(_to_uint8(np.asarray(image)), mode="L")
    if image.mode in ("RGBA", "LA", "PA"):  # composite transparency on white rather than black
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """A high-bit-depth grayscale array -> uint8: integers as 16-bit data (PNG, TIFF), floats in [0, 1]
    when they are (else taken as 0..255)."""
    if np.issubdtype(arr.dtype, np.integer):
        scaled = arr.astype(np.float64) / 257.0
    else:
        arr = np.nan_to_num(arr.astype(np.float64))
        scaled = arr * 255.0 if arr.size and arr.min() >= 0 and arr.max() <= 1 else arr
    return np.clip(scaled.round(), 0, 255).astype(np.uint8)


def model_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(W, H) -> each side rounded to the nearest multiple of ``multiple``, at least ``multiple``."""
    return tuple(max(multiple, int(round(s / multiple)) * multiple) for s in size)


def to_tensor(image: Image.Image, multiple: int, device, dtype) -> torch.Tensor:
    """PIL RGB -> (1, 3, H', W') in [-1, 1] at the model size."""
    w, h = model_size(image.size, multiple)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    return x.to(device, dtype)


def to_pil(x: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB, resized to ``size`` (W, H) if given."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(arr)
    return image if size is None or image.size == tuple(size) else image.resize(tuple(size), Image.BICUBIC)


def mask_to_pil(mask: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """(h, w) bool or [0, 1] mask -> PIL "L" at ``size`` (W, H), nearest-neighbour so it stays binary."""
    arr = (mask.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return Image.fromarray(arr, mode="L").resize(tuple(size), Image.NEAREST)


def mask_from_pil(mask: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """A user's mask (PIL, any mode, white = edit) -> bool (h, w) at latent size: a latent pixel is in the
    mask when at least half of the image pixels it covers are."""
    h, w = latent_size
    arr = np.asarray(mask.convert("L").resize((w, h), Image.BOX), dtype=np.float32) / 255.0
    return torch.from_numpy(arr >= 0.5)
