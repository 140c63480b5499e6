"""The paper's two evaluation axes (Sec. 4, Fig. 3), from weights the user already has: LPIPS distance to the
input (Zhang et al. 2018) and CLIP score with the query text (Hessel et al. 2021). Nothing is downloaded; a
missing package, file or model name is a ``PerceptualError`` that names it.

    lp = LPIPS("~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth")   # torchvision's AlexNet file
    cs = CLIPScore("open_clip_pytorch_model.bin", model_name="ViT-B-32")     # any open_clip checkpoint
    lp(edited, source), cs(edited, "a red circle on a gray background")

Images: PIL images or (H, W, 3) uint8 arrays.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 AlexNet, the LPIPS backbone


class PerceptualError(ValueError):
    """A perceptual metric cannot be built: what is missing and where."""


def _file(path, flag: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PerceptualError(f"{flag} {p}: no such file ({what}; none can be downloaded here)")
    return p


def _rgb_tensor(image, device) -> torch.Tensor:
    """PIL image or (H, W, 3) uint8 array -> (1, 3, H, W) float in [-1, 1]."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    return torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None].to(device) / 127.5 - 1.0


class LPIPS:
    """LPIPS v0.1 with AlexNet: the ``lpips`` package's linear heads (shipped inside it) on a torchvision AlexNet
    read from ``backbone``. Lower = closer; identical images give 0."""

    def __init__(self, backbone, device="cpu"):
        try:
            import lpips
            import torchvision
        except ImportError as e:
            raise PerceptualError(f"LPIPS needs the lpips package ({e.name} is missing): pip install lpips") from None
        path = _file(backbone, "--lpips-weights", f"the torchvision AlexNet checkpoint, {ALEXNET_FILE}")
        alexnet = torchvision.models.alexnet()
        try:
            alexnet.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # pickles, other networks, truncated files: one line, not a deep traceback
            raise PerceptualError(f"--lpips-weights {path}: not a torchvision AlexNet state dict "
                                  f"({str(e).splitlines()[0][:200]})") from None
        with warnings.catch_warnings():  # lpips builds its random backbone with torchvision's old `pretrained`
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
        # lpips splits alexnet.features into slices that keep the layer indices as module names
        for part in model.net.children():
            for index, layer in part.named_children():
                layer.load_state_dict(alexnet.features[int(index)].state_dict())
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def __call__(self, a, b) -> float:
        x, y = _rgb_tensor(a, self.device), _rgb_tensor(b, self.device)
        if x.shape != y.shape:
            raise ValueError(f"image shapes differ: {tuple(x.shape[2:])} vs {tuple(y.shape[2:])}")
        if min(x.shape[2:]) < 32:  # AlexNet's two poolings before its last LPIPS layer leave nothing below that
            raise ValueError(f"LPIPS needs images of at least 32 px a side, got {tuple(x.shape[2:])}")
        return float(self.model(x, y).flatten()[0])


class CLIPScore:
    """CLIPScore = 100 * max(cos(E_image(image), E_text(text)), 0) with an open_clip model and a local checkpoint."""

    def __init__(self, weights, model_name: str = "ViT-B-32", device="cpu"):
        import open_clip
        if model_name not in open_clip.list_models():
            raise PerceptualError(f"--clip-model {model_name!r} is not an open_clip model name "
                                  f"(open_clip.list_models(), e.g. ViT-B-32, ViT-L-14)")
        path = _file(weights, "--clip-weights", f"an open_clip {model_name} checkpoint")
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path),
                                                                              device=device)
        except Exception as e:
            raise PerceptualError(f"--clip-weights {path}: cannot be loaded as open_clip {model_name} "
                                  f"({str(e).splitlines()[0][:200]})") from None
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, image, text: str) -> float:
        from PIL import Image
        pil = image if hasattr(image, "convert") else Image.fromarray(np.asarray(image, dtype=np.uint8))
        e_i = self.model.encode_image(self.preprocess(pil.convert("RGB"))[None].to(self.device))
        e_t = self.model.encode_text(self.tokenizer([text]).to(self.device))
        cos = torch.nn.functional.cosine_similarity(e_i.float(), e_t.float()).item()
        return 100.0 * max(cos, 0.0)
