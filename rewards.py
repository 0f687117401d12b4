"""
Reward registry: miniature, pixel-only stand-ins for the four reward models of Flow-OPD §4 ("Reward
models": GenEval via reward-server, OCR via PaddleOCR, PickScore, DeQA-Score), with the reward formulas of
Flow-GRPO / reward-server (see ECOSYSTEM.md §2.3). Every reward is a callable
    REWARDS[name](images, prompts, metadata) -> torch.Tensor (B,) float32
images (B, 3, 32, 32) float in [0, 1], prompts list[str], metadata list[dict] (toy_world records' "metadata").
They judge PIXELS only (never the renderer's ground truth or its randomness); a reward that does not apply to
a sample returns float('nan') for it. REWARD_SCALE[name] is what to divide by to get a 0-1 training reward.

  geneval    a colour/shape detector on pixels (nearest palette colour -> connected components -> shape from
             bounding-box fill ratio: square ~1.0, circle ~0.76, triangle ~0.55), then reward-server's score:
             mean over clause terms; each include clause adds 1 - |count - found|/count (clamped at 0), a colour
             term 1 - |count - n_colour_match|/count, and a position term 1/0 (GenEval's relative_position on
             boxes, threshold 0.1), the last two only when the count is exact (else 0). Scale [0, 1].
             geneval_details(images, metadata) -> (score, strict): strict = every count exact, every colour and
             position right, no excluded class found (GenEval's strict accuracy).
  ocr        a template-matching recogniser: ink binarised at the midpoint of the image's light (90% quantile)
             and dark levels, specks < 3 px dropped; candidate cuts at blank columns and minima of the column
             ink profile; dynamic programming picks the split into glyphs that maximises ink-weighted template
             correlation minus a per-glyph cost (so touching glyphs split and broken ones merge); each glyph is
             height-normalised to 16x24 and matched to the 36 characters A-Z 0-9 rendered with PIL's default
             font at 10-16 px (+ DejaVuSans when installed), 4 sub-pixel offsets; correlation < 0.55 reads
             nothing. Then Flow-GRPO's formula:
             target = quoted text, lower-cased, spaces removed; dist = 0 if target in recognised else
             Levenshtein; reward = 1 - min(dist, len(target))/len(target). Scale [0, 1].
  pickscore  a documented formula, NOT a learned model: scene fidelity (median sky/ground colour vs the
             scene's colours), vividness (colour distance from grey relative to the scene's) and a disc term
             (a compact blob of the sun/moon colour in the sky). Scale [0, 1]. A tiny CLIP trained on the toy
             world would be closer to the paper (and hackable like PickScore is); the formula is a deliberate,
             transparent stand-in whose optimum is exactly "the vivid, complete scene of the prompt".
  deqa       task-agnostic quality 5 - 25*noise - 2.5*blur - 1.0*blockiness clamped to [1, 5] (DeQA's raw 1-5
             scale; REWARD_SCALE["deqa"] = 5 gives Flow-GRPO's score/5 reward).
Differences from the paper:
  1) every reward is a hand-written pixel rule for 32x32 toy images, not mask2former+CLIP, PaddleOCR,
     PickScore (CLIP-H) or DeQA-Score (mPLUG-Owl2); they are deterministic and not differentiable;
  2) geneval: a failed position scores 0 (reward-server adds 0 and then always 1, so a failed position
     averages to 0.5); the count term is clamped at 0 (reward-server goes negative for found > 2*count);
     strict requires exact counts (GenEval only asks ">= count" plus exclude clauses for counting);
  3) pickscore is on [0, 1] directly (PickScore_v1's logit/26); prompts without a known scene get the
     vividness term only; ocr raises ValueError on a prompt without quoted text (Flow-GRPO returns 0);
  4) images are scored as given (reward-server JPEG-compresses them first).
Run the self-check:  OMP_NUM_THREADS=1 python rewards.py
"""
import functools
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from toy_world import BACKGROUND, OCR_CHARS, PALETTE, SCENES, SHAPES  # world constants only, no renderer

GREY = 0.5  # the colour a washed-out image drifts to (pickscore, deqa)


