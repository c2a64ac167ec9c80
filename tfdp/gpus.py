"""NVIDIA GPUs as this process sees them: is there hardware, did TensorFlow
register it, and which driver, cuDNN and NCCL does it run on.

Why this module exists: a TensorFlow that cannot load its CUDA libraries
logs "Cannot dlopen some GPU libraries ... Skipping registering GPU devices"
as a warning, which TF_CPP_MIN_LOG_LEVEL=2 (the image's) or 3 (tfdp's own
default) hides, and then lists no GPU; every strategy would quietly train on
the CPU of a GPU node. `check_registered` turns that into one line that no
log level hides: an error, or with --allow_cpu a warning.

Signs of NVIDIA GPUs given to this process:
  /dev/nvidia0, /dev/nvidia1, ...  device files this process may open: the
                                   container runtime passed them in, or the
                                   host has them and no cgroup denies them
                                   (SLURM's ConstrainDevices denies a job the
                                   GPUs it did not ask for);
  NVIDIA_VISIBLE_DEVICES=ids       the NVIDIA device plugin or toolkit gave
                                   this container GPUs; "all" alone is not a
                                   sign, since CUDA base images set it on
                                   every machine, GPUs or not;
  CUDA_VISIBLE_DEVICES=ids         the user asked for GPUs.
Not a sign: /proc/driver/nvidia, which every container on a GPU host sees,
CPU-only ones too. CUDA_VISIBLE_DEVICES set empty or to -1 hides the GPUs
on purpose: no check.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys

import tensorflow as tf

from tfdp.errors import UserError

_HIDDEN = ("", "-1")  # CUDA_VISIBLE_DEVICES values that hide every GPU
_NOT_A_SIGN = ("", "all", "void", "none")  # NVIDIA_VISIBLE_DEVICES values
INSTALL_CUDA = "pip install 'tensorflow[and-cuda]>=2.21,<2.22'"  # setup.py's pin, with CUDA
# The libraries TensorFlow 2.21 opens at start-up (and NCCL), with the NVIDIA
# pip packages of tensorflow[and-cuda] that hold them.
_SONAMES = {"cudnn": ("libcudnn.so.9", "cudnn"), "cublas": ("libcublas.so.12", "cublas"),
            "cuda_runtime": ("libcudart.so.12", "cuda_runtime"),
            "nccl": ("libnccl.so.2", "nccl")}


def nvidia_signs(environ=None, root: str = "/") -> list[str]:
    """What says this machine has NVIDIA GPUs for this process (see the
    module doc); empty when nothing does or the user hid them."""
    environ = os.environ if environ is None else environ
    cuda = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None and cuda.strip() in _HIDDEN:
        return []
    signs = []
    devices = [d for d in sorted(glob.glob(os.path.join(root, "dev", "nvidia[0-9]*")))
               if _openable(d)]
    if devices:
        signs.append(", ".join("/" + os.path.relpath(d, root) for d in devices))
    visible = environ.get("NVIDIA_VISIBLE_DEVICES", "")
    if visible.strip().lower() not in _NOT_A_SIGN:
        signs.append(f"NVIDIA_VISIBLE_DEVICES={visible}")
    if cuda:
        signs.append(f"CUDA_VISIBLE_DEVICES={cuda}")
    return signs


def _openable(path: str) -> bool:
    """May this process open the device file (no cgroup or mode denies it)?"""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def _load(soname: str, package: str | None = None):
    """The shared library `soname` (as the process already loaded it, or
    from the NVIDIA pip package `package`, where TensorFlow finds it), or None."""
    candidates = [soname]
    if package and importlib.util.find_spec("nvidia") is not None:
        spec = importlib.util.find_spec(f"nvidia.{package}")
        for where in (spec.submodule_search_locations or []) if spec else []:
            candidates += sorted(glob.glob(os.path.join(where, "lib", soname + "*")))
    for candidate in candidates:
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None


def likely_cause() -> str:
    """Why TensorFlow registered no GPU, as far as this process can tell."""
    build = tf.sysconfig.get_build_info()
    if not build.get("is_cuda_build"):
        return f"this TensorFlow is not built with CUDA; install the CUDA build: {INSTALL_CUDA}"
    wants = f"CUDA {build.get('cuda_version', '?')} and cuDNN {build.get('cudnn_version', '?')}"
    if _load("libcuda.so.1") is None:
        return ("the NVIDIA driver's libcuda.so.1 cannot be loaded: in a container, start it "
                "with the NVIDIA runtime (docker run --gpus all; on Kubernetes the NVIDIA "
                "device plugin and container toolkit), on a host install the driver")
    missing = [p for p in ("cudnn", "cublas", "cuda_runtime") if _load(*_SONAMES[p]) is None]
    if missing:
        return (f"TensorFlow {tf.__version__} needs {wants} and cannot load "
                f"{', '.join(_SONAMES[p][0] for p in missing)}: {INSTALL_CUDA} (the "
                "Dockerfile's GPU image has them), or put those libraries on LD_LIBRARY_PATH")
    return (f"the CUDA libraries load but TensorFlow (built for {wants}) still found no "
            "usable GPU: check that the driver supports CUDA 12 (nvidia-smi), and run with "
            "TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's own reason")


def check_registered(allow_cpu: bool, environ=None, root: str = "/", gpus=None) -> None:
    """Refuse (or with `allow_cpu` warn on stderr) when NVIDIA GPUs are here
    but TensorFlow registered none; do nothing otherwise."""
    if gpus is None:
        gpus = tf.config.list_physical_devices("GPU")
    signs = [] if gpus else nvidia_signs(environ, root)
    if not signs:
        return
    problem = (f"this machine has NVIDIA GPUs ({'; '.join(signs)}) but TensorFlow registered "
               f"none, so it would train on the CPU: likely cause: {likely_cause()}")
    if not allow_cpu:
        raise UserError(f"{problem}; or pass --allow_cpu to train on the CPU anyway")
    # print, not logging: no TF_CPP_MIN_LOG_LEVEL or absl verbosity hides it.
    print(f"{os.path.basename(sys.argv[0])}: warning: {problem}; going on on the CPU "
          "(--allow_cpu)", file=sys.stderr, flush=True)


def _version(library, function: str, by_pointer: bool) -> int:
    """An integer version from `library.function()` or `function(&v)`; 0 if none."""
    if library is None or not hasattr(library, function):
        return 0
    call = getattr(library, function)
    if not by_pointer:
        call.restype = ctypes.c_size_t
        return int(call())
    value = ctypes.c_int(0)
    return value.value if call(ctypes.byref(value)) == 0 else 0


def versions() -> dict:
    """This worker's GPUs and GPU libraries: `gpus` (count), `gpu_name` (the
    first GPU's), `driver_cuda` (the CUDA version the driver supports, e.g.
    12080), `cudnn` (e.g. 90300) and `nccl` (e.g. 22707) as loaded, and the
    CUDA/cuDNN TensorFlow was built for. Zeros on a machine without GPUs;
    no library is loaded there."""
    gpus = tf.config.list_physical_devices("GPU")
    build = tf.sysconfig.get_build_info()
    out = {"gpus": len(gpus), "gpu_name": "", "driver_cuda": 0, "cudnn": 0, "nccl": 0,
           "built_cuda": build.get("cuda_version", ""),
           "built_cudnn": build.get("cudnn_version", "")}
    if not gpus:
        return out
    details = tf.config.experimental.get_device_details(gpus[0])
    out["gpu_name"] = details.get("device_name", "GPU")
    out["driver_cuda"] = _version(_load("libcuda.so.1"), "cuDriverGetVersion", True)
    out["cudnn"] = _version(_load(*_SONAMES["cudnn"]), "cudnnGetVersion", False)
    out["nccl"] = _version(_load(*_SONAMES["nccl"]), "ncclGetVersion", True)
    return out


def dotted(code: int, kind: str) -> str:
    """12080 -> '12.8' (CUDA), 90300 -> '9.3.0' (cuDNN), 22707 -> '2.27.7'
    (NCCL); '-' for 0."""
    if not code:
        return "-"
    if kind == "cuda":
        return f"{code // 1000}.{code % 1000 // 10}"
    return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
