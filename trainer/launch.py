"""tfdp-launch: try a multi-worker job on one machine.

    tfdp-launch --num_workers=2 --cpu_threads_per_worker=1 -- tfdp-train --train_steps=200

starts two `tfdp-train` processes that train together through
MultiWorkerMirroredStrategy on loopback ports, streams their output as
`[worker i] ...`, and exits with the first failing worker's code.
"""


from absl import flags

from trainer import cli

flags.DEFINE_integer("num_workers", 2, "Worker processes to start on this machine.")
flags.DEFINE_integer("cpu_threads_per_worker", 0,
                     "Pin each worker to this many cores of its own and size TensorFlow's "
                     "thread pools to match; 0 leaves cores and threads to TensorFlow.")
flags.DEFINE_float("grace_seconds", 30.0,
                   "After a worker fails, how long the others get to stop by themselves "
                   "before they are terminated.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    from tfdp.launch import Launcher
    launcher = Launcher(argv[1:], FLAGS.num_workers, FLAGS.cpu_threads_per_worker,
                        FLAGS.grace_seconds)
    return launcher.run()


def run() -> None:
    cli.run(main, takes_args=True)


if __name__ == "__main__":
    run()
