"""
Text recogniser of the miniature world: a template-matching stand-in for PaddleOCR's PP-OCR (Flow-OPD §4;
Flow-GRPO's OCR reward), behind one call, `recognise(images) -> list[str]`, which rewards.py's OCR reward
(Flow-GRPO's Levenshtein formula on the quoted text) consumes. Pixels only; no model weights.

Ink is binarised at the midpoint of the image's light (90% quantile) and dark levels, specks < 3 px dropped;
candidate cuts are blank columns and minima of the column ink profile; dynamic programming picks the split into
glyphs that maximises ink-weighted template correlation minus a per-glyph cost (so touching glyphs split and
broken ones merge); each glyph is height-normalised to 16x24 and matched to A-Z 0-9 rendered with PIL's default
font at 10-16 px (+ DejaVuSans when installed) at 4 sub-pixel offsets; a correlation < 0.55 reads nothing.
Known misreads of ground-truth text through the world's autoencoder (README "Calibration"): a stroke faded
below the binarisation threshold drops out of the glyph (an M's left stem: "IJ"), and a letter's blurred edge
joins the next narrow glyph (K then I: "K1"). Both lower a correct image's reward; neither raises a wrong one's.
Differences from the paper: a hand-written recogniser for 32x32 images, not PP-OCR (that backend belongs
behind the same call for real images).

Self-check (accuracy on rendered text): OMP_NUM_THREADS=1 python rewards.py
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from world.toy_world import OCR_CHARS  # the alphabet only; the recogniser never calls the renderer

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
        out.append(_read_line(ink[b], _ink_mask(ink[b]), T, chars))
    return out


def _ink_mask(ink):
    """(H, W) bool: the binarised ink of one soft ink map (H, W), 8-connected specks < 3 px dropped."""
    labels, _ = ndimage.label(ink > 0.5, structure=np.ones((3, 3), bool))
    return np.isin(labels, np.nonzero(np.bincount(labels.ravel()) >= 3)[0][1:])


def ink_extent(images):
    """(B, 2) height and width in pixels of each image's ink (binarised as recognise does, specks dropped;
    0, 0 where there is none): the layout of the text, whatever it reads."""
    ink, out = _ink(images.mean(1)).numpy(), np.zeros((len(images), 2))
    for b in range(len(images)):
        ys, xs = np.nonzero(_ink_mask(ink[b]))
        if len(ys):
            out[b] = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    return out


def levenshtein(a, b):
    """Edit distance between two strings (insertions, deletions, substitutions of one character)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


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
    from world import renderer, toy_world as tw
    chars = list(OCR_CHARS)
    texts = [r["metadata"]["text"] for r in tw.prompts("ocr", "test")]
    rendered = [renderer.render({"task": "ocr", "metadata": {"text": t}}, rng) for t in chars * 3 + texts]
    print(f"ocr char accuracy, toy_world renderer (sizes 12-14, jitter), 36 chars x3 + {len(texts)} test texts: "
          f"{ocr_char_accuracy(chars * 3 + texts, renderer.to_tensor(rendered)):.3f}")
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
                  f"{ocr_char_accuracy(chars + short, renderer.to_tensor(imgs)):.3f} (36 chars + {len(short)} texts)")


if __name__ == "__main__":  # python -m world.ocr: the recogniser's accuracy on rendered text
    torch.set_num_threads(1)
    _ocr_accuracy_report(np.random.default_rng(0))
