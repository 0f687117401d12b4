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
from flow_matching import cfg as guide

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_TARGETS_WIDE = LORA_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                    "norm1.linear", "norm1_context.linear"]


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


@torch.no_grad()
def _learned_positions(transformer):
    """Replace the fixed sine-cosine buffer by a parameter initialised from a spread-out sine-cosine table."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    pe = transformer.pos_embed
    n, dim = pe.pos_embed_max_size, pe.pos_embed.shape[-1]
    # base_size = 8n spreads positions 8x, so neighbouring tokens differ clearly (cosine ~0.8, not ~0.97)
    init = get_2d_sincos_pos_embed(dim, n, base_size=8 * n, output_type="pt").float().unsqueeze(0)
    pe.pos_embed.copy_(init)
    trainable_positions(transformer)


def trainable_positions(transformer):
    """Turn the (saved, persistent) position buffer into a trainable parameter, keeping its values; needed
    again after `from_pretrained`, which restores it as a buffer."""
    pe = transformer.pos_embed
    if isinstance(pe.pos_embed, nn.Parameter):
        return
    value = pe._buffers.pop("pos_embed")
    pe.pos_embed = nn.Parameter(value.detach().clone())


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
        self.latent_side = transformer.config.sample_size  # SD3.5-M: 128 (1024 px); set_resolution(512) -> 64
        self.shift = 1.0  # time shift of the sampling grid (flow_matching.shift_sigmas); SD3.5: its scheduler's 3.0
        self.decode_batch = 16  # latents per VAE call in decode (config --decode_batch)

    @property
    def latent_shape(self):
        return (self.transformer.config.in_channels, self.latent_side, self.latent_side)

    def set_resolution(self, pixels):
        """Sample at `pixels` x `pixels` (the paper trains SD3.5-M at 512): latent side = pixels / 2^(blocks-1)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if pixels % (factor * self.transformer.config.patch_size):
            raise ValueError(f"resolution {pixels} must be a multiple of {factor * self.transformer.config.patch_size}")
        self.latent_side = pixels // factor

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
            v = guide(*v.chunk(2), cfg_scale)  # (v_uncond, v_cond): flow_matching.cfg
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

    def decode(self, latents, batch_size=None):
        """latents -> images (B, 3, H, W) float32 in [0, 1], at most batch_size (default self.decode_batch)
        latents per VAE call: SD3.5's VAE holds ~0.4 GB of bf16 activations per 512 px image, so one call
        on a whole evaluation batch is what runs out of memory."""
        c, n = self.vae.config, batch_size or self.decode_batch
        out = []
        for i in range(0, len(latents), n):
            z = latents[i:i + n].to(self.vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
            out.append(((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1))
        return torch.cat(out)

    # ------------------------------------------------------------------ LoRA adapters on one backbone
    def adapter(self, name):
        """Activate one adapter by name, or the base (all adapters disabled) for None."""
        if name == getattr(self, "_active", "unset"):
            return  # switching costs ~10 ms even on the tiny model; skip it when nothing changes
        self._active = name
        if name is None:
            if getattr(self.transformer, "_hf_peft_config_loaded", False):
                self.transformer.disable_adapters()
            return
        self.transformer.enable_adapters()
        self.transformer.set_adapter(name)

    def add_lora(self, name, rank=32, alpha=64, targets=LORA_TARGETS):
        """A fresh LoRA adapter, by default on the attention projections (Flow-GRPO's targets); B = 0, so
        it starts as the base (PEFT's gaussian init)."""
        from peft import LoraConfig
        self.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=list(targets)), name)

    def add_adapter(self, lora_config, name):
        """Inject an adapter; diffusers makes the new one active, so the cached active name is reset."""
        self.transformer.add_adapter(lora_config, adapter_name=name)
        self._active = "unset"

    def lora_parameters(self, name):
        return [p for n, p in self.transformer.named_parameters() if f".{name}." in n and "lora_" in n]

    def adapter_state(self, name):
        """{module.lora_A.weight: tensor, ...} of one adapter, keys without PEFT's prefix."""
        from peft import get_peft_model_state_dict
        return get_peft_model_state_dict(self.transformer, adapter_name=name)

    def save_adapter(self, name, path):
        """PEFT format (adapter_model.safetensors + adapter_config.json), the format of the published
        jieliu/SD3.5M-FlowGRPO-* teachers; written to a temporary folder, then renamed into place."""
        from safetensors.torch import save_file
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.transformer.peft_config[name].save_pretrained(tmp)
        state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in self.adapter_state(name).items()}
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def load_adapter(self, path, name):
        """Load a PEFT adapter folder as adapter `name`, after checking it fits this transformer."""
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file
        weights = os.path.join(path, "adapter_model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no adapter at {path!r} (expected adapter_model.safetensors and "
                                    f"adapter_config.json in PEFT format)")
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}
        check_adapter_fits(self.transformer, state, path)
        self.add_adapter(LoraConfig.from_pretrained(path), name)
        set_peft_model_state_dict(self.transformer, state, adapter_name=name)

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


