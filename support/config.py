"""
The one configuration of every stage and tool: a dataclass whose fields are all `--name value` flags, each with its
help, its default and the values it accepts (`python train.py --help`). A leaf: it imports no project module.
Defaults are the miniature world's; where the paper (Flow-OPD §4) or the released code uses another value, the help
gives it. Time convention throughout: t = sigma in [0, 1], t = 1 is noise (SD3 / Flow-GRPO). Lists take several
values and repeated flags add more; booleans take true/false; --model and --mar are aliases (diffusers' and the
paper's names). `--preset sd35m_paper` fills in the paper's SD3.5-Medium settings (PRESETS, each with its source)
under the flags given; describe(cfg) lists what differs from the defaults (train.py prints it). Values are checked
when parsed, before any model loads: a bad one ends the command with one line naming the flag and what it accepts.
"""
import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field

import torch

CUDA = torch.cuda.is_available()


def opt(default, help, choices=None, low=None, high=None):
    """A Config field: its default, its --help text, and the values it accepts (choices, or a range low..high)."""
    meta = dict(help=help, choices=choices, low=low, high=high)
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- the run ---
    stage: str = opt("distill", "which stage of train.py to run", choices=("distill", "teachers", "grpo_mix"))
    device: str = opt("cuda" if CUDA else "cpu", "torch device (cuda, cuda:N or cpu)")
    seed: int = opt(0, "seed of prompts, noise and initialisation")
    base: str = opt("checkpoints/base", "the base model: a world model folder, or an SD3 pipeline folder or hub id")
    eval_at_end: bool = opt(True, "score the trained models on the test prompts when the stage ends")
    preset: str = opt("", "sd35m_paper: the paper's SD3.5-M settings; flags given win", choices=("", "sd35m_paper"))
    mixed_precision: str = opt("bf16" if CUDA else "no", "autocast of the model forwards on CUDA: bf16, no, or fp16 "
                               "(a loss scaler; SD3's text encoders in bf16)", choices=("no", "bf16", "fp16"))
    report_to: str = opt("none", "tensorboard: scalars, grids in RUN/tensorboard", choices=("none", "tensorboard"))
    compile: bool = opt(CUDA, "torch.compile the velocity-discrepancy core (opd_loss.flow_opd_loss)")
    gradient_checkpointing: bool = opt(False, "recompute the transformer's activations in backward (memory)")
    # --- sampling (§2.4) ---
    num_steps: int = opt(10, "T: SDE steps of a training rollout (paper 10)", low=2)
    eval_steps: int = opt(40, "ODE steps of an evaluation sample (paper 40)", low=1)
    guidance_scale: float = opt(4.5, "CFG scale (released code 4.5; the paper is silent); 1: no CFG, one pass", low=0)
    noise_level: float = opt(0.7, "a in sigma_t = a sqrt(t / (1 - t)) (paper 0.7)", low=0)
    # --- evaluation (eval.py and the end of every stage); GenEval scores all its prompts x 4 images ---
    eval_prompts_per_task: int = opt(30, "test prompts per task, stratified by sub-task (GenEval tag); 0 = all", low=0)
    eval_images_per_prompt: int = opt(2, "images per test prompt, each its own noise (GenEval: 4)", low=1)
    eval_batch: int = opt(32, "images per evaluation sampling call (CFG doubles the transformer batch)", low=1)
    decode_batch: int = opt(16, "latents per VAE decode call (SD3.5 at 512 px: ~0.4 GB per image)", low=1)
    eval_every: int = opt(0, "every N training iterations (and before the first) a probe evaluation (0 = off)", low=0)
    probe_prompts_per_task: int = opt(8, "the probe's prompts per task (stratified), one image each", low=1)
    # --- pretraining the world's base (python -m tools.pretrain_world; §2.2) ---
    ae_steps: int = opt(1500, "autoencoder steps (0 when continuing a base)", low=0)
    ae_decoder_only: bool = opt(False, "fine-tune only the decoder (continuing a base: its latents keep their meaning)")
    pretrain_steps: int = opt(6000, "flow-matching steps", low=0)
    pretrain_batch: int = opt(64, "images per pretraining step", low=1)
    pretrain_lr: float = opt(1e-3, "AdamW learning rate of pretraining", low=0)
    pretrain_dataset: int = opt(40_000, "images rendered and encoded once; captions are re-drawn every step", low=1)
    caption_noise: float = opt(0.3, "share of corrupted captions (world/captions.py)", low=0, high=1)
    cfg_dropout: float = opt(0.1, "share of empty captions, for classifier-free guidance", low=0, high=1)
    snapshots: list[int] = opt([], "extra pretraining steps at which to save base-STEP/")
    init_from: str = opt("", "continue pretraining this saved world model folder")
    step_offset: int = opt(0, "steps already done by --init_from, for snapshot names and logs", low=0)
    # --- both trainers (GRPO teachers and Flow-OPD) ---
    teacher_dir: str = opt("checkpoints/teachers", "folder of the world's teachers (one adapter folder each)")
    micro_batch: int = opt(16, "samples per forward; independent of G (PAPER_NOTES.md §7)", low=1)
    train_timesteps: int = opt(4, "SDE steps trained per iteration, drawn from the first T - 1 (paper: all)", low=1)
    balance_tags: bool = opt(True, "RL draws GenEval prompts uniformly over sub-tasks (false: over prompts)")
    lora_rank: int = opt(32, "r of every new LoRA (paper 32)", low=1)
    lora_alpha: int = opt(64, "alpha of every new LoRA (paper 64)", low=1)
    checkpoint_every: int = opt(0, "every N iterations a checkpoint-N/ of the run (0 = off)", low=0)
    resume_from_checkpoint: str = opt("", "latest, or the path of a checkpoint-N folder")
    checkpoints_total_limit: int = opt(0, "keep only the newest N checkpoints (0 = all)", low=0)
    # --- the GRPO teachers and GRPO-Mix (--stage teachers, grpo_mix; python -m tools.grpo_snr) ---
    teachers: list[str] = opt(["geneval", "ocr", "pickscore", "deqa"], "the teachers to train (or the control brightness, the biased geneval_red)")
    grpo_iters: int = opt(60, "GRPO iterations per teacher, one optimizer step each", low=1)
    prompts_per_iter: int = opt(4, "prompts per GRPO iteration, each sampled G times", low=1)
    group_size: int = opt(8, "G: images per prompt, one advantage group (paper 24)", low=2)
    sde_window: int = opt(2, "Flow-GRPO-Fast: SDE (and training) on this many early steps; 0: every step", low=0)
    sde_window_range: float = opt(0.2, "the window starts in this first fraction (0, 1] of the steps (flow_grpo 0.5)")
    shared_noise: bool = opt(True, "a group's G samples start from one x1 (they branch at the SDE window)")
    lora_targets: str = opt("attention", "attention (q/k/v/out, Flow-GRPO's) or wide (+ MLPs, adaLN)",
                            choices=("attention", "wide"))
    lr: float = opt(5e-4, "AdamW learning rate of the GRPO LoRA (released GRPO-Mix 1e-4)", low=0)
    clip_range: float = opt(1e-4, "PPO epsilon (Flow-GRPO's default)", low=0)
    beta: float = opt(0.0, "weight of the KL to the base (Flow-GRPO: 0.04 geneval/ocr, 0.01 pickscore)", low=0)
    adv_std: str = opt("group", "advantage std per group or global (flow_grpo)", choices=("group", "global"))
    deqa_teacher_weight: float = opt(0.4, "w of the deqa teacher's reward w*deqa/5 + (1-w)*pickscore (paper 0.4)",
                                     low=0, high=1)
    snr_batches: int = opt(16, "tools.grpo_snr: independent batch gradients per teacher", low=2)
    # --- Flow-OPD (--stage distill; §2.5-2.8) ---
    routes: list[str] = opt(["geneval", "ocr", "pickscore"], "the tasks with a routed teacher")
    cold_start: str = opt("merge", "merge (exact mean dW), merge_average (released A/B mean), sft, none",
                          choices=("merge", "merge_average", "sft", "none"))
    sft_samples: int = opt(256, "sft cold start: ODE samples per teacher", low=1)
    sft_steps: int = opt(200, "sft cold start: flow-matching steps on them", low=1)
    mar_anchor: str = opt("deqa", "the MAR anchor: deqa (paper), base (released), none, or a PEFT PATH_OR_ID")
    mar_lambda: float = opt(0.02, "lambda of MAR (paper 0.02; released 0.04)", low=0)
    estimator: str = opt("pathwise", "the OPD estimator (opd_loss.py)", choices=("pathwise", "logratio", "released"))
    opd_iters: int = opt(40, "distillation iterations, one optimizer step each", low=1)
    opd_prompts: int = opt(16, "prompts per distillation iteration", low=1)
    opd_group: int = opt(1, "samples per prompt (OPD needs no group baseline)", low=1)
    opd_lr: float = opt(1e-3, "AdamW learning rate of the student LoRA (released 1e-4)", low=0)
    soft_routing: float = opt(0.0, "eps > 0: all teachers mixed, (1-eps) own + eps/K each (router)", low=0, high=1)
    ema_decay: float = opt(0.0, "EMA of the student LoRA, used for the saved student (0 = off)", low=0, high=1)
    log_rewards: bool = opt(True, "score the student's training samples every iteration (logs only)")
    student_dir: str = opt("checkpoints/students", "where students are saved, one folder per --name")
    cold_start_dir: str = opt("checkpoints/cold_start", "where cold starts are saved and reused")
    name: str = opt("", "the student's name (default: <cold_start>, or <cold_start>_no_mar)")
    teacher_guidance: list[str] = opt([], "NAME=SCALE: a routed teacher's own CFG scale (default: --guidance_scale)")
    # --- the paper's tables (python -m tools.paper_tables) ---
    runs_dir: str = opt("runs", "seed-dependent outputs: runs/seed<S>/{grpo_mix, cold_start, students}")
    results_dir: str = opt("results", "tables (seed<S>.json, main.json, ood.json), grids and curves")
    ablations: bool = opt(True, "also train the estimator and cold-start ablations")
    # --- the real path (README "Run on SD3.5-Medium"): --model is then a pipeline folder or hub id ---
    teacher: list[str] = opt([], "NAME=PATH_OR_ID PEFT teachers (default: the world's, in --teacher_dir)")
    prompts: list[str] = opt([], "TASK=FILE training prompts (support/prompts.py formats; default: the world's)")
    eval_prompts: list[str] = opt([], "TASK=FILE test prompts (default: the world's test split)")
    resolution: int = opt(0, "pixels (paper: 512 on SD3.5-M); 0 = the model's native size", low=0)
    train_resolution: int = opt(0, "pixels of the training rollouts (0 = --resolution, which evaluation uses)", low=0)
    text_encoder_device: str = opt("", "SD3's text encoders: empty = --device; cpu frees ~11 GB of GPU memory")
    max_sequence_length: int = opt(128, "T5 tokens of SD3's prompts (flow_grpo 128; diffusers 256)", low=1, high=512)
    ocr_reward: str = opt("world", "world, or rapidocr (support/reward_backends.py)", choices=("world", "rapidocr"))
    pickscore_reward: str = opt("world", "world, or the PATH_OR_ID of a PickScore CLIP")
    geneval_reward: str = opt("world", "world, or the URL of a flow_grpo GenEval reward server")
    deqa_reward: str = opt("world", "world, or the URL of a DeQA reward server")

    def __post_init__(self):
        if not 0 < self.sde_window_range <= 1:   # a fraction of the steps: the window needs at least its first
            raise ValueError(f"--sde_window_range {self.sde_window_range}: must be in (0, 1]")
        for f in dataclasses.fields(self):
            value, m = getattr(self, f.name), f.metadata
            if m["choices"] is not None and value not in m["choices"]:
                raise ValueError(f"--{f.name} {value!r}: choose one of {', '.join(map(repr, m['choices']))}")
            if (m["low"] is not None and value < m["low"]) or (m["high"] is not None and value > m["high"]):
                span = f"in [{m['low']}, {m['high']}]" if m["high"] is not None else f">= {m['low']}"
                raise ValueError(f"--{f.name} {value}: must be {span}")
        for flag, value in (("teacher", "PATH"), ("prompts", "PATH"), ("eval_prompts", "PATH"),
                            ("teacher_guidance", "SCALE")):
            for spec in getattr(self, flag):   # a SCALE is a number >= 0
                if "=" not in spec or value == "SCALE" and not spec.partition("=")[2].replace(".", "", 1).isdigit():
                    raise ValueError(f"--{flag} expects NAME={value} entries, got {spec!r}")
        if self.text_encoder_device not in ("", "cpu") and not self.text_encoder_device.startswith("cuda"):
            raise ValueError(f"--text_encoder_device {self.text_encoder_device!r}: cpu or cuda[:N] (or empty)")


