"""
The miniature world: 32x32 RGB images, prompts and ground-truth renderings in which the whole
Flow-OPD pipeline (base -> single-reward teachers -> cold start -> on-policy distillation) runs on a CPU.

It mirrors the paper's four rewards (Flow-OPD §4, "Data"; Flow-GRPO splits):
  geneval    composition: 1-4 shapes with colours, counts and relations, GenEval's six sub-tasks and
             GenEval's metadata schema {"tag", "include": [{"class", "count", "color", "position"}], "exclude"}
  ocr        text rendering: `a sign that says "K7"`, 1-3 characters from A-Z and 0-9
  pickscore  preference: scene prompts ("a sunset over the sea") that admit better and worse renderings
  deqa       quality: task-agnostic, no prompts of its own (its teacher trains on all prompts)

Every prompt is a record {"prompt": str, "task": str, "metadata": dict}. Splits are derived from a fixed
seed and never change between runs. `render(record, rng)` draws a ground-truth image for pretraining; the
rewards (rewards.py) judge pixels only and never look at the renderer.

Caption noise (why the base leaves room for RL). Real base models miss GenEval and OCR partly because web
captions are imprecise. Pretraining captions here are corrupted the same way with probability
`caption_noise` (default 0.3, see `corrupt_caption`): a wrong count, a swapped relation, a dropped colour or
shape word, one misspelt character of the quoted text, or the wrong scene name. The image is always drawn
from the true record, so the base learns a blurred conditional that more pretraining cannot sharpen but a
pixel reward can.

Web styles (why RL has headroom the base can reach). Real RL fine-tuning mostly moves a model towards the
reward-preferred part of what it already draws, and web data gives a base plenty to move away from. The world's
pretraining images come in styles their captions never mention and the rewards dislike (`random_style`,
`render(..., web, blur)`, WEB_STYLES): with probability WEB_SHARE the task's web style (composition: one more
object of a named shape in any colour; text: the sign turned a quarter; scenes: washed out, q < 0.5), and
independently with probability BLUR_SHARE a Gaussian blur (the low-quality style deqa dislikes). They are
chosen to survive classifier-free guidance and to be learnable by a policy gradient: full contrast (guidance
amplifies contrast and erased a faded-colour style in an earlier trial), independent of the prompt (then
p(style | c) = p(style) and guidance keeps the style's share), and one direction for every prompt (as the
brightness control, so per-prompt signals add up instead of cancelling). world/styles.py tells them apart in
samples (a diagnostic).

Prompt mix (random_record, used by pretraining): a task uniformly, then for geneval one of GenEval's six
sub-tasks uniformly (toy_world.stratum), then a prompt of it. Uniform over prompts instead, 85% of geneval
draws would be color_attr (360 of its 426 train prompts) and 0.7% single_object (3 of 426).

Scenes: the eight NAMED_SCENES of the first world (24 train and 8 test prompts, split as they were) and 61
COMPOSED_SCENES, "<ground> <sky>" from 8 grounds x 8 skies in the same colours and words ("mountains at
sunset", "a lake under a full moon"); half of the composed scenes are held out whole (their names appear in
no train prompt), giving 148 train and 128 test pickscore prompts, enough to see a 0.03 difference.

Differences from the paper: 1) the GenEval training ratio here is uniform over sub-tasks (the paper's
Position:Counting:Attribute:Colors:Two:Single = 7:5:3:1:1:0 targets a real detector's weak spots);
2) sub-tasks with only a handful of distinct prompts (single_object, two_object, counting, position) share
their prompts between train and test; test images differ by seed, so these rows measure sampling, not
prompt generalisation. The larger sets (colors, color_attr, ocr, pickscore) are split disjointly.

Self-check: python -m world.toy_world   (writes toy_world_samples.png)
"""
import itertools
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 32
PALETTE = {  # colour name -> RGB, GenEval's colour names; far apart so pixels classify unambiguously
    "red": (220, 30, 30), "orange": (250, 140, 0), "yellow": (245, 225, 20), "green": (30, 170, 50),
    "blue": (30, 70, 230), "purple": (150, 40, 200), "white": (250, 250, 250), "black": (15, 15, 15),
}
BACKGROUND = (128, 128, 128)  # plain grey background of composition scenes, not a palette colour
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("geneval", "ocr", "pickscore")          # tasks with prompts; "deqa" is task-agnostic
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
OCR_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
OCR_TEMPLATES = ('a sign that says "{}"', 'a poster with the text "{}"', 'a board reading "{}"')
OCR_FONT_SIZES = (12, 13, 14)  # PIL's built-in font; rewards.py reads it at 10-16 px
# Scenes: sky colour, ground colour, horizon row (fraction of height), disc (sun/moon) colour or None.
# The eight named scenes of the first world (their 32 records keep their train/test split) ...
NAMED_SCENES = {
    "a sunset over the sea": ((250, 120, 40), (20, 60, 140), 0.55, (255, 220, 60)),
    "a snowy night": ((10, 20, 60), (235, 240, 250), 0.65, (240, 240, 220)),
    "a green field under a blue sky": ((90, 160, 250), (40, 150, 40), 0.6, (255, 240, 120)),
    "a desert at noon": ((140, 200, 255), (230, 190, 110), 0.55, (255, 255, 200)),
    "a night sky with a full moon": ((15, 15, 50), (30, 40, 30), 0.8, (245, 245, 230)),
    "a forest at dawn": ((250, 180, 150), (20, 90, 40), 0.5, (255, 200, 120)),
    "a red sky over mountains": ((200, 40, 40), (80, 60, 60), 0.6, None),
    "a purple evening over a lake": ((120, 60, 170), (40, 60, 120), 0.6, (250, 200, 220)),
}
# ... and scenes composed from parts, "<ground> <sky>" ("mountains at sunset"), in the same colours and only
# with words the named scenes use (so the committed tokenizer knows every word): ground -> (colour, horizon),
# sky -> (colour, disc). Composed scenes that repeat a named one are left out.
SCENE_GROUNDS = {
    "the sea": ((20, 60, 140), 0.55), "a lake": ((40, 60, 120), 0.6), "a desert": ((230, 190, 110), 0.55),
    "a green field": ((40, 150, 40), 0.6), "a yellow field": ((220, 200, 60), 0.6), "a forest": ((20, 90, 40), 0.5),
    "mountains": ((80, 60, 60), 0.6), "a snowy field": ((235, 240, 250), 0.65),
}
SCENE_SKIES = {
    "at dawn": ((250, 180, 150), (255, 200, 120)), "at noon": ((140, 200, 255), (255, 255, 200)),
    "at sunset": ((250, 120, 40), (255, 220, 60)), "at night": ((10, 20, 60), (240, 240, 220)),
    "under a blue sky": ((90, 160, 250), (255, 240, 120)), "under a red sky": ((200, 40, 40), None),
    "under a purple sky": ((120, 60, 170), (250, 200, 220)), "under a full moon": ((15, 15, 50), (245, 245, 230)),
}
COMPOSED_SCENES = {f"{g} {k}": (sky, ground, horizon, disc)
                   for (g, (ground, horizon)), (k, (sky, disc)) in itertools.product(SCENE_GROUNDS.items(), SCENE_SKIES.items())
                   if f"{g} {k}" not in NAMED_SCENES}
