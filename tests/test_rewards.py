"""
Tests for rewards.py: each toy reward prefers what its paper counterpart prefers, on toy_world renderings.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_rewards.py
"""
import copy
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import ImageFont

import rewards as R
from world import judges as J
from world import quality as Q
from world import ocr as O
from world import renderer
from world import toy_world as tw

SWAP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _render(records, seed=0):
    rng = np.random.default_rng(seed)
    return renderer.to_tensor([renderer.render(r, rng) for r in records])


def _geneval_record(tag, k=0):
    return [r for r in tw.prompts("geneval", "train") + tw.prompts("geneval", "test") if r["metadata"]["tag"] == tag][k]


def _violate(meta):
    """Metadata for a rendering that breaks `meta` the way its sub-task is graded."""
    m, inc = copy.deepcopy(meta), copy.deepcopy(meta["include"])
    tag = meta["tag"]
    if tag == "single_object":
        inc[0]["class"] = next(s for s in tw.SHAPES if s != inc[0]["class"])    # wrong object
    elif tag == "two_object":
        inc = inc[:1]                                                            # missing object
    elif tag == "counting":
        inc[0]["count"] = inc[0]["count"] % 4 + 1                                # wrong count
    elif tag in ("colors", "color_attr"):
        inc[-1]["color"] = next(c for c in tw.PALETTE if c != inc[-1]["color"])  # wrong colour
    elif tag == "position":
        inc[1]["position"] = [SWAP[inc[1]["position"][0]], 0]                    # swapped relation
    m["include"] = inc
    return m


@pytest.mark.parametrize("tag", tw.GENEVAL_TAGS)
def test_geneval_correct_beats_wrong_and_strict_is_high(tag):
    recs = [_geneval_record(tag, k) for k in range(3)]
    recs = (recs * 7)[:20]
    wrong = [{"task": "geneval", "metadata": _violate(r["metadata"])} for r in recs]
    meta = [r["metadata"] for r in recs]
    good = R.geneval_details(_render(recs, 1), meta)
    bad = R.geneval_details(_render(wrong, 2), meta)
    assert good.strict.float().mean() >= 0.9
    assert (good.score > bad.score).float().mean() >= 0.9 and not bad.strict.any()
    assert ((good.score >= 0) & (good.score <= 1)).all() and ((bad.score >= 0) & (bad.score <= 1)).all()


def test_geneval_position_failure_scores_zero_not_half():
    rec = _geneval_record("position")
    meta = rec["metadata"]
    img = _render([{"task": "geneval", "metadata": _violate(meta)}])
    res = R.geneval_details(img, [meta])
    assert res.score.item() == pytest.approx(2 / 3) and not res.strict.item()  # counts 1 + 1, position 0


def test_geneval_exclude_clause_breaks_strict():
    rec = _geneval_record("single_object")
    meta = copy.deepcopy(rec["metadata"])
    img = _render([rec])
    assert R.geneval_details(img, [meta]).strict.item()
    meta["exclude"] = [{"class": meta["include"][0]["class"], "count": 1}]
    assert not R.geneval_details(img, [meta]).strict.item()


def test_relative_position_convention():
    left, right, top = (0, 10, 8, 18), (20, 10, 28, 18), (10, 0, 18, 8)
    assert R.relative_position(left, right) == {"left of"}
    assert R.relative_position(right, left) == {"right of"}
    assert R.relative_position(top, (10, 20, 18, 28)) == {"above"}  # image y grows downwards
    assert R.relative_position(left, left) == set()


def _ocr_images(texts, seed=0):
    return _render([{"task": "ocr", "metadata": {"text": t}} for t in texts], seed)


def test_ocr_correct_text_scores_one_wrong_lower():
    texts = ["K7", "B", "Q0Z", "MW", "I1L"]
    prompts = [f'a sign that says "{t}"' for t in texts]
    good = R.ocr_reward(_ocr_images(texts), prompts, [{}] * 5)
    assert torch.equal(good, torch.ones(5))
    wrong = R.ocr_reward(_ocr_images(["XY", "C", "Q0A", "AB", "789"]), prompts, [{}] * 5)
    assert (wrong < 1).all()


