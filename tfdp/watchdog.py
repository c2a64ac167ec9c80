"""No hangs: a worker that dies, freezes or never arrives stops the others.

Within --collective_timeout seconds, with a message naming it:

  * joining: a watchdog process (tfdp/joinwatch.py) gives the strategy's
    start-up rendezvous that long, then names the workers whose ports do
    not answer and ends this one;
  * dead or frozen peers during training: the coordination service's
    heartbeat timeout (tfdp/cluster.py) or the refused gRPC connection
    aborts the collectives, and `peer_failure` turns TensorFlow's error into
    one line;
  * a peer alive but stuck (e.g. a hung filesystem): a watchdog thread sees
    no step finish for that long and aborts the collectives itself.

Why not CommunicationOptions(timeout_seconds=...)? TensorFlow starts one
thread per collective that sleeps for the whole timeout: measured here,
15,000 threads after 30 s of a small model's steps with a 60 s timeout, and
10% fewer steps. A single watchdog thread gives the same bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import tensorflow as tf
from tensorflow.python.eager import context

from tfdp.cluster import tasks
from tfdp.errors import ClusterError


def _name(job: str, index: int, address: str) -> str:
    return f"{job} {index} ({address})"


def join_watchdog(resolver, timeout: float) -> subprocess.Popen:
    """Start the process that bounds the cluster join (tfdp/joinwatch.py);
    write a line to its stdin once joined."""
    own = (resolver.task_type, resolver.task_id)
    peers = [[f"{job} {i}", address] for job, i, address in tasks(resolver)
             if (job, i) != own]
    return subprocess.Popen(
        [sys.executable, "-m", "tfdp.joinwatch", str(os.getpid()), str(timeout),
         os.path.basename(sys.argv[0]), json.dumps(peers)], stdin=subprocess.PIPE)


class Watchdog:
    """Stops this worker when training makes no progress for `timeout` seconds.

    Active only inside `watching()` blocks, which the training loop wraps
    around its steps and validation, calling `beat()` after each; local
    work between them (preparing data, compiling, writing samples) is not
    timed. TensorFlow releases the GIL while a step runs, so this thread
    can act while the main thread waits in a collective.
    """

    def __init__(self, resolver, timeout: float):
        self.resolver, self.timeout = resolver, timeout
        self.last, self.active = time.monotonic(), False
        self.thread = threading.Thread(target=self._watch, daemon=True, name="tfdp-watchdog")
        self.thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def watching(self):
        self.beat()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _watch(self) -> None:
        own = (self.resolver.task_type, self.resolver.task_id)
        while True:
            time.sleep(1.0)
            if not self.active or time.monotonic() - self.last < self.timeout:
                continue
            silent = [_name(*t) for t in tasks(self.resolver)
                      if t[:2] != own and not _peer_healthy(t[0], t[1])]
            reason = (f"{', '.join(silent)} stopped answering" if silent else
                      "no step finished (every worker still answers: one is stuck)")
            context.context().abort_collective_ops(
                tf.errors.UNAVAILABLE,
                f"tfdp watchdog: {reason} for --collective_timeout={self.timeout:g}s")
            # The main thread raises and exits now, unless it is stuck outside
            # a collective; then end the process from here.
            time.sleep(30.0)
            _die(f"{reason} for --collective_timeout={self.timeout:g}s; relaunch the job "
                 "(training resumes from the last checkpoint)")


# The watchdog of this process's multi-worker strategy (one per process, like
# the cluster it watches); None when training on one machine.
_WATCHDOG: Watchdog | None = None


def start_watchdog(resolver, timeout: float) -> Watchdog:
    global _WATCHDOG
    _WATCHDOG = Watchdog(resolver, timeout)
    return _WATCHDOG


def watching():
    """Context for the loop's collective phases; a no-op on one machine."""
    return _WATCHDOG.watching() if _WATCHDOG else contextlib.nullcontext()


def beat() -> None:
    if _WATCHDOG:
        _WATCHDOG.beat()


def _peer_healthy(job: str, index: int) -> bool:
    try:
        context.context().check_collective_ops_peer_health(
            f"/job:{job}/replica:0/task:{index}", timeout_in_ms=5000)
        return True
    except tf.errors.OpError:
        return False


def _die(message: str) -> None:
    """Exit from a watchdog thread: the main thread may be blocked in C++."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(ClusterError.exit_code)


_TASK = re.compile(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)")
_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
             tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.InternalError)


def peer_failure(err: Exception) -> ClusterError | None:
    """The one-line ClusterError for a collective that failed because of a
    peer, or None when `err` is something else (or there is no cluster)."""
    if _WATCHDOG is None or not isinstance(err, _FAILURES):
        return None
    resolver, timeout = _WATCHDOG.resolver, _WATCHDOG.timeout
    text = str(err)
    if "ollective" not in text and not isinstance(err, tf.errors.UnavailableError):
        return None
    own = (resolver.task_type, resolver.task_id)
    named = {(m.group(1), int(m.group(2))) for m in _TASK.finditer(text)} - {own}
    spec = resolver.cluster_spec().as_dict()
    peers = [_name(job, i, spec[job][i]) for job, i in sorted(named)
             if job in spec and i < len(spec[job])]
    watchdog = re.search(r"tfdp watchdog: ([^\n]*)", text)
    if watchdog:
        what = watchdog.group(1)
    elif peers:
        what = f"lost contact with {', '.join(peers)}"
    else:
        first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
        what = f"a collective operation failed ({first})"
    return ClusterError(f"{what}; the job stops (collective timeout {timeout:g}s). Check that "
                        "worker's log, then relaunch the same command: training resumes from "
                        "the last checkpoint")


def run_job(chief: bool, chief_dir: str, job, log, live):
    """`job(write_dir, say, live)` as this worker runs it: the chief writes in
    `chief_dir` and speaks through `log`; the other workers of a multi-worker
    job run the same program silently, writing only to a private scratch
    directory removed at the end. A collective that failed because of a peer
    becomes its one-line ClusterError (peer_failure), not a traceback."""
    try:
        if chief:
            return job(chief_dir, log, live)
        scratch = tempfile.mkdtemp(prefix="tfdp-worker-")
        try:
            return job(scratch, lambda *_: None, None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except tf.errors.OpError as err:
        lost = peer_failure(err)
        if lost is None:
            raise
        raise lost from None
