"""
Task-routed teacher labelling, Flow-OPD paper §2.5.

  v_target(x_t, t, c) = Σ_k α_k(c) · v_{φ_k}(x_t, t, c),   hard routing: α_k(c) = 1[c ∈ T_k]

Each prompt carries a task tag (its dataset: "geneval", "ocr", "pickscore", ...); the tag picks exactly
one teacher, so every sample is distilled from the expert of its own task. Soft routing (a convex
mixture of teacher velocities) is the v1 LaTeX's "mode blending", whose α the paper never specifies; it is
offered here (mix_velocities) but off by default.

Differences from the paper / released code:
  1) Tasks are drawn PER SAMPLE (sample_tasks), so one batch mixes teachers and the caller runs each
     teacher once on its own samples (groups_by_teacher). The released code routes per EPOCH: every epoch
     uses one dataset and its teacher, alternating OCR:GenEval = 1:3 via `epochs_per_cycle`.
  2) Default task weights geneval:ocr:pickscore = 3:1:1, the paper's GRPO-Mix ratio; the Flow-OPD ratio
     itself is not stated in the paper, and the released config has no PickScore/DeQA entry.
  3) Soft routing normalises the weights to sum 1 (Σα_k = 1 appears only in a commented-out draft).

`target_velocity` evaluates the sum on a batch with the teachers as adapters of one backbone (models.T2IModel).

Self-check: python router.py
"""
from typing import Dict, List, Optional, Sequence

import torch

DEFAULT_TASK_WEIGHTS = {"geneval": 3.0, "ocr": 1.0, "pickscore": 1.0}   # GRPO-Mix epoch ratio 3:1:1
# A routed task that is no dataset (the deqa teacher routed as a fourth expert, tools/questions.py
# teacher_count) draws its prompts from every dataset with the weight of one of the smaller tasks.
QUALITY_TASK_WEIGHT = 1.0


def route(tasks: Sequence[str], teachers: Dict[str, str]) -> List[str]:
    """Hard routing: the teacher name of each sample, from its task tag. A task with no teacher fails
    loudly (silently falling back to another teacher would distil the wrong expert)."""
    missing = sorted({task for task in tasks if task not in teachers})
    if missing:
        raise ValueError(
            f"no teacher for task(s) {missing}; teachers are given for {sorted(teachers)}. "
            f"Add one per task with --teacher TASK=PATH (e.g. --teacher {missing[0]}=path/to/lora)")
    return [teachers[task] for task in tasks]


