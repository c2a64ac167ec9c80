"""Strategy factory: one string in, one tf.distribute.Strategy out.

auto           MultiWorkerMirrored when TF_CONFIG or a SLURM step names more
               than one task, else Mirrored over all GPUs, else Mirrored over
               the CPU split into `num_cpu_replicas` logical devices.
one_device     a single replica on the first GPU or the CPU.
mirrored       synchronous replicas on this machine (GPUs or logical CPUs).
multi_worker_mirrored
               TensorFlow's collective ops across processes, cluster from
               TF_CONFIG or SLURM (tfdp/cluster.py), every local GPU (or the
               CPU) one replica.

How the replicas all-reduce (`collective`, --collective): both strategies
sum with TensorFlow's collective ops, whose AUTO implementation is RING
(gRPC across workers, device copies within one) unless NCCL is asked for by
name, even between GPUs; so tfdp asks. `choose_collective` decides from the
worker's own devices: NCCL with GPUs, unless the gradients travel as
bfloat16, which TensorFlow's NCCL ops do not take; else RING. Every worker
decides for itself, so the workers of one job must all have GPUs or none.
`collective_of(strategy)` names the one in use, for the log.

Before any of this, `gpus.check_registered` refuses a GPU machine on which
TensorFlow registered no GPU (unless `allow_cpu`): nothing trains on the CPU
by surprise.
"""

from __future__ import annotations

import tensorflow as tf

from tfdp import cluster, gpus, watchdog
from tfdp.config import COLLECTIVES, STRATEGIES
from tfdp.errors import UserError

NCCL, RING = "NCCL", "RING"


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


def choose_collective(requested: str, num_gpus: int, wire_dtype: str = "float32") -> str:
    """The all-reduce, NCCL or RING, for `--collective=requested` on a
    worker with `num_gpus` GPUs, summing `wire_dtype` (--all_reduce_dtype)."""
    if requested not in COLLECTIVES:
        raise UserError(f"--collective={requested!r} is unknown; use one of "
                        f"{', '.join(COLLECTIVES)}")
    if requested == "nccl" and not num_gpus:
        raise UserError("--collective=nccl needs GPUs and this worker has none; use "
                        "--collective=auto (RING on CPUs) or ring")
    # TensorFlow's NCCL manager takes float16, float32, float64 and integers
    # (tensorflow/core/nccl/nccl_manager.cc, kValidDataTypes): no bfloat16.
    if requested == "nccl" and wire_dtype == "bfloat16":
        raise UserError("--collective=nccl cannot sum --all_reduce_dtype=bfloat16 (TensorFlow's "
                        "NCCL ops take no bfloat16); use --all_reduce_dtype=float32 with NCCL, "
                        "or --collective=auto or ring for bfloat16 without it")
    if requested == "nccl" or (requested == "auto" and num_gpus and wire_dtype != "bfloat16"):
        return NCCL
    return RING


# Strategies built in this process, by kind, devices and collective, with
# that collective's name. Reusing one matters: two MirroredStrategy objects
# over the same devices restart their collective instance keys, so a second
# model trained in the same process (a notebook, a sweep, the test suite)
# would hit "Shape mismatch in the collective instance" when the first one's
# keys are reused with other tensor shapes.
_BUILT: dict[tuple, tuple[tf.distribute.Strategy, str]] = {}


def _cached(key: tuple, collective: str, make) -> tf.distribute.Strategy:
    if key not in _BUILT:
        _BUILT[key] = (make(), collective)
    return _BUILT[key][0]


def collective_of(strategy: tf.distribute.Strategy) -> str:
    """How `strategy` (one build_strategy returned) all-reduces, in words."""
    for built, collective in _BUILT.values():
        if built is strategy:
            return collective
    return "TensorFlow's default"


