"""
Cold start of the student from the teachers (Flow-OPD paper §2.1 step 2, §3): model merging, and SFT on
teacher trajectories (`sft_cold_start`; the released code has no such script, the paper describes it).

A PEFT LoRA stores per adapted module `...<module>.lora_A.weight` (r, in) and `...<module>.lora_B.weight`
(out, r), and adds ΔW = (α/r)·B·A to the frozen weight. Merging K teacher LoRAs (weights w_k, Σw_k = 1):

  merge_average  (released `scripts/merge.py --merge_mode average`): Ā = Σ w_k A_k, B̄ = Σ w_k B_k key by
                 key. NOT the average of the ΔW: B̄·Ā = Σ_jk w_j w_k B_j A_k ≠ Σ_k w_k B_k A_k (cross terms).
  merge_delta    the exact mean ΔW̄ = (α/r)·Σ_k w_k B_k A_k, re-expressed as a LoRA:
                 - default, concatenation (exact): A' = [A_1; …; A_K] (K·r, in), B' = [w_1B_1, …, w_KB_K]
                   (out, K·r), so B'A' = Σ w_k B_k A_k. Rank r' = K·r; α' = α·K keeps α'/r' = α/r.
                 - out_rank=r'': truncated SVD of Σ w_k B_k A_k back to rank r'' (√S split into both
                   factors), α'' = α·r''/r; exact iff that matrix has rank ≤ r''. The relative Frobenius
                   truncation error is reported (max over modules).

Differences from the paper / released code:
  1) The paper gives no merge formula; merge_average is the released code's, merge_delta our exact
     alternative. Both normalise the weights to sum 1 (the released "weighted" mode does too).
  2) Scaling α/r is the standard LoRA one (not rsLoRA's α/√r); all teachers must share α, r and shapes.
  3) Non-LoRA tensors in the state dicts (e.g. modules_to_save) are averaged element-wise by both merges.
  4) After merge_delta with concatenation, write adapter_config.json with r = K·r and lora_alpha = α·K.

Self-check: python cold_start.py
"""
import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from flow_matching import euler_sample, flow_matching_loss, interpolate, sample_t

StateDict = Dict[str, torch.Tensor]


class MergeResult(NamedTuple):
    state_dict: StateDict
    rank: int                # LoRA rank of the result
    alpha: Optional[float]   # lora_alpha to save with it (None: unchanged, merge_average takes no α)
    max_rel_error: float     # max over modules of ‖ΔW_merged − mean ΔW‖_F / ‖mean ΔW‖_F


