"""
Memory plan of one Flow-OPD distill iteration on SD3.5-Medium at 512 px, derived from shapes rather than guessed:
it says, before any GPU is lent, whether a structure and micro-batch fit a card (the paper's 24 GB goal).

Every weight is counted from a model built on the meta device (shapes and dtypes, no memory, no download): the
SD3.5-M transformer (SD35M below), its text encoders and VAE (configs below, with their sources), the student LoRA
and the four reference adapters (rank 32, alpha 64, Flow-GRPO's attention targets, models.LORA_TARGETS).
Activations are counted per MMDiT block from token counts and widths (`block_saved_bytes`): the tensors autograd
keeps for the student's backward, tensor by tensor, in two precisions:
  fp32   every tensor in fp32, as on the CPU; tools/memory_check.py measures the same quantity from the autograd
         graph, and the tests check the formula against it exactly on small SD3 configs;
  bf16   bf16 weights under CUDA bf16 autocast with the student LoRA in fp32 (rollouts.trainable), as train.py runs
         SD3.5-M. Autocast runs layer_norm and pow in fp32 (so each LayerNorm keeps an fp32 copy of its input and
         each q/k RMS norm an fp32 copy of q or k), and casts the fp32 input of every LoRA'd projection to bf16 for
         lora_A separately (the cast cache holds weights only), so q, k and v keep three bf16 copies of one input.
         Not measurable on a CPU (CPU autocast keeps layer_norm in bf16); tools/gpu_check.sh measures it.
One iteration's peak = what stays on the GPU (weights, adapters, the student's fp32 LoRA, its gradients and AdamW
state, text encoders when placed there, the VAE) + the largest of its phases: sampling (no-grad forwards), the VAE
decode of the iteration's images, and the student's forward + backward (saved activations + backward working set).

Two loop structures (tools/bench.py's docstring): ours, one bf16 backbone with the teachers and the MAR anchor as
adapters; released, the student's bf16 transformer plus a full copy per routed teacher and one for the anchor,
each with its own LoRA, in fp32 as the released code keeps them (PAPER_NOTES.md §6; tools/released.py).

Text: 77 CLIP + --max_sequence_length T5 tokens (default 128, flow_grpo's; tools/BENCHMARKS.md's table: diffusers' 256).
  python -m tools.bench --config sd35m --memory_plan [--max_sequence_length 256] [--activation_check]
"""
import copy

import torch

from support import models

GiB, MiB = 2**30, 2**20
# SD3.5-Medium transformer, as in stabilityai/stable-diffusion-3.5-medium transformer/config.json (diffusers
# SD3Transformer2DModel; 24 layers with dual attention in blocks 0-12, qk rms-norm); tools/bench.py builds it too.
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
             dual_attention_layers=tuple(range(13)))
# SD3.5-Medium's other components, as in stabilityai/stable-diffusion-3.5-medium text_encoder/, text_encoder_2/,
# text_encoder_3/ and vae/config.json: CLIP-L (openai/clip-vit-large-patch14's text tower), CLIP-G (OpenCLIP
# ViT-bigG-14's text tower), the encoder of T5-XXL (google/t5-v1_1-xxl), and the 16-channel KL autoencoder.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
CLIP_TOKENS = 77


# ---------------------------------------------------------------------------------------------- weights (meta)

def meta_build(build, dtype):
    """build() on the meta device with `dtype` as the default; floating buffers built explicitly in fp32 (SD3's
    position table) are cast too, as from_pretrained(dtype) leaves them."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            module = build()
    finally:
        torch.set_default_dtype(default)
    for m in module.modules():
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[k] = b.to(dtype)
    return module


def held_bytes(tensors):
    """{dtype name: bytes} of distinct tensors (meta tensors have no address, so distinct = distinct objects)."""
    out, seen = {}, set()
    for x in tensors:
        if id(x) not in seen:
            seen.add(id(x))
            key = str(x.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + x.numel() * x.element_size()
    return out


def module_bytes(module):
    return sum(held_bytes(list(module.parameters()) + list(module.buffers())).values())


def sd3_transformer(config, dtype=torch.bfloat16):
    from diffusers import SD3Transformer2DModel
    return meta_build(lambda: SD3Transformer2DModel(**config), dtype)


def lora_numel(transformer, rank, alpha, targets=models.LORA_TARGETS):
    """Parameters of one LoRA adapter (A and B of every targeted linear), counted by injecting it on a meta copy."""
    t = copy.deepcopy(transformer)
    m = models.T2IModel(t, None, None)
    m.add_lora("count", rank, alpha, targets)
    return sum(p.numel() for p in m.lora_parameters("count"))


def text_encoder_numels():
    """{name: parameters} of SD3.5-M's three text encoders, from their configs (tied embeddings counted once)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    builds = {"CLIP-L": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
              "CLIP-G": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
              "T5-XXL encoder": lambda: T5EncoderModel(T5Config(**T5_XXL))}
    return {k: sum(p.numel() for p in meta_build(b, torch.bfloat16).parameters()) for k, b in builds.items()}


