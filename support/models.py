"""
The models Flow-OPD acts on, behind one velocity call v(x_t, t, prompts) with classifier-free guidance.

Two backends share the `T2IModel` interface (encode prompts, velocity, decode latents, LoRA adapters):
  * the miniature world's model (`build_world_model`, `load_world_model`; world/model.py), in real formats;
  * Stable Diffusion 3.5 Medium from a local folder or hub id (`load_sd3`), through diffusers'
    `StableDiffusion3Pipeline` (its three text encoders, VAE and transformer). The frozen text encoders may
    live on another device than the transformer (the CPU, to save ~11 GB of GPU memory); T5 is cut at 128
    tokens as in flow_grpo; sampling follows the pipeline scheduler's time grid (`T2IModel.time_grid`); a
    gated, missing or unreachable hub model raises ModelUnavailableError with what to do (`hub_advice`).
Teachers, student and MAR anchor are LoRA adapters on the one transformer (diffusers' PEFT integration),
saved and loaded in PEFT's format, the format of the published Flow-GRPO teachers.

Time convention: t = sigma in [0, 1], t = 1 is noise; SD3 transformers take timestep = 1000 * t. Self-check:
python -m support.models
"""
import copy
import os
import shutil

import torch
import torch.nn as nn

import flow_matching
from flow_matching import guidance
from support.adapters import check_adapter_fits
from support.hub import ModelUnavailableError, hub_advice, split_revision
from world import model as world_model

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_TARGETS_WIDE = LORA_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                    "norm1.linear", "norm1_context.linear"]


class SD3Encoder(nn.Module):
    """prompts -> SD3's joint CLIP-L/CLIP-G/T5 embeddings through the pipeline's own encode_prompt, run on the
    text encoders' device and moved to `out_device` (the transformer's). T5 keeps max_sequence_length tokens
    (flow_grpo and the released Flow-OPD: 128; diffusers' default 256); SD3 does not mask T5's padding, so the
    length changes the embeddings the published teachers were trained with. The empty prompt's embedding
    (the CFG negative, asked for at every sampling call) is computed once: the encoders are frozen."""

    def __init__(self, pipe, max_sequence_length=128, out_device=None):
        super().__init__()
        self.pipe, self.max_sequence_length, self.out_device = pipe, max_sequence_length, out_device
        self._empty = None

    @torch.no_grad()
    def encode(self, prompts):
        device = self.pipe.text_encoder.device
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return embeds.to(self.out_device or device), pooled.to(self.out_device or device)  # (B, 77 + L, D), (B, P)

    @torch.no_grad()
    def forward(self, prompts):
        if not prompts or any(prompts):
            return self.encode(prompts)
        if self._empty is None:
            self._empty = self.encode([""])
        return tuple(e.expand(len(prompts), *e.shape[1:]) for e in self._empty)


