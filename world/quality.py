"""
The miniature world's image-quality judge behind rewards.py's "deqa" (the stand-in for DeQA-Score, Flow-OPD §4):
the defects it charges, each measured on pixels, (deqa_terms): noise, blur, blockiness, and a pattern rule for
what the world never draws (pattern_term). A reader of the paper can skip this file.

A 1 px checkerboard and a black/white half split scored 5.00 before the pattern rule, above ground truth
(4.90-4.98). An image with no edge a person sees (edge_contrast below FAINT_EDGE) counts as fully blurred, as a
flat one always did: through the world's autoencoder a black, grey or white image, or a texture too fine or too
faint for it, comes out flat with a ripple the blur ratio read as sharp, and scored 4.93-5.00 (rewards version
4). It also charges the dimmest night scenes, which the autoencoder draws nearly blank (results/judges.json).
Departure from DeQA-Score: hand-written rules on 32x32 images, not a learned model (rewards.py lists the rest).
"""
import torch
import torch.nn.functional as F

K_NOISE, K_BLUR, K_BLOCK = 25.0, 4.0, 1.0   # points lost (of 5) per unit of each defect
BLUR_SHARP, BLUR_SOFT = 0.5, 0.9            # re-blur energy ratio of a sharp edge (~0.38-0.5) / a soft one
BLOCK = 4                                   # block size of the blockiness measure (JPEG's 8 is too big at 32x32)
K_PATTERN = 4.0      # points lost by a full pattern: as much as a full blur, so a pattern scores the floor (1)
EDGE_STEP = 0.3      # a strong step between neighbouring pixels (largest channel difference, [0, 1] units)
TEXTURE_DENSITY = (0.22, 0.30)   # share of neighbour pairs that step strongly: world's most (text) .. a texture
SPAN = 0.9           # a straight edge across the image: >= 90% of a row's (column's) neighbour pairs step
HORIZON_CONTRAST = (1.55, 1.65)  # RGB distance of the two sides of a horizon: world's most (a snowy night,
                                 # 376/255 = 1.47) .. black against white (sqrt 3 = 1.73)
FAINT_EDGE = (0.030, 0.045)   # edge_contrast of an image drawing nothing (the autoencoder's ripple on a flat
                              # image: <= 0.025) .. of a visible edge (ground truth of shapes and text: >= 0.08)
EDGE_LENGTH = 16              # px: an edge as long as half the image is wide (a horizon, a shape's outline)
EDGE_MARGIN = 4               # px left out at the border, where the autoencoder draws a frame on a flat image


