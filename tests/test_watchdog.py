"""tfdp/watchdog.py: `peer_failure`'s reading of TensorFlow's error text, and `_name`.

`peer_failure` turns a collective's failure into one ClusterError line that
names the lost peer(s) by job, index and address, taken from task names like
/job:worker/replica:0/task:1 in the error; the tfdp watchdog's own abort
reason wins; this worker itself is never named; anything that is not a
collective failure (or no cluster at all) gives None. The watchdog here is a
stand-in holding a resolver and a timeout; no thread and no cluster run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tensorflow as tf

from tfdp import watchdog
from tfdp.errors import ClusterError
from tfdp.watchdog import _name, peer_failure

CLUSTER = {"chief": ["c0:1000"], "worker": ["w0:2000", "w1:2001", "w2:2002", "w3:2003"]}
TAIL = ("; the job stops (collective timeout 45s). Check that worker's log, then relaunch "
        "the same command: training resumes from the last checkpoint")


def _resolver(task_type="worker", task_id=0):
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(CLUSTER), task_type=task_type, task_id=task_id)


@pytest.fixture
def cluster(monkeypatch):
    """This process is worker 0 of CLUSTER, with --collective_timeout=45."""
    def install(task_type="worker", task_id=0, timeout=45.0):
        monkeypatch.setattr(watchdog, "_WATCHDOG",
                            SimpleNamespace(resolver=_resolver(task_type, task_id),
                                            timeout=timeout))
    install()
    return install


def _message(err):
    lost = peer_failure(err)
    assert isinstance(lost, ClusterError), f"not recognised: {err!r}"
    assert lost.exit_code == 3
    return str(lost)


def test_name():
    assert _name("worker", 2, "w2:2002") == "worker 2 (w2:2002)"
    assert _name("chief", 0, "10.0.0.1:8888") == "chief 0 (10.0.0.1:8888)"


def test_unavailable_names_the_lost_worker(cluster):
    err = tf.errors.UnavailableError(None, None, (
        "Collective ops is aborted by: failed to connect to all addresses\n"
        "The error could be from a previous operation. Restart your program to reset.\n"
        "Additional GRPC error information from remote target "
        "/job:worker/replica:0/task:1:"))
    assert _message(err) == "lost contact with worker 1 (w1:2001)" + TAIL


def test_lost_task_heartbeat_from_the_coordination_service(cluster):
    err = tf.errors.UnavailableError(None, None, (
        "Task /job:worker/replica:0/task:2 heartbeat timeout. This indicates that the "
        "remote task has failed, got preempted, or crashed unexpectedly."))
    assert _message(err).startswith("lost contact with worker 2 (w2:2002);")


def test_chief_is_named_as_chief(cluster):
    err = tf.errors.UnavailableError(None, None, "Socket closed: /job:chief/replica:0/task:0")
    assert _message(err).startswith("lost contact with chief 0 (c0:1000);")


def test_task_name_without_replica(cluster):
    err = tf.errors.UnavailableError(None, None, "peer /job:worker/task:3 is unreachable")
    assert _message(err).startswith("lost contact with worker 3 (w3:2003);")


def test_own_task_is_never_named(cluster):
    # This worker (worker 0) appears in the text too: only the peer is named.
    err = tf.errors.UnavailableError(None, None, (
        "from /job:worker/replica:0/task:0: collective with /job:worker/replica:0/task:1 "
        "failed"))
    assert _message(err).startswith("lost contact with worker 1 (w1:2001);")


def test_own_task_depends_on_who_this_is(cluster):
    cluster(task_type="worker", task_id=1)
    err = tf.errors.UnavailableError(None, None, (
        "from /job:worker/replica:0/task:0: collective with /job:worker/replica:0/task:1 "
        "failed"))
    assert _message(err).startswith("lost contact with worker 0 (w0:2000);")


def test_several_peers_are_listed_once_each_in_order(cluster):
    err = tf.errors.UnavailableError(None, None, (
        "/job:worker/replica:0/task:3 and /job:chief/replica:0/task:0 and "
        "/job:worker/replica:0/task:2 and again /job:worker/replica:0/task:3"))
    assert _message(err).startswith(
        "lost contact with chief 0 (c0:1000), worker 2 (w2:2002), "
        "worker 3 (w3:2003);")


def test_tasks_outside_the_cluster_are_ignored(cluster):
    # Index past the end, and a job this cluster does not have (ps): neither is
    # named, so the message falls back to the error's first line.
    err = tf.errors.UnavailableError(None, None, (
        "Collective failed at /job:worker/replica:0/task:9 and /job:ps/replica:0/task:0\n"
        "second line"))
    assert _message(err) == ("a collective operation failed (Collective failed at "
                             "/job:worker/replica:0/task:9 and /job:ps/replica:0/task:0)" + TAIL)


def test_no_task_named_quotes_the_first_line_truncated(cluster):
    long = "x" * 300
    err = tf.errors.UnavailableError(None, None, f"  \n{long}\nmore detail\n")
    assert _message(err) == f"a collective operation failed ({'x' * 200})" + TAIL


def test_watchdog_abort_reason_wins(cluster):
    err = tf.errors.UnavailableError(None, None, (
        "Collective ops is aborted by: tfdp watchdog: worker 1 (w1:2001) stopped answering "
        "for --collective_timeout=45s\nThe error could be from a previous operation. "
        "/job:worker/replica:0/task:2"))
    assert _message(err) == ("worker 1 (w1:2001) stopped answering for "
                             "--collective_timeout=45s" + TAIL)


def test_timeout_in_the_message_is_the_watchdogs(cluster):
    cluster(timeout=600.0)
    err = tf.errors.UnavailableError(None, None, "/job:worker/replica:0/task:1 gone")
    assert "(collective timeout 600s)" in _message(err)
    cluster(timeout=7.5)
    assert "(collective timeout 7.5s)" in _message(err)


@pytest.mark.parametrize("kind", [tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                                  tf.errors.CancelledError, tf.errors.InternalError])
def test_other_failure_kinds_count_when_the_text_is_about_a_collective(cluster, kind):
    err = kind(None, None, ("Collective ops is aborted by: Deadline Exceeded waiting for "
                            "/job:worker/replica:0/task:1"))
    assert _message(err).startswith("lost contact with worker 1 (w1:2001);")


@pytest.mark.parametrize("kind", [tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                                  tf.errors.CancelledError, tf.errors.InternalError])
def test_other_failure_kinds_without_a_collective_are_not_peer_failures(cluster, kind):
    # Only UnavailableError counts without the word "collective" in it.
    err = kind(None, None, "Deadline Exceeded reading /job:worker/replica:0/task:1's file")
    assert peer_failure(err) is None


def test_lowercase_collective_is_recognised(cluster):
    err = tf.errors.DeadlineExceededError(None, None, "a collective on /job:worker/task:2 hung")
    assert _message(err).startswith("lost contact with worker 2 (w2:2002);")


@pytest.mark.parametrize("err", [
    tf.errors.InvalidArgumentError(None, None, "Collective ops shape mismatch "
                                   "/job:worker/replica:0/task:1"),
    tf.errors.ResourceExhaustedError(None, None, "OOM in collective on "
                                     "/job:worker/replica:0/task:1"),
    tf.errors.NotFoundError(None, None, "no such file"),
    ValueError("collective /job:worker/replica:0/task:1"),
    KeyError("x"),
])
def test_unrelated_errors_give_none(cluster, err):
    assert peer_failure(err) is None


def test_without_a_cluster_nothing_is_a_peer_failure(monkeypatch):
    monkeypatch.setattr(watchdog, "_WATCHDOG", None)
    err = tf.errors.UnavailableError(None, None, "collective /job:worker/replica:0/task:1")
    assert peer_failure(err) is None


@pytest.mark.parametrize("text", ["", "  \n  "])
def test_blank_unavailable_message_still_gives_one_line(cluster, text):
    assert _message(tf.errors.UnavailableError(None, None, text)).startswith(
        "a collective operation failed (")
