"""diffedit/piebench/metrics.py: each PIE-Bench metric equals the reference library computing it (torchmetrics, the
lpips package, torchmetrics' CLIPScore, a hooked DINO forward) on random images and random-weight networks given to
both; the wrong variants (mask not applied, LPIPS on [0, 1], keys of another block) are told apart; absent weights
are None with a line naming the flag and variable, a bad file is one UsageError line."""
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import randomize_
from diffedit.perceptual import CLIPScore, load_squeeze_lpips
from diffedit.piebench import metrics as M
from diffedit.settings import UsageError

torchmetrics = pytest.importorskip("torchmetrics")
lpips = pytest.importorskip("lpips")
torchvision = pytest.importorskip("torchvision")

TINY_DINO = M.DinoConfig(width=64, heads=2, depth=12)  # ViT-B/8's architecture, narrow: 12 blocks, patch 8, 224 px
CLIP_NAME = "diffedit-test-clip-l14"  # a narrow ViT-L/14-shaped open_clip model: 224 px, patch 14, QuickGELU
SOURCE, TARGET = "a cat sitting on a wooden bench", "a dog sitting on a wooden bench"


def tm_value(metric, *args) -> float:
    return float(metric(*args))


@pytest.fixture(scope="module")
def edit():
    """A smooth 512 px source, an edit that changes the masked region a lot and the rest a little, and a decoded
    annotation (a rectangle, border rows and columns set to 1)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, 16, 16, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(512, 512), mode="bicubic", align_corners=False)[0]
    src = (smooth.permute(1, 2, 0).clamp(0, 1) * 255).round().numpy().astype(np.uint8)
    mask = np.zeros((512, 512), np.uint8)
    mask[150:350, 100:330] = 1
    mask[[0, -1], :] = mask[:, [0, -1]] = 1
    noise = torch.randn(512, 512, 3, generator=g).numpy() * 3
    new = torch.randint(0, 256, (512, 512, 3), generator=g).numpy()
    edited = np.where(mask[..., None] == 1, new, src + noise).clip(0, 255).round().astype(np.uint8)
    return src, edited, mask


def masked_unit(image, mask):
    """The official preparation: float32 in [0, 1] times 1 - mask, channels first."""
    a = image.astype(np.float32) / 255 * (1 - mask.astype(np.float32))[..., None]
    return torch.from_numpy(a).permute(2, 0, 1)


def test_psnr_mse_ssim_equal_torchmetrics_on_both_images_times_one_minus_mask(edit):
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.regression import MeanSquaredError
    src, edited, mask = edit
    ours = M.image_metrics(M.MetricNetworks(), src, edited, mask, SOURCE, TARGET)

    def oracle(m):
        a, b = masked_unit(src, m), masked_unit(edited, m)
        return {"psnr_unedit_part": tm_value(PeakSignalNoiseRatio(data_range=1.0), a[None], b[None]),
                "mse_unedit_part": tm_value(MeanSquaredError(), a.contiguous(), b.contiguous()),
                "ssim_unedit_part": tm_value(StructuralSimilarityIndexMeasure(data_range=1.0), a[None], b[None])}
    want, unmasked = oracle(mask), oracle(np.zeros_like(mask))
    # torchmetrics >= 1.5 averages SSIM over the reflection-padded border too; the published numbers (older
    # torchmetrics) over the window's valid positions: its full map without the 5 px band
    a, b = masked_unit(src, mask)[None], masked_unit(edited, mask)[None]
    full = StructuralSimilarityIndexMeasure(data_range=1.0, return_full_image=True)(a, b)[1]
    reflect = want["ssim_unedit_part"]
    want["ssim_unedit_part"] = full[..., 5:-5, 5:-5].mean().item()
    ours_reflect = M.ssim(a[0].permute(1, 2, 0).numpy(), b[0].permute(1, 2, 0).numpy(), border="reflect")
    print(f"[piebench] ssim over the padded border: ours {ours_reflect:.6f} torchmetrics {reflect:.6f} rel err "
          f"{abs(ours_reflect - reflect) / reflect:.2e} (tolerance 1e-4)")
    assert ours_reflect == pytest.approx(reflect, rel=1e-4)
    for k in want:  # torchmetrics runs in float32, ours in float64
        print(f"[piebench] {k}: ours {ours[k]:.6f} torchmetrics {want[k]:.6f} rel err "
              f"{abs(ours[k] - want[k]) / abs(want[k]):.2e} (tolerance 1e-4)")
        assert ours[k] == pytest.approx(want[k], rel=1e-4)
        assert abs(unmasked[k] - want[k]) > 0.05 * abs(want[k]), f"{k}: the mask must change the value"


def test_background_metrics_are_nan_when_the_mask_covers_everything(edit):
    src, edited, _ = edit
    out = M.image_metrics(M.MetricNetworks(), src, edited, np.ones((512, 512), np.uint8), SOURCE, TARGET)
    assert all(np.isnan(out[k]) for k in M.BACKGROUND)
    assert out["lpips_unedit_part"] is None and out["structure_distance"] is None


def test_image_metrics_without_networks_gives_every_key_and_none_for_network_metrics(edit):
    src, edited, mask = edit
    from PIL import Image
    out = M.image_metrics(M.MetricNetworks(), Image.fromarray(src), Image.fromarray(edited), mask, SOURCE, TARGET)
    assert tuple(out) == M.METRICS
    assert {k for k, v in out.items() if v is None} == set(M.METRICS) - set(M.BACKGROUND)
    with pytest.raises(ValueError, match="mask must be"):
        M.image_metrics(M.MetricNetworks(), src, edited, mask * 255, SOURCE, TARGET)
    with pytest.raises(ValueError, match="image shapes differ"):
        M.image_metrics(M.MetricNetworks(), src, edited[:256], mask, SOURCE, TARGET)


# ---- LPIPS (SqueezeNet) ---------------------------------------------------------------------------------------

def lpips_reference(**kw):
    with warnings.catch_warnings():  # lpips builds its random backbone with torchvision's old `pretrained`
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="squeeze", version="0.1", pnet_rand=True, verbose=False, **kw).eval()


@pytest.fixture(scope="module")
def lpips_pair(tmp_path_factory):
    """The lpips package's SqueezeNet LPIPS with random backbone and random positive heads, saved whole."""
    torch.manual_seed(1)
    ref = lpips_reference(pretrained=False)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 4 and p.shape[2:] == (1, 1) and p.shape[0] == 1:  # the heads: non-negative, as trained ones
                p.copy_(p.abs())
    path = tmp_path_factory.mktemp("lpips") / "lpips_squeeze.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_lpips_unedit_part_equals_the_lpips_package_squeeze_on_masked_images_in_minus_one_one(edit, lpips_pair):
    ref, path = lpips_pair
    src, edited, mask = edit
    ours = M.image_metrics(M.MetricNetworks(lpips=load_squeeze_lpips(path)), src, edited, mask, SOURCE, TARGET)
    a, b = masked_unit(src, mask)[None], masked_unit(edited, mask)[None]
    with torch.no_grad():
        want = ref(a * 2 - 1, b * 2 - 1).item()
        on_unit = ref(a, b).item()  # the wrong scale
        unmasked = ref(masked_unit(src, 0 * mask)[None] * 2 - 1, masked_unit(edited, 0 * mask)[None] * 2 - 1).item()
    err = abs(ours["lpips_unedit_part"] - want) / want
    print(f"[piebench] lpips_unedit_part: ours {ours['lpips_unedit_part']:.6f} lpips {want:.6f} rel err {err:.2e} "
          f"(tolerance 1e-5); on [0, 1] {on_unit:.6f}, unmasked {unmasked:.6f}")
    assert err < 1e-5
    assert abs(on_unit - want) > 0.05 * want and abs(unmasked - want) > 0.05 * want


