"""Shared test set-up: two logical CPU replicas, small corpora, CLI runner.

TensorFlow fixes its logical devices at first use, so the CPU is split into
two here, before any test touches TensorFlow; OneDeviceStrategy("/cpu:0")
still gives the single-replica reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# tfdp's cache (the measured matmul peak: tfdp/flops.py) and default model_dir
# live under XDG_CACHE_HOME: the tests share one of their own, never the user's.
_CACHE = tempfile.mkdtemp(prefix="tfdp-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE

import pytest  # noqa: E402

from tfdp.strategy import build_strategy, split_cpu  # noqa: E402

split_cpu(2)  # before any test initialises TensorFlow's devices

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


# The test files that take longest (seconds of one clean CI run, both test
# processes busy), run first. pytest-xdist hands out whole files in
# collection order, one to whichever process is free; in name order the
# longest files came last, and one process still ran them for minutes
# after the other had finished. Longest first keeps both busy to the end.
# Only the order changes: a file missing here runs after these.
LONGEST_FIRST = ["test_multiworker", "test_finetuning", "test_training", "test_step",
                 "test_learning", "test_export", "test_plan", "test_preemption", "test_tfds",
                 "test_cli", "test_errors", "test_faults", "test_preflight"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


@pytest.fixture(scope="session")
def mirrored():
    """MirroredStrategy over two logical CPU devices."""
    return build_strategy("mirrored", num_cpu_replicas=2)


@pytest.fixture(scope="session")
def one_device():
    return build_strategy("one_device")


def tiny_text(repeat: int = 40) -> str:
    """A few KB of Python-like text with some non-ASCII characters."""
    lines = [
        "def add(a, b):\n    return a + b\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
        "# café, naïve, 東京 — unicode in comments\n",
        "for i in range(10):\n    print(i * i)\n",
    ]
    return "".join(lines[i % len(lines)] for i in range(repeat))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(tiny_text(), encoding="utf-8")
    return path


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
    """Run an installed console script; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # exercise the CLI's own quieting
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run([str(exe), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
