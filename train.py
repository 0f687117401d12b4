"""
Flow-OPD training, one plain loop per stage (Flow-OPD §2.1 pipeline):
  pretrain   the miniature world's base: autoencoder, then flow matching on noisy captions (§2.2)

Usage: python train.py --stage pretrain [--key value ...]   (every Config field is a flag)
Time convention: t = sigma in [0, 1], t = 1 is noise (SD3 / Flow-GRPO).
"""
import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch

import models
from eval import evaluate, format_metrics
from flow_matching import pretrain


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
    snapshots: list = field(default_factory=list)  # extra pretrain steps at which to save base-STEP/
    # --- sampling (§2.4) ---
    num_steps: int = 10              # T: training SDE steps
    eval_steps: int = 40             # ODE steps for evaluation
    cfg_scale: float = 4.5           # classifier-free guidance scale (released code; paper silent)
    noise_level: float = 0.7         # a in sigma_t = a sqrt(t / (1 - t))
    eval_limit: int = 0              # prompts per task at evaluation (0 = all test prompts)

    def __post_init__(self):
        assert self.noise_level >= 0, "noise_level must be >= 0"
        assert self.num_steps >= 1 and self.eval_steps >= 1, "step counts must be >= 1"


def parse_config(argv=None):
    """Every Config field is a `--name value` flag; list fields take several values."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):
            ap.add_argument(f"--{f.name}", nargs="*", type=int, default=default)
        elif isinstance(default, bool):
            ap.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            ap.add_argument(f"--{f.name}", type=type(default), default=default)
    return Config(**vars(ap.parse_args(argv)))


def stage_pretrain(cfg):
    t0 = time.time()
    model = models.build_world_model(seed=cfg.seed).to(cfg.device)
    models.pretrain_autoencoder(model, cfg.ae_steps, seed=cfg.seed)

    def snapshot(step):
        if step in cfg.snapshots:
            model.save(f"{cfg.base}-{step}")
    history = pretrain(model, cfg.pretrain_steps, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr,
                       cfg_dropout=cfg.cfg_dropout, caption_noise=cfg.caption_noise, seed=cfg.seed,
                       dataset_size=cfg.pretrain_dataset, callback=snapshot)
    model.save(cfg.base)
    minutes = (time.time() - t0) / 60
    with open(os.path.join(cfg.base, "pretrain_log.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "minutes": minutes, "device": cfg.device,
                   "loss": history}, f)
    print(f"pretrained base saved to {cfg.base} in {minutes:.1f} min on {cfg.device}")
    base = models.load_world_model(cfg.base, cfg.device)
    print(format_metrics("base", evaluate(base, None, limit=cfg.eval_limit or None, steps=cfg.eval_steps,
                                          cfg_scale=cfg.cfg_scale, seed=cfg.seed)))


STAGES = {"pretrain": stage_pretrain}


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown --stage {cfg.stage!r}; choose one of {sorted(STAGES)}")
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ GPUs; no effect on the CPU
    STAGES[cfg.stage](cfg)


if __name__ == "__main__":
    main()
