"""
Tests for eval.py's protocol: stratified prompt subsets, noise paired across models and distinct across a
prompt's images, per-tag GenEval accuracy and its mean, clustered and paired standard errors on exact small
cases, evaluation sizes honoured with a prompt file, micro-batched VAE decoding, uint8 images.
Most tests drive evaluate() with a fake model (zero or constant velocity, sigmoid "VAE"), so they take
milliseconds; the decode test builds a tiny untrained VAE.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval.py
"""
import collections
import dataclasses
import hashlib
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import rewards as R
from helpers import BASE
from support import metrics, provenance
from support import rollouts
import eval as E
from support import models
from flow_matching import time_grid
from world import renderer, toy_world
import train
from support.config import Config, parse_config
from support.resolve import eval_settings

GENEVAL = toy_world.prompts("geneval", "test")   # tags: 3 single_object, 6 two_object, 9 counting, 24 x 3 others


class FakeModel:
    """The T2IModel surface evaluate() uses: adapter None has velocity 0, adapter "a" a constant 0.5, so an
    image is sigmoid(initial noise) or a fixed shift of it; decode records what it is given."""
    latent_shape, shift, decode_batch = (3, 4, 4), 1.0, 16
    transformer = SimpleNamespace(device="cpu")

    def __init__(self):
        self.active, self.decoded = None, []

    def adapter(self, name):
        self.active = name

    def velocity_fn(self, prompts, guidance_scale=1.0):
        v = 0.0 if self.active is None else 0.5
        return lambda x, t: torch.full_like(x, v)

    def decode(self, z):
        self.decoded.append(len(z))
        return torch.sigmoid(z)

    def time_grid(self, num_steps, shift=None):
        return time_grid(num_steps, self.shift if shift is None else shift)


def fake_rewards(calls=None):
    """Rewards of the right shapes: deqa and ocr/pickscore from the image mean, geneval from the red mean with
    accuracy = red mean > 0.5."""
    def mean(x, prompts, meta):
        if calls is not None:
            calls.append(len(x))
        return x.mean((1, 2, 3))
    red = lambda x, p, m: x[:, 0].mean((1, 2))
    world_like = SimpleNamespace(score_and_accuracy=lambda x, p, m: (red(x, p, m), (red(x, p, m) > 0.5).float()))
    return {"deqa": lambda x, p, m: 1 + 4 * mean(x, p, m), "ocr": mean, "pickscore": mean, "geneval": world_like}


# --------------------------------------------------------------------------------------- stratification
def test_stratified_subset_equal_counts_every_tag_deterministic():
    for n, want in ((24, [3, 4, 4, 4, 4, 4]), (48, [3, 6, 9, 10, 10, 10]), (60, [3, 6, 9, 14, 14, 14])):
        index = E.stratified_subset(GENEVAL, n)
        counts = collections.Counter(GENEVAL[i]["metadata"]["tag"] for i in index)
        assert sorted(counts.values()) == want and set(counts) == set(toy_world.GENEVAL_TAGS)
        assert index == sorted(set(index)) and index == E.stratified_subset(GENEVAL, n)   # seeded, no repeats
    # not the first N (which hold no color_attr and no position prompt), and another seed picks others
    first = {GENEVAL[i]["metadata"]["tag"] for i in range(24)}
    assert "position" not in first and "color_attr" not in first
    assert E.stratified_subset(GENEVAL, 24, seed=1) != E.stratified_subset(GENEVAL, 24)
    assert E.stratified_subset(GENEVAL, 0) == list(range(90)) == E.stratified_subset(GENEVAL, 500)
    few = E.stratified_subset(GENEVAL, 4)   # fewer prompts than tags: one each from 4 tags
    assert len({GENEVAL[i]["metadata"]["tag"] for i in few}) == 4
    untagged = [{"prompt": str(i), "metadata": {}} for i in range(10)]   # ocr-like: one stratum
    assert len(E.stratified_subset(untagged, 7)) == 7


# ------------------------------------------------------------------------------------------------ noise
def test_noise_depends_only_on_seed_prompt_and_image():
    a = rollouts.initial_noise([(5, 0), (5, 1), (7, 0)], (2, 3), seed=0)
    b = rollouts.initial_noise([(7, 0), (5, 1)], (2, 3), seed=0)
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])                 # order and batch do not matter
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[0], a[2])   # each image of a prompt differs
    # unlike seed + index, seed 1's prompt 0 does not reuse seed 0's prompt 1
    assert not torch.allclose(rollouts.initial_noise([(0, 0)], (4,), 1), rollouts.initial_noise([(1, 0)], (4,), 0))


