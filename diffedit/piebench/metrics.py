"""PIE-Bench's official metrics of one edit, as cure-lab/PnPInversion's evaluation/ computes them (Ju et al.,
"PnP Inversion", ICLR 2024), from networks read from local files only.

    nets = load_networks(dino="dino_vitb8_pretrain.pth", clip="open_clip_pytorch_model.bin",
                         lpips="squeezenet1_1-b8a52dc0.pth")
    image_metrics(nets, source, edited, mask, "a cat on a sofa", "a dog on a sofa")   # {metric: value}

The official rules, each followed here:
- Background ("unedit part"): both images as float in [0, 1] multiplied by 1 - mask over the whole image (the
  edited region becomes black in both, so it still counts in every mean), then torchmetrics' PSNR, MSE and SSIM
  with data range 1 and LPIPS (SqueezeNet) on the masked images scaled to [-1, 1]. SSIM averages over the
  positions its window fits in, as the torchmetrics of the published numbers did (``ssim``'s ``border``). A mask
  covering everything gives NaN, as the official script's "nan".
- structure_distance: the "Splicing ViT features" structure loss (Tumanyan et al. 2022) on the whole images: MSE
  between the cosine self-similarity matrices of DINO ViT-B/8's attention keys in block 11 (CLS token included),
  heads concatenated. The images keep their [0, 255] values, are resized to 224 px (bilinear, no antialiasing:
  torchvision 0.13's tensor Resize, the official environment) and then ImageNet-normalised: the official code
  applies the [0, 1] mean and std to [0, 255] values, and so does this one, so that the numbers compare.
- CLIP similarity: torchmetrics' CLIPScore with OpenAI's CLIP ViT-L/14, 100 x max(cos(image, text), 0): the
  source image with the source prompt, the edited image with the target prompt, and the edited image times the
  mask (uint8, zero outside the edit) with the target prompt. Prompts arrive with the [brackets] removed.
The mask is the annotation as decoded (1 = the edited region, border rows and columns set to 1 by the decoder).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import perceptual
from ..perceptual import CLIPScore, SqueezeLPIPS, one_line
from ..settings import UsageError

METRICS = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part",
           "clip_similarity_source_image", "clip_similarity_target_image", "clip_similarity_target_image_edit_part")
BACKGROUND = ("psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part")  # no network needed
CLIP_METRICS = METRICS[5:]

# open_clip's name for OpenAI's ViT-L/14: QuickGELU, as openai/clip-vit-large-patch14 (plain ViT-L-14 is GELU)
CLIP_MODEL = "ViT-L-14-quickgelu"
KEY_LAYER = 11  # the block whose attention keys define the structure (the last of ViT-B/8's 12)
DINO_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- background metrics (torchmetrics' definitions, float64) ---------------------------------------------------

def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).permute(2, 0, 1)[None]


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every pixel and channel (torchmetrics ``MeanSquaredError``)."""
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) over the whole image (torchmetrics ``PeakSignalNoiseRatio``); +inf if equal."""
    err = mse(a, b)
    return float("inf") if err == 0 else float(10 * np.log10(data_range**2 / err))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5, border: str = "valid") -> float:
    """SSIM (Wang et al. 2004) as torchmetrics ``StructuralSimilarityIndexMeasure`` computes it: per channel, a
    Gaussian window of std 1.5 and size 11, K1 = 0.01, K2 = 0.03, variances clamped at 0, the index averaged.
    ``border`` "valid": over the positions where the window fits inside the image, as torchmetrics did before 1.5
    (it padded by reflection and cropped that band) and so as PIE-Bench's published numbers were computed;
    "reflect": over every pixel of the reflection-padded image, as torchmetrics does from 1.5 on."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    g = g / g.sum()
    x, y = _chw(np.clip(a, 0, data_range)), _chw(np.clip(b, 0, data_range))
    if border == "reflect":
        x, y = (F.pad(t, (size // 2,) * 4, mode="reflect") for t in (x, y))
    elif border != "valid":
        raise ValueError(f"border must be 'valid' or 'reflect', got {border!r}")
    c = x.shape[1]
    stack = torch.cat([x, y, x * x, y * y, x * y]).reshape(5 * c, 1, *x.shape[2:]).transpose(0, 1)
    # separable valid convolution: rows then columns, one group per map and channel
    w = g.view(1, 1, size, 1).expand(5 * c, 1, size, 1)
    blur = F.conv2d(F.conv2d(stack, w, groups=5 * c), w.transpose(2, 3), groups=5 * c)
    mx, my, xx, yy, xy = blur.view(5, c, *blur.shape[2:])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vx, vy, cov = (xx - mx * mx).clamp(min=0), (yy - my * my).clamp(min=0), xy - mx * my
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())


# ---- DINO ViT (the official checkpoint's names: dino_vitb8_pretrain.pth, timm vit_base_patch8_224.dino) --------

@dataclass(frozen=True)
class DinoConfig:
    image_size: int = 224
    patch_size: int = 8
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4


DINO_VITB8 = DinoConfig()
DINO_CONFIG = DINO_VITB8  # what load_networks builds (tests swap in a tiny one)


class Attention(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)


class DinoViT(nn.Module):
    """DINO's ViT (Caron et al. 2021): patch embedding, CLS token, learned positions, pre-norm blocks."""

    def __init__(self, cfg: DinoConfig = DINO_VITB8):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.cfg.image_size,) * 2:  # the checkpoint's positions are for this size only
            raise ValueError(f"DINO input must be {self.cfg.image_size} px square, got {tuple(x.shape[-2:])}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, grid^2, width)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed

    def keys(self, x: torch.Tensor, layer: int = KEY_LAYER) -> torch.Tensor:
        """Attention keys of block ``layer``, heads concatenated: (B, tokens, width)."""
        h = self.tokens(x)
        for block in self.blocks[:layer]:
            h = block(h)
        w = self.cfg.width
        return self.blocks[layer].attn.qkv(self.blocks[layer].norm1(h))[..., w: 2 * w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


def dino_input(image: np.ndarray, size: int = DINO_SIZE) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size): [0, 255] values resized bilinearly without antialiasing, then the
    ImageNet mean and std applied to those [0, 255] values, as the official evaluation does."""
    x = _chw(image).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def key_self_similarity(keys: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, T, D) -> (B, T, T) cosine similarities, the norm product clamped at ``eps`` (Splicing ViT's rule)."""
    norms = keys.norm(dim=-1, keepdim=True)
    return keys @ keys.transpose(1, 2) / (norms @ norms.transpose(1, 2)).clamp(min=eps)


@torch.no_grad()
def structure_distance(dino: DinoViT, source: np.ndarray, edited: np.ndarray, layer: int = KEY_LAYER) -> float:
    """MSE between the key self-similarities of the two images (Tumanyan et al. 2022, the structure loss)."""
    device = next(dino.parameters()).device
    x = torch.cat([dino_input(source), dino_input(edited)]).to(device)
    sim = key_self_similarity(dino.keys(x, layer).float())
    return float(F.mse_loss(sim[0], sim[1]))


def load_dino(path, config: DinoConfig = DINO_VITB8, device="cpu") -> DinoViT:
    """``DinoViT`` from a local state dict (the official .pth or timm's .safetensors / .bin); strict."""
    p = Path(path).expanduser()
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state dict")
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()
                 if not k.startswith(("head.", "fc_norm."))}  # timm's identity head has no weights; others are unused
        model = DinoViT(config)
        model.load_state_dict(state)
    except Exception as e:  # pickles, other networks, truncated files: one line
        raise UsageError(f"--dino-weights {p}: not a DINO ViT state dict of patch {config.patch_size}, width "
                         f"{config.width}, {config.depth} blocks ({one_line(e)})") from None
    return model.eval().requires_grad_(False).to(device)


# ---- the networks from local files, and one edit's metrics ------------------------------------------------------

@dataclass
class MetricNetworks:
    """The metric networks; each None when its weights were not given, with one line per absent one in ``missing``."""
    dino: DinoViT | None = None  # DINO ViT-B/8 (structure distance)
    clip: CLIPScore | None = None  # CLIP ViT-L/14 (open_clip image and text towers)
    lpips: SqueezeLPIPS | None = None  # LPIPS, SqueezeNet variant
    missing: list[str] = field(default_factory=list)


# (attribute, flag, environment variable, what the file is, the metrics it serves)
NETWORKS = (
    ("dino", "--dino-weights", "DIFFEDIT_DINO_WEIGHTS", "DINO ViT-B/8 (dino_vitb8_pretrain.pth or timm "
     "vit_base_patch8_224.dino)", ("structure_distance",)),
    ("clip", "--clip-weights", "DIFFEDIT_CLIP_WEIGHTS", "CLIP ViT-L/14, OpenAI's weights in open_clip's layout "
     "(open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_224.openai)", CLIP_METRICS),
    ("lpips", "--lpips-weights", "DIFFEDIT_LPIPS_WEIGHTS", "LPIPS SqueezeNet (torchvision's squeezenet1_1-b8a52dc0.pth "
     "or an LPIPS 'squeeze' state dict)", ("lpips_unedit_part",)),
)


def _load(name: str, path: Path, device):
    try:
        if name == "dino":
            return load_dino(path, DINO_CONFIG, device)
        if name == "clip":
            return CLIPScore(path, model_name=CLIP_MODEL, device=device)
        return perceptual.load_squeeze_lpips(path, device)
    except perceptual.PerceptualError as e:
        raise UsageError(str(e)) from None


def load_networks(dino: str | None = None, clip: str | None = None, lpips: str | None = None,
                  device="cpu") -> MetricNetworks:
    """The metric networks from local files: each argument, else its environment variable (DIFFEDIT_DINO_WEIGHTS,
    DIFFEDIT_CLIP_WEIGHTS, DIFFEDIT_LPIPS_WEIGHTS); never fetched. An absent one is None with a line in ``missing``;
    a path that is not a file, or a file that is not those weights, is a one-line UsageError naming it."""
    given, nets = {"dino": dino, "clip": clip, "lpips": lpips}, MetricNetworks()
    for name, flag, env, what, serves in NETWORKS:
        value = given[name] if given[name] is not None else (os.environ.get(env) or None)
        if value is None:
            nets.missing.append(f"{', '.join(serves)} left empty: no {what}; give {flag} FILE or set {env}")
            continue
        path = Path(value).expanduser()
        source = flag if given[name] is not None else env
        if not path.is_file():
            raise UsageError(f"{source} {path}: no such file ({what}; none is downloaded)")
        setattr(nets, name, _load(name, path, device))
    return nets


def _rgb(image, name: str) -> np.ndarray:
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"{name} must be an (H, W, 3) uint8 image, got {a.dtype} {a.shape}")
    return a


