"""
Tests for checkpoint.py: an interrupted-and-resumed training loop is bit-identical to an uninterrupted one
(LoRA weights, optimizer moments, EMA, losses, and every random stream the loop draws from); a save that fails
leaves no checkpoint under the final name; `keep`, `latest` and the resume errors; LoRA export in PEFT and
diffusers formats, checked against a fresh StableDiffusion3Pipeline (tests/tiny_sd3.py) loading the export.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_checkpoint.py
"""
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
import tiny_sd3
from support.checkpoint import (EMA, export_lora, latest_checkpoint, load_checkpoint, resolve_resume,
                        save_checkpoint)
from flow_matching import flow_matching_loss, interpolate
from support.resolve import load_diffusers_lora
from support.models import build_world_model, load_sd3
from world.model import WorldModelConfig

SMALL = WorldModelConfig(latent_channels=4, width=32, heads=2, layers=2, text_width=32, text_layers=1)
PROMPTS = ["a red circle", 'a sign that says "K7"', "a sunset over the sea", "two blue squares"]
CONFIG = {"lr": 1e-3, "rank": 4}


@torch.no_grad()
def _perturb(module, seed, std=0.05):
    """Seeded noise on every parameter; the world model's zero-initialised output would hide the LoRA."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _fresh():
    """Everything a run builds before its loop: model + LoRA, optimizer, EMA, a seeded generator."""
    model = build_world_model(SMALL, seed=1)
    _perturb(model, seed=2)
    model.requires_grad_(False)
    model.add_lora("student", rank=4, alpha=8)
    model.adapter("student")
    params = model.lora_parameters("student")
    opt = torch.optim.AdamW(params, lr=1e-3)
    return model, opt, EMA(params, decay=0.9), torch.Generator().manual_seed(3)


def _steps(model, opt, ema, gen, first, last):
    """Flow-matching steps first..last-1 whose data, noise, time and prompts come from four random streams."""
    losses = []
    for _ in range(first, last):
        x0 = torch.randn(2, *model.latent_shape, generator=gen)  # (2, C, 8, 8): the named generator
        eps = torch.randn_like(x0)  # torch's global RNG
        t = torch.rand(2, generator=gen) * 0.8 + 0.1 + float(np.random.uniform(0, 0.05))  # numpy's global RNG
        prompts = random.sample(PROMPTS, 2)  # python's random
        v = model.velocity(interpolate(x0, eps, t), t, model.encode_prompts(prompts))
        loss = flow_matching_loss(v, x0, eps)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        losses.append(loss.detach())
    return losses


def _seed_globals(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_is_bit_identical(tmp_path):
    n, k = 6, 3
    model, opt, ema, gen = _fresh()
    _seed_globals(0)
    losses = _steps(model, opt, ema, gen, 0, k)
    path = save_checkpoint(str(tmp_path), k, model, "student", opt, CONFIG, ema=ema, generators={"rollout": gen})
    losses += _steps(model, opt, ema, gen, k, n)  # the uninterrupted run (saving consumes no randomness)

    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors", "ema.safetensors",
                                        "optimizer.pt", "rng.pt", "state.json"]
    model2, opt2, ema2, gen2 = _fresh()
    _seed_globals(123)  # the new process starts from other random states; loading must restore them all
    state = load_checkpoint(resolve_resume("latest", str(tmp_path)), model2, "student", opt2, ema=ema2,
                            generators={"rollout": gen2})
    assert state == {"step": k, "config": CONFIG}
    resumed = _steps(model2, opt2, ema2, gen2, k, n)

    assert len(set(x.item() for x in losses)) == n  # the loop really trains on fresh draws each step
    assert all(torch.equal(a, b) for a, b in zip(losses[k:], resumed))
    a, b = model.adapter_state("student"), model2.adapter_state("student")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert all(torch.equal(s, s2) for s, s2 in zip(ema.shadow, ema2.shadow))
    for p, p2 in zip(model.lora_parameters("student"), model2.lora_parameters("student")):
        s, s2 = opt.state[p], opt2.state[p2]
        assert torch.equal(s["exp_avg"], s2["exp_avg"]) and torch.equal(s["exp_avg_sq"], s2["exp_avg_sq"])


def test_resume_errors_name_the_folder(tmp_path):
    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(tmp_path)))):
        resolve_resume("latest", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_resume(str(tmp_path / "nowhere"), str(tmp_path))
    model, opt, ema, _ = _fresh()
    with pytest.raises(FileNotFoundError, match="state.json"):
        load_checkpoint(str(tmp_path), model, "student", opt)


def test_resume_rejects_a_missing_or_different_adapter(tmp_path):
    model, opt, _, _ = _fresh()
    path = save_checkpoint(str(tmp_path), 1, model, "student", opt, CONFIG)
    other = build_world_model(SMALL, seed=1)
    with pytest.raises(ValueError, match="no adapter 'student'"):
        load_checkpoint(path, other, "student", opt)
    other.add_lora("student", rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"does not fit adapter 'student'.*\(2, 32\).*\(4, 32\)|\(4, 32\).*\(2, 32\)"):
        load_checkpoint(path, other, "student", torch.optim.AdamW(other.lora_parameters("student")))
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        load_checkpoint(path, model, "student", opt, ema=EMA(model.lora_parameters("student")))


def test_resume_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, opt, _, _ = _fresh()
    run = str(tmp_path)
    first = save_checkpoint(run, 3, model, "student", opt, CONFIG)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    real_save = torch.save
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(run, 5, model, "student", opt, CONFIG)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(run)) == ["checkpoint-3"] and latest_checkpoint(run) == first

    # a killed process skips the clean-up: its temp folder is never taken for a checkpoint, and the next save
    # clears it
    shutil.copytree(first, os.path.join(run, ".checkpoint-9.tmp"))
    assert latest_checkpoint(run) == first and resolve_resume("latest", run) == first
    save_checkpoint(run, 4, model, "student", opt, CONFIG)
    assert sorted(os.listdir(run)) == ["checkpoint-3", "checkpoint-4"]


def test_resume_keep_newest_and_resave(tmp_path):
    model, opt, _, _ = _fresh()
    run = str(tmp_path)
    for step in [2, 10, 4, 8]:
        save_checkpoint(run, step, model, "student", opt, CONFIG, keep=2)
    assert sorted(os.listdir(run)) == ["checkpoint-10", "checkpoint-8"]  # by step number, not by name or age
    save_checkpoint(run, 10, model, "student", opt, {"again": True}, keep=2)  # the same step replaces its folder
    assert sorted(os.listdir(run)) == ["checkpoint-10", "checkpoint-8"]
    assert latest_checkpoint(run).endswith("checkpoint-10")


def test_ema_average_and_applied():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update()  # 0.5 * 0 + 0.5 * 4
    ema.update()  # 0.5 * 2 + 0.5 * 4
    assert torch.equal(ema.shadow[0], torch.full((3,), 3.0))
    with ema.applied():
        assert torch.equal(p.detach(), torch.full((3,), 3.0))
    assert torch.equal(p.detach(), torch.full((3,), 4.0))
    with pytest.raises(ValueError, match="does not fit this EMA"):
        ema.load_state_dict({"shadow.0": torch.zeros(4)})


# ----------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(tiny_sd3.save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3")))


def _sd3_with_random_lora(tiny_path):
    model = load_sd3(tiny_path, dtype=torch.float32, device="cpu")
    model.add_lora("student", rank=4, alpha=8)  # alpha != r: the scale must survive the export
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.lora_parameters("student"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.adapter("student")
    return model


def _transformer_inputs():
    g = torch.Generator().manual_seed(1)
    side = tiny_sd3.SAMPLE_SIZE
    return dict(hidden_states=torch.randn(2, tiny_sd3.LATENT_CHANNELS, side, side, generator=g),
                encoder_hidden_states=torch.randn(2, 5, tiny_sd3.T5_WIDTH, generator=g),
                pooled_projections=torch.randn(2, tiny_sd3.POOLED_DIM, generator=g),
                timestep=torch.tensor([300.0, 800.0]))


@torch.no_grad()
def _out(transformer):
    return transformer(**_transformer_inputs(), return_dict=False)[0]


@pytest.mark.filterwarnings("ignore")
def test_export_lora_loads_in_a_fresh_pipeline_and_peft(tiny_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    model = _sd3_with_random_lora(tiny_path)
    ours = _out(model.transformer)
    model.adapter(None)
    assert (ours - _out(model.transformer)).abs().max() > 1e-2  # the LoRA changes the output

    out = export_lora(model, "student", str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["peft", "pytorch_lora_weights.safetensors"]
    assert sorted(os.listdir(os.path.join(out, "peft"))) == ["adapter_config.json", "adapter_model.safetensors"]

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)  # diffusers' own loader, nothing of ours
    pipe.load_lora_weights(out)
    torch.testing.assert_close(_out(pipe.transformer), ours, atol=1e-6, rtol=1e-5)

    for load in ["peft", "diffusers"]:  # back into a fresh T2IModel, from either format
        fresh = load_sd3(tiny_path, dtype=torch.float32, device="cpu")
        if load == "peft":
            fresh.load_adapter(os.path.join(out, "peft"), "student")
        else:
            load_diffusers_lora(fresh, os.path.join(out, "pytorch_lora_weights.safetensors"), "student")
        fresh.adapter("student")
        torch.testing.assert_close(_out(fresh.transformer), ours, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_export_diffusers_lora_without_metadata_and_foreign_keys(tiny_path, tmp_path):
    """A diffusers LoRA file with no stored config (older trainers) loads with alpha = r; text-encoder keys fail."""
    from safetensors.torch import save_file
    model = _sd3_with_random_lora(tiny_path)
    state = {f"transformer.{k}": v.contiguous() for k, v in model.adapter_state("student").items()}
    save_file(state, str(tmp_path / "bare.safetensors"))
    fresh = load_sd3(tiny_path, dtype=torch.float32, device="cpu")
    load_diffusers_lora(fresh, str(tmp_path / "bare.safetensors"), "x")
    assert fresh.transformer.peft_config["x"].r == fresh.transformer.peft_config["x"].lora_alpha == 4
    save_file({**state, "text_encoder.q.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="outside the transformer"):
        load_diffusers_lora(fresh, str(tmp_path / "te.safetensors"), "y")


def test_fresh_log_keeps_the_previous_run_and_appending_continues_it(tmp_path):
    from support.metrics import jsonl_logger
    path = tmp_path / "run" / "train_log.jsonl"
    log = jsonl_logger(str(path), fresh=True)   # nothing there yet: nothing to move
    log(iter=0, kl=1.0)
    jsonl_logger(str(path))(iter=1, kl=0.5)     # a resumed run appends to its own log
    assert [json.loads(s)["iter"] for s in path.read_text().splitlines()] == [0, 1]
    jsonl_logger(str(path), fresh=True)(iter=0, kl=2.0)   # a new run: a file of its own
    kept = [p for p in (tmp_path / "run").iterdir() if p.name != "train_log.jsonl"]
    assert len(kept) == 1 and re.fullmatch(r"train_log-\d{8}-\d{6}\.jsonl", kept[0].name)
    assert [json.loads(s)["iter"] for s in kept[0].read_text().splitlines()] == [0, 1]
    assert [json.loads(s)["kl"] for s in path.read_text().splitlines()] == [2.0]


# ------------------------------------------------------------------------------ unreadable, other sources
@pytest.mark.parametrize("damage", ["truncated_adapter", "broken_state", "truncated_optimizer"])
def test_resume_names_an_unreadable_checkpoint_and_the_newest_readable_one(tmp_path, damage):
    from support.checkpoint import resume_training
    from support.config import Config
    model, opt, _, gen = _fresh()
    run = str(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(run, step, model, "student", opt, CONFIG, generators={"sampling_rank0": gen})
    file, keep = {"truncated_adapter": ("adapter_model.safetensors", 0.5), "broken_state": ("state.json", 0.3),
                  "truncated_optimizer": ("optimizer.pt", 0.5)}[damage]
    for step in (3, 2):   # the two newest both damaged: checkpoint-1 is the newest readable one
        path = os.path.join(run, f"checkpoint-{step}", file)
        data = open(path, "rb").read()
        open(path, "wb").write(data[:int(len(data) * keep)])
    cfg = Config(resume_from_checkpoint="latest", device="cpu")
    with pytest.raises(SystemExit) as e:
        resume_training(cfg, run, model, opt, None, gen, rank=0)
    msg = str(e.value)
    assert msg.startswith(f"--resume_from_checkpoint: {os.path.join(run, 'checkpoint-3')} is unreadable ({file}:"), msg
    assert msg.endswith(f"pass --resume_from_checkpoint {os.path.join(run, 'checkpoint-1')}") and "\n" not in msg, msg
    assert resume_training(Config(resume_from_checkpoint=os.path.join(run, "checkpoint-1"), device="cpu"), run,
                           model, opt, None, gen, rank=0) == 1   # the one it names resumes
    shutil.rmtree(os.path.join(run, "checkpoint-1"))
    with pytest.raises(SystemExit, match=re.escape(f"{run} holds no readable checkpoint")):
        resume_training(cfg, run, model, opt, None, gen, rank=0)


def test_resume_refuses_other_sources_naming_what_changed(tmp_path):
    from support.checkpoint import resume_training
    from support.config import Config
    from support.provenance import changed_sources, run_sources
    model, opt, _, gen = _fresh()
    (tmp_path / "ocr").mkdir()
    (tmp_path / "ocr" / "adapter_model.safetensors").write_bytes(b"ocr teacher")
    teachers = {"ocr": {"path": str(tmp_path / "ocr"), "sha256": "a" * 64}, "anchor": {"path": "org/deqa", "sha256": None}}
    sources = run_sources(str(tmp_path / "base"), model.schedule(), teachers)
    assert sources["base"] == {"path": str(tmp_path / "base"), "sha256": None,
                               "scheduler": {"shift": 1.0, "num_train_timesteps": None}}   # the world model's grid
    run = str(tmp_path / "run")
    save_checkpoint(run, 1, model, "student", opt, CONFIG, generators={"sampling_rank0": gen}, extra={"sources": sources})
    assert json.load(open(os.path.join(run, "checkpoint-1", "state.json")))["sources"] == sources
    cfg = Config(resume_from_checkpoint="latest", device="cpu")
    assert resume_training(cfg, run, model, opt, None, gen, 0, sources=sources) == 1   # the same models
    other = {**sources, "ocr": {**teachers["ocr"], "sha256": "b" * 64}, "base": {
        **sources["base"], "scheduler": {"shift": 3.0, "num_train_timesteps": None}}}
    with pytest.raises(SystemExit) as e:
        resume_training(cfg, run, model, opt, None, gen, 0, sources=other)
    msg = str(e.value)
    assert "was made with other models: base: " in msg and "'shift': 1.0" in msg and "'shift': 3.0" in msg, msg
    assert f"ocr: {tmp_path / 'ocr'} (sha256 aaaaaaaaaaaa) -> {tmp_path / 'ocr'} (sha256 bbbbbbbbbbbb)" in msg, msg
    assert "anchor" not in msg and "\n" not in msg
    # a hub id without weights here is compared by its name; a teacher added or dropped is named too
    assert changed_sources(sources, {**sources, "anchor": {"path": "org/other", "sha256": None}}) == [
        "anchor: org/deqa (sha256 None) -> org/other (sha256 None)"]
    assert changed_sources(sources, {k: v for k, v in sources.items() if k != "ocr"}) == [
        f"ocr: {tmp_path / 'ocr'} (sha256 aaaaaaaaaaaa) -> absent"]