def test_two_adapters_are_paired_on_the_same_noise(monkeypatch):
    seen = []
    real = rollouts.euler_sample

    def spy(v_fn, x1, sigmas):
        seen.append(x1.clone())
        return real(v_fn, x1, sigmas)
    monkeypatch.setattr(rollouts, "euler_sample", spy)
    model, recs = FakeModel(), {"ocr": toy_world.prompts("ocr", "test")[:5]}
    kw = dict(prompts_per_task=3, images_per_prompt=2, steps=2, records=recs, rewards=fake_rewards(), batch_size=4)
    base = E.evaluate(model, None, **kw)
    n_base = len(seen)
    other = E.evaluate(model, "a", **kw)
    x_base, x_other = torch.cat(seen[:n_base]), torch.cat(seen[n_base:])
    assert x_base.shape[0] == 6 and torch.equal(x_base, x_other)        # same noise, sample for sample
    assert not torch.allclose(x_base[0], x_base[1])                     # the two images of prompt 0 differ
    assert other["per_prompt"]["ocr"]["index"] == base["per_prompt"]["ocr"]["index"]
    assert other["ocr"] < base["ocr"]                  # v = 0.5 from t = 1 to 0 darkens every image by the same step


# ------------------------------------------------------------------------------------------- statistics
def test_clustered_se_exact_small_case():
    # 3 prompts x 2 images: [[1, 0], [1, 1], [0, 0]] -> prompt means 0.5, 1, 0: mean 0.5, std 0.5, se 0.5/sqrt(3)
    per_image = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    mean, se = metrics.clustered_mean_se(per_image.mean(1))
    assert mean == pytest.approx(0.5, rel=1e-12) and se == pytest.approx(0.5 / math.sqrt(3), rel=1e-12)
    # the per-image se would be smaller (0.5 / sqrt(6) * ...), treating 6 correlated images as independent
    assert se > per_image.flatten().std().item() / math.sqrt(6)
    assert math.isnan(metrics.clustered_mean_se([0.3])[1])                     # one prompt: no se


def _per_prompt(acc, tags, extra=()):
    n = len(acc)
    out = {"geneval": {"index": list(range(n)), "tag": tags, "geneval": [0.5] * n, "geneval_acc": acc,
                       "deqa": [4.0] * n}}
    for task, values in extra:
        out[task] = {"index": list(range(len(values))), "tag": [None] * len(values), task: values,
                     "deqa": [5.0] * len(values)}
    return out


def test_geneval_accuracy_is_the_mean_over_tags_with_its_se():
    tags = ["colors", "colors", "position", "position", "counting", "counting"]
    m = metrics.summarise_prompts(_per_prompt([1.0, 0.5, 0.0, 0.5, 1.0, 0.0], tags))
    assert m["geneval_acc/colors"] == pytest.approx(0.75) and m["geneval_acc/position"] == pytest.approx(0.25)
    assert m["geneval_acc/counting"] == pytest.approx(0.5)
    assert m["geneval_acc"] == pytest.approx((0.75 + 0.25 + 0.5) / 3, rel=1e-12)   # tags weigh equally
    # se per tag of two prompts a, b: |a - b| / 2 -> 0.25, 0.25, 0.5; the mean over 3 tags: sqrt(sum se^2) / 3
    assert m["se/geneval_acc/counting"] == pytest.approx(0.5, rel=1e-12)
    assert m["se/geneval_acc"] == pytest.approx(math.sqrt(0.25 ** 2 * 2 + 0.5 ** 2) / 3, rel=1e-12)
    # an unbalanced set: the per-image mean (0.6) is not the paper's number (mean over tags, 0.5)
    m = metrics.summarise_prompts(_per_prompt([1.0, 1.0, 1.0, 0.0, 0.0], ["colors"] * 3 + ["position"] * 2))
    assert m["geneval_acc"] == pytest.approx(0.5, rel=1e-12)


