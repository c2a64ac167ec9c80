"""tfdp-preflight: check a cluster before the long job (every worker joins,
runs the same code, sums exactly and computes the update one replica would);
run it exactly as training will run. Exit 0 when all pass, 1 when any fails."""

import sys

from absl import flags

from trainer import cli
from trainer.flags import FLAGS, define_cluster_flags, define_strategy_flags

flags.DEFINE_float("allreduce_mb", 64.0,
                   "Megabytes per replica in the timed all-reduce (about the gradients of "
                   "a 16M-parameter model).")
define_strategy_flags()
define_cluster_flags()


def main() -> None:
    from tfdp.errors import UserError
    from tfdp.preflight import run_preflight

    if FLAGS.allreduce_mb <= 0:
        raise UserError(f"--allreduce_mb={FLAGS.allreduce_mb} must be positive, e.g. 64")
    ok = run_preflight(FLAGS.strategy, FLAGS.num_cpu_replicas, FLAGS.collective_timeout,
                       FLAGS.slurm_port_base, FLAGS.allreduce_mb, collective=FLAGS.collective,
                       allow_cpu=FLAGS.allow_cpu)
    sys.exit(0 if ok else 1)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
