"""
The miniature world's pixel judges behind rewards.py's geneval and pickscore: a colour and shape detector (the
stand-in for GenEval's Mask2Former detector) and the scene formula behind "pickscore". rewards.py applies the paper's scoring rules to what these functions measure; a reader of the paper
can skip this file.

GenEval detector: every pixel is modelled as a blend of the background and one palette colour; it belongs to
the colour whose blend line it is nearest (within 50 RGB) once that colour covers >= 1/2 of it (colour_cover),
which puts a blurred edge where the edge is; 8-connected components of >= 12 px are objects; the shape is the
ideal circle, square or upward triangle, as wide as it is tall like the world's, with the component's centroid
and total second moment (blurred by 0, 0.4 or 0.8 px) whose soft IoU with the component's coverage map is
highest (shape_scores, classify_shape), and no shape at all when even that IoU is below MIN_IOU = 0.72.
Why an absolute bar: a nearest-shape rule names every blob (a 3:1 ellipse or bar drawn for a circle or
square scored 0.93, strict 0.79; a 3 px line was a square, a frame a full-image square), and with the two axes
fitted apart an ellipse *is* a circle. Best IoU on world shapes (sizes 8-12, every colour): >= 0.87 sharp,
>= 0.78 through the autoencoder; 2:1 ellipses, bars and a downward triangle 0.63-0.68, 3:1 ones 0.51-0.56,
lines, rings and frames <= 0.59. Margins over the runner-up shape: >= 0.10 sharp, >= 0.023 autoencoded.

The defects behind "deqa" are world/quality.py's.

Calibration (python -m tools.calibrate_world --n 300, on checkpoints/base): ground truth through the world's
autoencoder (what a perfect generator could draw) against the target >= 0.97 per sub-task, and the share of
rewards that +-2/255 pixel noise changes (< 1%); the numbers are in results/calibration.json (README
"Calibration"). README "The miniature world" has the first detector's history.

Self-check: OMP_NUM_THREADS=1 python rewards.py (scores rendered test images with every reward).
"""
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from world.toy_world import BACKGROUND, PALETTE, SCENES, SHAPES  # world constants only, no renderer

GREY = 0.5  # the colour a washed-out image drifts to


# ------------------------------------------------------------------------------------------- geneval
COLOUR_NAMES = list(PALETTE)
_BG = torch.tensor(BACKGROUND, dtype=torch.float32)                                              # (3,)
_DIR = torch.tensor([PALETTE[c] for c in COLOUR_NAMES], dtype=torch.float32) - _BG               # (K, 3)
COLOUR_TOL = 50.0      # RGB distance (0-255) of a pixel from its colour's blend line with the background
MIN_COVER = 0.5        # a pixel at least half covered by a colour belongs to it: the shape's edge, whatever the blur
MIN_AREA = 12          # components smaller than this are specks (the world's smallest object covers ~30 pixels)
EDGE_BLURS = (0.0, 0.4, 0.8)   # px: Gaussian blurs tried on the templates (the world's autoencoder: ~0.5)
MIN_IOU = 0.72         # a blob fitting no ideal shape this well is no shape (world shapes through the AE: >= 0.77)
SHAPE_PAD, SUPERSAMPLE = 3, 4   # template window around a component's box; sub-pixels per pixel side
POSITION_THRESHOLD = 0.1  # GenEval's: offsets are reduced by 0.1 * (sum of box sizes) before the direction test


class Detection(NamedTuple):
    shape: str | None   # None: a blob that fits no ideal shape (classify_shape)
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


def shape_templates(mx, my, v, X, Y):
    """Ideal circle, square and upward triangle, each as wide as it is tall (as the world draws them), with
    centroid (mx, my) and total second moment v = var_x + var_y, as 0/1 masks on the point grid (X, Y) ->
    (3, *X.shape). Second moments: circle r^2/4 per axis, square side^2/12 per axis, triangle side^2/24
    across and side^2/18 down (its centroid a third of the height above the base).
    Why one v and not var_x, var_y apart: with two variances a 3:1 ellipse is a perfect "circle" and a bar
    a perfect "square"; with the world's fixed aspect they fit badly and fall below MIN_IOU."""
    r = np.sqrt(2 * v)                                        # circle: v = r^2 / 2
    circle = (X - mx) ** 2 + (Y - my) ** 2 <= r ** 2
    half = np.sqrt(1.5 * v)                                   # square: v = side^2 / 6
    square = (np.abs(X - mx) <= half) & (np.abs(Y - my) <= half)
    side = np.sqrt(v * 72 / 7)                                # triangle: v = side^2 (1/24 + 1/18)
    top = my - 2 * side / 3
    triangle = (Y >= top) & (Y <= top + side) & (np.abs(X - mx) <= side / 2 * (Y - top) / side)
    return np.stack([circle, square, triangle]).astype(np.float32)


