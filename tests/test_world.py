import dataclasses
import hashlib
import itertools
import re
import time

import numpy as np
import pytest

from diffedit.toy import judge, world
from diffedit.toy.world import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, Obj

N_JUDGE = 300  # edits per acceptance-rate measurement


def test_same_seed_gives_identical_scenes_and_renders_and_other_seed_differs():
    a, b = world.scenes(50, seed=11), world.scenes(50, seed=11)
    assert a == b
    assert np.array_equal(world.render_batch(a), world.render_batch(b))
    ea, eb = world.edits(30, seed=11), world.edits(30, seed=11)
    assert ea == eb
    assert all(np.array_equal(x.target.render(), y.target.render()) for x, y in zip(ea, eb))
    assert world.scenes(50, seed=12) != a
    assert world.TRAIN_SEED != world.EVAL_SEED


def test_palettes_are_disjoint_and_every_pair_is_at_least_90_apart_in_rgb():
    assert not set(OBJECT_COLOURS) & set(BACKGROUND_COLOURS)
    colours = [*OBJECT_COLOURS.values(), *BACKGROUND_COLOURS.values()]
    assert min(np.linalg.norm(np.subtract(p, q)) for p, q in itertools.combinations(colours, 2)) >= 90


def test_render_batch_equals_individual_renders():
    sc = world.scenes(20, seed=3)
    batch = world.render_batch(sc)
    assert batch.shape == (20, 64, 64, 3) and batch.dtype == np.uint8
    assert all(np.array_equal(batch[k], s.render()) for k, s in enumerate(sc))


def test_every_shape_fits_in_its_bounding_circle_and_the_triangle_points_up():
    for shape, r in itertools.product(SHAPES, (8, 13, 18)):
        m = Obj(shape, "red", 32, 32, r).mask()
        circle = Obj("circle", "red", 32, 32, r).mask()
        assert m.any() and not (m & ~circle).any()
    tri = Obj("triangle", "red", 32, 32, 16).mask()
    rows = tri.sum(1)
    assert rows[np.nonzero(rows)[0][0]] < rows[np.nonzero(rows)[0][-1]]  # narrow top, wide base


def test_objects_inside_image_not_overlapping_with_distinct_colours_and_hard_edges():
    for max_objects in (1, 2, 3):
        for s in world.scenes(300, seed=4 + max_objects, max_objects=max_objects):
            assert 1 <= len(s.objects) <= max_objects
            assert len({o.colour for o in s.objects}) == len(s.objects)  # never a shared colour
            for o in s.objects:
                assert 8 <= o.r <= 18 and o.r <= o.cx <= 63 - o.r and o.r <= o.cy <= 63 - o.r
            for p, q in itertools.combinations(s.objects, 2):
                assert np.hypot(p.cx - q.cx, p.cy - q.cy) >= p.r + q.r + 2
            img = s.render()
            for o in s.objects:  # the object's colour appears exactly on its mask: no anti-aliasing
                assert np.array_equal(np.all(img == OBJECT_COLOURS[o.colour], -1), o.mask())


def test_objects_scale_with_image_size():
    for s in world.scenes(50, seed=6, size=128, max_objects=3):
        assert s.render().shape == (128, 128, 3)
        for o in s.objects:
            assert 16 <= o.r <= 36 and o.r <= o.cx <= 127 - o.r and o.r <= o.cy <= 127 - o.r


def test_max_objects_outside_1_to_3_is_refused():
    with pytest.raises(ValueError):
        world.sample_scene(np.random.default_rng(0), max_objects=4)


def test_captions_follow_the_grammar_and_list_objects_left_to_right():
    colour, shape, bg = "|".join(OBJECT_COLOURS), "|".join(SHAPES), "|".join(BACKGROUND_COLOURS)
    obj = rf"a ({colour}) ({shape})"
    grammar = re.compile(rf"^{obj}(?: and {obj}){{0,2}} on a ({bg}) background$")
    assert world.Scene("gray", (Obj("circle", "red", 20, 20, 8),), 0).caption == "a red circle on a gray background"
    two = world.Scene("navy", (Obj("square", "blue", 50, 20, 8), Obj("circle", "red", 10, 40, 8)), 0)
    assert two.caption == "a red circle and a blue square on a navy background"
    three = dataclasses.replace(two, objects=two.objects + (Obj("triangle", "white", 30, 50, 8),))
    assert three.caption == "a red circle and a white triangle and a blue square on a navy background"
    for s in world.scenes(300, seed=7, max_objects=3):
        assert grammar.match(s.caption), s.caption
        assert set(s.caption.split()) <= set(world.VOCAB)
        left_to_right = sorted(s.objects, key=lambda o: (o.cx, o.cy))
        words = s.caption.replace(",", "").split()
        assert [words[i + 1 : i + 3] for i, w in enumerate(words) if w == "a"][: len(s.objects)] == [
            [o.colour, o.shape] for o in left_to_right
        ]


