"""
An out-of-domain composition set, a T2I-CompBench in miniature (Flow-OPD §5 reports T2I-CompBench to show
that distillation keeps generalisation; PAPER_NOTES.md §4). Its prompts compose the world's words in ways
the post-training prompts (toy_world.prompts("geneval", "train")) never do, and they carry GenEval's metadata
schema, so eval.evaluate_ood scores them with rewards.geneval_details: the partial score and strict accuracy
mean what they mean for the geneval task.

What is held out. The train split already holds every (colour, shape) pair (colors, color_attr), every
(shape, relation, shape) triple and counts 2-4 of every shape (those sub-tasks share train and test), so a
held-out pair or triple of bare words does not exist; what is new is how they are bound together:
  colour    a colour bound to a counted group, "two red circles": the train split colours single objects
            only, so no (colour, shape, count >= 2) clause is in it.
  shape     three object classes in one scene, "two circles and a square and a triangle": train scenes hold
            at most two classes.
  counting  two counted classes in one scene, "three squares and a circle": train counts one class at a
            time, so no train scene has this (class, count) set.
  spatial   a relation between coloured objects, "a red circle left of a blue square": train relations are
            between colourless objects, so no (colour, shape, relation, colour, shape) is in it.
tests/test_compbench.py checks each of these against the train split.

Differences from T2I-CompBench: 1) four categories of its eight (no texture, non-spatial, 3-D or complex),
24 prompts each instead of 300; 2) scored by the GenEval-like detector, not BLIP-VQA / UniDet;
3) no scene holds more than 4 objects, the most renderer.render can place at 32 px (and as many as the
train split's largest scene), so "more objects" means more classes or counted groups, not a higher total;
4) no comma lists ("a, b and c"): the world's tokenizer splits on spaces, "circle," would be unknown.
"""
import itertools

from world.toy_world import PALETTE, RELATIONS, SHAPES, include_clause, noun_phrase

CATEGORIES = ("colour", "shape", "counting", "spatial")
COLOURS = list(PALETTE)
SHAPE_COUNTS = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2))   # per class, in prompt order; at most 4 objects
PAIR_COUNTS = ((2, 1), (1, 2), (3, 1), (2, 2))


def _record(category, prompt, include):
    return {"prompt": prompt, "task": "geneval",
            "metadata": {"tag": category, "include": include, "exclude": [], "prompt": prompt}}


def _colour():
    # every (shape, colour) once; counts 2, 3, 4 in turn so each shape meets each count
    return [_record("colour", f"a photo of {noun_phrase(c, s, 2 + i % 3)}", [include_clause(s, 2 + i % 3, c)])
            for i, (s, c) in enumerate(itertools.product(SHAPES, COLOURS))]


def _shape():
    out = []
    for order, counts in itertools.product(itertools.permutations(SHAPES), SHAPE_COUNTS):
        prompt = "a photo of " + " and ".join(noun_phrase(None, s, n) for s, n in zip(order, counts))
        out.append(_record("shape", prompt, [include_clause(s, n) for s, n in zip(order, counts)]))
    return out


def _counting():
    out = []
    for (a, b), (na, nb) in itertools.product(itertools.permutations(SHAPES, 2), PAIR_COUNTS):
        out.append(_record("counting", f"a photo of {noun_phrase(None, a, na)} and {noun_phrase(None, b, nb)}",
                           [include_clause(a, na), include_clause(b, nb)]))
    return out


def _spatial():
    out = []
    for i, ((a, b), rel) in enumerate(itertools.product(itertools.permutations(SHAPES, 2), RELATIONS)):
        ca, cb = COLOURS[i % 8], COLOURS[(i + 3) % 8]   # two different colours, each colour used thrice
        # GenEval's order: "A rel B" lists B first, then A with position (rel, index of B)
        out.append(_record("spatial", f"a photo of {noun_phrase(ca, a, 1)} {rel} {noun_phrase(cb, b, 1)}",
                           [include_clause(b, 1, cb), include_clause(a, 1, ca, position=[rel, 0])]))
    return out


def records():
    """The fixed OOD set: 24 geneval-task records per category, in CATEGORIES order."""
    return _colour() + _shape() + _counting() + _spatial()
