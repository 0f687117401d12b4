"""
Test fixture: a tiny but complete Stable Diffusion 3 pipeline, built from configs in code (no download) and
written with `save_pretrained` in the real diffusers folder layout, so `models.load_sd3` (and
`StableDiffusion3Pipeline.from_pretrained`) can be exercised offline:

    model_index.json
    transformer/   SD3Transformer2DModel        (SD3.5-Medium-like: qk rms-norm, one dual-attention block)
    vae/           AutoencoderKL                (16 latent channels, shift_factor / scaling_factor set)
    scheduler/     FlowMatchEulerDiscreteScheduler(shift=3.0)
    text_encoder/, tokenizer/       CLIPTextModelWithProjection + CLIPTokenizer (byte-level BPE)
    text_encoder_2/, tokenizer_2/   a second, wider CLIP pair
    text_encoder_3/, tokenizer_3/   T5EncoderModel + T5Tokenizer (Unigram)

Dimensions follow SD3's `encode_prompt`: the pooled embedding is the concatenation of the two CLIP projected
(pooled) outputs, so pooled_projection_dim = CLIP_PROJ[0] + CLIP_PROJ[1]; the joint sequence is the two CLIP
penultimate hidden states concatenated along width and zero-padded to T5's width, followed by T5's tokens along
the sequence, so joint_attention_dim = T5_WIDTH >= CLIP_WIDTH[0] + CLIP_WIDTH[1] and the prompt sequence has
CLIP_MAX_LENGTH + max_sequence_length (models.SD3Encoder: 128 by default, as flow_grpo) tokens.

Also `save_random_loras`: small PEFT teachers on any T2IModel (this pipeline's or the world's), for the tests
that need teachers which differ from the base and from one another.
"""
import os
import tempfile

import torch

CLIP_MAX_LENGTH = 32          # model_max_length of both CLIP tokenizers (the pipeline's tokenizer_max_length)
CLIP_WIDTH = (8, 12)          # hidden sizes of CLIP 1 and CLIP 2 (concatenated: 20, padded to T5_WIDTH)
CLIP_PROJ = (8, 12)           # projection dims -> pooled width 20
T5_WIDTH = 32                 # = joint_attention_dim
LATENT_CHANNELS = 16          # as SD3's VAE
VAE_BLOCKS = (8, 16)          # two blocks -> vae_scale_factor 2
SAMPLE_SIZE = 8               # latent side; images are SAMPLE_SIZE * 2 pixels square
IMAGE_SIZE = SAMPLE_SIZE * 2 ** (len(VAE_BLOCKS) - 1)
POOLED_DIM = sum(CLIP_PROJ)


def tiny_sd3_transformer_config():
    """Config dict of the tiny SD3Transformer2DModel (2 layers, 2 heads x 8 dims, patch 2 on 8x8x16 latents)."""
    return dict(
        sample_size=SAMPLE_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=SAMPLE_SIZE, dual_attention_layers=(0,), qk_norm="rms_norm")


def _clip_tokenizer():
    """CLIP's byte-level BPE over the 256-symbol byte alphabet (each symbol also as a word end), a few merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer
    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = ["ca", "cat</w>", "th", "the</w>"]
    tokens = specials + alphabet + [a + "</w>" for a in alphabet] + merged
    vocab = {w: i for i, w in enumerate(tokens)}
    merges = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>")]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    return tok


def _t5_tokenizer():
    """T5's Unigram tokenizer over a tiny vocabulary: specials, the word-start marker and printable ASCII."""
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in map(chr, range(33, 127))]
    pieces += [("\u2581" + w, -1.0) for w in ("a", "cat", "sign", "that", "says")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_encoder(vocab_size, width, proj, tok, seed):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=proj,
        hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


def build_tiny_sd3_pipeline(seed=0):
    """The tiny StableDiffusion3Pipeline in memory (fp32, CPU), with deterministic random weights."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import T5Config, T5EncoderModel
    tok1, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    enc1 = _clip_encoder(len(tok1), CLIP_WIDTH[0], CLIP_PROJ[0], tok1, seed)
    enc2 = _clip_encoder(len(tok2), CLIP_WIDTH[1], CLIP_PROJ[1], tok2, seed + 1)
    torch.manual_seed(seed + 2)
    enc3 = T5EncoderModel(T5Config(
        vocab_size=len(tok3), d_model=T5_WIDTH, d_kv=8, d_ff=2 * T5_WIDTH, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tok3.pad_token_id,
        eos_token_id=tok3.eos_token_id, decoder_start_token_id=tok3.pad_token_id))
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS), block_out_channels=VAE_BLOCKS,
        layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config())
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
        text_encoder_3=enc3, tokenizer_3=tok3)


def save_tiny_sd3_pipeline(path, seed=0):
    """Build the tiny pipeline and write it to `path` with save_pretrained (real diffusers layout); returns path."""
    pipe = build_tiny_sd3_pipeline(seed)
    pipe.save_pretrained(os.fspath(path), safe_serialization=True)
    return path


if __name__ == "__main__":
    import time
    from diffusers import StableDiffusion3Pipeline
    start = time.time()
    with tempfile.TemporaryDirectory() as d:
        save_tiny_sd3_pipeline(d)
        print("saved in", round(time.time() - start, 2), "s:", sorted(os.listdir(d)))
        pipe = StableDiffusion3Pipeline.from_pretrained(d)
        e, _, p, _ = pipe.encode_prompt("a cat", "a cat", "a cat", do_classifier_free_guidance=False)
        print("embeds", tuple(e.shape), "pooled", tuple(p.shape), "total", round(time.time() - start, 2), "s")


def save_random_loras(model, root, names, std, rank=4, alpha=8):
    """Add a LoRA per name to `model` with lora_B ~ N(0, std) (so it is not the identity), and save each in
    PEFT format to root/<name>. Draws from the global torch RNG: seed it first."""
    for name in names:
        model.add_lora(name, rank=rank, alpha=alpha)
        with torch.no_grad():
            for n, p in model.transformer.named_parameters():
                if f".{name}." in n and "lora_B" in n:
                    p.normal_(0, std)
        model.save_adapter(name, str(root / name))