def test_lpips_from_torchvision_squeezenet_file_uses_the_shipped_heads(tmp_path, edit):
    torch.manual_seed(2)
    net = torchvision.models.squeezenet1_1()
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(net.state_dict(), path)
    ref = lpips_reference(pretrained=True)  # heads from the package's own file
    for part in ref.net.children():
        for index, layer in part.named_children():
            layer.load_state_dict(net.features[int(index)].state_dict())
    src, edited, _ = edit
    x, y = (torch.from_numpy(i[:128, :128].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            for i in (src, edited))
    with torch.no_grad():
        want, ours = ref(x, y).item(), load_squeeze_lpips(path)(x, y).item()
    print(f"[piebench] lpips from torchvision file: rel err {abs(ours - want) / want:.2e} (tolerance 1e-5)")
    assert abs(ours - want) / want < 1e-5


# ---- structure distance (DINO) --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    net = randomize_(M.DinoViT(TINY_DINO), seed=3)
    path = tmp_path_factory.mktemp("dino") / "dino_tiny.pth"
    torch.save(net.state_dict(), path)
    return path


def test_dino_vit_has_timm_dino_names_and_outputs_and_the_real_presets_exist():
    """timm's VisionTransformer is the architecture of vit_base_patch8_224.dino (the official checkpoint's names):
    a narrow one of the same kind loads into ours strictly and gives the same tokens."""
    import open_clip
    timm = pytest.importorskip("timm")
    ref = timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=8, embed_dim=64, depth=12,
                                                           num_heads=2, qkv_bias=True, num_classes=0)
    randomize_(ref, seed=6).eval()
    ours = M.DinoViT(TINY_DINO).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        err = ((ours(x) - ref.forward_features(x)).norm() / ref.forward_features(x).norm()).item()
    print(f"[piebench] DinoViT vs timm VisionTransformer tokens: rel err {err:.2e} (tolerance 1e-5)")
    assert err < 1e-5
    cfg = open_clip.get_model_config(M.CLIP_MODEL)
    assert cfg["quick_gelu"] and cfg["vision_cfg"]["patch_size"] == 14 and cfg["vision_cfg"]["layers"] == 24
    assert (M.DINO_VITB8.patch_size, M.DINO_VITB8.width, M.DINO_VITB8.depth, M.DINO_VITB8.heads) == (8, 768, 12, 12)


