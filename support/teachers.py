"""
What each Flow-GRPO teacher is (Flow-OPD §2.1 stage 1, §4): the reward it is trained with and the prompts it
sees, and how the distillation stage loads the saved teachers and the MAR anchor as adapters on one backbone.
The teachers' GRPO loop itself is in train.py (`--stage teachers`), beside the Flow-OPD loop it feeds.
"""
import os

import torch

from support import models
from support.provenance import weights_sha256
from support.resolve import adapter_folder, named_paths, reward_registry
from support.rollouts import trainable
from rewards import REWARDS
from router import DEFAULT_TASK_WEIGHTS
from world import styles, toy_world

# What each GRPO expert is rewarded with (rewards.combined_reward weights; "task" = the prompt's own
# task reward) and which prompts it trains on. The paper's DeQA teacher blends DeQA and PickScore 4:6
# on all three datasets: its weights come from --deqa_teacher_weight (reward_weights; default 0.4).
# GRPO-Mix adds DeQA to the task reward 1:1 (the released config uses 0.8:0.2).
TEACHER_REWARDS = {"geneval": {"task": 1.0}, "ocr": {"task": 1.0}, "pickscore": {"task": 1.0},
                   "grpo_mix": {"task": 1.0, "deqa": 1.0}}
TEACHER_TASKS = {"geneval": {"geneval": 1}, "ocr": {"ocr": 1}, "pickscore": {"pickscore": 1},
                 "deqa": {t: 1 for t in toy_world.TASKS}, "grpo_mix": DEFAULT_TASK_WEIGHTS}

# A control, not a paper teacher: `--teachers brightness` rewards the mean pixel value on every prompt. The
# same GRPO code learns it within ten iterations, so a reward whose teacher does not learn is the reward's
# problem, not the loop's (results/RESULTS.md, "How much of a GRPO gradient is signal").
CONTROLS = ("brightness",)
TEACHER_REWARDS["brightness"] = {"task": 1.0}
TEACHER_TASKS["brightness"] = {t: 1 for t in toy_world.TASKS}

# A biased teacher, for the open question of what one bad expert does to the student (tools/questions.py,
# biased_teacher): a composition teacher whose judge wants every object red, whatever colour the prompt asks
# for. Shapes, counts and positions are scored as GenEval scores them, so the bias is the colour alone, and a
# reader sees it in a grid. `--teachers geneval_red` trains it on the composition prompts.
BIASED = {"geneval_red": "red"}
TEACHER_REWARDS["geneval_red"] = {"task": 1.0}
TEACHER_TASKS["geneval_red"] = {"geneval": 1}


def brightness(images, prompts, metadata):
    """Mean pixel value in [0, 1] per image, (B,): the control reward."""
    return images.float().mean(dim=(1, 2, 3))


def one_colour_metadata(meta, colour):
    """GenEval metadata with every included object asked in `colour` (the biased judge's reading of a prompt)."""
    return {**meta, "include": [{**clause, "color": colour} for clause in meta["include"]]}


def biased_geneval(colour):
    """The world's GenEval reward as a judge that wants every object in `colour` (BIASED), (B,)."""
    def reward(images, prompts, metadata):
        return REWARDS["geneval"](images, prompts, [one_colour_metadata(m, colour) for m in metadata])
    return reward


def reward_weights(name, cfg):
    """combined_reward's weights for teacher `name`: TEACHER_REWARDS, or for the deqa teacher the blend
    --deqa_teacher_weight w sets (w * deqa/5 + (1 - w) * pickscore; the paper's 0.4, 1.0 = deqa alone)."""
    if name != "deqa":
        return TEACHER_REWARDS[name]
    w = cfg.deqa_teacher_weight
    return {k: v for k, v in (("deqa", w), ("pickscore", 1 - w)) if v > 0}


def rewards_for(name, cfg):
    """The reward registry teacher `name` is trained with: the control's own for a control, the biased judge for
    a BIASED teacher, else the world's (or the real backends the *_reward flags choose)."""
    if name in CONTROLS:
        return {t: brightness for t in toy_world.TASKS}  # TEACHER_REWARDS["brightness"] = each prompt's "task"
    if name in BIASED:
        return {**reward_registry(cfg), "geneval": biased_geneval(BIASED[name])}
    return reward_registry(cfg)


