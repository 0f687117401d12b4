"""
Fixtures the test files share (pytest's own configuration is in the root conftest.py).
"""
import os

import pytest
import torch

from helpers import BASE, REAL_LOAD, load_base
from support import models
from tiny_sd3 import save_random_loras


@pytest.fixture
def fast_load(monkeypatch):
    """models.load_world_model for the committed base returns a deep copy of one cached load (~5 s saved
    per stage run); any other path (e.g. a freshly pretrained base) is loaded for real."""
    def load(path, device="cpu"):
        if os.path.abspath(path) == os.path.abspath(BASE):
            return load_base().to(device)
        return REAL_LOAD(path, device)
    monkeypatch.setattr(models, "load_world_model", load)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """Four small LoRA teachers (random B, so they differ from the base and from one another) in PEFT format;
    built once per session and only read by the tests."""
    root = tmp_path_factory.mktemp("teachers")
    model = load_base()
    torch.manual_seed(0)
    save_random_loras(model, root, ("geneval", "ocr", "pickscore", "deqa"), std=0.01)
    return root
