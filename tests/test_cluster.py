"""tfdp/cluster.py in-process: TF_CONFIG validation, SLURM discovery, ports.

TF_CONFIG cases already in test_errors.py::test_parse_tf_config_rejects are
not repeated here. Nothing here starts a TensorFlow server: the resolvers
are only asked for their cluster.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import tensorflow as tf

from tfdp import cluster
from tfdp.cluster import (check_own_port, cluster_resolver, in_slurm_step, num_tasks,
                          parse_tf_config)
from tfdp.errors import UserError
from tfdp.launch import free_ports, tf_configs

# --- TF_CONFIG --------------------------------------------------------------


def test_parse_tf_config_accepts_chief_and_workers():
    raw = {"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"]},
           "task": {"type": "chief", "index": 0}}
    assert parse_tf_config(json.dumps(raw)) == raw
    raw["task"] = {"type": "worker", "index": 1}
    assert parse_tf_config(json.dumps(raw)) == raw


def test_parse_tf_config_reads_the_environment(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert parse_tf_config() is None
    raw = tf_configs([1234, 1235])[1]
    monkeypatch.setenv("TF_CONFIG", raw)
    assert parse_tf_config() == json.loads(raw)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}')
    with pytest.raises(UserError, match='no "task"'):
        parse_tf_config()


def tf_config(cluster_: dict, task: object = None) -> str:
    task = {"type": "worker", "index": 0} if task is None else task
    return json.dumps({"cluster": cluster_, "task": task})


@pytest.mark.parametrize("raw, message", [
    # A parameter-server job beside the workers.
    (tf_config({"worker": ["a:1"], "ps": ["p:1"]}), 'names a "ps" job'),
    (tf_config({"chief": ["c:1"], "evaluator": ["e:1"]}, {"type": "chief", "index": 0}),
     'names a "evaluator" job'),
    # Job entries that are not lists of strings.
    (tf_config({"worker": "a:1"}), "\"worker\" must be a list of \"host:port\" strings, got 'a:1'"),
    (tf_config({"worker": ["a:1", 2]}), '"worker" must be a list of "host:port" strings'),
    (tf_config({"worker": {"0": "a:1"}}), '"worker" must be a list'),
    (tf_config({"chief": "c:1", "worker": ["a:1"]}), '"chief" must be a list'),
    # Addresses without a (numeric) port.
    (tf_config({"worker": ["a:1", "b"]}), "got ['a:1', 'b']"),
    (tf_config({"worker": ["a:"]}), "\"host:port\" strings, got ['a:']"),
    (tf_config({"worker": ["a:http"]}), "got ['a:http']"),
    (tf_config({"worker": ["a b:1"]}), "got ['a b:1']"),
    # Indexes of the wrong type or size (-1 is in test_errors.py).
    (tf_config({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": -3}),
     "index -3 is outside the \"worker\" list of 2; use an index from 0 to 1"),
    (tf_config({"worker": ["a:1"]}, {"type": "worker", "index": "0"}), "index '0' is outside"),
    (tf_config({"worker": ["a:1"]}, {"type": "worker", "index": 0.0}), "index 0.0 is outside"),
    # Task types not in the cluster ("chief" is in test_errors.py).
    (tf_config({"worker": ["a:1"]}, {"type": "ps", "index": 0}),
     'task type "ps" is not a job in the cluster (worker)'),
    (tf_config({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "evaluator", "index": 0}),
     'task type "evaluator" is not a job in the cluster (chief, worker)'),
    # A task without its type or index, or not an object.
    (tf_config({"worker": ["a:1"]}, {"type": "worker"}), 'no "task" with "type" and "index"'),
    (tf_config({"worker": ["a:1"]}, {"index": 0}), 'no "task" with "type" and "index"'),
    (tf_config({"worker": ["a:1"]}, "worker:0"), 'no "task" with "type" and "index"'),
])
def test_parse_tf_config_rejects_more(raw, message):
    with pytest.raises(UserError) as err:
        parse_tf_config(raw)
    text = str(err.value)
    assert message in text, text
    assert text.startswith("TF_CONFIG ") and "\n" not in text


def test_parse_tf_config_rejects_a_list_task_type():
    raw = tf_config({"worker": ["a:1"]}, {"type": ["worker"], "index": 0})
    with pytest.raises(UserError, match="task type"):
        parse_tf_config(raw)


# --- SLURM ------------------------------------------------------------------


@pytest.fixture
def slurm(monkeypatch, tmp_path):
    """A clean SLURM-free, GPU-free environment; returns a setter for a step."""
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no nvidia-smi

    def step(procid, num_tasks, nodelist, tasks_per_node):
        for name, value in [("SLURM_PROCID", procid), ("SLURM_STEP_NUM_TASKS", num_tasks),
                            ("SLURM_STEP_NODELIST", nodelist),
                            ("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)]:
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
    return step


def test_slurm_two_nodes_cpu(slurm):
    slurm(1, 2, "node[1-2]", "1(x2)")
    assert in_slurm_step()
    resolver = cluster_resolver(slurm_port_base=9000)
    assert isinstance(resolver, tf.distribute.cluster_resolver.SlurmClusterResolver)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9000", "node2:9000"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    assert num_tasks(resolver) == 2
    # The CPU path must not hand this task a GPU.
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_slurm_two_tasks_on_one_node_cpu(slurm):
    slurm(0, 2, "node1", "2")
    resolver = cluster_resolver(slurm_port_base=9000)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9000", "node1:9001"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 0)
    assert num_tasks(resolver) == 2
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_slurm_uneven_tasks_per_node_cpu(slurm):
    slurm(2, 3, "a[1-2]", "2,1")
    resolver = cluster_resolver(slurm_port_base=7000)
    assert resolver.cluster_spec().as_dict() == {"worker": ["a1:7000", "a1:7001", "a2:7000"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert num_tasks(resolver) == 3


def test_slurm_gpu_path_assigns_one_gpu_per_task(slurm, monkeypatch):
    """With GPUs visible, TensorFlow's resolver gives each task its own GPU."""
    slurm(1, 2, "node1", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    resolver = cluster_resolver(slurm_port_base=9000)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9000", "node1:9001"]}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_slurm_cpu_resolver_reports_no_gpu(slurm):
    slurm(1, 2, "node[1-2]", "1(x2)")
    resolver = cluster_resolver(slurm_port_base=9000)
    resolver.cluster_spec()
    assert resolver.num_accelerators().get("GPU", 0) == 0


def test_slurm_with_hidden_gpus_two_tasks_per_node(slurm, monkeypatch):
    slurm(0, 2, "node1", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    resolver = cluster_resolver(slurm_port_base=9000)
    assert num_tasks(resolver) == 2
    assert resolver.num_accelerators().get("GPU", 0) == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # still hidden


@pytest.mark.parametrize("procid, num_tasks_, why", [
    (0, 1, "a single-task step"),
    (None, 2, "no SLURM_PROCID (e.g. salloc without srun)"),
    (0, None, "no SLURM_STEP_NUM_TASKS"),
])
def test_not_a_multi_task_slurm_step(slurm, procid, num_tasks_, why):
    slurm(procid, num_tasks_, "node1", "1")
    assert not in_slurm_step(), why
    assert cluster_resolver(slurm_port_base=9000) is None
    assert num_tasks(None) == 1


def test_slurm_step_variables_unreadable(slurm):
    slurm(0, 2, "node[1-2", "1(x2)")
    with pytest.raises(UserError, match="cannot read the SLURM job step"):
        cluster_resolver(slurm_port_base=9000)


def test_tf_config_wins_over_slurm(slurm, monkeypatch):
    slurm(1, 2, "node[1-2]", "1(x2)")
    raw = tf_configs([4000, 4001, 4002])[2]
    monkeypatch.setenv("TF_CONFIG", raw)
    resolver = cluster_resolver(slurm_port_base=9000)
    assert isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)
    assert resolver.cluster_spec().as_dict() == json.loads(raw)["cluster"]
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert num_tasks(resolver) == 3


# --- tfdp-launch's TF_CONFIG ------------------------------------------------


def test_launch_tf_config_resolves(monkeypatch):
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    ports = free_ports(3)
    assert len(set(ports)) == 3
    for index, raw in enumerate(tf_configs(ports)):
        monkeypatch.setenv("TF_CONFIG", raw)
        resolver = cluster_resolver()
        assert isinstance(resolver, tf.distribute.cluster_resolver.TFConfigClusterResolver)
        assert resolver.cluster_spec().as_dict() == {
            "worker": [f"127.0.0.1:{p}" for p in ports]}
        assert (resolver.task_type, resolver.task_id) == ("worker", index)
        assert num_tasks(resolver) == 3
        assert cluster._own_address(resolver) == f"127.0.0.1:{ports[index]}"


# --- check_own_port ---------------------------------------------------------


def resolver_for(ports: list[int], index: int, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_configs(ports)[index])
    return cluster_resolver()


def test_check_own_port_taken(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        free = free_ports(1)[0]
        resolver = resolver_for([taken, free], 0, monkeypatch)
        with pytest.raises(UserError) as err:
            check_own_port(resolver)
        message = str(err.value)
        assert f"port {taken} of worker 0 (127.0.0.1:{taken}) is in use" in message
        # The other task's port is free: its check passes.
        check_own_port(resolver_for([taken, free], 1, monkeypatch))


def test_check_own_port_free_leaves_it_free(monkeypatch):
    port = free_ports(1)[0]
    check_own_port(resolver_for([port], 0, monkeypatch))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # check_own_port did not keep it