def describe(strategy: tf.distribute.Strategy) -> str:
    """The log's words for a strategy: kind, replicas, devices, all-reduce."""
    replicas = strategy.num_replicas_in_sync
    reduce = collective_of(strategy) if replicas > 1 else "none (one replica)"
    return (f"{type(strategy).__name__} with {replicas} replica(s) "
            f"({', '.join(strategy.extended.worker_devices)}); all-reduce: {reduce}")


def build_strategy(name: str, num_cpu_replicas: int = 2, *, collective_timeout: float = 600.0,
                   slurm_port_base: int = 8888, collective: str = "auto",
                   allow_cpu: bool = False,
                   all_reduce_dtype: str = "float32") -> tf.distribute.Strategy:
    """Return the strategy named by `--strategy` (see the module docstring)."""
    resolver = cluster.cluster_resolver(slurm_port_base)
    if name not in STRATEGIES:
        raise UserError(f"--strategy={name!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if name == "auto":
        name = "multi_worker_mirrored" if cluster.num_tasks(resolver) > 1 else "mirrored"
    if name == "multi_worker_mirrored" and resolver is None:
        raise UserError("--strategy=multi_worker_mirrored needs a cluster: set TF_CONFIG, "
                        "run under srun, or start it with tfdp-launch; on one machine "
                        "use --strategy=mirrored")
    if name != "multi_worker_mirrored" and cluster.num_tasks(resolver) > 1:
        raise UserError(f"this process is one of {cluster.num_tasks(resolver)} tasks of a "
                        f"cluster (TF_CONFIG or SLURM), but --strategy={name} trains alone; use "
                        "--strategy=auto or multi_worker_mirrored, or unset TF_CONFIG")
    local_gpus = tf.config.list_physical_devices("GPU")
    gpus.check_registered(allow_cpu, gpus=local_gpus)
    chosen = choose_collective(collective, len(local_gpus), all_reduce_dtype)
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=getattr(tf.distribute.experimental.CommunicationImplementation, chosen))
    if name == "multi_worker_mirrored":
        # One per process (TensorFlow refuses a second): asking again for
        # another collective is an error, not a silent reuse.
        built = _BUILT.get((name,))
        if built is not None and built[1] != chosen:
            raise UserError(f"this process already joined its cluster with the {built[1]} "
                            f"all-reduce; --collective={collective} ({chosen}) needs a new "
                            "process")
        return _cached((name,), chosen,
                       lambda: _multi_worker(resolver, collective_timeout, options))
    if name == "one_device":
        device = "/gpu:0" if local_gpus else "/cpu:0"
        return _cached((name, device), "none (one replica)",
                       lambda: tf.distribute.OneDeviceStrategy(device))
    devices = ([f"/gpu:{i}" for i in range(len(local_gpus))] if local_gpus
               else split_cpu(num_cpu_replicas))
    return _cached((name, chosen, *devices), chosen, lambda: _mirrored(devices, options))


def _mirrored(devices: list[str], options) -> tf.distribute.Strategy:
    """MirroredStrategy summing with `options`' implementation.

    Left to itself it sums with collective ops (CollectiveAllReduce; RING
    on CPUs, AUTO on GPUs) and, unlike MultiWorkerMirroredStrategy, takes no
    communication options. Every reduction it makes outside XLA (tfdp's
    all-reduce runs in the replica function, outside its compiled
    forward/backward) merges the options its `extended` keeps, so they are
    set there. Passing other cross_device_ops instead (NcclAllReduce,
    ReductionToOneDevice) changes how replica-context all-reduces run: tried
    here, ReductionToOneDevice made tfdp's steps return no losses in the
    fault tests (tests/test_faults.py).
    """
    strategy = tf.distribute.MirroredStrategy(devices)
    strategy.extended._communication_options = options  # TF 2.21's field; see above
    return strategy


def _multi_worker(resolver, timeout: float, options) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy that cannot wait forever for its peers."""
    cluster.check_own_port(resolver)
    cluster.configure_coordination(resolver, timeout)
    join = watchdog.join_watchdog(resolver, timeout)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                             communication_options=options)
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
