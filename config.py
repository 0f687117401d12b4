"""
The one configuration of every stage: a dataclass whose fields are all `--name value` flags of train.py.

Defaults are the miniature world's; where the paper (Flow-OPD §4) or the released code uses another value,
the field's comment gives it. Time convention throughout: t = sigma in [0, 1], t = 1 is noise (SD3 /
Flow-GRPO). List fields take several values, and repeating the flag adds more (`--teacher a=X --teacher b=Y`);
booleans take true/false; `--model`/`--pretrained_model_name_or_path` and `--mar` are aliases in the
conventions of diffusers' scripts and of the paper's command lines. `--preset sd35m_paper` fills in the
paper's SD3.5-Medium settings (PRESETS, each value with its source) before the flags given, which win;
`describe(cfg)` lists what differs from the defaults, and train.py prints it when a stage starts.

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
from hub import ModelUnavailableError, hub_advice
from world import toy_world


@dataclass
class Config:
    stage: str = "pretrain"          # which stage to run
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    out_dir: str = "checkpoints"     # committed world checkpoints live here
    base: str = "checkpoints/base"   # the pretrained base model folder
    # --- pretraining the world's base (§2.2) ---
    ae_steps: int = 1500             # autoencoder steps
    ae_decoder_only: bool = False    # fine-tune only the decoder (continuing a base: its latents keep their meaning)
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
    guidance_scale: float = 4.5      # classifier-free guidance scale (released code; paper silent)
    noise_level: float = 0.7         # a in sigma_t = a sqrt(t / (1 - t))
    # evaluation sizes (eval.py), on every path (world prompts, --eval_prompts files, eval.py): GenEval scores
    # all its prompts x 4 images; the defaults keep the main job within 5 CPU minutes (README)
    eval_prompts_per_task: int = 30  # prompts per task, stratified by sub-task (GenEval tag); 0 = all
    eval_images_per_prompt: int = 2  # images per prompt (GenEval: 4), each from its own (seed, prompt, image) noise
    eval_batch: int = 32             # images per evaluation sampling call (CFG doubles the transformer batch)
    decode_batch: int = 16           # latents per VAE decode call, evaluation and rollouts (SD3.5 at 512 px:
                                     # ~0.4 GB of bf16 activations per image)
    balance_tags: bool = True        # RL draws: GenEval prompts uniform over sub-tasks (metadata "tag"); false:
                                     # uniform over prompts, as flow_grpo reads its training file (rollouts.py)
    # --- GRPO teachers and GRPO-Mix (Flow-GRPO; §2.1, §4) ---
    teachers: list[str] = field(default_factory=lambda: ["geneval", "ocr", "pickscore", "deqa"])
    teacher_dir: str = "checkpoints/teachers"
    grpo_iters: int = 60             # GRPO iterations per teacher (one optimizer step each)
    prompts_per_iter: int = 4        # prompts per iteration; each is sampled group_size times
    group_size: int = 8              # G: images per prompt, one advantage group
    micro_batch: int = 16            # samples per forward; independent of G (PAPER_NOTES.md §7, asks 1-3)
    train_timesteps: int = 4         # SDE steps trained per iteration, drawn from the first T - 1
    sde_window: int = 2              # >0: Flow-GRPO-Fast, SDE on this many consecutive early steps, ODE
                                     # elsewhere, and only those steps trained (sharper credit assignment)
    sde_window_range: float = 0.2    # the window lies in this first fraction of the T steps, its start drawn
                                     # uniformly; 0.2: steps 0-1, where the world's styles are decided (RESULTS.md;
                                     # flow_grpo's sde_window_range is (0, T // 2), i.e. 0.5)
    shared_noise: bool = True        # a group's G samples start from one x1 (branching at the SDE window)
    lora_rank: int = 32              # r (paper: 32)
    lora_alpha: int = 64             # alpha (paper: 64)
    lora_targets: str = "attention"  # attention (Flow-GRPO's q/k/v/out projections) | wide (+ MLPs, adaLN)
    lr: float = 5e-4                 # AdamW on the LoRA parameters (GRPO stages)
    clip_range: float = 1e-4         # PPO epsilon (Flow-GRPO default)
    beta: float = 0.0                # beta of the KL to the base; Flow-GRPO: 0.04 geneval/ocr, 0.01 pickscore
    adv_std: str = "group"           # advantage std: per "group" or "global" (flow_grpo global_std)
    deqa_teacher_weight: float = 0.4  # the deqa teacher's reward w*deqa/5 + (1-w)*pickscore (paper 0.4; 1 = deqa only)
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
    eval_every: int = 0              # every N iterations of distillation, GRPO-Mix or a teacher, and before the
                                     # first, a probe evaluation logged with the images sampled so far (the
                                     # curves of avg against images sampled; 0: only at the end)
    probe_prompts_per_task: int = 8  # the probe: this many prompts per task (stratified), one image each
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
    text_encoder_device: str = ""    # SD3's three frozen text encoders: "" = --device; cpu frees ~11 GB of GPU
                                     # memory (they then run in fp32; embeddings move to --device)
    max_sequence_length: int = 128   # T5 tokens of SD3's prompt embedding (flow_grpo, released: 128; diffusers 256)
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
    preset: str = ""                 # sd35m_paper: the paper's SD3.5-M settings (PRESETS); explicit flags win

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
        if not 0 <= self.deqa_teacher_weight <= 1:
            raise ValueError(f"deqa_teacher_weight must be in [0, 1] (the deqa share of the deqa teacher's reward, "
                             f"the rest pickscore), got {self.deqa_teacher_weight}")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.num_steps < 2 or self.eval_steps < 1:
            raise ValueError("num_steps must be >= 2 and eval_steps >= 1")
        if self.eval_prompts_per_task < 0 or min(self.eval_images_per_prompt, self.eval_batch, self.decode_batch) < 1:
            raise ValueError("eval_prompts_per_task must be >= 0 (0 = all) and eval_images_per_prompt, eval_batch, "
                             "decode_batch >= 1")
        if self.eval_every < 0 or self.probe_prompts_per_task < 1:
            raise ValueError("eval_every must be >= 0 (0 = off) and probe_prompts_per_task >= 1")
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets: {sorted(PRESETS)}")
        if self.text_encoder_device and not (self.text_encoder_device == "cpu"
                                             or self.text_encoder_device.startswith("cuda")):
            raise ValueError(f"text_encoder_device must be cpu or cuda[:N] (or empty for --device), "
                             f"got {self.text_encoder_device!r}")
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512 (T5's limit), got {self.max_sequence_length}")


# The paper's SD3.5-Medium run as one switch (--preset sd35m_paper): field -> (value, source). Sources: the
# paper's setup (PAPER_NOTES.md §3) and the released code's mix_opd_8gpu/base.py configs (§6). Values equal
# to today's defaults are listed too, so the preset still holds if a default changes for the miniature world.
# Not in it: the estimator (pathwise, our documented departure; `--estimator released` is the released one),
# mixed_precision (bf16; released fp16), evaluation sizes (the paper scores the full test sets, ~5k prompts x 40
# steps per model; --eval_prompts_per_task 0 does that), and memory settings (micro_batch, gradient_checkpointing).
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


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# Flag aliases in the conventions of diffusers' scripts and of the paper's command lines.
ALIASES = {"base": ["--model", "--pretrained_model_name_or_path"], "mar_anchor": ["--mar"],
           "guidance_scale": ["--cfg_scale"]}  # classifier-free guidance's scale (diffusers: guidance_scale)
# Flags that are gone, and what replaced them.
REMOVED = {"--eval_limit": "--eval_prompts_per_task N (stratified by sub-task, 0 = all) and --eval_images_per_prompt K "
                           "(also --eval_batch, --decode_batch)"}


def parse_config(argv=None, description=__doc__):
    """Every Config field is a `--name value` flag (see the module docstring); returns a checked Config.
    --preset NAME fills in PRESETS[NAME] first; flags given on the command line override it."""
    for arg in argv if argv is not None else sys.argv[1:]:
        if arg.split("=")[0] in REMOVED:
            raise SystemExit(f"{arg.split('=')[0]} was removed: use {REMOVED[arg.split('=')[0]]}")
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        names = [f"--{f.name}"] + ALIASES.get(f.name, [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        given_only = dict(dest=f.name, default=argparse.SUPPRESS)  # absent flags stay out of the namespace
        if isinstance(default, list):
            ap.add_argument(*names, nargs="*", action="extend", type=typing.get_args(f.type)[0], **given_only)
        else:
            ap.add_argument(*names, type=_bool if isinstance(default, bool) else type(default), **given_only)
    given = vars(ap.parse_args(argv))
    preset = {k: value for k, (value, _source) in PRESETS.get(given.get("preset", ""), {}).items()}
    return Config(**{**preset, **given})  # an unknown preset name is refused by Config


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
        shown = (" ".join(map(str, value)) if isinstance(value, list) else f"{value:.6g}" if isinstance(value, float)
                 else str(value).lower() if isinstance(value, bool) else value)  # as the flag would be typed
        source = f"   # preset: {preset[f.name][1]}" if f.name in preset and preset[f.name][0] == value else ""
        lines.append(f"  --{f.name} {shown}{source}")
    return "\n".join(lines if len(lines) > 1 else [f"{head}: the defaults"])


# ----------------------------------------------------------------------------------------------------------
# What the flags point to: the model, adapter folders, prompt files, the reward backends (train.py's stages)

def named_paths(specs):
    """["NAME=PATH", ...] -> {NAME: PATH} (Config checked the form)."""
    return dict(s.split("=", 1) for s in specs)


def precision(cfg):
    """The dtype of --mixed_precision: bf16, fp16, or fp32 for "no"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)