def _independent_edit_mask(e):
    """The pixels an edit must change, from geometry alone (no rendering)."""
    if e.kind == "remove":
        return e.source.objects[e.edited_object_index].mask()
    if e.kind == "background":
        covered = np.zeros((e.source.size,) * 2, bool)
        for o in e.source.objects:
            covered |= o.mask()
        return ~covered
    i = e.edited_object_index
    src, tgt = e.source.objects[i].mask(), e.target.objects[i].mask()
    return src | tgt if e.kind == "colour" else src ^ tgt


def test_gt_mask_is_exactly_the_changed_pixels():
    for e in world.edits(300, seed=8, max_objects=3):
        m = e.mask()
        assert m.dtype == bool and m.shape == (64, 64)
        diff = (e.source.render().astype(int) - e.target.render().astype(int)) != 0
        assert np.array_equal(m, diff.any(-1))
        assert np.array_equal(m, _independent_edit_mask(e))


def test_every_edit_changes_pixels_and_exactly_one_attribute_and_the_caption():
    kinds = set()
    for e in world.edits(500, seed=9, max_objects=3):
        kinds.add(e.kind)
        assert e.mask().any()
        assert e.target_caption != e.source_caption
        assert e.source.texture_seed == e.target.texture_seed and e.source.size == e.target.size
        i = e.edited_object_index
        if e.kind == "background":
            assert i is None and e.source.objects == e.target.objects
            assert e.source.background != e.target.background
            continue
        if e.kind == "remove":  # one object gone, the others untouched, in their order
            assert len(e.source.objects) >= 2 and e.source.background == e.target.background
            assert e.target.objects == e.source.objects[:i] + e.source.objects[i + 1:]
            continue
        assert e.source.background == e.target.background
        assert [k for k, (a, b) in enumerate(zip(e.source.objects, e.target.objects)) if a != b] == [i]
        a, b = e.source.objects[i], e.target.objects[i]
        changed = {f.name for f in dataclasses.fields(Obj) if getattr(a, f.name) != getattr(b, f.name)}
        assert changed == {"colour" if e.kind == "colour" else "shape"}
        assert len({o.colour for o in e.target.objects}) == len(e.target.objects)
    assert kinds == set(world.EDIT_KINDS)


def test_sample_edit_respects_kinds_and_a_given_scene():
    rng = np.random.default_rng(10)
    scene = world.sample_scene(rng, min_objects=2)
    for kind in world.EDIT_KINDS:
        e = world.sample_edit(rng, scene, kinds=(kind,))
        assert e.kind == kind and e.source == scene


def test_a_one_object_scene_is_never_given_a_removal():
    rng = np.random.default_rng(10)
    one = world.sample_scene(rng, max_objects=1)
    assert {world.sample_edit(rng, one, kinds=world.EDIT_KINDS).kind for _ in range(60)} == set(world.TRAIN_KINDS)
    with pytest.raises(ValueError, match=r"a scene of 1 object\(s\) allows no edit of kinds \('remove',\)"):
        world.sample_edit(rng, one, kinds=("remove",))
    with pytest.raises(ValueError, match="need max_objects >= 2"):
        world.edits(4, 10, max_objects=1)


def test_edits_deal_every_kind_once_per_block_and_a_longer_list_keeps_every_index():
    eds = world.edits(40, 30)
    for b in range(0, 40, len(world.EDIT_KINDS)):
        assert sorted(e.kind for e in eds[b:b + len(world.EDIT_KINDS)]) == sorted(world.EDIT_KINDS)
    assert len({tuple(e.kind for e in eds[b:b + 4]) for b in range(0, 40, 4)}) > 1  # the order is drawn, not fixed
    assert world.edits(17, 30) == eds[:17]
    assert [e.kind for e in world.edits(6, 30, kinds=("shape", "remove"))].count("remove") == 3


