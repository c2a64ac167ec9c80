"""A user's mistakes: one clear line, non-zero exit, no traceback, nothing written.

Most checks call the library in-process (`Config.validate`, `parse_tf_config`,
`prepare`, `recipes.source_files`, `tfdp.training.train`): each CLI process pays
several seconds of imports, so the subprocess cases below are a representative
set that proves the contract end to end through the console scripts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from conftest import run_cli, tiny_text
from tfdp import recipes
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.prepare import prepare
from tfdp.cluster import parse_tf_config

TINY_MODEL = ["--num_layers=1", "--num_heads=2", "--hidden_dim=32", "--intermediate_dim=64",
              "--seq_len=32", "--global_batch_size=8"]


def assert_user_error(proc, prog: str, *needles: str) -> str:
    """The CLI contract: exit != 0, last stderr line `prog: error: ...`, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no error message on stderr"
    last = lines[-1]
    assert last.startswith(f"{prog}: error: "), proc.stderr
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def assert_nothing_written(target: Path) -> None:
    """`target` (a --model_dir or --output that did not exist) still does not,
    and no staging directory is left beside it."""
    assert not target.exists(), sorted(p.name for p in target.rglob("*"))
    parent = target.parent
    if parent.exists():
        assert not [p for p in os.listdir(parent) if p.startswith(".tfdp-")]


def snapshot(directory: Path) -> dict:
    """Every file below `directory` with its content hash and mtime."""
    return {p.relative_to(directory).as_posix():
            (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def train_cli(model_dir: Path, *flags: str, env=None):
    return run_cli("tfdp-train", f"--model_dir={model_dir}", *flags, env=env)


# --- in-process: configuration ----------------------------------------------


@pytest.mark.parametrize("overrides, flag", [
    ({"seq_len": 0}, "--seq_len=0"),
    ({"global_batch_size": -4}, "--global_batch_size=-4"),
    ({"train_steps": 0}, "--train_steps=0"),
    ({"num_layers": 0}, "--num_layers=0"),
    ({"num_heads": 0}, "--num_heads=0"),
    ({"eval_every": -1}, "--eval_every=-1"),
    ({"vocab_size": 0}, "--vocab_size=0"),
    ({"val_fraction": 0.0}, "--val_fraction=0.0"),
    ({"val_fraction": 1.5}, "--val_fraction=1.5"),
    ({"sample_tokens": -1}, "--sample_tokens=-1"),
    ({"learning_rate": 0.0}, "--learning_rate=0.0"),
    ({"min_learning_rate": 1.0}, "--min_learning_rate=1.0"),
    ({"dropout": 1.0}, "--dropout=1.0"),
    ({"hidden_dim": 30, "num_heads": 4}, "--hidden_dim=30"),
    ({"strategy": "bogus"}, "--strategy='bogus'"),
    ({"tokenizer": "unigram"}, "--tokenizer='unigram'"),
    ({"model_dir": ""}, "--model_dir"),
    ({"collective_timeout": 0}, "--collective_timeout=0"),
    ({"slurm_port_base": 80}, "--slurm_port_base=80"),
    ({"input_sharding": "files"}, "--input_sharding='files'"),
    ({"all_reduce_dtype": "float16"}, "--all_reduce_dtype='float16'"),
    ({"skip_nonfinite_steps": -1}, "--skip_nonfinite_steps=-1"),
    ({"grad_accum_steps": 0}, "--grad_accum_steps=0"),
    ({"steps_per_loop": 0}, "--steps_per_loop=0"),
    ({"mixed_precision": "fp8"}, "--mixed_precision='fp8'"),
    ({"preemption_grace_seconds": 0}, "--preemption_grace_seconds=0"),
    ({"preempted_exit_code": 0}, "--preempted_exit_code=0"),
    ({"preempted_exit_code": 3}, "--preempted_exit_code=3"),  # a lost worker's code
    ({"preempted_exit_code": 256}, "--preempted_exit_code=256"),
    ({"preempted_exit_code": 137}, "--preempted_exit_code=137"),  # the join watchdog's
    ({"collective": "tree"}, "--collective='tree'"),
])
def test_config_validate_rejects(overrides, flag):
    with pytest.raises(UserError) as err:
        Config(**overrides).validate()
    message = str(err.value)
    assert flag in message
    assert "\n" not in message


def test_config_validate_accepts_a_retryable_preempted_code():
    assert Config(preempted_exit_code=138).validate().preempted_exit_code == 138


def test_config_validate_accepts_defaults():
    cfg = Config()
    assert cfg.validate() is cfg


def test_hidden_dim_message_names_both_flags():
    with pytest.raises(UserError, match=r"--hidden_dim=30 .*--num_heads=4"):
        Config(hidden_dim=30, num_heads=4).validate()


def test_resume_conflicts_name_the_changed_field():
    saved = Config(hidden_dim=32, model_dir="/x")
    assert Config(hidden_dim=32, model_dir="/x", train_steps=99,
                  overwrite=True).resume_conflicts(saved) is None
    assert "--hidden_dim=32 (now 64)" in Config(hidden_dim=64, model_dir="/x") \
        .resume_conflicts(saved)


# --- in-process: TF_CONFIG --------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    ("{not json", "not valid JSON"),
    ('["worker"]', 'no "cluster"'),
    ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', '"worker" list'),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', '"worker" list'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}}', 'no "task"'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     "index 2 is outside"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": -1}}',
     "index -1 is outside"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     '"chief" is not a job'),
])
def test_parse_tf_config_rejects(raw, message):
    with pytest.raises(UserError, match=message) as err:
        parse_tf_config(raw)
    assert "TF_CONFIG" in str(err.value)