def structure_by_hooks(dino, a, b, layer):
    """The official computation written out: torchvision Resize(224, max_size=480) without antialiasing and
    Normalize on [0, 255] values, a full forward with a hook on block ``layer``'s qkv, keys split per head and
    concatenated, cosine self-similarity with the norm product clamped at 1e-8, MSE."""
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize(224, max_size=480, antialias=False),
                             transforms.Normalize(M.IMAGENET_MEAN, M.IMAGENET_STD)])
    heads, sims = dino.cfg.heads, []
    for img in (a, b):
        grabbed = []
        hook = dino.blocks[layer].attn.qkv.register_forward_hook(lambda mod, inp, out: grabbed.append(out))
        with torch.no_grad():
            dino(tf(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1))[None])
        hook.remove()
        qkv = grabbed[0][0]
        t = qkv.shape[0]
        k = qkv.reshape(t, 3, heads, -1).permute(1, 2, 0, 3)[1]  # (heads, tokens, head dim)
        k = k.transpose(0, 1).reshape(t, -1)
        n = k.norm(dim=1, keepdim=True)
        sims.append(k @ k.T / (n @ n.T).clamp(min=1e-8))
    return torch.nn.functional.mse_loss(sims[1], sims[0]).item()


def test_structure_distance_equals_hooked_block_11_keys_of_the_same_vit(edit, dino_file):
    src, edited, mask = edit
    dino = M.load_dino(dino_file, TINY_DINO)
    ours = M.image_metrics(M.MetricNetworks(dino=dino), src, edited, mask, SOURCE, TARGET)["structure_distance"]
    want = structure_by_hooks(dino, src, edited, layer=11)
    other_layer = structure_by_hooks(dino, src, edited, layer=10)
    err = abs(ours - want) / want
    print(f"[piebench] structure_distance: ours {ours:.6e} hooked {want:.6e} rel err {err:.2e} (tolerance 1e-4); "
          f"block 10 {other_layer:.6e}")
    assert err < 1e-4
    assert abs(other_layer - want) > 0.05 * want
    assert M.structure_distance(dino, src, src) == 0.0


