"""SIGTERM during training: stop at the next step, and be gone within the grace.

Kubernetes and SLURM send SIGTERM, wait a grace period, then SIGKILL. The
training loop asks `PreemptionGuard.requested` before each call into
TensorFlow and passes it into the step's all-reduce (tfdp/step.py), so every
worker stops after the same step and checkpoints it (tfdp/runner.py). The
guard's other job is the deadline: --preemption_grace_seconds after SIGTERM
the process exits with status 75 (--preempted_exit_code) whatever it is
doing, saying where a resume will start.

Python runs signal handlers only on the main thread, between bytecodes; a
main thread blocked inside a TensorFlow step (a hung collective, a stuck
device) would never run one. So the signal also reaches a helper thread
through `signal.set_wakeup_fd`, which the C-level handler writes to at once,
and that thread starts the deadline.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from tfdp.errors import Preempted


class PreemptionGuard:
    """Context manager; install it on the main thread around training."""

    def __init__(self, grace_seconds: float, resume_point, before_exit=None,
                 exit_code: int = Preempted.exit_code):
        """`resume_point()` names where a resume would start (for the last
        message); `before_exit()` runs just before a forced exit with
        `exit_code`."""
        self.grace_seconds, self.resume_point = grace_seconds, resume_point
        self.exit_code = exit_code
        self.before_exit = before_exit
        self.requested = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._installed = False

    def __enter__(self) -> "PreemptionGuard":
        try:
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._start())
        except ValueError:  # not the main thread: leave signals to the caller
            return self
        self._installed = True
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        self._previous_wakeup = signal.set_wakeup_fd(write_fd)
        self._reader = threading.Thread(target=self._read, name="tfdp-sigterm", daemon=True)
        self._reader.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        # Training finished: the run ends normally (metrics, sample). After an
        # exception (Preempted, ...) the deadline stays: the process is on its
        # way out, and a teardown that hangs (a dead peer) must not outlive it.
        if self._timer is not None and exc_type is None:
            self._timer.cancel()
        if not self._installed:
            return
        signal.set_wakeup_fd(self._previous_wakeup)
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None
                      else signal.SIG_DFL)
        os.write(self._write_fd, b"\0")  # wakes the reader, which then ends
        self._reader.join(timeout=5)
        os.close(self._write_fd)
        os.close(self._read_fd)

    def _read(self) -> None:
        while True:
            data = os.read(self._read_fd, 64)
            if not data or 0 in data:
                return
            if signal.SIGTERM in data:
                self._start()

    def _start(self) -> None:
        with self._lock:
            self.requested = True
            if self._timer is None:
                self._timer = threading.Timer(self.grace_seconds, self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        print(f"{os.path.basename(sys.argv[0])}: error: stopped by SIGTERM: not done within "
              f"--preemption_grace_seconds={self.grace_seconds:g}; running the same command "
              f"again resumes from {self.resume_point()}", file=sys.stderr, flush=True)
        if self.before_exit is not None:
            self.before_exit()
        os._exit(self.exit_code)
