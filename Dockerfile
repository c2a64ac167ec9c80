# tfdp image for GPU clusters (docs/guide.md, "Containers and clusters").
#
#   docker build -t tfdp .                                    # GPU (CUDA) image
#   docker build -t tfdp:cpu --build-arg BASE=tensorflow/tensorflow:2.21.0 .
#   docker run --gpus all -v "$PWD/runs:/runs" tfdp --model_dir=/runs/demo
#   docker run --entrypoint tfdp-eval -v "$PWD/runs:/runs" tfdp --model_dir=/runs/demo
#
# The official TensorFlow image of the pinned version brings CUDA, cuDNN,
# NCCL and TensorFlow itself; pip keeps that TensorFlow (it satisfies
# setup.py's pin) and adds keras-hub, TF Text, TFDS and absl on top.
ARG BASE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE}

# TF_CPP_MIN_LOG_LEVEL=2: TensorFlow's C++ errors reach the log, its
# start-up notes and warnings do not (0 shows everything when debugging).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# Dependencies first, in their own layer: code changes do not reinstall them.
WORKDIR /opt/tfdp
COPY setup.py README.md ./
RUN mkdir tfdp trainer data && touch tfdp/__init__.py trainer/__init__.py data/__init__.py && \
    python -m pip install . && \
    python -m pip uninstall --yes tfdp && \
    rm -rf build tfdp trainer data ./*.egg-info

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
ENTRYPOINT ["tfdp-train"]
CMD ["--model_dir=/runs/default"]
