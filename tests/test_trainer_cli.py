"""trainer/cli.py: the entry points' error contract and TensorFlow's quiet,
lazy start-up.

A bad flag value must end the command with one line and exit 2 before
TensorFlow is imported (it takes seconds); a command that does import it
must not show TensorFlow's C++ start-up chatter. Each case runs the entry
point's `run()` in a fresh interpreter that reports at exit whether
TensorFlow was imported, with TF_CPP_MIN_LOG_LEVEL removed from its
environment as a user's shell would have it (conftest.run_cli does the same).
"""

from __future__ import annotations

import os
import subprocess
import sys

from trainer import cli

REPORT = "tensorflow imported:"
WRAPPER = """
import atexit, sys
atexit.register(lambda: print({report!r}, "tensorflow" in sys.modules, flush=True))
sys.argv = {argv!r}
from trainer.{module} import run
run()
"""
# What TensorFlow 2.21 writes to stderr while it loads, unless kept quiet.
STARTUP_LINES = ("oneDNN custom operations", "cudart_stub", "absl::InitializeLog",
                 "Could not find cuda drivers", "cpu_feature_guard", "cuInit")


def _entry_point(module: str, argv: list[str], cwd, env: dict | None = None):
    """(exit code, stdout lines without the report, stderr lines, TF imported?)."""
    full = {**os.environ, **(env or {})}
    if "TF_CPP_MIN_LOG_LEVEL" not in (env or {}):
        full.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = WRAPPER.format(report=REPORT, argv=argv, module=module)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=full, cwd=str(cwd))
    out = proc.stdout.splitlines()
    reports = [line for line in out if line.startswith(REPORT)]
    assert len(reports) == 1, proc.stdout + proc.stderr
    imported = reports[0].split()[-1] == "True"
    return (proc.returncode, [line for line in out if not line.startswith(REPORT)],
            proc.stderr.splitlines(), imported)


def test_a_bad_train_flag_is_one_line_and_exit_2_without_tensorflow(tmp_path):
    rc, out, err, imported = _entry_point("train", ["tfdp-train", "--seq_len=0"], tmp_path)
    assert (rc, err) == (2, ["tfdp-train: error: --seq_len=0 must be a positive integer; "
                             "pass a value >= 1"])
    assert out == [] and not imported
    rc, _, err, imported = _entry_point(
        "train", ["tfdp-train", "--hidden_dim=30", "--num_heads=4"], tmp_path)
    assert (rc, len(err), imported) == (2, 1, False)
    assert err[0].startswith("tfdp-train: error: --hidden_dim=30 is not divisible by "
                             "--num_heads=4")


def test_a_stray_argument_is_refused_without_tensorflow(tmp_path):
    rc, _, err, imported = _entry_point("train", ["tfdp-train", "extra"], tmp_path)
    assert (rc, imported) == (2, False)
    assert err == ["tfdp-train: error: unexpected argument 'extra'; flags look like "
                   "--name=value (see tfdp-train --help)"]


def test_a_bad_finetune_flag_is_one_line_and_exit_2_without_tensorflow(tmp_path):
    base = ["tfdp-finetune", f"--model_dir={tmp_path}/run", f"--train={tmp_path}/t.csv",
            f"--eval={tmp_path}/e.csv", f"--output_dir={tmp_path}/out"]
    rc, out, err, imported = _entry_point("finetune", base + ["--task=x"], tmp_path)
    assert (rc, err, out, imported) == (2, [
        "tfdp-finetune: error: --task='x' is unknown; use one of classification, "
        "completion"], [], False)
    rc, _, err, imported = _entry_point("finetune", base + ["--preempted_exit_code=2"],
                                        tmp_path)
    assert (rc, len(err), imported) == (2, 1, False)
    assert err[0].startswith("tfdp-finetune: error: --preempted_exit_code=2 must be an exit "
                             "status")
    assert not (tmp_path / "out").exists()


def test_a_command_that_loads_tensorflow_shows_none_of_its_startup_lines(tmp_path):
    """--data=/nonexistent fails after TensorFlow has loaded (the strategy is
    built first): stderr holds tfdp's one line and nothing of TensorFlow's."""
    model_dir = tmp_path / "run"
    rc, out, err, imported = _entry_point(
        "train", ["tfdp-train", "--data=/nonexistent", f"--model_dir={model_dir}"], tmp_path)
    assert imported
    assert (rc, err) == (2, ["tfdp-train: error: '/nonexistent' does not exist; give an "
                             "existing file, glob or directory"])
    for marker in STARTUP_LINES:
        assert not any(marker in line for line in out + err), marker
    assert not model_dir.exists()


def test_quieting_is_installed_only_when_the_user_has_not_chosen_a_log_level(tmp_path):
    """_quiet_tensorflow sets TF_CPP_MIN_LOG_LEVEL=3 and installs the import
    hook; a user's own TF_CPP_MIN_LOG_LEVEL is left alone (TensorFlow's own
    behaviour), and the hook is not installed. Neither imports TensorFlow."""
    code = ("import os, sys\nfrom trainer import cli\ncli._quiet_tensorflow()\n"
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), "
            "sum(isinstance(f, cli._QuietTensorFlow) for f in sys.meta_path), "
            "'tensorflow' in sys.modules)")
    outputs = []
    for level in (None, "1"):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        if level is not None:
            env["TF_CPP_MIN_LOG_LEVEL"] = level
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=env, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.split())
    assert outputs == [["3", "1", "False"], ["1", "0", "False"]]


def test_the_hook_intercepts_tensorflow_only():
    hook = cli._QuietTensorFlow()
    assert hook.find_spec("numpy") is None
    assert hook.find_spec("tensorflow_datasets") is None
    assert hook.find_spec("keras") is None