def shape_scores(cover):
    """Soft IoU of one component's coverage map (h, w) with each ideal shape of SHAPES fitted to its
    centroid and total second moment and blurred, best over the blurs of EDGE_BLURS -> (3,). A blur's
    variance is taken off the map's before fitting (blurring adds its variance on each axis)."""
    h, w = cover.shape
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    rows, cols, mass = cover.sum(1), cover.sum(0), cover.sum()
    my, mx = rows @ ys / mass, cols @ xs / mass
    total = rows @ (ys - my) ** 2 / mass + cols @ (xs - mx) ** 2 / mass
    Y, X = np.meshgrid((np.arange(h * SUPERSAMPLE) + 0.5) / SUPERSAMPLE,
                       (np.arange(w * SUPERSAMPLE) + 0.5) / SUPERSAMPLE, indexing="ij")
    best = np.zeros(len(SHAPES))
    for blur in EDGE_BLURS:
        v = max(total - 2 * blur ** 2, 1.0)
        T = shape_templates(mx, my, v, X, Y).reshape(3, h, SUPERSAMPLE, w, SUPERSAMPLE).mean((2, 4))
        if blur:
            T = ndimage.gaussian_filter(T, (0, blur, blur), mode="constant")              # (3, h, w)
        best = np.maximum(best, np.minimum(cover, T).sum((1, 2)) / np.maximum(cover, T).sum((1, 2)))
    return best


def classify_shape(cover):
    """(shape, margin): the best-fitting ideal shape and its soft IoU minus the runner-up's; shape is None
    when even the best fit is below MIN_IOU (a bar, a line, a ring, a frame, an elongated ellipse)."""
    iou = shape_scores(cover)
    second, first = np.sort(iou)[-2:]
    return (SHAPES[int(iou.argmax())] if first >= MIN_IOU else None), float(first - second)


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


# ----------------------------------------------------------------------------------------- pickscore
DISC_AREA = 20.0   # ink-free pixels of disc colour that count as a full sun/moon (the world draws r = 3-5)


def scene_of(prompt, meta):
    """The SCENES key named in the prompt (longest match), else metadata["scene"], else None."""
    named = [s for s in SCENES if s in prompt]
    return max(named, key=len) if named else meta.get("scene")


def _regions(img, horizon):
    """Median sky and ground colours (3,) of an image (3, H, W), leaving out a band around the horizon row."""
    H = img.shape[1]
    top, bottom = img[:, :int((horizon - 0.08) * H)], img[:, int((horizon + 0.08) * H) + 1:]    # (3, h, W)
    return top, top.flatten(1).median(1).values, bottom.flatten(1).median(1).values


def _vividness(m_sky, m_ground, sky, ground):
    """How far from grey the sky and ground are, relative to how far the scene's colours are (mean of two,
    each capped at 1); the world renders quality q at 0.35 + 0.65 q."""
    return float(np.mean([min(1.0, float((m - GREY).norm() / (c - GREY).norm())) for m, c in
                          ((m_sky, sky), (m_ground, ground))]))


def vividness(img, scene):
    """_vividness of one image (3, H, W) in [0, 1] for a SCENES name."""
    sky, ground, horizon, _ = SCENES[scene]
    _, m_sky, m_ground = _regions(img, horizon)
    return _vividness(m_sky, m_ground, torch.tensor(sky) / 255, torch.tensor(ground) / 255)


def pickscore_one(img, scene):
    """Score of one image (3, H, W) in [0, 1] for a scene name (or None: vividness only)."""
    if scene is None:   # no scene to be faithful to: mean distance from grey, 0.3 = a vivid image
        return float(((img - GREY).norm(dim=0).mean() / 0.3).clamp(0, 1))
    sky, ground, horizon, disc = (torch.tensor(c, dtype=torch.float32) / 255 if isinstance(c, tuple) else c
                                  for c in SCENES[scene])
    top, m_sky, m_ground = _regions(img, horizon)
    # fidelity: 1 at the scene's colour, 0 at RGB distance >= 0.5 (about the washed-out q = 0 rendering)
    fidelity = [float((1 - (m - c).norm() / 0.5).clamp(0, 1)) for m, c in ((m_sky, sky), (m_ground, ground))]
    vivid = _vividness(m_sky, m_ground, sky, ground)
    terms, weights = fidelity + [vivid], [0.3, 0.3, 0.2]
    if disc is not None:   # largest 4-connected blob near the disc colour (and unlike the sky) in the sky
        near = ((top - disc[:, None, None]).norm(dim=0) < 0.25) & ((top - m_sky[:, None, None]).norm(dim=0) > 0.1)
        labels, n = ndimage.label(near.numpy())
        blob = np.bincount(labels.ravel())[1:].max() if n else 0
        terms.append(min(1.0, blob / DISC_AREA))
        weights.append(0.2)
    return float(np.dot(terms, weights) / sum(weights))
