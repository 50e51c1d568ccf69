# A prebuilt image for `pagating vast launch --image <this image>`: the CUDA runtime, PyTorch and
# every dependency of the project, so a rented instance skips the long pip install. onstart.sh still
# checks out the exact commit it was given and runs `pip install -e .`, which then only links it.
#
#   docker build -t ghcr.io/<you>/pagating:$(git rev-parse --short HEAD) .
#   docker push ghcr.io/<you>/pagating:$(git rev-parse --short HEAD)
#   pagating vast launch --image ghcr.io/<you>/pagating:<tag> ...
#
# Pinned: the base image by tag (the same default as params.yaml cloud.image; CUDA 12.4, torch 2.6.0,
# the oldest torch transformers 5 accepts for torch.load on resume), the Python dependencies by
# requirements/lock-cpu.txt (torch excepted); the exact versions an image got go to /opt/pagating/requirements.lock.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# git for the checkout, curl for the self-destroy call (onstart.sh falls back to Python without it)
RUN apt-get update \
 && apt-get install -y --no-install-recommends git curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pagating

# Dependencies in their own layer, from the same lock as `make setup` (uv, pip without it), less torch: the
# image keeps its CUDA torch. Rebuilt only when the lock changes.
COPY requirements ./requirements
RUN grep -v '^torch==' requirements/lock-cpu.txt > /tmp/lock.txt \
 && { { pip install uv && uv pip install --system --compile-bytecode --no-deps -r /tmp/lock.txt; } \
      || pip install --no-deps -r /tmp/lock.txt; } \
 && rm /tmp/lock.txt
COPY pyproject.toml ./

# The project itself (the instance runs its pinned checkout; this copy is for `docker run` use).
COPY pagating ./pagating
COPY scripts ./scripts
COPY params.yaml MLproject* conda.yaml* dvc.yaml* data.dvc* README.md* ./
RUN pip install --no-deps -e . \
 && pip freeze --exclude-editable > requirements.lock \
 && python -c "import torch, transformers, mlflow, dvc, vastai, pagating.cloud.cli, pagating.cloud.providers.vast"

CMD ["bash"]
