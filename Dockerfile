# tfdp image for GPU clusters. Build:
#   docker build -t tfdp .                                   # GPU (default)
#   docker build -t tfdp:cpu --build-arg BASE=tensorflow/tensorflow:2.21.0 .
# Run: docker run --gpus all -v $PWD/runs:/runs tfdp --model_dir=/runs/demo
ARG BASE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/tfdp
COPY . .
# The base image's TensorFlow satisfies setup.py's pin, so pip keeps it and
# adds keras-hub, TF Text, TFDS and absl on top.
RUN python -m pip install -e . && \
    useradd --create-home --uid 1000 tfdp && \
    mkdir -p /runs /data && chown tfdp /runs /data

USER tfdp
VOLUME ["/runs", "/data"]
WORKDIR /runs
ENTRYPOINT ["tfdp-train"]
CMD ["--model_dir=/runs/default"]