def test_parse_tf_config_accepts_a_cluster():
    assert parse_tf_config("") is None
    assert parse_tf_config("  ") is None
    raw = {"cluster": {"worker": ["localhost:1", "localhost:2"]},
           "task": {"type": "worker", "index": 1}}
    assert parse_tf_config(json.dumps(raw)) == raw


# --- in-process: files and data ---------------------------------------------


def test_source_files_missing_path_names_it():
    with pytest.raises(UserError, match="/nonexistent/x.txt"):
        recipes.source_files("/nonexistent/x.txt")


@pytest.mark.parametrize("layout", ["empty_file", "dir_of_empty_files"])
def test_prepare_empty_corpus(tmp_path, layout):
    if layout == "empty_file":
        (tmp_path / "empty.txt").write_bytes(b"")
        spec = str(tmp_path / "empty.txt")
    else:
        for name in ("a.txt", "b.txt", "sub/c.txt"):
            (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "corpus" / name).write_bytes(b"")
        spec = str(tmp_path / "corpus")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="corpus is empty"):
        prepare(recipes.source_files(spec), str(out), log=lambda *_: None)
    assert_nothing_written(out)


def test_prepare_wordpiece_on_blank_lines_only(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n\n\t\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no non-blank lines"):
        prepare([tmp_path / "blank.txt"], str(out), "wordpiece", 100, log=lambda *_: None)
    assert_nothing_written(out)


def test_prepare_char_on_invalid_utf8_warns(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(tiny_text().encode() + b"\xff\xfe tail\n")
    manifest = prepare([tmp_path / "bad.txt"], str(tmp_path / "out"), "char",
                       log=lambda *_: None)
    assert manifest["tokenizer"] == "char"
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "U+FFFD" in err


# --- in-process: tfdp.training.train fails before writing anything ---------------


@pytest.fixture
def train_in_process(mirrored):
    """`tfdp.training.train` on the already split CPU (no TF_CONFIG in tests)."""
    from tfdp.training import train
    return train


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty_dir", "corpus is empty"),
    ("short", "fewer than one window of --seq_len+1=129"),
    ("batch_33", "--global_batch_size=33 is not divisible by the 2 replicas"),
    ("accum_3", "--global_batch_size=8 does not split into --grad_accum_steps=3 micro-batches "
                "on each of the 2 replicas; use a multiple of 6"),
    ("no_val_window", "the val split has"),
])
def test_train_in_process_errors(tmp_path, train_in_process, case, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    flags = dict(seq_len=128, global_batch_size=8, num_layers=1, num_heads=2,
                 hidden_dim=32, intermediate_dim=64, data=str(corpus / "c.txt"))
    if case == "missing":
        flags["data"] = "/nonexistent/x.txt"
    elif case == "empty_dir":
        for name in ("a.txt", "b.txt"):
            (corpus / name).write_bytes(b"")
        flags["data"] = str(corpus)
    elif case == "short":
        (corpus / "c.txt").write_bytes(b"tiny text")
    elif case == "batch_33":
        (corpus / "c.txt").write_text(tiny_text())
        flags["global_batch_size"] = 33
    elif case == "accum_3":
        (corpus / "c.txt").write_text(tiny_text())
        flags["grad_accum_steps"] = 3
    elif case == "no_val_window":  # 2% of 3 KB is fewer than 129 tokens
        (corpus / "c.txt").write_text(tiny_text())
    model_dir = tmp_path / "runs" / "M"
    with pytest.raises(UserError, match=re.escape(message)):
        train_in_process(Config(model_dir=str(model_dir), **flags))
    assert_nothing_written(model_dir)


@pytest.mark.parametrize("case, message", [
    ("a_file", "is a file, not a directory"),
    ("not_a_run", "is not empty and holds no tfdp run"),
    ("not_a_run_overwrite", "is not empty and holds no tfdp run"),  # never deleted
    ("corrupt_config", "config.json is unreadable"),
    ("under_a_file", "cannot be created: .*/parent is a file"),
    ("read_only", r"is not writable \(.*/parent: permission denied\)"),
])
def test_train_in_process_refuses_model_dir(tmp_path, text_file, train_in_process,
                                            case, message):
    model_dir = tmp_path / "M"
    if case == "a_file":
        model_dir.write_text("mine")
    elif case in ("under_a_file", "read_only"):
        parent = tmp_path / "parent"
        model_dir = parent / "runs" / "M"
        if case == "under_a_file":
            parent.write_text("mine")
        else:
            if os.geteuid() == 0:
                pytest.skip("permissions do not bind root")
            parent.mkdir()
            parent.chmod(0o555)
    else:
        model_dir.mkdir()
        name = "config.json" if case == "corrupt_config" else "notes.txt"
        (model_dir / name).write_text("{mine")
    before = snapshot(tmp_path)
    try:
        with pytest.raises(UserError, match=message):
            train_in_process(Config(data=str(text_file), model_dir=str(model_dir),
                                    overwrite=case.endswith("overwrite")))
    finally:
        if case == "read_only":
            parent.chmod(0o755)
    assert snapshot(tmp_path) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tfdp-")]


def test_prepare_output_is_a_file(tmp_path, text_file):
    out = tmp_path / "out"
    out.write_text("mine")
    with pytest.raises(UserError, match="--output=.* is a file"):
        prepare([text_file], str(out), log=lambda *_: None)
    assert out.read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tfdp-")]


def test_load_trained_with_corrupt_config(tmp_path):
    from tfdp.restore import load_trained
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(UserError, match="config.json is unreadable"):
        load_trained(str(tmp_path))


def test_load_trained_on_a_non_run(tmp_path):
    from tfdp.restore import load_trained
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(UserError, match="holds no tfdp run"):
        load_trained(str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_bad_sampler_settings():
    from tfdp.generate import make_sampler
    with pytest.raises(UserError, match="--sampler='nucleus'"):
        make_sampler("nucleus")
    with pytest.raises(UserError, match="--num_beams=0"):
        make_sampler("beam", num_beams=0)
    with pytest.raises(UserError, match="--temperature=0"):
        make_sampler("top_k", temperature=0)


# --- through the console scripts --------------------------------------------


@pytest.mark.parametrize("prog, flag, extra", [
    ("tfdp-train", "--strategy=ring", []),
    ("tfdp-prepare", "--tokenizer=unigram", ["--input=x", "--output=y"]),
    ("tfdp-generate", "--sampler=nucleus", ["--model_dir=x"]),
])
def test_cli_unknown_enum_value(tmp_path, prog, flag, extra):
    # absl rejects enum values while parsing flags, before tfdp's code runs.
    proc = run_cli(prog, flag, *extra)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"FATAL Flags parsing error: flag {flag}: value should be one of <" in proc.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "short", "batch_33", "seq_len_0"])
