"""tfdp/gpus.py: signs of NVIDIA GPUs, the refusal to train on the CPU by
surprise, and the version codes preflight reports. No GPU is needed: the
device files live under a fake root and the environment is a dict."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run_cli
from tfdp import gpus
from tfdp.errors import UserError


def _root(tmp_path, devices=(), proc_gpus=()):
    for name in devices:
        (tmp_path / "dev").mkdir(exist_ok=True)
        (tmp_path / "dev" / name).touch()
    for bus in proc_gpus:
        (tmp_path / "proc" / "driver" / "nvidia" / "gpus" / bus).mkdir(parents=True)
    return str(tmp_path)


def test_device_files_are_a_sign(tmp_path):
    root = _root(tmp_path, devices=["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"])
    assert gpus.nvidia_signs({}, root) == ["/dev/nvidia0, /dev/nvidia1"]


def test_device_files_this_process_may_not_open_are_no_sign(tmp_path, monkeypatch):
    """A SLURM job that asked for no GPUs on a GPU node: the cgroup denies
    the device files that /dev still lists."""
    root = _root(tmp_path, devices=["nvidia0", "nvidia1"])
    real_open = gpus.os.open

    def cgroup_open(path, flags, *args):
        if path.endswith("nvidia1"):
            raise PermissionError(1, "Operation not permitted", path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(gpus.os, "open", cgroup_open)
    assert gpus.nvidia_signs({}, root) == ["/dev/nvidia0"]


def test_the_drivers_gpu_list_is_no_sign(tmp_path):
    """Every container on a GPU host sees /proc/driver/nvidia, CPU ones too."""
    root = _root(tmp_path, proc_gpus=["0000:3b:00.0"])
    assert gpus.nvidia_signs({}, root) == []


@pytest.mark.parametrize("environ, expected", [
    ({}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, []),  # CUDA base images set it everywhere
    ({"NVIDIA_VISIBLE_DEVICES": "void"}, []),
    ({"NVIDIA_VISIBLE_DEVICES": "GPU-4f1c"}, ["NVIDIA_VISIBLE_DEVICES=GPU-4f1c"]),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, ["CUDA_VISIBLE_DEVICES=0,1"]),
])
def test_environment_signs(tmp_path, environ, expected):
    assert gpus.nvidia_signs(environ, str(tmp_path)) == expected


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_gpus_hidden_on_purpose_are_no_sign(tmp_path, hidden):
    root = _root(tmp_path, devices=["nvidia0"])
    assert gpus.nvidia_signs({"CUDA_VISIBLE_DEVICES": hidden,
                              "NVIDIA_VISIBLE_DEVICES": "GPU-4f1c"}, root) == []


def test_no_registered_gpu_on_a_gpu_machine_is_refused(tmp_path):
    root = _root(tmp_path, devices=["nvidia0"])
    with pytest.raises(UserError) as err:
        gpus.check_registered(False, {}, root, gpus=[])
    message = str(err.value)
    assert "NVIDIA GPUs (/dev/nvidia0)" in message and "TensorFlow registered none" in message
    assert "likely cause:" in message and message.endswith("--allow_cpu to train on the CPU anyway")
    assert "\n" not in message


def test_allow_cpu_warns_on_stderr_and_goes_on(tmp_path, capsys):
    root = _root(tmp_path, devices=["nvidia0"])
    gpus.check_registered(True, {}, root, gpus=[])
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert ": warning: this machine has NVIDIA GPUs (/dev/nvidia0)" in line
    assert line.endswith("going on on the CPU (--allow_cpu)")


def test_nothing_is_said_when_gpus_are_registered_or_absent(tmp_path, capsys):
    root = _root(tmp_path, devices=["nvidia0"])
    gpus.check_registered(False, {}, root, gpus=["a registered GPU"])
    gpus.check_registered(False, {}, str(tmp_path / "bare"), gpus=[])
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("loadable, build, expected", [
    (set(), {"is_cuda_build": False}, "not built with CUDA"),
    (set(), None, "libcuda.so.1 cannot be loaded: in a container, start it with the NVIDIA "
                  "runtime"),
    ({"libcuda.so.1", "libcudart.so.12"}, None,
     "cannot load libcudnn.so.9, libcublas.so.12: pip install 'tensorflow[and-cuda]"),
    ({"libcuda.so.1", "libcudart.so.12", "libcudnn.so.9", "libcublas.so.12"}, None,
     "TF_CPP_MIN_LOG_LEVEL=0"),
])
def test_likely_cause(monkeypatch, loadable, build, expected):
    """Which library is missing decides the cause named: a CPU-only
    TensorFlow, no driver (a container without the NVIDIA runtime), missing
    CUDA/cuDNN libraries, or none of those."""
    monkeypatch.setattr(gpus, "_load", lambda soname, package=None:
                        object() if soname in loadable else None)
    if build is not None:
        monkeypatch.setattr(gpus.tf.sysconfig, "get_build_info", lambda: build)
    assert expected in gpus.likely_cause()


def test_install_hint_is_setup_pys_pin():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    (pin,) = re.findall(r'"tensorflow(>=[^"]+)"', setup)
    assert gpus.INSTALL_CUDA == f"pip install 'tensorflow[and-cuda]{pin}'"


class _FakeLibrary:
    """cuDriverGetVersion(int*) and ncclGetVersion(int*) write the version
    and return 0 (success); cudnnGetVersion() returns it."""

    def __init__(self, code: int):
        self.code = code

    def __getattr__(self, name):
        def by_pointer(pointer):
            pointer._obj.value = self.code
            return 0

        def returned():
            return self.code
        if name in ("cuDriverGetVersion", "ncclGetVersion"):
            return by_pointer
        if name == "cudnnGetVersion":
            return returned
        raise AttributeError(name)


def test_versions_are_read_from_the_libraries():
    assert gpus._version(_FakeLibrary(12080), "cuDriverGetVersion", True) == 12080
    assert gpus._version(_FakeLibrary(22707), "ncclGetVersion", True) == 22707
    assert gpus._version(_FakeLibrary(91000), "cudnnGetVersion", False) == 91000
    assert gpus._version(None, "cudnnGetVersion", False) == 0  # not loadable
    assert gpus._version(_FakeLibrary(1), "missingFunction", True) == 0


def test_version_codes_read_as_the_libraries_write_them():
    assert gpus.dotted(12080, "cuda") == "12.8"
    assert gpus.dotted(12050, "cuda") == "12.5"
    assert gpus.dotted(90300, "cudnn") == "9.3.0"
    assert gpus.dotted(91000, "cudnn") == "9.10.0"
    assert gpus.dotted(22707, "nccl") == "2.27.7"
    assert gpus.dotted(0, "nccl") == "-"


def test_versions_on_a_machine_without_gpus():
    found = gpus.versions()
    assert (found["gpus"], found["gpu_name"], found["driver_cuda"], found["cudnn"],
            found["nccl"]) == (0, "", 0, 0, 0)
    assert found["built_cuda"].startswith("12.")  # TF 2.21's wheel: CUDA 12.5


def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path):
    """NVIDIA_VISIBLE_DEVICES as the device plugin sets it, on this machine
    where TensorFlow registers no GPU."""
    model_dir = tmp_path / "run"
    result = run_cli("tfdp-train", f"--model_dir={model_dir}", "--train_steps=1",
                     env={"NVIDIA_VISIBLE_DEVICES": "GPU-4f1c"}, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tfdp-train: error: this machine has NVIDIA GPUs "
                           "(NVIDIA_VISIBLE_DEVICES=GPU-4f1c)")
    assert "--allow_cpu" in line
    assert not model_dir.exists()


def test_cli_with_allow_cpu_says_so_at_any_log_level(tmp_path):
    """tfdp-preflight builds its strategy as tfdp-train does: with
    --allow_cpu it warns (the CLI has TF_CPP_MIN_LOG_LEVEL=3) and passes."""
    result = run_cli("tfdp-preflight", "--strategy=one_device", "--allreduce_mb=0.1",
                     "--allow_cpu", env={"NVIDIA_VISIBLE_DEVICES": "GPU-4f1c"}, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [l for l in result.stderr.splitlines() if "warning: this machine has NVIDIA" in l]
    assert len(warnings) == 1, result.stderr[-2000:]
    assert "preflight: passed" in result.stdout
    assert "no GPU (CPU only)" in result.stdout  # the GPU table's row for this worker
