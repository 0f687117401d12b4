"""
The real path end to end on a tiny Stable Diffusion 3 pipeline saved in diffusers' folder layout
(tests/tiny_sd3.py): `train.py --stage distill --model PIPELINE --teacher NAME=PEFT_FOLDER ... --mar FOLDER
--prompts TASK=FILE` in flow_grpo's prompt formats, exactly the command one runs on SD3.5-Medium with the
published teachers, at toy size on the CPU. Also: a teacher trained for another architecture is refused
with a message naming the mismatch. The settings a first SD3.5-M run depends on: T5's sequence length and the
text encoders' device, the scheduler's time grid, and the advice given when a hub model is gated or missing.
"""
import json
import os
import shutil

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from support import rollouts
from support import checkpoint, config, hub, provenance, resolve
from eval import main as eval_main
import flow_matching
from tools import infer
from support import models
import train
from world import toy_world
from tiny_sd3 import CLIP_MAX_LENGTH, IMAGE_SIZE, save_random_loras, save_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory):
    """A tiny SD3 pipeline folder, three PEFT teacher folders and an anchor made on it, and prompt files
    in flow_grpo's formats (GenEval metadata jsonl, OCR txt)."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = str(root / "pipeline")
    save_tiny_sd3_pipeline(pipe)
    model = models.load_sd3(pipe, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    save_random_loras(model, root, ("geneval", "ocr", "deqa"), std=0.05)
    with open(root / "geneval_metadata.jsonl", "w") as f:
        for r in toy_world.prompts("geneval", "train")[:6]:
            f.write(json.dumps(r["metadata"] | {"prompt": r["prompt"]}) + "\n")
    with open(root / "ocr.txt", "w") as f:
        f.write("".join(r["prompt"] + "\n" for r in toy_world.prompts("ocr", "train")[:6]))
    return root


def _argv(root, students, extra=()):
    return ["--stage", "distill", "--model", str(root / "pipeline"), "--device", "cpu",
            "--teacher", f"geneval={root / 'geneval'}", "--teacher", f"ocr={root / 'ocr'}",
            "--mar", str(root / "deqa"), "--prompts", f"geneval={root / 'geneval_metadata.jsonl'}",
            "--prompts", f"ocr={root / 'ocr.txt'}", "--resolution", str(IMAGE_SIZE),
            "--student_dir", str(students), "--cold_start_dir", str(students / "cold"),
            "--opd_iters", "2", "--opd_prompts", "2", "--num_steps", "3", "--micro_batch", "2",
            "--train_timesteps", "1", "--log_rewards", "false", "--compile", "false",
            "--checkpoint_every", "1"] + list(extra)


def test_sd35_pipeline_distill_with_peft_teachers_end_to_end(sd3_world, tmp_path, capsys):
    students = tmp_path / "students"
    train.main(_argv(sd3_world, students))
    out = capsys.readouterr().out
    assert "teachers {'geneval': 'geneval', 'ocr': 'ocr'}, MAR anchor anchor" in out
    assert "no --eval_prompts for the --prompts given: not evaluated" in out and "flow_opd/" not in out
    run = students / "merge"
    rows = [json.loads(line) for line in open(run / "train_log.jsonl")]
    assert [r["iter"] for r in rows] == [0, 1] and all(r["kl"] > 0 and r["mar"] > 0 for r in rows)
    assert (run / "checkpoint-2" / "optimizer.pt").exists()
    made_from = json.load(open(run / "checkpoint-2" / "state.json"))["sources"]   # the teachers, anchor and base
    assert made_from["ocr"] == {"path": str(sd3_world / "ocr"), "sha256": provenance.weights_sha256(str(sd3_world / "ocr"))}
    assert made_from["anchor"]["path"] == str(sd3_world / "deqa") and made_from["anchor"]["sha256"]
    assert made_from["base"]["scheduler"] == {"shift": 3.0, "num_train_timesteps": 1000}
    more = ["--resume_from_checkpoint", "latest", "--opd_iters", "3"]
    with pytest.raises(SystemExit) as e:   # another teacher set: refused, naming the teacher that changed
        train.main(_argv(sd3_world, students, more + ["--teacher", f"ocr={sd3_world / 'geneval'}"]))
    assert "was made with other models: ocr: " in str(e.value) and "geneval (sha256" in str(e.value), str(e.value)
    shifted = tmp_path / "shifted"   # the same weights, a scheduler with another shift
    shutil.copytree(sd3_world / "pipeline", shifted)
    conf = json.load(open(shifted / "scheduler" / "scheduler_config.json"))
    json.dump({**conf, "shift": 2.0}, open(shifted / "scheduler" / "scheduler_config.json", "w"))
    with pytest.raises(SystemExit) as e:
        train.main(_argv(sd3_world, students, more + ["--model", str(shifted)]))
    msg = str(e.value)
    assert "other models: base: " in msg and "'shift': 3.0" in msg and "'shift': 2.0" in msg and "ocr" not in msg, msg
    # the student loads in a fresh diffusers pipeline through load_lora_weights
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_world / "pipeline"), dtype=torch.float32)
    pipe.load_lora_weights(str(run / "export"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    # its model card, beside the PEFT folder and the export: the base, each teacher and the anchor with its sha256
    for folder in (run / "adapter", run / "export" / "peft"):
        assert LoraConfig.from_pretrained(str(folder)).base_model_name_or_path == str(sd3_world / "pipeline")
    row = lambda role, folder: f"| {role} | `{folder}` | {provenance.weights_sha256(str(folder))} |"
    for folder in (run / "adapter", run / "export"):
        card = (folder / "README.md").read_text()
        assert row("base", sd3_world / "pipeline") in card
        for role, teacher in (("teacher geneval", "geneval"), ("teacher ocr", "ocr"), ("MAR anchor", "deqa")):
            assert row(role, sd3_world / teacher) in card
        assert "| cold start |" in card and "  --opd_iters 2" in card and "Not evaluated." in card
    resolve.load_lora(models.load_sd3(str(sd3_world / "pipeline"), dtype=torch.float32, device="cpu"),
                      str(run / "adapter"), "student")   # the PEFT folder, README and all


def test_sd35_pipeline_rejects_teacher_of_another_architecture(sd3_world, tmp_path):
    world_teacher = os.path.join(ROOT, "checkpoints", "teachers", "ocr")  # made for the world model
    argv = _argv(sd3_world, tmp_path / "students") + ["--teacher", f"ocr={world_teacher}"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value)
    assert msg.startswith("teacher ocr:") and "does not fit this model" in msg, msg


def _damaged_copy(src, dst, drop=(), add=None):
    """A copy of a PEFT teacher folder whose weights file lacks the keys `drop` and has the tensors `add`."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    weights = os.path.join(dst, "adapter_model.safetensors")
    state = {k: v for k, v in load_file(weights).items() if k not in drop}
    save_file({**state, **(add or {})}, weights)
    return str(dst), weights