def groups_by_teacher(teacher_names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """teacher -> LongTensor of the sample indices it labels, in first-appearance order, so the caller
    switches adapters once per teacher and scatters v_T back with v_T[idx] = teacher(x[idx])."""
    groups: Dict[str, List[int]] = {}
    for i, name in enumerate(teacher_names):
        groups.setdefault(name, []).append(i)
    return {name: torch.tensor(idx, dtype=torch.long) for name, idx in groups.items()}


def sample_tasks(weights: Dict[str, float], n: int, generator: Optional[torch.Generator] = None) -> List[str]:
    """n task tags drawn i.i.d. with probabilities ∝ weights (per sample, not per epoch)."""
    names = list(weights)
    p = torch.tensor([float(weights[k]) for k in names])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")
    idx = torch.multinomial(p / p.sum(), n, replacement=True, generator=generator)   # (n,)
    return [names[i] for i in idx.tolist()]


def one_hot_weights(teacher_names: Sequence[str], names: Sequence[str]) -> torch.Tensor:
    """(B, K) hard-routing weights α_k = 1[teacher of sample b is names[k]]: soft routing's special case."""
    col = {name: k for k, name in enumerate(names)}
    alpha = torch.zeros(len(teacher_names), len(names))
    alpha[torch.arange(len(teacher_names)), torch.tensor([col[n] for n in teacher_names])] = 1.0
    return alpha


def mix_velocities(velocities: Dict[str, torch.Tensor], weights) -> torch.Tensor:
    """Soft routing v_target = Σ_k α_k v_k. velocities: name -> (B, ...) in the order that defines k;
    weights: (B, K) tensor or dict name -> float / (B,) tensor. Rows are normalised to sum 1."""
    names = list(velocities)
    v = torch.stack([velocities[k] for k in names], dim=1)                   # (B, K, ...)
    if isinstance(weights, dict):
        B = v.shape[0]
        weights = torch.stack([torch.as_tensor(weights[k], dtype=v.dtype).expand(B) for k in names], 1)
    alpha = weights.to(v.dtype)                                               # (B, K)
    alpha = alpha / alpha.sum(dim=1, keepdim=True)
    alpha = alpha.reshape(*alpha.shape, *([1] * (v.dim() - 2)))               # (B, K, 1, ...)
    return (alpha * v).sum(dim=1)                                             # (B, ...)



def target_velocity(model, x_t, t, conds, routed: Sequence[str], team: Sequence[str], soft_routing: float = 0.0,
                    scales: Optional[Dict[str, float]] = None):
    """v_target (B, C, h, w) at the student's states x_t (B, C, h, w), t (B,); conds = (cond, uncond,
    guidance_scale) as model.velocity takes them. Hard routing (soft_routing = 0): each sample's own teacher
    `routed[b]`, each teacher run once on its own samples. Soft routing (soft_routing = eps > 0; the paper's
    open question): every teacher of `team` on every sample, mixed with alpha_k = (1 - eps) 1[k routed] + eps/K.
    scales: {teacher: its own CFG scale} in place of conds' (--teacher_guidance; scale 1 runs no unconditional
    pass). Switches the model's active adapter; the caller re-activates the student."""
    (c, pc), (u, pu), scale = conds
    scales = scales or {}
    if soft_routing:
        vel = {}
        for teacher in team:
            model.adapter(teacher)
            vel[teacher] = model.velocity(x_t, t, (c, pc), (u, pu), scales.get(teacher, scale)).float()
        alpha = (1 - soft_routing) * one_hot_weights(routed, team) + soft_routing / len(team)  # (B, K)
        return mix_velocities(vel, alpha.to(x_t.device))
    v_T = torch.empty_like(x_t)
    for teacher, sub in groups_by_teacher(routed).items():
        model.adapter(teacher)
        v_T[sub] = model.velocity(x_t[sub], t[sub], (c[sub], pc[sub]), (u[sub], pu[sub]),
                                  scales.get(teacher, scale)).to(v_T.dtype)
    return v_T


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    teachers = {"geneval": "T_geneval", "ocr": "T_ocr", "pickscore": "T_pick"}
    N = 10_000
    tasks = sample_tasks(DEFAULT_TASK_WEIGHTS, N, g)
    print("task shares (expect .6/.2/.2 within 4 SE):", {k: round(tasks.count(k) / N, 3) for k in teachers})
    for k, p in {"geneval": 0.6, "ocr": 0.2, "pickscore": 0.2}.items():
        assert abs(tasks.count(k) / N - p) < 4 * (p * (1 - p) / N) ** 0.5, f"share of {k} is not {p} within 4 SE"
    names = route(tasks[:6], teachers)
    print("routed:", list(zip(tasks[:6], names)))
    assert names == [teachers[k] for k in tasks[:6]], "a sample is not routed to its own task's teacher"
    groups = groups_by_teacher(names)
    print("groups:", {k: v.tolist() for k, v in groups.items()})
    assert sorted(i for v in groups.values() for i in v.tolist()) == list(range(6)) and all(
        names[i] == k for k, v in groups.items() for i in v.tolist()), "groups do not partition the samples by teacher"
    vel = {n: torch.randn(6, 2, 2, generator=g) for n in teachers.values()}
    soft = mix_velocities(vel, one_hot_weights(names, list(vel)))
    hard = torch.stack([vel[n][b] for b, n in enumerate(names)])
    print("one-hot soft == hard:", torch.equal(soft, hard))
    assert torch.equal(soft, hard), "soft routing with one-hot weights is not exactly hard routing"
    try:
        route(["ocr", "deqa"], teachers)
    except ValueError as e:
        print("missing teacher ->", e)
    else:
        raise AssertionError("route must fail on a task with no teacher")
