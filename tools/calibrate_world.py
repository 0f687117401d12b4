"""
Calibrating the miniature world's rewards against its own autoencoder: does a reward give ground truth full
marks, and is it stable to noise no one can see? For every GenEval sub-task and for OCR: ground truth rendered
by toy_world and passed through the model's autoencoder (what a perfect generator could draw), or the model's
own ODE samples of the same prompts; the mean reward, and the share of rewards that change under +-2/255
uniform pixel noise; each mean with its 95% interval over the images (t_ci95 of std/√n: the images are independent
draws, so n images of one seed bound the mean as well as n images over several). The numbers: results/calibration.json
(README "Calibration"); tests/test_rewards.py holds the targets (ground truth >= 0.97 per sub-task, < 1% flips).

    python -m tools.calibrate_world --n 300 [--model checkpoints/base] [--out results/calibration.json]
    python -m tools.calibrate_world --n 60 --styles --out results/style_costs.json
                                              (what each web style costs the rewards, toy_world.WEB_STYLES)
    python -m tools.calibrate_world --empty_before COMMIT --n 128 --probe_lora ROW=PATH ... --out results/judges.json
        (deqa on images that draw nothing, sharp and through the autoencoder, and on each model's samples of the
         first n pickscore test prompts, under the judges of COMMIT and the current ones: judges.json's "empty")
"""
import importlib.util
import json
import os
import subprocess
import tempfile

import numpy as np
import torch

from rewards import REWARDS
from support.config import parse_args
from support.metrics import t_ci95, write_json
from support.provenance import this_command
from support.resolve import load_lora, load_model, named_paths
from support.rollouts import sample_images
from world import renderer, styles, toy_world


def calibration_records(per_stratum, seed=0):
    """{stratum: records}: `per_stratum` records drawn with replacement from every GenEval sub-task (train and
    test prompts) and from the OCR test prompts (toy_world.stratum names the strata)."""
    rng = np.random.default_rng(seed)
    pools = {}
    for r in toy_world.prompts("geneval", "train") + toy_world.prompts("geneval", "test") + toy_world.prompts("ocr", "test"):
        pools.setdefault(toy_world.stratum(r), []).append(r)
    return {s: [pool[i] for i in rng.integers(len(pool), size=per_stratum)] for s, pool in pools.items()}


def noise_flips(reward, images, records, amplitude=2 / 255, draws=3, seed=0):
    """(rewards (B,), flip share (B,)): how often reward(images) changes when uniform noise in
    [-amplitude, amplitude] is added to the pixels (clamped to [0, 1]), averaged over `draws` noise draws."""
    prompts, meta = [r["prompt"] for r in records], [r["metadata"] for r in records]
    gen = torch.Generator().manual_seed(seed)
    clean = reward(images, prompts, meta)
    flips = [reward((images + (torch.rand(images.shape, generator=gen) * 2 - 1) * amplitude).clamp(0, 1),
                    prompts, meta) != clean for _ in range(draws)]
    return clean, torch.stack(flips).float().mean(0)


@torch.no_grad()
def reward_calibration(model, per_stratum=100, seed=0, samples=False, steps=40, guidance_scale=4.5):
    """{stratum: {"reward": mean, "ci95", "flip": share}} of each GenEval sub-task's and OCR's reward on ground truth
    rendered by toy_world and passed through the model's autoencoder (what a perfect generator could
    draw), or with samples=True on the model's own ODE samples of the same prompts."""
    rng, out = np.random.default_rng(seed), {}
    for stratum, recs in calibration_records(per_stratum, seed).items():
        if samples:
            images = sample_images(model, [r["prompt"] for r in recs], steps, guidance_scale, seed)
        else:
            truth = renderer.to_tensor([renderer.render(r, rng) for r in recs])
            images = model.decode(model.encode_images(truth))
        clean, flips = noise_flips(REWARDS[recs[0]["task"]], images, recs, seed=seed)
        out[stratum] = {"reward": clean.mean().item(), "ci95": t_ci95(clean.std().item() / len(clean) ** 0.5, len(clean)),
                        "flip": flips.mean().item()}
    return out