# ------------------------------------------------------------------------------------------- geneval
COLOUR_NAMES = list(PALETTE)
_REF_RGB = torch.tensor([PALETTE[c] for c in COLOUR_NAMES] + [BACKGROUND], dtype=torch.float32)  # (9, 3)
COLOUR_TOL = 60.0      # RGB distance (0-255); a pixel farther from every reference (a blend) is background
MIN_AREA = 6           # components smaller than this are noise
FILL_SQUARE, FILL_CIRCLE = 0.9, 0.625  # bbox fill: square ~1.0 > 0.9 > circle ~0.67-0.81 > 0.625 > triangle ~0.5-0.58
POSITION_THRESHOLD = 0.1  # GenEval's: offsets are reduced by 0.1 * (sum of box sizes) before the direction test


class Detection(NamedTuple):
    shape: str
    colour: str
    box: tuple   # (x0, y0, x1, y1), exclusive ends, pixels
    area: int


def detect(images):
    """Objects per image: list (B) of list[Detection], from pixels only."""
    B, _, H, W = images.shape
    rgb = images.permute(0, 2, 3, 1).reshape(B, H * W, 3) * 255.0                   # (B, HW, 3)
    dist, idx = torch.cdist(rgb, _REF_RGB.expand(B, -1, -1)).min(-1)                # (B, HW)
    idx[dist > COLOUR_TOL] = len(COLOUR_NAMES)                                       # blends -> background
    idx = idx.reshape(B, 1, H, W)
    masks = (idx == torch.arange(len(COLOUR_NAMES)).reshape(1, -1, 1, 1)).numpy()    # (B, 8, H, W)
    # one label call for the whole batch: 8-connected within a slice, never across slices
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, _ = ndimage.label(masks.reshape(-1, H, W), structure=structure)          # (B*8, H, W)
    areas = np.bincount(labels.ravel())
    out = [[] for _ in range(B)]
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or areas[lab] < MIN_AREA:
            continue
        k, ys, xs = sl
        fill = areas[lab] / ((ys.stop - ys.start) * (xs.stop - xs.start))
        shape = "square" if fill > FILL_SQUARE else "circle" if fill > FILL_CIRCLE else "triangle"
        b, c = divmod(k.start, len(COLOUR_NAMES))
        out[b].append(Detection(shape, COLOUR_NAMES[c], (xs.start, ys.start, xs.stop, ys.stop), int(areas[lab])))
    return out


