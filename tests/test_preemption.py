"""SIGTERM (a scheduler's preemption): finish the step, checkpoint, exit 75, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_multiworker import TINY, _env, _no_processes_mention

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _start(cmd, tmp_path):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(tmp_path))


def _run_past(proc, pattern: str, sigterm: bool, limit: float = 240):
    """Read output until a line matches `pattern`, then (with `sigterm`) send
    SIGTERM and read the rest; return (all output, seconds from then to exit,
    whether the pattern came). The process never outlives this call."""
    lines, seen, took = [], False, 0.0
    deadline = time.monotonic() + limit
    try:
        for line in proc.stdout:
            lines.append(line)
            seen = bool(re.search(pattern, line))
            if seen or time.monotonic() > deadline:
                break
        if seen:
            if sigterm:
                proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            lines.append(proc.communicate(timeout=60)[0])
            took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            lines.append(proc.communicate()[0])
    return "".join(lines), took, seen


def _train_args(text_file, model_dir):
    return [f"--data={text_file}", f"--model_dir={model_dir}", *TINY, "--train_steps=100000",
            "--eval_every=100000", "--checkpoint_every=100000", "--collective_timeout=60"]


def test_sigterm_checkpoints_the_current_step_and_exits_75(tmp_path, text_file):
    model_dir = tmp_path / "run"
    proc = _start([str(BIN / "tfdp-train"), *_train_args(text_file, model_dir)], tmp_path)
    output, took, seen = _run_past(proc, r"step 5/", sigterm=True)
    assert seen, output[-3000:]
    assert proc.returncode == 75, output[-3000:]
    assert took < 30, took
    assert "Traceback" not in output
    step = _stopped_step(output, model_dir)
    # The same command resumes from that step.
    again = subprocess.run([str(BIN / "tfdp-train"),
                            *_train_args(text_file, model_dir)[:-4], f"--train_steps={step + 2}",
                            "--eval_every=100000", "--checkpoint_every=100000"],
                           capture_output=True, text=True, timeout=240, env=_env(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {step}" in again.stdout
    assert json.loads((model_dir / "metrics.json").read_text())["step"] == step + 2


def _stopped_step(output: str, model_dir) -> int:
    """The step a SIGTERM stopped after, as the log says; its checkpoint
    exists and no process of the job is left."""
    stopped = re.search(r"error: stopped by SIGTERM after step (\d+), checkpoint saved", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert (model_dir / "checkpoints" / f"ckpt-{step}.index").exists()
    assert _no_processes_mention(str(model_dir)) == []
    return step


def test_a_launched_job_stops_on_sigterm_with_138_and_its_relaunch_finishes(tmp_path,
                                                                           text_file):
    """tfdp-launch end to end: two workers, SIGTERM to the launcher with
    --preempted_exit_code=138 (Kubeflow's retryable code,
    deploy/k8s/tfjob.yaml); then the same launch, asked for two more steps,
    resumes both workers from the chief's checkpoint and finishes, with one
    set of outputs from the chief and nothing from the other worker."""
    model_dir = tmp_path / "run"
    train = ["tfdp-train", *_train_args(text_file, model_dir), "--preempted_exit_code=138"]
    proc = _start([str(BIN / "tfdp-launch"), "--num_workers=2", "--", *train], tmp_path)
    output, took, seen = _run_past(proc, r"step 5/", sigterm=True)
    assert seen, output[-3000:]
    assert proc.returncode == 138, output[-3000:]
    assert took < 30, took
    assert "Traceback" not in output
    step = _stopped_step(output, model_dir)
    assert os.listdir(tmp_path / "tmp") == []  # the workers' scratch directories are gone
    train[train.index("--train_steps=100000")] = f"--train_steps={step + 2}"
    again = subprocess.run([str(BIN / "tfdp-launch"), "--num_workers=2", "--", *train],
                           capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    out = again.stdout
    assert again.returncode == 0, out[-3000:] + again.stderr[-3000:]
    assert "Traceback" not in out + again.stderr
    assert f"[worker 0] resumed from step {step}" in out
    assert "tfdp-launch: all 2 worker(s) finished" in out
    assert f"[worker 0] step {step + 2}/{step + 2}" in out
    # CPU workers all-reduce with RING (NCCL is for GPUs), and the log says so.
    # (MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy.)
    assert re.search(r"^\[worker 0\] strategy: CollectiveAllReduceStrategy with 2 replica\(s\) "
                     r"\(.*\); all-reduce: RING$", out, re.M), out[:3000]
    # Only the chief reports; the other worker stays silent when all is well.
    assert not re.search(r"^\[worker 1\]", out, re.M), out
    # Exactly one set of outputs, in model_dir, from the chief.
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "config.json", "data", "loss.png",
                                             "metrics.json", "report.html", "sample.txt",
                                             "tensorboard", "tokenizer", "training.png"]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["step"] == step + 2 and metrics["num_replicas"] == 2
    assert len(list((model_dir / "tensorboard" / "train").iterdir())) == 2  # one per launch
    assert os.listdir(tmp_path / "tmp") == []
    assert _no_processes_mention(str(model_dir)) == []


def test_a_step_that_never_ends_after_sigterm_exits_75_within_the_grace(tmp_path, text_file):
    """A step hangs inside TensorFlow (a hung device or peer) and SIGTERM comes
    meanwhile: the process still exits 75 once --preemption_grace_seconds
    have passed, saying where a resume will start."""
    from tfdp.prepare import prepare
    prepare([text_file], str(tmp_path / "data"), "byte", val_fraction=0.1, log=lambda *_: None)
    (tmp_path / "out").mkdir()
    job = Path(__file__).with_name("multiworker_job.py")
    proc = _start([sys.executable, str(job), str(tmp_path / "data"), str(tmp_path / "out"),
                   "--hang_inside_step_after=12", "--grace=3"], tmp_path)
    output, took, seen = _run_past(proc, r"sigterm and hang", sigterm=False)
    assert seen, output[-3000:]
    assert proc.returncode == 75, output[-3000:]
    assert 1.0 < took < 3 + 5, took
    assert ("multiworker_job.py: error: stopped by SIGTERM: not done within "
            "--preemption_grace_seconds=3; running the same command again resumes from its "
            "last checkpoint (ckpt-10)") in output, output[-3000:]
