# tfdp image for GPU clusters (docs/guide.md, "Containers and clusters").
#
#   docker build -t tfdp .                                  # GPU: CUDA 12, cuDNN 9, NCCL
#   docker build -t tfdp:cpu --build-arg DEVICE=cpu .       # CPU only, 3 GB smaller
#   docker run --gpus all --shm-size=16g -v "$PWD/runs:/runs" tfdp --model_dir=/runs/demo
#   docker run --gpus all --entrypoint tfdp-preflight tfdp   # GPUs seen, CUDA/cuDNN/NCCL
#
# Not tensorflow/tensorflow:2.21.0-gpu: that image's recipe (tensorflow/build)
# still brings CUDA 12.3, cuDNN 8.9 and no NCCL, while the TF 2.21 wheel is
# built for CUDA 12.5 and cuDNN 9 (tf.sysconfig.get_build_info()); there
# TensorFlow cannot load its GPU libraries and trains on the CPU. Instead: a
# slim Python and the wheel's own `and-cuda` extra, which brings the CUDA 12
# runtime, cuBLAS, cuDNN 9, NCCL and ptxas as pip packages that TensorFlow
# finds by itself, within TF's ranges (CUDA >= 12.5 and < 13, cuDNN >= 9.3
# and < 10, NCCL >= 2.27 and < 3; pip takes the newest). The NVIDIA driver (libcuda) is the host's, passed in by
# the NVIDIA container runtime (docker run --gpus, Kubernetes' device plugin).
ARG PYTHON=3.11
FROM python:${PYTHON}-slim-bookworm

# gpu or cpu: the same TensorFlow wheel, with or without NVIDIA's libraries.
ARG DEVICE=gpu

# TF_CPP_MIN_LOG_LEVEL=2: TensorFlow's C++ errors reach the log, its start-up
# notes and warnings do not (0 shows everything when debugging). A GPU that
# TensorFlow fails to register is said by tfdp itself, whatever this says.
# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA runtime mounts (CUDA and
# nvidia-smi). NVIDIA_VISIBLE_DEVICES is left to the runtime and the
# scheduler, so that the image does not claim GPUs on machines without any.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# tini is PID 1: it passes SIGTERM on to tfdp-train (which then checkpoints)
# and reaps the processes tfdp starts (tfdp-launch's workers, watchdogs).
RUN apt-get update && \
    apt-get install -y --no-install-recommends tini=0.19.* && \
    rm -rf /var/lib/apt/lists/*

# Dependencies first, in their own layer: only setup.py invalidates it, not
# code or README edits. TensorFlow goes first, with setup.py's range
# (tests/test_deploy.py keeps the two equal) and the extra; `pip install .`
# then keeps it and adds the rest.
WORKDIR /opt/tfdp
COPY setup.py ./
RUN case "$DEVICE" in \
      gpu) extra='[and-cuda]' ;; \
      cpu) extra='' ;; \
      *) echo "DEVICE=$DEVICE is unknown; use --build-arg DEVICE=gpu or cpu" >&2; exit 2 ;; \
    esac && \
    python -m pip install "tensorflow${extra}>=2.21,<2.22" && \
    mkdir tfdp trainer data && touch tfdp/__init__.py trainer/__init__.py data/__init__.py && \
    python -m pip install . && \
    python -m pip uninstall --yes tfdp && \
    rm -rf build tfdp trainer data ./*.egg-info

COPY README.md ./
COPY tfdp ./tfdp
COPY trainer ./trainer
COPY data ./data
RUN python -m pip install --no-deps . && \
    rm -rf build ./*.egg-info && \
    useradd --create-home --uid 1000 --user-group tfdp && \
    mkdir -p /runs /data && chown 1000:1000 /runs /data

# Model directories and datasets live on volumes, never in the image.
VOLUME ["/runs", "/data"]
USER 1000:1000
WORKDIR /runs
ENTRYPOINT ["tini", "--", "tfdp-train"]
CMD ["--model_dir=/runs/default"]