def test_deqa_and_avg_pool_the_tasks():
    m = metrics.summarise_prompts(_per_prompt([1.0, 0.0], ["colors", "colors"],
                                        [("ocr", [0.2, 0.4, 0.6]), ("pickscore", [0.1, 0.3, 0.5])]))
    assert m["deqa"] == pytest.approx((2 * 4.0 + 6 * 5.0) / 8, rel=1e-12)   # over all 8 prompts
    assert m["se/deqa"] == 0.0                                            # constant within every task
    want = (m["geneval"] + m["ocr"] + m["deqa"] / 5 + m["pickscore"]) / 4
    assert m["avg"] == pytest.approx(want, rel=1e-12)
    # deqa is constant per task, so only the task rewards vary: se^2 = (se_ocr^2 + se_pickscore^2) / 16
    assert m["se/avg"] == pytest.approx(math.sqrt(m["se/ocr"] ** 2 + m["se/pickscore"] ** 2) / 4, rel=1e-9)


def test_paired_difference_exact_and_checked():
    settings = {"seed": 0}
    a = {"per_prompt": {"ocr": {"index": [0, 1, 2], "tag": [None] * 3, "ocr": [0.5, 1.0, 0.0],
                                "deqa": [4.0, 4.0, 4.0]}}, "settings": settings}
    b = {"per_prompt": {"ocr": {"index": [0, 1, 2], "tag": [None] * 3, "ocr": [0.0, 1.0, 0.5],
                                "deqa": [4.0, 4.0, 4.5]}}, "settings": settings}
    d = metrics.paired_difference(a, b)
    # differences 0.5, 0, -0.5: mean 0, std 0.5, se 0.5 / sqrt(3)
    assert d["ocr"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert d["ocr"]["se"] == pytest.approx(0.5 / math.sqrt(3), rel=1e-12)
    assert d["deqa"]["mean"] == pytest.approx(-0.5 / 3, rel=1e-12)
    b["per_prompt"]["ocr"]["index"] = [0, 1, 3]
    with pytest.raises(ValueError, match="same prompts"):
        metrics.paired_difference(a, b)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    model = FakeModel()
    kw = dict(prompts_per_task=4, images_per_prompt=2, steps=2, rewards=fake_rewards(),
              records={"geneval": GENEVAL, "ocr": toy_world.prompts("ocr", "test")[:6]})
    first, again = E.evaluate(model, None, **kw), E.evaluate(model, None, **kw)
    d = metrics.paired_difference(again, first)
    assert d["ocr"] == {"mean": 0.0, "se": 0.0} and d["geneval_acc"]["mean"] == 0.0
    assert json.loads(json.dumps(first))["per_prompt"] == first["per_prompt"]   # cacheable as JSON


# ------------------------------------------------------------------------------------ sizes on every path
def test_eval_sizes_are_honoured_with_a_prompt_file(tmp_path):
    path = tmp_path / "test_metadata.jsonl"
    path.write_text("".join(json.dumps(r["metadata"]) + "\n" for r in GENEVAL))   # GenEval's file format
    cfg = parse_config(["--eval_prompts", f"geneval={path}", "--prompts", f"geneval={path}",
                        "--eval_prompts_per_task", "12", "--eval_images_per_prompt", "3", "--eval_batch", "8",
                        "--eval_steps", "2"])
    kw, evaluating = train.student_evaluation(cfg, E.REWARDS, 0)
    assert evaluating and len(kw["records"]["geneval"]) == 90
    model, calls = FakeModel(), []
    m = E.evaluate(model, None, **{**kw, "rewards": fake_rewards(calls)})
    tags = collections.Counter(m["per_prompt"]["geneval"]["tag"])
    assert sorted(tags.values()) == [2] * 6                              # 12 prompts, 2 per tag
    assert sum(model.decoded) == 36 and max(model.decoded) <= 8          # 12 x 3 images, sampled 8 at a time
    assert sum(calls) == 36
    assert eval_settings(cfg)["prompts_per_task"] == 12


def test_removed_eval_limit_flag_names_the_new_ones(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--eval_limit", "32"])
    assert "--eval_prompts_per_task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--eval_limit=32"])
    assert "removed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--estimator", "pathwize"], "--estimator 'pathwize': choose one of 'pathwise', 'logratio', 'released'"),
    (["--opd_iters", "-3"], "--opd_iters -3: must be >= 1"),
    (["--soft_routing", "1.5"], "--soft_routing 1.5: must be in [0, 1]"),
    (["--prompts", "ocr=/no/such/file.txt"], "--prompts ocr=/no/such/file.txt: no prompt file"),
    (["--teacher", "geneval"], "--teacher expects NAME=PATH"),
    (["--compile", "maybe"], "--compile: expected true or false"),
    (["--steps", "2"], "--steps was removed: use --eval_steps"),
])
def test_bad_flags_end_in_one_line_naming_the_flag(argv, message, capsys):
    """Checked when parsed, before any model loads: one line on stderr after the usage line, exit code 2."""
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 2 and message in err[1], err