def test_ocr_formula_quoted_text_substring_levenshtein():
    assert R.ocr_score("K7", 'a sign that says "k 7" in K7 letters') == 1.0   # quoted text only, spaces/case
    assert R.ocr_score("AK7B", 'a sign that says "K7"') == 1.0                  # substring counts as exact
    assert R.ocr_score("K8", 'a board reading "K7"') == 0.5                     # one substitution of two
    assert R.ocr_score("ABC", 'a board reading "ABD"') == pytest.approx(2 / 3)
    assert R.ocr_score("", 'a board reading "ABD"') == 0.0
    assert R.ocr_score("XXXXXXXX", 'a board reading "A"') == 0.0                 # dist clamped to len
    assert R.levenshtein("kitten", "sitting") == 3
    assert R.ocr_score("ZZZ", 'a poster with the text "ZZZ" not "QQQ"') == 1.0
    with pytest.raises(ValueError, match="a photo of a circle"):
        R.ocr_score("A", "a photo of a circle")


@pytest.mark.parametrize("size", [10, 16])
def test_ocr_reads_a_font_size_the_renderer_does_not_use(size):
    font, rng = ImageFont.load_default(size=size), np.random.default_rng(3)
    texts = [t for t in ("A7", "HQ", "3K", "XZ", "PD", "WN", "58", "TJ") if font.getlength(t) <= 30]
    imgs = renderer.to_tensor([O._draw_text(t, font, rng, jitter=1) for t in texts])
    assert O.ocr_char_accuracy(texts, imgs) >= 0.85


class _FixedQ:
    """Stands in for the renderer's Generator: the first uniform() is the quality q, the rest are seeded."""

    def __init__(self, q, seed):
        self.q, self.rng, self.first = q, np.random.default_rng(seed), True

    def uniform(self, *args):
        if self.first:
            self.first = False
            return self.q
        return self.rng.uniform(*args)


def _scene_images(scene, q, n=10):
    return renderer.to_tensor([np.asarray(renderer._render_pickscore({"scene": scene}, _FixedQ(q, s)), np.uint8) for s in range(n)])


@pytest.mark.parametrize("scene", list(tw.NAMED_SCENES) + list(tw.COMPOSED_SCENES)[::12])
def test_pickscore_monotone_in_quality_and_scene_specific(scene):
    prompt = ["a painting of " + scene] * 10
    means = [R.pickscore_reward(_scene_images(scene, q), prompt, [{}] * 10).mean() for q in (0.0, 0.33, 0.67, 1.0)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    others = [R.pickscore_reward(_scene_images(s, 1.0), prompt, [{}] * 10).mean() for s in tw.NAMED_SCENES if s != scene]
    assert means[-1] > max(others)


def test_pickscore_scene_from_prompt_then_metadata_fallback_and_non_scene():
    scene = "a snowy night"
    img = _scene_images(scene, 1.0, 1)
    by_prompt = R.pickscore_reward(img, ["a picture of " + scene], [{}])
    by_meta = R.pickscore_reward(img, ["a picture"], [{"scene": scene}])
    assert by_prompt.item() == by_meta.item() > 0.9
    plain = R.pickscore_reward(torch.cat([img, torch.full_like(img, 0.5)]), ["a photo of a circle"] * 2, [{}, {}])
    assert 0 <= plain[1] < plain[0] <= 1                                        # vividness only


def _clean_batch():
    recs = [r for t in tw.TASKS for r in tw.prompts(t, "test")[:6]]
    return _render(recs, 5)


def _gauss_blur(x, s):
    r = torch.arange(-4, 5.0)
    k = torch.exp(-r ** 2 / (2 * s ** 2))
    k = k / k.sum()
    return F.conv2d(F.pad(x, (4, 4, 4, 4), mode="replicate"), (k[:, None] * k[None]).expand(3, 1, 9, 9), groups=3)


def _blocky(x, s):  # JPEG-like: blend toward 4x4 block means
    return (1 - s) * x + s * F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")


@pytest.mark.parametrize("corrupt,strengths", [
    (lambda x, s: (x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1),
     (0.02, 0.05, 0.1, 0.2)),
    (_gauss_blur, (0.7, 1.0, 1.5, 2.0)),
    (_blocky, (0.25, 0.5, 0.75, 1.0)),
], ids=["noise", "blur", "blockiness"])
def test_deqa_falls_with_each_corruption(corrupt, strengths):
    x = _clean_batch()
    clean = R.deqa_raw(x)
    means = [clean.mean()] + [R.deqa_raw(corrupt(x, s)).mean() for s in strengths]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert clean.min() >= 4.0


def test_deqa_range_on_noise_and_flat():
    noise = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert (R.deqa_raw(noise) <= 2).all()
    assert 1 <= R.deqa_raw(torch.full((1, 3, 32, 32), 0.5)).item() < 4   # flat counts as fully blurred


def test_registry_shapes_dtype_determinism_and_nan():
    assert set(R.REWARDS) == {"geneval", "ocr", "pickscore", "deqa"} == set(R.REWARD_SCALE)
    recs = [tw.prompts(t, "test")[0] for t in tw.TASKS]
    x, prompts, meta = _render(recs), [r["prompt"] for r in recs], [r["metadata"] for r in recs]
    for name, fn in R.REWARDS.items():
        if name == "ocr":   # OCR needs quoted text: call it on the OCR record only
            args = (x[1:2], prompts[1:2], meta[1:2])
        else:
            args = (x, prompts, meta)
        a, b = fn(*args), fn(*args)
        assert a.shape == (len(args[1]),) and a.dtype == torch.float32
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    g = R.REWARDS["geneval"](x, prompts, meta)
    assert not math.isnan(g[0]) and math.isnan(g[1]) and math.isnan(g[2])   # OCR / pickscore records
    assert not R.geneval_details(x, meta).strict[1:].any()


# ------------------------------------------------------------------------------- calibration of geneval
@pytest.fixture(scope="module")
def base():
    from support import models
    return models.load_world_model(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "checkpoints", "base"))


