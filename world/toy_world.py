"""
The miniature world's prompts: 32x32 RGB images of three tasks in which the whole Flow-OPD pipeline (base ->
single-reward teachers -> cold start -> on-policy distillation) runs on a CPU, mirroring the paper's four
rewards (Flow-OPD §4, "Data"; Flow-GRPO splits):
  geneval    composition: 1-4 shapes with colours, counts and relations, GenEval's six sub-tasks and
             GenEval's metadata schema {"tag", "include": [{"class", "count", "color", "position"}], "exclude"}
  ocr        text rendering: `a sign that says "K7"`, 1-3 characters from A-Z and 0-9
  pickscore  preference: scene prompts ("a sunset over the sea") that admit better and worse renderings
  deqa       quality: task-agnostic, no prompts of its own (its teacher trains on all prompts)
Every prompt is a record {"prompt": str, "task": str, "metadata": dict}; splits come from a fixed seed and
never change between runs. This file holds the words, the records and their splits; world/renderer.py draws
ground truth (and the web styles), world/captions.py corrupts pretraining captions; the rewards (rewards.py)
judge pixels only and never look at the renderer.

Prompt mix (random_record, used by pretraining): a task uniformly, then for geneval one of GenEval's six
sub-tasks uniformly (stratum), then a prompt of it. Scenes: the eight NAMED_SCENES of the first world and 61
COMPOSED_SCENES "<ground> <sky>" (8 grounds x 8 skies); half of the composed scenes are held out whole.
Differences from the paper: 1) the GenEval training ratio is uniform over sub-tasks (the paper's file:
Position:Counting:Attribute:Colors:Two:Single = 7:5:3:1:1:0); 2) sub-tasks with only a handful of distinct
prompts (single_object, two_object, counting, position) share their prompts between train and test; test
images differ by seed, so those rows measure sampling, not prompt generalisation.
Self-check (split sizes and a sample sheet): python -m world.renderer
"""
import itertools
import random


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
