# tfdp image for GPU clusters. Build:
#   docker build -t tfdp .                                   # GPU (default)
#   docker build -t tfdp:cpu --build-arg BASE=tensorflow/tensorflow:2.21.0 .
# Run: docker run --gpus all -v $PWD/runs:/runs tfdp --model_dir=/runs/demo
ARG BASE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/tfdp
# Dependencies first, so code edits do not re-install TensorFlow's friends.
COPY setup.py README.md ./
COPY tfdp/__init__.py tfdp/__init__.py
RUN python -m pip install --no-deps -e . >/dev/null 2>&1 || true; \
    python -c "import ast,sys; t=ast.parse(open('setup.py').read()); \
print('\n'.join(e.value for n in ast.walk(t) if isinstance(n, ast.keyword) and n.arg=='install_requires' for e in n.value.elts))" \
    | grep -v '^tensorflow>=' > /tmp/requirements.txt && \
    python -m pip install -r /tmp/requirements.txt
COPY . .
RUN python -m pip install --no-deps -e . && useradd --create-home --uid 1000 tfdp && \
    mkdir -p /runs /data && chown tfdp /runs /data

USER tfdp
VOLUME ["/runs", "/data"]
WORKDIR /runs
ENTRYPOINT ["tfdp-train"]
CMD ["--model_dir=/runs/default"]