def vae_numel():
    from diffusers import AutoencoderKL
    return sum(p.numel() for p in meta_build(lambda: AutoencoderKL(**SD3_VAE), torch.bfloat16).parameters())


# ------------------------------------------------------------------------------------------------- activations

def stream_token_bytes(dim, heads, rank, amp, layer_norm=True, out_proj=True, ff=True, out_copy=True):
    """Bytes one token of one stream (image or text) makes autograd keep in a joint-attention block: adaLN
    (LayerNorm), LoRA'd q/k/v projections, q/k RMS norms, its share of the attention, the LoRA'd output
    projection, then adaLN + GELU MLP (frozen linears keep no input; LoRA'd ones keep the input for lora_A).
    out_copy=False: the output projection reads the attention output in place (a view of the attention's own
    saved output; the joint attention instead slices it per stream, which copies it for batch >= 2).
    amp=False: fp32 throughout. amp=True: bf16 weights under CUDA bf16 autocast, fp32 student LoRA."""
    D, H, r = dim, heads, rank
    if amp:   # per tensor: fp32 LayerNorm/pow copies, bf16 activations, one bf16 lora_A input per projection
        ln, qkv_in, qk, sdpa, out_in, lora_out, gelu = 4 * D + 8, 3 * 2 * D, 2 * (2 * D + 4 * D) + 2 * 4 * H, \
            4 * 2 * D + 4 * H, 2 * D, 2 * r, 4 * 2 * D
    else:     # fp32: q, k, v share one saved input; pow's input is q itself
        ln, qkv_in, qk, sdpa, out_in, lora_out, gelu = 4 * (D + 2), 4 * D, 4 * (2 * D + 2 * H), \
            4 * (4 * D + H), 4 * D, 4 * r, 4 * 4 * D
    b = qkv_in + 3 * lora_out + qk + sdpa
    if layer_norm:
        b += ln
    if out_proj:
        b += (out_in if out_copy or amp else 0) + lora_out
    if ff:
        b += ln + gelu
    return b


def block_saved_bytes(n_img, n_txt, dim, heads, rank, amp, dual=False, last=False, first=False):
    """Bytes one MMDiT block keeps for backward, per sample (batch >= 2). dual: SD3.5's second (image-only)
    attention; last: the context_pre_only block (no text output projection, no text MLP); first: its inputs
    need no gradient (the first LoRA is inside it), so its first adaLN keeps nothing. Per-sample adaLN vectors:
    the zero-adaLN embeddings kept for their gates (6 D, 9 D for the dual one; the last block's continuous text
    adaLN keeps none) and each modulation's (1 + scale) (D)."""
    a = 2 if amp else 4
    img = stream_token_bytes(dim, heads, rank, amp, layer_norm=not first)
    txt = stream_token_bytes(dim, heads, rank, amp, layer_norm=not first, out_proj=not last, ff=not last)
    b = n_img * img + n_txt * txt
    if dual:   # attn2 on the image tokens: its own LoRA'd q/k/v/out, RMS norms and attention, no extra LayerNorm
        b += n_img * stream_token_bytes(dim, heads, rank, amp, layer_norm=False, ff=False, out_copy=False)
    first_mods = 0 if first else (2 if dual else 1) + 1        # (1 + scale) of the image and text first adaLN
    vectors = (9 if dual else 6) + (0 if last else 6) + first_mods + 1 + (0 if last else 1)
    return b + a * vectors * dim


def model_saved_bytes(config, n_img, n_txt, rank, amp, checkpointing):
    """Per sample: bytes the student's forward keeps for backward (all blocks + the output adaLN), or, with
    gradient checkpointing, each block's inputs (image and text residual streams, bf16 under amp) plus one
    block recomputed during backward. Returns (saved, largest block)."""
    D, H, L = config["num_attention_heads"] * config["attention_head_dim"], config["num_attention_heads"], \
        config["num_layers"]
    dual = set(config.get("dual_attention_layers", ()))
    blocks = [block_saved_bytes(n_img, n_txt, D, H, rank, amp, dual=i in dual, last=i == L - 1, first=i == 0)
              for i in range(L)]
    a = 2 if amp else 4
    post = n_img * ((4 * D + 8) if amp else 4 * (D + 2)) + a * D   # norm_out's LayerNorm (proj_out is frozen)
    if not checkpointing:
        return sum(blocks) + post, max(blocks)
    inputs = L * (n_img + n_txt + 1) * D * a   # hidden, encoder_hidden and temb of every block (no copies)
    return inputs + max(blocks) + post, max(blocks)