def test_help_gives_every_flag_a_description_and_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps the help lines
    for f in dataclasses.fields(Config):
        assert f"--{f.name} {f.name.upper()}" in text or f"--{f.name} [{f.name.upper()} ...]" in text, f.name
    assert "(default: pathwise)" in text and "(default: 40)" in text and text.count("(default: ") >= len(
        dataclasses.fields(Config))
    with pytest.raises(SystemExit):
        E.main(["--help"])   # an entry point's own flags carry their defaults too
    assert "--paired also each row minus the base" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------- decode, uint8
def test_micro_batched_decode_matches_one_call_and_bounds_the_batch():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False).eval()
    model = models.T2IModel(SimpleNamespace(config=SimpleNamespace(sample_size=4)), vae, None)
    z = torch.randn(10, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sizes, real = [], model.vae.decode

    def spy(x, *args, **kw):
        sizes.append(len(x))
        return real(x, *args, **kw)
    with torch.no_grad():
        whole = model.decode(z, batch_size=10)
        model.vae.decode = spy
        model.decode_batch = 3
        chunked = model.decode(z)
    assert sizes == [3, 3, 3, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


def test_samples_are_uint8_on_the_host_and_scores_see_floats():
    model = FakeModel()
    images = rollouts.sample_uint8(model, ["a", "b", "c"], steps=2, batch_size=2)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 4, 4) and images.device.type == "cpu"
    assert model.decoded == [2, 1]
    floats = rollouts.sample_images(model, ["a", "b", "c"], steps=2)
    assert floats.dtype == torch.float32 and torch.equal(rollouts.to_uint8(floats), images)
    seen = []
    recs = toy_world.prompts("ocr", "test")[:3]
    rewards = {"deqa": lambda x, p, m: seen.append(x.dtype) or torch.ones(len(x)),
               "ocr": lambda x, p, m: x.mean((1, 2, 3))}
    scores = E.score_task("ocr", images, recs, rewards)
    assert seen == [torch.float32] and scores["ocr"].shape == (3,)
    torch.testing.assert_close(scores["ocr"], rollouts.to_float(images).mean((1, 2, 3)))


def test_world_style_shares_are_scored_per_task_and_pooled():
    import numpy as np
    rng, recs = np.random.default_rng(0), toy_world.prompts("ocr", "test")[:8]
    # four upright and sharp, two turned (web), two blurred: web/ocr 2/8, blurred 2/8
    styles = [(False, False)] * 4 + [(True, False)] * 2 + [(False, True)] * 2
    images = torch.from_numpy(np.stack([renderer.render(r, rng, w, b) for r, (w, b) in zip(recs, styles)])).permute(0, 3, 1, 2)
    scores = E.score_task("ocr", images, recs)
    assert scores["web"].tolist() == [0.0] * 4 + [1.0] * 2 + [0.0] * 2
    assert scores["blurred"].tolist() == [0.0] * 6 + [1.0] * 2
    per_prompt = {"ocr": {"index": list(range(8)), "tag": [None] * 8, **{k: v.tolist() for k, v in scores.items()}}}
    m = metrics.summarise_prompts(per_prompt)
    assert m["web/ocr"] == pytest.approx(0.25) and m["blurred"] == pytest.approx(0.25)
    assert "web" not in E.score_task("ocr", images, recs, rewards=dict(E.REWARDS))   # not the world's rewards


def test_eval_cli_restricts_tasks_and_pairs_another_full_model(tmp_path):
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "base")
    out = tmp_path / "t.json"
    E.main(["--model", base, "--other_model", f"again={base}", "--tasks", "ocr", "--eval_prompts_per_task", "2",
            "--eval_images_per_prompt", "1", "--eval_steps", "2", "--paired", "--out", str(out)])
    table = json.loads(out.read_text())
    assert set(table["rows"]) == {"base", "again"} and table["meta"]["tasks"] == ["ocr"]
    assert "geneval" not in table["rows"]["base"] and "ocr" in table["rows"]["base"]
    assert table["paired"]["again"][0]["ocr"] == {"mean": 0.0, "se": 0.0}   # the same model on the same noise
    with pytest.raises(SystemExit, match="--tasks"):
        E.main(["--model", base, "--tasks", "paint", "--eval_steps", "2"])


