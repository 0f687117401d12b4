"""
Reward registry: miniature, pixel-only stand-ins for the four reward models of Flow-OPD §4 ("Reward
models": GenEval via reward-server, OCR via PaddleOCR, PickScore, DeQA-Score), with the reward formulas of
Flow-GRPO / reward-server (see ECOSYSTEM.md §2.3). Every reward is a callable
    REWARDS[name](images, prompts, metadata) -> torch.Tensor (B,) float32
images (B, 3, 32, 32) float in [0, 1], prompts list[str], metadata list[dict] (toy_world records' "metadata").
They judge PIXELS only (never the renderer's ground truth or its randomness); a reward that does not apply to
a sample returns float('nan') for it. REWARD_SCALE[name] is what to divide by to get a 0-1 training reward.

  geneval    a colour/shape detector on pixels, then reward-server's score: mean over clause terms; each
             include clause adds 1 - |count - found|/count (clamped at 0), a colour term
             1 - |count - n_colour_match|/count, and a position term 1/0 (GenEval's relative_position on
             boxes, threshold 0.1), the last two only when the count is exact (else 0). Scale [0, 1].
             geneval_details(images, metadata) -> (score, strict): strict = every count exact, every colour and
             position right, no excluded class found (GenEval's strict accuracy).
             Detector: every pixel is modelled as a blend of the background and one palette colour; it belongs
             to the colour whose blend line it is nearest (within 50 RGB) once that colour covers >= 1/2 of it
             (colour_cover), which puts a blurred edge where the edge is; 8-connected components of >= 12 px
             are objects; the shape is the ideal circle, square or upward triangle with the component's
             centroid and second moments (blurred by 0, 0.4 or 0.8 px) whose soft IoU with the component's
             coverage map is highest (shape_scores, classify_shape).
             Calibration (python eval.py --calibrate 60, on checkpoints/base): ground truth rendered by
             toy_world and passed through the world's autoencoder, what a perfect generator could draw, scores
             1.00 on five sub-tasks and 0.98 on counting (four shapes in 32 px strain the autoencoder), and
             +-2/255 uniform pixel noise changes 0.0% of those rewards; on the base's own samples it changes
             1.7% of geneval rewards (0-3.9% per sub-task). The first detector (nearest colour within 60
             RGB, shape by bounding-box fill: > 0.9 square, > 0.625 circle) scored 0.72-1.00 per sub-task on
             ground truth (position 0.72, counting 0.77) and flipped 0-4.4% of its rewards, 4.7% on samples:
             the autoencoder's edges fall outside the colour tolerance, its triangles fill 0.63-0.68 of
             their box and its squares 0.84-0.90, so shapes straddled the thresholds. Shape margins (best soft IoU
             minus the runner-up's) on every world shape: >= 0.10 sharp, >= 0.05 through the autoencoder.
  ocr        ocr.recognise (a template-matching recogniser, see ocr.py), then Flow-GRPO's formula:
             target = quoted text, lower-cased, spaces removed; dist = 0 if target in recognised else
             Levenshtein; reward = 1 - min(dist, len(target))/len(target). Scale [0, 1].
  pickscore  a documented formula, NOT a learned model: scene fidelity (median sky/ground colour vs the
             scene's colours), vividness (colour distance from grey relative to the scene's) and a disc term
             (a compact blob of the sun/moon colour in the sky). Scale [0, 1]. A tiny CLIP trained on the toy
             world would be closer to the paper (and hackable like PickScore is); the formula is a deliberate,
             transparent stand-in whose optimum is exactly "the vivid, complete scene of the prompt".
             The scene is the longest toy_world.SCENES name in the prompt (8 named, 61 composed scenes).
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
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from world.ocr import recognise  # the text recogniser, a PP-OCR stand-in
from world.toy_world import BACKGROUND, OCR_CHARS, PALETTE, SCENES, SHAPES  # world constants only, no renderer

GREY = 0.5  # the colour a washed-out image drifts to (pickscore, deqa)


# ------------------------------------------------------------------------------------------- geneval
COLOUR_NAMES = list(PALETTE)
_BG = torch.tensor(BACKGROUND, dtype=torch.float32)                                              # (3,)
_DIR = torch.tensor([PALETTE[c] for c in COLOUR_NAMES], dtype=torch.float32) - _BG               # (K, 3)
COLOUR_TOL = 50.0      # RGB distance (0-255) of a pixel from its colour's blend line with the background
MIN_COVER = 0.5        # a pixel at least half covered by a colour belongs to it: the shape's edge, whatever the blur
MIN_AREA = 12          # components smaller than this are specks (the world's smallest object covers ~30 pixels)
EDGE_BLURS = (0.0, 0.4, 0.8)   # px: Gaussian blurs tried on the templates (the world's autoencoder: ~0.5)
SHAPE_PAD, SUPERSAMPLE = 3, 4   # template window around a component's box; sub-pixels per pixel side
POSITION_THRESHOLD = 0.1  # GenEval's: offsets are reduced by 0.1 * (sum of box sizes) before the direction test


class Detection(NamedTuple):
    shape: str
    colour: str
    box: tuple   # (x0, y0, x1, y1), exclusive ends, pixels
    area: int


def colour_cover(images):
    """Blend model of every pixel: p = BACKGROUND + a_k (PALETTE[k] - BACKGROUND) + residual.
    images (B, 3, H, W) in [0, 1] -> (label (B, H, W) int: the colour k with the smallest residual among
    those with a_k >= MIN_COVER, len(COLOUR_NAMES) = background; cover (B, H, W, K) a_k clamped to [0, 1]).
    Why a blend line and not the nearest colour: an edge pixel is a mix of the shape's colour and the
    background, so it lies on that line; thresholding the coverage at 1/2 puts the edge where it is."""
    B, _, H, W = images.shape
    p = images.permute(0, 2, 3, 1).reshape(B, H * W, 1, 3) * 255.0 - _BG                # (B, HW, 1, 3)
    a = (p * _DIR).sum(-1) / (_DIR * _DIR).sum(-1)                                     # (B, HW, K)
    residual = (p - a.clamp(0, 1)[..., None] * _DIR).norm(dim=-1)                     # (B, HW, K)
    residual = residual.masked_fill(a < MIN_COVER, float("inf"))
    best, label = residual.min(-1)                                                    # (B, HW)
    label[best > COLOUR_TOL] = len(COLOUR_NAMES)
    return label.reshape(B, H, W).numpy(), a.clamp(0, 1).reshape(B, H, W, -1).numpy()


def shape_templates(mx, my, vx, vy, X, Y):
    """Ideal circle, square and upward triangle with centroid (mx, my) and variances (vx, vy), as 0/1 masks
    on the point grid (X, Y) -> (3, *X.shape). Second moments: circle r^2/4, square side^2/12, triangle
    base^2/24 across and height^2/18 down, its centroid a third of the height above the base."""
    rx, ry = 2 * np.sqrt(vx), 2 * np.sqrt(vy)
    circle = ((X - mx) / rx) ** 2 + ((Y - my) / ry) ** 2 <= 1
    square = (np.abs(X - mx) <= np.sqrt(3 * vx)) & (np.abs(Y - my) <= np.sqrt(3 * vy))
    base, height = np.sqrt(24 * vx), np.sqrt(18 * vy)
    top = my - 2 * height / 3
    triangle = (Y >= top) & (Y <= top + height) & (np.abs(X - mx) <= base / 2 * (Y - top) / height)
    return np.stack([circle, square, triangle]).astype(np.float32)


def shape_scores(cover):
    """Soft IoU of one component's coverage map (h, w) with each ideal shape of SHAPES fitted to its
    moments and blurred, best over the blurs of EDGE_BLURS -> (3,). A blur's variance is taken off the
    map's before fitting (blurring adds its variance)."""
    h, w = cover.shape
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    rows, cols, mass = cover.sum(1), cover.sum(0), cover.sum()
    my, mx = rows @ ys / mass, cols @ xs / mass
    Y, X = np.meshgrid((np.arange(h * SUPERSAMPLE) + 0.5) / SUPERSAMPLE,
                       (np.arange(w * SUPERSAMPLE) + 0.5) / SUPERSAMPLE, indexing="ij")
    best = np.zeros(len(SHAPES))
    for blur in EDGE_BLURS:
        vy = max(rows @ (ys - my) ** 2 / mass - blur ** 2, 0.5)
        vx = max(cols @ (xs - mx) ** 2 / mass - blur ** 2, 0.5)
        T = shape_templates(mx, my, vx, vy, X, Y).reshape(3, h, SUPERSAMPLE, w, SUPERSAMPLE).mean((2, 4))
        if blur:
            T = ndimage.gaussian_filter(T, (0, blur, blur), mode="constant")              # (3, h, w)
        best = np.maximum(best, np.minimum(cover, T).sum((1, 2)) / np.maximum(cover, T).sum((1, 2)))
    return best


