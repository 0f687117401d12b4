"""Smoke tests of tools/bench.py and its parts (seconds): bench's flags are Config's, its "ours" variant is
train.opd_iteration itself, the floor runs the same transformer passes as ours, the released structure's reference
copies (unfused and fused) equal our adapters, every variant runs one iteration, and the SD3.5-M and mid paths run
on shrunken SD3 configs. Memory plan (tools/memory_plan.py, tools/memory_check.py): meta builds and LoRA counts
equal real ones, the activation formula equals the bytes the autograd graph saves, SD3.5-M's plan meets 24 GiB,
and the GPU check's code (tools/gpu_check.py) runs on the CPU."""
import json
import os

import pytest
import torch

import train
from support import rollouts
from tools import bench, bench_kit, gpu_check, memory_check, memory_plan, released

SMALL = ["--opd_prompts", "2", "--micro_batch", "2", "--num_steps", "3", "--train_timesteps", "1", "--iters", "1"]
ROOT = os.path.join(os.path.dirname(__file__), "..")
HAVE_BASE = os.path.isdir(os.path.join(ROOT, "checkpoints", "base", "transformer"))
needs_base = pytest.mark.skipif(not HAVE_BASE, reason="needs the committed checkpoints/base")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_flags_are_configs():
    """Config's flag names and defaults, bench's own in the namespace, and the per-config/device defaults."""
    cfg, args = bench.parse(["--config", "mid", "--device", "cpu", "--max_sequence_length", "64"])
    assert (cfg.opd_prompts, cfg.micro_batch, cfg.max_sequence_length) == (2, 2, 64)
    assert not cfg.gradient_checkpointing and args.iters == 3 and args.variant == ""
    cfg, _ = bench.parse(["--config", "mid", "--opd_prompts", "5", "--gradient_checkpointing", "true"])
    assert cfg.opd_prompts == 5 and cfg.micro_batch == 2 and cfg.gradient_checkpointing
    cfg, _ = bench.parse(["--device", "cuda"])   # parsing only: no GPU is touched
    assert cfg.gradient_checkpointing and cfg.opd_prompts == 16 and cfg.micro_batch == 16
    with pytest.raises(SystemExit):
        bench.parse(["--prompts", "2"])   # bench's old --prompts is Config's TASK=FILE flag now


@needs_base
def test_ours_is_train_opd_iteration(monkeypatch):
    """bench's "ours" times train.opd_iteration itself, then support.rollouts.optimizer_step, once each per
    iteration (the warm-up and the timed one)."""
    calls, real = [], train.opd_iteration
    monkeypatch.setattr(train, "opd_iteration", lambda *a, **k: calls.append("opd_iteration") or real(*a, **k))
    monkeypatch.setattr(rollouts, "optimizer_step", lambda params, opt, ema=None: calls.append("optimizer_step"))
    res = bench.run_variant(*bench.parse(SMALL + ["--device", "cpu", "--variant", "ours"]))
    assert calls == ["opd_iteration", "optimizer_step"] * 2 and res["opt_steps"] == 1


@needs_base
def test_floor_runs_ours_transformer_passes():
    """The floor's transformer passes: ours' grad-enabled ones exactly (shapes and number), and as many no-grad
    sample rows (ours splits a micro-batch by teacher; the floor does not route)."""
    cfg, args = bench.parse(SMALL + ["--device", "cpu", "--opd_prompts", "3", "--train_timesteps", "2"])
    model = bench_kit.load_backbone(cfg, "tiny")
    bench_kit.build_ours(model, cfg, "tiny")
    seen = []
    model.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((torch.is_grad_enabled(), tuple(kw["hidden_states"].shape))), with_kwargs=True)
    gen, passes, params = torch.Generator().manual_seed(0), [], rollouts.trainable(model, "student")
    for which in ("ours", "floor"):
        seen.clear()
        if which == "ours":
            bench.ours_iteration(model, cfg, gen, bench.flow_opd_loss, torch.optim.SGD(params, lr=0.0), params, 0)
        else:
            inputs = bench.floor_inputs(model, bench.draw(cfg, gen, {"ocr": 1.0}), cfg)
            assert bench.floor_passes(model, inputs, cfg) == len(seen)
        passes.append(sorted(shape for grad, shape in seen if grad))
        passes.append(sum(shape[0] for grad, shape in seen if not grad))
    assert passes[0] == passes[2] and len(passes[0]) == 2 * 2   # 2 trained steps x 2 micro-batches
    assert passes[1] == passes[3]


