"""What a checkpoint holds, saving it, and resuming from the newest
readable one, the same one on every worker.

Checkpoints are written by tf.train.CheckpointManager: TensorFlow writes
into `ckpt-N_temp/` and renames the finished files to `ckpt-N.*`, and the
`checkpoint` state file naming the latest is rewritten (via a temporary
name) only after that, so a crash mid-write never leaves a "latest" that
cannot be read. The chief writes into model_dir, other workers into
scratch directories (tfdp/training.py).
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import tensorflow as tf

from tfdp.cluster import num_tasks
from tfdp.errors import UserError

SUM = tf.distribute.ReduceOp.SUM


def make_checkpoint(parts: dict, model, optimizer, input_pipelines: int,
                    loss_scale) -> tf.train.Checkpoint:
    """Everything that decides the rest of training, so a resumed run goes on
    exactly as an uninterrupted one would:

    - `parts`: the weights, as the task names them (tfdp.tasks.Task.
      checkpoint_parts: `backbone`, and a classifier's `head`);
    - optimizer: Adam moments and `iterations`, the step counter, from which
      the learning-rate schedule and the data position follow;
    - rng: the dropout layers' seed-generator states (keras-hub's backbone
      does not track them, so they would restart from their initial values);
    - nonfinite_steps: updates skipped so far under --skip_nonfinite_steps;
    - input_pipelines: how many pipelines read the data when it was written
      (with whole shard files per worker the data order depends on it);
    - loss_scale: the fp16 dynamic loss scale (tfdp.loss_scale, built in
      the strategy scope). It is in every checkpoint, used or not, so that
      a run may change --mixed_precision when it resumes. Checkpoints
      written before tfdp kept it resume with the initial scale
      (restore_newest_readable).
    """
    rng = {f"seed_{i}": v for i, v in enumerate(model.non_trainable_variables)
           if "seed_generator_state" in v.path}
    return tf.train.Checkpoint(
        **parts, optimizer=optimizer, rng=rng, loss_scale=loss_scale,
        nonfinite_steps=tf.Variable(0, dtype=tf.int64, trainable=False),
        input_pipelines=tf.Variable(input_pipelines, dtype=tf.int64, trainable=False))


def save(manager: tf.train.CheckpointManager, step: int) -> None:
    """Save the checkpoint of `step`; a failing write (full disk, lost
    permissions) becomes one clear error, leaving the earlier checkpoints
    and the `checkpoint` state file as they were."""
    try:
        manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as err:
        text = getattr(err, "message", None) or str(err)
        # TensorFlow's message ends "...: <path>.tempstate123; File too large [Op:SaveV2]".
        reason = re.sub(r"\s*\[Op:\w+\]$", "", text.strip().splitlines()[-1].split("; ")[-1]
                        )[:160] if text.strip() else ""
        for partial in glob.glob(os.path.join(manager.directory, f"ckpt-{step}_temp*")):
            shutil.rmtree(partial, ignore_errors=True)
        latest = manager.latest_checkpoint
        kept = (f"resuming will start from {os.path.basename(latest)}" if latest
                else "no earlier checkpoint exists")
        raise UserError(f"could not save the checkpoint of step {step} in {manager.directory} "
                        f"({reason or type(err).__name__}); {kept}: free space or fix the "
                        "permissions, then run the same command again") from None


# Parts added to make_checkpoint after checkpoints were first written:
# older checkpoints lack them, and they keep their initial values.
_ADDED_LATER = ("loss_scale",)
_PARTS = ("backbone", "head", "optimizer", "rng", "nonfinite_steps",
          "input_pipelines") + _ADDED_LATER


def _restorable(checkpoint: tf.train.Checkpoint, path: str) -> tf.train.Checkpoint:
    """`checkpoint`, less the later-added parts that the file at `path` lacks."""
    present = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
    missing = [part for part in _ADDED_LATER if part not in present]
    if not missing:
        return checkpoint
    return tf.train.Checkpoint(**{part: getattr(checkpoint, part) for part in _PARTS
                                  if part not in missing and hasattr(checkpoint, part)})


def checkpoint_paths(directory: str) -> list[str]:
    """The checkpoints the `checkpoint` state file of `directory` lists, oldest
    first (absolute paths); [] when there is none."""
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return []
    return list(state.all_model_checkpoint_paths) or (
        [state.model_checkpoint_path] if state.model_checkpoint_path else [])


def restore_newest(checkpoint: tf.train.Checkpoint, directory: str, say, partial: bool = False,
                   fix: str = "move that model_dir aside and start a new run") -> str | None:
    """Restore into `checkpoint` the newest checkpoint of `directory` that
    reads back whole and return its path (None: there is none). A truncated
    or corrupt newer one (a crash mid-write, a full disk) is skipped with a
    `say` warning and its files stay for inspection; when none reads, one
    UserError naming `directory` and `fix`. With `partial`, `checkpoint`
    names only some of what was saved (a reader's weights, no optimizer).

    The one fallback every checkpoint reader uses: resuming training
    (restore_newest_readable) and tfdp.restore (generate, eval, export,
    fine-tuning)."""
    paths = checkpoint_paths(directory)
    for i, path in enumerate(reversed(paths)):
        try:
            if partial:
                checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
            else:
                _restorable(checkpoint, path).restore(path).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError, IndexError, OSError) as err:
            text = str(err).strip()
            reason = text.splitlines()[0][:160] if text else type(err).__name__
            say(f"warning: checkpoint {path} is unreadable ({reason}); "
                + ("trying the previous one" if i + 1 < len(paths) else "none is left"))
            continue
        return path
    if paths:
        raise UserError(f"no checkpoint in {directory} can be read ({len(paths)} tried); {fix}")
    return None


def restore_newest_readable(checkpoint: tf.train.Checkpoint, directory: str, say) -> None:
    """Resume training: restore the newest readable checkpoint of `directory`
    (restore_newest) and say which; nothing when there is none yet."""
    path = restore_newest(checkpoint, directory, say)
    if path is not None:
        say(f"resumed from step {int(checkpoint.optimizer.iterations.numpy())} ({path})")


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