def classify_shape(cover):
    """(shape, margin): the best-fitting ideal shape and its soft IoU minus the runner-up's."""
    iou = shape_scores(cover)
    second, first = np.sort(iou)[-2:]
    return SHAPES[int(iou.argmax())], float(first - second)


def _components(label, cover):
    """(colour index, box slices, area, coverage window) of every component of one image's label map."""
    H, W = label.shape
    K, p = len(COLOUR_NAMES), SHAPE_PAD
    for k in np.unique(label[label < K]):
        lab, _ = ndimage.label(label == k, structure=np.ones((3, 3), bool))           # 8-connected
        for i, (ys, xs) in enumerate(ndimage.find_objects(lab), start=1):
            win = np.s_[max(ys.start - p, 0):ys.stop + p, max(xs.start - p, 0):xs.stop + p]
            own = lab[win] == i
            area = int(own.sum())
            if area < MIN_AREA:
                continue
            # its coverage: own pixels and the 1-px rim of blended edge pixels not claimed by another object
            rim = ndimage.binary_dilation(own) & ((label[win] == k) | (label[win] == K))
            c = np.where(own | rim, cover[win + (k,)], 0.0)
            # pad to a full window at the image border so the fitted templates have room
            c = np.pad(c, ((p - (ys.start - win[0].start), max(ys.stop + p - H, 0)),
                           (p - (xs.start - win[1].start), max(xs.stop + p - W, 0))))
            yield k, (ys, xs), area, c