def _check(state_dicts: Sequence[StateDict], weights) -> torch.Tensor:
    if len(state_dicts) == 0:
        raise ValueError("need at least one LoRA state dict to merge")
    keys = set(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != keys or any(sd[k].shape != state_dicts[0][k].shape for k in keys):
            raise ValueError(f"state dict {i} has different keys or shapes than state dict 0")
    w = torch.ones(len(state_dicts)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.numel() != len(state_dicts) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(state_dicts)} non-negative numbers with a positive sum")
    return (w / w.sum()).double()                                                   # (K,)


def _lora_modules(sd: StateDict) -> Dict[str, tuple]:
    """module prefix -> (lora_A key, lora_B key)."""
    pairs = {}
    for k in sd:
        if ".lora_A." in k:
            kb = k.replace(".lora_A.", ".lora_B.")
            if kb not in sd:
                raise ValueError(f"{k} has no matching {kb}")
            pairs[k.split(".lora_A.")[0]] = (k, kb)
    return pairs


def _weighted_sum(tensors: List[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return sum(w_k * t.double() for w_k, t in zip(w, tensors)).to(tensors[0].dtype)


def _rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = exact.norm()
    return 0.0 if norm == 0 else ((approx - exact).norm() / norm).item()


def merge_average(state_dicts: Sequence[StateDict], weights=None) -> MergeResult:
    """Released merge: element-wise weighted average of every tensor, lora_A and lora_B separately."""
    w = _check(state_dicts, weights)
    out = {k: _weighted_sum([sd[k] for sd in state_dicts], w) for k in state_dicts[0]}
    err, rank = 0.0, 0
    for ka, kb in _lora_modules(out).values():                    # how far B̄Ā is from mean(BA)
        exact = sum(w_k * sd[kb].double() @ sd[ka].double() for w_k, sd in zip(w, state_dicts))
        err = max(err, _rel_error(out[kb].double() @ out[ka].double(), exact))
        rank = out[ka].shape[0]
    return MergeResult(out, rank, None, err)


def _svd_truncate(B: torch.Tensor, A: torch.Tensor, r: int):
    """Best rank-r factors of M = B·A (out, in) without forming M: QR both factors, SVD the small core.
    Returns (B_r (out, r), A_r (r, in), relative Frobenius error of the truncation)."""
    Q_b, R_b = torch.linalg.qr(B)                                  # (out, m), (m, K·r)
    Q_a, R_a = torch.linalg.qr(A.T)                                # (in, n), (n, K·r)
    U, S, Vh = torch.linalg.svd(R_b @ R_a.T)                       # core (m, n) = U·diag(S)·Vh
    k = min(r, S.numel())
    root = S[:k].sqrt()                                            # √S split into both factors
    B_r, A_r = B.new_zeros(B.shape[0], r), A.new_zeros(r, A.shape[1])
    B_r[:, :k] = Q_b @ U[:, :k] * root                             # (out, r)
    A_r[:k] = root[:, None] * (Vh[:k] @ Q_a.T)                     # (r, in)
    total = S.pow(2).sum()
    err = 0.0 if total == 0 else (S[k:].pow(2).sum() / total).sqrt().item()
    return B_r, A_r, err


def merge_delta(state_dicts: Sequence[StateDict], alpha: float, rank: int, weights=None,
                out_rank: Optional[int] = None) -> MergeResult:
    """Exact weighted mean of ΔW = (α/r)·B·A as a LoRA: concatenation (default, rank K·r, exact) or
    truncated SVD to out_rank (error reported). Keys are preserved."""
    w = _check(state_dicts, weights)
    K, modules = len(state_dicts), _lora_modules(state_dicts[0])
    lora_keys = {k for pair in modules.values() for k in pair}
    out = {k: _weighted_sum([sd[k] for sd in state_dicts], w) for k in state_dicts[0] if k not in lora_keys}
    err = 0.0
    for ka, kb in modules.values():
        if state_dicts[0][ka].shape[0] != rank:
            raise ValueError(f"{ka} has rank {state_dicts[0][ka].shape[0]}, expected rank={rank}")
        dtype = state_dicts[0][ka].dtype
        A_cat = torch.cat([sd[ka].double() for sd in state_dicts], dim=0)                   # (K·r, in)
        B_cat = torch.cat([w_k * sd[kb].double() for w_k, sd in zip(w, state_dicts)], 1)   # (out, K·r)
        if out_rank is not None:
            B_cat, A_cat, e = _svd_truncate(B_cat, A_cat, out_rank)
            err = max(err, e)
        out[ka], out[kb] = A_cat.to(dtype), B_cat.to(dtype)
    new_rank = K * rank if out_rank is None else out_rank
    return MergeResult(out, new_rank, alpha * new_rank / rank, err)   # α'/r' = α/r: same scaling


# ------------------------------------------------------------------------------------------------
# Applying a merge to the model, and the SFT cold start on teacher trajectories (paper §3).
# ------------------------------------------------------------------------------------------------
def merge_into(model, name, teachers, mode="delta", out_rank=None):
    """Create adapter `name` on model.transformer from a merge of its adapters `teachers` (all with the
    same r and alpha): mode "delta" = exact mean ΔW (concatenated factors, or SVD to out_rank), mode
    "average" = the released code's A/B average. Returns the MergeResult (its max_rel_error vs mean ΔW)."""
    from peft import LoraConfig, set_peft_model_state_dict
    cfg0 = model.transformer.peft_config[teachers[0]]
    sds = [model.adapter_state(t) for t in teachers]
    if mode == "average":
        res = merge_average(sds)
        res = res._replace(alpha=cfg0.lora_alpha)
    elif mode == "delta":
        res = merge_delta(sds, cfg0.lora_alpha, cfg0.r, out_rank=out_rank)
    else:
        raise ValueError(f"merge mode must be 'delta' or 'average', got {mode!r}")
    model.add_adapter(LoraConfig(r=res.rank, lora_alpha=res.alpha, init_lora_weights="gaussian",
                                 target_modules=list(cfg0.target_modules)), name)
    set_peft_model_state_dict(model.transformer, res.state_dict, adapter_name=name)
    return res


def sft_cold_start(model, name, teachers, pool, steps=200, samples_per_teacher=256, batch_size=32, lr=3e-4,
                   sample_steps=20, guidance_scale=4.5, rank=32, alpha=64, seed=0, latent_shape=None, guidance=None,
                   autocast=contextlib.nullcontext, scaler=None):
    """SFT variant: each teacher (task -> adapter name) draws ODE samples on its own task's train prompts
    (pool: {task: train records}); a fresh student LoRA `name` is then fitted to all of them by flow matching
    (L_FM, §2.2), so it starts from the experts' distributions. Returns the final flow-matching loss.
    The distillation's settings carry over: latent_shape (default model.latent_shape; the training resolution),
    guidance ({teacher adapter: its own CFG scale}; the others at guidance_scale), autocast (a context-manager
    factory for the forwards) and scaler (a torch.amp.GradScaler for fp16, whose small LoRA gradients would
    otherwise underflow to zero)."""
    gen = torch.Generator().manual_seed(seed)
    dev = model.transformer.device
    prompts, x0 = [], []
    with torch.no_grad():
        for task, teacher in teachers.items():
            recs = pool[task]
            pick = torch.randint(len(recs), (samples_per_teacher,), generator=gen).tolist()
            ps = [recs[i]["prompt"] for i in pick]
            model.adapter(teacher)
            scale = (guidance or {}).get(teacher, guidance_scale)
            for i in range(0, len(ps), 64):
                noise = torch.randn(len(ps[i:i + 64]), *(latent_shape or model.latent_shape), generator=gen).to(dev)
                sigmas = model.time_grid(sample_steps).to(dev)
                with autocast():
                    x0.append(euler_sample(model.velocity_fn(ps[i:i + 64], scale), noise, sigmas).float())
            prompts += ps
    x0 = torch.cat(x0)                                                        # (N, C, h, w)
    model.add_lora(name, rank, alpha)
    model.adapter(name)
    params = model.lora_parameters(name)
    for p in params:   # fp32 weights for AdamW and the scaler under a bf16/fp16 backbone (rollouts.trainable's cast;
        p.data = p.data.float()   # not it: maths files import no support module, and it broadcasts)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(len(prompts), (batch_size,), generator=gen)
        eps = torch.randn(x0[idx].shape, generator=gen).to(dev)
        t = sample_t(batch_size, gen).to(dev)                                  # (B,)
        with autocast():
            v = model.velocity(interpolate(x0[idx], eps, t), t, model.encode_prompts([prompts[i] for i in idx]))
        loss = flow_matching_loss(v.float(), x0[idx], eps)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:   # the loss scaled before backward, the gradients unscaled by step, which skips an overflowed one
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return loss.item()


def delta_w(sd: StateDict, alpha: float, rank: int) -> Dict[str, torch.Tensor]:
    """module -> ΔW = (α/r)·B·A (out, in), fp64; for checks and for comparing merges."""
    return {m: alpha / rank * sd[kb].double() @ sd[ka].double() for m, (ka, kb) in _lora_modules(sd).items()}


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    r, alpha, K = 2, 4.0, 3

    def lora():
        return {"blk.attn.to_q.lora_A.weight": torch.randn(r, 10, generator=g),
                "blk.attn.to_q.lora_B.weight": torch.randn(12, r, generator=g)}

    def max_diff(res, ref):   # max |ΔW(res) − ref| over modules, and the fp32 rounding it may show (8 ulps of |ref|)
        got = delta_w(res.state_dict, res.alpha, res.rank)
        return (max((got[m] - ref[m]).abs().max().item() for m in got),
                8 * torch.finfo(torch.float32).eps * max(ref[m].abs().max().item() for m in ref))

    teachers = [lora() for _ in range(K)]
    mean_dw = {m: sum(delta_w(sd, alpha, r)[m] for sd in teachers) / K for m in delta_w(teachers[0], alpha, r)}
    avg = merge_average(teachers)
    print(f"merge_average: rel. error of B̄Ā vs mean(BA) = {avg.max_rel_error:.3f} (not ΔW-exact)")
    assert avg.max_rel_error > 0.1, "merge_average of independent LoRAs should be far from mean ΔW"
    cat = merge_delta(teachers, alpha, r)
    err, tol = max_diff(cat, mean_dw)
    print(f"merge_delta concat: rank {cat.rank}, alpha {cat.alpha}, max |ΔW − mean ΔW| = {err:.2e} (< {tol:.1e})")
    assert cat.rank == K * r and cat.alpha == alpha * K, "concatenation must give rank K·r and alpha α·K"
    assert err < tol, "merge_delta by concatenation is not the exact mean ΔW"
    svd = merge_delta(teachers, alpha, r, out_rank=r)
    got = delta_w(svd.state_dict, svd.alpha, svd.rank)
    actual = max(((got[m] - mean_dw[m]).norm() / mean_dw[m].norm()).item() for m in got)
    print(f"merge_delta SVD to rank {svd.rank}: reported truncation error {svd.max_rel_error:.3f} "
          f"(measured {actual:.3f})")
    assert abs(svd.max_rel_error - actual) < 1e-5 * actual, "reported SVD truncation error is not the real one"
    same = merge_delta([teachers[0]] * K, alpha, r, out_rank=r)
    err, tol = max_diff(same, delta_w(teachers[0], alpha, r))
    print(f"identical teachers, SVD rank {r}: error {same.max_rel_error:.1e}, max |ΔW diff| = {err:.2e} (< {tol:.1e})")
    assert same.max_rel_error < 1e-12 and err < tol, "SVD of K identical rank-r teachers is not exact"