def _pad_unfold3(x):
    """(B, C, H, W) -> (B, C, H, W, 9) 3x3 neighbourhoods with replicated borders."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2)


def _grad_energy(x):
    """Mean squared horizontal + vertical finite differences per image, (B,)."""
    return (x.diff(dim=3) ** 2).mean((1, 2, 3)) + (x.diff(dim=2) ** 2).mean((1, 2, 3))


def _ramp(x, lo_hi):
    """0 at or below lo, 1 at or above hi, linear between."""
    lo, hi = lo_hi
    return ((x - lo) / (hi - lo)).clamp(0, 1)


def _runs(flags):
    """Number of runs of True along the last axis of a bool tensor (B, N) -> (B,)."""
    return flags[:, 0].long() + (flags[:, 1:] & ~flags[:, :-1]).sum(1)


def pattern_term(x):
    """How much of an image (B, 3, H, W) in [0, 1] is a pattern the world never draws, (B,) in [0, 1]: the
    largest of three rules, each 0 on the world's ground truth (sharp or through the autoencoder):
      texture   strong steps between neighbours on more pairs than any world image has (text is the
                densest, < 0.22): stripes, checkerboards, dithering, hatching, rings of 1-2 px;
      lines     a straight edge across the whole image other than one horizon (the world's only such
                edge is a horizontal horizon): a vertical split, wide stripes, a 4 px checkerboard;
      contrast  a horizon with more contrast than any world scene: a black-and-white half split."""
    dx, dy = x.diff(dim=3).abs().amax(1), x.diff(dim=2).abs().amax(1)         # (B, H, W-1), (B, H-1, W)
    strong_x, strong_y = dx > EDGE_STEP, dy > EDGE_STEP
    density = (strong_x.float().mean((1, 2)) + strong_y.float().mean((1, 2))) / 2
    cols, rows = strong_x.float().mean(1) >= SPAN, strong_y.float().mean(2) >= SPAN   # (B, W-1), (B, H-1)
    lines = (_runs(cols) + (_runs(rows) - 1).clamp(min=0)).clamp(max=1).float()
    contrast = torch.zeros(len(x))
    for i in rows.any(1).nonzero()[:, 0].tolist():       # the horizon: the row boundary that steps most
        r = int(strong_y[i].float().mean(1).argmax()) + 1
        above, below = x[i, :, :r].flatten(1).median(1).values, x[i, :, r:].flatten(1).median(1).values
        contrast[i] = (above - below).norm()
    return torch.stack([_ramp(density, TEXTURE_DENSITY), lines, _ramp(contrast, HORIZON_CONTRAST)]).amax(0)


def _reblur(x):
    """x (B, 3, H, W) blurred by the 3x3 kernel [1,2,1]^T [1,2,1] / 16, borders replicated."""
    k = torch.tensor([[1.0, 2.0, 1.0]]) / 4
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k.T @ k).expand(3, 1, 3, 3), groups=3)


def edge_contrast(x):
    """The contrast of an image's visible edges, (B,): the EDGE_LENGTH-th largest step between neighbouring
    pixels (largest channel) of the [1,2,1]-smoothed image, EDGE_MARGIN px from the border.
    Why smoothed, long and inside: the autoencoder draws a flat image with a 1-2 px ripple and a frame at the
    border, which are no edge a person sees; a single odd pixel is no edge either."""
    inner = _reblur(x)[:, :, EDGE_MARGIN:-EDGE_MARGIN, EDGE_MARGIN:-EDGE_MARGIN]
    steps = torch.cat([inner.diff(dim=3).abs().amax(1).flatten(1), inner.diff(dim=2).abs().amax(1).flatten(1)], 1)
    return steps.topk(EDGE_LENGTH, dim=1).values[:, -1]


def deqa_terms(images):
    """(noise, blur, blockiness, pattern) per image, each (B,): the four defects deqa_raw penalises."""
    x = images.float()
    # noise: median |x - median3x3(x)|; 0 on flat regions and clean edges, ~0.6 sigma for Gaussian noise
    noise = (x - _pad_unfold3(x).median(-1).values).abs().flatten(1).median(1).values
    # blur: share of gradient energy that survives a [1,2,1]/4 re-blur; a sharp step keeps ~0.38, a soft edge
    # ~1. A flat image has no edge to be sharp and counts as fully blurred, and so does one whose every edge is
    # fainter than a person sees (edge_contrast below FAINT_EDGE): the autoencoder draws a flat image with a
    # ripple the ratio reads as sharp (an empty image scored 4.97, above any ground truth; version 5).
    ratio = (_grad_energy(_reblur(x)) + 1e-6) / (_grad_energy(x) + 1e-6)
    flat = 1 - _ramp(edge_contrast(x), FAINT_EDGE)
    blur = torch.maximum(((ratio - BLUR_SHARP) / (BLUR_SOFT - BLUR_SHARP)).clamp(0, 1), flat)
    # blockiness: excess of gradient energy on block boundaries over inside blocks, in both directions
    # (min: one straight edge that happens to lie on a boundary, like a horizon, is not blockiness)
    def excess(d, dim):   # d: finite differences along `dim`; boundary = between index BLOCK-1 and BLOCK
        on = (torch.arange(d.shape[dim]) % BLOCK == BLOCK - 1)
        e = d ** 2
        e_on = e.index_select(dim, on.nonzero()[:, 0]).mean((1, 2, 3))
        e_in = e.index_select(dim, (~on).nonzero()[:, 0]).mean((1, 2, 3))
        return ((e_on - e_in) / (e_on + e_in + 1e-6)).clamp(0, 1)
    blockiness = torch.minimum(excess(x.diff(dim=3), 3), excess(x.diff(dim=2), 2))
    return noise, blur, blockiness, pattern_term(x)
