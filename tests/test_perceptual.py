"""diffedit/perceptual.py: LPIPS equals its definition on a local AlexNet file; CLIP score loads local open_clip
weights; every missing piece is a PerceptualError that names it (nothing is downloaded)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from diffedit.perceptual import CLIPScore, LPIPS, PerceptualError

lpips = pytest.importorskip("lpips")
torchvision = pytest.importorskip("torchvision")


def images(seed, size=64):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def lpips_by_definition(net, a, b):
    """Zhang et al. 2018, Eq. 1: sum over AlexNet's five ReLU outputs of the spatial mean of
    w_l . (unit-normalised f0 - f1)^2, on inputs shifted and scaled as in LPIPS v0.1."""
    lins = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    xs = [(torch.from_numpy(im).permute(2, 0, 1)[None].double() / 127.5 - 1 - shift) / scale for im in (a, b)]
    feats = net.features.double()
    total, layer = 0.0, 0
    for i, m in enumerate(feats):
        xs = [m(x) for x in xs]
        if i in (1, 4, 7, 9, 11):
            f0, f1 = (x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for x in xs)
            w = lins[f"lin{layer}.model.1.weight"].double()
            total += ((f0 - f1) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean().item()
            layer += 1
    net.float()
    return total


def test_lpips_equals_its_definition_on_a_local_alexnet_and_is_zero_for_identical_images(alexnet_file):
    path, net = alexnet_file
    lp = LPIPS(path)
    a, b = images(1), images(2)
    want = lpips_by_definition(net, a, b)
    assert abs(lp(a, b) - want) / want < 1e-4
    assert lp(a, a) == 0.0


def test_lpips_missing_file_and_wrong_file_are_named(tmp_path):
    with pytest.raises(PerceptualError, match=r"--lpips-weights .*nope\.pth: no such file .*alexnet-owt"):
        LPIPS(tmp_path / "nope.pth")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(PerceptualError, match=r"other\.pth: not a torchvision AlexNet state dict"):
        LPIPS(other)


def test_lpips_refuses_images_of_different_or_too_small_sizes(alexnet_file):
    lp = LPIPS(alexnet_file[0])
    with pytest.raises(ValueError, match="image shapes differ"):
        lp(images(1, 64), images(1, 96))
    with pytest.raises(ValueError, match=r"at least 32 px a side, got \(16, 16\)"):
        lp(images(1, 16), images(2, 16))
    assert lp(images(1, 32), images(2, 32)) > 0


def test_clip_score_is_100_times_the_clamped_cosine_of_the_loaded_weights(tiny_clip):
    import open_clip
    from PIL import Image
    cs = CLIPScore(tiny_clip[0], model_name="diffedit-test-clip")
    model, _, pre = open_clip.create_model_and_transforms("diffedit-test-clip")
    model.load_state_dict(torch.load(tiny_clip[0], weights_only=True))
    img, text = images(3, 48), "a red circle on a gray background"
    with torch.no_grad():
        e_i = torch.nn.functional.normalize(model.eval().encode_image(pre(Image.fromarray(img))[None]), dim=-1)
        e_t = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize([text])), dim=-1)
    want = 100 * max((e_i * e_t).sum().item(), 0.0)
    assert cs(img, text) == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert 0.0 <= cs(img, text) <= 100.0
    assert cs(img, text) != CLIPScore(tiny_clip[1], model_name="diffedit-test-clip")(img, text)


def test_clip_score_unknown_model_missing_file_and_wrong_file_are_named(tmp_path, tiny_clip):
    with pytest.raises(PerceptualError, match=r"--clip-model 'ViT-Nope' is not an open_clip model name"):
        CLIPScore(tiny_clip[0], model_name="ViT-Nope")
    with pytest.raises(PerceptualError, match=r"--clip-weights .*missing\.bin: no such file"):
        CLIPScore(tmp_path / "missing.bin", model_name="diffedit-test-clip")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptualError, match=r"bad\.bin: cannot be loaded as open_clip diffedit-test-clip"):
        CLIPScore(bad, model_name="diffedit-test-clip")
