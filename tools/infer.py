"""
Images from a base model, alone or with trained LoRAs, for one or several prompts, saved as one labelled PNG grid:
a row per LoRA (the base's row without --lora), --num_images columns per prompt.

    python -m tools.infer --model checkpoints/base --lora checkpoints/teachers/ocr --prompt 'a sign that says "K7"'
    python -m tools.infer --model stabilityai/stable-diffusion-3.5-medium --lora text=jieliu/SD3.5M-FlowGRPO-Text \
        --lora student=runs/sd35m/merge_average/export --resolution 512 --prompt 'a sign that says "Flow-OPD"'

--model: the miniature world's model folder (transformer/, vae/, text_encoder/, tokenizer/) or an SD3 pipeline
(a folder with model_index.json, or a hub id). --lora [ROW=]PATH_OR_ID, repeatable (a bare PATH_OR_ID names its
row by itself): a PEFT folder (adapter_model.safetensors + adapter_config.json, as training saves), a diffusers
SD3 LoRA (a .safetensors file, or a folder with pytorch_lora_weights.safetensors, as checkpoint.export_lora and
diffusers' trainers write), or a hub id of either, ID@REVISION pinning one (support/resolve.load_lora).
--resolution: pixels; the SD3.5-M LoRAs of Flow-GRPO and Flow-OPD are trained at 512, while the pipeline's
native size is 1024 (0 keeps the native size).
Sampling. An SD3 model draws through diffusers' StableDiffusion3Pipeline itself, with the row's LoRA active on its
transformer: the images of pipe(prompt, num_images_per_prompt=N, num_inference_steps=--eval_steps,
guidance_scale=--guidance_scale, max_sequence_length=--max_sequence_length,
generator=torch.Generator().manual_seed(--seed)) in a script (tests/test_infer.py); the prompt goes in as the
model's embeddings, so --text_encoder_device cpu works. The world model: rollouts.sample_images (Euler ODE with
CFG, shift 1.0 as in training), image j from the noise rollouts.noise_seed(seed, j, 0). Either way image j of
every row and prompt starts from the same noise, so the rows compare the LoRAs. --shift replaces the scheduler's
(SD3.5: 3.0). Every other flag is train.py's.
"""
import os

import torch

from eval import in_world
from support import figures
from support.config import parse_args
from support.resolve import load_lora, load_model
from support.rollouts import sample_images

GRID_PX = 128  # samples are upscaled (nearest) to at least this many px a side: 32 px world samples show


def infer_flags(group):
    group.add_argument("--lora", action="append", default=[], metavar="[ROW=]PATH_OR_ID",
                       help="a LoRA drawn as row ROW (repeatable): PEFT folder, diffusers LoRA file or folder, hub id")
    group.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable), --num_images each")
    group.add_argument("--num_images", type=int, default=4, help="images per prompt, each from its own noise")
    group.add_argument("--shift", type=float, default=None, help="time shift; none: the scheduler's, else 1")
    group.add_argument("--out", default="samples.png", help="the PNG grid written")


def parse(argv=None):
    """(Config, infer's own flags)."""
    return parse_args(argv, __doc__.split("\n\n")[0].strip(), infer_flags)


@torch.no_grad()
def pipeline_images(model, prompt, cfg, num_images, shift=None):
    """(num_images, 3, H, W) in [0, 1] of `prompt` from the StableDiffusion3Pipeline models.load_sd3 built, as
    pipe(prompt, generator=torch.Generator().manual_seed(cfg.seed), ...) draws them; the model's active LoRA acts."""
    pipe, dtype = model.encoder.pipe, model.transformer.dtype
    if shift is not None:   # a copy: the model's own scheduler (its time_grid) keeps its shift
        pipe.scheduler = type(model.scheduler).from_config(model.scheduler.config, shift=shift)
    # given embeddings, the pipeline does not repeat them per image: one encoding, expanded to the N images, is
    # what pipe(prompt, num_images_per_prompt=N) makes (its N latents come from one draw of the generator)
    embeds, pooled, empty, empty_pooled = (e.to(dtype).expand(num_images, *e.shape[1:]) for e in
                                           (*model.encode_prompts([prompt]), *model.encode_prompts([""])))
    side = model.latent_side * pipe.vae_scale_factor   # --resolution (models.T2IModel.set_resolution)
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=empty,
                negative_pooled_prompt_embeds=empty_pooled, num_inference_steps=cfg.eval_steps,
                guidance_scale=cfg.guidance_scale, height=side, width=side, output_type="pt",
                generator=torch.Generator().manual_seed(cfg.seed)).images.float().cpu()


def draw(model, prompts, cfg, num_images, shift=None):
    """(len(prompts) * num_images, 3, H, W) in [0, 1], prompt by prompt; image j of each from the same noise."""
    if in_world(model):
        return torch.cat([sample_images(model, [p] * num_images, cfg.eval_steps, cfg.guidance_scale, cfg.seed,
                                        shift=shift) for p in prompts])  # shift None: the model's own (1.0)
    return torch.cat([pipeline_images(model, p, cfg, num_images, shift) for p in prompts])


def main(argv=None):
    """Draw every row and write the grid; returns {row: (P * N, 3, H, W)} (P prompts, N --num_images)."""
    cfg, args = parse(argv)
    model = load_model(cfg)
    loras = dict(spec.split("=", 1) if "=" in spec else (spec, spec) for spec in args.lora)  # {row: path}
    adapters = {row: f"lora{k}" for k, row in enumerate(loras)} or {"base": None}  # adapter names hold no '.'
    for row, adapter in adapters.items():
        if adapter:
            load_lora(model, loras[row], adapter)
    rows = {}
    for row, adapter in adapters.items():
        model.adapter(adapter)
        rows[row] = draw(model, args.prompt, cfg, args.num_images, args.shift)
    side = next(iter(rows.values())).shape[-1]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # one prompt is noted under the grid; several label their columns (figures.image_grid, as the paper's grids)
    several = len(args.prompt) > 1
    columns = [p for p in args.prompt for _ in range(args.num_images)] if several else None
    figures.image_grid(rows, columns, scale=max(1, GRID_PX // side), path=args.out,
                       notes=() if several else [f"prompt: {args.prompt[0]}"])
    print(f"{len(rows)} rows x {len(args.prompt)} prompts x {args.num_images} images ({side}x{side}) -> {args.out}")
    return rows


if __name__ == "__main__":
    main()
