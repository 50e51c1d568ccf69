"""What a sweep will cost on a rented GPU: seconds per step (measured in MLflow, else estimated),
hours per instance, dollars.

Projected hours of one instance = ceil(configs of its shard / GPUs) x train.max_steps x s/step
x (1 + eval overhead) + setup. s/step comes from earlier runs on the same GPU model in MLflow
(tag gpu.name, metric perf/step_time_s) when there are any with the same model shape, else from the
FLOPs of one step divided by a conservative share of the GPU's datasheet peak (table below).
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagating import flops, names
from pagating.data.dataset import load_meta
from pagating.grid import grid, take_shard

# Peaks and the FLOPs formula are pagating.flops' (the same ones MFU uses). A GPU missing from its
# table is assumed as slow as a 3090: over-estimating cost is the safe side.
UNKNOWN_PEAK_TFLOPS = flops.PEAK_BF16_TFLOPS["NVIDIA GeForce RTX 3090"]
# Share of peak a small GPT-2 reaches under HF Trainer without torch.compile: a conservative guess
# (nanoGPT-style GPT-2 small training reports ~35-45% on A100/4090 with compile; we assume less).
# On an RTX 4090 at the wikitext103 seed config this gives ~0.04 s/step of compute, ~0.05 with overhead.
MFU_GUESS = 0.30
# Per-step cost that does not scale with FLOPs (optimizer step, dataloader, Python): a guess.
STEP_OVERHEAD_S = 0.01
# Image pull, pip install, dvc pull and prepare on a fresh instance, billed before the first step.
SETUP_HOURS = 0.25
# Model-shape params that must match for a measured s/step to apply to this config.
SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.ffn_dim", "model.param_matched",
              "data.block_size", "data.vocab_size", "train.batch_size")


def norm_gpu(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' / 'RTX_4090' / 'A100-SXM4-80GB' -> 'rtx 4090' / 'a100 sxm4 80gb'."""
    words = re.sub(r"[_\-/]+", " ", name or "").lower().split()
    return " ".join(w for w in words if w not in ("nvidia", "geforce", "tesla"))


def gpu_matches(run_gpu: str, offer_gpu: str) -> bool:
    """An MLflow run's gpu.name (NVML spelling) is the offer's GPU when it has all the offer's words."""
    want = norm_gpu(offer_gpu).split()
    have = set(norm_gpu(run_gpu).split())
    return bool(want) and all(w in have for w in want)


def peak_tflops(gpu_name: str) -> float:
    return flops.peak_tflops(gpu_name) or UNKNOWN_PEAK_TFLOPS


def grid_size(cfg: dict[str, Any]) -> int:
    """Configs in the sweep grid: the product of the list-valued axes of cfg['sweep']."""
    return len(grid(cfg))  # the sweep's own list (a `plain` unit runs once, not once per α mode)


def shard_sizes(n_configs: int, n_shards: int) -> list[int]:
    """Configs per shard: the sizes of the sweep's own slices (grid.take_shard)."""
    return [len(take_shard(range(n_configs), i, n_shards)) for i in range(n_shards)]


def flops_per_step(cfg: dict[str, Any]) -> float:
    """Training FLOPs of one optimizer step: pagating.flops' per-token formula x tokens per step."""
    return flops.config_flops_per_token(cfg) * int(cfg["data"]["block_size"]) * int(cfg["train"]["batch_size"])


def estimated_step_time(cfg: dict[str, Any], gpu_name: str) -> float:
    return flops_per_step(cfg) / (peak_tflops(gpu_name) * 1e12 * MFU_GUESS) + STEP_OVERHEAD_S


# Validation tokens when the prepared meta is not on this machine (the launcher may never have prepared
# the data): WikiText-103's validation split is ~217k words, ~250k GPT-2 tokens.
VALIDATION_TOKENS_GUESS = {"wikitext-103": 250_000}


def eval_batches(cfg: dict[str, Any]) -> int:
    """Batches of one evaluation: the cap, or the whole validation split (max_eval_batches: 0)."""
    t = cfg["train"]
    cap = int(t["max_eval_batches"])
    if cap > 0:
        return cap
    try:
        blocks = int(load_meta(cfg["data"]["prepared_dir"])["splits"]["validation"]["blocks"])
    except Exception:  # not prepared here: estimate from the source's known size
        tokens = VALIDATION_TOKENS_GUESS.get(str(cfg["data"]["source"]), 0)
        blocks = tokens // int(cfg["data"]["block_size"])
    return math.ceil(blocks / int(t["batch_size"]))


