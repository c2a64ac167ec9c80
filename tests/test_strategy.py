"""tfdp/strategy.py: which all-reduce each strategy gets (--collective), and
the one-line refusals. Without a GPU, the GPU cases are checked by what the
strategy factory is given: fake GPU devices in, the options TensorFlow's
strategy constructors receive out."""

from __future__ import annotations

import pytest
import tensorflow as tf

from tfdp import strategy as strategies
from tfdp.errors import UserError

IMPL = tf.distribute.experimental.CommunicationImplementation


@pytest.mark.parametrize("requested, num_gpus, expected", [
    ("auto", 8, "NCCL"),
    ("auto", 0, "RING"),
    ("nccl", 1, "NCCL"),
    ("ring", 8, "RING"),
])
def test_choose_collective(requested, num_gpus, expected):
    assert strategies.choose_collective(requested, num_gpus) == expected


def test_bfloat16_gradients_never_go_through_nccl():
    """TensorFlow's NCCL ops take no bfloat16: auto avoids NCCL for it, and
    asking for both is refused in one line."""
    assert strategies.choose_collective("auto", 8, "bfloat16") == "RING"
    with pytest.raises(UserError, match=r"^--collective=nccl cannot sum "
                                        r"--all_reduce_dtype=bfloat16 .*; use "):
        strategies.choose_collective("nccl", 8, "bfloat16")


def test_nccl_without_gpus_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"^--collective=nccl needs GPUs and this worker has "
                                         r"none; use --collective=auto \(RING on CPUs\) or ring$"):
        strategies.choose_collective("nccl", 0)
    with pytest.raises(UserError, match="--collective='tree' is unknown; use one of auto, "
                                        "nccl, ring"):
        strategies.choose_collective("tree", 0)


def test_mirrored_on_cpus_sums_with_ring(mirrored):
    """The suite's own 2-CPU strategy: RING, as TensorFlow sets for CPUs."""
    assert strategies.collective_of(mirrored) == "RING"
    assert strategies.describe(mirrored).endswith("; all-reduce: RING")
    assert mirrored.extended._communication_options.implementation == IMPL.RING
    assert strategies.collective_of(strategies.build_strategy("one_device")) == \
        "none (one replica)"


class _Recorder:
    """Stands in for a tf.distribute strategy class; keeps its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.extended = type("Extended", (), {})()


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two GPUs as tf.config lists them, and recorders for the strategies;
    the strategy cache starts empty and is restored afterwards."""
    real = tf.config.list_physical_devices
    fake = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2)]
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: fake if kind == "GPU" else real(kind))
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", _Recorder)
    monkeypatch.setattr(strategies, "_BUILT", {})
    given = {}

    def multi_worker(resolver, timeout, options):
        given["options"] = options
        return _Recorder(options)
    monkeypatch.setattr(strategies, "_multi_worker", multi_worker)
    return given


@pytest.mark.parametrize("requested, expected", [("auto", IMPL.NCCL), ("ring", IMPL.RING)])
def test_mirrored_on_gpus_gets_nccl(fake_gpus, requested, expected):
    """Its collective ops take their implementation from the extended's
    options (MirroredStrategy has no argument for them)."""
    built = strategies.build_strategy("mirrored", collective=requested)
    assert built.args == (["/gpu:0", "/gpu:1"],) and built.kwargs == {}
    assert built.extended._communication_options.implementation == expected
    assert strategies.collective_of(built) == expected.name


@pytest.mark.parametrize("requested, expected", [("auto", IMPL.NCCL), ("nccl", IMPL.NCCL),
                                                 ("ring", IMPL.RING)])
def test_multi_worker_gpus_communication_options(fake_gpus, monkeypatch, requested, expected):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
                                    '"task": {"type": "worker", "index": 0}}')
    built = strategies.build_strategy("multi_worker_mirrored", collective=requested)
    assert fake_gpus["options"].implementation == expected
    assert strategies.collective_of(built) == expected.name


def test_one_gpu_says_no_all_reduce(monkeypatch):
    """Mirrored over a single GPU gets NCCL's ops, but never all-reduces."""
    class OneGpu:
        num_replicas_in_sync = 1

        class extended:
            worker_devices = ("/job:localhost/replica:0/task:0/device:GPU:0",)
    one = OneGpu()
    monkeypatch.setattr(strategies, "_BUILT", {("mirrored", "NCCL", "/gpu:0"): (one, "NCCL")})
    assert strategies.describe(one) == ("OneGpu with 1 replica(s) (/job:localhost/replica:0/"
                                        "task:0/device:GPU:0); all-reduce: none (one replica)")


def test_a_second_collective_in_one_process_is_refused(fake_gpus, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
                                    '"task": {"type": "worker", "index": 0}}')
    first = strategies.build_strategy("multi_worker_mirrored")
    assert strategies.build_strategy("multi_worker_mirrored", collective="nccl") is first
    with pytest.raises(UserError, match="already joined its cluster with the NCCL all-reduce; "
                                        r"--collective=ring \(RING\) needs a new process"):
        strategies.build_strategy("multi_worker_mirrored", collective="ring")


def test_multi_worker_cpus_get_ring(monkeypatch):
    given = {}
    monkeypatch.setattr(strategies, "_BUILT", {})
    monkeypatch.setattr(strategies, "_multi_worker",
                        lambda resolver, timeout, options: given.setdefault("options", options))
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
                                    '"task": {"type": "worker", "index": 1}}')
    strategies.build_strategy("auto")
    assert given["options"].implementation == IMPL.RING