SCENES = {**NAMED_SCENES, **COMPOSED_SCENES}   # every scene a pickscore prompt may name (rewards.py looks them up)
SCENE_STYLES = ("", "a photo of ", "a painting of ", "a picture of ")
SPLIT_SEED = 1234
# The world's "web" data: styles no caption mentions, that the rewards dislike (README "The miniature world")
WEB_SHARE = 0.5     # share of pretraining images drawn in their task's web style
BLUR_SHARE = 0.5    # share of pretraining images blurred (any task), the low-quality style deqa dislikes
BLUR_RADIUS = 1.2   # px, PIL's Gaussian blur
WEB_STYLES = {
    "geneval": "one more object of a named shape, in any colour (a cluttered photo)",
    "ocr": "the sign turned a quarter, vertical text either way round",
    "pickscore": "washed out: quality q in [0, 0.5) instead of [0.5, 1]",
}


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(color, shape, count=1):
    """Noun phrase for `count` objects: 'a red circle', 'three squares'."""
    noun = shape if count == 1 else shape + "s"
    words = ([color] if color else []) + [noun]
    head = _article(words[0]) if count == 1 else NUMBERS[count]
    return " ".join([head] + words)


def include_clause(shape, count=1, color=None, position=None):
    """One GenEval include clause; optional keys are left out, as GenEval's metadata does."""
    c = {"class": shape, "count": count}
    if color:
        c["color"] = color
    if position:
        c["position"] = position
    return c