@torch.no_grad()
def image_metrics(nets: MetricNetworks, source, edited, mask, source_prompt: str,
                  target_prompt: str) -> dict[str, float | None]:
    """The official metrics of one edit (the module's docstring gives each rule). source / edited: (H, W, 3) uint8
    arrays or PIL images; mask: (H, W) in {0, 1}, 1 = the edited region. Keys ``METRICS``; a metric whose network
    is absent is None; NaN where the official script writes "nan" (nothing left outside or inside the mask)."""
    src, edt = _rgb(source, "source"), _rgb(edited, "edited")
    if src.shape != edt.shape:
        raise ValueError(f"image shapes differ: source {src.shape} vs edited {edt.shape}")
    m = np.asarray(mask)
    if m.shape != src.shape[:2] or not np.isin(m, (0, 1)).all():
        raise ValueError(f"mask must be {src.shape[:2]} with values in {{0, 1}}, got {m.dtype} {m.shape}")
    keep = (1 - m.astype(np.float32))[..., None]
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    if keep.any():
        # float32 like the official script before its metrics; the metrics themselves run in float64
        a, b = src.astype(np.float32) / 255 * keep, edt.astype(np.float32) / 255 * keep
        out.update(psnr_unedit_part=psnr(a, b), mse_unedit_part=mse(a, b), ssim_unedit_part=ssim(a, b))
        if nets.lpips is not None:
            device = next(nets.lpips.parameters()).device
            x, y = (torch.from_numpy(i * 2 - 1).permute(2, 0, 1)[None].to(device) for i in (a, b))
            out["lpips_unedit_part"] = float(nets.lpips(x, y).mean())
    else:
        out.update(dict.fromkeys(BACKGROUND + ("lpips_unedit_part",) * (nets.lpips is not None), float("nan")))
    if nets.dino is not None:
        out["structure_distance"] = structure_distance(nets.dino, src, edt)
    if nets.clip is not None:
        out["clip_similarity_source_image"] = nets.clip(src, source_prompt)
        out["clip_similarity_target_image"] = nets.clip(edt, target_prompt)
        inside = (edt * m.astype(np.uint8)[..., None]).astype(np.uint8)
        out["clip_similarity_target_image_edit_part"] = nets.clip(inside, target_prompt) if m.any() else float("nan")
    return out