def relative_position(a, b):
    """GenEval's relations of box a relative to box b (image y grows downwards): a set of
    {'left of', 'right of', 'above', 'below'}; an offset counts after subtracting 0.1 * (box sizes)."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, ok in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                            ("below", dy > 0.5)) if ok}


def _geneval_one(objects, meta):
    """(score, strict) of one image's detections against GenEval metadata (reward-server's partial score)."""
    terms, strict, groups = [], True, []
    for clause in meta["include"]:
        n = clause["count"]
        found = [o for o in objects if o.shape == clause["class"]]
        exact = len(found) == n
        terms.append(max(0.0, 1 - abs(n - len(found)) / n))   # clamped: reward-server can go negative
        strict &= exact
        if "color" in clause:
            m = sum(o.colour == clause["color"] for o in found)
            terms.append(1 - abs(n - m) / n if exact else 0.0)
            strict &= exact and m == n
        if "position" in clause:
            rel, ref = clause["position"]
            ok = exact and groups[ref] is not None and all(
                rel in relative_position(o.box, r.box) for o in found for r in groups[ref])
            terms.append(float(ok))                          # reward-server: 0 then always +1 (a quirk)
            strict &= ok
        groups.append(found if exact else None)
    for clause in meta.get("exclude", []):                   # GenEval: >= count excluded objects fail strict
        strict &= sum(o.shape == clause["class"] for o in objects) < clause.get("count", 1)
    return float(np.mean(terms)), bool(strict)


class GenevalResult(NamedTuple):
    score: torch.Tensor   # (B,) float32, nan where the metadata has no GenEval "include"
    strict: torch.Tensor  # (B,) bool, False where not applicable


def geneval_details(images, metadata):
    detections = detect(images)
    score, strict = torch.full((len(metadata),), float("nan")), torch.zeros(len(metadata), dtype=torch.bool)
    for i, (objs, meta) in enumerate(zip(detections, metadata)):
        if "include" in meta:
            score[i], strict[i] = _geneval_one(objs, meta)
    return GenevalResult(score, strict)


def geneval_reward(images, prompts, metadata):
    return geneval_details(images, metadata).score


# ----------------------------------------------------------------------------------------------- ocr
GLYPH_H, GLYPH_W = 16, 24   # glyphs are scaled to height 16 keeping their aspect, centred in a 16x24 grid
MIN_MATCH = 0.55            # a glyph whose best template correlation is below this is not read at all
MIN_CONTRAST = 0.25         # light - dark below this: no text on the image
GLYPH_COST = 0.3           # per-glyph cost x line height, in ink mass: any thin slice of a glyph looks like 'I'
MAX_ASPECT = 1.45           # no glyph is wider than this * the line height (W, M are ~1.3)
_TEMPLATES = None           # (N, GLYPH_H * GLYPH_W) unit vectors and their characters, built on first use


def _ink(grey):
    """Soft ink map in [0, 1] (dark text on light paper) from grey (B, H, W): 0 = paper, 1 = darkest."""
    flat = grey.reshape(len(grey), -1)
    light = flat.quantile(0.9, dim=1).reshape(-1, 1, 1)   # paper: the text never covers 10% of the image
    dark = flat.min(dim=1).values.reshape(-1, 1, 1)
    ink = ((light - grey) / (light - dark).clamp_min(1e-6)).clamp(0, 1)       # (B, H, W)
    ink[(light - dark).flatten() < MIN_CONTRAST] = 0
    return ink


@functools.lru_cache(maxsize=None)
def _resize_matrix(n_in, n_out):
    """(n_out, n_in) matrix of PIL-style antialiased bilinear resizing along one axis (separable)."""
    eye = torch.eye(n_in)[None, None]                  # column k is the impulse at k; width stays n_in
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _glyph_features(ink, boxes):
    """(n, GLYPH_H * GLYPH_W) zero-mean unit vectors of the boxed ink, height-normalised, aspect kept."""
    f = np.zeros((len(boxes), GLYPH_H, GLYPH_W), np.float32)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        w = min(GLYPH_W, max(1, int((x1 - x0) * GLYPH_H / (y1 - y0) + 0.5)))
        left = (GLYPH_W - w) // 2
        f[i, :, left:left + w] = _resize_matrix(y1 - y0, GLYPH_H) @ ink[y0:y1, x0:x1] @ _resize_matrix(x1 - x0, w).T
    f = torch.from_numpy(f).flatten(1)
    f = f - f.mean(1, keepdim=True)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _segments(ink, mask):
    """Candidate glyph boxes of one line: every run of columns between candidate cuts (blank columns and
    local minima of the column ink profile) that is at most MAX_ASPECT times the line height wide."""
    prof = (ink * mask).sum(0)                                                       # (W,)
    rows = np.nonzero(mask.any(1))[0]
    cols = np.nonzero(prof > 0)[0]
    if len(cols) == 0:
        return [], []
    max_w = MAX_ASPECT * (rows[-1] + 1 - rows[0])
    interior = [x for x in range(cols[0] + 1, cols[-1]) if prof[x] > 0 and prof[x] <= prof[x - 1]
                and prof[x] <= prof[x + 1] and prof[x] < prof[cols[0]:cols[-1] + 1].max()]
    starts = {x for x in cols if x == cols[0] or prof[x - 1] == 0}
    cuts = sorted(starts | {x + 1 for x in cols if prof[x + 1:x + 2].sum() == 0} | set(interior)
                  | {x + 1 for x in interior})
    spans, boxes = [], []
    for i, a in enumerate(cuts):
        for b in cuts[i + 1:]:
            if b - a > max_w:
                break
            sub = mask[:, a:b]
            if (prof[a:b] == 0).any():   # a glyph has ink in every column (no character is two pieces in x)
                break
            ys = np.nonzero(sub.any(1))[0]
            spans.append((a, b))
            boxes.append((ys[0], ys[-1] + 1, a, b))
    return spans, boxes


def _read_line(ink, mask, T, chars):
    """Best reading of one image: the partition of the ink columns into glyphs that maximises the
    ink-mass-weighted template correlation (dynamic programming over the candidate cuts)."""
    spans, boxes = _segments(ink, mask)
    if not spans:
        return ""
    best, j = (_glyph_features(ink, boxes) @ T.T).max(1)                              # (n_segments,)
    prof = (ink * mask).sum(0)
    rows = np.nonzero(mask.any(1))[0]
    cost = GLYPH_COST * (rows[-1] + 1 - rows[0])          # per glyph, in ink mass units
    by_start = {}
    for (a, b), c, k in zip(spans, best.tolist(), j.tolist()):
        by_start.setdefault(a, []).append((b, float(prof[a:b].sum()) * c - cost, chars[k] if c >= MIN_MATCH else ""))
    value, carry, prev = {}, (0.0, ""), None   # value: cut -> best (gain, text) of a reading that ends there
    for a in sorted({s[0] for s in spans} | {s[1] for s in spans}):
        if prev is not None and prof[prev:a].sum() > 0:
            carry = None                           # ink in between: a reading cannot skip it
        here = [v for v in (value.get(a), carry) if v is not None]
        prev = a
        if not here:
            continue
        value[a] = carry = max(here, key=lambda v: v[0])   # blank columns after a cut are free to cross
        for b, g, ch in by_start.get(a, []):
            if b not in value or value[a][0] + g > value[b][0]:
                value[b] = (value[a][0] + g, value[a][1] + ch)
    return value[prev][1] if prev in value else max(value.values(), key=lambda v: v[0])[1]


def _template_fonts():
    fonts = [ImageFont.load_default(size=s) for s in range(10, 17)]   # the renderer's font family
    try:  # a second ordinary font, so other typefaces read too; CI machines may not have it
        fonts += [ImageFont.truetype("DejaVuSans.ttf", s) for s in range(10, 17)]
    except OSError:
        pass
    return fonts


def _templates():
    """Every character in every template font at 4 sub-pixel offsets, through the same ink/box pipeline."""
    global _TEMPLATES
    if _TEMPLATES is None:
        feats, chars = [], []
        for font in _template_fonts():
            for ch in OCR_CHARS:
                for dx, dy in ((0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)):
                    img = Image.new("L", (40, 40), 255)
                    ImageDraw.Draw(img).text((10 + dx, 6 + dy), ch, fill=0, font=font)
                    ink = 1 - np.asarray(img, dtype=np.float32) / 255.0
                    ys, xs = np.nonzero(ink > 0.5)
                    feats.append(_glyph_features(ink, [(ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)]))
                    chars.append(ch)
        _TEMPLATES = (torch.cat(feats), chars)
    return _TEMPLATES


def recognise(images):
    """The text read on each image (upper-case A-Z 0-9, '' if none): list[str] of length B."""
    T, chars = _templates()
    ink = _ink(images.mean(1)).numpy()                                                # (B, H, W)
    out = []
    for b in range(len(images)):
        labels, _ = ndimage.label(ink[b] > 0.5, structure=np.ones((3, 3), bool))
        mask = np.isin(labels, np.nonzero(np.bincount(labels.ravel()) >= 3)[0][1:])   # drop specks < 3 px
        out.append(_read_line(ink[b], mask, T, chars))
    return out


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognised, prompt):
    """Flow-GRPO's OCR reward of one recognised string for one prompt, in [0, 1]."""
    if '"' not in prompt:
        raise ValueError(f"ocr reward needs quoted text in the prompt, got {prompt!r}")
    target = prompt.split('"')[1].replace(" ", "").lower()
    rec = recognised.replace(" ", "").lower()
    dist = 0 if target in rec else levenshtein(rec, target)
    return 1 - min(dist, len(target)) / len(target)


