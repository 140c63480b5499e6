import math

import numpy as np
import pytest

from diffedit.metrics import downsample_mask, edit_metrics, iou, psnr, resize_mask, ssim


def _img(seed, shape=(32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


# ---------------------------------------------------------------- psnr
def test_psnr_of_uniform_error_5_is_20_log10_of_51():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 5, np.uint8)  # MSE = 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a, b) == pytest.approx(20 * math.log10(51))


def test_psnr_respects_data_range_for_float_images():
    a = np.zeros((4, 4, 3))
    b = np.full((4, 4, 3), 0.1)  # MSE = 0.01 on a [0, 1] scale -> 20 dB
    assert psnr(a, b, data_range=1.0) == pytest.approx(20.0)


def test_psnr_identical_images_is_inf():
    a = _img(0)
    assert psnr(a, a.copy()) == math.inf


def test_psnr_with_mask_uses_only_masked_pixels():
    a = np.zeros((4, 4, 3))
    b = a.copy()
    b[:2] = 10.0  # error only in the top half
    top = np.zeros((4, 4), bool)
    top[:2] = True
    assert psnr(a, b, mask=~top) == math.inf
    assert psnr(a, b, mask=top) == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 50))  # MSE over all = 50


def test_psnr_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4, 3\).*\(4, 5, 3\)"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))


def test_psnr_empty_mask_and_wrong_mask_shape_raise():
    a = np.zeros((4, 4, 3))
    with pytest.raises(ValueError, match="no pixel"):
        psnr(a, a, mask=np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        psnr(a, a, mask=np.ones((3, 4), bool))


# ---------------------------------------------------------------- iou
def test_iou_of_overlapping_bands_is_one_third():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0:2] = True  # 8 px
    b[1:3] = True  # 8 px, 4 shared -> union 12
    assert iou(a, b) == pytest.approx(1 / 3)


def test_iou_edge_cases():
    e = np.zeros((3, 3), bool)
    f = np.ones((3, 3), bool)
    assert iou(e, e) == 1.0  # two empty masks agree perfectly
    assert iou(e, f) == 0.0
    assert iou(f, f) == 1.0
    assert iou(f.astype(np.uint8), f) == 1.0  # 0/1 integer masks are accepted


def test_iou_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(3, 4\)"):
        iou(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_iou_rejects_non_binary_masks():
    with pytest.raises(ValueError, match="boolean"):
        iou(np.full((2, 2), 0.5), np.ones((2, 2), bool))


# ---------------------------------------------------------------- ssim
def test_ssim_identical_is_one():
    a = _img(1)
    assert ssim(a, a) == pytest.approx(1.0)


def test_ssim_of_two_constant_images_matches_closed_form():
    # var = cov = 0, so SSIM = (2xy + C1) / (x^2 + y^2 + C1) everywhere
    x, y, c1 = 100.0, 150.0, (0.01 * 255) ** 2
    a, b = np.full((16, 16, 3), x), np.full((16, 16, 3), y)
    assert ssim(a, b) == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1))


@pytest.mark.parametrize("shape", [(32, 32, 3), (40, 24, 3), (33, 33)])
def test_ssim_matches_skimage(shape):
    skm = pytest.importorskip("skimage.metrics")
    a = _img(2, shape)
    b = np.clip(a.astype(int) + np.random.default_rng(3).normal(0, 20, shape), 0, 255).astype(np.uint8)
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    if len(shape) == 3:
        kw["channel_axis"] = -1
    assert ssim(a, b) == pytest.approx(skm.structural_similarity(a, b, **kw), abs=1e-3)


def test_ssim_matches_skimage_on_toy_renders_and_masked_map():
    skm = pytest.importorskip("skimage.metrics")
    from diffedit.toy import world

    e = world.edits(1, seed=5)[0]
    a, b = e.source.render(), e.target.render()
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)
    ref, smap = skm.structural_similarity(a, b, full=True, **kw)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-3)
    m = e.mask()
    assert ssim(a, b, mask=m) == pytest.approx(smap.mean(-1)[m].mean(), abs=1e-3)
    assert ssim(a, b, mask=~m) > ssim(a, b, mask=m)  # the edit lowers similarity where it happened


