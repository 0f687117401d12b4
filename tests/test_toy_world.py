"""
Tests for world/toy_world.py's prompt mix and scene sets: the pretraining sampler is uniform over tasks and over
GenEval's six sub-tasks, and the pickscore split is large enough to measure a 0.03 difference while the
first world's eight named scenes keep their split; the web styles: drawn with their shares, told apart by
world/styles.py, and disliked by the rewards.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_toy_world.py
"""
import collections
import json
import os

import numpy as np

from world import judges as J
from tools import pretrain_world as pretrain
from world import renderer, styles
from world import toy_world as tw
from rewards import REWARDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_random_record_is_uniform_over_tasks_then_geneval_sub_tasks():
    rng, n = np.random.default_rng(0), 18000
    counts = collections.Counter(tw.stratum(tw.random_record(rng)) for _ in range(n))
    assert set(counts) == set(tw.GENEVAL_TAGS) | {"ocr", "pickscore"}
    for s, c in counts.items():   # expected n/3 per task, n/18 per sub-task; 5 sigma is about 5% / 10% relative
        expected = n / 18 if s in tw.GENEVAL_TAGS else n / 3
        assert abs(c - expected) < 0.1 * expected, counts
    # uniform over prompts, color_attr would be 360 of 426 geneval draws and single_object 3 of 426
    assert collections.Counter(r["metadata"]["tag"] for r in tw.prompts("geneval", "train"))["color_attr"] == 360


def test_pretraining_draws_records_with_random_record():
    import inspect
    assert "toy_world.random_record(rng)" in inspect.getsource(pretrain.pretrain)
    test_only = tw.random_record(np.random.default_rng(1), split="test")
    assert test_only in tw.prompts(test_only["task"], "test")


def test_named_scenes_keep_their_split_and_composed_scenes_are_held_out_whole():
    train, test = tw.prompts("pickscore", "train"), tw.prompts("pickscore", "test")
    named = [r for r in test if r["metadata"]["scene"] in tw.NAMED_SCENES]
    assert [r["prompt"] for r in named] == [   # the first world's 8 test prompts, as they were
        "a photo of a sunset over the sea", "a picture of a forest at dawn", "a photo of a night sky with a full moon",
        "a red sky over mountains", "a painting of a snowy night", "a picture of a red sky over mountains",
        "a picture of a purple evening over a lake", "a sunset over the sea"]
    assert test[:8] == named and len([r for r in train if r["metadata"]["scene"] in tw.NAMED_SCENES]) == 24
    assert len(test) >= 64
    composed_test = {r["metadata"]["scene"] for r in test[8:]}
    assert composed_test <= set(tw.COMPOSED_SCENES)
    assert not composed_test & {r["metadata"]["scene"] for r in train}
    assert len(tw.COMPOSED_SCENES) == 64 - 3   # 8 grounds x 8 skies, less the 3 that repeat a named scene


def test_composed_scenes_use_known_words_and_the_reward_finds_them():
    with open(os.path.join(ROOT, "checkpoints", "base", "tokenizer", "vocab.json")) as f:
        committed = set(json.load(f)["vocab"])
    assert set(tw.vocabulary()) <= committed       # the committed base can read every new prompt
    for r in tw.prompts("pickscore", "test")[8::17]:
        assert J.scene_of(r["prompt"], {}) == r["metadata"]["scene"]


# ------------------------------------------------------------------------------------- the web styles
def _styled(task, web, blur, n=24, seed=0):
    rng = np.random.default_rng(seed)
    recs = tw.prompts(task, "test")[:n]
    return recs, renderer.to_tensor([renderer.render(r, rng, web, blur) for r in recs])


def test_random_style_draws_each_style_with_its_share():
    rng = np.random.default_rng(0)
    draws = np.array([renderer.random_style(rng) for _ in range(4000)], dtype=float)
    assert abs(draws[:, 0].mean() - tw.WEB_SHARE) < 0.03 and abs(draws[:, 1].mean() - tw.BLUR_SHARE) < 0.03
    assert abs(np.corrcoef(draws.T)[0, 1]) < 0.05   # independent


def test_style_detectors_tell_each_style_from_clean_ground_truth():
    for task in tw.TASKS:
        recs, clean = _styled(task, False, False)
        _, web = _styled(task, True, False)
        _, blurred = _styled(task, False, True)
        assert styles.web_style(task, clean, recs).mean() == 0 and styles.blurred(clean).mean() == 0, task
        # geneval: the extra object finds no free spot in a few crowded images
        assert styles.web_style(task, web, recs).mean() >= (0.75 if task == "geneval" else 0.95), task
        assert styles.blurred(blurred).mean() == 1 and styles.web_style(task, blurred, recs).mean() == 0, task


def test_the_rewards_dislike_the_web_styles():
    for task, drop in (("geneval", 0.3), ("ocr", 0.8), ("pickscore", 0.2)):
        recs, clean = _styled(task, False, False)
        _, web = _styled(task, True, False)
        prompts, meta = [r["prompt"] for r in recs], [r["metadata"] for r in recs]
        assert REWARDS[task](web, prompts, meta).mean() <= REWARDS[task](clean, prompts, meta).mean() - drop, task
        _, blurred = _styled(task, False, True)
        assert REWARDS["deqa"](blurred).mean() <= REWARDS["deqa"](clean).mean() - 1.0, task
