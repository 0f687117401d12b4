"""
Ground truth of the miniature world: render(record, rng) draws a record of world/toy_world.py as a 32x32
image, for pretraining and for the rewards' calibration (the rewards themselves never call it).

Web styles (why RL has headroom the base can reach). RL fine-tuning mostly moves a model towards the
reward-preferred part of what it already draws, and web data gives a base plenty to move away from. The
world's pretraining images come in styles their captions never mention and the rewards dislike
(random_style, render(..., web, blur), toy_world.WEB_STYLES): with probability WEB_SHARE the task's web
style (composition: one more object of a named shape in any colour; text: the sign turned a quarter;
scenes: washed out, q < 0.5), and independently with probability BLUR_SHARE a Gaussian blur (the
low-quality style deqa dislikes). Why these styles (full contrast, independent of the prompt, one direction
for every prompt) is measured in results/RESULTS.md; world/styles.py tells them apart in samples.
Self-check: python -m world.renderer   (split sizes, noisy captions, and toy_world_samples.png)
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from world.captions import corrupt_caption
from world.toy_world import (BACKGROUND, BLUR_RADIUS, BLUR_SHARE, IMAGE_SIZE, OCR_FONT_SIZES, PALETTE, SCENES,
                             TASKS, WEB_SHARE, prompts, vocabulary)


def _draw_shape(draw, shape, cx, cy, size, rgb):
    h = size / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=rgb)
    elif shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=rgb)
    else:  # upward triangle; the detector fits ideal shapes to each blob's moments to tell them apart
        draw.polygon([(cx, cy - h), (cx - h, cy + h - 1), (cx + h - 1, cy + h - 1)], fill=rgb)


def _free_spot(rng, placed, size, region=None):
    lo, hi = size / 2 + 1, IMAGE_SIZE - size / 2 - 1
    for _ in range(200):
        x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if region and not region(x, y):
            continue
        if all(max(abs(x - px), abs(y - py)) > (size + ps) / 2 + 2 for px, py, ps in placed):
            return x, y
    return None


def _relation_region(rel, ax, ay, size):
    """Where an object may stand to be `rel` of an anchor at (ax, ay) (image y grows downwards)."""
    gap = size + 2
    return {"left of": lambda x, y: x < ax - gap and abs(y - ay) < size,
            "right of": lambda x, y: x > ax + gap and abs(y - ay) < size,
            "above": lambda x, y: y < ay - gap and abs(x - ax) < size,
            "below": lambda x, y: y > ay + gap and abs(x - ax) < size}[rel]


def _render_geneval(meta, rng, web=False):
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    size = rng.choice((8, 9, 10)) if sum(c["count"] for c in meta["include"]) > 2 else rng.choice((9, 10, 11, 12))
    while True:
        placed, ok = [], True
        for clause in meta["include"]:
            region = None
            if "position" in clause:
                rel, idx = clause["position"]
                ax, ay, _ = placed[idx]
                region = _relation_region(rel, ax, ay, size)
            for _ in range(clause["count"]):
                spot = _free_spot(rng, placed, size, region)
                if spot is None:
                    ok = False
                    break
                placed.append((*spot, size))
            if not ok:
                break
        if ok:
            break
    k = 0
    for clause in meta["include"]:
        for _ in range(clause["count"]):
            color = clause.get("color") or rng.choice(list(PALETTE))
            x, y, s = placed[k]
            _draw_shape(draw, clause["class"], x, y, s, PALETTE[color])
            k += 1
    for extra in (size, size - 2, size - 4, 6) if web else ():
        # web style: one more object of a named shape, in any colour (a cluttered photo); smaller if need be
        spot = _free_spot(rng, placed, extra)
        if spot is not None:
            clause = meta["include"][rng.integers(len(meta["include"]))]
            _draw_shape(draw, clause["class"], *spot, extra, PALETTE[rng.choice(list(PALETTE))])
            break
    return img


def _render_ocr(meta, rng, web=False):
    paper = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), paper)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.choice(OCR_FONT_SIZES)))
    x0, y0, x1, y1 = draw.textbbox((0, 0), meta["text"], font=font)
    w, h = x1 - x0, y1 - y0
    x = (IMAGE_SIZE - w) / 2 - x0 + rng.integers(-2, 3) * (w < 26)
    y = (IMAGE_SIZE - h) / 2 - y0 + rng.integers(-4, 5)
    ink = tuple(int(v) for v in rng.integers(0, 40, size=3))
    draw.text((x, y), meta["text"], fill=ink, font=font)
    if web:   # web style: the sign photographed a quarter turn off (vertical text, either way round)
        img = img.transpose(Image.Transpose.ROTATE_90 if rng.uniform() < 0.5 else Image.Transpose.ROTATE_270)
    return img


def _render_pickscore(meta, rng, web=False):
    """A scene at a random quality q in [0, 1]: low q is washed out and loses its sun or moon.
    The preference reward prefers high q; pretraining sees every q, so the base sits in the middle."""
    sky, ground, horizon, disc = SCENES[meta["scene"]]
    q = rng.uniform(0, 0.5) if web else rng.uniform(0.5, 1)   # web style: the washed-out half
    grey = np.array([128, 128, 128])
    vivid = lambda c: tuple(int(v) for v in grey + (0.35 + 0.65 * q) * (np.array(c) - grey))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), vivid(sky))
    draw = ImageDraw.Draw(img)
    hy = int(IMAGE_SIZE * (horizon + rng.uniform(-0.05, 0.05)))
    draw.rectangle([0, hy, IMAGE_SIZE, IMAGE_SIZE], fill=vivid(ground))
    if disc is not None and rng.uniform() < q:
        r, cx, cy = rng.uniform(3, 5), rng.uniform(6, 26), rng.uniform(4, hy - 5)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=vivid(disc))
    return img


RENDERERS = {"geneval": _render_geneval, "ocr": _render_ocr, "pickscore": _render_pickscore}


def render(record, rng, web=False, blur=False):
    """Ground-truth image for a record as uint8 (IMAGE_SIZE, IMAGE_SIZE, 3); rng: np.random.Generator.
    web: the task's web style (WEB_STYLES); blur: the low-quality style (a Gaussian blur of BLUR_RADIUS px)."""
    img = RENDERERS[record["task"]](record["metadata"], rng, web)
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    return np.asarray(img, dtype=np.uint8)


def random_style(rng):
    """(web, blur) of one pretraining image: independent draws with WEB_SHARE and BLUR_SHARE."""
    return bool(rng.uniform() < WEB_SHARE), bool(rng.uniform() < BLUR_SHARE)


def to_tensor(images):
    """list of uint8 HWC arrays -> float tensor (B, 3, H, W) in [0, 1]."""
    import torch
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


if __name__ == "__main__":
    for task in TASKS:
        print(task, {s: len(prompts(task, s)) for s in ("train", "test")})
    rng = np.random.default_rng(0)
    recs = [r for t in TASKS for r in prompts(t, "test")[:8]]
    tiles = [render(r, rng) for r in recs]
    grid = np.concatenate([np.concatenate(tiles[i * 8:(i + 1) * 8], axis=1) for i in range(3)], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save("toy_world_samples.png")
    for r in recs[::4]:
        print(r["prompt"], "| noisy:", corrupt_caption(r, rng))
    print("vocabulary size", len(vocabulary()))
