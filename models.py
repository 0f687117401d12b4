"""
The models Flow-OPD acts on, behind one velocity call v(x_t, t, prompts) with classifier-free guidance.

Two backends share the `T2IModel` interface (encode prompts, velocity, decode latents, LoRA adapters):
  * the miniature world's model, built from configs with no download (`build_world_model`) and saved in the
    real formats: diffusers `SD3Transformer2DModel` and `AutoencoderKL`, a transformers
    `CLIPTextModelWithProjection`, and a word/character tokenizer over the world's vocabulary (`vocab.json`);
  * Stable Diffusion 3.5 Medium from a local folder or hub id (`load_sd3`), through diffusers'
    `StableDiffusion3Pipeline` (its three text encoders, VAE and transformer).

The world model mirrors SD3's structure (a KL autoencoder and a joint-attention MMDiT on its latents) at toy
size: 32x32 RGB -> 8x8x8 latents, patch 1 (64 image tokens), 6 MMDiT blocks of width 128, 3.5M transformer parameters.
Why latents: a pixel-space DiT with 4x4 patches on 32x32 images drew blocky mosaics and never separated
circles from squares in 12 CPU minutes; the autoencoder makes the diffusion task easier, as it does for SD3.

Departures from SD3 (world model only): 1) a learned position table (initialised from a well-spread
2-D sine-cosine pattern) replaces the fixed sine-cosine buffer, which is nearly constant across an 8x8 grid at
small widths; it is stored under the same key, so a stock SD3Transformer2DModel loads it; 2) adaLN modulation
and the output projection start at zero (adaLN-zero, as in DiT), so the untrained model predicts v = 0;
3) one small CLIP text encoder, trained jointly with the transformer during pretraining, replaces SD3's three
frozen encoders (pooled = CLIP's projected EOS token, as SD3's pooled CLIP embedding).

Time convention: t = sigma in [0, 1], t = 1 is noise; SD3 transformers take timestep = 1000 * t.
Self-check: python models.py
"""
import copy
import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn

import toy_world

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class WorldTokenizer:
    """Word-level tokens for the world's prompts; the quoted text is spelt character by character, so
    the model sees each glyph it must draw. Unknown words map to [UNK]; every sequence ends with [EOS]."""
    SPECIAL = ["[PAD]", "[UNK]", "[EOS]", '"']

    def __init__(self, vocab, max_length=24):
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.max_length = max_length
        self.pad_id, self.unk_id, self.eos_id = 0, 1, 2

    @classmethod
    def for_world(cls):
        return cls(cls.SPECIAL + toy_world.vocabulary())

    def tokenize(self, prompt):
        parts, tokens = prompt.split('"'), []
        for i, part in enumerate(parts):
            pieces = list(part.upper()) if i % 2 else part.lower().split()
            tokens += pieces + (['"'] if i < len(parts) - 1 else [])
        return tokens

    def __call__(self, prompts):
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            toks = [self.vocab.get(w, self.unk_id) for w in self.tokenize(p)][: self.max_length - 1]
            ids[b, : len(toks) + 1] = torch.tensor(toks + [self.eos_id])
        return ids, (ids != self.pad_id).long()

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        words = sorted(self.vocab, key=self.vocab.get)
        with open(os.path.join(path, "vocab.json"), "w") as f:
            json.dump({"vocab": words, "max_length": self.max_length}, f)

    @classmethod
    def load(cls, path):
        with open(os.path.join(path, "vocab.json")) as f:
            d = json.load(f)
        return cls(d["vocab"], d["max_length"])


@dataclass
class WorldModelConfig:
    latent_channels: int = 8     # C of the 8x8 latent
    width: int = 128             # MMDiT hidden size = heads * head_dim
    heads: int = 4
    layers: int = 6
    text_width: int = 128        # CLIP hidden size = joint_attention_dim = pooled_projection_dim
    text_layers: int = 2


