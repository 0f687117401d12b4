"""
Tests for router.py (task-routed teacher labelling, Flow-OPD §2.5).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_router.py
"""

import pytest
import torch

from router import (DEFAULT_TASK_WEIGHTS, groups_by_teacher, mix_velocities, one_hot_weights,
                    route, sample_tasks)

TEACHERS = {"geneval": "T_gen", "ocr": "T_ocr", "pickscore": "T_pick"}


def test_routing_is_deterministic_for_tagged_prompts():
    tasks = ["ocr", "geneval", "ocr", "pickscore"]
    assert route(tasks, TEACHERS) == ["T_ocr", "T_gen", "T_ocr", "T_pick"]
    assert route(tasks, TEACHERS) == route(tasks, TEACHERS)


def test_missing_teacher_error_names_task_teachers_and_fix():
    with pytest.raises(ValueError) as e:
        route(["ocr", "deqa"], TEACHERS)
    msg = str(e.value)
    assert "deqa" in msg and "geneval" in msg and "--teacher" in msg and "TASK=PATH" in msg


def test_groups_by_teacher_partitions_indices():
    names = ["T_ocr", "T_gen", "T_ocr", "T_pick", "T_gen"]
    groups = groups_by_teacher(names)
    assert list(groups) == ["T_ocr", "T_gen", "T_pick"]
    assert groups["T_ocr"].tolist() == [0, 2] and groups["T_gen"].tolist() == [1, 4]
    assert sorted(torch.cat(list(groups.values())).tolist()) == list(range(5))


def test_sample_tasks_proportions():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    tasks = sample_tasks(DEFAULT_TASK_WEIGHTS, n, g)
    assert len(tasks) == n and set(tasks) == set(DEFAULT_TASK_WEIGHTS)
    for task, p in {"geneval": 0.6, "ocr": 0.2, "pickscore": 0.2}.items():
        assert abs(tasks.count(task) / n - p) < 0.015        # ~4 standard errors
    assert sample_tasks({"a": 1.0, "b": 0.0}, 50, g) == ["a"] * 50
    with pytest.raises(ValueError):
        sample_tasks({"a": 0.0}, 3, g)


def test_soft_one_hot_equals_hard_routing():
    g = torch.Generator().manual_seed(1)
    names = route(["ocr", "geneval", "pickscore", "ocr"], TEACHERS)
    vel = {n: torch.randn(4, 2, 3, 3, generator=g) for n in ["T_gen", "T_ocr", "T_pick"]}
    soft = mix_velocities(vel, one_hot_weights(names, list(vel)))
    hard = torch.stack([vel[n][b] for b, n in enumerate(names)])
    assert torch.equal(soft, hard)


def test_soft_weights_are_normalised_dict_or_tensor():
    g = torch.Generator().manual_seed(2)
    vel = {"a": torch.randn(2, 3, generator=g), "b": torch.randn(2, 3, generator=g)}
    expect = 0.25 * vel["a"] + 0.75 * vel["b"]
    assert torch.allclose(mix_velocities(vel, {"a": 1.0, "b": 3.0}), expect)
    assert torch.allclose(mix_velocities(vel, torch.tensor([[2.0, 6.0], [1.0, 3.0]])), expect)