def detect(images):
    """Objects per image: list (B) of list[Detection], from pixels only."""
    labels, cover = colour_cover(images)
    out = []
    for label, cov in zip(labels, cover):
        found = []
        for k, (ys, xs), area, c in _components(label, cov):
            shape, _ = classify_shape(c)
            found.append(Detection(shape, COLOUR_NAMES[k], (xs.start, ys.start, xs.stop, ys.stop), area))
        out.append(found)
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


def combined_reward(images, records, weights, rewards=REWARDS):
    """Weighted sum of registry rewards, each on 0-1 (raw deqa divided by 5): sum_k w_k r_k / scale_k.
    `weights` maps a reward name, or "task" for each record's own task reward, to its weight; `rewards` is
    the registry (the world's, or reward_backends.make_rewards for real images)."""
    prompts, meta = [r["prompt"] for r in records], [r["metadata"] for r in records]
    total = torch.zeros(len(records))
    for name, w in weights.items():
        if name == "task":
            for task in {r["task"] for r in records}:
                idx = [i for i, r in enumerate(records) if r["task"] == task]
                total[idx] += w * rewards[task](images[idx], [prompts[i] for i in idx], [meta[i] for i in idx])
        else:
            total += w * rewards[name](images, prompts, meta) / REWARD_SCALE[name]
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
    from world import toy_world as tw
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
    from world import toy_world as tw   # the self-check renders test images; the rewards themselves never call it
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    recognise(torch.zeros(1, 3, 32, 32))  # build the recogniser's templates outside the timings
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
