"""
Tests for models.py: the SD3 backend on a tiny offline StableDiffusion3Pipeline (tests/tiny_sd3.py), the world
model's zero-initialised output and save/load round trip in the real formats, WorldTokenizer, and LoRA adapters
on one backbone through diffusers' PEFT integration. Everything is built from configs in code (no download).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_models.py
"""
import json
import os
import re

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
from helpers import ROOT
from support import models
import tiny_sd3
from support.models import LORA_TARGETS, T2IModel, build_world_model, load_sd3, load_world_model
from world.model import WorldModelConfig, WorldTokenizer, trainable_positions

SMALL = WorldModelConfig(latent_channels=4, width=32, heads=2, layers=2, text_width=32, text_layers=1)
PROMPTS = ["a cat", 'a sign that says "HI"']


def _inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.latent_shape, generator=g)
    t = torch.rand(batch, generator=g) * 0.9 + 0.05
    return x, t


@torch.no_grad()
def _perturb(module, seed, rounds=3, std=0.02):
    """A few rounds of seeded random noise on every parameter (the zero-initialised layers included)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----------------------------------------------------------------------------------------- SD3 backend
@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    path = tiny_sd3.save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))
    return load_sd3(path, dtype=torch.float32, device="cpu")


def test_sd3_pipeline_folder_layout(tmp_path):
    tiny_sd3.save_tiny_sd3_pipeline(tmp_path)
    for sub in ["transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
                "tokenizer", "tokenizer_2", "tokenizer_3"]:
        assert os.path.isdir(tmp_path / sub), sub
    assert (tmp_path / "model_index.json").is_file()
    from diffusers import SD3Transformer2DModel
    cfg = SD3Transformer2DModel.load_config(tmp_path / "transformer")
    assert {k: cfg[k] for k in ["sample_size", "in_channels", "joint_attention_dim", "pooled_projection_dim"]} \
        == {k: tiny_sd3.tiny_sd3_transformer_config()[k]
            for k in ["sample_size", "in_channels", "joint_attention_dim", "pooled_projection_dim"]}


def test_sd3_pipeline_roundtrip(sd3):
    assert isinstance(sd3, T2IModel)
    assert sd3.latent_shape == (tiny_sd3.LATENT_CHANNELS, tiny_sd3.SAMPLE_SIZE, tiny_sd3.SAMPLE_SIZE)
    assert sd3.transformer.dtype == torch.float32
    assert not any(p.requires_grad for p in sd3.parameters())

    # prompt encoding: CLIP tokens (width 8 + 12, zero-padded to T5's 32) then 128 T5 tokens (flow_grpo's
    # max_sequence_length); pooled 8 + 12
    embeds, pooled = sd3.encode_prompts(PROMPTS)
    assert embeds.shape == (2, tiny_sd3.CLIP_MAX_LENGTH + 128, tiny_sd3.T5_WIDTH)
    assert pooled.shape == (2, tiny_sd3.POOLED_DIM)
    assert embeds.shape[-1] == sd3.transformer.config.joint_attention_dim
    assert pooled.shape[-1] == sd3.transformer.config.pooled_projection_dim
    clip = embeds[:, :tiny_sd3.CLIP_MAX_LENGTH]
    assert torch.equal(clip[..., sum(tiny_sd3.CLIP_WIDTH):], torch.zeros_like(clip[..., sum(tiny_sd3.CLIP_WIDTH):]))
    assert not torch.allclose(embeds[0], embeds[1]) and not torch.allclose(pooled[0], pooled[1])
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()

    # velocity with classifier-free guidance = v_u + s (v_c - v_u) from two separate unguided calls
    cond, uncond = (embeds, pooled), sd3.encode_prompts(["", ""])
    x, t = _inputs(sd3)
    with torch.no_grad():
        v = sd3.velocity(x, t, cond, uncond, guidance_scale=4.5)
        v_c = sd3.velocity(x, t, cond)
        v_u = sd3.velocity(x, t, uncond)
        assert v.shape == x.shape and v_c.shape == x.shape
        assert not torch.allclose(v_c, v_u, atol=1e-4)  # the guidance term is not trivially zero
        torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=0)
        # guidance_scale 1 (or no uncond) is the plain conditional velocity
        torch.testing.assert_close(sd3.velocity(x, t, cond, uncond, guidance_scale=1.0), v_c, atol=0, rtol=0)

        # velocity_fn encodes the prompts (and the empty prompt) once and agrees with velocity
        torch.testing.assert_close(sd3.velocity_fn(PROMPTS, guidance_scale=4.5)(x, t), v, atol=1e-6, rtol=0)
        torch.testing.assert_close(sd3.velocity_fn(PROMPTS)(x, t), v_c, atol=1e-6, rtol=0)

        # autoencoder: images in [0, 1] -> latents of latent_shape -> images in [0, 1]
        g = torch.Generator().manual_seed(1)
        img = torch.rand(2, 3, tiny_sd3.IMAGE_SIZE, tiny_sd3.IMAGE_SIZE, generator=g)
        z = sd3.encode_images(img)
        assert z.shape == (2, *sd3.latent_shape)
        out = sd3.decode(z)
        assert out.shape == img.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1


def test_sd3_latent_scaling_matches_vae_config(sd3):
    """encode_images applies SD3's (z - shift) * scale and decode inverts it before the VAE decoder."""
    c = sd3.vae.config
    assert c.shift_factor == pytest.approx(0.0609) and c.scaling_factor == pytest.approx(1.5305)
    img = torch.rand(1, 3, tiny_sd3.IMAGE_SIZE, tiny_sd3.IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        raw = sd3.vae.encode(img * 2 - 1).latent_dist.mean
        torch.testing.assert_close(sd3.encode_images(img), (raw - c.shift_factor) * c.scaling_factor)
        dec = ((sd3.vae.decode(raw).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(sd3.decode((raw - c.shift_factor) * c.scaling_factor), dec, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- world model
@pytest.fixture(scope="module")
def world():
    return build_world_model()


def test_world_model_velocity_is_zero_at_init(world):
    assert world.latent_shape == (8, 8, 8)
    x, t = _inputs(world)
    with torch.no_grad():
        cond = world.encode_prompts(['a sign that says "K7"', "a photo of two circles"])
        uncond = world.encode_prompts(["", ""])
        assert cond[0].shape == (2, 24, 128) and cond[1].shape == (2, 128)
        v = world.velocity(x, t, cond, uncond, guidance_scale=4.5)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v))
    pe = world.transformer.pos_embed.pos_embed
    assert isinstance(pe, torch.nn.Parameter) and pe.requires_grad  # learned position table


def test_world_model_save_load_roundtrip(tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file
    model = build_world_model(SMALL, seed=3)
    _perturb(model, seed=4)
    prompts = ['a sign that says "K7"', "a red circle above a blue square"]
    x, t = _inputs(model, seed=5)
    with torch.no_grad():
        v = model.velocity(x, t, model.encode_prompts(prompts), model.encode_prompts(["", ""]), guidance_scale=3.0)
    assert v.abs().max() > 1e-3

    # fp32: exact
    model.save(str(tmp_path / "w32"), dtype=torch.float32)
    assert not os.path.exists(str(tmp_path / "w32") + ".tmp")
    for sub in ["transformer", "vae", "text_encoder", "tokenizer"]:
        assert os.path.isdir(tmp_path / "w32" / sub), sub
    loaded = load_world_model(str(tmp_path / "w32"))
    assert loaded.transformer.dtype == torch.float32 and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        v32 = loaded.velocity_fn(prompts, guidance_scale=3.0)(x, t)
    torch.testing.assert_close(v32, v, atol=1e-6, rtol=0)

    # fp16 (the default): within half-precision rounding of the weights; loading upcasts to fp32
    model.save(str(tmp_path / "w16"))
    loaded16 = load_world_model(str(tmp_path / "w16"))
    assert loaded16.transformer.dtype == torch.float32
    with torch.no_grad():
        v16 = loaded16.velocity_fn(prompts, guidance_scale=3.0)(x, t)
    assert (v16 - v).abs().max() <= 2e-3 * v.abs().max()  # fp16: ~3.5e-4 of max |v|; bf16 ~3e-3

    # a stock SD3Transformer2DModel loads the saved transformer, learned position table included
    keys = load_file(str(tmp_path / "w32" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert "pos_embed.pos_embed" in keys
    stock = SD3Transformer2DModel.from_pretrained(str(tmp_path / "w32" / "transformer"), torch_dtype=torch.float32)
    learned = model.transformer.pos_embed.pos_embed.detach()
    assert torch.equal(stock.pos_embed.pos_embed, learned)
    fresh = SD3Transformer2DModel(**dict(stock.config))  # the stock sine-cosine buffer differs
    assert fresh.pos_embed.pos_embed.shape == learned.shape and not torch.allclose(fresh.pos_embed.pos_embed, learned)
    trainable_positions(stock)
    assert isinstance(stock.pos_embed.pos_embed, torch.nn.Parameter)
    assert torch.equal(stock.pos_embed.pos_embed, learned)

    # saving over an existing model replaces it
    model.save(str(tmp_path / "w32"), dtype=torch.float32)
    assert sorted(os.listdir(tmp_path / "w32")) == ["text_encoder", "tokenizer", "transformer", "vae"]


def test_load_world_model_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("python -m tools.pretrain_world")):
        load_world_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape("python -m tools.pretrain_world")):
        load_world_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------- WorldTokenizer
def test_world_tokenizer_spells_quoted_text():
    tok = WorldTokenizer.for_world()
    assert tok.tokenize('A Sign that says "k7"') == ["a", "sign", "that", "says", '"', "K", "7", '"']
    assert tok.tokenize('"AB" sign') == ['"', "A", "B", '"', "sign"]
    assert tok.tokenize("") == []


def test_world_tokenizer_ids_unk_eos_padding():
    tok = WorldTokenizer(WorldTokenizer.SPECIAL + ["a", "red", "circle", "says", "K", "7"], max_length=8)
    v = tok.vocab
    ids, mask = tok(['a red zebra says "K7"', "", "a red circle"])
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [v["a"], v["red"], tok.unk_id, v["says"], v['"'], v["K"], v["7"], v['"']][:7] \
        + [tok.eos_id]  # truncated to max_length - 1 tokens, then EOS
    assert ids[1].tolist() == [tok.eos_id] + [tok.pad_id] * 7
    assert ids[2].tolist() == [v["a"], v["red"], v["circle"], tok.eos_id] + [tok.pad_id] * 4
    assert mask.tolist() == [[1] * 8, [1] + [0] * 7, [1] * 4 + [0] * 4]
    assert tok.unk_id == v["[UNK]"] and tok.eos_id == v["[EOS]"] and tok.pad_id == v["[PAD]"]
    # unknown quoted glyphs are [UNK] too
    assert tok(['"Z"'])[0][0, :4].tolist() == [v['"'], tok.unk_id, v['"'], tok.eos_id]


def test_world_tokenizer_save_load(tmp_path):
    tok = WorldTokenizer.for_world()
    tok.save(str(tmp_path / "tok"))
    back = WorldTokenizer.load(str(tmp_path / "tok"))
    assert back.vocab == tok.vocab and back.max_length == tok.max_length
    prompts = ['a sign that says "K7"', "two green triangles under the moon", "unknown words here"]
    for a, b in zip(tok(prompts), back(prompts)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- LoRA adapters
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_lora_adapters_on_one_backbone():
    import peft
    model = build_world_model(SMALL, seed=6)
    _perturb(model, seed=7)  # the zero-initialised output layer would hide any LoRA effect
    model.requires_grad_(False).eval()
    x, t = _inputs(model, seed=8)
    with torch.no_grad():
        cond = model.encode_prompts(["a red circle", 'a sign that says "K7"'])
        uncond = model.encode_prompts(["", ""])
        vel = lambda: model.velocity(x, t, cond, uncond, guidance_scale=2.0)  # noqa: E731
        model.adapter(None)  # no adapters yet: a no-op
        base = vel()
        assert base.abs().max() > 1e-3

        for name in ["a", "b"]:
            model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                              target_modules=LORA_TARGETS), name)
        lora_b = {n: m for n, m in model.transformer.named_modules() if hasattr(m, "lora_B")}
        assert len(lora_b) == 8 * SMALL.layers - 1  # last block is context_pre_only: no to_add_out
        for m in lora_b.values():
            assert set(m.lora_B) == {"a", "b"} and not m.lora_B["a"].weight.any()

        for name in ["a", "b"]:  # B = 0: every adapter is the base
            model.adapter(name)
            assert torch.equal(vel(), base)

        g = torch.Generator().manual_seed(9)
        for m in lora_b.values():
            w = m.lora_B["a"].weight
            w.copy_(0.5 * torch.randn(w.shape, generator=g))

        model.adapter("a")
        v_a = vel()
        assert (v_a - base).abs().max() > 1e-3
        model.adapter(None)
        assert torch.equal(vel(), base)
        model.adapter("b")
        assert torch.equal(vel(), base)
        model.adapter("a")  # switching back gives adapter a again
        assert torch.equal(vel(), v_a)
        model.adapter(None)
        assert torch.equal(vel(), base)

    # PEFT's set_adapter marks only the active adapter trainable and disable_adapters freezes all of them;
    # a training step that peeks at the base (GRPO's reference) must switch back before backward()
    params_a, params_b = model.lora_parameters("a"), model.lora_parameters("b")
    assert len(params_a) == len(params_b) == 2 * len(lora_b)
    model.adapter("a")
    assert all(p.requires_grad for p in params_a) and not any(p.requires_grad for p in params_b)
    loss = vel().square().mean()
    model.adapter(None)
    assert not any(p.requires_grad for p in params_a)
    model.adapter("a")
    loss.backward()
    assert all(p.grad is not None for p in params_a) and all(p.grad is None for p in params_b)
    assert any(p.grad.abs().sum() > 0 for p in params_a)
    assert not any(p.requires_grad for n, p in model.transformer.named_parameters() if "lora_" not in n)


def test_load_model_names_a_missing_world_base_instead_of_trying_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools.pretrain_world"):
        models.load_model(str(tmp_path / "base"))


@pytest.mark.parametrize("folder", ["base", "teachers/geneval", "teachers/ocr", "teachers/pickscore", "teachers/deqa",
                                    "cold_start/merge"])
def test_every_committed_model_says_how_it_was_made(folder):
    """provenance.json beside each committed model: how it was made, from which weights (by sha256, each one
    a committed model's), and its scores under the main protocol; its weights_sha256 is the weights' own."""
    from support import provenance
    path = os.path.join(ROOT, "checkpoints", folder)
    made = json.load(open(os.path.join(path, "provenance.json")))
    assert made["weights_sha256"] == provenance.weights_sha256(path)
    assert "python " in made["command"]
    assert isinstance(made["seed"], int) and made["iterations"] >= 0 and made["commit"]
    for name, src in made["built_from"].items():
        if folder != "base":   # the base was continued from a first-world base that is not committed
            assert src["sha256"] == provenance.weights_sha256(os.path.join(ROOT, src["path"])), name
    assert 0 <= made["scores"]["avg"] <= 1 and made["protocol"]["seed"] == 0