class T2IModel(nn.Module):
    """Transformer + autoencoder + prompt encoder. Teachers, student and anchor are LoRA adapters on the
    one `transformer` (diffusers' PEFT integration); `adapter(None)` is the base, adapters disabled."""

    def __init__(self, transformer, vae, encoder):
        super().__init__()
        self.transformer, self.vae, self.encoder = transformer, vae, encoder
        self.latent_side = transformer.config.sample_size  # SD3.5-M: 128 (1024 px); set_resolution(512) -> 64
        self.shift = 1.0  # time shift of the sampling grid (flow_matching.shift_sigmas); SD3.5: its scheduler's 3.0
        self.scheduler = None  # SD3: the pipeline's FlowMatchEulerDiscreteScheduler, whose grid time_grid returns
        self.decode_batch = 16  # latents per VAE call in decode (config --decode_batch)

    @property
    def latent_shape(self):
        return (self.transformer.config.in_channels, self.latent_side, self.latent_side)

    def latent_shape_at(self, pixels=0):
        """The latents of `pixels` x `pixels` images (0: the current resolution), side pixels / 2^(blocks-1)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if pixels else 1   # 0: no VAE needed
        if pixels % (factor * self.transformer.config.patch_size):
            raise ValueError(f"resolution {pixels} must be a multiple of {factor * self.transformer.config.patch_size}")
        return (self.latent_shape[0], pixels // factor, pixels // factor) if pixels else self.latent_shape

    def set_resolution(self, pixels):
        """Sample at `pixels` x `pixels` (the paper trains SD3.5-M at 512)."""
        self.latent_side = self.latent_shape_at(pixels)[1]

    def time_grid(self, num_steps, shift=None):
        """(T+1,) float32 sigmas from 1 to 0 that this model samples on (shift: self.shift unless given).
        SD3 pipelines: their scheduler's set_timesteps(T) grid, which StableDiffusion3Pipeline and Flow-GRPO
        sample with and the published teachers were trained on; the world model: flow_matching.time_grid."""
        shift = self.shift if shift is None else shift
        if self.scheduler is None:
            return flow_matching.time_grid(num_steps, shift)
        scheduler = type(self.scheduler).from_config(self.scheduler.config, shift=shift)  # a copy: set_timesteps mutates
        scheduler.set_timesteps(num_steps)
        return scheduler.sigmas.float()

    def schedule(self):
        """What the time grid depends on besides T, as checkpoints record it (provenance.run_sources): the shift
        and, for SD3, the scheduler's num_train_timesteps (None for the world model, which has no scheduler)."""
        steps = self.scheduler and self.scheduler.config.num_train_timesteps
        return {"shift": self.shift, "num_train_timesteps": steps}

    def encode_prompts(self, prompts):
        return self.encoder(list(prompts))

    def velocity(self, x, t, cond, uncond=None, guidance_scale=1.0):
        """v(x_t, t | c), with CFG v_u + s (v_c - v_u) when uncond is given. x (B, C, h, w), t (B,)."""
        embeds, pooled = cond
        if uncond is not None and guidance_scale != 1.0:
            x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
            embeds, pooled = torch.cat([uncond[0], embeds]), torch.cat([uncond[1], pooled])
        else:
            x_in, t_in = x, t
        dtype = self.transformer.dtype
        v = self.transformer(hidden_states=x_in.to(dtype), encoder_hidden_states=embeds.to(dtype),
                             pooled_projections=pooled.to(dtype), timestep=1000 * t_in, return_dict=False)[0]
        if x_in is not x:
            v = guidance(*v.chunk(2), guidance_scale)  # (v_uncond, v_cond)
        return v

    def velocity_fn(self, prompts, guidance_scale=1.0):
        """Encode prompts (and the empty prompt) once; return velocity_fn(x, t) for the samplers."""
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""] * len(prompts)) if guidance_scale != 1.0 else None
        return lambda x, t: self.velocity(x, t, cond, uncond, guidance_scale)

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
        """Inject a LoRA adapter and make it active. Several adapters share one PEFT tuner (peft's LoraModel),
        as a PeftModel's add_adapter does: the first builds the tuner, each later one is injected by the same
        tuner (a fresh injection per adapter is what PEFT warns against). diffusers' adapter switching
        (set_adapter, enable/disable_adapters) reads the transformer's peft_config, which the tuner keeps."""
        from peft.tuners.lora import LoraModel
        tuner = self.__dict__.get("_lora_tuner")  # a plain attribute, not a submodule: it wraps the transformer
        if tuner is None:
            self.__dict__["_lora_tuner"] = LoraModel(self.transformer, lora_config, name)
            self.transformer._hf_peft_config_loaded = True  # what diffusers' add_adapter marks
        elif name in tuner.peft_config:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        else:
            tuner.peft_config[name] = lora_config
            tuner.inject_adapter(self.transformer, name)
        self.transformer.set_adapter(name)
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
        config = LoraConfig.from_pretrained(path)
        check_adapter_fits(self.transformer, state, weights, config)
        self.add_adapter(config, name)
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


def build_world_model(cfg=None, seed=0):
    """A fresh, untrained world model (world/model.py's parts behind the T2IModel interface)."""
    return T2IModel(*world_model.build(cfg, seed))


def load_world_model(path, device="cpu"):
    """A saved world model in fp32, frozen, on `device`; model.source = path (its provenance and cache key)."""
    model = T2IModel(*world_model.load(path)).to(device).requires_grad_(False).eval()
    model.source = path
    return model