# ---- CLIP score ------------------------------------------------------------------------------------------------

def hf_to_open_clip(state: dict, vision_layers: int, text_layers: int) -> dict:
    """transformers' CLIPModel names -> open_clip's (OpenAI's layout): fused q/k/v, transposed projections."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return state[key]
    for tower, prefix, n in (("visual.transformer", "vision_model.encoder", vision_layers),
                             ("transformer", "text_model.encoder", text_layers)):
        for i in range(n):
            src, dst = f"{prefix}.layers.{i}", f"{tower}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat([take(f"{src}.self_attn.{p}_proj.{kind}") for p in "qkv"])
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{dst}.{a}.{kind}"] = take(f"{src}.{b}.{kind}")
    for kind in ("weight", "bias"):
        for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
            out[f"{a}.{kind}"] = take(f"{b}.{kind}")
    out["visual.class_embedding"] = take("vision_model.embeddings.class_embedding")
    out["visual.conv1.weight"] = take("vision_model.embeddings.patch_embedding.weight")
    out["visual.positional_embedding"] = take("vision_model.embeddings.position_embedding.weight")
    out["visual.proj"] = take("visual_projection.weight").T.contiguous()
    out["token_embedding.weight"] = take("text_model.embeddings.token_embedding.weight")
    out["positional_embedding"] = take("text_model.embeddings.position_embedding.weight")
    out["text_projection"] = take("text_projection.weight").T.contiguous()
    out["logit_scale"] = take("logit_scale")
    assert used == set(state), f"unmapped: {sorted(set(state) - used)}"
    return out


def tensor_features_clip():
    """transformers' CLIPModel whose get_*_features return the projected tensors: transformers 5 returns model
    outputs (the projection in pooler_output) where torchmetrics' CLIPScore expects the tensors of 4.x."""
    from transformers import CLIPModel

    class TensorFeatures(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)
    return TensorFeatures


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory, hf_clip_tokenizer):
    """A random transformers CLIPModel (torchmetrics' side) and the same weights as an open_clip file (ours)."""
    import open_clip
    from transformers import CLIPConfig
    folder = tmp_path_factory.mktemp("clip_l14")
    (folder / f"{CLIP_NAME}.json").write_text(json.dumps({
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 14, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(folder)
    act = "quick_gelu"
    hf = tensor_features_clip()(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                         max_position_embeddings=77, vocab_size=49408, hidden_act=act),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                           image_size=224, patch_size=14, hidden_act=act), projection_dim=32))
    randomize_(hf, seed=4)
    with torch.no_grad():  # a shared direction in both embeddings keeps random cosines positive (not clamped to 0)
        u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0) * 8
        hf.vision_model.post_layernorm.bias.copy_(torch.linalg.pinv(hf.visual_projection.weight) @ u)
        hf.text_model.final_layer_norm.bias.copy_(torch.linalg.pinv(hf.text_projection.weight) @ u)
    hf.eval().requires_grad_(False)
    path = folder / "open_clip_tiny.bin"
    torch.save(hf_to_open_clip(hf.state_dict(), 2, 2), path)
    return hf, path, hf_clip_tokenizer


