"""The paper's two evaluation axes (Sec. 4, Fig. 3), from weights the user already has: LPIPS distance to the
input (Zhang et al. 2018) and CLIP score with the query text (Hessel et al. 2021). Nothing is downloaded; a
missing package, file or model name is a ``PerceptualError`` that names it.

    lp = LPIPS("~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth")   # torchvision's AlexNet file
    cs = CLIPScore("open_clip_pytorch_model.bin", model_name="ViT-B-32")     # any open_clip checkpoint
    lp(edited, source), cs(edited, "a red circle on a gray background")

``SqueezeLPIPS`` is LPIPS v0.1's SqueezeNet variant written out here (PIE-Bench's background LPIPS), loaded with
``load_squeeze_lpips`` from torchvision's SqueezeNet 1.1 file or from a whole LPIPS state dict.

Images: PIL images or (H, W, 3) uint8 arrays.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 AlexNet, the LPIPS backbone
SQUEEZENET_FILE = "squeezenet1_1-b8a52dc0.pth"  # torchvision's SqueezeNet 1.1, the backbone of LPIPS 'squeeze'


class PerceptualError(ValueError):
    """A perceptual metric cannot be built: what is missing and where."""


def one_line(error: Exception, limit: int = 200) -> str:
    """An exception's message on one line (load_state_dict's first line only says that loading failed)."""
    return " ".join(str(error).split())[:limit]


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


class SqueezeLPIPS(nn.Module):
    """LPIPS v0.1 on SqueezeNet 1.1 (Zhang et al. 2018, Eq. 1): inputs in [-1, 1] shifted and scaled, seven feature
    maps of ``features`` (torchvision's layout) unit-normalised over channels, squared differences weighted by the
    1 x 1 heads ``lin``, averaged over space, summed over layers. Lower = closer; identical images give 0."""

    TAPS = (1, 4, 7, 9, 10, 11, 12)  # the features index after which each of the seven maps is read
    CHANNELS = (64, 128, 256, 384, 384, 512, 512)

    def __init__(self):
        super().__init__()
        import torchvision
        self.features = torchvision.models.squeezenet1_1().features[: self.TAPS[-1] + 1]
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pairs in [-1, 1] -> (B,) distances."""
        return sum(lin((a - b) ** 2).mean((1, 2, 3)) for lin, a, b in zip(self.lin, self.maps(x), self.maps(y)))


def _lpips_heads() -> dict:
    """LPIPS v0.1's trained SqueezeNet heads, shipped inside the lpips package (and torchmetrics, the same file)."""
    import importlib.util
    for package, rel in (("lpips", "weights/v0.1/squeeze.pth"),
                         ("torchmetrics", "functional/image/lpips_models/squeeze.pth")):
        spec = importlib.util.find_spec(package)
        if spec and spec.origin and (Path(spec.origin).parent / rel).is_file():
            heads = torch.load(Path(spec.origin).parent / rel, map_location="cpu", weights_only=True)
            return {f"lin.{k}.weight": heads[f"lin{k}.model.1.weight"] for k in range(len(SqueezeLPIPS.CHANNELS))}
    raise PerceptualError("--lpips-weights: a torchvision SqueezeNet file needs LPIPS's trained heads, shipped in the "
                          "lpips or torchmetrics package (pip install lpips), or give a whole LPIPS state dict")


def _squeeze_state(state: dict) -> dict:
    """Our names from the files users have: torchvision's SqueezeNet 1.1 (``features.*``, classifier dropped, heads
    from the package) or a whole LPIPS 'squeeze' state dict, the lpips package's (``net.slice{k}.{i}.*``,
    ``lin{k}.model.1.weight``) or torchmetrics' (the same under ``net.``)."""
    if any(k.startswith("net.net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    if any(k.startswith("features.") for k in state):
        return {**{k: v for k, v in state.items() if k.startswith("features.")}, **_lpips_heads()}
    ours = {}
    for k, v in state.items():
        part = k.split(".")
        if part[0] == "net" and part[1].startswith("slice"):  # net.slice{k}.{i}.rest: features index i
            ours[".".join(["features", *part[2:]])] = v
        elif part[0].startswith("lin") and part[1:] == ["model", "1", "weight"]:
            ours[f"lin.{part[0][3:]}.weight"] = v
        elif part[0] not in ("scaling_layer", "lins"):  # fixed constants (ours are buffers); lins aliases lin{k}
            ours[k] = v
    return ours


def load_squeeze_lpips(path, device="cpu") -> SqueezeLPIPS:
    """``SqueezeLPIPS`` from a local file (see ``_squeeze_state`` for the layouts read); strict: every weight."""
    path = _file(path, "--lpips-weights", f"torchvision's {SQUEEZENET_FILE} or an LPIPS 'squeeze' state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state dict")
        model = SqueezeLPIPS()
        model.load_state_dict(_squeeze_state(state))
    except PerceptualError:
        raise
    except Exception as e:  # pickles, other networks, truncated files: one line
        raise PerceptualError(f"--lpips-weights {path}: not a SqueezeNet 1.1 or LPIPS 'squeeze' state dict "
                              f"({one_line(e)})") from None
    return model.eval().requires_grad_(False).to(device)