def test_ground_truth_through_the_autoencoder_scores_full_marks_and_resists_noise(base):
    """What a perfect generator could draw (ground truth through the base's autoencoder) scores >= 0.97 on
    every GenEval sub-task and on OCR, and +-2/255 pixel noise changes under 1% of the rewards
    (the first detector: 0.72-1.00 per sub-task, up to 4.4% flipped)."""
    from tools import calibrate_world as calibration
    torch.set_num_threads(1)
    cal = calibration.reward_calibration(base, per_stratum=24, seed=3)
    assert set(cal) == set(tw.GENEVAL_TAGS) | {"ocr"}
    assert all(v["reward"] >= 0.97 for v in cal.values()), cal
    assert np.mean([v["flip"] for v in cal.values()]) < 0.01, cal
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for task in tw.TASKS:   # and deqa's pattern rule charges nothing for what a perfect generator draws
            truth = renderer.to_tensor([renderer.render(r, rng, *renderer.random_style(rng))
                                        for r in tw.prompts(task, "test")[:32]])
            assert (Q.pattern_term(base.decode(base.encode_images(truth)).clamp(0, 1)) == 0).all(), task



def test_deqa_scores_empty_images_at_the_floor_sharp_or_through_the_autoencoder(base):
    """An image that draws nothing (a flat colour, a texture too fine for the autoencoder or too faint to see)
    scores deqa's floor, sharp and through the world's autoencoder, whose ripple on a flat image read as sharp
    (rewards version 4: 4.89-5.00, above any ground truth); the edges of shapes and text are far above FAINT_EDGE.
    Not caught: a full-contrast 2 px checkerboard in one of its phases, which the autoencoder turns into faint
    bands as strong as the dim horizons of the models' own night scenes (results/judges.json)."""
    from tools.calibrate_world import empty_images
    names, empty = list(empty_images()), torch.stack(list(empty_images().values()))
    with torch.no_grad():
        decoded = base.decode(base.encode_images(empty)).clamp(0, 1)
    assert torch.equal(R.deqa_raw(empty), torch.ones(len(names))), R.deqa_raw(empty)
    caught = [n != "checkerboard 2 px, shifted" for n in names]
    assert torch.equal(R.deqa_raw(decoded[caught]), torch.ones(sum(caught))), R.deqa_raw(decoded)
    for task in ("geneval", "ocr"):
        truth = _render(tw.prompts(task, "test")[:32], 4)
        with torch.no_grad():
            through = base.decode(base.encode_images(truth)).clamp(0, 1)
        for images in (truth, through):
            assert (Q.edge_contrast(images) > 1.5 * Q.FAINT_EDGE[1]).all(), task