def test_a_removal_takes_one_object_and_its_phrase_out_of_the_caption():
    for e in world.edits(80, 31, kinds=("remove",), max_objects=3):
        gone = e.source.objects[e.edited_object_index]
        assert gone not in e.target.objects and len(e.target.objects) == len(e.source.objects) - 1
        caption = e.source_caption.replace(gone.phrase + " and ", "").replace(" and " + gone.phrase, "")
        assert e.target_caption == caption
        assert e.description == f"remove the {gone.colour} {gone.shape}"
        assert np.array_equal(e.mask(), gone.mask()) and np.array_equal(e.footprint(), e.mask())
        img = e.target.render()
        assert np.all(np.abs(img[gone.mask()].astype(int) - BACKGROUND_COLOURS[e.source.background]) <= 9)


def test_render_batch_of_2000_scenes_takes_under_5_seconds():
    sc = world.scenes(2000, seed=world.TRAIN_SEED)
    t = time.perf_counter()
    world.render_batch(sc)
    assert time.perf_counter() - t < 5.0


# ---------------------------------------------------------------- world specs
def _digest(edits=(), scenes=(), renders=None) -> str:
    """sha256 of edits' renders, kinds, descriptions and scenes, and of scenes' renders and captions."""
    h = hashlib.sha256()
    for e in edits:
        h.update(e.source.render().tobytes())
        h.update(e.target.render().tobytes())
        h.update(repr((e.kind, e.description, e.source, e.target)).encode())
    for s in scenes:
        h.update(s.render().tobytes())
        h.update(s.caption.encode())
    if renders is not None:
        h.update(renders.tobytes())
    return h.hexdigest()


def test_v1_is_the_default_and_the_training_sampler_draws_bit_identically_to_the_world_the_model_was_trained_on():
    # digests computed with the world.py the shipped model was trained on, whose edits(20, 2024) was these 20
    # sample_edit draws (scripts/train_toy.py's sampler); edits() now deals the kinds, removals too, in equal shares
    rng = np.random.default_rng(2024)
    assert _digest(edits=[world.sample_edit(rng) for _ in range(20)]) == (
        "1310ae03a693b893c09e7ff3459c0831b8b8b1839de443561160b55bf4dd2026")
    assert _digest(edits=world.edits(20, 2024, spec=world.WORLDS["v1"])) == _digest(edits=world.edits(20, 2024))
    assert _digest(scenes=world.scenes(30, 7, max_objects=3)) == (
        "4a5793340ff65aa45a238dea42708705686acb669f1037746c1861210e3084ae")
    assert _digest(renders=world.render_batch(world.scenes(30, 5, size=128))) == (
        "dcc10861aba304da01ca82f64fa160b23fc79fb530a90f5696549bc6feae2376")


def test_v2_scenes_hold_one_or_two_large_objects_inside_apart_in_distinct_colours_with_exact_masks():
    lo, hi = world.V2.radius
    counts, radii = set(), set()
    for s in world.scenes(400, seed=21, spec=world.V2):
        counts.add(len(s.objects))
        assert len({o.colour for o in s.objects}) == len(s.objects)
        for o in s.objects:
            radii.add(o.r)
            assert lo <= o.r <= hi and o.r <= o.cx <= 63 - o.r and o.r <= o.cy <= 63 - o.r
        for p, q in itertools.combinations(s.objects, 2):
            assert (p.cx - q.cx) ** 2 + (p.cy - q.cy) ** 2 >= (p.r + q.r + world.V2.margin) ** 2
        img = s.render()
        for o in s.objects:
            assert np.array_equal(np.all(img == OBJECT_COLOURS[o.colour], -1), o.mask())
    assert counts == {1, 2} and radii == set(range(lo, hi + 1))  # the whole radius range is drawn


def test_v2_edits_have_exact_masks_and_footprints_that_contain_them():
    kinds = set()
    for e in world.edits(150, seed=22, spec=world.V2):
        kinds.add(e.kind)
        m, fp = e.mask(), e.footprint()
        assert fp.dtype == bool and fp.shape == (64, 64)
        assert np.array_equal(m, _independent_edit_mask(e))
        if e.kind in ("background", "remove"):
            assert np.array_equal(fp, m)
            continue
        i = e.edited_object_index
        assert np.array_equal(fp, e.source.objects[i].mask() | e.target.objects[i].mask())
        assert not (m & ~fp).any()
        assert np.array_equal(fp, m) == (e.kind == "colour")  # a shape edit leaves the overlap unchanged
    assert kinds == set(world.EDIT_KINDS)


def test_v1_footprint_is_the_edited_object_in_source_or_target():
    for e in world.edits(60, seed=23):
        i = e.edited_object_index
        if e.kind == "remove":
            want = e.source.objects[i].mask()
        else:
            want = e.mask() if i is None else e.source.objects[i].mask() | e.target.objects[i].mask()
        assert np.array_equal(e.footprint(), want)


