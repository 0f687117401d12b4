"""
pytest's configuration, in one place. Being at the repository root, this file puts the root on sys.path (pytest's
default "prepend" import mode), so tests import the project's modules as `import train`, `from support import
models`; tests/ is on the path too, for its helpers (tests/tiny_sd3.py).

Tiers: `python -m pytest -q tests` runs everything (the README's test command, and CI's); the smoke tier
`python -m pytest -q -m "not slow" tests` leaves out the tests marked slow (whole stages, subprocesses,
torchrun, the exercise commands) and runs in well under a minute on two CPU cores.
"""
import os

# One thread per test process: the suite's tensors are tiny, and two cores fight over larger thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole stage, a subprocess or a long run; "
                                       "left out of the smoke tier (-m 'not slow')")
