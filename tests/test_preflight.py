"""tfdp-preflight: a ready cluster passes; a worker running other code, or
one that never arrives, is named and the job exits non-zero."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from test_multiworker import _free_port, _tf_config
from tfdp.preflight import check_step, run_preflight

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_two_replicas_pass_in_process(mirrored):
    lines = []
    assert run_preflight("mirrored", 2, allreduce_mb=1, log=lines.append)
    assert lines[-1].startswith("preflight: passed")
    row, libraries = [line for line in lines if line.startswith("0 ")]
    assert "2 CPU" in row and "same" in row and " ok (max |dw|" in row
    # The GPU table: none here, so no driver, cuDNN or NCCL either.
    assert libraries.split() == ["0", "no", "GPU", "(CPU", "only)", "-", "-", "-"]
    assert any(line.startswith("strategy: MirroredStrategy with 2 replica(s)") and
               line.endswith("all-reduce: RING") for line in lines), lines


def test_the_step_check_compares_with_one_replica(mirrored):
    result = check_step(mirrored)
    assert result["ok"] and result["max_weight_difference"] < 1e-5
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)


def _worker(index, ports, env_extra, timeout=180):
    env = {**subprocess.os.environ, "TF_CONFIG": _tf_config(ports, index), **env_extra}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.Popen([str(BIN / "tfdp-preflight"), "--allreduce_mb=1",
                             "--collective_timeout=60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_a_worker_with_other_code_is_named(tmp_path):
    """Worker 1 imports a copy of tfdp with one changed line: both workers
    exit 1, and the chief's table names worker 1's code."""
    alt = tmp_path / "alt"
    # Laid out as a wheel installs it: data/ becomes tfdp/recipes/ (setup.py).
    for source, target in (("tfdp", "tfdp"), ("data", "tfdp/recipes"), ("trainer", "trainer")):
        shutil.copytree(ROOT / source, alt / target,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(alt / "tfdp" / "flops.py", "a") as f:
        f.write("# a worker with a local edit\n")
    ports = [_free_port(), _free_port()]
    procs = [_worker(0, ports, {}), _worker(1, ports, {"PYTHONPATH": str(alt)})]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [1, 1], outs
    chief = outs[0][0]
    assert f"FAILED: worker 1 (127.0.0.1:{ports[1]}): code" in chief
    rows = [line for line in chief.splitlines() if line[:2] in ("0 ", "1 ")]
    assert len(rows) == 4, chief  # the checks' table, then the GPU table
    assert "same" in rows[0] and "DIFFERS" in rows[1]
    assert all(" ok (max |dw|" in row for row in rows[:2])  # the math still agrees
    assert all("no GPU (CPU only)" in row for row in rows[2:])
    assert outs[1][0] == ""  # only the chief prints


@pytest.mark.slow
def test_a_worker_that_never_arrives_is_named_within_the_timeout():
    ports = [_free_port(), _free_port()]
    began = time.monotonic()
    result = run_cli("tfdp-preflight", "--collective_timeout=8",
                     env={"TF_CONFIG": _tf_config(ports, 0)}, timeout=120)
    assert result.returncode == -9, result.stderr  # ended by its join watchdog
    assert time.monotonic() - began < 60
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tfdp-preflight: error: worker 1 (127.0.0.1:")
    assert f":{ports[1]}) did not join" in line


def test_bad_flag_is_one_line():
    result = run_cli("tfdp-preflight", "--allreduce_mb=0", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("tfdp-preflight: error: --allreduce_mb=0.0 must be "
                                     "positive, e.g. 64")
