"""
What every tools/bench.py variant is built and measured with: the backbone of each --config, the teachers, MAR
anchor and student as LoRA adapters on it, the records of an iteration, the measures (time, memory, weights), and
the fresh process each variant runs in (spawn). One place, so that the two loop structures (tools/bench.py's ours,
tools/released.py's released) and the floor (tools/floor.py) start from the same models, adapters and seeds and
are measured alike, by bench and by tools/gpu_check.py.

  tiny    the --base model through support.resolve.load_model, as train.py loads it (default: the world's
          checkpoints/base); its teachers from --teacher_dir when they are there;
  mid     a random 116M-parameter SD3 transformer (443 MiB in fp32) at 16 x 16 latents with 32 prompt tokens: big
          enough that each reference copy outweighs an iteration's activations, as at full size, small enough for
          two CPU cores;
  sd35m   a random SD3.5-Medium-sized transformer (memory_plan.SD35M) in bf16 at 512 px (64 x 64 latents), with
          77 CLIP + --max_sequence_length T5 prompt tokens.
The random configs draw random prompt embeddings in place of text encoders and have no VAE (RandomTextSD3), and
their adapters are random LoRAs (rank 32, alpha 64, non-zero lora_B so they are not the identity): a bench run
measures speed and memory, not quality. Prompt lengths are fixed (padded), so drawing one task per iteration or
mixed tasks costs the same.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from support import models
from support.resolve import load_model
from support.rollouts import draw_records
from tools import memory_plan
from world import toy_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTES, ANCHOR = ["geneval", "ocr", "pickscore"], "deqa"   # Config's default --routes and --mar_anchor
POOL = {t: toy_world.prompts(t, "train") for t in ROUTES}
SD35M_LATENT = 64   # 512 px / 8
MID = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
           num_attention_heads=10, joint_attention_dim=640, caption_projection_dim=640, pooled_projection_dim=640,
           pos_embed_max_size=32, qk_norm="rms_norm")


class RandomTextSD3(models.T2IModel):
    """An SD3 transformer behind T2IModel's velocity interface with random prompt embeddings in place of the
    text encoders (sd35m: (B, 77 + T5 tokens, 4096) + pooled (B, 2048)), and no VAE (decode returns the
    latents). load_backbone sets `tokens` (prompt length) and `side` (latent side) for the chosen config."""

    @property
    def latent_shape(self):
        return (self.transformer.config.in_channels, self.side, self.side)

    def encode_prompts(self, prompts):
        dev, n, c = self.transformer.device, len(prompts), self.transformer.config
        kw = dict(device=dev, dtype=self.transformer.dtype, generator=torch.Generator(device=dev).manual_seed(n))
        return torch.randn(n, self.tokens, c.joint_attention_dim, **kw), torch.randn(n, c.pooled_projection_dim, **kw)

    def decode(self, latents, batch_size=None):
        return latents


def load_backbone(cfg, config):
    """The frozen backbone of `config` on cfg.device, with gradient checkpointing if cfg asks for it."""
    if config == "tiny":
        return load_model(cfg)
    from diffusers import SD3Transformer2DModel
    arch, tokens, side, dtype = {"sd35m": (memory_plan.SD35M, memory_plan.CLIP_TOKENS + cfg.max_sequence_length,
                                           SD35M_LATENT, torch.bfloat16),
                                 "mid": (MID, 32, 16, torch.float32)}[config]
    torch.manual_seed(cfg.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build straight in bf16 (sd35m): no transient fp32 copy on the GPU
    try:
        with torch.device(cfg.device):
            transformer = SD3Transformer2DModel(**arch)
    finally:
        torch.set_default_dtype(default)
    model = RandomTextSD3(transformer.to(dtype), None, None).requires_grad_(False).eval()
    model.tokens, model.side = tokens, side
    if cfg.gradient_checkpointing:   # diffusers applies it to grad-enabled forwards only: the student's
        model.transformer.enable_gradient_checkpointing()
    return model


def attach_lora(model, name, seed, cfg, config):
    """Adapter `name` from cfg.teacher_dir (tiny), else a random LoRA with non-zero lora_B. Returns its source."""
    path = os.path.join(cfg.teacher_dir, name)
    if config == "tiny" and os.path.isdir(path) and name != "student":
        model.load_adapter(path, name)
        return path
    model.add_lora(name, cfg.lora_rank, cfg.lora_alpha)
    g = torch.Generator().manual_seed(seed)   # both factors seeded here: PEFT's own init uses the global RNG
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in n else 1 / cfg.lora_rank))
    return "random"


def build_ours(model, cfg, config):
    """The three routed teachers, the MAR anchor and the student as adapters on the one backbone, the student
    active. Returns {adapter: source}."""
    sources = {name: attach_lora(model, name, 100 + k, cfg, config) for k, name in enumerate(ROUTES + [ANCHOR])}
    attach_lora(model, "student", 99, cfg, config)
    model.adapter("student")
    return sources


def draw(cfg, gen, weights):
    """An iteration's records as train.stage_distill draws them: cfg.opd_prompts prompts by task weight, sorted
    by task (micro-batches then share a teacher), each repeated cfg.opd_group times."""
    drawn = sorted(draw_records(POOL, weights, cfg.opd_prompts, gen, cfg.balance_tags), key=lambda r: r["task"])
    return [r for r in drawn for _ in range(cfg.opd_group)]


def weight_bytes(*transformers):
    """Bytes of the distinct parameters and buffers the transformers hold (shared tensors counted once)."""
    seen = {}
    for t in transformers:
        for x in list(t.parameters()) + list(t.buffers()):
            seen[x.data_ptr()] = x.numel() * x.element_size()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------ measures

def sync(device):
    """Wait for the GPU's queued work, so that a wall-clock interval holds all of it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_core(core, shape, cfg, v_dtype=torch.float32, reps=20):
    """Forward + backward of the velocity-discrepancy core (flow_opd_loss or its compiled form) alone, on random
    states of `shape` (B, C, h, w) and velocities in v_dtype: median ms per call after 2 warm-up calls, the first
    call's seconds (a compile's cost), and the last call's loss, mean KL and gradient norm."""
    g, B, dev = torch.Generator().manual_seed(0), shape[0], cfg.device
    r = lambda *s: torch.randn(*s, generator=g).to(dev)
    x, xn, vT, vA, vs0 = r(*shape), r(*shape), r(*shape).to(v_dtype), r(*shape).to(v_dtype), r(*shape).to(v_dtype)
    t, tn, std, lp = torch.full((B,), 0.5, device=dev), torch.full((B,), 0.4, device=dev), r(B).abs() + 0.1, r(B)
    times = []
    for _ in range(reps + 2):
        vs = vs0.clone().requires_grad_(True)
        sync(dev)
        t0 = time.perf_counter()
        loss, kl, _ = core(x_t=x, x_next=xn, t=t, t_next=tn, std=std, old_logp=lp, v_student=vs, v_teacher=vT,
                           v_anchor=vA, noise_level=cfg.noise_level, estimator=cfg.estimator,
                           mar_lambda=cfg.mar_lambda)
        loss.backward()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return dict(loss=loss.item(), kl=kl.float().mean().item(), grad=vs.grad.float().norm().item(),
                ms=1e3 * statistics.median(times[2:]), first_call_s=times[0])


def peak_mib(cuda):
    """The process's peak memory so far: CUDA allocated (since the last reset), else the peak RSS."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def spawn(variant, argv):
    """Run one variant in a fresh `python -m tools.bench ... --variant V` in this working directory (relative
    paths mean the same); its last stdout line is 'BENCH_RESULT {json}'."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    p = subprocess.run([sys.executable, "-m", "tools.bench", *argv, "--variant", variant], capture_output=True,
                       text=True, env=env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return dict(variant=variant, error=f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or ["?"])[-1])


def machine(device):
    """The device in words, for a report: the GPU's name, or the CPU's model and logical core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (unavailable)"
    return next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                platform.processor()) + f", {os.cpu_count()} logical CPUs"
