"""Start an N-worker job on this machine: tfdp-launch's engine.

Each worker is the user's command (normally `tfdp-train ...`) with its own
TF_CONFIG naming all N workers on loopback ports picked free just before the
start, so MultiWorkerMirroredStrategy runs exactly as it would across hosts.
The launcher

  * prefixes every output line of worker i with `[worker i] `;
  * optionally pins worker i to its own CPU cores (--cpu_threads_per_worker),
    which is how one machine imitates several in tests and benchmarks;
  * returns the first non-zero exit code (0 when all succeed);
  * when one worker fails, gives the others `grace` seconds to stop on their
    own (they notice the lost peer: tfdp/watchdog.py), then SIGTERM, then
    SIGKILL, so nothing is left running;
  * forwards SIGINT/SIGTERM to the workers, and sets PR_SET_PDEATHSIG so the
    kernel kills them if the launcher itself is killed.

This module imports no TensorFlow: it only starts and watches processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from tfdp.errors import UserError

_PR_SET_PDEATHSIG = 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that nothing listens on right now.

    All sockets stay open until every port is chosen, so the kernel cannot
    hand out the same port twice; a port can still be taken by another
    program before a worker binds it (the worker then says so: cluster.py).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
    return ports


def tf_configs(ports: list[int], host: str = "127.0.0.1") -> list[str]:
    """One TF_CONFIG per worker: the same cluster, each its own task index."""
    cluster = {"worker": [f"{host}:{p}" for p in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(len(ports))]


def _cpu_sets(num_workers: int, threads: int) -> list[set[int]]:
    """Worker i gets `threads` cores of its own, wrapping when cores run out."""
    cores = sorted(os.sched_getaffinity(0))
    if threads * num_workers > len(cores):
        print(f"tfdp-launch: warning: {num_workers} workers x {threads} threads exceeds "
              f"the {len(cores)} cores available; workers will share cores", file=sys.stderr)
    return [{cores[(i * threads + j) % len(cores)] for j in range(threads)}
            for i in range(num_workers)]


def _child_setup(cpus: set[int] | None):
    """Runs in each worker between fork and exec."""
    def setup():
        try:  # Die with the launcher, even if it is SIGKILLed (Linux only).
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    """Copy a worker's output to `out`, one prefixed line at a time."""
    for line in iter(stream.readline, b""):
        text = line.decode("utf-8", errors="replace")
        with lock:
            out.write(prefix + text if text.endswith("\n") else prefix + text + "\n")
            out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    """Shell convention: a worker killed by signal S exits 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    """Runs `command` as `num_workers` cooperating workers; see the module doc."""

    def __init__(self, command: list[str], num_workers: int, cpu_threads_per_worker: int = 0,
                 grace: float = 30.0, out=None):
        if num_workers < 1:
            raise UserError(f"--num_workers={num_workers} must be at least 1")
        if cpu_threads_per_worker < 0:
            raise UserError(f"--cpu_threads_per_worker={cpu_threads_per_worker} must not be "
                            "negative (0 leaves threads and cores to TensorFlow)")
        if not command:
            raise UserError("no command to launch; put it after --, e.g. "
                            "tfdp-launch --num_workers=2 -- tfdp-train --train_steps=100")
        self.command, self.num_workers = command, num_workers
        self.threads, self.grace = cpu_threads_per_worker, grace
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []

    def say(self, message: str) -> None:
        with self.lock:
            self.out.write(f"tfdp-launch: {message}\n")
            self.out.flush()

    def _env(self, tf_config: str) -> dict:
        env = {**os.environ, "TF_CONFIG": tf_config, "PYTHONUNBUFFERED": "1"}
        # The command's tfdp-train is found beside this tfdp-launch, so
        # `.venv/bin/tfdp-launch -- tfdp-train` works without activating .venv.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        if self.threads:
            # TensorFlow sizes its thread pools from these (process_util.cc).
            for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
                env[name] = str(self.threads)
        return env

    def start(self) -> None:
        ports = free_ports(self.num_workers)
        cpus = (_cpu_sets(self.num_workers, self.threads) if self.threads
                else [None] * self.num_workers)
        self.say(f"starting {self.num_workers} worker(s) on 127.0.0.1 ports "
                 f"{', '.join(map(str, ports))}: {shlex.join(self.command)}")
        self.pumps = []
        for i, tf_config in enumerate(tf_configs(ports)):
            try:
                proc = subprocess.Popen(self.command, env=self._env(tf_config),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_child_setup(cpus[i]))
            except OSError as err:
                self.stop(signal.SIGKILL)
                raise UserError(f"cannot start {self.command[0]!r} ({err.strerror}); check "
                                "the command after -- (is the virtualenv active?)") from None
            self.procs.append(proc)
            self.say(f"worker {i} is pid {proc.pid}")
            pump = threading.Thread(target=_pump, args=(proc.stdout, f"[worker {i}] ",
                                                        self.out, self.lock), daemon=True)
            pump.start()
            self.pumps.append(pump)

    def stop(self, sig: int) -> None:
        """Send `sig` to every worker's process group: the worker and anything
        it started, which may outlive a worker that has already exited."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def _wait_all(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.procs):
                return True
            time.sleep(0.1)
        return all(p.poll() is not None for p in self.procs)

    def _shut_down(self) -> None:
        """Let the others stop by themselves, then SIGTERM, then SIGKILL."""
        if self._wait_all(time.monotonic() + self.grace):
            return
        self.say("stopping the remaining workers (SIGTERM)")
        self.stop(signal.SIGTERM)
        if not self._wait_all(time.monotonic() + 10.0):
            self.say("killing the remaining workers (SIGKILL)")
            self.stop(signal.SIGKILL)
            self._wait_all(time.monotonic() + 10.0)

    def run(self) -> int:
        """Start the workers, wait for them; return the job's exit code."""
        interrupted: list[int] = []

        def forward(signum, _frame):
            interrupted.append(signum)
            self.stop(signal.SIGTERM)
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            first_failure = None
            while first_failure is None and not interrupted:
                codes = [p.poll() for p in self.procs]
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    first_failure = failed[0]
                elif all(c == 0 for c in codes):
                    break
                else:
                    time.sleep(0.1)
            if first_failure is not None:
                code = _exit_code(self.procs[first_failure].returncode)
                self.say(f"worker {first_failure} (pid {self.procs[first_failure].pid}) "
                         f"failed with exit code {code}; stopping the job")
            self._shut_down()
        finally:
            self.stop(signal.SIGKILL)  # whatever is left, workers' children included
            self._wait_all(time.monotonic() + 10.0)
            for pump in getattr(self, "pumps", []):
                pump.join(timeout=5.0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if interrupted:
            # Workers that stopped cleanly on SIGTERM (tfdp-train: 75, after a
            # checkpoint) report their own code.
            codes = [_exit_code(p.returncode) for p in self.procs if p.returncode]
            self.say(f"interrupted by signal {interrupted[0]}; workers stopped")
            return codes[0] if codes else 128 + interrupted[0]
        if first_failure is not None:
            return code
        self.say(f"all {self.num_workers} worker(s) finished")
        return 0