def _shape_images(shapes, sizes, seed=0):
    """One shape per image, every (shape, size, colour), at random sub-pixel centres: (images, shape names)."""
    from PIL import Image, ImageDraw
    rng, imgs, names = np.random.default_rng(seed), [], []
    for shape, size, colour in itertools.product(shapes, sizes, tw.PALETTE):
        img = Image.new("RGB", (32, 32), tw.BACKGROUND)
        renderer._draw_shape(ImageDraw.Draw(img), shape, *rng.uniform(8, 24, 2), size, tw.PALETTE[colour])
        imgs.append(np.asarray(img))
        names.append(shape)
    return renderer.to_tensor(imgs), names


def _margins(images, names):
    """The true shape's soft IoU minus the best other shape's, per image (one component each)."""
    labels, cover = J.colour_cover(images)
    out = []
    for label, cov, name in zip(labels, cover, names):
        (_, _, _, c), = J._components(label, cov)
        iou = J.shape_scores(c)
        k = tw.SHAPES.index(name)
        out.append(iou[k] - np.delete(iou, k).max())
    return np.array(out)


def test_shape_classifier_wins_by_a_margin_on_crisp_and_autoencoded_shapes(base):
    """Every world shape (sizes 8-12, every colour) is told apart with a soft-IoU margin, sharp or through
    the autoencoder (measured minima 0.10 and 0.023 with the world's fixed aspect; 0.05 when each axis was
    fitted apart), where bounding-box fill put generated squares (fill 0.87-0.90) on the old 0.9 threshold;
    and every one fits its shape above MIN_IOU (measured minima 0.87 sharp, 0.78 through the autoencoder)."""
    images, names = _shape_images(tw.SHAPES, (8, 10, 12))
    with torch.no_grad():
        autoencoded = base.decode(base.encode_images(images))
    assert _margins(images, names).min() > 0.06
    assert _margins(autoencoded, names).min() > 0.015
    for x in (images, autoencoded):
        assert [o.shape for found in J.detect(x) for o in found] == names


def test_rounded_square_is_a_square_and_octagon_a_circle():
    """The shapes that straddle fill thresholds: a 10 px square with corners rounded by 2 px (as the
    autoencoder rounds them) and a coarse 8 px circle (fill 0.81) are told apart (margins 0.026, 0.158)."""
    from PIL import Image, ImageDraw
    imgs = []
    for draw in (lambda d: d.rounded_rectangle([10, 10, 19, 19], radius=2, fill=tw.PALETTE["green"]),
                 lambda d: d.ellipse([10, 10, 17, 17], fill=tw.PALETTE["green"])):
        img = Image.new("RGB", (32, 32), tw.BACKGROUND)
        draw(ImageDraw.Draw(img))
        imgs.append(np.asarray(img))
    margins = _margins(renderer.to_tensor(imgs), ["square", "circle"])
    assert margins[0] > 0.015 and margins[1] > 0.1, margins


def test_colour_cover_puts_a_blended_edge_at_half_coverage():
    """A pixel that is 60% red and 40% background belongs to red with coverage 0.6; at 40% it is background."""
    red, bg = np.array(tw.PALETTE["red"]), np.array(tw.BACKGROUND)
    px = np.stack([0.6 * red + 0.4 * bg, 0.4 * red + 0.6 * bg]).reshape(1, 2, 1, 3) / 255.0
    label, cover = J.colour_cover(torch.tensor(px, dtype=torch.float32).permute(0, 3, 1, 2))
    k = J.COLOUR_NAMES.index("red")
    assert label[0, :, 0].tolist() == [k, len(J.COLOUR_NAMES)]
    assert cover[0, :, 0, k] == pytest.approx([0.6, 0.4], rel=1e-5)


# ------------------------------------------------------------------ judges a person would agree with
def _two_tone(mask, a=(0, 0, 0), b=(255, 255, 255)):
    """A (1, 3, 32, 32) image: colour b where mask (32, 32) is True, colour a elsewhere."""
    img = np.where(mask[..., None], np.array(b), np.array(a)) / 255.0
    return torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]


