"""The progress line and the memory figures it carries."""

from __future__ import annotations

import io
import types

import keras
import pytest
import tensorflow as tf

from tfdp.callbacks import ProgressLogger, TensorBoardSummaries
from tfdp.memory import peak_device_memory_gib

LOGS = {"loss": 2.5, "learning_rate": 1e-3, "tokens_per_second": 12000.0,
        "tokens_per_second_per_replica": 6000.0, "step_time": 0.25, "mfu": 0.4,
        "peak_host_memory_gib": 1.5, "eta_seconds": 75.0}


def _line(logs) -> str:
    lines = []
    ProgressLogger(total_steps=10, every=5, print_fn=lines.append).on_train_batch_end(4, logs)
    assert len(lines) == 1
    return lines[0]


def test_progress_line_on_cpu(mirrored):
    assert peak_device_memory_gib(mirrored) == {}  # CPU replicas: no device memory
    assert _line(LOGS) == ("step 5/10 | loss 2.5000 | lr 1.00e-03 | 12,000 tok/s "
                           "(6,000/replica) | 250 ms/step | mfu 40.00% | mem 1.50 GiB | "
                           "eta 1m15s")


def test_device_memory_is_the_largest_peak_over_this_process_gpus(monkeypatch):
    """GPU runs report the peak allocation of the fullest GPU of the process
    (TensorFlow's allocator statistics), in the logs and the progress line."""
    peaks = {"GPU:0": 2 * 2**30, "GPU:1": 3 * 2**30}
    monkeypatch.setattr(tf.config.experimental, "get_memory_info",
                        lambda device: {"current": 0, "peak": peaks[device]})
    fake = types.SimpleNamespace(extended=types.SimpleNamespace(worker_devices=(
        "/job:worker/replica:0/task:1/device:GPU:0",
        "/job:worker/replica:0/task:1/device:GPU:1")))
    memory = peak_device_memory_gib(fake)
    assert memory == {"peak_device_memory_gib": 3.0}
    assert "| mem 1.50 GiB (GPU 3.00 GiB) |" in _line({**LOGS, **memory})


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_live_bar_redraws_in_place_and_prints_messages_above_it(monkeypatch):
    """On a terminal: the status line is redrawn after a carriage return,
    cleared before every message, validation or `every`-step line, and
    drawn again after it; at the end it is cleared, leaving the lines."""
    monkeypatch.setattr(ProgressLogger, "REDRAW_SECONDS", 0.0)
    monkeypatch.setenv("COLUMNS", "200")  # a terminal wide enough for the whole line
    screen, lines = _Terminal(), []
    progress = ProgressLogger(total_steps=4, every=2, print_fn=lines.append, live=screen)
    progress.on_train_batch_end(0, LOGS)
    assert screen.getvalue() == "\r" + progress.status()
    assert progress.status() == ("[#####---------------] 1/4 | loss 2.5000 | val - | "
                                 "12,000 tok/s | mfu 40.0% | eta 1m15s")
    progress.say("a message")
    assert lines == ["a message"]
    drawn = "\r" + progress.status()
    assert screen.getvalue() == drawn + "\r" + " " * (len(drawn) - 1) + "\r" + drawn
    progress.on_train_batch_end(1, LOGS)  # an `every` step: a plain line too
    assert lines[-1].startswith("step 2/4 | loss 2.5000")
    progress.on_epoch_end(0, {"val_loss": 2.25, "val_perplexity": 9.49, "val_bits_per_byte": 3.2})
    assert lines[-1].startswith("validation at step 2 | loss 2.2500")
    assert "| val 2.2500 |" in progress.status()
    progress.on_train_end()
    assert screen.getvalue().endswith(" \r")  # the bar is gone, the cursor at column 0


def test_plain_output_has_no_control_characters():
    """Not a terminal: lines every `every` steps, no carriage returns."""
    lines = []
    progress = ProgressLogger(total_steps=4, every=2, print_fn=lines.append)
    for step in range(4):
        progress.on_train_batch_end(step, LOGS)
    progress.say("note")
    assert [line.split(" |")[0] for line in lines] == ["step 2/4", "step 4/4", "note"]
    assert not any("\r" in line for line in lines)


