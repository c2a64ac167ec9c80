"""tfdp-train: train (or resume) a GPT with data parallelism.

With no flags: a small byte-level GPT on this interpreter's standard
library, on 2 replicas, in about five minutes on a 2-core CPU.
"""

import sys

from trainer import cli
from trainer.flags import FLAGS, config_from_flags, define_train_flags

define_train_flags()


def main() -> None:
    cfg = config_from_flags().validate()  # a bad value fails before TensorFlow loads
    from tfdp.callbacks import from_factories
    from tfdp.training import train  # imported after flag parsing: TensorFlow is slow to load
    # A terminal gets a progress bar redrawn in place; logs and pipes get lines.
    train(cfg, callbacks=from_factories(FLAGS.callbacks),
          live=sys.stdout if sys.stdout.isatty() else None)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
