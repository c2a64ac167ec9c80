"""Strategy factory: one string in, one tf.distribute.Strategy out.

auto           MultiWorkerMirrored when TF_CONFIG or a SLURM step names more
               than one task, else Mirrored over all GPUs, else Mirrored over
               the CPU split into `num_cpu_replicas` logical devices.
one_device     a single replica on the first GPU or the CPU.
mirrored       synchronous replicas on this machine (GPUs or logical CPUs).
multi_worker_mirrored
               TensorFlow's collective ops across processes (gRPC between
               hosts, NCCL between GPUs), cluster from TF_CONFIG or SLURM
               (tfdp/cluster.py), every local GPU (or the CPU) one replica.
"""

from __future__ import annotations

import tensorflow as tf

from tfdp import cluster, watchdog
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


def build_strategy(name: str, num_cpu_replicas: int = 2, *, collective_timeout: float = 600.0,
                   slurm_port_base: int = 8888) -> tf.distribute.Strategy:
    """Return the strategy named by `--strategy` (see the module docstring)."""
    resolver = cluster.cluster_resolver(slurm_port_base)
    if name == "auto":
        name = "multi_worker_mirrored" if cluster.num_tasks(resolver) > 1 else "mirrored"
    if name == "multi_worker_mirrored":
        if resolver is None:
            raise UserError("--strategy=multi_worker_mirrored needs a cluster: set TF_CONFIG, "
                            "run under srun, or start it with tfdp-launch; on one machine "
                            "use --strategy=mirrored")
        return _cached((name,), lambda: _multi_worker(resolver, collective_timeout))
    if cluster.num_tasks(resolver) > 1:
        raise UserError(f"this process is one of {cluster.num_tasks(resolver)} tasks of a "
                        f"cluster (TF_CONFIG or SLURM), but --strategy={name} trains alone; use "
                        "--strategy=auto or multi_worker_mirrored, or unset TF_CONFIG")
    gpus = tf.config.list_physical_devices("GPU")
    if name == "one_device":
        device = "/gpu:0" if gpus else "/cpu:0"
        return _cached((name, device), lambda: tf.distribute.OneDeviceStrategy(device))
    if name == "mirrored":
        devices = ([f"/gpu:{i}" for i in range(len(gpus))] if gpus
                   else split_cpu(num_cpu_replicas))
        return _cached((name, *devices), lambda: tf.distribute.MirroredStrategy(devices))
    raise UserError(f"--strategy={name!r} is unknown; use one of {', '.join(STRATEGIES)}")


def _multi_worker(resolver, timeout: float) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy that cannot wait forever for its peers."""
    cluster.check_own_port(resolver)
    cluster.configure_coordination(resolver, timeout)
    join = watchdog.join_watchdog(resolver, timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    finally:
        join.communicate(b"joined\n")
    watchdog.start_watchdog(resolver, timeout)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True in the one process that writes checkpoints, logs and reports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return (resolver.task_type == "chief"
            or (resolver.task_type == "worker" and resolver.task_id == 0
                and "chief" not in resolver.cluster_spec().as_dict()))