def backward_working_bytes(n_img, n_txt, dim, amp):
    """Per sample: gradients alive at once inside one block's backward, besides the saved tensors: the two
    residual-stream gradients (2 D) and, at the MLP, the gradients of the GELU's input and output (2 x 4 D),
    in fp32 (autocast's fp32 LayerNorm sends fp32 gradients into the residual stream)."""
    return (n_img + n_txt) * 10 * dim * 4


def vae_decode_bytes(pixels, images, bytes_per=2):
    """Peak working set of decoding `images` latents to pixels x pixels, no grad: the widest full-resolution
    feature map of SD3's VAE decoder is 256 channels (the third up block's upsampler output) at pixels^2, and a
    ResNet step holds three such maps at once (input, GroupNorm output, SiLU output)."""
    widest = SD3_VAE["block_out_channels"][1]   # the third up block's width, upsampled to full resolution
    return images * 3 * widest * pixels * pixels * bytes_per


def sampling_bytes(n_img, n_txt, dim, amp):
    """Per sample, no-grad forward: the widest live tensors, the MLP's hidden (4 D) before and after the GELU
    and the residual stream (D)."""
    return (n_img + n_txt) * 9 * dim * (2 if amp else 4)


# ------------------------------------------------------------------------------------------------ the plan

def components(config, pixels=512, t5_tokens=256, rank=32, alpha=64, teachers=3, anchor=True, others=True):
    """What the plan is made of, independent of the batch: weights from meta builds (bytes, parameter counts)
    and activations per sample (bytes). Text length = 77 CLIP + t5_tokens (diffusers' max_sequence_length).
    others=False: no text encoders or VAE (tools/bench.py's random-embedding runs hold neither)."""
    t = sd3_transformer(config)
    side = pixels // 8 // config["patch_size"]
    n_img, n_txt = side * side, CLIP_TOKENS + t5_tokens
    D = config["num_attention_heads"] * config["attention_head_dim"]
    return dict(
        pixels=pixels, n_img=n_img, n_txt=n_txt, dim=D, refs=teachers + int(anchor), joint_dim=config[
            "joint_attention_dim"], pooled_dim=config["pooled_projection_dim"], latent=(config["in_channels"],
                                                                                       pixels // 8, pixels // 8),
        backbone_numel=sum(p.numel() for p in t.parameters()), backbone_bf16=module_bytes(t),
        backbone_fp32=module_bytes(sd3_transformer(config, torch.float32)), lora_numel=lora_numel(t, rank, alpha),
        text_numels=text_encoder_numels() if others else {}, vae_numel=vae_numel() if others else 0,
        saved={gc: model_saved_bytes(config, n_img, n_txt, rank, True, gc)[0] for gc in (False, True)},
        backward=backward_working_bytes(n_img, n_txt, D, True), sampling=sampling_bytes(n_img, n_txt, D, True),
        decode=vae_decode_bytes(pixels, 1))


def rows(C, micro_batch=2, prompts=4, steps=10):
    """[(component, detail, ours bytes, released bytes, phase)] for one iteration of `prompts` samples run
    through the transformer in micro-batches (batch 2 x micro_batch: CFG's conditional and unconditional halves
    in one forward). phase: 'held' (the whole iteration), 'text' (the text encoders, placed by flag), or the phase
    whose peak it belongs to ('train', 'train:gc', 'train:nogc', 'sample', 'decode'). The VAE decodes every
    sample of the iteration at once (rollouts.sample_rollouts)."""
    L, R, B = C["lora_numel"], C["refs"], 2 * micro_batch
    latent = C["latent"][0] * C["latent"][1] * C["latent"][2]
    text = 2 * sum(C["text_numels"].values())
    both = lambda name, detail, b, phase: (name, detail, b, b, phase)
    return [
        both("transformer (student backbone)", f"{C['backbone_numel'] / 1e9:.3f} B params + position table, bf16",
             C["backbone_bf16"], "held"),
        ("reference transformers", f"{R} full copies (3 teachers + MAR anchor), fp32", 0, R * C["backbone_fp32"],
         "held"),
        ("reference LoRAs", f"{R} x {L / 1e6:.2f} M params (r32 on attention projections); ours bf16 on the one "
         f"backbone, released fp32 in each copy", R * L * 2, R * L * 4, "held"),
        both("student LoRA", f"{L / 1e6:.2f} M params, fp32 (rollouts.trainable)", 4 * L, "held"),
        both("student gradients", "fp32", 4 * L, "held"),
        both("AdamW state", "exp_avg + exp_avg_sq, fp32", 8 * L, "held"),
        both("VAE", f"{C['vae_numel'] / 1e6:.1f} M params, bf16", 2 * C["vae_numel"], "held"),
        both("text encoders", ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in C["text_numels"].items()) + ", bf16",
             text, "text"),
        both("prompt embeddings", f"{prompts} prompts + empty prompts, {C['n_txt']} x {C['joint_dim']} + pooled, "
             f"bf16", prompts * 2 * (C["n_txt"] * C["joint_dim"] + C["pooled_dim"]) * 2, "held"),
        both("trajectories", f"{prompts} samples x {steps} steps x (x_t, x_next, mean), fp32",
             prompts * steps * 3 * latent * 4, "held"),
        both("student LoRA, bf16 autocast copies", "cached for the forward, kept for backward", 2 * L, "train"),
        both("saved activations, no checkpointing", f"batch {B}, {C['n_img']} image + {C['n_txt']} text tokens, "
             f"24 blocks", B * C["saved"][False], "train:nogc"),
        both("saved activations, gradient checkpointing", "block inputs + one block recomputed",
             B * C["saved"][True], "train:gc"),
        both("backward working set", "fp32 gradients inside one block", B * C["backward"], "train"),
        both("sampling working set", f"no-grad forward, batch {B}", B * C["sampling"], "sample"),
        both("VAE decode", f"{prompts} images of {C['pixels']} px at once", prompts * C["decode"], "decode")]


