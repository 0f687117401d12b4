"""
Caption noise (why the base leaves room for RL). Real base models miss GenEval and OCR partly because web
captions are imprecise. The world's pretraining captions are corrupted the same way with probability
`caption_noise` (tools/pretrain_world.py; 0.3 in the first pretraining run, 0.1 in the continued one): a
wrong count, a swapped relation, a dropped colour or shape word, one misspelt character of the quoted text,
or the wrong scene name. The image is always drawn from the true record, so the base learns a blurred
conditional that more pretraining cannot sharpen but a pixel reward can.
"""
from world.toy_world import NUMBERS, OCR_CHARS, SCENES

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