def _geneval_records():
    """All composition prompts, by GenEval sub-task, with GenEval metadata."""
    out = []

    def add(tag, prompt, include):
        out.append({"prompt": prompt, "task": "geneval",
                    "metadata": {"tag": tag, "include": include, "exclude": [], "prompt": prompt}})
    for s in SHAPES:
        add("single_object", f"a photo of {noun_phrase(None, s)}", [include_clause(s)])
    for a, b in itertools.permutations(SHAPES, 2):
        add("two_object", f"a photo of {noun_phrase(None, a)} and {noun_phrase(None, b)}", [include_clause(a), include_clause(b)])
    for s, n in itertools.product(SHAPES, (2, 3, 4)):
        add("counting", f"a photo of {noun_phrase(None, s, n)}", [include_clause(s, n)])
    for s, c in itertools.product(SHAPES, PALETTE):
        add("colors", f"a photo of {noun_phrase(c, s)}", [include_clause(s, 1, c)])
    for (a, b), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        # GenEval: "A right of B" -> include [B, A with position (rel, 0)]
        add("position", f"a photo of {noun_phrase(None, a)} {rel} {noun_phrase(None, b)}",
            [include_clause(b), include_clause(a, position=[rel, 0])])
    for (a, b) in itertools.permutations(SHAPES, 2):
        for ca, cb in itertools.product(PALETTE, PALETTE):
            add("color_attr", f"a photo of {noun_phrase(ca, a)} and {noun_phrase(cb, b)}",
                [include_clause(a, 1, ca), include_clause(b, 1, cb)])
    return out


def _ocr_records(rng):
    texts = set()
    while len(texts) < 3000:  # a fixed sample of the 48k possible strings keeps splits cheap and stable
        n = rng.choice((1, 2, 3))
        texts.add("".join(rng.choice(OCR_CHARS) for _ in range(n)))
    return [{"prompt": rng.choice(OCR_TEMPLATES).format(t), "task": "ocr", "metadata": {"text": t}}
            for t in sorted(texts)]


def _pickscore_records(scenes):
    return [{"prompt": style + scene, "task": "pickscore", "metadata": {"scene": scene}}
            for scene in scenes for style in SCENE_STYLES]


def _split_scenes(scenes, test_frac):
    """(train, test) records of composed scenes, held out whole: a test scene's name is in no train prompt,
    only its parts are. A separate seeded stream, so the named scenes' split stays as it was."""
    names = sorted(scenes)
    random.Random(SPLIT_SEED + 1).shuffle(names)
    n_test = int(round(len(names) * test_frac))
    return _pickscore_records(names[n_test:]), _pickscore_records(names[:n_test])


def _split(records, rng, test_frac, shared_below, max_test=10**9):
    if len(records) < shared_below:
        return records, records
    records = list(records)
    rng.shuffle(records)
    n_test = min(max_test, max(1, int(round(len(records) * test_frac))))
    return records[n_test:], records[:n_test]