# The paper's SD3.5-Medium run as one switch (--preset sd35m_paper): field -> (value, source), from the paper
# (PAPER_NOTES.md §3) and the released configs (§6); defaults are repeated so the preset survives their change.
# Not in it: the estimator (pathwise, our departure), mixed_precision, evaluation and memory settings.
PRESETS = {"sd35m_paper": {
    "resolution": (512, "paper §4 and released config: 512 px"),
    "num_steps": (10, "paper T = 10 training steps"),
    "eval_steps": (40, "paper and released: 40 ODE steps for evaluation"),
    "guidance_scale": (4.5, "released code and model card (the paper is silent)"),
    "noise_level": (0.7, "paper a = 0.7"),
    "max_sequence_length": (128, "flow_grpo and released: T5 prompts of 128 tokens"),
    "lora_rank": (32, "paper and released r = 32"),
    "lora_alpha": (64, "paper and released alpha = 64"),
    "cold_start": ("merge_average", "released scripts/merge.py: element-wise mean of A and B, a rank-32 student"),
    "opd_lr": (1e-4, "released config: AdamW lr 1e-4 (the paper is silent)"),
    "opd_prompts": (128, "released: 16 prompts x 16 images per epoch, 2 optimizer steps = 128 samples per "
                         "step; OPD needs no group baseline, so 128 prompts x 1"),
    "opd_group": (1, "one sample per prompt (see opd_prompts)"),
    "train_timesteps": (9, "released timestep_fraction 0.99: int(0.99 x 10) = 9, all of the first T - 1 steps"),
    "ema_decay": (0.9 ** (1 / 8), "released EMA: decay 0.9 every 8 steps = 0.9^(1/8) per step, same half-life"),
    "mar_lambda": (0.02, "paper beta = 0.02 (released config: 0.04)"),
    # the GRPO stages (--stage grpo_mix, teachers) as Flow-GRPO and the released GRPO-Mix config
    "lr": (1e-4, "released GRPO-Mix config: lr 1e-4"),
    "beta": (0.04, "released GRPO-Mix config: KL beta 0.04"),
    "group_size": (24, "paper and released GRPO-Mix: G = 24"),
    "adv_std": ("global", "flow_grpo global_std=True"),
    "sde_window": (0, "plain Flow-GRPO: SDE at every step"),
    "shared_noise": (False, "plain Flow-GRPO: independent initial noise per sample"),
}}