def ocr_reward(images, prompts, metadata):
    return torch.tensor([ocr_score(r, p) for r, p in zip(recognise(images), prompts)], dtype=torch.float32)


# ----------------------------------------------------------------------------------------- pickscore
DISC_AREA = 20.0   # ink-free pixels of disc colour that count as a full sun/moon (the world draws r = 3-5)


def _scene_of(prompt, meta):
    """The SCENES key named in the prompt (longest match), else metadata["scene"], else None."""
    named = [s for s in SCENES if s in prompt]
    return max(named, key=len) if named else meta.get("scene")


def _pickscore_one(img, scene):
    """Score of one image (3, H, W) in [0, 1] for a scene name (or None: vividness only)."""
    H = img.shape[1]
    if scene is None:   # no scene to be faithful to: mean distance from grey, 0.3 = a vivid image
        return float(((img - GREY).norm(dim=0).mean() / 0.3).clamp(0, 1))
    sky, ground, horizon, disc = (torch.tensor(c, dtype=torch.float32) / 255 if isinstance(c, tuple) else c
                                  for c in SCENES[scene])
    top, bottom = img[:, :int((horizon - 0.08) * H)], img[:, int((horizon + 0.08) * H) + 1:]    # (3, h, W)
    m_sky, m_ground = top.flatten(1).median(1).values, bottom.flatten(1).median(1).values       # (3,)
    # fidelity: 1 at the scene's colour, 0 at RGB distance >= 0.5 (about the washed-out q = 0 rendering)
    fidelity = [float((1 - (m - c).norm() / 0.5).clamp(0, 1)) for m, c in ((m_sky, sky), (m_ground, ground))]
    # vividness: how far from grey each region is, relative to how far the scene's colour is
    vivid = float(np.mean([min(1.0, float((m - GREY).norm() / (c - GREY).norm())) for m, c in
                           ((m_sky, sky), (m_ground, ground))]))
    terms, weights = fidelity + [vivid], [0.3, 0.3, 0.2]
    if disc is not None:   # largest 4-connected blob near the disc colour (and unlike the sky) in the sky
        near = ((top - disc[:, None, None]).norm(dim=0) < 0.25) & ((top - m_sky[:, None, None]).norm(dim=0) > 0.1)
        labels, n = ndimage.label(near.numpy())
        blob = np.bincount(labels.ravel())[1:].max() if n else 0
        terms.append(min(1.0, blob / DISC_AREA))
        weights.append(0.2)
    return float(np.dot(terms, weights) / sum(weights))


