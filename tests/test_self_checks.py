"""
The lab path of the README: every paper-concept file's self-check (`python FILE.py`) and the pictures'
(`python -m support.figures DIR`) run to the end, so none rots between releases. Each self-check asserts what
it prints; they run in-process here (runpy), which saves a Python start and the imports per file, and one test
feeds a block a wrong dependency to show that its checks do fail.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_self_checks.py
"""
import os
import re
import runpy
import sys

import pytest
import torch

import flow_matching
import sde_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["flow_matching.py", "sde_sampler.py", "grpo.py", "opd_loss.py", "mar.py", "cold_start.py", "router.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_self_check_runs(script, capsys):
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")   # raises AssertionError on a failed claim
    assert capsys.readouterr().out.strip()   # it printed what it checked


@pytest.mark.filterwarnings("ignore:'support.figures' found in sys.modules:RuntimeWarning")   # imported by other tests
def test_figures_self_check_writes_its_pngs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)   # it reads the committed training logs by relative path
    monkeypatch.setattr(sys, "argv", ["support/figures.py", str(tmp_path)])
    runpy.run_module("support.figures", run_name="__main__")   # sys.exit(message) if a PNG is missing
    assert "wrote" in capsys.readouterr().out
    assert {"samples_grid.png", "training_curves.png", "w_t.png"} <= set(os.listdir(tmp_path))


def _twice(f):
    return lambda *args, **kwargs: 2 * f(*args, **kwargs)


def _off_by_one_ulp(f):
    return lambda *args, **kwargs: torch.nextafter(f(*args, **kwargs), torch.tensor(float("inf")))


# A block re-executes its file's source but imports its dependencies from sys.modules, so patching the
# dependency module feeds it a wrong function: twice the KL breaks KL = w(t)·‖Δv‖²; an Euler step one ulp off
# breaks "noise 0 == Euler", which is checked bit for bit.
@pytest.mark.parametrize("script, module, name, wrong, claim", [
    ("opd_loss.py", sde_sampler, "gaussian_kl", _twice, "KL != w(t)"),
    ("sde_sampler.py", flow_matching, "euler_step", _off_by_one_ulp, "noise 0 is not exactly euler_step"),
])
def test_self_check_fails_on_a_wrong_claim(script, module, name, wrong, claim, monkeypatch):
    monkeypatch.setattr(module, name, wrong(getattr(module, name)))
    with pytest.raises(AssertionError, match=re.escape(claim)):
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
