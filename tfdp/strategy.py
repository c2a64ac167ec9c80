"""Strategy factory: one string in, one tf.distribute.Strategy out.

auto           MultiWorkerMirrored when TF_CONFIG names more than one task,
               else Mirrored over all GPUs, else Mirrored over the CPU split
               into `num_cpu_replicas` logical devices.
one_device     a single replica on the first GPU or the CPU.
mirrored       synchronous replicas on this machine (GPUs or logical CPUs).
multi_worker_mirrored
               TensorFlow's collective ops across processes (gRPC/NCCL),
               cluster read from TF_CONFIG.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tfdp.config import STRATEGIES
from tfdp.errors import UserError


def split_cpu(num_replicas: int) -> list[str]:
    """Expose the CPU as `num_replicas` logical devices; return their names.

    This must happen before TensorFlow initialises its devices; a process
    that already did so keeps its current split, which must match.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)
    except RuntimeError:
        pass  # Already initialised: checked just below.
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < num_replicas:
        raise UserError(f"--num_cpu_replicas={num_replicas} but TensorFlow was already "
                        f"started with {len(logical)} CPU device(s) in this process; "
                        "start a new process")
    return [d.name for d in logical[:num_replicas]]


def parse_tf_config(raw: str | None = None) -> dict | None:
    """Validate TF_CONFIG and return it, or None when unset.

    Checks what a typo usually breaks: JSON syntax, a cluster with a worker
    list, and a task whose index lies inside its job.
    """
    raw = os.environ.get("TF_CONFIG", "") if raw is None else raw
    if not raw.strip():
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"TF_CONFIG is not valid JSON ({err.msg} at character {err.pos}); "
                        "fix or unset the TF_CONFIG environment variable") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise UserError('TF_CONFIG has no "cluster" with a "worker" list; '
                        'set e.g. {"cluster": {"worker": ["host:port", ...]}, '
                        '"task": {"type": "worker", "index": 0}}')
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise UserError('TF_CONFIG has no "task" with "type" and "index"; '
                        'add e.g. "task": {"type": "worker", "index": 0}')
    job = cluster.get(task["type"])
    if not isinstance(job, list):
        raise UserError(f'TF_CONFIG task type "{task["type"]}" is not a job in the cluster '
                        f"({', '.join(cluster)}); use one of those")
    index = task["index"]
    if not isinstance(index, int) or not 0 <= index < len(job):
        raise UserError(f'TF_CONFIG task index {index!r} is outside the "{task["type"]}" '
                        f"list of {len(job)}; use an index from 0 to {len(job) - 1}")
    return config


def _cluster_size(config: dict | None) -> int:
    if config is None:
        return 1
    return sum(len(v) for k, v in config["cluster"].items() if k in ("chief", "worker"))


# Strategies built in this process, by kind and devices. Reusing one matters:
# two MirroredStrategy objects over the same devices restart their collective
# instance keys, so a second model trained in the same process (a notebook,
# a sweep, the test suite) would hit "Shape mismatch in the collective
# instance" when the first one's keys are reused with other tensor shapes.
_BUILT: dict[tuple, tf.distribute.Strategy] = {}


def _cached(key: tuple, make) -> tf.distribute.Strategy:
    if key not in _BUILT:
        _BUILT[key] = make()
    return _BUILT[key]


def build_strategy(name: str, num_cpu_replicas: int = 2) -> tf.distribute.Strategy:
    """Return the strategy named by `--strategy` (see the module docstring)."""
    tf_config = parse_tf_config()
    if name == "auto":
        name = "multi_worker_mirrored" if _cluster_size(tf_config) > 1 else "mirrored"
    if name == "multi_worker_mirrored":
        if tf_config is None:
            raise UserError("--strategy=multi_worker_mirrored needs TF_CONFIG describing the "
                            "cluster; set it, or use --strategy=mirrored on one machine")
        return _cached((name,), tf.distribute.MultiWorkerMirroredStrategy)
    gpus = tf.config.list_physical_devices("GPU")
    if name == "one_device":
        device = "/gpu:0" if gpus else "/cpu:0"
        return _cached((name, device), lambda: tf.distribute.OneDeviceStrategy(device))
    if name == "mirrored":
        devices = ([f"/gpu:{i}" for i in range(len(gpus))] if gpus
                   else split_cpu(num_cpu_replicas))
        return _cached((name, *devices), lambda: tf.distribute.MirroredStrategy(devices))
    raise UserError(f"--strategy={name!r} is unknown; use one of {', '.join(STRATEGIES)}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True in the one process that writes checkpoints, logs and reports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return (resolver.task_type == "chief"
            or (resolver.task_type == "worker" and resolver.task_id == 0
                and "chief" not in resolver.cluster_spec().as_dict()))