@torch.no_grad()
def style_costs(model, per_stratum=60, seed=0):
    """{stratum: {style: reward}}: what each web style costs each reward on ground truth through the model's
    autoencoder. Styles: clean, web (the task's web style), blurred; the task reward (pickscore: the 128 test
    scenes) and deqa (raw 1-5); `web_detected`: the share world/styles.py flags in the web-styled images."""
    rng, out = np.random.default_rng(seed), {}
    strata = calibration_records(per_stratum, seed)
    strata["pickscore"] = [toy_world.prompts("pickscore", "test")[i]
                           for i in rng.integers(len(toy_world.prompts("pickscore", "test")), size=per_stratum)]
    for stratum, recs in strata.items():
        task, row = recs[0]["task"], {}
        prompts, meta = [r["prompt"] for r in recs], [r["metadata"] for r in recs]
        for style, (web, blur) in {"clean": (False, False), "web": (True, False), "blurred": (False, True)}.items():
            truth = renderer.to_tensor([renderer.render(r, rng, web, blur) for r in recs])
            images = model.decode(model.encode_images(truth))
            row[style] = REWARDS[task](images, prompts, meta).mean().item()
            row[f"deqa/{style}"] = REWARDS["deqa"](images).mean().item()
            if web:
                row["web_detected"] = styles.web_style(task, images, recs).mean().item()
        out[stratum] = row
    return out