def eval_overhead(cfg: dict[str, Any]) -> float:
    """Eval time as a fraction of train time: forward-only batches cost about a third of a step."""
    eval_steps = int(cfg["train"]["eval_steps"])
    if eval_steps <= 0:
        return 0.0
    return eval_batches(cfg) / eval_steps / 3


@dataclass
class StepTime:
    seconds: float
    source: str  # "measured (N runs)" | "estimate"


def instance_hours(cfg: dict[str, Any], configs: int, num_gpus: int, s_per_step: float) -> float:
    """Wall-clock hours one instance bills to run `configs` configs, one per GPU at a time."""
    if configs <= 0:
        return 0.0
    waves = math.ceil(configs / max(1, num_gpus))
    train_s = waves * int(cfg["train"]["max_steps"]) * s_per_step * (1 + eval_overhead(cfg))
    return train_s / 3600 + SETUP_HOURS


# ---- measured s/step from MLflow --------------------------------------------------------------

def lookup_uri(uri: str | None) -> str | None:
    """The tracking URI to read measurements from, or None when there is nothing to read
    (a local sqlite file that does not exist must not be created by a lookup)."""
    if not uri:
        return None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return uri if path.exists() else None
    if "://" not in uri and not Path(uri).exists():
        return None
    return uri


@contextmanager
def quick_mlflow():
    """A lookup for a projection or a status line must fail in seconds, not retry for minutes."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _shape_matches(params: dict[str, str], cfg: dict[str, Any]) -> bool:
    for key in SHAPE_KEYS:
        section, _, name = key.partition(".")
        if key in params and name in cfg.get(section, {}) and params[key] != str(cfg[section][name]):
            return False
    return True


def pagating_experiments(client, prefix: str = "pagating") -> list[str]:
    return [e.experiment_id for e in client.search_experiments(filter_string=f"name LIKE '{prefix}-%'")]


def measured_step_times(uri: str, cfg: dict[str, Any], gpu_names: list[str]) -> dict[str, StepTime]:
    """Mean of the last perf/step_time_s of runs on each GPU model, across `pagating-*` experiments,
    counting only runs with this config's model shape. GPU models without such runs are left out."""
    from mlflow.tracking import MlflowClient  # heavy: ~1 s; only a lookup in MLflow needs it

    prefix = cfg["tracking"]["experiment_prefix"]
    with quick_mlflow():
        client = MlflowClient(tracking_uri=uri)
        exp_ids = pagating_experiments(client, prefix)
        if not exp_ids:
            return {}
        runs = client.search_runs(exp_ids, filter_string=f'metrics."{names.STEP_TIME}" > 0',
                                  max_results=1000, order_by=["attributes.start_time DESC"])
    out = {}
    for gpu in gpu_names:
        values = [r.data.metrics[names.STEP_TIME] for r in runs
                  if gpu_matches(r.data.tags.get(names.GPU_NAME, ""), gpu) and _shape_matches(r.data.params, cfg)]
        if values:
            out[gpu] = StepTime(sum(values) / len(values), f"measured ({len(values)} runs)")
    return out


def step_times(cfg: dict[str, Any], gpu_names: list[str], uri: str | None,
               override: float | None = None) -> tuple[dict[str, StepTime], str | None]:
    """s/step per GPU model: `override`, else measured in MLflow at `uri`, else the estimate.
    Returns (times, note) where note says why measurements were not used, if they could not be read."""
    gpus = sorted(set(gpu_names))
    if override is not None:
        return {g: StepTime(override, "--s-per-step") for g in gpus}, None
    measured, note = {}, None
    uri = lookup_uri(uri)
    if uri and gpus:
        try:
            measured = measured_step_times(uri, cfg, gpus)
        except Exception as exc:  # any failure to read history falls back to the estimate
            note = f"could not read measured s/step from MLflow ({type(exc).__name__}); using estimates"
    times = {g: measured.get(g) or StepTime(estimated_step_time(cfg, g), "estimate") for g in gpus}
    return times, note