def _learned_positions(transformer):
    """Replace the fixed sine-cosine buffer by a parameter initialised from a spread-out sine-cosine table."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    pe = transformer.pos_embed
    n, dim = pe.pos_embed_max_size, pe.pos_embed.shape[-1]
    # base_size = 8n spreads positions 8x, so neighbouring tokens differ clearly (cosine ~0.8, not ~0.97)
    init = get_2d_sincos_pos_embed(dim, n, base_size=8 * n, output_type="pt").float().unsqueeze(0)
    del pe._buffers["pos_embed"]
    pe.pos_embed = nn.Parameter(init)


def _zero_init(transformer):
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and (name.endswith("norm1.linear") or name.endswith("norm1_context.linear")
                                              or name.endswith("norm_out.linear") or name == "proj_out"):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


def build_world_model(cfg=None, seed=0):
    """A fresh, untrained world model (tokenizer, CLIP text encoder, autoencoder, SD3 transformer)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    cfg = cfg or WorldModelConfig()
    torch.manual_seed(seed)
    tok = WorldTokenizer.for_world()
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok.vocab), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=tok.max_length,
        projection_dim=cfg.text_width, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=toy_world.IMAGE_SIZE,
        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0)
    side = toy_world.IMAGE_SIZE // 4
    transformer = SD3Transformer2DModel(
        sample_size=side, patch_size=1, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        num_layers=cfg.layers, attention_head_dim=cfg.width // cfg.heads, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_width, caption_projection_dim=cfg.width,
        pooled_projection_dim=cfg.text_width, pos_embed_max_size=side)
    _learned_positions(transformer)
    _zero_init(transformer)
    return T2IModel(transformer, vae, WorldEncoder(tok, text_encoder))


class WorldEncoder(nn.Module):
    """prompts -> (prompt_embeds (B, L, D), pooled (B, D)) with the world's tokenizer and CLIP encoder."""

    def __init__(self, tokenizer, text_encoder):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def forward(self, prompts):
        ids, mask = self.tokenizer(prompts)
        dev = self.text_encoder.device
        out = self.text_encoder(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=False)
        return out.last_hidden_state, out.text_embeds

    def save(self, path):
        self.tokenizer.save(os.path.join(path, "tokenizer"))
        self.text_encoder.save_pretrained(os.path.join(path, "text_encoder"))


class SD3Encoder(nn.Module):
    """prompts -> SD3's joint CLIP-L/CLIP-G/T5 embeddings through the pipeline's own encode_prompt."""

    def __init__(self, pipe):
        super().__init__()
        self.pipe = pipe

    @torch.no_grad()
    def forward(self, prompts):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
        return embeds, pooled


