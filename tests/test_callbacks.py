"""The progress line and the memory figures it carries."""

from __future__ import annotations

import io
import types

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
