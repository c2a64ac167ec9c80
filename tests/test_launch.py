"""tfdp-launch without TensorFlow in the workers.

The commands launched are small `python -c` snippets that print what they
see (TF_CONFIG, CPU affinity, thread variables), write their pid under
tmp_path, sleep, or exit with a chosen code. Most tests run
`tfdp.launch.Launcher` in-process; those that signal the launcher itself, and
the error-contract ones, run the `tfdp-launch` console script.

Every test bounds its time (a timer kills the workers of an in-process
launcher that overruns; subprocesses have timeouts) and kills whatever it
started in a `finally`, so a failing test leaves no process behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import run_cli
from tfdp.errors import UserError
from tfdp.launch import Launcher

LAUNCH = Path(sys.executable).parent / "tfdp-launch"

# Every snippet starts with this: its task index and a helper that records
# its pid (atomically, so a reader never sees a half-written file).
PRELUDE = """\
import json, os, signal, sys, time
I = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
def write_pid(directory):
    tmp = os.path.join(directory, f".pid{I}")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(directory, f"pid{I}"))
"""


def snippet(code: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, already dead but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """Poll until every pid is gone; return those still alive at the end."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def read_pids(directory: Path, count: int, timeout: float = 15.0) -> list[int]:
    """The pids that `count` workers wrote into `directory`, waiting for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [directory / f"pid{i}" for i in range(count)]
        if all(f.exists() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.05)
    raise AssertionError(f"workers did not write their pids: {sorted(os.listdir(directory))}")


def kill_pids(directory: Path) -> None:
    """Last resort for a failed test: SIGKILL every worker that wrote a pid."""
    for f in directory.glob("pid*"):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            pid = int(f.read_text())
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def launch(command, num_workers, timeout: float = 20.0, **kwargs):
    """Run a Launcher in-process: (exit code, output, seconds, launcher).

    A timer SIGKILLs the workers if the run overruns `timeout`, so a broken
    launcher fails the test instead of hanging it.
    """
    out = io.StringIO()
    launcher = Launcher(command, num_workers, out=out, **kwargs)

    def kill_all():
        for proc in launcher.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill_all)
    timer.daemon = True
    timer.start()
    start = time.monotonic()
    try:
        code = launcher.run()
    finally:
        timer.cancel()
        kill_all()
    elapsed = time.monotonic() - start
    assert elapsed < timeout, f"launcher overran {timeout}s:\n{out.getvalue()}"
    return code, out.getvalue(), elapsed, launcher


def worker_lines(output: str) -> dict[int, list[str]]:
    """Output lines of each worker, prefix removed."""
    lines: dict[int, list[str]] = {}
    for line in output.splitlines():
        m = re.match(r"\[worker (\d+)\] (.*)$", line)
        if m:
            lines.setdefault(int(m.group(1)), []).append(m.group(2))
    return lines


@pytest.fixture
def piddir(tmp_path):
    directory = tmp_path / "pids"
    directory.mkdir()
    try:
        yield directory
    finally:
        kill_pids(directory)


# --- TF_CONFIG and output ---------------------------------------------------


def test_each_worker_gets_its_own_tf_config():
    n = 3
    code, out, _, _ = launch(snippet('print("CFG " + os.environ["TF_CONFIG"])'), n)
    assert code == 0, out
    configs = {}
    for i, lines in worker_lines(out).items():
        (cfg,) = [json.loads(line[4:]) for line in lines if line.startswith("CFG ")]
        configs[i] = cfg
    assert sorted(configs) == list(range(n)), out
    cluster = configs[0]["cluster"]
    assert list(cluster) == ["worker"]
    addresses = cluster["worker"]
    assert len(addresses) == n
    ports = []
    for address in addresses:
        host, port = address.split(":")
        assert host == "127.0.0.1"
        ports.append(int(port))
    assert len(set(ports)) == n and all(1024 <= p < 65536 for p in ports)
    for i, cfg in configs.items():
        assert cfg["cluster"] == cluster, "all workers must see the same cluster"
        assert cfg["task"] == {"type": "worker", "index": i}
    # The launcher announces the same ports.
    assert f"ports {', '.join(map(str, ports))}:" in out


def test_output_lines_are_prefixed():
    command = snippet("""
        print(f"out {I}")
        print(f"err {I}", file=sys.stderr, flush=True)
        sys.stdout.write(f"tail {I}")  # no trailing newline
        """)
    code, out, _, _ = launch(command, 2)
    assert code == 0, out
    lines = out.splitlines()
    for i in range(2):
        for text in (f"out {i}", f"err {i}", f"tail {i}"):
            assert f"[worker {i}] {text}" in lines, out
    assert out.endswith("\n")
    # Every line is either the launcher's own or a prefixed worker line (the
    # "starting" line quotes the multi-line command: leave that out).
    assert shlex.join(command) in out
    for line in out.replace(shlex.join(command), "").splitlines():
        assert line.startswith("tfdp-launch: ") or re.match(r"\[worker [01]\] ", line), line
    assert "tfdp-launch: all 2 worker(s) finished" in lines


def test_lines_of_concurrent_workers_are_not_mixed():
    """Many long lines written at once by several workers stay whole."""
    n, count, width = 3, 300, 400
    code, out, _, _ = launch(snippet(f"""
        for j in range({count}):
            print(f"{{I}}:{{j}}:" + str(I) * {width})
        """), n)
    assert code == 0
    per_worker = worker_lines(out)
    assert sorted(per_worker) == list(range(n))
    for i, lines in per_worker.items():
        assert lines == [f"{i}:{j}:" + str(i) * width for j in range(count)]


# --- exit codes and stopping ------------------------------------------------


def test_all_succeed_exit_zero(piddir):
    code, out, _, launcher = launch(snippet(f"write_pid({str(piddir)!r})"), 2)
    assert code == 0, out
    assert [p.returncode for p in launcher.procs] == [0, 0]
    assert wait_gone(read_pids(piddir, 2), timeout=1.0) == []


def test_first_failure_code_and_others_stopped_after_grace(piddir):
    code, out, elapsed, launcher = launch(snippet(f"""
        write_pid({str(piddir)!r})
        if I == 1:
            sys.exit(7)
        time.sleep(60)
        """), 2, grace=0.5)
    assert code == 7, out
    assert elapsed < 10, f"worker 0 was not stopped: {elapsed:.1f}s"
    assert "worker 1 (pid" in out and "failed with exit code 7" in out
    assert "stopping the remaining workers (SIGTERM)" in out
    assert launcher.procs[0].returncode == -signal.SIGTERM
    # No orphans: both workers are gone once run() returns.
    assert [p for p in read_pids(piddir, 2) if alive(p)] == []


def test_others_may_finish_on_their_own_within_grace():
    code, out, elapsed, launcher = launch(snippet("""
        if I == 1:
            sys.exit(5)
        time.sleep(1.0)
        print("worker 0 finished by itself")
        """), 2, grace=8)
    assert code == 5, out
    assert "[worker 0] worker 0 finished by itself" in out
    assert "stopping the remaining workers" not in out
    assert launcher.procs[0].returncode == 0
    assert elapsed < 6


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_worker_killed_by_signal_maps_to_128_plus_signal(sig):
    code, out, _, _ = launch(snippet(f"""
        if {int(sig)} != signal.SIGKILL:
            signal.signal({int(sig)}, signal.SIG_DFL)
        if I == 0:
            os.kill(os.getpid(), {int(sig)})
        """), 2)
    assert code == 128 + sig, out
    assert f"failed with exit code {128 + sig}" in out


@pytest.mark.slow
def test_worker_ignoring_sigterm_is_killed(piddir):
    """After grace and a 10 s SIGTERM wait, SIGKILL: nothing is left running."""
    code, out, elapsed, launcher = launch(snippet(f"""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        write_pid({str(piddir)!r})
        if I == 1:
            sys.exit(4)
        time.sleep(60)
        """), 2, grace=0.2, timeout=30)
    assert code == 4, out
    assert "killing the remaining workers (SIGKILL)" in out
    assert launcher.procs[0].returncode == -signal.SIGKILL
    assert elapsed < 20
    assert [p for p in read_pids(piddir, 2) if alive(p)] == []


# --- the launcher itself is signalled ---------------------------------------


def start_launcher(piddir: Path, *flags: str) -> subprocess.Popen:
    """tfdp-launch with 2 workers that record their pid, then sleep 60 s."""
    command = snippet(f"write_pid({str(piddir)!r})\ntime.sleep(60)")
    return subprocess.Popen([str(LAUNCH), "--num_workers=2", *flags, "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_launcher_sigkilled_takes_its_workers_along(piddir):
    proc = start_launcher(piddir)
    try:
        pids = read_pids(piddir, 2)
        assert all(alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_gone(pids, timeout=10) == [], "PR_SET_PDEATHSIG did not kill the workers"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_launcher_sigterm_stops_workers(piddir):
    proc = start_launcher(piddir)
    try:
        pids = read_pids(piddir, 2)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
        assert time.monotonic() - start < 10
        assert "interrupted by signal 15; workers stopped" in stdout
        assert "Traceback" not in stderr
        assert wait_gone(pids, timeout=2) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


# --- CPU pinning ------------------------------------------------------------

THREAD_VARS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")

REPORT = """
print("CPUS " + json.dumps(sorted(os.sched_getaffinity(0))))
print("VARS " + json.dumps({k: os.environ.get(k) for k in %r}))
""" % (THREAD_VARS,)


def reports(out: str, prefix: str) -> dict[int, object]:
    return {i: json.loads(next(line[len(prefix):] for line in lines if line.startswith(prefix)))
            for i, lines in worker_lines(out).items()}


def test_cpu_threads_per_worker_pins_workers(monkeypatch):
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    cores = sorted(os.sched_getaffinity(0))
    n = 2
    code, out, _, _ = launch(snippet(REPORT), n, cpu_threads_per_worker=1)
    assert code == 0, out
    cpus, env = reports(out, "CPUS "), reports(out, "VARS ")
    assert sorted(cpus) == list(range(n))
    for i in range(n):
        assert len(cpus[i]) == 1 and cpus[i][0] in cores
        assert env[i] == {name: "1" for name in THREAD_VARS}
    if len(cores) < n:
        pytest.skip(f"{len(cores)} core(s) for {n} workers: cores are shared")
    assert len({c[0] for c in cpus.values()}) == n, "workers share a core"


def test_without_cpu_threads_workers_keep_all_cores(monkeypatch):
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    code, out, _, _ = launch(snippet(REPORT), 2)
    assert code == 0, out
    cores = sorted(os.sched_getaffinity(0))
    for i in range(2):
        assert reports(out, "CPUS ")[i] == cores
        assert reports(out, "VARS ")[i] == {name: None for name in THREAD_VARS}


def test_too_many_threads_warns_and_shares_cores(capsys):
    cores = sorted(os.sched_getaffinity(0))
    code, out, _, _ = launch(snippet(REPORT), 1, cpu_threads_per_worker=len(cores) + 1)
    assert code == 0, out
    assert "workers will share cores" in capsys.readouterr().err
    assert reports(out, "CPUS ")[0] == cores


# --- constructor and console-script errors ----------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_workers=0), "--num_workers=0 must be at least 1"),
    (dict(num_workers=2, cpu_threads_per_worker=-1), "--cpu_threads_per_worker=-1"),
    (dict(num_workers=2, command=[]), "no command to launch"),
])
def test_launcher_rejects_bad_arguments(kwargs, message):
    kwargs.setdefault("command", [sys.executable, "-c", "pass"])
    with pytest.raises(UserError, match=re.escape(message)):
        Launcher(**kwargs)


def test_missing_command_in_process_raises_user_error():
    launcher = Launcher(["tfdp-no-such-command", "--flag"], 2, out=io.StringIO())
    with pytest.raises(UserError, match="cannot start 'tfdp-no-such-command'"):
        launcher.run()
    assert launcher.procs == []


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tfdp-launch: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--num_workers=0", "--", sys.executable, "-c", "pass"],
                 ["--num_workers=0 must be at least 1"], id="zero_workers"),
    pytest.param(["--num_workers=2", "--"], ["no command to launch", "--"], id="empty_command"),
    pytest.param(["--num_workers=2"], ["no command to launch"], id="no_separator"),
    pytest.param(["--num_workers=2", "--", "tfdp-no-such-command", "--x=1"],
                 ["cannot start 'tfdp-no-such-command'", "No such file or directory"],
                 id="missing_command"),
    pytest.param(["--cpu_threads_per_worker=-1", "--", sys.executable, "-c", "pass"],
                 ["--cpu_threads_per_worker=-1", "negative"], id="negative_threads"),
])
def test_cli_errors(args, needles):
    assert_one_line_error(run_cli("tfdp-launch", *args, timeout=30), *needles)


def test_cli_passes_through_exit_code_and_output():
    proc = run_cli("tfdp-launch", "--num_workers=2", "--grace_seconds=1", "--",
                   *snippet("print(f'hello from {I}')\nsys.exit(3 if I == 1 else 0)"),
                   timeout=30)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "[worker 0] hello from 0" in proc.stdout.splitlines()
    assert "[worker 1] hello from 1" in proc.stdout.splitlines()
    assert "Traceback" not in proc.stderr


# --- known gaps (see the report) --------------------------------------------


def test_children_of_a_failed_worker_are_stopped(piddir):
    # The piddir fixture kills the grandchild (file pid_grandchild) afterwards.
    marker = piddir / "pid_grandchild"
    grandchild = ("import os, time\n"
                  f"open({str(piddir / '.tmp')!r}, 'w').write(str(os.getpid()))\n"
                  f"os.replace({str(piddir / '.tmp')!r}, {str(marker)!r})\n"
                  "time.sleep(60)")
    code, out, _, _ = launch(snippet(f"""
        import subprocess
        if I == 1:
            subprocess.Popen([sys.executable, "-c", {grandchild!r}],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not os.path.exists({str(marker)!r}):
                time.sleep(0.02)
            sys.exit(7)
        time.sleep(60)
        """), 2, grace=0.2)
    assert code == 7, out
    pid = int(marker.read_text())
    assert wait_gone([pid], timeout=2) == [], "a worker's child outlived the launcher"
