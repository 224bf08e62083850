"""Test tiers and the offline environment shared by every test.

Tiers: the default (fast, CPU); ``slow`` (full-size models, run with ``--slow`` or ``-m slow``);
``gpu`` (skipped unless CUDA is available).
"""

from __future__ import annotations

import os

# No model hub is reachable here: make every hub access fail at once instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The fast tier runs tiny models, where a second OpenMP thread gains little and, on a busy machine, spin-waiting
# threads slow every op several-fold. One thread here and in the CLIs the tests launch (I2D_TEST_THREADS overrides;
# the slow ShapesWorld demo test lifts it, to run the demo as a user does).
THREADS = os.environ.get("I2D_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("MKL_NUM_THREADS", THREADS)

import pytest  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run the slow tier")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(THREADS))
    config.addinivalue_line("markers", "slow: full-size models or long runs; enabled by --slow or -m slow")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


# Files that take longest, run first: tests/run_tests.sh gives each file to one pytest-xdist worker in collection
# order, and a long file started last is the tier's tail (test_resume.py and test_resume_ddp.py: 7.7 of the 21.6
# minutes of the default tier on one core, apart so that two workers share them; test_shapesworld.py holds the slow
# tier's demo run).
LONG_FILES = ("test_resume.py", "test_resume_ddp.py", "test_shapesworld.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: files stay whole and in order
    run_slow = config.getoption("--slow") or "slow" in (config.getoption("-m") or "")
    import torch

    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow tier: run with --slow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu tier: CUDA not available"))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