def check_adapter_fits(transformer, state, source):
    """Teacher and student must share an architecture (paper §6): every LoRA factor must name a linear
    layer of this transformer with matching in/out features. Raise an error naming the first mismatch."""
    modules = dict(transformer.named_modules())
    for key, w in state.items():
        path, kind = key.rsplit(".lora_", 1)
        layer = modules.get(path)
        if layer is None:
            raise ValueError(f"adapter {source!r} does not fit this model: it has weights for {path!r}, which "
                             f"this transformer lacks (was it trained on another base model?)")
        base = getattr(layer, "base_layer", layer)
        want = base.in_features if kind.startswith("A") else base.out_features
        got = w.shape[1] if kind.startswith("A") else w.shape[0]
        if want != got:
            raise ValueError(f"adapter {source!r} does not fit this model: {path} has "
                             f"{'in' if kind.startswith('A') else 'out'}_features={want}, the adapter's "
                             f"lora_{kind} expects {got} (teacher and student must share one architecture)")


def load_world_model(path, device="cpu"):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection
    if not os.path.isdir(os.path.join(path, "transformer")):
        raise FileNotFoundError(f"no world model at {path!r} (expected transformer/, vae/, text_encoder/, "
                                f"tokenizer/); build one with `python train.py --stage pretrain`")
    f32 = dict(dtype=torch.float32)
    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(path, "transformer"), **f32)
    vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"), **f32)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(path, "text_encoder"), **f32)
    tok = WorldTokenizer.load(os.path.join(path, "tokenizer"))
    model = T2IModel(transformer, vae, WorldEncoder(tok, text_encoder)).to(device)
    return model.requires_grad_(False).eval()


def load_model(name_or_path, device="cpu", dtype=torch.float32):
    """The world model (a folder without model_index.json; always fp32) or an SD3 pipeline (a folder with
    model_index.json, or a hub id "org/name") in `dtype`."""
    local = os.path.isdir(name_or_path)
    if local and not os.path.isfile(os.path.join(name_or_path, "model_index.json")):
        return load_world_model(name_or_path, device)  # its error names the folders it expects
    looks_local = name_or_path.startswith((".", "/")) or os.path.isdir(os.path.dirname(name_or_path) or ".")
    if not local and (looks_local or name_or_path.count("/") != 1):  # e.g. checkpoints/base not built yet
        raise FileNotFoundError(f"{name_or_path!r}: no such folder, and not a hub id. The world's base is built "
                                f"by `python train.py --stage pretrain`; SD3 needs a pipeline folder or hub id")
    return load_sd3(name_or_path, dtype=dtype, device=device)


def load_sd3(name_or_path, dtype=torch.bfloat16, device="cuda"):
    """SD3.5-Medium (or any SD3 pipeline folder in diffusers format) behind the same interface."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(name_or_path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    model = T2IModel(pipe.transformer, pipe.vae, SD3Encoder(pipe))
    model.shift = pipe.scheduler.config.get("shift", 1.0)  # SD3.5 samples on a shifted grid (3.0)
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