def load_model(cfg):
    """models.load_model for --model (an SD3 pipeline in bf16 when mixed_precision is bf16, its text encoders
    on --text_encoder_device), at --resolution, with gradient checkpointing if asked."""
    try:
        model = models.load_model(cfg.base, cfg.device, precision(cfg), cfg.text_encoder_device or None,
                                  cfg.max_sequence_length)
    except (FileNotFoundError, ModelUnavailableError) as e:  # a missing folder; a gated or absent hub id
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
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(spec)
    except (OSError, ValueError) as e:  # hub errors (gated, not found, offline) are OSErrors; a malformed id ValueError
        raise SystemExit(f"adapter {name}: {spec!r} is not a folder here and could not be downloaded: "
                         f"{hub_advice(spec, e)}") from None


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
    on_gpu = cfg.device.startswith("cuda")  # PickScore's CLIP runs beside the model, in its precision
    return reward_backends.make_rewards(**choice, device=cfg.device, dtype=precision(cfg) if on_gpu else torch.float32)


def probe_settings(cfg):
    """The settings of the probe evaluation --eval_every runs during training: eval_settings' steps, guidance
    and noise on a smaller stratified subset, one image per prompt."""
    return {**eval_settings(cfg), "prompts_per_task": cfg.probe_prompts_per_task, "images_per_prompt": 1}


def eval_settings(cfg):
    """eval.evaluate's settings from the flags (the same on the world's prompts and --eval_prompts files)."""
    return dict(prompts_per_task=cfg.eval_prompts_per_task, images_per_prompt=cfg.eval_images_per_prompt,
                steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed, batch_size=cfg.eval_batch)
