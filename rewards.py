"""
Reward registry: miniature, pixel-only stand-ins for the four reward models of Flow-OPD §4 ("Reward
models": GenEval via reward-server, OCR via PaddleOCR, PickScore, DeQA-Score), with the reward formulas of
Flow-GRPO / reward-server (see PAPER_NOTES.md §6). Every reward is a callable
    REWARDS[name](images, prompts, metadata) -> torch.Tensor (B,) float32
images (B, 3, 32, 32) float in [0, 1], prompts list[str], metadata list[dict] (toy_world records' "metadata").
They judge PIXELS only (never the renderer's ground truth or its randomness); a reward that does not apply to
a sample returns float('nan') for it. REWARD_SCALE[name] is what to divide by to get a 0-1 training reward.

  geneval    a colour/shape detector on pixels, then reward-server's score: mean over clause terms; each
             include clause adds 1 - |count - found|/count (clamped at 0), a colour term
             1 - |count - n_colour_match|/count, and a position term 1/0 (GenEval's relative_position on
             boxes, threshold 0.1), the last two only when the count is exact (else 0). Scale [0, 1].
             geneval_details(images, metadata) -> (score, strict): strict = every count exact, every colour and
             position right, no excluded class found (GenEval's strict accuracy).
             The detector (world/judges.py) models every pixel as a blend of the background and one palette
             colour and fits ideal circle, square and triangle templates to each blob; a blob that fits none
             of them well (an elongated ellipse, a bar, a line, a ring, a frame) is an object of no shape.
             Ground truth through the world's autoencoder scores >= 0.97 on every sub-task and +-2/255 pixel
             noise flips < 1% of its rewards (world/judges.py has the calibration numbers).
  ocr        ocr.recognise (a template-matching recogniser, see ocr.py), then Flow-GRPO's formula:
             target = quoted text, lower-cased, spaces removed; dist = 0 if target in recognised else
             Levenshtein; reward = 1 - min(dist, len(target))/len(target). Scale [0, 1].
  pickscore  a documented formula, NOT a learned model: scene fidelity (median sky/ground colour vs the
             scene's colours), vividness (colour distance from grey relative to the scene's) and a disc term
             (a compact blob of the sun/moon colour in the sky). Scale [0, 1]. A tiny CLIP trained on the toy
             world would be closer to the paper (and hackable like PickScore is); the formula is a deliberate,
             transparent stand-in whose optimum is exactly "the vivid, complete scene of the prompt".
             The scene is the longest toy_world.SCENES name in the prompt (8 named, 61 composed scenes).
  deqa       task-agnostic quality 5 - 25*noise - 4*blur - 1.0*blockiness - 4*pattern clamped to [1, 5] (DeQA's
             raw 1-5 scale; REWARD_SCALE["deqa"] = 5 gives Flow-GRPO's score/5 reward); pattern = textures and
             splits the world never draws (stripes, checkerboards, dithering, hatching, rings, half splits);
             an image with no visible edge (a flat colour, a faint texture) counts as fully blurred.
Differences from the paper:
  1) every reward is a hand-written pixel rule for 32x32 toy images, not mask2former+CLIP, PaddleOCR,
     PickScore (CLIP-H) or DeQA-Score (mPLUG-Owl2); they are deterministic and not differentiable;
  2) geneval: a failed position scores 0 (reward-server adds 0 and then always 1, so a failed position
     averages to 0.5); the count term is clamped at 0 (reward-server goes negative for found > 2*count);
     strict requires exact counts (GenEval only asks ">= count" plus exclude clauses for counting);
  3) pickscore is on [0, 1] directly (PickScore_v1's logit/26); prompts without a known scene get the
     vividness term only; ocr raises ValueError on a prompt without quoted text (Flow-GRPO returns 0);
  4) images are scored as given (reward-server JPEG-compresses them first).
Run the self-check:  OMP_NUM_THREADS=1 python rewards.py
"""
import time
from typing import NamedTuple

import numpy as np
import torch

from world.judges import detect, pickscore_one, relative_position, scene_of
from world.quality import K_BLOCK, K_BLUR, K_NOISE, K_PATTERN, deqa_terms
from world.ocr import levenshtein, recognise  # the text recogniser, a PP-OCR stand-in


def _geneval_one(objects, meta):
    """(score, strict) of one image's detections against GenEval metadata (reward-server's partial score)."""
    terms, strict, groups = [], True, []
    for clause in meta["include"]:
        n = clause["count"]
        found = [o for o in objects if o.shape == clause["class"]]
        exact = len(found) == n
        terms.append(max(0.0, 1 - abs(n - len(found)) / n))   # clamped: reward-server can go negative
        strict &= exact
        if "color" in clause:
            m = sum(o.colour == clause["color"] for o in found)
            terms.append(1 - abs(n - m) / n if exact else 0.0)
            strict &= exact and m == n
        if "position" in clause:
            rel, ref = clause["position"]
            ok = exact and groups[ref] is not None and all(
                rel in relative_position(o.box, r.box) for o in found for r in groups[ref])
            terms.append(float(ok))                          # reward-server: 0 then always +1 (a quirk)
            strict &= ok
        groups.append(found if exact else None)
    for clause in meta.get("exclude", []):                   # GenEval: >= count excluded objects fail strict
        strict &= sum(o.shape == clause["class"] for o in objects) < clause.get("count", 1)
    return float(np.mean(terms)), bool(strict)