def totals(C, structure, gc, text_on_gpu, **kw):
    """Peak bytes on the GPU: held + text encoders (if there) + the largest phase."""
    col = 2 if structure == "ours" else 3
    R = rows(C, **kw)
    held = sum(r[col] for r in R if r[4] == "held" or (r[4] == "text" and text_on_gpu))
    phase = lambda *names: sum(r[col] for r in R if r[4] in names)
    return held + max(phase("train", "train:gc" if gc else "train:nogc"), phase("sample"), phase("decode"))


def largest_micro_batch(C, budget, structure, gc, text_on_gpu, prompts=None):
    """The largest micro-batch (up to 64) whose peak fits `budget` bytes, with max(prompts, micro-batch) samples
    per iteration; 0 if none."""
    fits = [mb for mb in range(1, 65) if totals(C, structure, gc, text_on_gpu, micro_batch=mb,
                                                  prompts=max(prompts or mb, mb)) <= budget]
    return max(fits, default=0)


def format_plan(C, micro_batch=2, prompts=4, budget_gb=24.0):
    """The markdown tables: components, then peaks (GiB) for ours and released, text encoders on GPU or CPU,
    gradient checkpointing on or off."""
    g = lambda b: f"{b / GiB:.2f}" if b else "-"
    kw = dict(micro_batch=micro_batch, prompts=prompts)
    out = ["| component | detail | phase | ours (GiB) | released (GiB) |", "|---|---|---|---|---|"]
    out += [f"| {c} | {d} | {p} | {g(o)} | {g(r)} |" for c, d, o, r, p in rows(C, **kw)]
    out += ["", "Peak on the GPU = held + text encoders where placed + the largest phase (sample, decode, or "
            "train: the student's forward + backward):", "",
            f"| text encoders | gradient checkpointing | ours (GiB) | released (GiB) | ours <= {budget_gb:g} GiB: "
            f"largest micro-batch |", "|---|---|---|---|---|"]
    for text in (True, False):
        for gc in (True, False):
            mb = largest_micro_batch(C, budget_gb * GiB, "ours", gc, text, prompts=prompts)
            out.append(f"| {'GPU' if text else 'CPU'} | {'on' if gc else 'off'} | "
                       f"{totals(C, 'ours', gc, text, **kw) / GiB:.2f} | "
                       f"{totals(C, 'released', gc, text, **kw) / GiB:.2f} | {mb} |")
    return "\n".join(out)


def report(micro_batch, prompts, t5_tokens, budget_gb):
    """The plan of one SD3.5-M distill iteration at 512 px as markdown (python -m tools.bench --memory_plan)."""
    return (f"## Memory plan: one distill iteration of SD3.5-Medium at 512 px (micro-batch {micro_batch}, {prompts} "
            f"samples, T5 max_sequence_length {t5_tokens})\n\n"
            + format_plan(components(SD35M, pixels=512, t5_tokens=t5_tokens), micro_batch, prompts, budget_gb))