def new_grpo_lora(model, name, cfg):
    """Add a fresh LoRA `name` (rank, alpha and targets from cfg), make it active, return its fp32 parameters."""
    targets = {"attention": models.LORA_TARGETS, "wide": models.LORA_TARGETS_WIDE}[cfg.lora_targets]
    model.add_lora(name, cfg.lora_rank, cfg.lora_alpha, targets)
    model.adapter(name)
    return trainable(model, name)


def rollout_styles(images, records, rewards_fns):
    """{"web": share, "blurred": share} of the world's web and low-quality styles among rollout images (the
    headroom a teacher can learn, world/styles.py); {} when the rewards or prompts are not the world's."""
    if rewards_fns is not REWARDS or any(r["task"] not in toy_world.TASKS for r in records):
        return {}
    web = [styles.web_style(task, images[[i for i, r in enumerate(records) if r["task"] == task]],
                            [r for r in records if r["task"] == task]) for task in {r["task"] for r in records}]
    return {"web": torch.cat(web).mean().item(), "blurred": styles.blurred(images).mean().item()}


def routed_pool(pool, teachers):
    """The distillation's prompt pool {task: records}: `pool`, plus for a routed teacher whose task is no
    dataset of the pool (the deqa teacher as a fourth expert) the prompts of every task it was trained on
    (TEACHER_TASKS), retagged with its name so that router.route sends them to it."""
    extra = {t: [dict(r, task=t) for task in TEACHER_TASKS[t] if task in pool for r in pool[task]]
             for t in teachers if t not in pool and t in TEACHER_TASKS}
    return {**pool, **extra}
def guidance_scales(cfg):
    """{routed teacher: its own CFG scale} from --teacher_guidance NAME=SCALE (Config checked the form): those
    teachers' velocities are guided at that scale; the others, the anchor, the student and its rollouts at
    --guidance_scale. Empty by default, so nothing changes."""
    return {name: float(scale) for name, scale in named_paths(cfg.teacher_guidance).items()}


def load_teachers(model, cfg):
    """Load the routed teachers and the MAR anchor as adapters on the one backbone. Returns ({task: teacher
    adapter}, the anchor adapter or None for the base, {adapter: {"path": folder or hub id, "sha256": of the
    weights loaded}}). --teacher NAME=PATH_OR_ID
    gives them (SD3: the published PEFT teachers); without it the world's teachers in cfg.teacher_dir are
    used, and a missing one is an error naming the command that trains it. --mar is deqa, base, none, or a
    PATH_OR_ID."""
    anchor = {"deqa": "deqa", "base": None, "none": None}.get(cfg.mar_anchor, "anchor")
    if cfg.teacher:
        sources = named_paths(cfg.teacher)
    else:
        names = cfg.routes + (["deqa"] if anchor == "deqa" else [])
        missing = [n for n in names if not os.path.isdir(os.path.join(cfg.teacher_dir, n))]
        if missing:
            raise SystemExit(f"teachers {' '.join(missing)} not found in {cfg.teacher_dir}: train them first with "
                             f"`python train.py --stage teachers --teachers {' '.join(missing)} --teacher_dir "
                             f"{cfg.teacher_dir}` (or pass --teacher NAME=PATH_OR_ID)")
        sources = {n: os.path.join(cfg.teacher_dir, n) for n in names}
    if anchor == "anchor":
        sources["anchor"] = cfg.mar_anchor
    elif anchor == "deqa" and "deqa" not in sources:
        raise SystemExit("--mar deqa needs a deqa teacher: add --teacher deqa=PATH_OR_ID, or pass "
                         "--mar PATH_OR_ID (e.g. the published DeQA teacher), --mar base or --mar none")
    unguided = sorted(set(guidance_scales(cfg)) - {n for n in sources if n in cfg.routes})
    if unguided:
        raise SystemExit(f"--teacher_guidance {' '.join(unguided)}: not a routed teacher (those: "
                         f"{' '.join(n for n in sources if n in cfg.routes)}); anchor, student: --guidance_scale")
    unrouted = [n for n in sources if n not in cfg.routes and n not in ("deqa", "anchor")]
    if unrouted:
        raise SystemExit(f"teachers {unrouted} have no route: name teachers by task ({cfg.routes}) or set --routes")
    loaded = {}
    for name, spec in sources.items():
        try:
            folder = adapter_folder(name, spec)
            model.load_adapter(folder, name)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"teacher {name}: {e}") from None
        loaded[name] = {"path": spec, "sha256": weights_sha256(folder)}   # a hub id's too: its downloaded files
    return {n: n for n in sources if n in cfg.routes}, anchor, loaded
