"""
The one configuration of every stage: a dataclass whose fields are all `--name value` flags of train.py.

Defaults are the miniature world's; where the paper (Flow-OPD §4) or the released code uses another value,
the field's comment gives it. Time convention throughout: t = sigma in [0, 1], t = 1 is noise (SD3 /
Flow-GRPO). List fields take several values, and repeating the flag adds more (`--teacher a=X --teacher b=Y`);
booleans take true/false; `--model`/`--pretrained_model_name_or_path` and `--mar` are aliases in the
conventions of diffusers' scripts and of the paper's command lines.

Below the parser: what the flags point to, resolved once per stage (`--model` to a T2IModel, `--teacher`
specs to adapter folders, `--prompts` files to records, `--*_reward` to the reward registry).
"""
import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field

import torch

import models
import toy_world


@dataclass
class Config:
    stage: str = "pretrain"          # which stage to run
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    out_dir: str = "checkpoints"     # committed world checkpoints live here
    base: str = "checkpoints/base"   # the pretrained base model folder
    # --- pretraining the world's base (§2.2) ---
    ae_steps: int = 1500             # autoencoder steps
    pretrain_steps: int = 6000       # flow-matching steps
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_dataset: int = 40_000   # images rendered and encoded once; captions are re-drawn every step
    caption_noise: float = 0.3       # share of corrupted captions (toy_world.corrupt_caption)
    cfg_dropout: float = 0.1         # share of empty captions, for classifier-free guidance
    snapshots: list[int] = field(default_factory=list)  # extra pretrain steps at which to save base-STEP/
    init_from: str = ""              # continue pretraining a saved world model (then ae_steps may be 0)
    step_offset: int = 0             # steps already done by init_from, for snapshot names and logs
    eval_at_end: bool = True         # print the four scores on the test prompts after the stage
    # --- sampling (§2.4) ---
    num_steps: int = 10              # T: training SDE steps
    eval_steps: int = 40             # ODE steps for evaluation
    cfg_scale: float = 4.5           # classifier-free guidance scale (released code; paper silent)
    noise_level: float = 0.7         # a in sigma_t = a sqrt(t / (1 - t))
    # evaluation sizes (eval.py), on every path (world prompts, --eval_prompts files, eval.py): GenEval scores
    # all its prompts x 4 images; the defaults keep the main job within 5 CPU minutes (README)
    eval_prompts_per_task: int = 48  # prompts per task, stratified by sub-task (GenEval tag); 0 = all
    eval_images_per_prompt: int = 2  # images per prompt (GenEval: 4), each from its own (seed, prompt, image) noise
    eval_batch: int = 32             # images per evaluation sampling call (CFG doubles the transformer batch)
    decode_batch: int = 16           # latents per VAE decode call, evaluation and rollouts (SD3.5 at 512 px:
                                     # ~0.4 GB of bf16 activations per image)
    # --- GRPO teachers and GRPO-Mix (Flow-GRPO; §2.1, §4) ---
    teachers: list[str] = field(default_factory=lambda: ["geneval", "ocr", "pickscore", "deqa"])
    teacher_dir: str = "checkpoints/teachers"
    grpo_iters: int = 150            # GRPO iterations per teacher (one optimizer step each)
    prompts_per_iter: int = 4        # prompts per iteration; each is sampled group_size times
    group_size: int = 8              # G: images per prompt, one advantage group
    micro_batch: int = 16            # samples per forward; independent of G (ECOSYSTEM asks #1-#3)
    train_timesteps: int = 4         # SDE steps trained per iteration, drawn from the first T - 1
    sde_window: int = 2              # >0: Flow-GRPO-Fast, SDE on this many consecutive early steps, ODE
                                     # elsewhere, and only those steps trained (sharper credit assignment)
    shared_noise: bool = True        # a group's G samples start from one x1 (branching at the SDE window)
    lora_rank: int = 32              # r (paper: 32)
    lora_alpha: int = 64             # alpha (paper: 64)
    lora_targets: str = "attention"  # attention (Flow-GRPO's q/k/v/out projections) | wide (+ MLPs, adaLN)
    lr: float = 5e-4                 # AdamW on the LoRA parameters (GRPO stages)
    clip_range: float = 1e-4         # PPO epsilon (Flow-GRPO default)
    beta: float = 0.0                # beta of the KL to the base; Flow-GRPO: 0.04 geneval/ocr, 0.01 pickscore
    adv_std: str = "group"           # advantage std: per "group" or "global" (flow_grpo global_std)
    snr_batches: int = 16            # --stage grpo_snr: independent batch gradients per teacher
    # --- Flow-OPD (§2.5-2.8) ---
    routes: list[str] = field(default_factory=lambda: ["geneval", "ocr", "pickscore"])  # tasks with a teacher
    cold_start: str = "merge"        # merge (exact mean dW) | merge_average (released A/B mean) | sft | none
    sft_samples: int = 256           # sft cold start: ODE samples per teacher ...
    sft_steps: int = 200             # ... and flow-matching steps on them
    mar_anchor: str = "deqa"         # deqa (the paper's aesthetic teacher) | base (released default) | none
    mar_lambda: float = 0.02         # lambda = beta of MAR (paper 0.02; released 0.04)
    estimator: str = "pathwise"      # pathwise | logratio | released (opd_loss.py)
    opd_iters: int = 40              # distillation iterations (one optimizer step each)
    opd_prompts: int = 16            # prompts per iteration
    opd_group: int = 1               # samples per prompt (OPD needs no group baseline)
    opd_lr: float = 1e-3             # AdamW on the student LoRA
    soft_routing: float = 0.0        # eps > 0: mix all teachers, (1 - eps) own + eps / K each (router.py)
    eval_every: int = 0              # evaluate the student every N distill iterations (0: only at the end)
    checkpoint_every: int = 0        # every N iterations a checkpoint-N/ in <student_dir>/<name> (distill)
                                     # or in <teacher_dir>/runs/<name> (teachers, grpo_mix)
    student_dir: str = "checkpoints/students"
    cold_start_dir: str = "checkpoints/cold_start"
    name: str = ""                   # student name (default: <cold_start> or <cold_start>_no_mar)
    # --- the whole pipeline (--stage all) and its tables ---
    runs_dir: str = "runs"           # seed-dependent outputs: runs/seed<S>/{grpo_mix, cold_start, students}
    results_dir: str = "results"     # tables (seed<S>.json, main.json, ood.json), grids and curves
    ablations: bool = True           # also train the estimator and cold-start ablations
    # --- the real path (README "Run on SD3.5-Medium"): --model is then a pipeline folder or hub id ---
    teacher: list[str] = field(default_factory=list)       # NAME=PATH_OR_ID PEFT teachers (default: the world's)
    prompts: list[str] = field(default_factory=list)       # TASK=FILE train prompts (prompts.py; default: world)
    eval_prompts: list[str] = field(default_factory=list)  # TASK=FILE test prompts (default: the world's)
    resolution: int = 0              # pixels (paper: 512 on SD3.5-M); 0 = the model's native size
    ocr_reward: str = "world"        # world | rapidocr                     (reward_backends.py)
    pickscore_reward: str = "world"  # world | PATH_OR_ID of a PickScore CLIP
    geneval_reward: str = "world"    # world | URL of a flow_grpo GenEval reward server
    deqa_reward: str = "world"       # world | URL of a DeQA reward server
    mixed_precision: str = "bf16" if torch.cuda.is_available() else "no"  # bf16 autocast of forwards (CUDA)
    gradient_checkpointing: bool = False
    # --- checkpoints (checkpoint.py) ---
    resume_from_checkpoint: str = ""  # latest | PATH of a checkpoint-N folder
    checkpoints_total_limit: int = 0  # keep only the newest N checkpoints (0: all)
    ema_decay: float = 0.0           # EMA of the student LoRA, used for the saved student (0: off)
    log_rewards: bool = True         # score the student's training samples every iteration (logs only)
    compile: bool = torch.cuda.is_available()  # torch.compile the velocity-discrepancy core

    def __post_init__(self):
        if self.lora_targets not in ("attention", "wide"):
            raise ValueError(f"lora_targets must be attention or wide, got {self.lora_targets!r}")
        if not 0 <= self.soft_routing <= 1:
            raise ValueError(f"soft_routing must be in [0, 1], got {self.soft_routing}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for flag in ("teacher", "prompts", "eval_prompts"):
            for spec in getattr(self, flag):
                if "=" not in spec:
                    raise ValueError(f"--{flag} expects NAME=PATH entries, got {spec!r}")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.num_steps < 2 or self.eval_steps < 1:
            raise ValueError("num_steps must be >= 2 and eval_steps >= 1")
        if self.eval_prompts_per_task < 0 or min(self.eval_images_per_prompt, self.eval_batch, self.decode_batch) < 1:
            raise ValueError("eval_prompts_per_task must be >= 0 (0 = all) and eval_images_per_prompt, eval_batch, "
                             "decode_batch >= 1")


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# Flag aliases in the conventions of diffusers' scripts and of the paper's command lines.
ALIASES = {"base": ["--model", "--pretrained_model_name_or_path"], "mar_anchor": ["--mar"]}
# Flags that are gone, and what replaced them.
REMOVED = {"--eval_limit": "--eval_prompts_per_task N (stratified by sub-task, 0 = all) and --eval_images_per_prompt K "
                           "(also --eval_batch, --decode_batch)"}


def parse_config(argv=None, description=__doc__):
    """Every Config field is a `--name value` flag (see the module docstring); returns a checked Config."""
    for arg in argv if argv is not None else sys.argv[1:]:
        if arg.split("=")[0] in REMOVED:
            raise SystemExit(f"{arg.split('=')[0]} was removed: use {REMOVED[arg.split('=')[0]]}")
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        names = [f"--{f.name}"] + ALIASES.get(f.name, [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):  # None: flag absent, the dataclass default applies
            ap.add_argument(*names, dest=f.name, nargs="*", action="extend", type=typing.get_args(f.type)[0])
        elif isinstance(default, bool):
            ap.add_argument(*names, dest=f.name, type=_bool, default=default)
        else:
            ap.add_argument(*names, dest=f.name, type=type(default), default=default)
    return Config(**{k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None})


# ----------------------------------------------------------------------------------------------------------
# What the flags point to: the model, adapter folders, prompt files, the reward backends (train.py's stages)

def named_paths(specs):
    """["NAME=PATH", ...] -> {NAME: PATH} (Config checked the form)."""
    return dict(s.split("=", 1) for s in specs)


def load_model(cfg):
    """models.load_model for --model (an SD3 pipeline in bf16 when mixed_precision is bf16), at
    --resolution, with gradient checkpointing if asked."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    try:
        model = models.load_model(cfg.base, cfg.device, dtype)
    except FileNotFoundError as e:
        raise SystemExit(f"--model: {e}") from None
    if cfg.resolution:
        model.set_resolution(cfg.resolution)
    model.decode_batch = cfg.decode_batch
    if cfg.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    return model


def adapter_folder(name, spec):
    """A PEFT adapter folder from a local path, or a hub id downloaded once by huggingface_hub."""
    if os.path.isdir(spec):
        return spec
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(spec)
    except Exception as e:
        raise SystemExit(f"adapter {name}: {spec!r} is not a folder here and could not be downloaded "
                         f"({type(e).__name__}). Download it where the hub is reachable "
                         f"(`hf download {spec} --local-dir DIR`) and pass {name}=DIR") from None


def prompt_pool(specs, split):
    """{task: records}: the TASK=FILE prompt files (prompts.py formats), else the world's `split` prompts."""
    if not specs:
        return {t: toy_world.prompts(t, split) for t in toy_world.TASKS}
    import prompts
    try:
        return {task: prompts.read_prompts(path, task) for task, path in named_paths(specs).items()}
    except (OSError, ValueError) as e:
        raise SystemExit(f"prompt file: {e}") from None


def reward_registry(cfg):
    """The world's rewards (rewards.REWARDS), with real-image backends swapped in by the *_reward flags."""
    import rewards
    choice = dict(ocr=cfg.ocr_reward, pickscore=cfg.pickscore_reward, geneval=cfg.geneval_reward,
                  deqa=cfg.deqa_reward)
    if all(v == "world" for v in choice.values()):
        return rewards.REWARDS
    import reward_backends
    return reward_backends.make_rewards(**choice)


def eval_settings(cfg):
    """eval.evaluate's settings from the flags (the same on the world's prompts and --eval_prompts files)."""
    return dict(prompts_per_task=cfg.eval_prompts_per_task, images_per_prompt=cfg.eval_images_per_prompt,
                steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed, batch_size=cfg.eval_batch)