def pickscore_reward(images, prompts, metadata):
    return torch.tensor([_pickscore_one(img, _scene_of(p, m)) for img, p, m in zip(images, prompts, metadata)],
                        dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- deqa
K_NOISE, K_BLUR, K_BLOCK = 25.0, 2.5, 1.0   # points lost (of 5) per unit of each defect
BLUR_SHARP, BLUR_SOFT = 0.5, 0.9            # re-blur energy ratio of a sharp edge (~0.38-0.5) / a soft one
BLOCK = 4                                   # block size of the blockiness measure (JPEG's 8 is too big at 32x32)


def _pad_unfold3(x):
    """(B, C, H, W) -> (B, C, H, W, 9) 3x3 neighbourhoods with replicated borders."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2)


def _grad_energy(x):
    """Mean squared horizontal + vertical finite differences per image, (B,)."""
    return (x.diff(dim=3) ** 2).mean((1, 2, 3)) + (x.diff(dim=2) ** 2).mean((1, 2, 3))


def deqa_terms(images):
    """(noise, blur, blockiness) per image, each (B,): the three defects deqa_raw penalises."""
    x = images.float()
    # noise: median |x - median3x3(x)|; 0 on flat regions and clean edges, ~0.6 sigma for Gaussian noise
    noise = (x - _pad_unfold3(x).median(-1).values).abs().flatten(1).median(1).values
    # blur: share of gradient energy that survives a [1,2,1]/4 re-blur; a sharp step keeps ~0.38, a soft edge
    # ~1. A flat image (no edges at all) has ratio 1 and counts as fully blurred.
    k = torch.tensor([[1.0, 2.0, 1.0]]) / 4
    k2 = (k.T @ k).expand(3, 1, 3, 3)
    reblur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    ratio = (_grad_energy(reblur) + 1e-6) / (_grad_energy(x) + 1e-6)
    blur = ((ratio - BLUR_SHARP) / (BLUR_SOFT - BLUR_SHARP)).clamp(0, 1)
    # blockiness: excess of gradient energy on block boundaries over inside blocks, in both directions
    # (min: one straight edge that happens to lie on a boundary, like a horizon, is not blockiness)
    def excess(d, dim):   # d: finite differences along `dim`; boundary = between index BLOCK-1 and BLOCK
        on = (torch.arange(d.shape[dim]) % BLOCK == BLOCK - 1)
        e = d ** 2
        e_on = e.index_select(dim, on.nonzero()[:, 0]).mean((1, 2, 3))
        e_in = e.index_select(dim, (~on).nonzero()[:, 0]).mean((1, 2, 3))
        return ((e_on - e_in) / (e_on + e_in + 1e-6)).clamp(0, 1)
    blockiness = torch.minimum(excess(x.diff(dim=3), 3), excess(x.diff(dim=2), 2))
    return noise, blur, blockiness


def deqa_raw(images, prompts=None, metadata=None):
    """DeQA-like quality on DeQA's raw 1-5 scale, (B,) float32: 5 - 25 noise - 2.5 blur - 1.0 blockiness."""
    noise, blur, blockiness = deqa_terms(images)
    return (5 - K_NOISE * noise - K_BLUR * blur - K_BLOCK * blockiness).clamp(1, 5).float()


# ------------------------------------------------------------------------------------------ registry
# REAL-IMAGE BACKENDS GO HERE (to be added behind the same names and signature, imports inside the
# constructors so the toy path needs none of them): RapidOCR for "ocr", PickScore_v1 CLIP for "pickscore",
# a reward-server client for "geneval" and "deqa".
REWARDS = {
    "geneval": geneval_reward,      # [0, 1]
    "ocr": ocr_reward,              # [0, 1]
    "pickscore": pickscore_reward,  # [0, 1]
    "deqa": deqa_raw,               # raw [1, 5]
}
REWARD_SCALE = {"geneval": 1.0, "ocr": 1.0, "pickscore": 1.0, "deqa": 5.0}  # reward = REWARDS[k](...) / scale


def combined_reward(images, records, weights):
    """Weighted sum of registry rewards, each on 0-1 (raw deqa divided by 5): sum_k w_k r_k / scale_k.
    `weights` maps a reward name, or "task" for each record's own task reward, to its weight."""
    prompts, meta = [r["prompt"] for r in records], [r["metadata"] for r in records]
    total = torch.zeros(len(records))
    for name, w in weights.items():
        if name == "task":
            for task in {r["task"] for r in records}:
                idx = [i for i, r in enumerate(records) if r["task"] == task]
                total[idx] += w * REWARDS[task](images[idx], [prompts[i] for i in idx], [meta[i] for i in idx])
        else:
            total += w * REWARDS[name](images, prompts, meta) / REWARD_SCALE[name]
    return total


def ocr_char_accuracy(texts, images):
    """1 - (sum of Levenshtein distances) / (number of characters): per-character accuracy of recognise."""
    return 1 - sum(levenshtein(r, t) for r, t in zip(recognise(images), texts)) / sum(map(len, texts))


def _draw_text(text, font, rng, jitter=0):
    """Text drawn centred (+-jitter px) on light paper with a font the caller chooses: uint8 (32, 32, 3)."""
    img = Image.new("RGB", (32, 32), (240, 238, 230))
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    dx, dy = rng.integers(-jitter, jitter + 1, size=2)
    draw.text(((32 - x1 + x0) / 2 - x0 + dx, (32 - y1 + y0) / 2 - y0 + dy), text, fill=(25, 20, 30), font=font)
    return np.asarray(img)


def _ocr_accuracy_report(rng):
    import toy_world as tw
    chars = list(OCR_CHARS)
    texts = [r["metadata"]["text"] for r in tw.prompts("ocr", "test")]
    rendered = [tw.render({"task": "ocr", "metadata": {"text": t}}, rng) for t in chars * 3 + texts]
    print(f"ocr char accuracy, toy_world renderer (sizes 12-14, jitter), 36 chars x3 + {len(texts)} test texts: "
          f"{ocr_char_accuracy(chars * 3 + texts, tw.to_tensor(rendered)):.3f}")
    fonts = {f"default font {s}": ImageFont.load_default(size=s) for s in (10, 12, 13, 14, 16)}
    try:
        fonts["DejaVuSans 12"] = ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        pass
    for name, font in fonts.items():
        for jitter in (0, 2):
            short = [t for t in texts if font.getlength(t) <= 30]   # texts that fit the 32 px image
            imgs = [_draw_text(t, font, rng, jitter) for t in chars + short]
            print(f"ocr char accuracy, {name:14s} jitter {jitter}: "
                  f"{ocr_char_accuracy(chars + short, tw.to_tensor(imgs)):.3f} (36 chars + {len(short)} texts)")


if __name__ == "__main__":
    import toy_world as tw   # the self-check renders test images; the rewards themselves never call it
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    _templates()
    for task in tw.TASKS:
        recs = tw.prompts(task, "test")
        images = tw.to_tensor([tw.render(r, rng) for r in recs])                     # (B, 3, 32, 32)
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
        prompts, meta = [r["prompt"] for r in recs], [r["metadata"] for r in recs]
        for name in (task, "deqa"):
            t0 = time.perf_counter()
            clean = REWARDS[name](images, prompts, meta)
            ms = (time.perf_counter() - t0) / len(recs) * 1e3
            pure = REWARDS[name](noise, prompts, meta)
            print(f"{task:9s} {name:9s} clean mean {clean.mean():.3f} min {clean.min():.3f} | pure noise mean "
                  f"{pure.mean():.3f} | {ms:.2f} ms/image (B={len(recs)})")
        if task == "geneval":
            res = geneval_details(images, meta)
            for tag in tw.GENEVAL_TAGS:
                m = torch.tensor([x["tag"] == tag for x in meta])
                print(f"  {tag:13s} score {res.score[m].mean():.3f} strict {res.strict[m].float().mean():.3f}")
    _ocr_accuracy_report(rng)
