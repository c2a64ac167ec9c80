"""Multi-worker training across processes on loopback: MultiWorkerMirroredStrategy
driven by tfdp's own step, started with tfdp-launch.

Every job runs under a hard timeout and the launcher kills its workers when
it returns; `_no_processes_mention` double-checks that nothing is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, tiny_text
from multiworker_job import CFG, train_weights
from tfdp.prepare import prepare

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
JOB = Path(__file__).with_name("multiworker_job.py")
# XLA stays off in these CLI runs (compiling takes most of a tiny run); the
# 2-worker equivalence test runs the compiled step.
TINY = ["--num_layers=1", "--num_heads=2", "--hidden_dim=32", "--intermediate_dim=64",
        "--seq_len=32", "--global_batch_size=8", "--sample_tokens=0", "--log_every=1",
        "--nojit_compile"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mw_data")
    corpus = root / "corpus.txt"
    corpus.write_text(tiny_text(200), encoding="utf-8")
    prepare([corpus], str(root / "data"), "byte", val_fraction=0.05, log=lambda *_: None)
    return str(root / "data")


def _reshard(data_dir: str, split: str, pieces: int) -> None:
    """Cut a prepared split into `pieces` shard files (prepare writes 4M-token
    shards, far more than a test corpus fills)."""
    root = Path(data_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    info = manifest["splits"][split]
    tokens = np.concatenate([np.load(root / s["file"]) for s in info["shards"]])
    for s in info["shards"]:
        (root / s["file"]).unlink()
    info["shards"] = []
    for i, chunk in enumerate(np.array_split(tokens, pieces)):
        np.save(root / f"{split}-{i:05d}.npy", chunk)
        info["shards"].append({"file": f"{split}-{i:05d}.npy", "tokens": int(len(chunk))})
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """Prepared data with 3 train and 2 val shard files."""
    root = tmp_path_factory.mktemp("mw_sharded")
    corpus = root / "corpus.txt"
    corpus.write_text(tiny_text(200), encoding="utf-8")
    prepare([corpus], str(root / "data"), "byte", val_fraction=0.1, log=lambda *_: None)
    _reshard(str(root / "data"), "train", 3)
    _reshard(str(root / "data"), "val", 2)
    return str(root / "data")


def _env(tmp_path) -> dict:
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.pop("TF_CONFIG", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # exercise tfdp-train's own quieting
    return env


def _no_processes_mention(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def _launch(args, env, timeout=300):
    return subprocess.run([str(BIN / "tfdp-launch"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _run_pair(tmp_path, data, *extra):
    """Train with 2 workers; return (worker 0 weights, worker 1 weights, chief logs)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = _launch(["--num_workers=2", "--cpu_threads_per_worker=1", "--",
                    sys.executable, str(JOB), data, str(out), *extra], _env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = [np.load(out / f"worker_{i}.npz") for i in range(2)]
    w0, w1 = ([w[k] for k in sorted(w.files, key=lambda k: int(k.split("_")[1]))]
              for w in workers)
    return w0, w1, json.loads((out / "logs_0.json").read_text())


def test_two_workers_match_mirrored_and_one_device(tmp_path, data_dir, mirrored, one_device):
    w0, w1, logs = _run_pair(tmp_path, data_dir)
    # Both workers applied the same all-reduced updates: bit-identical weights.
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    mirrored_weights, mirrored_logs = train_weights(mirrored, data_dir, str(tmp_path / "m"))
    single_weights, single_logs = train_weights(one_device, data_dir, str(tmp_path / "s"))
    from tfdp.model import build_model
    import keras
    keras.utils.set_random_seed(CFG.seed)  # as the Runner does before building
    initial = build_model(CFG, 257).get_weights()
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(w0, initial))
    assert moved > 1e-2  # 20 steps at lr 1e-2 really trained
    for name, other in (("mirrored", mirrored_weights), ("one_device", single_weights)):
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(w0, other))
        assert worst < 1e-4, f"2 workers vs {name}: weights differ by up to {worst}"
    # Validation is reduced across workers: the same loss as in one process.
    np.testing.assert_allclose(logs["val_loss"], single_logs["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["val_loss"], mirrored_logs["val_loss"], rtol=1e-5)


def test_whole_shard_files_per_worker(tmp_path, sharded_dir, one_device):
    """3 train / 2 val files for 2 workers: each worker reads whole files of its
    own. The data order differs from one process (each worker shuffles its
    own files), but the workers stay identical, training works, and the
    validation loss of the final weights equals one process's on all files."""
    w0, w1, logs = _run_pair(tmp_path, sharded_dir)
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    from tfdp.dataset import Split
    from tfdp.runner import evaluate_task
    from tfdp.step import make_eval_step
    from tfdp.tasks.language_model import LanguageModelTask
    everything = Split(sharded_dir, "val", CFG.seq_len)  # all files, one process
    task = LanguageModelTask(CFG, 257, val=everything)
    with one_device.scope():
        model = task.build_model()
    model.set_weights(w0)
    step = make_eval_step(one_device, model, task)
    metrics = evaluate_task(one_device, step, task, CFG.global_batch_size)
    np.testing.assert_allclose(logs["val_loss"], metrics["loss"], rtol=1e-5)
    assert logs["val_loss"] < 5.0 < np.log(257)  # it learned something in 20 steps


def _long_job_args(text_file, model_dir, timeout: int, checkpoint_every: int):
    return ["tfdp-train", f"--data={text_file}", f"--model_dir={model_dir}", *TINY,
            "--train_steps=100000", "--eval_every=100000",
            f"--checkpoint_every={checkpoint_every}", f"--collective_timeout={timeout}"]


def _start_long_job(tmp_path, text_file, timeout: int, checkpoint_every: int, until: int):
    """Start a 2-worker job; return once the chief reports step `until`."""
    model_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(BIN / "tfdp-launch"), "--num_workers=2", "--grace_seconds=5", "--",
         *_long_job_args(text_file, model_dir, timeout, checkpoint_every)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path))
    lines, pids = [], {}
    deadline = time.monotonic() + 240
    for line in proc.stdout:  # until training is under way on both workers
        lines.append(line)
        if m := re.match(r"tfdp-launch: worker (\d) is pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if f"[worker 0] step {until}/" in line or time.monotonic() > deadline:
            break
    return proc, pids, lines, model_dir


def _finish(proc, lines, timeout):
    """Read the rest of the output; return it and when each line arrived."""
    arrived = []
    reader = threading.Thread(target=lambda: arrived.extend(
        (time.monotonic(), line) for line in proc.stdout), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines) + "".join(line for _, line in arrived), arrived


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_lost_worker_stops_the_job(tmp_path, text_file, how):
    """A worker dies (SIGKILL) or freezes (SIGSTOP) mid-run: the survivor stops
    within the timeout, naming it; relaunching the job resumes from the last
    checkpoint, losing at most --checkpoint_every steps."""
    timeout, every = 15, 5
    proc, pids, lines, model_dir = _start_long_job(tmp_path, text_file, timeout, every, 12)
    frozen = None
    try:
        assert set(pids) == {0, 1}, "".join(lines)
        assert any("[worker 0] step 12/" in line for line in lines), "".join(lines)
        os.kill(pids[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        frozen = pids[1] if how == "frozen" else None
        lost = time.monotonic()
        output, arrived = _finish(proc, lines, timeout=timeout + 90)
        ended = time.monotonic() - lost
    finally:
        if frozen and _no_processes_mention(str(model_dir)):
            os.kill(frozen, signal.SIGKILL)  # the launcher should have done it already
    assert proc.returncode != 0
    # The survivor stopped by itself, within the timeout, naming the lost worker.
    assert re.search(r"\[worker 0\] tfdp-train: error: .*worker 1 \(127\.0\.0\.1:\d+\)",
                     output), output[-3000:]
    assert "Traceback" not in output
    noticed = next(t for t, line in arrived if line.startswith("[worker 0] tfdp-train: error"))
    # Heartbeats are checked periodically: allow a few seconds past the timeout.
    assert noticed - lost < timeout + 10, noticed - lost
    if how == "killed":
        assert "tfdp-launch: worker 1 (pid" in output and "exit code 137" in output
    else:  # the survivor fails first; the launcher then ends the frozen worker
        assert "tfdp-launch: worker 0 (pid" in output
        assert "killing the remaining workers (SIGKILL)" in output  # SIGTERM waits while stopped
    # A bound against hanging, not a speed claim: generous slack for a loaded machine
    # (56 s was seen once under a slow CI run).
    assert ended < timeout + 10 + 5 + 10 + 30, ended  # + grace + SIGTERM wait + slack
    assert _no_processes_mention(str(model_dir)) == []
    if how == "frozen":
        return
    done = max(int(s) for s in re.findall(r"\[worker 0\] step (\d+)/", output))
    # The same command (a later --train_steps wins), so the test ends soon.
    again = _launch(["--num_workers=2", "--", *_long_job_args(text_file, model_dir, timeout,
                                                              every),
                     f"--train_steps={done + 2}"], _env(tmp_path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = int(re.search(r"\[worker 0\] resumed from step (\d+)", again.stdout).group(1))
    assert 0 <= done - resumed <= every, (done, resumed)  # = every: killed mid-save
    print(f"steps lost to the kill: {done - resumed} (done {done}, resumed from {resumed})")


def test_stuck_worker_is_caught_by_the_watchdog(tmp_path, data_dir):
    """Worker 1 hangs in Python after step 5: alive, heartbeats flowing, but no
    more collectives. Worker 0's watchdog aborts its collectives after
    --collective_timeout (10 s here) and it exits 3 with one line."""
    out = tmp_path / "out"
    out.mkdir()
    began = time.monotonic()
    proc = _launch(["--num_workers=2", "--grace_seconds=2", "--", sys.executable, str(JOB),
                    data_dir, str(out), "--stall_worker_1_at=5"], _env(tmp_path), timeout=180)
    assert proc.returncode != 0
    assert "[worker 1] stalling" in proc.stdout
    assert re.search(r"^\[worker 0\] multiworker_job: error: no step finished \(every worker "
                     r"still answers: one is stuck\) for --collective_timeout=10s", proc.stdout,
                     re.M), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert "tfdp-launch: worker 0 (pid" in proc.stdout and "exit code 3" in proc.stdout
    assert time.monotonic() - began < 120
    assert _no_processes_mention(str(out)) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def test_worker_that_never_joins(tmp_path, text_file):
    ports = [_free_port(), _free_port()]
    model_dir = tmp_path / "run"
    began = time.monotonic()
    proc = run_cli("tfdp-train", f"--data={text_file}", f"--model_dir={model_dir}", *TINY,
                   "--collective_timeout=8", env={"TF_CONFIG": _tf_config(ports, 0)},
                   timeout=120)
    assert proc.returncode == -9, proc.stderr  # ended by its join watchdog
    assert time.monotonic() - began < 60
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("tfdp-train: error: worker 1 (127.0.0.1:") and "did not join" in line
    assert f":{ports[1]})" in line
    assert not model_dir.exists()


def test_port_in_use(tmp_path, text_file):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("tfdp-train", f"--data={text_file}", f"--model_dir={tmp_path / 'run'}",
                       *TINY, env={"TF_CONFIG": _tf_config([port, _free_port()], 0)},
                       timeout=120)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("tfdp-train: error: port ") and f"{port}" in line and "in use" in line
    assert not (tmp_path / "run").exists()