def test_first_of_two_placements_are_exactly_those_that_leave_room_for_a_smallest_second():
    size, lo, hi, margin = 24, 4, 7, 2  # small enough to check every pair of placements
    first = world._placements(size, lo, hi, margin, [], leave_room=True)
    for i, cy, cx in np.argwhere(world._placements(size, lo, hi, margin, [], leave_room=False)):
        second = world._placements(size, lo, lo, margin, [(int(cx), int(cy), lo + int(i))], leave_room=False)
        assert first[i, cy, cx] == second.any(), (lo + i, cx, cy)
    assert first.any() and not first.all()


def test_feasible_layout_never_retries_and_refuses_a_pair_that_cannot_fit():
    rng = np.random.default_rng(24)
    for _ in range(200):  # radii summing to at most 36 fit in 64 px (corner to corner)
        a, b = world._feasible_layout(rng, 2, 64, 18, 18, 2)
        assert (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 >= 38 ** 2
    with pytest.raises(ValueError, match="2 objects of radius >= 19 px do not fit in 64 px"):
        world._feasible_layout(rng, 2, 64, 19, 19, 2)


def test_world_spec_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="max_objects must be in 1..2 for world v2, got 3"):
        world.scenes(1, 0, max_objects=3, spec=world.V2)
    with pytest.raises(ValueError, match=r"radius range \(20, 40\)"):
        world.WorldSpec("bad", radius=(20, 40))
    with pytest.raises(ValueError, match="unknown layout 'grid'"):
        world.WorldSpec("bad", layout="grid")
    assert set(world.WORLDS) == {"v1", "v2"} and world.WORLDS["v1"] == world.V1


