"""
The lab path of the README: every paper-concept file's self-check (`python FILE.py`) and the pictures'
(`python -m support.figures DIR`) run to the end, so none rots between releases.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_self_checks.py
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["flow_matching.py", "sde_sampler.py", "grpo.py", "opd_loss.py", "mar.py",
                                    "cold_start.py", "router.py", "plots.py"])
def test_self_check_runs(script, tmp_path):
    argv = [sys.executable, script] + ([str(tmp_path)] if script == "plots.py" else [])
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
    assert out.stdout.strip()   # it printed what it checked
    if script == "plots.py":
        assert {"samples_grid.png", "training_curves.png", "w_t.png"} <= set(os.listdir(tmp_path))
