"""tfdp/config.py: what Config and FinetuneConfig refuse (one line naming the
flag), which saved runs a config may resume, the batch split check, and
reading a saved config.json.

tests/test_errors.py covers a first sample of Config.validate's refusals;
these are the rest, and the boundaries that must still be accepted.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from tfdp.config import DEFAULT_VOCAB_SIZE, Config, FinetuneConfig, check_batch
from tfdp.errors import UserError


def _refusal(make) -> str:
    with pytest.raises(UserError) as err:
        make()
    message = str(err.value)
    assert "\n" not in message
    return message


# --- Config.validate --------------------------------------------------------

@pytest.mark.parametrize("overrides, flag", [
    ({"intermediate_dim": 0}, "--intermediate_dim=0 must be a positive integer"),
    ({"hidden_dim": -8}, "--hidden_dim=-8 must be a positive integer"),
    ({"checkpoint_every": 0}, "--checkpoint_every=0 must be a positive integer"),
    ({"keep_checkpoints": 0}, "--keep_checkpoints=0 must be a positive integer"),
    ({"log_every": 0}, "--log_every=0 must be a positive integer"),
    ({"num_cpu_replicas": 0}, "--num_cpu_replicas=0 must be a positive integer"),
    ({"eval_steps": -1}, "--eval_steps=-1 must not be negative"),
    ({"warmup_steps": -5}, "--warmup_steps=-5 must not be negative"),
    ({"weight_decay": -0.1}, "--weight_decay=-0.1 must not be negative"),
    ({"clip_norm": -1.0}, "--clip_norm=-1.0 must not be negative"),
    ({"min_learning_rate": -1e-4}, "--min_learning_rate=-0.0001 must not be negative"),
    ({"vocab_size": -3}, "--vocab_size=-3 must be a positive integer"),
    ({"val_fraction": 1.0}, "--val_fraction=1.0 must be between 0 and 1"),
    ({"dropout": -0.1}, "--dropout=-0.1 must be in [0, 1)"),
    ({"learning_rate": -1.0}, "--learning_rate=-1.0 must be positive"),
    ({"beta2": 1.0}, "--beta2=1.0 must be between 0 and 1"),
    ({"beta2": 0.0}, "--beta2=0.0 must be between 0 and 1"),
    ({"collective_timeout": -1.0}, "--collective_timeout=-1.0 must be a positive"),
    ({"preemption_grace_seconds": -2.0}, "--preemption_grace_seconds=-2.0 must be"),
    ({"preempted_exit_code": 1}, "--preempted_exit_code=1 must be an exit status"),
    ({"preempted_exit_code": 2}, "--preempted_exit_code=2 must be an exit status"),
    ({"preempted_exit_code": 130}, "--preempted_exit_code=130 must be an exit status"),
    ({"preempted_exit_code": -1}, "--preempted_exit_code=-1 must be an exit status"),
    ({"slurm_port_base": 65001}, "--slurm_port_base=65001 must be a port"),
    ({"slurm_port_base": 1023}, "--slurm_port_base=1023 must be a port"),
    ({"mixed_precision": "bf32"}, "--mixed_precision='bf32' is unknown; use one of off, bf16, "
                                  "fp16"),
    ({"strategy": "tpu"}, "--strategy='tpu' is unknown; use one of auto, one_device, mirrored, "
                          "multi_worker_mirrored"),
])
def test_validate_refuses_with_one_line_naming_the_flag(overrides, flag):
    assert flag in _refusal(lambda: Config(**overrides).validate())


@pytest.mark.parametrize("overrides", [
    {"preempted_exit_code": 4}, {"preempted_exit_code": 255}, {"preempted_exit_code": 138},
    {"slurm_port_base": 1024}, {"slurm_port_base": 65000}, {"dropout": 0.0},
    {"eval_steps": 0, "warmup_steps": 0, "weight_decay": 0.0, "clip_norm": 0.0,
     "sample_tokens": 0, "skip_nonfinite_steps": 0},
    {"min_learning_rate": 1e-3, "learning_rate": 1e-3}, {"vocab_size": 1},
    {"hidden_dim": 36, "num_heads": 6},
])
def test_validate_accepts_the_boundaries(overrides):
    cfg = Config(**overrides)
    assert cfg.validate() is cfg


def test_validate_reports_the_first_bad_value_only():
    message = _refusal(lambda: Config(seq_len=0, train_steps=-1, tokenizer="x").validate())
    assert "--seq_len=0" in message
    assert "--train_steps" not in message and "--tokenizer" not in message


# --- resume_conflicts -------------------------------------------------------

def test_a_saved_default_vocabulary_equals_its_resolved_size():
    """Runs saved before config.json held resolved values kept vocab_size None:
    a byte run then means 257, a wordpiece run 8192."""
    assert DEFAULT_VOCAB_SIZE["byte"] == 257
    assert Config(vocab_size=257).resume_conflicts(Config(vocab_size=None)) is None
    assert Config(tokenizer="wordpiece", vocab_size=8192).resume_conflicts(
        Config(tokenizer="wordpiece", vocab_size=None)) is None
    assert Config().resume_conflicts(Config()) is None  # both unresolved
    assert Config(vocab_size=300).resume_conflicts(Config(vocab_size=None)) == \
        "holds a run with --vocab_size=257 (now 300)"
    # A tokenizer change is named as such, not hidden behind the vocabulary.
    reason = Config(tokenizer="char", vocab_size=256).resume_conflicts(Config(vocab_size=None))
    assert reason == "holds a run with --tokenizer='byte' (now 'char'), --vocab_size=257 (now 256)"


def test_resume_conflicts_list_every_changed_field_in_order():
    saved = Config(data="a.txt", seq_len=32, seed=1, global_batch_size=8)
    now = dataclasses.replace(saved, seed=2, seq_len=64, global_batch_size=16)
    assert now.resume_conflicts(saved) == (
        "holds a run with --seq_len=32 (now 64), --global_batch_size=8 (now 16), "
        "--seed=1 (now 2)")
    assert dataclasses.replace(saved, data="b.txt").resume_conflicts(saved) == \
        "holds a run with --data='a.txt' (now 'b.txt')"


def test_fields_that_do_not_shape_the_run_never_conflict():
    saved = Config(vocab_size=257)
    now = dataclasses.replace(saved, train_steps=5000, learning_rate=1e-4, eval_every=7,
                              checkpoint_every=9, strategy="mirrored", model_dir="/else",
                              dropout=0.2, mixed_precision="bf16", overwrite=True,
                              sample_tokens=0, init_from="/a/preset")
    assert now.resume_conflicts(saved) is None


# --- check_batch ------------------------------------------------------------

def test_check_batch_messages():
    check_batch(12, 2, 3)  # 12 = 2 replicas x 3 micro-batches x 2
    check_batch(8, 1)
    assert _refusal(lambda: check_batch(9, 2)) == (
        "--global_batch_size=9 is not divisible by the 2 replicas; use a multiple of 2")
    assert _refusal(lambda: check_batch(8, 2, 3)) == (
        "--global_batch_size=8 does not split into --grad_accum_steps=3 micro-batches on each "
        "of the 2 replicas; use a multiple of 6")
    assert _refusal(lambda: check_batch(6, 4, flag="--eval_batch")).startswith(
        "--eval_batch=6 is not divisible by the 4 replicas")


# --- FinetuneConfig.validate ------------------------------------------------

def _fine(**kw) -> FinetuneConfig:
    return FinetuneConfig(model_dir="m", train="t.csv", eval="e.csv", output_dir="o", **kw)


@pytest.mark.parametrize("overrides, flag", [
    ({"task": "regression"}, "--task='regression' is unknown; use one of classification, completion"),
    ({"pooling": "max"}, "--pooling='max' is unknown; use one of last, mean"),
    ({"global_batch_size": 0}, "--global_batch_size=0 must be a positive integer"),
    ({"num_cpu_replicas": 0}, "--num_cpu_replicas=0 must be a positive integer"),
    ({"keep_checkpoints": -1}, "--keep_checkpoints=-1 must be a positive integer"),
    ({"steps_per_loop": 0}, "--steps_per_loop=0 must be a positive integer"),
    ({"seq_len": -1}, "--seq_len=-1 must not be negative"),
    ({"train_steps": -3}, "--train_steps=-3 must not be negative"),
    ({"eval_every": -1}, "--eval_every=-1 must not be negative"),
    ({"weight_decay": -0.5}, "--weight_decay=-0.5 must not be negative"),
    ({"clip_norm": -1.0}, "--clip_norm=-1.0 must not be negative"),
    ({"learning_rate": 0.0}, "--learning_rate and --epochs (or --train_steps) must be positive"),
    ({"epochs": 0.0}, "--learning_rate and --epochs (or --train_steps) must be positive"),
    ({"warmup_fraction": 1.0}, "--warmup_fraction=1.0 must be in [0, 1)"),
    ({"preempted_exit_code": 2}, "--preempted_exit_code=2 must be an exit status"),
    ({"preempted_exit_code": 137}, "--preempted_exit_code=137 must be an exit status"),
    ({"preemption_grace_seconds": 0.0}, "--preemption_grace_seconds=0.0 must be"),
])
def test_finetune_validate_refuses(overrides, flag):
    assert flag in _refusal(lambda: _fine(**overrides).validate())


def test_finetune_validate_accepts():
    fc = _fine()
    assert fc.validate() is fc
    # --train_steps overrides --epochs, so epochs 0 is then fine; 0s mean "automatic".
    assert _fine(epochs=0.0, train_steps=5, seq_len=0, eval_every=0).validate().train_steps == 5
    assert _fine(preempted_exit_code=138, pooling="mean").validate().preempted_exit_code == 138


# --- Config.load, to_json, from_dict -----------------------------------------

def test_load_round_trips_to_json_and_ignores_unknown_keys(tmp_path):
    assert Config.load(str(tmp_path)) is None  # no config.json: not a run
    cfg = Config(seq_len=64, vocab_size=300, sample_prompt="def ", jit_compile=False,
                 model_dir=str(tmp_path))
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert Config.load(str(tmp_path)) == cfg
    values = {**json.loads(cfg.to_json()), "a_field_from_a_later_version": 1}
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert Config.load(str(tmp_path)) == cfg


@pytest.mark.parametrize("content, why", [
    (b'{"seq_len": 64, "num_l', "Unterminated string"),  # a write cut short
    (b"", "Expecting value"),
    (b'["seq_len", 64]', "not a JSON object"),
    (b"\xff\xfe\x00\x01 binary", "codec can't decode"),
])
def test_load_of_a_corrupt_config_is_one_line_naming_the_file(tmp_path, content, why):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    message = _refusal(lambda: Config.load(str(tmp_path)))
    assert message.startswith(f"{path} is unreadable (")
    assert why in message
    assert message.endswith("point --model_dir at an intact tfdp-train run or use a new one")