class T2IModel(nn.Module):
    """Transformer + autoencoder + prompt encoder. Teachers, student and anchor are LoRA adapters on the
    one `transformer` (diffusers' PEFT integration); `adapter(None)` is the base, adapters disabled."""

    def __init__(self, transformer, vae, encoder):
        super().__init__()
        self.transformer, self.vae, self.encoder = transformer, vae, encoder

    @property
    def latent_shape(self):
        c = self.transformer.config
        side = c.sample_size
        return (c.in_channels, side, side)

    def encode_prompts(self, prompts):
        return self.encoder(list(prompts))

    def velocity(self, x, t, cond, uncond=None, cfg_scale=1.0):
        """v(x_t, t | c), with CFG v_u + s (v_c - v_u) when uncond is given. x (B, C, h, w), t (B,)."""
        embeds, pooled = cond
        if uncond is not None and cfg_scale != 1.0:
            x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
            embeds, pooled = torch.cat([uncond[0], embeds]), torch.cat([uncond[1], pooled])
        else:
            x_in, t_in = x, t
        dtype = self.transformer.dtype
        v = self.transformer(hidden_states=x_in.to(dtype), encoder_hidden_states=embeds.to(dtype),
                             pooled_projections=pooled.to(dtype), timestep=1000 * t_in, return_dict=False)[0]
        if x_in is not x:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        return v

    def velocity_fn(self, prompts, cfg_scale=1.0):
        """Encode prompts (and the empty prompt) once; return velocity_fn(x, t) for the samplers."""
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts)) if cfg_scale != 1.0 else None
        return lambda x, t: self.velocity(x, t, cond, uncond, cfg_scale)

    def encode_images(self, images):
        """images (B, 3, H, W) in [0, 1] -> latents, scaled as SD3 does: (z - shift) * scale."""
        c = self.vae.config
        z = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist.mean
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    def decode(self, latents):
        c = self.vae.config
        z = latents.to(self.vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ LoRA adapters on one backbone
    def adapter(self, name):
        """Activate one adapter by name, or the base (all adapters disabled) for None."""
        if name is None:
            if getattr(self.transformer, "_hf_peft_config_loaded", False):
                self.transformer.disable_adapters()
            return
        self.transformer.enable_adapters()
        self.transformer.set_adapter(name)

    def save(self, path, dtype=torch.float16):
        """The world model in real formats (diffusers folders, a transformers folder, vocab.json), written
        to a temporary folder and renamed into place, so an interrupted save never leaves half a model.
        fp16 by default: it halves the committed checkpoint; loading upcasts to fp32."""
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        copy.deepcopy(self.transformer).to("cpu", dtype).save_pretrained(os.path.join(tmp, "transformer"))
        copy.deepcopy(self.vae).to("cpu", dtype).save_pretrained(os.path.join(tmp, "vae"))
        copy.deepcopy(self.encoder).to("cpu", dtype).save(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


def pretrain_autoencoder(model, steps, batch_size=64, lr=1e-3, kl_weight=1e-6, seed=0):
    """Fit the world's KL autoencoder to fresh renderings (MSE + a small KL, as SD3's VAE is nearly
    deterministic), then set SD3's latent normalisation: shift_factor = mean, scaling_factor = 1 / std."""
    import numpy as np
    from tqdm import tqdm
    rng = np.random.default_rng(seed)
    dev = model.vae.device
    vae = model.vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    pbar = tqdm(range(steps), desc="autoencoder")
    for step in pbar:
        x = _render_batch(batch_size, rng).to(dev) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]
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
    with torch.no_grad():
        z = vae.encode(_render_batch(1024, rng).to(dev) * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
    return loss.item()


def _render_batch(n, rng):
    recs = [toy_world.prompts(toy_world.TASKS[rng.integers(len(toy_world.TASKS))], "train") for _ in range(n)]
    return toy_world.to_tensor([toy_world.render(r[rng.integers(len(r))], rng) for r in recs])


def load_world_model(path, device="cpu"):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection
    if not os.path.isdir(os.path.join(path, "transformer")):
        raise FileNotFoundError(f"no world model at {path!r} (expected transformer/, vae/, text_encoder/, "
                                f"tokenizer/); build one with `python train.py --stage pretrain`")
    f32 = dict(torch_dtype=torch.float32)
    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(path, "transformer"), **f32)
    vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"), **f32)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(path, "text_encoder"), **f32)
    tok = WorldTokenizer.load(os.path.join(path, "tokenizer"))
    model = T2IModel(transformer, vae, WorldEncoder(tok, text_encoder)).to(device)
    return model.requires_grad_(False).eval()


def load_sd3(name_or_path, dtype=torch.bfloat16, device="cuda"):
    """SD3.5-Medium (or any SD3 pipeline folder in diffusers format) behind the same interface."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(name_or_path, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    model = T2IModel(pipe.transformer, pipe.vae, SD3Encoder(pipe))
    return model.requires_grad_(False).eval()


if __name__ == "__main__":
    m = build_world_model()
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    print(f"transformer {n(m.transformer)/1e6:.2f}M  vae {n(m.vae)/1e6:.2f}M  text {n(m.encoder)/1e6:.2f}M")
    cond = m.encode_prompts(['a sign that says "K7"', "a photo of two circles"])
    uncond = m.encode_prompts(["", ""])
    x = torch.randn(2, *m.latent_shape)
    v = m.velocity(x, torch.tensor([0.5, 0.9]), cond, uncond, cfg_scale=4.5)
    print("velocity", tuple(v.shape), "zero-initialised output:", bool(v.abs().max() == 0))
    pe = m.transformer.pos_embed.pos_embed[0]
    cos = torch.nn.functional.cosine_similarity(pe[:-1], pe[1:]).mean()
    print(f"neighbouring position cosine similarity {cos:.3f}")
