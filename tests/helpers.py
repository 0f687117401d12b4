"""
What several test files share: the committed base loaded once (load_base returns a deep copy), the tiny
training settings (TINY) and a JSON-lines reader. The fixtures built on them are in tests/conftest.py.
"""
import copy
import json
import os

from support import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "checkpoints", "base")
TINY = ["--grpo_iters", "2", "--prompts_per_iter", "2", "--group_size", "2", "--micro_batch", "4",
        "--train_timesteps", "1", "--num_steps", "4", "--eval_steps", "2", "--eval_prompts_per_task", "2",
        "--eval_images_per_prompt", "1", "--device", "cpu", "--base", BASE]
REAL_LOAD = models.load_world_model
_cache = {}


def load_base():
    """A fresh copy of the committed base (loaded from disk once per test process)."""
    if "base" not in _cache:
        _cache["base"] = REAL_LOAD(BASE, "cpu")
    return copy.deepcopy(_cache["base"])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
