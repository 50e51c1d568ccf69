"""Which runs a report covers, and each run's figures, read back from MLflow.

Which runs: the run ids of `reports/sweep.json` (written by `pagating sweep`; it also names configs
satisfied by a finished run outside the sweep's parent), else the FINISHED children of the sweep's
parent run (`--sweep-id`, or the newest run tagged `pagating.role=sweep` in `pagating-<profile>`).
Runs without a whole-split `final/eval_loss` are left out, with why.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from pagating import names
from pagating.config import PLAIN, UserError, experiment_name, is_plain
from pagating.flops import flops_per_token
from pagating.identity import config_label
from pagating.tracking import store

GPU_UTIL = re.compile(r"system/gpu_(\d+)_utilization_percentage")


def _search_all(mlf, exp_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    runs, token = [], None
    while True:
        page = mlf.search_runs(exp_ids, filter_string=filter_string, order_by=order_by, max_results=1000,
                               page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _get_run(mlf, run_id: str, uri: str, where: str):
    from mlflow.exceptions import MlflowException  # heavy: ~1 s; the caller already holds an MLflow client

    try:
        return mlf.get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_id} named in {where} is not on {store.mask_uri(uri)}: point MLFLOW_TRACKING_URI "
                        "at the sweep's server, or pass --sweep-id") from None


def _experiment(mlf, cfg: dict):
    name = experiment_name(cfg)
    exp = mlf.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise UserError(f"no MLflow experiment {name!r}: run `pagating sweep --profile {cfg['profile']}` first")
    return exp


def find_sweep(mlf, cfg: dict, uri: str, sweep_json: str | Path | None = names.SWEEP_JSON,
               sweep_id: str | None = None) -> dict[str, Any]:
    """{"sweep_id", "parent_run_id", "profile", "runs": [(name, Run)], "excluded": [(name, why)]}."""
    doc = None
    if sweep_json and Path(sweep_json).is_file():
        doc = json.loads(Path(sweep_json).read_text())
        if sweep_id and doc.get("sweep_id") != sweep_id:
            doc = None  # a different sweep was asked for: find it in MLflow instead
    excluded: list[tuple[str, str]] = []
    if doc is not None:
        info, runs = _listed_runs(mlf, cfg, uri, doc, str(sweep_json), excluded)
    else:
        info, runs = _child_runs(mlf, cfg, sweep_id)
    # Only FINISHED runs are ranked; a retried config may have a FAILED run and a FINISHED one.
    finished: dict[str, tuple[str, Any]] = {}
    for name, run in runs:
        if run.info.status != "FINISHED":
            excluded.append((name, run.info.status.lower()))
            continue
        key = run.data.tags.get(names.CONFIG_HASH) or run.info.run_id
        if key not in finished or run.info.start_time > finished[key][1].info.start_time:
            finished[key] = (name, run)
    done_names = {name for name, _ in finished.values()}
    info["excluded"] = sorted({(n, why) for n, why in excluded if n not in done_names})
    info["runs"] = list(finished.values())
    if not info["runs"]:
        raise UserError(f"sweep {info['sweep_id']} has no finished runs yet: run `pagating sweep` first")
    return info


def _listed_runs(mlf, cfg: dict, uri: str, doc: dict, where: str,
                 excluded: list[tuple[str, str]]) -> tuple[dict[str, Any], list]:
    """The runs sweep.json names; its failed configs (and configs without a run) go to `excluded`."""
    runs = []
    for entry in doc.get("configs", []):
        name = entry.get("name") or entry.get("config_hash") or "?"
        if entry.get("status") == "failed" or not entry.get("run_id"):
            excluded.append((name, entry.get("status") or "no run"))
            continue
        runs.append((name, _get_run(mlf, entry["run_id"], uri, where)))
    info = {"sweep_id": doc.get("sweep_id"), "parent_run_id": doc.get("parent_run_id"),
            "profile": doc.get("profile", cfg["profile"])}
    return info, runs


def _child_runs(mlf, cfg: dict, sweep_id: str | None) -> tuple[dict[str, Any], list]:
    """The children of the sweep's parent run: `sweep_id`'s, else the newest sweep in the experiment."""
    exp = _experiment(mlf, cfg)
    flt = f"tags.`{names.ROLE}` = '{names.ROLE_SWEEP}'"
    if sweep_id:
        flt += f" and tags.`{names.SWEEP_ID}` = '{sweep_id}'"
    parents = mlf.search_runs([exp.experiment_id], filter_string=flt,
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        what = f"sweep {sweep_id!r}" if sweep_id else "sweep"
        raise UserError(f"no {what} in experiment {exp.name!r}: run `pagating sweep` first, or pass the "
                        "--sweep-id printed by it")
    parent = parents[0]
    children = _search_all(mlf, [exp.experiment_id], f"tags.`{names.PARENT_RUN_ID}` = '{parent.info.run_id}'",
                           ["attributes.start_time ASC"])
    info = {"sweep_id": parent.data.tags.get(names.SWEEP_ID, sweep_id),
            "parent_run_id": parent.info.run_id, "profile": cfg["profile"]}
    return info, [(c.info.run_name or c.info.run_id, c) for c in children]


def _history(mlf, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; a step logged twice keeps its latest value."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in mlf.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(s, by_step[s][1]) for s in sorted(by_step)]


def _mean_history(mlf, run_id: str, keys: list[str]) -> list[tuple[int, float]]:
    """The mean of several metrics (one per GPU, one per layer) at each step all of them logged."""
    if not keys:
        return []
    per_key = [dict(_history(mlf, run_id, k)) for k in keys]
    common = sorted(set.intersection(*(set(p) for p in per_key)))
    return [(s, statistics.fmean(p[s] for p in per_key)) for s in common]


def gpu_util_history(mlf, run_id: str, metrics: dict) -> list[tuple[int, float]]:
    """GPU utilisation per logging step (MLflow's system/gpu_<i>_utilization_percentage), the mean
    over the run's GPUs at the steps every GPU logged."""
    return _mean_history(mlf, run_id, sorted(k for k in metrics if GPU_UTIL.fullmatch(k)))


def steady_mean(history: list[tuple[int, float]], harmonic: bool = False) -> float | None:
    """Mean over logging windows, without the first (it holds warm-up: compilation, first batches).

    Rates (tokens/s) take the harmonic mean: windows have equal step counts, so that is total
    tokens over total time and agrees with the mean s/step.
    """
    values = [v for _, v in history]
    if len(values) > 1:
        values = values[1:]
    if not values:
        return None
    return statistics.harmonic_mean(values) if harmonic else statistics.fmean(values)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def collect(mlf, name: str, run) -> dict[str, Any] | None:
    """One run's figures from MLflow; None without `final/eval_loss`. The intermediate `eval/loss` is no
    stand-in: on the sample profile it is a subset of validation (eval.subset_blocks), and ranking it
    beside whole-split losses would mix two measures."""
    rid, metrics, tags = run.info.run_id, run.data.metrics, run.data.tags
    h = {key: _history(mlf, rid, key) for key in
         (names.EVAL_LOSS, names.EVAL_PPL, names.STEP_TIME, names.TOKENS_PER_S, names.MFU)}
    h["gpu_util"] = gpu_util_history(mlf, rid, metrics)
    if names.FINAL_EVAL_LOSS not in metrics:
        return None
    losses = [v for _, v in h[names.EVAL_LOSS]]
    final = metrics[names.FINAL_EVAL_LOSS]
    best = metrics.get(names.BEST_EVAL_LOSS, min(losses, default=final))
    ppls = [v for _, v in h[names.EVAL_PPL]]
    rate = _float(tags.get(names.USD_PER_HOUR))
    return {
        **_params(name, run.data.params), "name": name, "run_id": rid,
        "config_hash": tags.get(names.CONFIG_HASH, ""), "start_time": run.info.start_time,
        "gpu": tags.get(names.GPU_NAME) or "unknown", "usd_per_hour": rate,
        "val_loss": final, "test_loss": metrics.get(names.TEST_LOSS),
        "best_eval_loss": best, "final_eval_loss": final,
        "first_eval_loss": losses[0] if losses else None,
        "best_eval_ppl": min(ppls) if ppls else (math.exp(min(best, 50.0)) if best is not None else None),
        "final_eval_ppl": metrics.get(names.FINAL_EVAL_PPL, math.exp(min(final, 50.0))),
        "s_per_step": steady_mean(h[names.STEP_TIME]),
        "tokens_per_s": steady_mean(h[names.TOKENS_PER_S], harmonic=True),
        "gpu_util_pct": steady_mean(h["gpu_util"]), "cost_usd": _cost(run, rate), "mfu": steady_mean(h[names.MFU]),
        "eval_curve": h[names.EVAL_LOSS],
        # α trajectory: the mean over layers at each step all layers were logged.
        "alpha_curve": _mean_history(mlf, rid, sorted(k for k in metrics if k.startswith("alpha/layer_"))),
    }


def _cost(run, rate: float | None) -> float | None:
    """The run's last `cost/usd`, else its wall time × `cost.usd_per_hour`."""
    if names.COST_USD in run.data.metrics:
        return run.data.metrics[names.COST_USD]
    if rate is not None and run.info.end_time and run.info.start_time:
        return rate * (run.info.end_time - run.info.start_time) / 3.6e6
    return None


def _params(name: str, params: dict[str, str]) -> dict[str, Any]:
    """A run's config as the report uses it (its label, shape, FLOPs per token), read from its params."""
    num = {k: _float(params.get(k)) for k in ("train.max_steps", "train.seed", "model.n_params", "model.d_ff",
                                               "model.n_layer", "model.n_embd", "model.vocab_size",
                                               "data.block_size", "train.batch_size", "train.learning_rate")}
    unit = params.get("model.unit", "?")
    # GPT-2's own MLP has no α: its rows say `plain`, not the unused train.alpha_mode.
    mode = PLAIN if is_plain(unit) else params.get("train.alpha_mode", "?")
    shape = [num[k] for k in ("model.n_layer", "model.n_embd", "model.d_ff", "model.vocab_size", "data.block_size")]
    fpt = (flops_per_token(n_layer=int(shape[0]), n_embd=int(shape[1]), d_ff=int(shape[2]), vocab_size=int(shape[3]),
                           block_size=int(shape[4]), gated=not is_plain(unit)) if None not in shape else None)
    as_int = {k: int(v) if v is not None else None for k, v in num.items()}
    return {
        "config": config_label(unit, mode, num["train.learning_rate"]) if unit != "?" else name,
        "seed": as_int["train.seed"], "n_params": as_int["model.n_params"], "d_ff": as_int["model.d_ff"],
        "flops_per_token": fpt, "alpha_mode": mode, "unit": unit, "learning_rate": num["train.learning_rate"],
        "max_steps": as_int["train.max_steps"] or None, "batch_size": as_int["train.batch_size"],
        "block_size": as_int["data.block_size"],
    }


def read_rows(mlf, info: dict) -> list[dict]:
    """collect() of each of the sweep's runs, names made unique; a run without a whole-split validation
    loss goes to info["excluded"]."""
    rows, seen = [], set()
    for name, run in info["runs"]:
        row = collect(mlf, name, run)
        if row is None:  # its eval/loss, if any, may be a subset: not comparable with whole-split losses
            info["excluded"].append((name, "no final/eval_loss, the whole-split validation loss"))
            continue
        if row["name"] in seen:  # the same run name twice (a seed axis from before names carried it)
            row["name"] = f"{name} seed={row['seed']}" if row["seed"] is not None else name
        if row["name"] in seen:
            row["name"] = f"{name} #{row['config_hash'][:8] or run.info.run_id[:8]}"
        seen.add(row["name"])
        rows.append(row)
    if not rows:
        raise UserError(f"sweep {info['sweep_id']} has no run with a final/eval_loss yet")
    info["excluded"] = sorted(info["excluded"])
    return rows


