"""The join watchdog: bounds how long a worker waits for its peers to arrive.

While MultiWorkerMirroredStrategy joins the cluster, TensorFlow blocks in C++
holding Python's GIL, so no Python thread can time it out (checked on TF
2.21: a ticking thread stops ticking). This tiny separate process does it:
it waits for one line ("joined") or EOF (the worker exited) on stdin; after
`timeout` seconds without either it names the peers whose ports do not
answer, and kills the worker (whose exit status is then 137).

    python -m tfdp.joinwatch PID TIMEOUT PROG '[["worker 1", "host:port"], ...]'
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys


def listening(address: str) -> bool:
    """True when something accepts TCP connections at "host:port"."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2.0):
            return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    pid, timeout, prog, peers = int(argv[1]), float(argv[2]), argv[3], json.loads(argv[4])
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if ready:
        return 0  # joined, or the worker is gone
    missing = [f"{name} ({address})" for name, address in peers if not listening(address)]
    print(f"{prog}: error: {', '.join(missing) or 'a worker'} did not join within "
          f"--collective_timeout={timeout:g}s; start every task of the cluster (same cluster "
          "list, each its own task index) or raise --collective_timeout",
          file=sys.stderr, flush=True)
    os.kill(pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
