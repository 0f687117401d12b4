"""
Tests for compbench.py: the OOD compositions are absent from the post-training prompts, and the GenEval-like
scorer verifies them on ground-truth renders (so a low model score is the model's, not the scorer's).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_compbench.py
"""
import itertools
import json

import numpy as np
import pytest
import torch

from eval import ood_scores
from world import compbench as cb
from world import renderer
from world import toy_world as tw

TRAIN = tw.prompts("geneval", "train")


def colour_keys(meta):       # (colour, shape, count) of every coloured clause
    return {(c["color"], c["class"], c["count"]) for c in meta["include"] if "color" in c}


def class_set(meta):          # the classes one scene holds
    return {frozenset(c["class"] for c in meta["include"])}


def count_set(meta):          # the (class, count) set one scene asks for
    return {frozenset((c["class"], c["count"]) for c in meta["include"])}


def relation_triples(meta):   # (colour A, A, relation, colour B, B) of every positioned clause
    inc = meta["include"]
    return {(c.get("color"), c["class"], c["position"][0], inc[c["position"][1]].get("color"),
             inc[c["position"][1]]["class"]) for c in inc if "position" in c}


NOVELTY = {"colour": colour_keys, "shape": class_set, "counting": count_set, "spatial": relation_triples}


def by_category():
    recs = cb.records()
    return {cat: [r for r in recs if r["metadata"]["tag"] == cat] for cat in cb.CATEGORIES}


def test_records_are_fixed_and_sized():
    recs = cb.records()
    assert recs == cb.records()
    assert [len(v) for v in by_category().values()] == [24] * 4
    assert len({r["prompt"] for r in recs}) == len(recs)
    assert all(r["task"] == "geneval" and r["metadata"]["prompt"] == r["prompt"] for r in recs)


@pytest.mark.parametrize("cat", cb.CATEGORIES)
def test_held_out_composition_is_absent_from_train(cat):
    key = NOVELTY[cat]
    seen = set().union(*(key(r["metadata"]) for r in TRAIN))
    for r in by_category()[cat]:
        novel = key(r["metadata"])
        assert novel and not novel & seen, (r["prompt"], novel & seen)


def test_whole_scenes_and_prompts_are_new_and_in_vocabulary():
    signature = lambda m: json.dumps(sorted(json.dumps(c, sort_keys=True) for c in m["include"]))
    train_scenes = {signature(r["metadata"]) for r in TRAIN}
    world_prompts = {r["prompt"] for s in ("train", "test") for r in tw.prompts("geneval", s)}
    vocab = set(tw.vocabulary())
    for r in cb.records():
        assert signature(r["metadata"]) not in train_scenes and r["prompt"] not in world_prompts
        assert set(r["prompt"].split()) <= vocab, r["prompt"]   # an unknown word would test the tokenizer


def test_bare_pairs_and_triples_are_all_in_train():
    """Why the held-out units are bindings: no bare (colour, shape) or (shape, relation, shape) is unseen."""
    pairs = {(c["color"], c["class"]) for r in TRAIN for c in r["metadata"]["include"] if "color" in c}
    triples = {t[1:3] + t[4:] for r in TRAIN for t in relation_triples(r["metadata"])}
    assert pairs == set(itertools.product(tw.PALETTE, tw.SHAPES))
    assert triples == set((a, rel, b) for (a, b), rel in itertools.product(itertools.permutations(tw.SHAPES, 2),
                                                                              tw.RELATIONS))


def render(recs, seed):
    rng = np.random.default_rng(seed)
    return renderer.to_tensor([renderer.render(r, rng) for r in recs])


@pytest.mark.parametrize("seed", [0, 1])
def test_ground_truth_renders_score_high_per_category(seed):
    recs = cb.records()
    out = ood_scores(render(recs, seed), recs)
    assert set(out) == {k for c in cb.CATEGORIES for k in (c, c + "/strict")}
    for cat in cb.CATEGORIES:
        assert out[cat].shape == (24,) and out[cat + "/strict"].dtype == torch.float32
        assert out[cat].mean() >= 0.9 and out[cat + "/strict"].mean() >= 0.9, (cat, out[cat].mean())


def test_mismatched_images_score_low():
    """Each image scored against its category neighbour's prompt: the scorer is not lenient."""
    for cat, recs in by_category().items():
        rolled = recs[1:] + recs[:1]
        out = ood_scores(render(recs, 0), rolled)
        assert out[cat].mean() < 0.7 and out[cat + "/strict"].mean() < 0.1, cat


def test_score_rejects_foreign_records():
    with pytest.raises(ValueError, match="not compbench records"):
        ood_scores(torch.zeros(1, 3, 32, 32), tw.prompts("geneval", "test")[:1])
