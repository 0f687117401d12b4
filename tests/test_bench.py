"""Smoke test of bench.py (seconds): the released structure's reference copies (unfused and fused) equal our
adapters, both loop structures run one iteration, and the SD3.5-M and mid paths run on shrunken SD3 configs.
Memory plan (memory.py): meta builds and LoRA counts equal real ones, the activation formula equals the bytes the
autograd graph saves, SD3.5-M's plan meets 24 GiB, and the GPU check's code runs on the CPU."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench  # noqa: E402
import rollouts  # noqa: E402
import train  # noqa: E402

SMALL = ["--prompts", "2", "--micro_batch", "2", "--train_timesteps", "1", "--iters", "1"]
HAVE_BASE = os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "checkpoints", "base", "transformer"))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), ".."))


@pytest.mark.skipif(not HAVE_BASE, reason="needs the committed checkpoints/base")
@pytest.mark.parametrize("fuse", [False, True])
def test_reference_copies_equal_adapters(fuse):
    args = bench.parse(SMALL + (["--released_fuse"] if fuse else []))
    cfg = bench.make_cfg(args)
    torch.manual_seed(0)
    released = bench.load_backbone(args)
    _, refs = bench.build_released(released, cfg, args)
    ours = bench.load_backbone(args)
    bench.build_ours(ours, cfg, args)
    assert set(refs) == {"geneval", "ocr", "pickscore", "anchor"}
    assert list(released.transformer.peft_config) == ["student"]
    for key, name in [("ocr", "ocr"), ("anchor", bench.ANCHOR)]:   # each copy holds its own LoRA only, or none
        assert list(getattr(refs[key].transformer, "peft_config", {})) == ([] if fuse else [name])
    x, t = torch.randn(2, *ours.latent_shape), torch.tensor([0.7, 0.3])
    conds = rollouts.guided_conds(ours, ["a photo of two circles", 'a sign that says "K7"'], cfg.guidance_scale)
    for name, key in [("ocr", "ocr"), (bench.ANCHOR, "anchor")]:
        ours.adapter(name)
        v = ours.velocity(x, t, *conds)
        torch.testing.assert_close(refs[key].velocity(x, t, *conds), v, rtol=1e-4, atol=1e-4)
        ours.adapter(None)
        assert (ours.velocity(x, t, *conds) - v).abs().max() > 1e-2   # random LoRAs are not the identity


@pytest.mark.skipif(not HAVE_BASE, reason="needs the committed checkpoints/base")
def test_ours_restates_train_opd_iteration(monkeypatch):
    """bench's "ours" loop and train.opd_iteration, from the same model, adapters, records and generator state,
    accumulate the same student gradients (bench times the main job's computation, not a variant of it)."""
    args = bench.parse(SMALL)
    cfg = bench.make_cfg(args)
    grads = []
    for which in ("bench", "train"):
        torch.manual_seed(0)
        model = bench.load_backbone(args)
        bench.build_ours(model, cfg, args)
        params, gen = model.lora_parameters("student"), torch.Generator().manual_seed(1)
        monkeypatch.setattr(bench, "opt_step", lambda opt, params: None)   # keep the gradients to read them
        if which == "bench":
            bench.iter_ours(model, cfg, gen, bench.flow_opd_loss, None, params, 0)
        else:
            weights = {t: bench.DEFAULT_TASK_WEIGHTS[t] for t in bench.ROUTES}
            records = sorted(rollouts.draw_records(bench.POOL, weights, cfg.opd_prompts, gen), key=lambda r: r["task"])
            routed = bench.route([r["task"] for r in records], {t: t for t in bench.ROUTES})
            train.opd_iteration(model, records, routed, bench.ANCHOR, cfg, bench.flow_opd_loss, gen,
                                team=bench.ROUTES)
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6 * grads[1].abs().max().item())


@pytest.mark.skipif(not HAVE_BASE, reason="needs the committed checkpoints/base")
@pytest.mark.parametrize("variant", ["ours", "released"])
def test_one_iteration_each(variant):
    res = bench.run_variant(bench.parse(SMALL + ["--variant", variant]))
    assert res["median_s"] > 0 and res["peak_mib"] > 0
    assert res["opt_steps"] == 1   # 1 trained timestep: one step either way
    other = dict(res, variant="released" if variant == "ours" else "ours")
    report = bench.report(bench.parse(SMALL), SMALL, [res, other], load=0.0)
    assert "released / ours" in report


@pytest.fixture
def small_sd35m(monkeypatch):
    """bench's SD3.5-M configuration shrunk to a two-block SD3 that a CPU runs in seconds."""
    small = dict(bench.SD35M, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8, sample_size=8,
                 dual_attention_layers=(0,))
    monkeypatch.setattr(bench, "SD35M", small)
    monkeypatch.setattr(bench, "SD35M_TOKENS", 7)
    monkeypatch.setattr(bench, "SD35M_LATENT", 8)


def test_sd35m_path_on_a_small_sd3(small_sd35m):
    for variant in ("ours", "released"):
        res = bench.run_variant(bench.parse(["--config", "sd35m", "--iters", "1", "--variant", variant]))
        assert res["median_s"] > 0 and res["weights_mib"] > 0