def load_model(name_or_path, device="cpu", dtype=torch.float32, text_encoder_device=None, max_sequence_length=128):
    """The world model (a folder without model_index.json; always fp32) or an SD3 pipeline (a folder with
    model_index.json, or a hub id "org/name[@REV]") in `dtype`; text_encoder_device and max_sequence_length: load_sd3.
    A folder that is neither raises FileNotFoundError; an SD3 model that cannot be fetched or read raises
    ModelUnavailableError, whose message says what to do (hub_advice)."""
    local = os.path.isdir(name_or_path)
    if local and not os.path.isfile(os.path.join(name_or_path, "model_index.json")):
        return load_world_model(name_or_path, device)  # its error names the folders it expects
    looks_local = name_or_path.startswith((".", "/")) or os.path.isdir(os.path.dirname(name_or_path) or ".")
    if not local and (looks_local or name_or_path.count("/") != 1):  # e.g. checkpoints/base not built yet
        raise FileNotFoundError(f"{name_or_path!r}: no such folder, and not a hub id. The world's base is built "
                                f"by `python -m tools.pretrain_world`; SD3 needs a pipeline folder or hub id")
    return load_sd3(name_or_path, dtype=dtype, device=device, text_encoder_device=text_encoder_device,
                    max_sequence_length=max_sequence_length)


def text_encoder_dtype(dtype, device):
    """SD3's frozen text encoders' dtype beside a transformer in `dtype`: fp32 on the CPU (bf16 matmuls are slow
    on many CPUs), bf16 for an fp16 transformer (T5-XXL's activations overflow fp16's range), else `dtype`."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16 if dtype == torch.float16 else dtype


def load_sd3(name_or_path, dtype=torch.bfloat16, device="cuda", text_encoder_device=None, max_sequence_length=128):
    """SD3.5-Medium (or any SD3 pipeline folder in diffusers format) behind the same interface. text_encoder_device:
    where the three frozen text encoders live (default: `device`; dtype: text_encoder_dtype). SD3.5-M's CLIP-L, CLIP-G
    and T5-XXL take ~11 GB in bf16 beside a 4.9 GB transformer; "cpu" keeps them in host memory (SD3Encoder)."""
    from diffusers import StableDiffusion3Pipeline
    repo, revision = split_revision(name_or_path)   # "org/name@REV" pins a branch, tag or commit (support/hub.py)
    text_encoder_device = text_encoder_device or device
    text_dtype = text_encoder_dtype(dtype, text_encoder_device)
    encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    try:  # each text encoder read straight into its own dtype (no detour through the transformer's)
        pipe = StableDiffusion3Pipeline.from_pretrained(repo, revision=revision, dtype={"default": dtype, **{
            name: text_dtype for name in encoders}})
    except OSError as e:  # hub errors (gated, not found, offline) and unreadable folders are all OSErrors
        raise ModelUnavailableError(hub_advice(name_or_path, e)) from e
    for name in encoders:
        if getattr(pipe, name) is not None:
            getattr(pipe, name).to(text_encoder_device, text_dtype)
    for module in (pipe.transformer, pipe.vae):
        module.to(device)
    pipe.set_progress_bar_config(disable=True)
    model = T2IModel(pipe.transformer, pipe.vae, SD3Encoder(pipe, max_sequence_length, out_device=device))
    model.shift = pipe.scheduler.config.get("shift", 1.0)  # SD3.5 samples on a shifted grid (3.0)
    model.scheduler, model.source = pipe.scheduler, name_or_path
    return model.requires_grad_(False).eval()


if __name__ == "__main__":
    m = build_world_model()
    cond = m.encode_prompts(['a sign that says "K7"', "a photo of two circles"])
    uncond = m.encode_prompts(["", ""])
    x = torch.randn(2, *m.latent_shape)
    v = m.velocity(x, torch.tensor([0.5, 0.9]), cond, uncond, guidance_scale=4.5)
    print("velocity", tuple(v.shape), "zero-initialised output:", bool(v.abs().max() == 0))
