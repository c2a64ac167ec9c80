"""`app.run` with tfdp's error contract: a user's mistake is one line, exit 2."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

from absl import app, flags, logging

from tfdp.errors import UserError

EXIT_USER_ERROR = 2


class _QuietTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports TensorFlow, when a command first needs it, without its C++
    chatter (CUDA probes, oneDNN and XLA notes), which would bury tfdp's own
    output; a command that never needs it (a bad flag, tfdp-plan, tfdp-launch)
    never pays the seconds its import takes.

    TF 2.21 writes its start-up lines to stderr before its logger reads
    TF_CPP_MIN_LOG_LEVEL, so stderr points at /dev/null while the
    `tensorflow` package itself loads; the variable (3: errors surface as
    Python exceptions) quiets the rest. A user who sets TF_CPP_MIN_LOG_LEVEL
    gets TensorFlow's own behaviour (this finder is not installed).
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.util.find_spec(name)
        if spec is not None:
            self.inner, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.inner
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            self.inner.exec_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def _quiet_tensorflow() -> None:
    """Install _QuietTensorFlow, unless the user set TF_CPP_MIN_LOG_LEVEL."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.meta_path.insert(0, _QuietTensorFlow())


def run(main, takes_args: bool = False) -> None:
    """Parse flags and call `main()`; print UserError as `prog: error: ...`.

    With `takes_args`, `main(argv)` gets the words after the flags (after
    `--`) and returns the exit code. TensorFlow loads (quietly) only when
    `main` first imports it.
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