# --help shows the flags in these groups: those of every stage first, then those only one stage or tool reads.
GROUPS = {
    "the run": ("stage", "device", "seed", "base", "eval_at_end", "preset", "mixed_precision", "compile",
                "gradient_checkpointing", "report_to"),
    "sampling (§2.4)": ("num_steps", "eval_steps", "guidance_scale", "noise_level"),
    "evaluation (eval.py and the end of every stage)": (
        "eval_prompts_per_task", "eval_images_per_prompt", "eval_batch", "decode_batch", "eval_every",
        "probe_prompts_per_task"),
    "both trainers": ("teacher_dir", "micro_batch", "train_timesteps", "balance_tags", "lora_rank", "lora_alpha",
                      "checkpoint_every", "resume_from_checkpoint", "checkpoints_total_limit"),
    "the GRPO teachers (--stage teachers, grpo_mix; python -m tools.grpo_snr)": (
        "teachers", "grpo_iters", "prompts_per_iter", "group_size", "sde_window", "sde_window_range", "shared_noise",
        "lora_targets", "lr", "clip_range", "beta", "adv_std", "deqa_teacher_weight", "snr_batches"),
    "Flow-OPD (--stage distill)": (
        "routes", "cold_start", "sft_samples", "sft_steps", "mar_anchor", "mar_lambda", "estimator", "opd_iters",
        "opd_prompts", "opd_group", "opd_lr", "soft_routing", "ema_decay", "log_rewards", "student_dir",
        "cold_start_dir", "name", "teacher_guidance"),
    "SD3.5-Medium and real-image rewards (README)": (
        "teacher", "prompts", "eval_prompts", "resolution", "train_resolution", "text_encoder_device",
        "max_sequence_length", "ocr_reward", "pickscore_reward", "geneval_reward", "deqa_reward"),
    "pretraining the world's base (python -m tools.pretrain_world)": (
        "ae_steps", "ae_decoder_only", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pretrain_dataset",
        "caption_noise", "cfg_dropout", "snapshots", "init_from", "step_offset"),
    "the paper's tables (python -m tools.paper_tables)": ("runs_dir", "results_dir", "ablations"),
}
ALIASES = {"base": ["--model", "--pretrained_model_name_or_path"], "mar_anchor": ["--mar"],
           "guidance_scale": ["--cfg_scale"]}  # flag aliases: diffusers' scripts' and the paper's names
