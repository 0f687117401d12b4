"""
Detectors of the miniature world's "web" styles (toy_world.WEB_STYLES, BLUR_SHARE): which samples a model draws
in the styles its captions never mention and its rewards dislike. A diagnostic of the world (does a recipe
have headroom it can learn?), never a reward: the rewards judge the prompt, these judge the style.

    web       geneval: more objects than the prompt names (the clutter style);
              ocr: the ink's box is tall where the text drawn upright is wide, or wide where it is tall
                   (a quarter turn, whatever the text reads; too square a box counts as upright);
              pickscore: washed out, vividness (world/judges.py) below the renderer's q = 0.5 level (0.675)
    blurred   the deqa blur term (world/quality.deqa_terms) above BLURRED (ground truth: sharp ~0, blurred 0.4-0.9)
              (an image without a visible edge counts as blurred, as deqa counts it)

Each returns (B,) float 0/1 for images (B, 3, H, W) in [0, 1] of one task's records; ground truth in each style
is told from clean ground truth in tests/test_toy_world.py.
"""
import functools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from world.judges import detect, scene_of, vividness
from world.quality import deqa_terms
from world.ocr import ink_extent

BLURRED = 0.3          # deqa blur term above which an image counts as blurred
WASHED_OUT = 0.675     # vividness of the renderer's q = 0.5, the border of the washed-out half
MIN_LOG_ASPECT = 0.15  # |log(width / height)| of the ink below this: too square to tell the text's direction


@functools.lru_cache(maxsize=None)
def _upright_aspect(text):
    """Width / height (+1 px each, as for samples) of the text's ink drawn upright in the world's middle font size."""
    img = Image.new("L", (64, 32), 255)
    ImageDraw.Draw(img).text((2, 2), text, fill=0, font=ImageFont.load_default(size=13))
    ys, xs = np.nonzero(np.asarray(img) < 128)
    return (xs.max() - xs.min() + 2) / (ys.max() - ys.min() + 2)


def web_style(task, images, records):
    """(B,) 1.0 where a sample of `task` is in the task's web style, else 0.0."""
    meta = [r["metadata"] for r in records]
    if task == "geneval":
        named = [sum(c["count"] for c in m["include"]) for m in meta]
        return torch.tensor([float(len(objs) > n) for objs, n in zip(detect(images), named)])
    if task == "ocr":   # turned: the ink's aspect is on the other side of 1 from the text's upright aspect
        extent = ink_extent(images) + 1                                                      # (B, 2) h, w
        drawn = np.log(extent[:, 1] / extent[:, 0])                                          # log(w / h), (B,)
        upright = np.log(np.array([_upright_aspect(m["text"]) for m in meta]))
        return torch.tensor((np.abs(drawn) > MIN_LOG_ASPECT) & (np.sign(drawn) != np.sign(upright))).float()
    if task == "pickscore":
        return torch.tensor([float(vividness(img, scene_of(r["prompt"], m)) < WASHED_OUT)
                             for img, r, m in zip(images, records, meta)])
    raise ValueError(f"no web style for task {task!r}; the world's tasks are geneval, ocr, pickscore")


def blurred(images):
    """(B,) 1.0 where the deqa blur term is above BLURRED."""
    return (deqa_terms(images)[1] > BLURRED).float()
