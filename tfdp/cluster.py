"""Where the other workers are: TF_CONFIG or SLURM -> a cluster resolver.

A multi-worker job is described either by TF_CONFIG (set by Kubernetes /
Kubeflow TFJob, by tfdp-launch, or by hand) or by a SLURM job step (srun
sets SLURM_PROCID, SLURM_STEP_NUM_TASKS, ...; TensorFlow's
SlurmClusterResolver turns them into a cluster). TF_CONFIG wins when both
are present. Checks a user's cluster config before anything is built, and
configures TF's coordination service, whose heartbeat notices dead and
frozen peers (what happens then: tfdp/watchdog.py).
"""

from __future__ import annotations

import json
import os
import re
import socket

import tensorflow as tf
from tensorflow.python.distribute import multi_worker_util
from tensorflow.python.eager import context

from tfdp.errors import UserError

JOBS = ("chief", "worker")  # the task types MultiWorkerMirroredStrategy trains with


def parse_tf_config(raw: str | None = None) -> dict | None:
    """Validate TF_CONFIG and return it, or None when unset.

    Checks what a typo usually breaks: JSON syntax, a cluster with a worker
    list, task types this strategy can run, and a task index inside its job.
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
    for job, addresses in cluster.items():
        if job not in JOBS:
            raise UserError(f'TF_CONFIG names a "{job}" job, which synchronous data parallelism '
                            'does not use; keep only "chief" and "worker" in the cluster')
        if not isinstance(addresses, list) or not all(
                isinstance(a, str) and re.fullmatch(r"\S+:\d+", a)
                and 0 < int(a.rsplit(":", 1)[1]) < 65536 for a in addresses):
            raise UserError(f'TF_CONFIG "{job}" must be a list of "host:port" strings, '
                            f"got {addresses!r}")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise UserError('TF_CONFIG has no "task" with "type" and "index"; '
                        'add e.g. "task": {"type": "worker", "index": 0}')
    job = cluster.get(task["type"]) if isinstance(task["type"], str) else None
    if not isinstance(job, list):
        raise UserError(f'TF_CONFIG task type "{task["type"]}" is not a job in the cluster '
                        f"({', '.join(cluster)}); use one of those")
    index = task["index"]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(job):
        raise UserError(f'TF_CONFIG task index {index!r} is outside the "{task["type"]}" '
                        f"list of {len(job)}; use an index from 0 to {len(job) - 1}")
    return config


def in_slurm_step() -> bool:
    """True inside an `srun` step of more than one task."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and \
        "SLURM_PROCID" in os.environ


class _CpuSlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """SlurmClusterResolver for nodes without GPUs.

    The stock resolver places tasks by GPU slots, so on a CPU node it places
    none; here every task gets one pseudo slot (for its port) and the
    resolver reports no accelerators, so each worker trains on its CPU.
    """

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
        return {}


def _slurm_resolver(port_base: int):
    """SlurmClusterResolver for the current srun step, GPU or CPU nodes."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    has_gpus = bool(visible.strip()) if visible is not None else any(
        os.access(os.path.join(d, "nvidia-smi"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep) if d)
    try:
        if has_gpus:
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base)
        else:
            per_node = max(int(n.split("(")[0]) for n in
                           os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split(","))
            resolver = _CpuSlurmResolver(port_base=port_base, gpus_per_node=per_node,
                                         gpus_per_task=1, auto_set_gpu=False)
        resolver.cluster_spec()  # resolves (and on GPUs sets CUDA_VISIBLE_DEVICES) now
        return resolver
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the SLURM job step ({err}); start tfdp-train with srun "
                        "inside an allocation, or set TF_CONFIG instead") from None


def cluster_resolver(slurm_port_base: int = 8888):
    """The cluster this process belongs to, or None when it runs alone."""
    tf_config = parse_tf_config()
    if tf_config is not None:
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if in_slurm_step():
        return _slurm_resolver(slurm_port_base)
    return None


def num_tasks(resolver) -> int:
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, [])) for job in JOBS)


def input_pipeline(strategy) -> tuple[int, int]:
    """(this worker's input pipeline id, number of pipelines), as the
    strategy's InputContext will report them: one pipeline per worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if num_tasks(resolver) <= 1:
        return 0, 1
    spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
    return (multi_worker_util.id_in_cluster(spec, resolver.task_type, resolver.task_id),
            num_tasks(resolver))


def tasks(resolver) -> list[tuple[str, int, str]]:
    """(job, index, "host:port") of every task in the cluster."""
    spec = resolver.cluster_spec().as_dict()
    return [(job, i, address) for job in JOBS for i, address in enumerate(spec.get(job, []))]


def _own_address(resolver) -> str:
    return resolver.cluster_spec().as_dict()[resolver.task_type][resolver.task_id]


def check_own_port(resolver) -> None:
    """Fail clearly when this task's port is taken (TF's own error is cryptic)."""
    port = int(_own_address(resolver).rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            raise UserError(f"port {port} of {resolver.task_type} {resolver.task_id} "
                            f"({_own_address(resolver)}) is in use by another process; free it "
                            "or give this task another port in the cluster spec") from None


def configure_coordination(resolver, timeout: float) -> None:
    """Set up TF's coordination service before the strategy does, so its
    heartbeat (which notices dead and frozen peers) uses our timeout."""
    spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2 as pb
    millis = int(timeout * 1000)
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(spec),
        heartbeat_timeout_in_ms=millis,
        cluster_register_timeout_in_ms=millis,
        shutdown_barrier_timeout_in_ms=millis,
        coordinated_jobs=[pb.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
                          for job in JOBS if job in spec.jobs])
