"""
What the flags point to, resolved once per stage: `--model` to a T2IModel, `--teacher` and `--mar` specs to
adapter folders, `--prompts`/`--eval_prompts` files to records, the `--*_reward` flags to the reward registry,
and the evaluation settings every stage shares (support/config.py holds the flags themselves).
"""
import os

import torch
from peft import LoraConfig, set_peft_model_state_dict

from rewards import REWARDS
from support import adapters, models, prompts, reward_backends
from support.config import Config
from support.hub import ModelUnavailableError, hub_advice, split_revision
from world import toy_world


def named_paths(specs):
    """["NAME=PATH", ...] -> {NAME: PATH} (Config checked the form)."""
    return dict(s.split("=", 1) for s in specs)


def precision(cfg):
    """The dtype of --mixed_precision: bf16, fp16, or fp32 for "no"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)


def load_model(cfg):
    """models.load_model for --model (an SD3 pipeline in bf16 when mixed_precision is bf16, its text encoders
    on --text_encoder_device), at --resolution (--train_resolution checked too), with gradient checkpointing
    if asked."""
    try:
        model = models.load_model(cfg.base, cfg.device, precision(cfg), cfg.text_encoder_device or None,
                                  cfg.max_sequence_length)
    except (FileNotFoundError, ModelUnavailableError, ValueError) as e:  # no such folder; a gated or absent hub id
        raise SystemExit(f"--model: {e}") from None
    for flag, pixels in (("resolution", cfg.resolution), ("train_resolution", cfg.train_resolution)):
        try:
            model.latent_shape_at(pixels)   # checked before anything is sampled
        except ValueError as e:
            raise SystemExit(f"--{flag}: {e}") from None
    if cfg.resolution:
        model.set_resolution(cfg.resolution)
    model.decode_batch = cfg.decode_batch
    if cfg.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    return model


def adapter_folder(name, spec):
    """A PEFT adapter folder from a local path, or a hub id (ID@REVISION pins a revision) downloaded once."""
    if os.path.isdir(spec):
        return spec
    from huggingface_hub import snapshot_download
    try:
        repo, revision = split_revision(spec)
        return snapshot_download(repo, revision=revision)
    except (OSError, ValueError) as e:  # hub errors (gated, not found, offline) are OSErrors; a malformed id ValueError
        raise SystemExit(f"adapter {name}: {spec!r} is not a folder here and could not be downloaded: "
                         f"{hub_advice(spec, e)}") from None


def prompt_pool(specs, split):
    """{task: records}: the TASK=FILE prompt files (prompts.py formats), else the world's `split` prompts."""
    if not specs:
        return {t: toy_world.prompts(t, split) for t in toy_world.TASKS}
    try:
        return {task: prompts.read_prompts(path, task) for task, path in named_paths(specs).items()}
    except (OSError, ValueError) as e:
        raise SystemExit(f"prompt file: {e}") from None


def reward_registry(cfg):
    """The world's rewards (rewards.REWARDS), with real-image backends swapped in by the *_reward flags."""
    choice = dict(ocr=cfg.ocr_reward, pickscore=cfg.pickscore_reward, geneval=cfg.geneval_reward,
                  deqa=cfg.deqa_reward)
    if all(v == "world" for v in choice.values()):
        return REWARDS
    on_gpu = cfg.device.startswith("cuda")  # PickScore's CLIP runs beside the model, in its precision
    return reward_backends.make_rewards(**choice, device=cfg.device, dtype=precision(cfg) if on_gpu else torch.float32)


def probe_settings(cfg):
    """The settings of the probe evaluation --eval_every runs during training: eval_settings' steps, guidance
    and noise on a smaller stratified subset, one image per prompt."""
    return {**eval_settings(cfg), "prompts_per_task": cfg.probe_prompts_per_task, "images_per_prompt": 1}


def ood_settings(cfg):
    """eval.evaluate_ood's settings: eval_settings' without images_per_prompt (one image per OOD prompt)."""
    return {k: v for k, v in eval_settings(cfg).items() if k != "images_per_prompt"}


def eval_settings(cfg):
    """eval.evaluate's settings from the flags (the same on the world's prompts and --eval_prompts files)."""
    return dict(prompts_per_task=cfg.eval_prompts_per_task, images_per_prompt=cfg.eval_images_per_prompt,
                steps=cfg.eval_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed, batch_size=cfg.eval_batch)


def main_protocol(kw):
    """Whether evaluate() settings kw are the main protocol (every default, noise seed 0, the world's prompts and
    rewards): the scores a model folder's provenance.json carries. batch_size does not change scores."""
    same = {k: v for k, v in eval_settings(Config()).items() if k != "batch_size"}
    return {k: v for k, v in kw.items() if k != "batch_size"} == {**same, "seed": 0}


# ---------------------------------------------------------------- a LoRA in either format (infer, eval)
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_PREFIX = "transformer."  # diffusers' prefix for the transformer's LoRA keys


def load_diffusers_lora(model, path, name):
    """A diffusers SD3 LoRA as adapter `name`: without the "transformer." prefix its keys are PEFT's own."""
    # imported here, as in models.load_sd3: the SD3 pipeline module pulls transformers' image processors, which
    # cost a second and warn without torchvision, on every world run that never reads a diffusers LoRA
    from diffusers import StableDiffusion3Pipeline
    raw, metadata = StableDiffusion3Pipeline.lora_state_dict(path, return_lora_metadata=True)
    others = [k for k in raw if not k.startswith(DIFFUSERS_PREFIX)]
    if others:
        raise ValueError(f"{path!r} has LoRA weights outside the transformer (e.g. {others[0]!r}); only "
                         "transformer LoRAs are supported")
    state = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items()}
    if metadata:  # the LoraConfig that export_lora (and diffusers' own trainers) store
        config = LoraConfig(**{k.removeprefix(DIFFUSERS_PREFIX): v for k, v in metadata.items()})
    else:  # none stored: rank from the factors and alpha = r, diffusers' own assumption for such files
        ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise ValueError(f"{path!r} stores no LoRA config and has mixed ranks {sorted(ranks)}")
        r = ranks.pop()
        config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in state}))
    adapters.check_adapter_fits(model.transformer, state, path, config)
    model.add_adapter(config, name)
    set_peft_model_state_dict(model.transformer, state, adapter_name=name)


def load_lora(model, path, name="lora"):
    """Load a PEFT folder or a diffusers LoRA (file or folder) as adapter `name`, by the files present; a spec
    that is not a path here is a hub id, downloaded once (adapter_folder)."""
    path = path if os.path.exists(path) else adapter_folder("--lora", path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return load_diffusers_lora(model, path, name)
    if all(os.path.isfile(os.path.join(path, f)) for f in PEFT_FILES):
        return model.load_adapter(path, name)
    if os.path.isfile(os.path.join(path, DIFFUSERS_FILE)):
        return load_diffusers_lora(model, os.path.join(path, DIFFUSERS_FILE), name)
    raise FileNotFoundError(f"no LoRA at {path!r}: expected a PEFT folder ({' + '.join(PEFT_FILES)}), a folder "
                            f"with {DIFFUSERS_FILE}, or a diffusers LoRA .safetensors file")