def test_cli_train_bad_input(tmp_path, case):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_text())
    flags, needles = list(TINY_MODEL) + [f"--data={corpus}"], []
    if case == "missing":
        flags.append("--data=/nonexistent/x.txt")
        needles = ["/nonexistent/x.txt"]
    elif case == "empty":
        corpus.write_bytes(b"")
        needles = [str(corpus), "empty"]
    elif case == "short":
        corpus.write_bytes(b"hello")
        flags.append("--seq_len=128")
        needles = ["--seq_len"]
    elif case == "batch_33":
        flags.append("--global_batch_size=33")
        needles = ["--global_batch_size=33"]
    elif case == "seq_len_0":
        flags.append("--seq_len=0")
        needles = ["--seq_len=0"]
    model_dir = tmp_path / "runs" / "M"
    proc = train_cli(model_dir, *flags)
    assert_user_error(proc, "tfdp-train", *needles)
    assert_nothing_written(model_dir)


def test_cli_prepare_refuses_existing_output(tmp_path, text_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    proc = run_cli("tfdp-prepare", f"--input={text_file}", f"--output={out}")
    assert_user_error(proc, "tfdp-prepare", f"--output={out}", "not empty")
    assert snapshot(out) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tfdp-")]


def test_cli_prepare_char_replaces_invalid_utf8(tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(tiny_text().encode() + b"caf\xff\xfe\n")
    out = tmp_path / "out"
    proc = run_cli("tfdp-prepare", f"--input={corpus}", f"--output={out}", "--tokenizer=char")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "not valid UTF-8" in proc.stderr and "U+FFFD" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == "char"


def test_cli_generate_on_a_non_run(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    before = snapshot(plain)
    proc = run_cli("tfdp-generate", f"--model_dir={plain}", "--prompt=x")
    assert_user_error(proc, "tfdp-generate", f"--model_dir={plain}", "no tfdp run")
    assert snapshot(plain) == before


def test_cli_stray_positional_argument(tmp_path, text_file):
    model_dir = tmp_path / "M"
    proc = train_cli(model_dir, f"--data={text_file}", "oops")
    assert_user_error(proc, "tfdp-train", "'oops'")
    assert_nothing_written(model_dir)


def test_cli_malformed_tf_config(tmp_path, text_file):
    model_dir = tmp_path / "M"
    proc = train_cli(model_dir, f"--data={text_file}", "--strategy=multi_worker_mirrored",
                     env={"TF_CONFIG": "{cluster: oops"})
    assert_user_error(proc, "tfdp-train", "TF_CONFIG", "not valid JSON")
    assert_nothing_written(model_dir)


@pytest.fixture(scope="module")
def invalid_utf8_run(tmp_path_factory):
    """A tiny byte-level run on a file with invalid UTF-8 bytes: (corpus, model_dir, proc)."""
    root = tmp_path_factory.mktemp("invalid_utf8")
    corpus = root / "bad.txt"
    corpus.write_bytes(b"\xff\xfe".join(tiny_text(60).encode().split(b"\n")))
    model_dir = root / "M"
    proc = train_cli(model_dir, f"--data={corpus}", "--tokenizer=byte", *TINY_MODEL,
                     "--train_steps=2", "--eval_every=2", "--checkpoint_every=2",
                     "--log_every=1", "--sample_tokens=0", "--jit_compile=false")
    return corpus, model_dir, proc


@pytest.mark.slow
def test_cli_byte_tokenizer_trains_on_invalid_utf8(invalid_utf8_run):
    corpus, model_dir, proc = invalid_utf8_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["tokenizer"] == "byte"
    manifest = json.loads((model_dir / "data" / "manifest.json").read_text())
    splits = manifest["splits"]
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == corpus.stat().st_size


@pytest.mark.slow
def test_cli_incompatible_model_dir(invalid_utf8_run):
    corpus, model_dir, first = invalid_utf8_run
    assert first.returncode == 0, first.stderr
    before = snapshot(model_dir)
    flags = [f for f in TINY_MODEL if not f.startswith("--hidden_dim")] + ["--hidden_dim=64"]
    proc = train_cli(model_dir, f"--data={corpus}", "--tokenizer=byte", *flags,
                     "--train_steps=4")
    assert_user_error(proc, "tfdp-train", "--hidden_dim=32 (now 64)", f"--model_dir={model_dir}")
    assert snapshot(model_dir) == before
    assert not [p for p in os.listdir(model_dir.parent) if p.startswith(".tfdp-")]
