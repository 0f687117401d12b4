"""Smoke test of bench.py (seconds): the released structure's reference copies (unfused and fused) equal our
adapters, both loop structures run one iteration, and the SD3.5-M and mid paths run on shrunken SD3 configs."""
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
    conds = rollouts.guided_conds(ours, ["a photo of two circles", 'a sign that says "K7"'], cfg.cfg_scale)
    for name, key in [("ocr", "ocr"), (bench.ANCHOR, "anchor")]:
        ours.adapter(name)
        v = ours.velocity(x, t, *conds)
        torch.testing.assert_close(refs[key].velocity(x, t, *conds), v, rtol=1e-4, atol=1e-4)
        ours.adapter(None)
        assert (ours.velocity(x, t, *conds) - v).abs().max() > 1e-2   # random LoRAs are not the identity


@pytest.mark.skipif(not HAVE_BASE, reason="needs the committed checkpoints/base")
def test_ours_restates_train_opd_iteration():
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
        opt = torch.optim.SGD(params, lr=0.0)   # a step that moves nothing, so the gradients can be read
        if which == "bench":
            zero_grad, opt.zero_grad = opt.zero_grad, lambda **kw: None
            bench.iter_ours(model, cfg, gen, bench.flow_opd_loss, opt, params, 0)
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


def test_sd35m_path_on_a_small_sd3(monkeypatch):
    small = dict(bench.SD35M, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8, sample_size=8,
                 dual_attention_layers=(0,))
    monkeypatch.setattr(bench, "SD35M", small)
    monkeypatch.setattr(bench, "SD35M_TOKENS", 7)
    monkeypatch.setattr(bench, "SD35M_LATENT", 8)
    for variant in ("ours", "released"):
        res = bench.run_variant(bench.parse(["--config", "sd35m", "--iters", "1", "--variant", variant]))
        assert res["median_s"] > 0 and res["weights_mib"] > 0


def test_mid_path_on_a_small_sd3(monkeypatch):
    monkeypatch.setattr(bench, "MID", dict(bench.MID, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                           joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16))
    res = bench.run_variant(bench.parse(["--config", "mid", "--iters", "1", "--variant", "released"]))
    assert res["median_s"] > 0 and res["opt_steps"] == 4   # one optimizer step per trained timestep
