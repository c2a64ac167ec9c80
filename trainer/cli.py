"""`app.run` with tfdp's error contract: a user's mistake is one line, exit 2."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from tfdp.errors import UserError

EXIT_USER_ERROR = 2


def _quiet_tensorflow() -> None:
    """Import TensorFlow without its C++ chatter (CUDA probes, oneDNN and XLA
    notes), which would bury tfdp's own output.

    TF 2.21 writes its start-up lines to stderr before its logger reads
    TF_CPP_MIN_LOG_LEVEL, so stderr points at /dev/null for the import alone;
    the variable (3: errors surface as Python exceptions) quiets the rest. A
    user who sets TF_CPP_MIN_LOG_LEVEL gets TensorFlow's own behaviour.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401  (an import error still raises below)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run(main, takes_args: bool = False) -> None:
    """Parse flags and call `main()`; print UserError as `prog: error: ...`.

    With `takes_args`, `main(argv)` gets the words after the flags (after
    `--`) and returns the exit code, and TensorFlow is not imported here.
    """
    prog = os.path.basename(sys.argv[0])
    # `--help` lists the flags of the main module, which for a console script
    # is the generated wrapper; show the ones tfdp defines in trainer/ there.
    for module, defined in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("trainer."):
            for flag in defined:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)  # tfdp prints its own progress
        try:
            if takes_args:
                sys.exit(main(argv))
            if len(argv) > 1:
                raise UserError(f"unexpected argument {argv[1]!r}; flags look like --name=value "
                                f"(see {prog} --help)")
            _quiet_tensorflow()
            main()
        except UserError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(getattr(err, "exit_code", EXIT_USER_ERROR))
        except OSError as err:  # unwritable model_dir, full disk, ...
            where = f": {err.filename}" if err.filename else ""
            print(f"{prog}: error: {err.strerror or err}{where}; check the path, its "
                  "permissions and free space", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            sys.exit(130)
    app.run(wrapped)
