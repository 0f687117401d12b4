"""
Tests for cold_start.py (model-merging cold start, Flow-OPD §3).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_cold_start.py
"""

import pytest
import torch

from cold_start import delta_w, merge_average, merge_delta

R, ALPHA = 2, 4.0
MODULES = {"t.blocks.0.attn.to_q": (12, 10), "t.blocks.0.attn.to_out.0": (10, 12)}   # (out, in)


def _lora(g):
    sd = {}
    for m, (out, inp) in MODULES.items():
        sd[f"{m}.lora_A.weight"] = torch.randn(R, inp, generator=g)
        sd[f"{m}.lora_B.weight"] = torch.randn(out, R, generator=g)
    sd["t.norm.weight"] = torch.randn(10, generator=g)                  # a non-LoRA tensor
    return sd


def _teachers(K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_lora(g) for _ in range(K)]


def _mean_dw(teachers, weights=None):
    w = torch.ones(len(teachers)) if weights is None else torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).double()
    dws = [delta_w(sd, ALPHA, R) for sd in teachers]
    return {m: sum(w_k * dw[m] for w_k, dw in zip(w, dws)) for m in dws[0]}


def _max_rel(got, ref):
    return max(((got[m] - ref[m]).norm() / ref[m].norm()).item() for m in ref)


def test_merge_average_is_elementwise_and_not_delta_exact():
    teachers = _teachers()
    res = merge_average(teachers)
    for k in teachers[0]:
        assert torch.allclose(res.state_dict[k], sum(sd[k] for sd in teachers) / 3, atol=1e-6)
    err = _max_rel(delta_w(res.state_dict, ALPHA, R), _mean_dw(teachers))
    assert err > 0.1 and abs(err - res.max_rel_error) < 1e-5
    assert res.rank == R and set(res.state_dict) == set(teachers[0])


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_merge_delta_concatenation_is_exact(weights):
    teachers = _teachers(seed=1)
    res = merge_delta(teachers, ALPHA, R, weights=weights)
    assert res.rank == 3 * R and res.alpha == 3 * ALPHA and res.max_rel_error == 0.0
    assert set(res.state_dict) == set(teachers[0])
    assert _max_rel(delta_w(res.state_dict, res.alpha, res.rank), _mean_dw(teachers, weights)) < 1e-6


def test_svd_exact_for_identical_teachers():
    t = _teachers(K=1, seed=2)[0]
    res = merge_delta([t, t, t], ALPHA, R, out_rank=R)
    assert res.rank == R and res.alpha == ALPHA and res.max_rel_error < 1e-6
    assert res.state_dict["t.blocks.0.attn.to_q.lora_A.weight"].shape == (R, 10)
    assert _max_rel(delta_w(res.state_dict, res.alpha, res.rank), delta_w(t, ALPHA, R)) < 1e-5


def test_svd_reports_truncation_error():
    teachers = _teachers(seed=3)
    res = merge_delta(teachers, ALPHA, R, out_rank=R)
    err = _max_rel(delta_w(res.state_dict, res.alpha, res.rank), _mean_dw(teachers))
    assert res.max_rel_error > 0.1 and abs(err - res.max_rel_error) < 1e-4
    full = merge_delta(teachers, ALPHA, R, out_rank=3 * R)              # rank K·r holds it exactly
    assert full.max_rel_error < 1e-6


def test_mismatched_inputs_raise():
    a, b = _teachers(K=2, seed=4)
    del b["t.norm.weight"]
    with pytest.raises(ValueError):
        merge_average([a, b])
    with pytest.raises(ValueError):
        merge_delta(_teachers(K=2), ALPHA, rank=4)