class GenevalResult(NamedTuple):
    score: torch.Tensor   # (B,) float32, nan where the metadata has no GenEval "include"
    strict: torch.Tensor  # (B,) bool, False where not applicable


def geneval_details(images, metadata):
    detections = detect(images)
    score, strict = torch.full((len(metadata),), float("nan")), torch.zeros(len(metadata), dtype=torch.bool)
    for i, (objs, meta) in enumerate(zip(detections, metadata)):
        if "include" in meta:
            score[i], strict[i] = _geneval_one(objs, meta)
    return GenevalResult(score, strict)


def geneval_reward(images, prompts, metadata):
    return geneval_details(images, metadata).score


def ocr_score(recognised, prompt):
    """Flow-GRPO's OCR reward of one recognised string for one prompt, in [0, 1]."""
    if '"' not in prompt:
        raise ValueError(f"ocr reward needs quoted text in the prompt, got {prompt!r}")
    target = prompt.split('"')[1].replace(" ", "").lower()
    rec = recognised.replace(" ", "").lower()
    dist = 0 if target in rec else levenshtein(rec, target)
    return 1 - min(dist, len(target)) / len(target)


def ocr_reward(images, prompts, metadata):
    return torch.tensor([ocr_score(r, p) for r, p in zip(recognise(images), prompts)], dtype=torch.float32)


def pickscore_reward(images, prompts, metadata):
    return torch.tensor([pickscore_one(img, scene_of(p, m)) for img, p, m in zip(images, prompts, metadata)],
                        dtype=torch.float32)


def deqa_raw(images, prompts=None, metadata=None):
    """DeQA-like quality on DeQA's raw 1-5 scale, (B,) float32: 5 - 25 noise - 4 blur - 1 blockiness - 4 pattern,
    clamped to [1, 5] (K_NOISE, K_BLUR, K_BLOCK, K_PATTERN and the rules of world/quality.py)."""
    noise, blur, blockiness, pattern = deqa_terms(images)
    return (5 - K_NOISE * noise - K_BLUR * blur - K_BLOCK * blockiness - K_PATTERN * pattern).clamp(1, 5).float()


# ------------------------------------------------------------------------------------------ registry
# The real-image backends (reward_backends.make_rewards: RapidOCR, a PickScore CLIP, reward-server clients)
# replace these entries behind the same names and signature.
REWARDS = {
    "geneval": geneval_reward,      # [0, 1]
    "ocr": ocr_reward,              # [0, 1]
    "pickscore": pickscore_reward,  # [0, 1]
    "deqa": deqa_raw,               # raw [1, 5]
}
REWARD_SCALE = {"geneval": 1.0, "ocr": 1.0, "pickscore": 1.0, "deqa": 5.0}  # reward = REWARDS[k](...) / scale
# Bumped whenever a world reward or its test prompts change, so cached scores (eval.json) of the old ones are
# never reused: 2 = the calibrated detector (world/judges.py) and the composed pickscore scenes; 3 = deqa's
# blur weight 2.5 -> 4 (the world's blurred style costs about half the 1-5 scale, world/toy_world.py); 4 = judges a
# person would agree with: the detector's shapes need MIN_IOU at the world's aspect, deqa's pattern rule; 5 = deqa
# counts an image without a visible edge as fully blurred (empty images through the autoencoder scored 4.93-5.00).
REWARDS_VERSION = 5


def combined_reward(images, records, weights, rewards=REWARDS):
    """Weighted sum of registry rewards, each on 0-1 (raw deqa divided by 5): sum_k w_k r_k / scale_k.
    `weights` maps a reward name, or "task" for each record's own task reward, to its weight; `rewards` is
    the registry (the world's, or reward_backends.make_rewards for real images)."""
    prompts, meta = [r["prompt"] for r in records], [r["metadata"] for r in records]
    total = torch.zeros(len(records))
    for name, w in weights.items():
        if name == "task":
            for task in {r["task"] for r in records}:
                idx = [i for i, r in enumerate(records) if r["task"] == task]
                total[idx] += w * rewards[task](images[idx], [prompts[i] for i in idx], [meta[i] for i in idx])
        else:
            total += w * rewards[name](images, prompts, meta) / REWARD_SCALE[name]
    return total


if __name__ == "__main__":
    from world import renderer, toy_world as tw   # the self-check renders test images; the rewards never do
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    recognise(torch.zeros(1, 3, 32, 32))  # build the recogniser's templates outside the timings
    for task in tw.TASKS:
        recs = tw.prompts(task, "test")
        images = renderer.to_tensor([renderer.render(r, rng) for r in recs])                     # (B, 3, 32, 32)
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
        prompts, meta = [r["prompt"] for r in recs], [r["metadata"] for r in recs]
        for name in (task, "deqa"):
            t0 = time.perf_counter()
            clean = REWARDS[name](images, prompts, meta)
            ms = (time.perf_counter() - t0) / len(recs) * 1e3
            pure = REWARDS[name](noise, prompts, meta)
            print(f"{task:9s} {name:9s} clean mean {clean.mean():.3f} min {clean.min():.3f} | pure noise mean "
                  f"{pure.mean():.3f} | {ms:.2f} ms/image (B={len(recs)})")
        if task == "geneval":
            res = geneval_details(images, meta)
            for tag in tw.GENEVAL_TAGS:
                m = torch.tensor([x["tag"] == tag for x in meta])
                print(f"  {tag:13s} score {res.score[m].mean():.3f} strict {res.strict[m].float().mean():.3f}")