@needs_base
@pytest.mark.slow
@pytest.mark.parametrize("fuse", [False, True])
def test_reference_copies_equal_adapters(fuse):
    cfg, args = bench.parse(SMALL + ["--device", "cpu"])
    torch.manual_seed(0)
    model = bench_kit.load_backbone(cfg, "tiny")
    _, refs = released.build_released(model, cfg, "tiny", fuse=fuse)
    ours = bench_kit.load_backbone(cfg, "tiny")
    bench_kit.build_ours(ours, cfg, "tiny")
    assert set(refs) == {"geneval", "ocr", "pickscore", "anchor"}
    assert list(model.transformer.peft_config) == ["student"]
    for key, name in [("ocr", "ocr"), ("anchor", bench_kit.ANCHOR)]:   # each copy holds its own LoRA only, or none
        assert list(getattr(refs[key].transformer, "peft_config", {})) == ([] if fuse else [name])
    x, t = torch.randn(2, *ours.latent_shape), torch.tensor([0.7, 0.3])
    conds = rollouts.guided_conds(ours, ["a photo of two circles", 'a sign that says "K7"'], cfg.guidance_scale)
    for name, key in [("ocr", "ocr"), (bench_kit.ANCHOR, "anchor")]:
        ours.adapter(name)
        v = ours.velocity(x, t, *conds)
        torch.testing.assert_close(refs[key].velocity(x, t, *conds), v, rtol=1e-4, atol=1e-4)
        ours.adapter(None)
        assert (ours.velocity(x, t, *conds) - v).abs().max() > 1e-2   # random LoRAs are not the identity


@needs_base
@pytest.mark.slow
def test_one_iteration_each_and_the_report():
    cfg, args = bench.parse(SMALL + ["--device", "cpu"])
    results = []
    for variant in ("floor", "ours", "released"):
        args.variant = variant
        results.append(bench.run_variant(cfg, args))
    assert results[0]["peak_mib"] > 0 and "median_s" not in results[0]   # the floor's memory: loaded only
    for res in results[1:]:
        assert res["median_s"] > 0 and res["floor_s"] > 0 and res["x_floor"] > 0 and res["peak_mib"] > 0
        assert res["opt_steps"] == 1   # 1 trained timestep: one step either way
        assert res["passes"] == 3 + 3   # 3 sampling forwards; teacher, anchor and student at 1 trained step
    report = bench.report(cfg, args, SMALL, results, load=(0.0, 0.0))
    assert "ratio to the floor" in report and "released / ours" in report and "python -m tools.bench" in report


@pytest.fixture
def small_sd35m(monkeypatch):
    """bench's SD3.5-M configuration shrunk to a two-block SD3 that a CPU runs in seconds."""
    small = dict(memory_plan.SD35M, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8, sample_size=8,
                 dual_attention_layers=(0,))
    monkeypatch.setattr(memory_plan, "SD35M", small)
    monkeypatch.setattr(bench_kit, "SD35M_LATENT", 8)


@pytest.mark.slow
def test_sd35m_path_on_a_small_sd3(small_sd35m):
    for variant in ("ours", "released"):
        res = bench.run_variant(*bench.parse(["--config", "sd35m", "--device", "cpu", "--max_sequence_length", "4",
                                              "--num_steps", "3", "--iters", "1", "--variant", variant]))
        assert res["median_s"] > 0 and res["weights_mib"] > 0


def test_mid_path_on_a_small_sd3(monkeypatch):
    monkeypatch.setattr(bench_kit, "MID", dict(bench_kit.MID, num_layers=1, attention_head_dim=8,
                                               num_attention_heads=2, joint_attention_dim=16,
                                               caption_projection_dim=16, pooled_projection_dim=16))
    res = bench.run_variant(*bench.parse(["--config", "mid", "--device", "cpu", "--num_steps", "5", "--iters", "1",
                                          "--variant", "released"]))
    assert res["median_s"] > 0 and res["opt_steps"] == 4   # one optimizer step per trained timestep


# ---------------------------------------------------------------------------------------------- memory plan
TINY_SD35 = dict(memory_plan.SD35M, num_layers=3, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24, pos_embed_max_size=16,
                 sample_size=16, dual_attention_layers=(0,))