def test_ssim_errors():
    with pytest.raises(ValueError, match="differ"):
        ssim(np.zeros((16, 16, 3)), np.zeros((16, 16)))
    with pytest.raises(ValueError, match="no pixel"):
        ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 3)), mask=np.zeros((16, 16), bool))


# ---------------------------------------------------------------- mask resizing
def test_resize_mask_nearest_blocks():
    m = np.array([[1, 0], [0, 1]], bool)
    big = resize_mask(m, 4)
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool)
    assert big.dtype == bool and np.array_equal(big, expected)
    assert resize_mask(m, (2, 6)).tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_downsample_mask_majority_and_any():
    m = np.zeros((4, 4), bool)
    m[0, 0] = True  # 1 of 4 in the top-left block
    m[0:2, 2] = True  # 2 of 4 in the top-right block (a tie)
    m[2:4, 0:2] = True  # 4 of 4 in the bottom-left block
    assert downsample_mask(m, 2).tolist() == [[False, True], [True, False]]
    assert downsample_mask(m, 2, rule="any").tolist() == [[True, True], [True, False]]


def test_downsample_then_resize_roundtrips_block_masks():
    small = np.random.default_rng(4).random((8, 8)) > 0.5
    assert np.array_equal(downsample_mask(resize_mask(small, 64), 8), small)


def test_downsample_mask_rejects_indivisible_shape_and_unknown_rule():
    with pytest.raises(ValueError, match="multiples of 3"):
        downsample_mask(np.zeros((4, 4), bool), 3)
    with pytest.raises(ValueError, match="rule"):
        downsample_mask(np.zeros((4, 4), bool), 2, rule="all")


def test_metrics_accept_torch_tensors():
    torch = pytest.importorskip("torch")
    a = torch.zeros(8, 8, 3)
    b = torch.full((8, 8, 3), 5.0, requires_grad=True)
    assert psnr(a, b) == pytest.approx(20 * math.log10(51))
    assert iou(torch.ones(3, 3, dtype=torch.bool), np.ones((3, 3), bool)) == 1.0


# ---------------------------------------------------------------- edit_metrics: the two ground truths
def test_iou_footprint_is_the_upsampled_mask_against_the_footprint_by_hand():
    img = np.zeros((16, 16, 3), np.uint8)  # ssim needs >= 11 px
    pred = np.array([[0, 1], [0, 0]], bool)  # upsampled: rows 0-7, columns 8-15 (64 px)
    changed = np.zeros((16, 16), bool)
    changed[:6, 8:] = True  # 48 px, all inside the upsampled mask: IoU 48 / 64
    footprint = np.zeros((16, 16), bool)
    footprint[:12, 8:] = True  # 96 px holding the 64: IoU 64 / 96
    m = edit_metrics(img, img, gt_mask=changed, pred_mask=pred, footprint=footprint)
    assert m["iou"] == pytest.approx(3 / 4) and m["iou_footprint"] == pytest.approx(2 / 3)
    assert "iou_footprint" not in edit_metrics(img, img, gt_mask=changed, pred_mask=pred)


def test_a_mask_covering_a_shape_edits_footprint_scores_at_least_its_iou_with_the_changed_pixels():
    from diffedit.toy import world
    for e in world.edits(12, 5, kinds=("shape",)):
        src, footprint = e.source.render(), e.footprint()
        assert e.mask().sum() < footprint.sum()  # the changed pixels are a band inside the footprint
        exact = edit_metrics(src, src, gt_mask=e.mask(), pred_mask=footprint, footprint=footprint)
        assert exact["iou_footprint"] == 1.0 and exact["iou"] < 1.0
        cells = downsample_mask(footprint, 4, rule="any")  # a latent-resolution mask covering the footprint
        m = edit_metrics(src, src, gt_mask=e.mask(), pred_mask=cells, footprint=footprint)
        assert m["iou_footprint"] >= m["iou"]