def _patterns():
    """{name: image} of textures and splits the world never draws, in black and white and in palette colours."""
    y, x = np.mgrid[0:32, 0:32]
    r = np.hypot(x - 15.5, y - 15.5)
    masks = {"checkerboard 1 px": (x + y) % 2 == 0, "checkerboard 2 px": (x // 2 + y // 2) % 2 == 0,
             "checkerboard 4 px": (x // 4 + y // 4) % 2 == 0, "stripes 1 px": x % 2 == 0,
             "stripes 2 px": (y // 2) % 2 == 0, "stripes 4 px": (x // 4) % 2 == 0,
             "random dithering": np.random.default_rng(0).uniform(size=(32, 32)) < 0.5,
             "ordered dithering": np.array([[0, 2], [3, 1]])[y % 2, x % 2] < 2,
             "hatching": (x + y) % 3 == 0, "hatching 4 px": (x - y) % 4 == 0,
             "rings 1.5 px": (r // 1.5) % 2 == 0, "rings 2 px": (r // 2) % 2 == 0,
             "half split, left/right": x >= 16, "half split, top/bottom": y >= 16}
    out = {name: _two_tone(m) for name, m in masks.items()}
    out.update({f"{name}, red/blue": _two_tone(m, tw.PALETTE["red"], tw.PALETTE["blue"]) for name, m in masks.items()
                if name != "half split, top/bottom"})   # a two-colour top/bottom split is a world scene
    return out


def test_deqa_scores_patterns_the_world_never_draws_below_blurred_ground_truth():
    """Stripes, checkerboards, dithering, hatching, rings and half splits (the old deqa: 4.0-5.0, a 1 px
    checkerboard and a black/white split 5.00) score below the world's blurred ground truth."""
    blurred = [R.deqa_raw(renderer.to_tensor([renderer.render(r, np.random.default_rng(0), blur=True)
                                               for r in tw.prompts(t, "test")[:24]])).mean() for t in tw.TASKS]
    for name, img in _patterns().items():
        assert R.deqa_raw(img).item() < min(blurred), name
        assert Q.pattern_term(img).item() == 1.0, name


def test_pattern_term_is_zero_on_ground_truth_and_on_noise_blur_and_blocks():
    """The pattern rule leaves every world style alone (clean, web, blurred) and charges nothing for noise,
    blur or blockiness, which keep their own costs."""
    rng = np.random.default_rng(1)
    for task in tw.TASKS:
        recs = tw.prompts(task, "train")[:40] + tw.prompts(task, "test")[:40]
        for web, blur in ((False, False), (True, False), (False, True)):
            images = renderer.to_tensor([renderer.render(r, rng, web, blur) for r in recs])
            assert (Q.pattern_term(images) == 0).all(), (task, web, blur)
    x = _clean_batch()
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for corrupted in (noisy, _gauss_blur(x, 1.5), _blocky(x, 1.0)):
        assert (Q.pattern_term(corrupted) == 0).all()


def _one_blob(draw):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (32, 32), tw.BACKGROUND)
    draw(ImageDraw.Draw(img), tw.PALETTE["red"])
    return renderer.to_tensor([np.asarray(img)])


NON_SHAPES = {   # drawn for circles and squares by a model that pleases a nearest-shape detector
    "3:1 ellipse": lambda d, c: d.ellipse([4, 12, 27, 19], fill=c),
    "2:1 ellipse": lambda d, c: d.ellipse([6, 11, 25, 20], fill=c),
    "4x28 ellipse": lambda d, c: d.ellipse([2, 14, 29, 17], fill=c),
    "3:1 bar": lambda d, c: d.rectangle([4, 12, 27, 19], fill=c),
    "2:1 bar": lambda d, c: d.rectangle([6, 11, 25, 20], fill=c),
    "3 px line": lambda d, c: d.rectangle([2, 14, 29, 16], fill=c),
    "ring": lambda d, c: d.ellipse([6, 6, 25, 25], outline=c, width=3),
    "square frame": lambda d, c: d.rectangle([6, 6, 25, 25], outline=c, width=3),
    "frame of the image": lambda d, c: d.rectangle([0, 0, 31, 31], outline=c, width=3),
    "downward triangle": lambda d, c: d.polygon([(6, 8), (25, 8), (16, 24)], fill=c),
}


@pytest.mark.parametrize("name", NON_SHAPES)
def test_detector_finds_no_shape_in_elongated_hollow_or_inverted_blobs(name):
    """Each such blob is found as an object of no shape (the old detector: 3:1 ellipses and bars were a
    circle and a square, 0.93 partial / 0.79 strict; a 3 px line a square, a frame a full-image square),
    and scores 0 for the shape the prompt asks for."""
    image = _one_blob(NON_SHAPES[name])
    (found,) = J.detect(image)
    assert [o.shape for o in found] == [None], found
    for shape in tw.SHAPES:
        meta = {"tag": "color_attr", "include": [{"class": shape, "count": 1, "color": "red"}]}
        assert R.geneval_reward(image, [""], [meta]).item() == 0.0