def _real_sd3(config, rank=0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    t = SD3Transformer2DModel(**config).requires_grad_(False)
    if rank:
        from support import models
        m = models.T2IModel(t, None, None)
        m.add_lora("student", rank, 2 * rank)
        for p in m.lora_parameters("student"):
            p.requires_grad_(True)
    return t


def test_meta_build_and_lora_counts_are_exact():
    meta = memory_plan.sd3_transformer(TINY_SD35, torch.bfloat16)
    real = _real_sd3(TINY_SD35).to(torch.bfloat16)
    assert all(p.is_meta for p in meta.parameters())
    assert memory_plan.module_bytes(meta) == sum(x.numel() * x.element_size()
                                                 for x in list(real.parameters()) + list(real.buffers()))
    # LoRA on Flow-GRPO's targets: every targeted linear is D x D here, r (D + D) parameters each: per block
    # to_q/k/v/out + add_q/k/v (+ to_add_out unless last) (+ attn2's q/k/v/out if dual)
    D, r, L = 64, 8, TINY_SD35["num_layers"]
    linears = sum(7 + (i != L - 1) + 4 * (i in TINY_SD35["dual_attention_layers"]) for i in range(L))
    assert memory_plan.lora_numel(meta, r, 2 * r) == linears * r * 2 * D
    real_lora = _real_sd3(TINY_SD35, rank=r)
    assert sum(p.numel() for p in real_lora.parameters() if p.requires_grad) == linears * r * 2 * D


@pytest.mark.parametrize("layers,dual,batch,text", [(3, (0,), 2, 10), (2, (), 2, 7), (4, (0, 1, 2), 3, 5)])
def test_activation_formula_equals_the_autograd_graph(layers, dual, batch, text):
    config = dict(TINY_SD35, num_layers=layers, dual_attention_layers=dual)
    t, r = _real_sd3(config, rank=8), 8
    x, ctx, pooled = torch.randn(batch, 16, 16, 16), torch.randn(batch, text, 32), torch.randn(batch, 24)
    _, graph = memory_check.saved_bytes(lambda: t(hidden_states=x, encoder_hidden_states=ctx,
                                                  pooled_projections=pooled, timestep=torch.full((batch,), 500.0),
                                                  return_dict=False)[0], t)
    n_img = (16 // 2) ** 2
    assert batch * memory_plan.model_saved_bytes(config, n_img, text, r, amp=False, checkpointing=False)[0] == graph


def test_sd35m_plan_meets_the_target():
    C = memory_plan.components(memory_plan.SD35M, others=False)
    assert C["n_img"] == 1024 and C["n_txt"] == 333 and C["dim"] == 1536
    assert C["backbone_numel"] == 2_243_171_520   # SD3.5-M's transformer (+ a 384^2 x 1536 position table)
    assert C["lora_numel"] == (24 * 8 - 1 + 13 * 4) * 32 * 2 * 1536   # 243 projections of 1536 x 1536
    ours = memory_plan.totals(C, "ours", gc=True, text_on_gpu=False, micro_batch=2)
    released_ = memory_plan.totals(C, "released", gc=True, text_on_gpu=False, micro_batch=2)
    assert ours <= 24 * memory_plan.GiB and released_ > 4 * ours
    assert memory_plan.largest_micro_batch(C, 24 * memory_plan.GiB, "ours", True, False) >= 2


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(small_sd35m, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "GPU_RUNS", gpu_check.GPU_RUNS[:3])   # off CUDA the compiled run is the eager one
    argv = ["--gpu_check", "--device", "cpu", "--config", "sd35m", "--num_steps", "3", "--train_timesteps", "1",
            "--opd_prompts", "2", "--max_sequence_length", "4", "--out_json", str(tmp_path / "gpu_check.json")]
    res = gpu_check.run(*bench.parse(argv), argv,
                        runner=lambda variant, a: bench.run_variant(*bench.parse(a + ["--variant", variant])))
    saved = json.load(open(tmp_path / "gpu_check.json"))
    assert set(saved["runs"]) == {name for name, _, _ in gpu_check.GPU_RUNS}
    for name, r in saved["runs"].items():
        assert r["median_s"] > 0 and r["peak_mib"] > 0 and r["predicted_mib"] > 0, name
    assert saved["runs"]["ours"]["checkpointing"] and not saved["runs"]["ours_no_checkpointing"]["checkpointing"]
    assert saved["runs"]["released"]["predicted_mib"] > saved["runs"]["ours"]["predicted_mib"]
    assert res["core"]["rel_diff"]["loss"] == 0   # off CUDA the "compiled" core is the eager one
    assert "GPU check" in gpu_check.format_gpu_check(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_says_so():
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--gpu_check", "--device", "cuda", "--config", "sd35m"])
