# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t dreambooth-operator:0.1.0 .   (slim: no torch)
#   docker build --target trainer  -t dreambooth-trainer:0.1.0 .    (CUDA: train, priors, export, serve)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- the wheel, built once for both images -------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract contract
COPY operator operator
COPY trainer trainer
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- operator: kopf + kubernetes client, nothing heavy ------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin dreambooth
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
USER 10001:10001
EXPOSE 8080 8000
ENTRYPOINT ["dreambooth"]
CMD ["operator"]

# ---- trainer-build: the trainer's virtualenv, with the build tools it needs --------------
FROM ${CUDA_IMAGE} AS trainer-build
ENV PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install uv
COPY --from=wheel /wheels /wheels
# DeepSpeed's build imports torch: torch first, then DeepSpeed without build isolation. uv
# leaves with the build stage.
RUN uv pip install torch \
 && uv pip install --no-build-isolation-package deepspeed "$(ls /wheels/*.whl)[train,serve]" \
 && pip uninstall -y uv

# ---- trainer: CUDA torch, diffusers, DeepSpeed; no compilers or headers at run time --------
FROM ${CUDA_IMAGE} AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface DREAMBOOTH_CACHE=/cache/dreambooth
# The same base image as the build stage, so the venv's python3 link resolves the same way.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=trainer-build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin dreambooth \
 && mkdir -p /cache && chown 10001:10001 /cache
USER 10001:10001
WORKDIR /home/dreambooth
EXPOSE 9400 8000
ENTRYPOINT ["dreambooth"]
CMD ["--help"]
