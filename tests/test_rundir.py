"""tfdp/rundir.py: one job per model_dir, and the rules for reusing one.

The lock is exercised across real processes (flock is per open file, so
the kernel, not tfdp's bookkeeping, must do the refusing); each helper
process imports tfdp.rundir alone, which loads no TensorFlow (~0.1 s).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli
from tfdp import rundir
from tfdp.config import Config
from tfdp.errors import UserError

# A process that holds argv[1], prints "held" and waits for stdin to close
# (or for a signal); with argv[2] == "exit" it exits at once, leaving the
# release to the end of the process.
HOLDER = textwrap.dedent("""
    import sys
    from tfdp import rundir
    from tfdp.errors import UserError
    try:
        rundir.hold(sys.argv[1])
    except UserError as err:
        print(err, flush=True)
        sys.exit(2)
    print("held", flush=True)
    if sys.argv[2:] != ["exit"]:
        sys.stdin.read()
""")


def _try_hold(directory) -> subprocess.CompletedProcess:
    """Another process's attempt to hold `directory` (exits at once)."""
    return subprocess.run([sys.executable, "-c", HOLDER, str(directory), "exit"],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def held_elsewhere(tmp_path):
    """A directory that a live helper process holds: (directory, process)."""
    directory = tmp_path / "runs" / "M"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield directory, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_job_is_refused_naming_the_holder(held_elsewhere):
    directory, proc = held_elsewhere
    with pytest.raises(UserError) as err:
        rundir.hold(str(directory))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--model_dir={directory} is in use by another tfdp job (")
    assert f"host {socket.gethostname()}, pid {proc.pid}, since 20" in message
    assert message.endswith(" UTC); wait for it to end or use another --model_dir")
    # The flag named is the caller's; a refused job leaves the holder's files alone.
    with pytest.raises(UserError, match=r"^--output_dir=.* use another --output_dir$"):
        rundir.hold(str(directory), flag="--output_dir")
    assert os.listdir(directory) == [rundir.LOCK_NAME]
    info = json.loads((directory / rundir.LOCK_NAME).read_text())
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname()


def test_a_killed_holder_does_not_block_the_next_job(held_elsewhere):
    directory, proc = held_elsewhere
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (directory / rundir.LOCK_NAME).exists()  # stale: its holder is gone
    with rundir.hold(str(directory)) as held:
        assert held.locked
        assert json.loads(Path(held.path).read_text())["pid"] == os.getpid()
        refused = _try_hold(directory)
        assert refused.returncode == 2 and f"pid {os.getpid()}," in refused.stdout
    # Released: the lock file goes; the directory, made by the killed job, stays.
    assert os.listdir(directory) == []


def test_the_lock_ends_with_its_process(tmp_path):
    directory = tmp_path / "a" / "b"
    done = _try_hold(directory)  # holds, then exits without releasing
    assert done.returncode == 0 and done.stdout.strip() == "held", done.stdout + done.stderr
    assert not (tmp_path / "a").exists()  # it made them, wrote nothing: removed at exit
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    assert _try_hold(directory).returncode == 0
    assert os.listdir(directory) == ["notes.txt"]  # the lock file goes, the rest stays


def test_of_jobs_started_together_exactly_one_holds(tmp_path):
    directory = tmp_path / "new" / "M"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        said = [proc.stdout.readline().strip() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    refused = f"--model_dir={directory} is in use by another tfdp job ("
    assert sorted(line if line == "held" else line[:len(refused)] for line in said) == \
        [refused] * 3 + ["held"], said


def test_one_process_may_not_hold_a_directory_twice(tmp_path):
    with rundir.hold(str(tmp_path)):
        with pytest.raises(UserError, match=f"pid {os.getpid()},"):
            rundir.hold(str(tmp_path))
    with rundir.hold(str(tmp_path)):  # released, so free again
        pass


def test_a_job_releases_what_it_held_when_it_ends(tmp_path):
    """A `job`-decorated call (tfdp.training.train) releases on return or raise, so
    the same process may run the next job there; what it wrote stays."""
    @rundir.job
    def fails(directory):
        rundir.hold(directory)
        raise UserError("bad data")

    @rundir.job
    def writes(directory):
        rundir.hold(directory)
        Path(directory, "config.json").write_text("{}")
        return "done"

    target = tmp_path / "new" / "M"
    with pytest.raises(UserError, match="bad data"):
        fails(str(target))
    assert os.listdir(tmp_path) == []  # refused for another reason: nothing made stays
    assert writes(str(target)) == "done" and os.listdir(target) == ["config.json"]
    assert writes(str(target)) == "done"  # the first call's hold ended with it


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    said = []
    held = rundir.hold(str(tmp_path / "new" / "M"), say=said.append)
    assert not held.locked and os.listdir(tmp_path / "new" / "M") == []
    assert said == [f"warning: --model_dir={tmp_path / 'new' / 'M'} cannot be locked on its "
                    "file system; nothing stops a second job from using it at the same time"]
    held.release()
    assert os.listdir(tmp_path) == []


def test_a_directory_holding_only_the_lock_counts_as_empty(tmp_path):
    (tmp_path / rundir.LOCK_NAME).write_text('{"pid": 1}')  # a killed job's leftover
    rundir.check_usable(str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no tfdp run"):
        rundir.check_usable(str(tmp_path))


def test_discard_removes_run_entries_only(tmp_path):
    for name in ("checkpoints", "tensorboard", "tokenizer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    for name in ("metrics.json", "config.json", "sample.txt", "notes.txt", rundir.LOCK_NAME):
        (tmp_path / name).write_text("x")
    (tmp_path / "data").mkdir()
    (tmp_path / f"{rundir.TRASH_PREFIX}old").mkdir()  # what a crashed discard left
    said = []
    rundir.discard(str(tmp_path), said.append, keep=str(tmp_path / "data" / "shards"))
    # The lock of the job that discards, files tfdp does not know and the data
    # that job reads stay.
    assert sorted(os.listdir(tmp_path)) == [rundir.LOCK_NAME, "data", "notes.txt"]
    assert said == [f"--overwrite: discarded the earlier run in {tmp_path}"]
    rundir.discard(str(tmp_path), said.append)
    assert sorted(os.listdir(tmp_path)) == [rundir.LOCK_NAME, "notes.txt"]


def test_conflict_names_what_changed(tmp_path):
    run = tmp_path / "run"
    cfg = Config(model_dir=str(run), data=str(tmp_path / "corpus.txt"), hidden_dim=32)
    assert rundir.conflict(cfg, str(run)) is None  # no run yet
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    assert rundir.conflict(cfg, str(run)) is None
    assert rundir.conflict(Config(model_dir=str(run), data=cfg.data, hidden_dim=32,
                                  train_steps=99), str(run)) is None
    reason = rundir.conflict(Config(model_dir=str(run), data=cfg.data, hidden_dim=64),
                             str(run))
    assert "--hidden_dim=32 (now 64)" in reason


def test_conflict_names_another_tokenizer(tmp_path):
    from tfdp.prepare import prepare
    from conftest import tiny_text
    (tmp_path / "corpus.txt").write_text(tiny_text())
    prepared = tmp_path / "prepared"
    prepare([tmp_path / "corpus.txt"], str(prepared), "byte", log=lambda *_: None)
    run = tmp_path / "run"
    cfg = Config(model_dir=str(run), data=str(prepared), tokenizer="byte")
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    (run / "tokenizer").mkdir()
    for f in (prepared / "tokenizer").iterdir():
        (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
    assert rundir.conflict(cfg, str(run)) is None
    first = sorted((run / "tokenizer").iterdir())[0]
    first.write_bytes(first.read_bytes() + b" ")
    assert "another tokenizer" in rundir.conflict(cfg, str(run))


def test_same_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("1")
    assert rundir.same_files(str(a), str(b))  # nothing recorded yet
    b.mkdir()
    assert not rundir.same_files(str(a), str(b))  # names differ
    (b / "x").write_text("1")
    assert rundir.same_files(str(a), str(b))
    (b / "x").write_text("2")
    assert not rundir.same_files(str(a), str(b))  # bytes differ


@pytest.mark.parametrize("text, value", [
    (None, {}), ("{oops", {}), ("[1, 2]", {}), ('{"step": 3}', {"step": 3})])
def test_read_json(tmp_path, text, value):
    path = tmp_path / "m.json"
    if text is not None:
        path.write_text(text)
    assert rundir.read_json(str(path)) == value


def test_cli_train_on_a_held_model_dir_is_one_line(tmp_path, text_file):
    """tfdp-train end to end: refused before it reads data or writes a file."""
    model_dir = tmp_path / "M"
    with rundir.hold(str(model_dir)) as held:
        info = json.loads(Path(held.path).read_text())
        proc = run_cli("tfdp-train", f"--model_dir={model_dir}", f"--data={text_file}",
                       "--train_steps=2", "--num_layers=1", "--hidden_dim=32",
                       "--num_heads=2", "--intermediate_dim=64", "--seq_len=32")
        assert os.listdir(model_dir) == [rundir.LOCK_NAME]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    by = f"{info['command']} on " if info.get("command") else ""  # none under xdist's workers
    assert lines[-1] == (
        f"tfdp-train: error: --model_dir={model_dir} is in use by another tfdp job "
        f"({by}host {socket.gethostname()}, pid {os.getpid()}, since "
        f"{info['since']}); wait for it to end or use another --model_dir"), proc.stderr