# Flags that are gone, and what replaced them.
REMOVED = {"--eval_limit": "--eval_prompts_per_task N (stratified by sub-task, 0 = all) and --eval_images_per_prompt K",
           "--out_dir": "--base, --teacher_dir, --student_dir and --cold_start_dir (it was never read)",
           "--limit": "--eval_prompts_per_task N", "--prompts_per_task": "--eval_prompts_per_task N",
           "--images_per_prompt": "--eval_images_per_prompt K", "--steps": "--eval_steps N"}


def _bool(s):
    if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


def _shown(value):
    """A value as it would be typed on the command line."""
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.6g}" if isinstance(value, float) else (value if value != "" else '""')


def _check_paths(cfg):
    """Files and folders the flags name, checked before anything loads."""
    for flag, spec in ((flag, spec) for flag in ("prompts", "eval_prompts") for spec in getattr(cfg, flag)):
        if not os.path.isfile(spec.split("=", 1)[1]):
            raise ValueError(f"--{flag} {spec}: no prompt file {spec.split('=', 1)[1]!r}")
    if cfg.init_from and not os.path.isdir(cfg.init_from):
        raise ValueError(f"--init_from {cfg.init_from!r}: not a folder (a saved world model)")
    if cfg.resume_from_checkpoint not in ("", "latest") and not os.path.isdir(cfg.resume_from_checkpoint):
        raise ValueError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint!r}: latest, or a checkpoint-N folder")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written; an entry point's own flags with their defaults (Config's carry their own)."""