def test_tables_over_seeds_carry_a_t_based_interval():
    table = {"rows": metrics.summarise({"flow_opd/merge": [{"avg": 1.0, "per_prompt": {}}, {"avg": 2.0},
                                                           {"avg": 3.0}]})}
    cell = table["rows"]["flow_opd/merge"]["avg"]
    assert cell["mean"] == pytest.approx(2.0) and cell["std"] == pytest.approx(1.0) and cell["n"] == 3
    assert cell["se"] == pytest.approx(1 / 3 ** 0.5, rel=1e-12)
    # Student's t for 2 degrees of freedom: 4.302652729749464 (not 1.96), times se
    assert cell["ci95"] == pytest.approx(4.302652729749464 / 3 ** 0.5, rel=1e-9)
    assert "| flow_opd/merge | 2.000 ± 2.484 | 3 |" in metrics.table_markdown(table, metrics=("avg",))
    one = metrics.summarise({"row": [{"avg": 1.0}]})["row"]["avg"]
    assert one["n"] == 1 and math.isnan(one["ci95"])


class _Model:
    """Stands in for a loaded model: evaluate_cached reads only where it was loaded from."""
    def __init__(self, source):
        self.source = source


def _fake_adapter(folder, content):
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(content)
    return str(folder)


def test_evaluate_cached_keeps_entries_another_run_wrote_meanwhile(tmp_path):
    """Two seeds evaluating one adapter folder at once: the second to finish must not erase the first's."""
    folder = _fake_adapter(tmp_path / "student", b"weights")
    path, model = tmp_path / "student" / "eval.json", _Model(BASE)

    def evaluate_while_another_seed_writes(model, adapter, seed):
        other = json.dumps({"evaluate_ood": {"seed": 9, "rewards": R.REWARDS_VERSION,
                                             "weights": E.model_weights(model, folder)}}, sort_keys=True)
        path.write_text(json.dumps({other: {"avg": 0.5}}))   # a parallel run finished first
        return {"avg": float(seed)}

    evaluate_while_another_seed_writes.__name__ = "evaluate_ood"   # a plain fn name keeps the key readable
    got = E.evaluate_cached(model, "student", folder, fn=evaluate_while_another_seed_writes, seed=3)
    assert got == {"avg": 3.0}
    saved = json.loads(path.read_text())
    assert {"avg": 0.5} in saved.values() and len(saved) == 2
    assert E.evaluate_cached(model, "student", folder, fn=evaluate_while_another_seed_writes, seed=3) == got


def test_evaluate_cached_is_keyed_by_the_weights_sha256(tmp_path):
    """Retrained weights in the same folder are evaluated afresh, and the old weights' entries are dropped."""
    folder, calls = _fake_adapter(tmp_path / "teacher", b"first weights"), []

    def evaluate_ood(model, adapter, seed):
        calls.append(seed)
        return {"avg": float(len(calls))}

    model = _Model(BASE)
    assert E.evaluate_cached(model, "t", folder, fn=evaluate_ood, seed=0) == {"avg": 1.0}
    assert E.evaluate_cached(model, "t", folder, fn=evaluate_ood, seed=0) == {"avg": 1.0} and calls == [0]
    _fake_adapter(tmp_path / "teacher", b"retrained weights")
    assert E.evaluate_cached(model, "t", folder, fn=evaluate_ood, seed=0) == {"avg": 2.0}
    (key,) = json.load(open(tmp_path / "teacher" / "eval.json"))
    want = hashlib.sha256(b"retrained weights").hexdigest()
    assert json.loads(key)["evaluate_ood"]["weights"] == {"base": provenance.weights_sha256(BASE), "adapter": want}