def build_splits():
    """{task: {"train": [...], "test": [...]}}, deterministic in SPLIT_SEED."""
    rng = random.Random(SPLIT_SEED)
    splits = {"geneval": {"train": [], "test": []}}
    gen = _geneval_records()
    for tag in GENEVAL_TAGS:
        recs = [r for r in gen if r["metadata"]["tag"] == tag]
        train, test = _split(recs, rng, 0.2, shared_below=30, max_test=24)  # balanced test tags
        splits["geneval"]["train"] += train
        splits["geneval"]["test"] += test
    tr, te = _split(_ocr_records(rng), rng, 0.1, shared_below=0, max_test=120)
    splits["ocr"] = {"train": tr, "test": te}
    tr, te = _split(_pickscore_records(NAMED_SCENES), rng, 0.25, shared_below=0)
    ctr, cte = _split_scenes(COMPOSED_SCENES, 0.5)   # half held out: >= 64 test prompts measure a 0.03 difference
    splits["pickscore"] = {"train": tr + ctr, "test": te + cte}
    return splits


_SPLITS = None


def prompts(task, split):
    """The records of one task ("geneval", "ocr", "pickscore") and split ("train", "test")."""
    global _SPLITS
    if _SPLITS is None:
        _SPLITS = build_splits()
    if task not in _SPLITS or split not in ("train", "test"):
        raise ValueError(f"unknown task/split {task!r}/{split!r}; tasks are {TASKS}, splits train/test")
    return _SPLITS[task][split]


def stratum(record):
    """The unit a prompt mix is uniform over: the GenEval sub-task of a composition prompt, else the task."""
    return record["metadata"]["tag"] if record["task"] == "geneval" else record["task"]


_STRATA = {}


def random_record(rng, split="train"):
    """One record: a task uniformly, then for geneval a sub-task uniformly, then a prompt of that stratum
    uniformly; rng: np.random.Generator. (Uniform over prompts would make 85% of geneval draws color_attr,
    360 of 426 train prompts, and single_object 3 of 426.)"""
    if split not in _STRATA:
        _STRATA[split] = {}
        for task in TASKS:
            for r in prompts(task, split):
                _STRATA[split].setdefault(task, {}).setdefault(stratum(r), []).append(r)
    by_stratum = _STRATA[split][TASKS[rng.integers(len(TASKS))]]
    recs = list(by_stratum.values())[rng.integers(len(by_stratum))]
    return recs[rng.integers(len(recs))]


def vocabulary():
    """Every word the world's prompts use plus the quoted-text characters, for the tokenizer."""
    words = set()
    for task in TASKS:
        for split in ("train", "test"):
            for r in prompts(task, split):
                words.update(w for w in r["prompt"].split('"')[0::2] for w in w.split())
    return sorted(words) + list(OCR_CHARS)


# ----------------------------------------------------------------------------------------- rendering
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


# ------------------------------------------------------------------------------------ caption noise
_SWAP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def corrupt_caption(record, rng):
    """One documented imperfection of a web caption, chosen per task (the image stays true)."""
    p, meta = record["prompt"], record["metadata"]
    if record["task"] == "ocr":
        t = meta["text"]
        i = rng.integers(len(t))
        wrong = t[:i] + rng.choice([c for c in OCR_CHARS if c != t[i]]) + t[i + 1:]
        return p.replace(f'"{t}"', f'"{wrong}"')
    if record["task"] == "pickscore":
        other = rng.choice([s for s in SCENES if s != meta["scene"]])
        return p.replace(meta["scene"], other)
    tag = meta["tag"]
    if tag == "counting":
        n = meta["include"][0]["count"]
        m = int(rng.choice([k for k in (2, 3, 4) if k != n]))
        return p.replace(NUMBERS[n], NUMBERS[m])
    if tag == "position":
        rel = meta["include"][1]["position"][0]
        return p.replace(f" {rel} ", f" {_SWAP[rel]} ")
    if tag in ("colors", "color_attr"):
        c = meta["include"][int(rng.integers(len(meta["include"])))]["color"]
        return p.replace(f" {c} ", " ", 1).replace(" a orange", " an orange")
    # single_object / two_object: drop the (last) shape word, leaving an under-specified caption
    return " ".join(p.split()[:-1])


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
