"""
The miniature world's model: SD3's structure at toy size, built from configs with no download and saved in
the real formats (diffusers `SD3Transformer2DModel` and `AutoencoderKL`, a transformers
`CLIPTextModelWithProjection`, and a word/character tokenizer over the world's vocabulary, `vocab.json`).
A reader of the paper can skip this file: `models.T2IModel` is the interface Flow-OPD uses.

Size: 32x32 RGB -> 8x8x8 latents, patch 1 (64 image tokens), 6 MMDiT blocks of width 128, 3.5M transformer
parameters. Why latents: a pixel-space DiT with 4x4 patches on 32x32 images drew blocky mosaics and never
separated circles from squares in 12 CPU minutes; the autoencoder makes the diffusion task easier, as it
does for SD3.

Departures from SD3: 1) a learned position table (initialised from a well-spread 2-D sine-cosine pattern)
replaces the fixed sine-cosine buffer, which is nearly constant across an 8x8 grid at small widths; it is
stored under the same key, so a stock SD3Transformer2DModel loads it; 2) adaLN modulation and the output
projection start at zero (adaLN-zero, as in DiT), so the untrained model predicts v = 0; 3) one small CLIP
text encoder, trained jointly with the transformer during pretraining, replaces SD3's three frozen encoders
(pooled = CLIP's projected EOS token, as SD3's pooled CLIP embedding).

`build` and `load` return the three parts (transformer, vae, encoder); `models.build_world_model` and
`models.load_world_model` wrap them in the `T2IModel` interface.
Self-check: python -m world.model
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from world import toy_world

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



def build(cfg=None, seed=0):
    """The parts of a fresh, untrained world model: (SD3 transformer, autoencoder, prompt encoder)."""
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
    return transformer, vae, WorldEncoder(tok, text_encoder)


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


def load(path):
    """The parts (transformer, vae, encoder) of a world model saved by T2IModel.save, in fp32."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection
    if not os.path.isdir(os.path.join(path, "transformer")):
        raise FileNotFoundError(f"no world model at {path!r} (expected transformer/, vae/, text_encoder/, "
                                f"tokenizer/); build one with `python -m tools.pretrain_world`")
    f32 = dict(dtype=torch.float32)
    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(path, "transformer"), **f32)
    vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"), **f32)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(path, "text_encoder"), **f32)
    tok = WorldTokenizer.load(os.path.join(path, "tokenizer"))
    return transformer, vae, WorldEncoder(tok, text_encoder)


if __name__ == "__main__":
    transformer, vae, encoder = build()
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    print(f"transformer {n(transformer)/1e6:.2f}M  vae {n(vae)/1e6:.2f}M  text {n(encoder)/1e6:.2f}M")
    pe = transformer.pos_embed.pos_embed[0]
    cos = torch.nn.functional.cosine_similarity(pe[:-1], pe[1:]).mean()
    print(f"neighbouring position cosine similarity {cos:.3f}")