@pytest.mark.parametrize("damage", ["missing_B", "missing_A", "foreign_key"])
def test_sd35_teacher_with_a_missing_or_foreign_lora_factor_is_refused(sd3_world, tmp_path, damage):
    """PEFT would load a teacher lacking one block's lora_B with B = 0 on that layer (the teacher silently off
    there); the check names the layer and the file instead."""
    layer = "base_model.model.transformer_blocks.1.attn.to_q"
    kind = {"missing_B": "lora_B", "missing_A": "lora_A"}.get(damage)
    drop = [f"{layer}.{kind}.weight"] if kind else []
    add = {"base_model.model.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 16)} \
        if damage == "foreign_key" else None
    folder, weights = _damaged_copy(sd3_world / "ocr", tmp_path / "ocr", drop, add)
    argv = _argv(sd3_world, tmp_path / "students") + ["--teacher", f"ocr={folder}"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value)
    assert msg.startswith("teacher ocr:") and repr(weights) in msg and "\n" not in msg, msg
    if kind:
        assert f"lacks {kind} of transformer_blocks.1.attn.to_q, a layer its config targets" in msg, msg
    else:
        assert "'transformer_blocks.7.attn.to_q', which this transformer lacks" in msg, msg
    assert not (tmp_path / "students").exists()   # refused before anything was built


def test_sd35_pipeline_prompt_file_error_names_line(sd3_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a photo of a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}\n{oops\n')
    argv = _argv(sd3_world, tmp_path / "students") + ["--prompts", f"geneval={bad}"]
    with pytest.raises(SystemExit, match="line 2"):
        train.main(argv)


def test_model_card_names_the_hub_base_and_the_scores(tmp_path):
    from huggingface_hub import ModelCard
    record = provenance.made_here("Flow-OPD student", 0, 300, {
        "base": provenance.source("stabilityai/stable-diffusion-3.5-medium@b940f67"),
        "ocr": provenance.source("jieliu/SD3.5M-FlowGRPO-Text")})
    provenance.write_model_card([str(tmp_path)], record, "settings: the defaults", {"ocr": 0.8125, "se/ocr": 0.03125})
    card = ModelCard.load(str(tmp_path / "README.md"))
    assert card.data.base_model == "stabilityai/stable-diffusion-3.5-medium" and card.data.library_name == "diffusers"
    assert "| teacher ocr | `jieliu/SD3.5M-FlowGRPO-Text` | not hashed (a hub id) |" in card.text
    assert "| ocr | 0.8125 | 0.031 |" in card.text and "settings: the defaults" in card.text
def _record_passes(monkeypatch):
    """[(active adapter, guidance scale, samples, transformer batch sizes)] of every T2IModel.velocity call."""
    from diffusers import SD3Transformer2DModel
    calls, batches = [], []
    forward, velocity = SD3Transformer2DModel.forward, models.T2IModel.velocity
    monkeypatch.setattr(SD3Transformer2DModel, "forward",
                        lambda self, *a, **kw: batches.append(kw["hidden_states"].shape[0]) or forward(self, *a, **kw))

    def recorded(self, x, t, cond, uncond=None, guidance_scale=1.0):
        n = len(batches)
        v = velocity(self, x, t, cond, uncond, guidance_scale)
        calls.append((self._active, guidance_scale, x.shape[0], batches[n:]))
        return v
    monkeypatch.setattr(models.T2IModel, "velocity", recorded)
    return calls


def test_sd35_per_teacher_guidance_and_no_cfg_training(sd3_world, tmp_path, monkeypatch):
    """--guidance_scale 1: rollouts, student and anchor run one conditional pass (no unconditional one);
    --teacher_guidance geneval=4.5: that teacher alone is guided, with its CFG pair in one batch of 2m."""
    calls = _record_passes(monkeypatch)
    train.main(_argv(sd3_world, tmp_path / "a", ["--opd_iters", "1"]))   # the default: CFG 4.5 everywhere
    assert {c[0] for c in calls} >= {"student", "anchor"}
    assert all(scale == 4.5 and batches == [2 * n] for _, scale, n, batches in calls)
    calls.clear()
    train.main(_argv(sd3_world, tmp_path / "b", ["--opd_iters", "1", "--opd_prompts", "4", "--guidance_scale", "1",
                                                  "--teacher_guidance", "geneval=4.5"]))
    by = lambda who: [(scale, n, batches) for active, scale, n, batches in calls if active == who]  # noqa: E731
    assert by("geneval") and all(scale == 4.5 and batches == [2 * n] for scale, n, batches in by("geneval"))
    for who in ("student", "anchor", "ocr"):   # one pass each: no unconditional forward at scale 1
        assert by(who) and all(scale == 1 and batches == [n] for scale, n, batches in by(who)), who
    with pytest.raises(SystemExit, match=r"--teacher_guidance pickscore: not a routed teacher \(those: geneval ocr\)"):
        train.main(_argv(sd3_world, tmp_path / "c", ["--teacher_guidance", "pickscore=2"]))


def test_sd35_train_resolution_below_the_evaluation_resolution(sd3_world, tmp_path, monkeypatch):
    seen, real = [], train.sample_rollouts   # (model, (trajectories, images)) of each iteration's rollouts
    monkeypatch.setattr(train, "sample_rollouts", lambda model, *a, **kw: seen.append((model, real(model, *a, **kw)))
                        or seen[-1][1])
    train.main(_argv(sd3_world, tmp_path, ["--opd_iters", "1", "--train_resolution", str(IMAGE_SIZE // 2)]))
    model, (traj, images) = seen[0]
    assert images.shape[-2:] == (IMAGE_SIZE // 2, IMAGE_SIZE // 2)        # rollouts at --train_resolution
    assert traj.x_t.shape[-2:] == (IMAGE_SIZE // 4, IMAGE_SIZE // 4)      # latents: 2x smaller (VAE factor 2)
    assert model.latent_shape[1] == IMAGE_SIZE // 2   # the latents of --resolution: what evaluation samples
    assert rollouts.sample_images(model, ["a cat"], steps=2).shape[-1] == IMAGE_SIZE
    with pytest.raises(SystemExit, match="--train_resolution: resolution 6 must be a multiple of 4"):
        train.main(_argv(sd3_world, tmp_path, ["--train_resolution", "6"]))


# ------------------------------------------------------------------------------ text encoders, T5 length
def test_sd35_t5_sequence_length_follows_flag(sd3_world):
    pipe = str(sd3_world / "pipeline")
    default = resolve.load_model(config.parse_config(["--model", pipe, "--device", "cpu", "--mixed_precision", "no"]))
    assert default.encode_prompts(["a cat"])[0].shape[1] == CLIP_MAX_LENGTH + 128  # flow_grpo's 128, not 256
    cfg = config.parse_config(["--model", pipe, "--device", "cpu", "--mixed_precision", "no",
                               "--max_sequence_length", "20"])
    embeds, pooled = resolve.load_model(cfg).encode_prompts(["a cat", 'a sign that says "K7"'])
    assert embeds.shape[1] == CLIP_MAX_LENGTH + 20


def test_sd35_text_encoders_on_cpu_in_fp32_beside_a_bf16_transformer(sd3_world):
    model = models.load_sd3(str(sd3_world / "pipeline"), dtype=torch.bfloat16, device="cpu", text_encoder_device="cpu")
    pipe = model.encoder.pipe
    assert model.transformer.dtype == torch.bfloat16
    assert all(enc.dtype == torch.float32 and enc.device.type == "cpu"
               for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3))
    embeds, pooled = model.encode_prompts(["a cat"])
    assert embeds.device == model.transformer.device and embeds.dtype == torch.float32
    # the empty prompt (CFG's negative) is encoded once and reused; it equals a fresh encoding
    empty, empty_pooled = model.encode_prompts(["", "", ""])
    fresh, fresh_pooled = model.encoder.encode([""] * 3)
    assert empty.shape == fresh.shape and empty_pooled.shape == fresh_pooled.shape
    torch.testing.assert_close(empty, fresh, rtol=1e-5, atol=1e-6)
    assert model.encode_prompts([""])[0].data_ptr() == empty.data_ptr()  # the cached tensor, not a new encoding


def test_sd35_fp16_keeps_text_encoders_out_of_fp16_and_trains_with_a_loss_scaler(sd3_world, tmp_path, monkeypatch):
    assert models.text_encoder_dtype(torch.float16, "cuda") == torch.bfloat16   # T5 overflows fp16
    assert models.text_encoder_dtype(torch.float16, "cpu") == torch.float32
    assert models.text_encoder_dtype(torch.bfloat16, "cuda:1") == torch.bfloat16
    assert models.text_encoder_dtype(torch.float32, "cuda") == torch.float32
    model = resolve.load_model(config.parse_config(["--model", str(sd3_world / "pipeline"), "--device", "cpu",
                                                    "--mixed_precision", "fp16"]))
    pipe = model.encoder.pipe
    assert model.transformer.dtype == torch.float16
    assert all(enc.dtype == torch.float32 for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3))
    steps = []   # the distillation loop steps through the scaler
    real = rollouts.optimizer_step
    monkeypatch.setattr(train, "optimizer_step", lambda *a: steps.append(a[3]) or real(*a))
    train.main(_argv(sd3_world, tmp_path / "students", ["--mixed_precision", "fp16", "--opd_iters", "1"]))
    assert len(steps) == 1 and isinstance(steps[0], torch.amp.GradScaler) and steps[0].get_scale() == 2.0 ** 16
    state = json.load(open(tmp_path / "students" / "merge" / "checkpoint-1" / "state.json"))
    assert state["scaler"]["scale"] == 2.0 ** 16   # saved for an exact resume
    rows = [json.loads(line) for line in open(tmp_path / "students" / "merge" / "train_log.jsonl")]
    assert rows[0]["kl"] > 0 and torch.isfinite(torch.tensor(rows[0]["kl"]))


def test_sd35_sft_cold_start_takes_the_runs_precision_resolution_and_teacher_guidance(sd3_world, tmp_path,
                                                                                      monkeypatch):
    """--cold_start sft with fp16, --train_resolution and --teacher_guidance: the teachers' samples are drawn at the
    training resolution with each teacher's own CFG, and the fresh student LoRA trains through the loss scaler."""
    seen = {}
    real = train.sft_cold_start

    def spy(model, name, teachers, pool, **kw):
        seen.update(kw, model=model)
        return real(model, name, teachers, pool, **kw)
    monkeypatch.setattr(train, "sft_cold_start", spy)
    train.main(_argv(sd3_world, tmp_path, ["--cold_start", "sft", "--sft_steps", "3", "--sft_samples", "2",
                                           "--mixed_precision", "fp16", "--train_resolution", str(IMAGE_SIZE // 2),
                                           "--teacher_guidance", "geneval=1.0", "--opd_iters", "1"]))
    assert seen["latent_shape"] == seen["model"].latent_shape_at(IMAGE_SIZE // 2) != seen["model"].latent_shape
    assert seen["guidance"] == {"geneval": 1.0} and isinstance(seen["scaler"], torch.amp.GradScaler)
    assert seen["scaler"].get_scale() <= 2.0 ** 16   # it stepped (an overflowed step halves the scale)
    from safetensors.torch import load_file
    lora_b = [v for k, v in load_file(str(tmp_path / "cold" / "sft" / "adapter_model.safetensors")).items()
              if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)   # a fresh LoRA's B starts at 0: it was trained


# ------------------------------------------------------------------------------------------ time grid
@pytest.mark.parametrize("steps", [10, 40])
def test_sd35_time_grid_is_the_schedulers(sd3_world, steps, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler
    model = models.load_sd3(str(sd3_world / "pipeline"), dtype=torch.float32, device="cpu")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # what StableDiffusion3Pipeline samples SD3.5 with
    scheduler.set_timesteps(steps)
    grid = model.time_grid(steps)
    torch.testing.assert_close(grid, scheduler.sigmas.float(), rtol=1e-6, atol=0)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and len(grid) == steps + 1
    assert 0 < grid[-2].item() < 0.01  # the scheduler's tiny last step, unlike the world's equal steps
    assert not torch.allclose(grid, flow_matching.time_grid(steps, 3.0), rtol=1e-3)
    seen = []  # the evaluation sampler asks the model for its grid
    monkeypatch.setattr(rollouts, "euler_sample", lambda v, x1, sigmas: seen.append(sigmas) or x1)
    rollouts.sample_images(model, ["a cat"], steps=steps)
    torch.testing.assert_close(seen[0], grid, rtol=0, atol=0)


def test_world_model_keeps_its_own_time_grid():
    world = models.build_world_model()
    assert torch.equal(world.time_grid(10), flow_matching.time_grid(10, 1.0))
    assert torch.equal(world.time_grid(10, shift=3.0), flow_matching.time_grid(10, 3.0))


# -------------------------------------------------------------------------- gated or missing hub models
def _hub_error(kind, message):
    """A huggingface_hub error without an HTTP response object (its constructor wants one)."""
    from huggingface_hub import errors
    cls = getattr(errors, kind)
    e = cls.__new__(cls)
    OSError.__init__(e, message)
    return e


def _wrapped(kind, message):
    """The error as diffusers raises it: an OSError whose cause is the hub's error."""
    try:
        try:
            raise _hub_error(kind, message)
        except OSError as inner:
            raise OSError("Cannot load model org/name: the model is not fully cached locally") from inner
    except OSError as outer:
        return outer


HUB_CASES = [  # (error raised by the loader, words the message must contain)
    (lambda: _hub_error("GatedRepoError", "403 Cannot access gated repo"), ["gated", "hf auth login", "licence"]),
    (lambda: _wrapped("GatedRepoError", "403 Cannot access gated repo"), ["GatedRepoError", "hf auth login"]),
    (lambda: _hub_error("RepositoryNotFoundError", "404 Repository Not Found"), ["check the id", "hf auth login"]),
    (lambda: _hub_error("LocalEntryNotFoundError", "offline and not cached"), ["unreachable", "hf download"]),
    (lambda: OSError("Error no file named diffusion_pytorch_model.safetensors"), ["hf auth login", "local"]),
]


@pytest.mark.parametrize("make_error,words", HUB_CASES)
def test_sd35_unavailable_hub_model_ends_in_advice(monkeypatch, make_error, words):
    from diffusers import StableDiffusion3Pipeline

    def refuse(*args, **kwargs):
        raise make_error()
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", refuse)
    cfg = config.parse_config(["--model", "stabilityai/stable-diffusion-3.5-medium", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        resolve.load_model(cfg)
    msg = str(e.value)
    assert msg.startswith("--model: 'stabilityai/stable-diffusion-3.5-medium' could not be loaded"), msg
    assert all(w in msg for w in words) and "Fix:" in msg, msg
    with pytest.raises(SystemExit) as e:  # infer.py gives the same advice
        infer.main(["--model", "stabilityai/stable-diffusion-3.5-medium", "--prompt", "a cat", "--device", "cpu"])
    assert str(e.value) == msg


def test_sd35_unavailable_hub_teacher_ends_in_advice(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise _hub_error("RepositoryNotFoundError", "404 Repository Not Found")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(SystemExit) as e:
        resolve.adapter_folder("geneval", "jieliu/no-such-teacher")
    msg = str(e.value)
    assert msg.startswith("adapter geneval: 'jieliu/no-such-teacher' is not a folder here") and "check the id" in msg


# ------------------------------------------------------------------------------------------------ eval
@pytest.mark.slow
def test_eval_sd3_pipeline_with_loras_on_a_prompt_file_with_rapidocr(sd3_world, tmp_path, monkeypatch, capsys):
    """`python eval.py --model PIPELINE --lora ROW=PEFT --adapter ROW=EXPORT --eval_prompts ocr=FILE --ocr_reward
    rapidocr --paired`: RapidOCR reads every image, the sizes are train.py's flags, the same LoRA in its two formats
    scores the same, and the world-only parts (style shares, --ood) are skipped for an SD3 model."""
    from support import reward_backends
    model = models.load_sd3(str(sd3_world / "pipeline"), dtype=torch.float32, device="cpu")
    model.load_adapter(str(sd3_world / "ocr"), "ocr")
    export = checkpoint.export_lora(model, "ocr", str(tmp_path / "export"))
    read, recognise = [], reward_backends.RapidOCRReward.recognise
    monkeypatch.setattr(reward_backends.RapidOCRReward, "recognise",
                        lambda self, image: read.append(image.shape) or recognise(self, image))
    common = ["--model", str(sd3_world / "pipeline"), "--device", "cpu", "--eval_steps", "2",
              "--eval_prompts_per_task", "2", "--eval_images_per_prompt", "2"]
    out = tmp_path / "table.json"
    eval_main(common + ["--lora", f"peft={sd3_world / 'ocr'}", "--adapter", f"export={export}", "--paired",
                        "--eval_prompts", f"ocr={sd3_world / 'ocr.txt'}", "--ocr_reward", "rapidocr",
                        "--out", str(out)])
    assert read == [(IMAGE_SIZE, IMAGE_SIZE, 3)] * 12   # 3 rows x 2 prompts x 2 images, each read by RapidOCR
    table = json.loads(out.read_text())
    assert set(table["rows"]) == {"base", "peft", "export"} and table["meta"]["tasks"] == ["ocr"]
    assert table["rows"]["peft"] == table["rows"]["export"] and set(table["rows"]["base"]) >= {"ocr", "deqa"}
    assert table["paired"]["peft"] == table["paired"]["export"] and table["paired"]["peft"][0]["deqa"]["mean"] != 0
    eval_main(common + ["--tasks", "ocr", "--eval_prompts_per_task", "1", "--eval_images_per_prompt", "1"])
    assert "web/ocr" not in capsys.readouterr().out   # the world's prompts, but not the world's images
    with pytest.raises(SystemExit, match="^--ood is the miniature world's out-of-domain set"):
        eval_main(common + ["--ood"])


# --------------------------------------------------------------------------------------- ID@REVISION
def test_split_revision_pins_hub_ids_and_keeps_local_paths_whole(tmp_path):
    assert hub.split_revision("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.split_revision("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert hub.split_revision("org/name") == ("org/name", None)
    local = tmp_path / "run@3"
    local.mkdir()
    assert hub.split_revision(str(local)) == (str(local), None)   # a path here wins, '@' and all
    with pytest.raises(ValueError, match="neither a path here nor ID@REVISION"):
        hub.split_revision("org/name@")


def test_revision_reaches_from_pretrained_and_snapshot_download(sd3_world, tmp_path, monkeypatch):
    """--model, --lora, --teacher/--mar (adapter_folder) and --pickscore_reward pass ID@REVISION's revision on."""
    import huggingface_hub
    import transformers
    from diffusers import StableDiffusion3Pipeline
    from support import reward_backends
    real, asked = StableDiffusion3Pipeline.from_pretrained, []
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", lambda repo, revision=None, **kw:
                        asked.append((repo, revision)) or real(str(sd3_world / "pipeline"), **kw))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None: asked.append((repo, revision)) or str(sd3_world / "ocr"))
    local = tmp_path / "pipeline@v1"   # a local folder whose name holds an '@'
    local.symlink_to(sd3_world / "pipeline")
    for spec in ("org/sd3@0123abc", str(local)):
        model = resolve.load_model(config.parse_config(["--model", spec, "--device", "cpu", "--mixed_precision", "no"]))
    resolve.load_lora(model, "org/teacher@v2", "ocr")
    resolve.adapter_folder("geneval", "org/teacher")
    assert asked == [("org/sd3", "0123abc"), (str(local), None), ("org/teacher", "v2"), ("org/teacher", None)]
    del asked[:]

    def clip(repo, revision=None, **kw):
        asked.append((repo, revision))
        raise RuntimeError("no CLIP here")
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", clip)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", clip)
    with pytest.raises(RuntimeError, match="no CLIP here"):
        reward_backends.PickScoreReward("yuvalkirstain/PickScore_v1@c3f1")
    with pytest.raises(RuntimeError, match="no CLIP here"):
        reward_backends.clip_processor("org/clip@v3", 224)
    assert asked == [("yuvalkirstain/PickScore_v1", "c3f1"), ("org/clip", "v3")]
    with pytest.raises(SystemExit, match="^--model: 'org/sd3@' is neither a path here nor ID@REVISION"):
        resolve.load_model(config.parse_config(["--model", "org/sd3@", "--device", "cpu"]))


# ----------------------------------------------------------------------------------------------- infer
def test_infer_lora_from_hub_id_at_a_resolution(sd3_world, tmp_path, monkeypatch):
    import huggingface_hub
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision=None: asked.append(repo) or str(sd3_world / "ocr"))
    common = ["--model", str(sd3_world / "pipeline"), "--prompt", "a cat", "--num_images", "1", "--eval_steps", "2",
              "--device", "cpu", "--resolution", str(2 * IMAGE_SIZE), "--out", str(tmp_path / "grid.png")]
    outs = [infer.main(common + ["--lora", f"ocr={lora}"])["ocr"] for lora in ("someone/SD3.5M-teacher",
                                                                               str(sd3_world / "ocr"))]
    assert asked == ["someone/SD3.5M-teacher"]
    assert outs[0].shape == (1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)  # --resolution, not the native size
    assert torch.equal(outs[0], outs[1])  # the hub id resolved to the same adapter as its folder


# ------------------------------------------------------------------------- the preset, the README commands
def test_preset_sd35m_paper_values_and_explicit_flags_win(capsys):
    cfg = config.parse_config(["--preset", "sd35m_paper"])
    assert (cfg.resolution, cfg.num_steps, cfg.eval_steps, cfg.guidance_scale, cfg.noise_level) == (512, 10, 40, 4.5, 0.7)
    assert cfg.train_timesteps == cfg.num_steps - 1 == 9      # timestep_fraction 0.99: every step but the last
    assert cfg.opd_prompts * cfg.opd_group == 128 and cfg.opd_lr == 1e-4
    assert cfg.cold_start == "merge_average" and (cfg.lora_rank, cfg.lora_alpha) == (32, 64)
    assert cfg.ema_decay ** 8 == pytest.approx(0.9, rel=1e-12)  # 0.9 every 8 steps
    assert cfg.mar_lambda == 0.02 and cfg.max_sequence_length == 128
    assert (cfg.lr, cfg.beta, cfg.group_size, cfg.adv_std, cfg.sde_window, cfg.shared_noise) == \
        (1e-4, 0.04, 24, "global", 0, False)
    assert all(getattr(cfg, k) == v for k, (v, _) in config.PRESETS["sd35m_paper"].items())
    mine = config.parse_config(["--opd_lr", "3e-4", "--preset", "sd35m_paper", "--resolution", "256",
                                "--shared_noise", "true"])
    assert (mine.opd_lr, mine.resolution, mine.shared_noise, mine.train_timesteps) == (3e-4, 256, True, 9)
    with pytest.raises(SystemExit):
        config.parse_config(["--preset", "sd35m"])
    assert "--preset 'sd35m': choose one of '', 'sd35m_paper'" in capsys.readouterr().err


def test_describe_lists_non_defaults_with_preset_sources():
    text = config.describe(config.parse_config(["--preset", "sd35m_paper", "--opd_lr", "3e-4", "--seed", "3"]))
    lines = text.splitlines()
    assert lines[0].startswith("settings (--preset sd35m_paper")
    assert "  --opd_lr 0.0003" in lines and "  --seed 3" in lines       # explicit: no preset source
    assert any(line.startswith("  --resolution 512   # preset: paper") for line in lines)
    assert any(line.startswith("  --ema_decay 0.986916   # preset:") for line in lines)
    assert any(line.startswith("  --shared_noise false   # preset:") for line in lines)
    assert not any(line.startswith(("  --num_steps", "  --preset")) for line in lines)  # equal to the defaults
    assert config.describe(config.parse_config([])) == "settings: the defaults"


def _readme_commands(section="## Run on SD3.5-Medium"):
    """Every `python train.py`/`torchrun ... train.py` and `python -m tools.infer` command of a README section, in
    its code blocks and inline code, with line continuations joined, as argument lists after the script."""
    import re
    import shlex
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(section)
    body = text[start:text.index("\n## ", start + len(section))]
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", body, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", body, flags=re.S))
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()] + inline
    commands = {"train.py": [], "tools.infer": []}
    for line in (line for line in lines if "train.py" in line or "tools.infer" in line):
        words = shlex.split(line, comments=True)
        for i, w in enumerate(words):
            if w in commands and (words[0] in ("python", "python3", "torchrun")):
                commands[w].append(words[i + 1:])
    return commands


def test_readme_sd35_commands_parse_with_the_real_flags(tmp_path, monkeypatch):
    commands = _readme_commands()
    assert commands["train.py"] and commands["tools.infer"]
    monkeypatch.chdir(tmp_path)   # the prompt files the commands name, empty: the flags check they exist
    for argv in commands["train.py"]:
        for spec in (argv[i + 1] for i, w in enumerate(argv) if w in ("--prompts", "--eval_prompts")):
            path = tmp_path / spec.split("=", 1)[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    for argv in commands["train.py"]:
        cfg = config.parse_config(argv)
        assert cfg.preset == "sd35m_paper" and cfg.resolution == 512
        assert sorted(resolve.named_paths(cfg.eval_prompts)) == sorted(resolve.named_paths(cfg.prompts)) \
            == ["geneval", "ocr", "pickscore"]  # every trained task is evaluated, so the table has an avg
    for argv in commands["tools.infer"]:
        assert infer.parse(argv)[0].resolution == 512