def parse_args(argv=None, description="", extra=None):
    """(Config, the other flags' namespace): every Config field is a `--name value` flag (module docstring);
    extra(parser) adds an entry point's own flags (eval.py's --adapter, infer's --prompt, ...), which land in
    the namespace. --preset NAME fills in PRESETS[NAME] first; flags given on the command line override it.
    A bad value ends the command with argparse's one-line error naming the flag."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter,
                                 usage="%(prog)s [--FLAG VALUE ...]   (--help: every flag, its default and meaning)")
    for arg in argv:
        if arg.split("=")[0] in REMOVED:
            ap.error(f"{arg.split('=')[0]} was removed: use {REMOVED[arg.split('=')[0]]}")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for title, names in GROUPS.items():
        group = ap.add_argument_group(title)
        for name in names:
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = _bool if isinstance(default, bool) else typing.get_args(f.type)[0] if isinstance(default, list) \
                else type(default)
            kw = dict(dest=name, type=kind, default=argparse.SUPPRESS, metavar=name.upper(),
                      help=f"{f.metadata['help']} (default: {_shown(default)})".replace("%", "%%"))
            if isinstance(default, list):
                kw.update(nargs="*", action="extend")
            group.add_argument(f"--{name}", *ALIASES.get(name, []), **kw)  # absent flags stay out of the namespace
    if extra is not None:
        extra(ap.add_argument_group("this command's own flags"))
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in fields}
    preset = {k: value for k, (value, _source) in PRESETS.get(given.get("preset", ""), {}).items()}
    try:
        cfg = Config(**{**preset, **given})
        _check_paths(cfg)
    except ValueError as e:
        ap.error(str(e))
    return cfg, argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in fields})


def parse_config(argv=None, description=""):
    """parse_args for the commands with no flags of their own (train.py): the checked Config."""
    return parse_args(argv, description)[0]


def describe(cfg):
    """The settings of a run that differ from Config's defaults, one `--flag value` per line, the preset's
    source beside each value it set; printed at the start of a stage (train.main)."""
    defaults, preset = Config(), PRESETS.get(cfg.preset, {})
    head = f"settings (--preset {cfg.preset}; explicit flags override it)" if cfg.preset else "settings"
    lines = [f"{head}, where they differ from the defaults:"]
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "preset" or value == getattr(defaults, f.name):
            continue
        source = f"   # preset: {preset[f.name][1]}" if f.name in preset and preset[f.name][0] == value else ""
        lines.append(f"  --{f.name} {_shown(value)}{source}")
    return "\n".join(lines if len(lines) > 1 else [f"{head}: the defaults"])