def test_mid_path_on_a_small_sd3(monkeypatch):
    monkeypatch.setattr(bench, "MID", dict(bench.MID, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                           joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16))
    res = bench.run_variant(bench.parse(["--config", "mid", "--iters", "1", "--variant", "released"]))
    assert res["median_s"] > 0 and res["opt_steps"] == 4   # one optimizer step per trained timestep


# ---------------------------------------------------------------------------------------------- memory plan
import memory  # noqa: E402

TINY_SD35 = dict(bench.SD35M, num_layers=3, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                 caption_projection_dim=64, pooled_projection_dim=24, pos_embed_max_size=16, sample_size=16,
                 dual_attention_layers=(0,))


def _real_sd3(config, rank=0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    t = SD3Transformer2DModel(**config).requires_grad_(False)
    if rank:
        import models
        m = models.T2IModel(t, None, None)
        m.add_lora("student", rank, 2 * rank)
        for p in m.lora_parameters("student"):
            p.requires_grad_(True)
    return t


def test_meta_build_and_lora_counts_are_exact():
    meta = memory.sd3_transformer(TINY_SD35, torch.bfloat16)
    real = _real_sd3(TINY_SD35).to(torch.bfloat16)
    assert all(p.is_meta for p in meta.parameters())
    assert memory.module_bytes(meta) == sum(x.numel() * x.element_size()
                                            for x in list(real.parameters()) + list(real.buffers()))
    # LoRA on Flow-GRPO's targets: every targeted linear is D x D here, r (D + D) parameters each: per block
    # to_q/k/v/out + add_q/k/v (+ to_add_out unless last) (+ attn2's q/k/v/out if dual)
    D, r, L = 64, 8, TINY_SD35["num_layers"]
    linears = sum(7 + (i != L - 1) + 4 * (i in TINY_SD35["dual_attention_layers"]) for i in range(L))
    assert memory.lora_numel(meta, r, 2 * r) == linears * r * 2 * D
    real_lora = _real_sd3(TINY_SD35, rank=r)
    assert sum(p.numel() for p in real_lora.parameters() if p.requires_grad) == linears * r * 2 * D


@pytest.mark.parametrize("layers,dual,batch,text", [(3, (0,), 2, 10), (2, (), 2, 7), (4, (0, 1, 2), 3, 5)])
def test_activation_formula_equals_the_autograd_graph(layers, dual, batch, text):
    config = dict(TINY_SD35, num_layers=layers, dual_attention_layers=dual)
    t, r = _real_sd3(config, rank=8), 8
    x, ctx, pooled = torch.randn(batch, 16, 16, 16), torch.randn(batch, text, 32), torch.randn(batch, 24)
    _, graph = memory.saved_bytes(lambda: t(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                            timestep=torch.full((batch,), 500.0), return_dict=False)[0], t)
    n_img = (16 // 2) ** 2
    assert batch * memory.model_saved_bytes(config, n_img, text, r, amp=False, checkpointing=False)[0] == graph


def test_sd35m_plan_meets_the_target():
    C = memory.components(bench.SD35M, others=False)
    assert C["n_img"] == 1024 and C["n_txt"] == 333 and C["dim"] == 1536
    assert C["backbone_numel"] == 2_243_171_520   # SD3.5-M's transformer (+ a 384^2 x 1536 position table)
    assert C["lora_numel"] == (24 * 8 - 1 + 13 * 4) * 32 * 2 * 1536   # 243 projections of 1536 x 1536
    ours = memory.totals(C, "ours", gc=True, text_on_gpu=False, micro_batch=2)
    released = memory.totals(C, "released", gc=True, text_on_gpu=False, micro_batch=2)
    assert ours <= 24 * memory.GiB and released > 4 * ours
    assert memory.largest_micro_batch(C, 24 * memory.GiB, "ours", True, False) >= 2


def test_gpu_check_dry_run_on_cpu(small_sd35m, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "GPU_RUNS", bench.GPU_RUNS[:3])   # off CUDA the compiled run is the eager one
    argv = ["--gpu_check", "--device", "cpu", "--config", "sd35m", "--train_timesteps", "1", "--prompts", "2",
            "--out_json", str(tmp_path / "gpu_check.json")]
    res = bench.gpu_check(bench.parse(argv), argv,
                          runner=lambda variant, a: bench.run_variant(bench.parse(a + ["--variant", variant])))
    saved = json.load(open(tmp_path / "gpu_check.json"))
    assert set(saved["runs"]) == {name for name, _, _ in bench.GPU_RUNS}
    for name, r in saved["runs"].items():
        assert r["median_s"] > 0 and r["peak_mib"] > 0 and r["predicted_mib"] > 0, name
    assert saved["runs"]["ours"]["checkpointing"] and not saved["runs"]["ours_no_checkpointing"]["checkpointing"]
    assert saved["runs"]["released"]["predicted_mib"] > saved["runs"]["ours"]["predicted_mib"]
    assert res["core"]["rel_diff"]["loss"] == 0   # off CUDA the "compiled" core is the eager one
    assert "GPU check" in bench.format_gpu_check(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_without_cuda_says_so():
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--gpu_check", "--device", "cuda", "--config", "sd35m"])