def test_clip_similarities_equal_torchmetrics_clipscore_on_the_same_weights(edit, clip_pair):
    from torchmetrics.multimodal import CLIPScore as TMCLIPScore
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    hf, path, tokenizer = clip_pair
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    oracle = TMCLIPScore(model_name_or_path=lambda: (hf, processor))

    def tm(img, text):
        return float(oracle(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), text))
    src, edited, mask = edit
    ours = M.image_metrics(M.MetricNetworks(clip=CLIPScore(path, model_name=CLIP_NAME)), src, edited, mask,
                           SOURCE, TARGET)
    inside = np.uint8(edited * mask[..., None].astype(np.float64))  # the official np.uint8(img * mask)
    want = {"clip_similarity_source_image": tm(src, SOURCE), "clip_similarity_target_image": tm(edited, TARGET),
            "clip_similarity_target_image_edit_part": tm(inside, TARGET)}
    for k, v in want.items():
        print(f"[piebench] {k}: ours {ours[k]:.5f} torchmetrics {v:.5f} abs err {abs(ours[k] - v):.2e} "
              f"(tolerance 1e-3 on the 0-100 scale)")
        assert 0 < v < 100 and abs(ours[k] - v) < 1e-3
    unmasked_part = want["clip_similarity_target_image"]  # the edit part without the mask is the whole image
    assert abs(unmasked_part - want["clip_similarity_target_image_edit_part"]) > 0.1


# ---- load_networks ---------------------------------------------------------------------------------------------

ENV = ("DIFFEDIT_DINO_WEIGHTS", "DIFFEDIT_CLIP_WEIGHTS", "DIFFEDIT_LPIPS_WEIGHTS")


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_absent_weights_give_none_and_one_missing_line_naming_the_flag_and_variable(clean_env):
    nets = M.load_networks()
    assert nets.dino is None and nets.clip is None and nets.lpips is None
    assert len(nets.missing) == 3
    for line, flag, var, metric in zip(nets.missing, ("--dino-weights", "--clip-weights", "--lpips-weights"), ENV,
                                       ("structure_distance", "clip_similarity_target_image", "lpips_unedit_part")):
        assert "\n" not in line and flag in line and var in line and metric in line


def test_weights_come_from_the_environment_and_an_argument_overrides_it(clean_env, dino_file, clip_pair, lpips_pair):
    clean_env.setattr(M, "DINO_CONFIG", TINY_DINO)
    clean_env.setattr(M, "CLIP_MODEL", CLIP_NAME)
    clean_env.setenv("DIFFEDIT_DINO_WEIGHTS", "/nonexistent/dino.pth")
    clean_env.setenv("DIFFEDIT_CLIP_WEIGHTS", str(clip_pair[1]))
    clean_env.setenv("DIFFEDIT_LPIPS_WEIGHTS", str(lpips_pair[1]))
    nets = M.load_networks(dino=str(dino_file))
    assert isinstance(nets.dino, M.DinoViT) and nets.clip is not None and nets.lpips is not None
    assert nets.missing == []
    with pytest.raises(UsageError, match=r"^DIFFEDIT_DINO_WEIGHTS /nonexistent/dino\.pth: no such file"):
        M.load_networks()


@pytest.mark.parametrize("name,flag", [("dino", "--dino-weights"), ("clip", "--clip-weights"),
                                       ("lpips", "--lpips-weights")])
def test_a_corrupt_or_wrong_file_is_a_one_line_usage_error_naming_it(clean_env, tmp_path, name, flag):
    clean_env.setattr(M, "DINO_CONFIG", TINY_DINO)
    clean_env.setattr(M, "CLIP_MODEL", CLIP_NAME)
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a checkpoint")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    for path in (bad, wrong):
        with pytest.raises(UsageError) as info:
            M.load_networks(**{name: str(path)})
        message = str(info.value)
        assert "\n" not in message and flag in message and path.name in message, message


def test_a_dino_file_of_another_architecture_is_refused(clean_env, tmp_path):
    path = tmp_path / "dino_small.pth"
    torch.save(M.DinoViT(M.DinoConfig(width=64, heads=2, depth=11)).state_dict(), path)
    with pytest.raises(UsageError, match=r"--dino-weights .*dino_small\.pth: not a DINO ViT state dict"):
        M.load_dino(path, TINY_DINO)