def _brute_force_ceiling(mask: np.ndarray, factor: int) -> float:
    """Best IoU over every subset of cells (2^cells masks), upsampled by ``factor``."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    subsets = ((np.arange(2 ** (h * w))[:, None] >> np.arange(h * w)) & 1).astype(bool)  # (2^cells, cells)
    up = subsets.reshape(-1, h, 1, w, 1).repeat(factor, 2).repeat(factor, 4).reshape(len(subsets), *mask.shape)
    inter, union = (up & mask).sum((1, 2)), (up | mask).sum((1, 2))
    return float(np.max(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def test_latent_iou_ceiling_equals_a_brute_force_search_over_every_cell_mask():
    rng = np.random.default_rng(25)
    for k in range(12):  # 4 x 4 cells of 2 x 2 px, masks from sparse to dense
        mask = rng.random((8, 8)) < (k + 1) / 13
        assert judge.latent_iou_ceiling(mask, 2) == pytest.approx(_brute_force_ceiling(mask, 2), abs=1e-12)
    ring = Obj("circle", "red", 6, 6, 5).mask(12) ^ Obj("square", "red", 6, 6, 5).mask(12)
    assert judge.latent_iou_ceiling(ring, 3) == pytest.approx(_brute_force_ceiling(ring, 3), abs=1e-12)
    assert judge.latent_iou_ceiling(np.ones((8, 8), bool), 4) == 1.0
    assert judge.latent_iou_ceiling(np.zeros((8, 8), bool), 4) == 1.0


def test_latent_iou_ceiling_refuses_a_factor_that_does_not_divide_the_mask():
    with pytest.raises(ValueError, match="factor 3 must divide the mask's size 8 x 8"):
        judge.latent_iou_ceiling(np.ones((8, 8), bool), 3)


def test_a_removal_is_resolvable_by_latent_cells_like_a_colour_edit():
    ceiling = {kind: np.mean([judge.latent_iou_ceiling(e.mask(), 4) for e in world.edits(60, 36, kinds=(kind,))])
               for kind in ("colour", "remove", "shape")}
    assert ceiling["remove"] > 0.7 and ceiling["colour"] > 0.7 > ceiling["shape"]


def test_v2_shape_edits_are_better_resolvable_at_16x16_latents_than_v1s():
    def mean_ceiling(spec, truth):
        return np.mean([judge.latent_iou_ceiling(getattr(e, truth)(), 4)
                        for e in world.edits(150, seed=26, kinds=("shape",), spec=spec)])
    assert mean_ceiling(world.V1, "mask") < 0.56 and mean_ceiling(world.V2, "mask") > 0.62
    assert mean_ceiling(world.V2, "footprint") > 0.87


# ---------------------------------------------------------------- judge
@pytest.fixture(scope="module")
def judge_rates():
    """Success rate per (which render, degradation) on N_JUDGE edits (2/3 with <= 2 objects)."""
    eds = world.edits(2 * N_JUDGE // 3, seed=13) + world.edits(N_JUDGE // 3, seed=14, max_objects=3)
    rng = np.random.default_rng(15)
    rates = {}
    for which in ("target", "source"):
        for mode in ("clean", "noise_blur", "down4"):
            ok = []
            for e in eds:
                img = getattr(e, which).render()
                ok.append(judge.edit_success(img if mode == "clean" else judge.degrade(img, mode, rng), e))
            rates[which, mode] = float(np.mean(ok))
    print(rates)
    return rates


@pytest.mark.parametrize("mode", ["clean", "noise_blur", "down4"])
def test_judge_accepts_ground_truth_targets_at_least_98_percent(judge_rates, mode):
    assert judge_rates["target", mode] >= 0.98


@pytest.mark.parametrize("mode", ["clean", "noise_blur", "down4"])
def test_judge_rejects_unedited_sources_at_least_95_percent(judge_rates, mode):
    assert judge_rates["source", mode] <= 0.05


def test_judge_accepts_v2_ground_truth_targets_and_rejects_v2_sources():
    eds = world.edits(150, seed=27, spec=world.V2)
    rng = np.random.default_rng(28)
    for mode in ("clean", "noise_blur", "down4"):
        def rate(which):
            imgs = (getattr(e, which).render() for e in eds)
            return np.mean([judge.edit_success(i if mode == "clean" else judge.degrade(i, mode, rng), e)
                            for i, e in zip(imgs, eds)])
        assert rate("target") >= 0.98 and rate("source") <= 0.05, mode


@pytest.mark.parametrize("spec", [world.V1, world.V2])
def test_judge_accepts_removals_and_rejects_their_plausible_failures(spec):
    """Targets pass clean and degraded; the source, a half-erased object, the wrong object removed, both removed
    and the object recoloured instead all fail."""
    rng = np.random.default_rng(34)
    for e in world.edits(60, seed=35, kinds=("remove",), spec=spec):
        gone, kept = e.source.objects[e.edited_object_index], e.target.objects[0]
        tgt, src = e.target.render(), e.source.render()
        for img in (tgt, judge.degrade(tgt, "noise_blur", rng), judge.degrade(tgt, "down4")):
            assert judge.edit_success(img, e)
        half = tgt.copy()
        left = gone.mask() & (np.arange(64)[None, :] < gone.cx)
        half[left] = src[left]
        used = {o.colour for o in e.source.objects}
        other = next(c for c in OBJECT_COLOURS if c not in used)
        recoloured = tuple(dataclasses.replace(o, colour=other) if o == gone else o for o in e.source.objects)
        wrong = tuple(o for o in e.source.objects if o != kept)
        for failure in (src, half, dataclasses.replace(e.source, objects=wrong).render(),
                        dataclasses.replace(e.source, objects=()).render(),
                        dataclasses.replace(e.source, objects=recoloured).render()):
            assert not judge.edit_success(failure, e)
    d = judge.judge(tgt, e)
    assert (d["kind"], d["score"], d["kept_iou"], d["threshold"]) == ("remove", 1.0, 1.0, judge.REMOVE_MIN)


def test_judge_rejects_wrong_colour_and_partial_edits():
    for e in world.edits(60, seed=17, kinds=("colour", "shape")):
        i = e.edited_object_index
        tgt = e.target.objects[i]
        used = {o.colour for o in e.target.objects} | {e.source.objects[i].colour}
        wrong = next(c for c in OBJECT_COLOURS if c not in used)
        img = e.target.render()
        img[tgt.mask()] = OBJECT_COLOURS[wrong]  # right shape, wrong colour
        assert not judge.edit_success(img, e)
    for e in world.edits(60, seed=18, kinds=("background",)):
        img = e.target.render()
        img[: 64 * 3 // 5] = e.source.render()[: 64 * 3 // 5]  # only the bottom 40 % repainted
        assert not judge.edit_success(img, e)


def test_judge_details_and_input_checks():
    e = world.edits(1, seed=19, kinds=("shape",))[0]
    d = judge.judge(e.target.render(), e)
    assert d["success"] is True and d["kind"] == "shape" and d["iou_target"] == 1.0 and d["preserved"] == 1.0
    assert d["iou_source"] < d["iou_target"]
    with pytest.raises(ValueError, match="uint8"):
        judge.judge(e.target.render().astype(np.float32), e)
