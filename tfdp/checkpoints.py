"""Resuming from model_dir/checkpoints: the newest readable checkpoint, the
same one on every worker.

Checkpoints themselves are written by tf.train.CheckpointManager (index and
data files first, the `checkpoint` state file last), by the chief into
model_dir and by other workers into scratch directories (tfdp/run.py).
"""

from __future__ import annotations

import tensorflow as tf

from tfdp.cluster import num_tasks
from tfdp.errors import UserError

SUM = tf.distribute.ReduceOp.SUM


def restore_newest_readable(checkpoint: tf.train.Checkpoint, directory: str, say) -> None:
    """Restore the newest checkpoint that reads back whole; a truncated or
    corrupt newer one (a crash mid-write, a full disk) is skipped with a
    warning, and the files stay for inspection."""
    state = tf.train.get_checkpoint_state(directory)
    paths = list(state.all_model_checkpoint_paths) if state else []
    for i, path in enumerate(reversed(paths)):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError, IndexError, OSError) as err:
            text = str(err).strip()
            reason = text.splitlines()[0][:160] if text else type(err).__name__
            say(f"warning: checkpoint {path} is unreadable ({reason}); "
                + ("trying the previous one" if i + 1 < len(paths) else "none is left"))
            continue
        say(f"resumed from step {int(checkpoint.optimizer.iterations.numpy())} ({path})")
        return
    if paths:
        raise UserError(f"no checkpoint in {directory} can be read; move that model_dir "
                        "aside and start a new run")


def check_same_step(strategy, iterations) -> None:
    """Every worker must resume from the same step, which needs a model_dir
    that all of them read (a shared file system); refuse when they differ.

    Steps x_i of n replicas are all equal iff n * sum(x_i^2) == (sum x_i)^2.
    """
    if num_tasks(getattr(strategy, "cluster_resolver", None)) <= 1:
        return

    def moments():
        step = tf.cast(iterations, tf.float64)
        return tf.distribute.get_replica_context().all_reduce(SUM, [step, step * step])
    total, squares = (strategy.experimental_local_results(v)[0]
                      for v in tf.function(lambda: strategy.run(moments))())
    n = strategy.num_replicas_in_sync
    if float(total) ** 2 != n * float(squares):
        raise UserError(f"the workers found different checkpoints in --model_dir (this one: "
                        f"step {int(iterations.numpy())}); model_dir must be on a file system "
                        "that every worker reads (NFS, a cloud bucket, ...)")