def empty_images():
    """{name: (3, 32, 32)} images that draw nothing: flat colours, and textures too fine or too faint to see."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    fine = {"checkerboard 1 px": (x + y) % 2, "stripes 1 px": x % 2, "checkerboard 2 px": (x // 2 + y // 2) % 2,
            "checkerboard 2 px, shifted": (x // 2 + y // 2 + 1) % 2}   # the autoencoder is not shift-invariant
    two_tone = lambda mask, a, b: torch.where(mask.bool(), torch.tensor(b)[:, None, None], torch.tensor(a)[:, None, None]) / 255.0
    flats = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128),
             "background": toy_world.BACKGROUND, "navy": (26, 26, 77)}
    return {**{n: two_tone(x < 0, c, c) for n, c in flats.items()},
            **{n: two_tone(m, (0, 0, 0), (255, 255, 255)) for n, m in fine.items()},
            **{f"faint {n}": two_tone(m, (115, 115, 115), (140, 140, 140)) for n, m in fine.items()}}


def judges_at(commit):
    """deqa's judge as it was at `commit`, imported as a module of its own (world/ imports stay current):
    world/quality.py, or world/judges.py before deqa had a file of its own."""
    show = lambda path: subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True)
    source = show("world/quality.py")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source.stdout if source.returncode == 0 else show("world/judges.py").stdout)
    spec = importlib.util.spec_from_file_location(f"judges_{commit}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deqa_with(judges, images):
    """rewards.deqa_raw's formula on `judges`' terms (a former quality.py or judges.py), (B,)."""
    noise, blur, block, pattern = judges.deqa_terms(images)
    return (5 - judges.K_NOISE * noise - judges.K_BLUR * blur - judges.K_BLOCK * block
            - judges.K_PATTERN * pattern).clamp(1, 5)


@torch.no_grad()
def empty_probe(model, before, rows, n_prompts=128, steps=40, guidance_scale=4.5, seed=0):
    """{"images": {name: {"sharp"|"autoencoded": {"before", "after"}}}, "models": {row: {"before", "after",
    "changed"}}}: deqa under the judges of commit `before` and the current ones, on empty_images() and on each
    {row: adapter folder or None}'s ODE samples of the first n_prompts pickscore test prompts (the task with
    dark, nearly flat scenes); "changed" is the share of samples whose deqa differs."""
    old, images = judges_at(before), empty_images()
    sharp = torch.stack(list(images.values()))
    kinds = {"sharp": sharp, "autoencoded": model.decode(model.encode_images(sharp)).clamp(0, 1)}
    scores = {k: (deqa_with(old, x), REWARDS["deqa"](x)) for k, x in kinds.items()}
    commit = subprocess.run(["git", "rev-parse", before], capture_output=True, text=True, check=True).stdout.strip()
    out = {"before_commit": commit, "images": {n: {k: {"before": round(b[i].item(), 2), "after": round(a[i].item(), 2)} for k, (b, a) in scores.items()}
                      for i, n in enumerate(images)}, "models": {}}
    prompts = [r["prompt"] for r in toy_world.prompts("pickscore", "test")[:n_prompts]]
    for row, folder in rows.items():
        if folder:
            load_lora(model, folder, row)
        model.adapter(row if folder else None)
        x = sample_images(model, prompts, steps, guidance_scale, seed)
        b, a = deqa_with(old, x), REWARDS["deqa"](x)
        out["models"][row] = {"before": b.mean().item(), "after": a.mean().item(), "changed": (a != b).float().mean().item()}
    return out


def main(argv=None):
    def flags(group):
        group.add_argument("--n", type=int, default=300, help="images per GenEval sub-task and for OCR")
        group.add_argument("--styles", action="store_true", help="what each web style costs the rewards, instead")
        group.add_argument("--out", default="", help="also write the numbers here as JSON (with the command)")
        group.add_argument("--empty_before", default="", metavar="COMMIT",
                           help="deqa on empty images and models' samples, COMMIT's judges against these (empty_probe)")
        group.add_argument("--probe_lora", action="append", default=[], metavar="ROW=PATH",
                           help="with --empty_before: a model to sample besides the base (repeat)")
    cfg, args = parse_args(argv, __doc__, flags)
    model = load_model(cfg)

    def save(obj):   # --out: the printed numbers as JSON, for the README's tables (tools/doc_tables.py)
        if args.out:
            write_json(args.out, {"command": this_command(), **obj})
    if args.empty_before:   # a section of its own in --out (results/judges.json holds the judges' other probes)
        probe = {"command": this_command(), **empty_probe(model, args.empty_before,
                                                           {"base": None, **named_paths(args.probe_lora)}, args.n)}
        if args.out:
            old = json.load(open(args.out)) if os.path.exists(args.out) else {}
            write_json(args.out, {**old, "empty": probe})
        print(json.dumps(probe, indent=1))
        return
    if args.styles:
        costs = style_costs(model, args.n, cfg.seed)
        save({"styles": costs})
        print("| stratum | clean | web style | blurred | deqa clean | deqa web | deqa blurred | web style detected |")
        print("|---|---|---|---|---|---|---|---|")
        for s, c in costs.items():
            print(f"| {s} | {c['clean']:.2f} | {c['web']:.2f} | {c['blurred']:.2f} | {c['deqa/clean']:.2f} | "
                  f"{c['deqa/web']:.2f} | {c['deqa/blurred']:.2f} | {c['web_detected']:.2f} |")
        return
    truth, drawn = (reward_calibration(model, args.n, cfg.seed, samples, cfg.eval_steps, cfg.guidance_scale)
                    for samples in (False, True))
    save({"ground_truth": truth, "samples": drawn})
    print("| stratum | ground truth through the AE | flipped by ±2/255 | model samples | flipped by ±2/255 |")
    print("|---|---|---|---|---|")
    for s in truth:
        print(f"| {s} | {truth[s]['reward']:.3f} ± {truth[s]['ci95']:.3f} | {truth[s]['flip']:.1%} | "
              f"{drawn[s]['reward']:.3f} ± {drawn[s]['ci95']:.3f} | "
              f"{drawn[s]['flip']:.1%} |")


if __name__ == "__main__":
    main()
