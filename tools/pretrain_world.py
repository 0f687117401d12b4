"""
The miniature world's base model, pretrained from scratch (Flow-OPD §2.2's L_FM on the world's data): first
the KL autoencoder on fresh renderings, then flow matching of the transformer and text encoder on
(caption, image) pairs whose captions are deliberately noisy (world/toy_world.py, `corrupt_caption`), as web
captions are. `python -m tools.pretrain_world [--ae_steps N --pretrain_steps N ...]` runs `stage_pretrain`
(the flags of train.py's "pretraining" group); the committed checkpoints/base was made by it (README "The
pretrained base"). A reader of the paper can skip this file: the paper starts from a
pretrained SD3.5-Medium.

Departures from SD3's pretraining: one small CLIP text encoder is trained jointly with the transformer (SD3's
three encoders are frozen); images are rendered and encoded once per run (`dataset_size`) while captions are
re-drawn every step, so the caption noise stays fresh. Time convention: t = 1 is noise (SD3).
"""
import dataclasses
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from eval import evaluate
from flow_matching import flow_matching_loss, interpolate, sample_t
from support import models
from support.config import parse_config
from support.metrics import format_metrics
from support.provenance import made_here, source, stamp
from support.resolve import eval_settings
from world import captions, renderer, toy_world
from world.model import trainable_positions


def stage_pretrain(cfg, report=None):
    """The autoencoder (cfg.ae_steps), then flow matching (cfg.pretrain_steps), from scratch
    or continued from cfg.init_from; saves cfg.base (and cfg.snapshots) with a pretrain_log.json.
    report(model): called on the saved base at the end when cfg.eval_at_end (the caller's evaluation)."""
    t0 = time.time()
    if cfg.init_from:
        model = models.load_world_model(cfg.init_from, cfg.device)
        trainable_positions(model.transformer)  # from_pretrained restored the position table as a buffer
    else:
        model = models.build_world_model(seed=cfg.seed).to(cfg.device)
    if cfg.ae_steps:
        pretrain_autoencoder(model, cfg.ae_steps, seed=cfg.seed, decoder_only=cfg.ae_decoder_only)

    def snapshot(step):
        if step + cfg.step_offset in cfg.snapshots:
            model.save(f"{cfg.base}-{step + cfg.step_offset}")
    history = pretrain(model, cfg.pretrain_steps, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr,
                       cfg_dropout=cfg.cfg_dropout, caption_noise=cfg.caption_noise, seed=cfg.seed,
                       dataset_size=cfg.pretrain_dataset, callback=snapshot)
    model.save(cfg.base)
    minutes = (time.time() - t0) / 60
    with open(os.path.join(cfg.base, "pretrain_log.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "minutes": minutes, "device": cfg.device,
                   "loss": history}, f)
    stamp(cfg.base, **made_here("the miniature world's pretrained base", cfg.seed, cfg.pretrain_steps,
                                {"init_from": source(cfg.init_from)} if cfg.init_from else {}))
    print(f"pretrained base saved to {cfg.base} in {minutes:.1f} min on {cfg.device}")
    if cfg.eval_at_end and report is not None:
        report(models.load_world_model(cfg.base, cfg.device))


def pretrain(model, steps, batch_size=64, lr=1e-3, warmup=200, cfg_dropout=0.1, caption_noise=0.3,
             dataset_size=40_000, seed=0, log_every=100, callback=None):
    """Train `model.transformer` and its text encoder by flow matching on the world (its autoencoder must be
    trained already). Images are rendered and encoded once (`dataset_size`); captions are re-drawn each time,
    so the caption noise is fresh. A share `cfg_dropout` of captions is emptied to learn the unconditional
    field that classifier-free guidance needs. Returns the list of (step, loss)."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    dev = model.transformer.device
    records, latents = [], []
    with torch.no_grad():
        for _ in tqdm(range(0, dataset_size, 500), desc="render+encode", leave=False):
            recs = [toy_world.random_record(rng) for _ in range(500)]  # tasks, then GenEval sub-tasks, uniform
            images = renderer.to_tensor([renderer.render(r, rng, *renderer.random_style(rng)) for r in recs])
            latents.append(model.encode_images(images.to(dev)))
            records += recs
    latents = torch.cat(latents)  # (N, C, h, w)
    params = [p for m in (model.transformer, model.encoder) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    history, pbar = [], tqdm(range(steps), desc="pretrain")
    for step in pbar:
        idx = torch.randint(len(records), (batch_size,), generator=gen)
        captions = [_caption(records[i], rng, caption_noise, cfg_dropout) for i in idx.tolist()]
        x0 = latents[idx.to(dev)]  # (B, C, h, w)
        eps = torch.randn(x0.shape, generator=gen).to(dev)  # drawn on the CPU: same stream on any device
        t = sample_t(batch_size, gen).to(dev)  # (B,)
        v = model.velocity(interpolate(x0, eps, t), t, model.encode_prompts(captions))
        loss = flow_matching_loss(v, x0, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            history.append((step, loss.item()))
            pbar.set_postfix(loss=f"{loss.item():.4f}")
        if callback is not None:
            callback(step + 1)  # e.g. save intermediate checkpoints
    for p in params:
        p.requires_grad_(False)
    return history


def pretrain_autoencoder(model, steps, batch_size=64, lr=1e-3, kl_weight=1e-6, seed=0, decoder_only=False):
    """Fit the world's KL autoencoder to fresh renderings in the world's styles (MSE + a small KL, as SD3's VAE
    is nearly deterministic), then set SD3's latent normalisation: shift_factor = mean, scaling_factor = 1 / std.
    decoder_only: fine-tune the decoder alone and keep the normalisation, so the latents a trained transformer
    draws keep their meaning (how a base continues on new styles: the first decoder re-sharpened blur)."""
    rng = np.random.default_rng(seed)
    dev = model.vae.device
    vae = model.vae.requires_grad_(False).train()
    parts = (vae.decoder, vae.post_quant_conv) if decoder_only else (vae,)
    params = [p for part in parts if part is not None for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    pbar = tqdm(range(steps), desc="autoencoder")
    for step in pbar:
        x = _render_batch(batch_size, rng).to(dev) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = (recon - x).pow(2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            pbar.set_postfix(mse=f"{(recon - x).pow(2).mean().item():.5f}")
    vae.requires_grad_(False).eval()
    if decoder_only:
        return loss.item()
    with torch.no_grad():
        z = vae.encode(_render_batch(1024, rng).to(dev) * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
    return loss.item()


def _render_batch(n, rng):
    return renderer.to_tensor([renderer.render(toy_world.random_record(rng), rng, *renderer.random_style(rng))
                                for _ in range(n)])


def _caption(record, rng, caption_noise, cfg_dropout):
    u = rng.uniform()
    if u < cfg_dropout:
        return ""
    return captions.corrupt_caption(record, rng) if u < cfg_dropout + caption_noise else record["prompt"]


def main(argv=None):
    """Pretrain the base (cfg.base), then print its four scores on the test prompts (--eval_at_end)."""
    cfg = parse_config(argv, __doc__)
    stage_pretrain(cfg, report=lambda base: print(format_metrics("base", evaluate(base, None, **eval_settings(cfg)))))


if __name__ == "__main__":
    main()