def test_tensorboard_gets_scalars_config_samples_and_the_graph(tmp_path):
    """What `tensorboard --logdir` shows: every step's scalars, the config
    text at the start, the model graph once, a sample at each validation."""
    from tensorboard.backend.event_processing import event_accumulator

    graph = tf.function(lambda x: tf.matmul(x, x)).get_concrete_function(
        tf.TensorSpec([2, 2], tf.float32)).graph
    samples = iter(["first sample", "second sample"])
    summaries = TensorBoardSummaries(str(tmp_path), config_json='{"seq_len": 128}',
                                     sample_fn=lambda model: next(samples),
                                     graph_fn=lambda: graph)
    summaries.on_train_begin()
    for step in range(4):
        summaries.on_train_batch_end(step, {**LOGS, "loss": 3.0 - step})
        if step % 2:
            summaries.on_epoch_end(step // 2, {"val_loss": 2.0, "val_perplexity": 7.4})
    summaries.on_train_end()

    train = event_accumulator.EventAccumulator(str(tmp_path / "train"),
                                               size_guidance={"tensors": 0})
    train.Reload()
    assert [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in train.Tensors("loss")] \
        == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.0)]
    assert {"learning_rate", "mfu", "step_time", "tokens_per_second"} <= \
        set(train.Tags()["tensors"])
    (config,) = train.Tensors("config")
    assert config.step == 0 and b'"seq_len": 128' in config.tensor_proto.string_val[0]
    graph_run = event_accumulator.EventAccumulator(str(tmp_path / "graph"))
    graph_run.Reload()
    assert any(node.op == "MatMul" for node in graph_run.Graph().node)
    val = event_accumulator.EventAccumulator(str(tmp_path / "val"),
                                             size_guidance={"tensors": 0})
    val.Reload()
    assert [e.step for e in val.Tensors("loss")] == [2, 4]
    assert [e.step for e in val.Tensors("perplexity")] == [2, 4]
    texts = [(e.step, e.tensor_proto.string_val[0]) for e in val.Tensors("sample")]
    assert texts == [(2, b"```\nfirst sample\n```"), (4, b"```\nsecond sample\n```")]


# --- from_factories: --callbacks=package.module:factory -----------------------

FACTORIES = '''
import keras


class Mark(keras.callbacks.Callback):
    def __init__(self, name):
        super().__init__()
        self.name = name


def one():
    return Mark("one")


def many():
    return [Mark("a"), Mark("b")]


def pair():
    return (Mark("c"), Mark("d"))


def not_callback():
    return 42


def some_not_callbacks():
    return [Mark("ok"), "a string", None]


def raises():
    raise RuntimeError("boom")


NOT_CALLABLE = Mark("instance")
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A user's module of callback factories, importable as `<name>`."""
    import sys

    name = f"tfdp_user_callbacks_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _spec_error(specs) -> str:
    from tfdp.callbacks import from_factories
    from tfdp.errors import UserError

    with pytest.raises(UserError) as err:
        from_factories(specs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_factories_make_one_callback_or_a_list_in_order(factories):
    from tfdp.callbacks import from_factories

    assert from_factories([]) == []
    made = from_factories([f"{factories}:one", f"{factories}:many", f"{factories}:pair"])
    assert [c.name for c in made] == ["one", "a", "b", "c", "d"]
    assert all(isinstance(c, keras.callbacks.Callback) for c in made)
    again = from_factories([f"{factories}:one"])
    assert again[0] is not made[0]  # each call of the factory makes a new callback


def test_a_factory_returning_no_callback_is_refused(factories):
    assert _spec_error([f"{factories}:not_callback"]) == (
        f"--callbacks={factories}:not_callback: the factory returned int, not "
        "keras.callbacks.Callback; return a callback or a list of them")
    assert "the factory returned str, NoneType, not keras.callbacks.Callback" in \
        _spec_error([f"{factories}:some_not_callbacks"])


def test_a_raising_or_uncallable_factory_is_one_line_naming_the_spec(factories):
    assert _spec_error([f"{factories}:one", f"{factories}:raises"]) == (
        f"--callbacks={factories}:raises: the factory raised RuntimeError: boom")
    assert _spec_error([f"{factories}:NOT_CALLABLE"]).startswith(
        f"--callbacks={factories}:NOT_CALLABLE: the factory raised TypeError: ")


def test_missing_modules_attributes_and_malformed_specs(factories):
    assert _spec_error(["tfdp_no_such_module_x:make"]) == (
        "--callbacks=tfdp_no_such_module_x:make: cannot import tfdp_no_such_module_x (No "
        "module named 'tfdp_no_such_module_x'); put its directory on PYTHONPATH or install it")
    assert _spec_error([f"{factories}:nothing"]) == (
        f"--callbacks={factories}:nothing: {factories} has no 'nothing'")
    for spec in (factories, f"{factories}:", ":one", ""):
        assert _spec_error([spec]) == (
            f"--callbacks={spec!r} is not package.module:factory; name the module and the "
            "function that returns the callbacks")


def test_a_module_whose_own_import_fails_is_named(tmp_path, monkeypatch):
    (tmp_path / "tfdp_needs_a_dep.py").write_text("import tfdp_missing_dependency_y\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _spec_error(["tfdp_needs_a_dep:make"]) == (
        "--callbacks=tfdp_needs_a_dep:make: cannot import tfdp_needs_a_dep (No module named "
        "'tfdp_missing_dependency_y'); put its directory on PYTHONPATH or install it")


def test_a_module_with_a_syntax_error_is_one_line_naming_the_spec(tmp_path, monkeypatch):
    (tmp_path / "tfdp_typo_module.py").write_text("def make(:\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "--callbacks=tfdp_typo_module:make" in _spec_error(["tfdp_typo_module:make"])
