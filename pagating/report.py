"""`pagating report`: a sweep's runs, read back from MLflow, as tables, DVC metrics and plots.

Every figure here is read from MLflow (or derived from what is read: a mean, a product, a sum, a
confidence interval), except the seed plan's quoted figures (SEED_PLAN) and the pagating.flops estimate
beside them. Files are written only after every read succeeded, with sorted keys and
fixed float formats, so two reports over the same runs are byte-identical (PNGs aside).

Which runs: the run ids of `reports/sweep.json` (written by `pagating sweep`; it also names configs
satisfied by a finished run outside the sweep's parent), else the FINISHED children of the sweep's
parent run (`--sweep-id`, or the newest run tagged `pagating.role=sweep` in `pagating-<profile>`).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from pagating.config import PLAIN, UserError, add_config_args, config_from_args, experiment_name, is_plain

# Where reports live (dvc.yaml names the same paths): one folder, the sweep's run list beside what the report writes.
REPORTS_DIR = "reports"
SWEEP_JSON = f"{REPORTS_DIR}/sweep.json"
SUMMARY = "summary.md"
METRICS = "metrics.json"
PLOTS = "plots"


# Reading runs --------------------------------------------------------------------------------

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
    from mlflow.exceptions import MlflowException

    from pagating.tracking import mask_uri

    try:
        return mlf.get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_id} named in {where} is not on {mask_uri(uri)}: point MLFLOW_TRACKING_URI "
                        "at the sweep's server, or pass --sweep-id") from None


def _experiment(mlf, cfg: dict):
    name = experiment_name(cfg)
    exp = mlf.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise UserError(f"no MLflow experiment {name!r}: run `pagating sweep --profile {cfg['profile']}` first")
    return exp


def find_sweep(mlf, cfg: dict, uri: str, sweep_json: str | Path | None = SWEEP_JSON,
               sweep_id: str | None = None) -> dict[str, Any]:
    """{"sweep_id", "parent_run_id", "profile", "runs": [(name, Run)], "excluded": [(name, why)]}."""
    doc = None
    if sweep_json and Path(sweep_json).is_file():
        doc = json.loads(Path(sweep_json).read_text())
        if sweep_id and doc.get("sweep_id") != sweep_id:
            doc = None  # a different sweep was asked for: find it in MLflow instead
    runs, excluded = [], []
    if doc is not None:
        for entry in doc.get("configs", []):
            name = entry.get("name") or entry.get("config_hash") or "?"
            if entry.get("status") == "failed" or not entry.get("run_id"):
                excluded.append((name, entry.get("status") or "no run"))
                continue
            run = _get_run(mlf, entry["run_id"], uri, str(sweep_json))
            runs.append((name, run))
        info = {"sweep_id": doc.get("sweep_id"), "parent_run_id": doc.get("parent_run_id"),
                "profile": doc.get("profile", cfg["profile"])}
    else:
        exp = _experiment(mlf, cfg)
        flt = "tags.`pagating.role` = 'sweep'"
        if sweep_id:
            flt += f" and tags.`pagating.sweep_id` = '{sweep_id}'"
        parents = mlf.search_runs([exp.experiment_id], filter_string=flt,
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            what = f"sweep {sweep_id!r}" if sweep_id else "sweep"
            raise UserError(f"no {what} in experiment {exp.name!r}: run `pagating sweep` first, or pass the "
                            "--sweep-id printed by it")
        parent = parents[0]
        children = _search_all(mlf, [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                               ["attributes.start_time ASC"])
        runs = [(c.info.run_name or c.info.run_id, c) for c in children]
        info = {"sweep_id": parent.data.tags.get("pagating.sweep_id", sweep_id),
                "parent_run_id": parent.info.run_id, "profile": cfg["profile"]}
    # Only FINISHED runs are ranked; a retried config may have a FAILED run and a FINISHED one.
    finished: dict[str, tuple[str, Any]] = {}
    for name, run in runs:
        if run.info.status != "FINISHED":
            excluded.append((name, run.info.status.lower()))
            continue
        key = run.data.tags.get("pagating.config_hash") or run.info.run_id
        if key not in finished or run.info.start_time > finished[key][1].info.start_time:
            finished[key] = (name, run)
    done_names = {name for name, _ in finished.values()}
    info["excluded"] = sorted({(n, why) for n, why in excluded if n not in done_names})
    info["runs"] = list(finished.values())
    if not info["runs"]:
        raise UserError(f"sweep {info['sweep_id']} has no finished runs yet: run `pagating sweep` first")
    return info


def _history(mlf, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; a step logged twice keeps its latest value."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in mlf.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(s, by_step[s][1]) for s in sorted(by_step)]


GPU_UTIL = re.compile(r"system/gpu_(\d+)_utilization_percentage")


def gpu_util_history(mlf, run_id: str, metrics: dict) -> list[tuple[int, float]]:
    """GPU utilisation per logging step (MLflow's system/gpu_<i>_utilization_percentage), the mean
    over the run's GPUs at the steps every GPU logged."""
    keys = sorted(k for k in metrics if GPU_UTIL.fullmatch(k))
    if not keys:
        return []
    per_gpu = [dict(_history(mlf, run_id, k)) for k in keys]
    common = sorted(set.intersection(*(set(p) for p in per_gpu)))
    return [(s, statistics.fmean(p[s] for p in per_gpu)) for s in common]


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
    """One config's figures from its MLflow run; None when it never evaluated."""
    rid, metrics, params, tags = run.info.run_id, run.data.metrics, run.data.params, run.data.tags
    h = {key: _history(mlf, rid, key) for key in
         ("eval/loss", "eval/ppl", "perf/step_time_s", "perf/tokens_per_s")}
    h["gpu_util"] = gpu_util_history(mlf, rid, metrics)
    if not h["eval/loss"] and "best/eval_loss" not in metrics:
        return None
    losses = [v for _, v in h["eval/loss"]]
    best = metrics.get("best/eval_loss", min(losses) if losses else None)
    final = metrics.get("final/eval_loss", losses[-1] if losses else None)
    ppls = [v for _, v in h["eval/ppl"]]
    # α trajectory: the mean over layers at each step all layers were logged.
    layers = sorted(k for k in metrics if k.startswith("alpha/layer_"))
    alpha = []
    if layers:
        per_layer = [dict(_history(mlf, rid, k)) for k in layers]
        common = sorted(set.intersection(*(set(p) for p in per_layer)))
        alpha = [(s, statistics.fmean(p[s] for p in per_layer)) for s in common]
    rate = _float(tags.get("cost.usd_per_hour"))
    if "cost/usd" in metrics:
        cost = metrics["cost/usd"]
    elif rate is not None and run.info.end_time and run.info.start_time:
        cost = rate * (run.info.end_time - run.info.start_time) / 3.6e6
    else:
        cost = None
    max_steps = _float(params.get("train.max_steps"))
    seed, n_params = _float(params.get("train.seed")), _float(params.get("model.n_params"))
    return {
        "config": name, "seed": int(seed) if seed is not None else None,
        "n_params": int(n_params) if n_params is not None else None,
        "param_matched": params.get("model.param_matched", "?"), "d_ff": params.get("model.d_ff", "?"),
        "test_loss": metrics.get("test/loss"), "eval_tail": losses[-3:],
        "name": name, "run_id": rid, "config_hash": tags.get("pagating.config_hash", ""),
        # GPT-2's own MLP has no α: its bars and CSV rows say `plain`, not the unused train.alpha_mode.
        "alpha_mode": PLAIN if is_plain(params.get("model.unit", "")) else params.get("train.alpha_mode", "?"),
        "learning_rate": _float(params.get("train.learning_rate")),
        "unit": params.get("model.unit", "?"), "max_steps": int(max_steps) if max_steps else None,
        "gpu": tags.get("gpu.name") or "unknown", "usd_per_hour": rate,
        "best_eval_loss": best, "final_eval_loss": final,
        "first_eval_loss": losses[0] if losses else None,
        "best_eval_ppl": min(ppls) if ppls else (math.exp(min(best, 50.0)) if best is not None else None),
        "final_eval_ppl": metrics.get("final/eval_ppl", ppls[-1] if ppls else None),
        "s_per_step": steady_mean(h["perf/step_time_s"]),
        "tokens_per_s": steady_mean(h["perf/tokens_per_s"], harmonic=True),
        "gpu_util_pct": steady_mean(h["gpu_util"]), "cost_usd": cost,
        "eval_curve": h["eval/loss"], "alpha_curve": alpha,
    }


# Does gating help? --------------------------------------------------------------------------

def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with integer df, exactly (Abramowitz & Stegun 26.7.3-4): a
    closed form for integer df, so no scipy."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        inside = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_quantile_975(df: int) -> float:
    """t such that P(|T| > t) = 0.05 for df degrees of freedom (bisection on the exact p-value)."""
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 0.05 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t confidence interval (None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """Paired comparison over the seeds both configs ran: mean difference a - b, its 95% CI and the
    paired t-test's two-sided p (None with fewer than two common seeds)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, half = mean_ci(diffs)
    sd = statistics.stdev(diffs)
    p = 0.0 if sd == 0 and mean != 0 else 1.0 if sd == 0 else t_two_sided_p(mean / (sd / math.sqrt(len(diffs))),
                                                                          len(diffs) - 1)
    return {"diff": mean, "ci95": half, "p": p, "seeds": len(seeds)}


def comparison(rows: list[dict]) -> dict[str, Any]:
    """Runs grouped by config (everything but the seed): mean ± 95% CI of final eval loss over seeds, each
    config against the best one and against the plain baseline (same lr) by a paired test over seeds."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["config"], r["param_matched"], r["d_ff"])
        g = groups.setdefault(key, {"config": r["config"], "unit": r["unit"], "plain": is_plain(r["unit"]),
                                    "alpha_mode": "-" if is_plain(r["unit"]) else r["alpha_mode"],
                                    "learning_rate": r["learning_rate"], "n_params": r["n_params"],
                                    "param_matched": r["param_matched"], "d_ff": r["d_ff"], "by_seed": {}})
        g["by_seed"][r["seed"] if r["seed"] is not None else len(g["by_seed"])] = r["final_eval_loss"]
    out = list(groups.values())
    for g in out:
        g["n"] = len(g["by_seed"])
        g["mean"], g["ci95"] = mean_ci(list(g["by_seed"].values()))
    out.sort(key=lambda g: (g["mean"], g["config"]))
    best = out[0]
    for g in out:
        g["vs_best"] = None if g is best else paired(g["by_seed"], best["by_seed"])
        bases = [b for b in out if b["plain"] and not g["plain"]]
        base = next((b for b in bases if b["learning_rate"] == g["learning_rate"]), bases[0] if bases else None)
        g["baseline"] = base["config"] if base else None
        g["vs_baseline"] = paired(g["by_seed"], base["by_seed"]) if base else None
    seeded = any(g["n"] > 1 for g in out)
    # One seed per config: the spread of each run's last evals is the noise a difference must beat.
    tails = [statistics.stdev(r["eval_tail"]) for r in rows if len(r["eval_tail"]) >= 2]
    return {"groups": out, "best": best["config"], "seeded": seeded,
            "eval_noise": statistics.median(tails) if tails else None, "has_baseline": any(g["plain"] for g in out)}


def _pm(mean: float, half: float | None) -> str:
    return f"{mean:.4f}" if half is None else f"{mean:.4f} ± {half:.4f}"


def _diff(d: dict | None, noise: float | None = None, delta: float | None = None) -> str:
    if d is not None:
        return f"{d['diff']:+.4f} ± {d['ci95']:.4f} (p={d['p']:.3g}, {d['seeds']} seeds)"
    if delta is None:
        return "-"
    within = noise is not None and abs(delta) < 2 * noise
    return f"{delta:+.4f}" + (" (within noise)" if within else "")


def comparison_md(cmp: dict[str, Any]) -> str:
    out = io.StringIO()
    w = out.write
    w("## Does gating help?\n\n")
    groups = cmp["groups"]
    best_mean = groups[0]["mean"]
    means = {g["config"]: g["mean"] for g in groups}
    w("| config | unit | α mode | lr | params | param_matched | d_ff | seeds | final eval loss (mean ± 95% CI) "
      "| vs best | vs baseline |\n|---|---|---|---:|---:|---|---:|---:|---:|---|---|\n")
    for g in groups:
        label = f"{g['config']} (baseline)" if g["plain"] else g["config"]
        params = f"{g['n_params']:,}" if g["n_params"] else "n/a"
        vs_best = ("best" if g["config"] == cmp["best"]
                   else _diff(g["vs_best"], cmp["eval_noise"], g["mean"] - best_mean))
        vs_base = "-" if g["plain"] or not g["baseline"] else _diff(
            g["vs_baseline"], cmp["eval_noise"], g["mean"] - means[g["baseline"]])
        lr = "n/a" if g["learning_rate"] is None else f"{g['learning_rate']:g}"
        w(f"| {label} | {g['unit']} | {g['alpha_mode']} | {lr} | {params} | {g['param_matched']} "
          f"| {g['d_ff']} | {g['n']} | {_pm(g['mean'], g['ci95'])} | {vs_best} | {vs_base} |\n")
    w("\nFinal eval loss: mean over seeds, ± the half-width of its 95% t interval. vs best / vs baseline: the "
      "mean difference in final eval loss over the seeds both ran (negative = lower loss than the other), "
      "± its 95% CI, and the paired t-test's two-sided p.")
    if not cmp["has_baseline"]:
        w(" No `plain` run (GPT-2's own MLP) in this sweep: add `sweep.unit: [paGLU, plain]` for a baseline.")
    if not cmp["seeded"]:
        noise = cmp["eval_noise"]
        w("\n\n**One seed per config:** a single seed cannot separate differences smaller than the eval noise"
          + (f", measured here as {noise:.4f} (median over runs of the standard deviation of each run's last "
             "3 eval losses); differences under twice that are marked *within noise*" if noise is not None
             else " (too few evals to measure it)")
          + ". Add a `seed` axis (e.g. `sweep.seed: [1, 2, 3]`) for confidence intervals and paired tests.")
    w("\n\n")
    return out.getvalue()


# The seed document's "Expected Performance Improvement" table: the plan's own figures, quoted (the only
# numbers in the report not read from MLflow).
SEED_PLAN = {"M4 (seed, measured)": {"s_per_step": 3.04},
             "RTX 4090 (seed, projected)": {"s_per_step": 0.25, "sweep_h": 14.0, "sweep_usd": 12.0}}


# Figures -------------------------------------------------------------------------------------

def performance(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """The seed's "Expected Performance Improvement" table, measured, per GPU name."""
    out: dict[str, dict[str, Any]] = {}
    for gpu in sorted({r["gpu"] for r in rows}):
        timed = [r for r in rows if r["gpu"] == gpu and r["s_per_step"] is not None and r["max_steps"]]
        if not timed:
            continue
        run_s = [r["max_steps"] * r["s_per_step"] for r in timed]
        rates = [r["usd_per_hour"] for r in timed]
        out[gpu] = {
            "configs": len(timed),
            "max_steps": sorted({r["max_steps"] for r in timed}),
            "s_per_step": statistics.fmean(r["s_per_step"] for r in timed),
            "one_run_s": statistics.fmean(run_s),
            "sweep_s": math.fsum(run_s),
            "sweep_usd": (math.fsum(s / 3600.0 * rate for s, rate in zip(run_s, rates, strict=True))
                          if all(rate is not None for rate in rates) else None),
            "usd_per_hour": sorted({rate for rate in rates if rate is not None}),
        }
    return out


def _num(x: float) -> float:
    return float(f"{x:.6g}")  # fixed precision: identical bytes on every re-run


def metrics_doc(rows: list[dict]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for r in rows:
        doc[r["name"]] = {k: _num(r[k]) for k in
                          ("best_eval_loss", "final_eval_loss", "first_eval_loss", "best_eval_ppl", "final_eval_ppl",
                           "s_per_step", "tokens_per_s", "gpu_util_pct", "cost_usd") if r[k] is not None}
    doc["best_config"] = rows[0]["name"]
    return doc


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.4g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_usd(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"${x:.2f}" if x >= 0.995 else f"${x:#.3g}"  # cents, or 3 significant digits below a dollar


def _opt(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_md(info: dict, exp_name: str, rows: list[dict], perf: dict[str, dict], cmp: dict | None = None,
               estimate: dict | None = None) -> str:
    out = io.StringIO()
    w = out.write
    w(f"# Sweep report: {info['sweep_id']}\n\n")
    w(f"Profile `{info['profile']}`, MLflow experiment `{exp_name}`"
      + (f", parent run `{info['parent_run_id']}`" if info.get("parent_run_id") else "")
      + f". {len(rows)} finished configs. Every number below is read from MLflow; regenerate with "
        "`pagating report`.\n\n")
    w("## Ranking (by best eval loss)\n\n")
    w("| # | config | best eval loss | best eval ppl | final eval loss | final eval ppl | s/step | tokens/s "
      "| GPU util | $ | run |\n")
    w("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    for i, r in enumerate(rows, 1):
        util = "n/a" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.1f}%"
        w(f"| {i} | {r['name']} | {r['best_eval_loss']:.4f} | {_opt(r['best_eval_ppl'], '.2f')} "
          f"| {r['final_eval_loss']:.4f} | {_opt(r['final_eval_ppl'], '.2f')} | {_opt(r['s_per_step'], '.4g')} "
          f"| {_opt(r['tokens_per_s'], '.0f')} | {util} "
          f"| {fmt_usd(r['cost_usd'])} | `{r['run_id']}` |\n")
    if info["excluded"]:
        w("\nNot ranked: " + "; ".join(f"{n} ({why})" for n, why in info["excluded"]) + ".\n")
    w("\ns/step, tokens/s and GPU util: means over the run's logging windows, without the first (warm-up). "
      "$: the run's last `cost/usd`, else its wall time × `cost.usd_per_hour`.\n\n")
    if cmp is not None:
        w(comparison_md(cmp))
    w("## Expected Performance Improvement (the seed's plan beside the measured)\n\n")
    # Columns: the seed document's figures, pagating.flops' estimate for the plan's GPU, then each GPU measured.
    cols: list[tuple[str, dict]] = [(k, {"plan": v}) for k, v in SEED_PLAN.items()]
    if estimate:
        cols.append((f"{estimate['gpu']} (estimate: pagating.flops)", {"estimate": estimate}))
    cols += [(f"{g} (measured)", {"measured": p}) for g, p in perf.items()]
    w("| | " + " | ".join(c for c, _ in cols) + " |\n|---|" + "---:|" * len(cols) + "\n")

    def row(label: str, plan, est, meas) -> None:
        cells = [plan(v["plan"]) if "plan" in v else est(v["estimate"]) if "estimate" in v else meas(v["measured"])
                 for _, v in cols]
        w(f"| {label} | " + " | ".join(cells) + " |\n")

    row("time per step", lambda p: f"{p['s_per_step']:.4g} s", lambda e: f"{e['s_per_step']:.4g} s",
        lambda p: f"{p['s_per_step']:.4g} s")
    row("configs measured", lambda p: "-", lambda e: "-", lambda p: str(p["configs"]))
    row("one run (train.max_steps × s/step)", lambda p: "-",
        lambda e: f"{fmt_duration(e['one_run_s'])} ({e['max_steps']} steps)",
        lambda p: f"{fmt_duration(p['one_run_s'])} ({'/'.join(str(s) for s in p['max_steps'])} steps)")
    row("whole sweep", lambda p: f"~{p['sweep_h']:g} h" if "sweep_h" in p else "-",
        lambda e: f"{fmt_duration(e['sweep_s'])} ({e['configs']} configs)", lambda p: fmt_duration(p["sweep_s"]))
    row("cost of the sweep (hours × $/h)", lambda p: f"~${p['sweep_usd']:g}" if "sweep_usd" in p else "-",
        lambda e: "-",
        lambda p: fmt_usd(p["sweep_usd"]) + (f" at ${'/'.join(f'{x:g}' for x in p['usd_per_hour'])}/h"
                                               if p["sweep_usd"] is not None else ""))
    w("\nSeed columns: the figures of the seed document's plan, quoted. Estimate: FLOPs per step over "
      f"{estimate['mfu_guess']:.0%} of the GPU's peak (pagating.flops, the table MFU and `vast offers` use) for "
      "this profile's grid and train.max_steps. " if estimate else "\nSeed columns: the seed plan's figures. ")
    w("Measured: mean s/step of the configs run on that GPU; one run = train.max_steps × s/step, averaged; "
      "whole sweep = their sum (training steps only; evaluation, checkpoints and start-up come on top).\n")
    if not perf:
        w("\nNo run logged `perf/step_time_s`.\n")
    w("\n## Plots\n\n")
    for name, title in (("eval_loss", "eval loss vs step"), ("final_eval_loss", "final eval loss by α mode and lr"),
                        ("alpha", "α trajectories"), ("perf", "s/step and GPU util")):
        w(f"![{title}]({PLOTS}/{name}.png)\n")
    return out.getvalue()


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _g(x: float) -> str:
    return f"{x:.6g}"


def plot_files(rows: list[dict]) -> dict[str, bytes | str]:
    """{file name under plots/: content}: the PNGs (Agg) and the CSVs for `dvc plots`."""
    return {**_eval_loss_plot(rows), **_final_loss_plot(rows), **_alpha_plot(rows), **_perf_plot(rows)}


def _figure(size=(8, 5)):
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _eval_loss_plot(rows: list[dict]) -> dict[str, bytes | str]:
    """Eval loss vs step."""
    fig = _figure()
    ax = fig.add_subplot()
    for r in rows:
        ax.plot([s for s, _ in r["eval_curve"]], [v for _, v in r["eval_curve"]], marker="o", ms=3, label=r["name"])
    ax.set(xlabel="optimizer step", ylabel="eval loss", title="Eval loss per config")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return {"eval_loss.png": _png(fig),
            "eval_loss.csv": _csv([["config", "step", "eval_loss"]]
                                  + [[r["name"], s, _g(v)] for r in rows for s, v in r["eval_curve"]])}


def _final_loss_plot(rows: list[dict]) -> dict[str, bytes | str]:
    """Final eval loss by α mode (groups) and lr (bars). Several runs of one cell (unit/seed axes): mean."""
    from pagating.alpha import sort_key as alpha_sort_key  # each mode's class says where it goes

    modes = sorted({r["alpha_mode"] for r in rows}, key=alpha_sort_key)
    lrs = sorted({r["learning_rate"] for r in rows if r["learning_rate"] is not None})
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(len(lrs), 1)
    for j, lr in enumerate(lrs):
        xs, ys = [], []
        for i, mode in enumerate(modes):
            cell = [r["final_eval_loss"] for r in rows if r["alpha_mode"] == mode and r["learning_rate"] == lr]
            if cell:
                xs.append(i + (j - (len(lrs) - 1) / 2) * width)
                ys.append(statistics.fmean(cell))
        bars = ax.bar(xs, ys, width, label=f"lr={lr:g}")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(modes)), modes, rotation=15)
    ax.set(ylabel="final eval loss", title="Final eval loss by α mode and learning rate")
    lows = [r["final_eval_loss"] for r in rows]
    ax.set_ylim(min(lows) - 0.1 * (max(lows) - min(lows) + 0.1), max(lows) + 0.1 * (max(lows) - min(lows) + 0.1))
    ax.legend()
    return {"final_eval_loss.png": _png(fig), "final_eval_loss.csv": _csv(
        [["alpha_mode", "learning_rate", "final_eval_loss"]]
        + [[r["alpha_mode"], _g(r["learning_rate"]) if r["learning_rate"] is not None else "", _g(r["final_eval_loss"])]
           for r in sorted(rows, key=lambda r: (alpha_sort_key(r["alpha_mode"]), r["learning_rate"] or 0, r["name"]))])}


def _alpha_plot(rows: list[dict]) -> dict[str, bytes | str]:
    """α trajectories (the modes whose α moves log alpha/layer_NN)."""
    fig = _figure()
    ax = fig.add_subplot()
    with_alpha = [r for r in rows if r["alpha_curve"]]
    for r in with_alpha:
        ax.plot([s for s, _ in r["alpha_curve"]], [v for _, v in r["alpha_curve"]], label=r["name"])
    if with_alpha:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no config logged alpha/layer_NN (static α only)", ha="center", transform=ax.transAxes)
    ax.set(xlabel="optimizer step", ylabel="α (mean over layers)", title="α trajectories", ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    return {"alpha.png": _png(fig)}


def _perf_plot(rows: list[dict]) -> dict[str, bytes | str]:
    """s/step and GPU util per config."""
    fig = _figure((10, 5))
    names = [r["name"] for r in rows]
    for k, (key, label) in enumerate((("s_per_step", "s/step"), ("gpu_util_pct", "GPU util (%)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        vals = [r[key] for r in rows]
        bars = ax.barh(range(len(rows)), [v if v is not None else 0.0 for v in vals])
        ax.bar_label(bars, labels=["" if v is None else f"{v:.4g}" for v in vals], fontsize=7)
        for i, v in enumerate(vals):
            if v is None:
                ax.text(0, i, " n/a", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), names if k == 0 else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel=label, title=label)
    fig.suptitle("Speed per config (steady-state windows)")
    return {"perf.png": _png(fig)}


# The stage -----------------------------------------------------------------------------------

def plan_estimate(cfg: dict, gpu: str = "RTX 4090") -> dict[str, Any] | None:
    """The profile's sweep on the seed plan's GPU, projected from pagating.flops (peak table + formula)."""
    from pagating import vast_cost

    try:
        s = vast_cost.estimated_step_time(cfg, gpu)
        configs, steps = vast_cost.grid_size(cfg), int(cfg["train"]["max_steps"])
    except (KeyError, TypeError, ValueError, UserError):
        return None
    return {"gpu": gpu, "s_per_step": s, "max_steps": steps, "one_run_s": steps * s, "configs": configs,
            "sweep_s": configs * steps * s, "mfu_guess": vast_cost.MFU_GUESS}


def report(cfg: dict, sweep_json: str | Path | None = SWEEP_JSON, sweep_id: str | None = None,
           out_dir: str | Path = REPORTS_DIR, register: str | None = None) -> dict[str, Any]:
    """Write summary.md, metrics.json and plots/ for a sweep, attach them to the sweep's parent run, and
    (register=NAME) register the best config's MLflow model; returns the metrics dict."""
    from pagating import tracking

    uri = tracking.tracking_uri(cfg)
    tracking.check_server(uri)
    m = re.match(r"sqlite:///(.+)", uri)
    if m and not Path(m.group(1)).exists():  # do not create an empty store by looking
        raise UserError(f"no MLflow store at {m.group(1)}: run `pagating sweep` first or set MLFLOW_TRACKING_URI")
    mlf = tracking.client(uri)
    info = find_sweep(mlf, cfg, uri, sweep_json, sweep_id)
    exp_name = mlf.get_experiment(info["runs"][0][1].info.experiment_id).name

    rows, seen = [], set()
    repeated = {n for n, count in collections.Counter(name for name, _ in info["runs"]).items() if count > 1}
    for name, run in info["runs"]:
        row = collect(mlf, name, run)
        if row is None:
            info["excluded"].append((name, "no eval/loss"))
            continue
        if name in repeated and row["seed"] is not None:  # a seed axis: name each run by its seed
            row["name"] = f"{name} seed={row['seed']}"
        if row["name"] in seen:  # the same run name twice otherwise: tell them apart
            row["name"] = f"{name} #{row['config_hash'][:8] or run.info.run_id[:8]}"
        seen.add(row["name"])
        rows.append(row)
    if not rows:
        raise UserError(f"sweep {info['sweep_id']} has no run with an eval loss yet")
    rows.sort(key=lambda r: (r["best_eval_loss"], r["name"]))
    info["excluded"] = sorted(info["excluded"])

    doc = metrics_doc(rows)
    perf = performance(rows)
    cmp = comparison(rows)
    estimate = plan_estimate(cfg)
    plots = plot_files(rows)
    out = Path(out_dir)
    (out / PLOTS).mkdir(parents=True, exist_ok=True)
    (out / METRICS).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / SUMMARY).write_text(summary_md(info, exp_name, rows, perf, cmp, estimate))
    for fname, content in plots.items():
        path = out / PLOTS / fname
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    exp_id = info["runs"][0][1].info.experiment_id
    if info.get("parent_run_id"):  # the sweep row in the UI carries its report
        parent = info["parent_run_id"]
        tracking.retry(lambda: _attach(mlf, parent, out), "attach the report to the sweep run", attempts=4)
        print(f"sweep run (report attached): {tracking.run_url(uri, exp_id, parent)}")
    print(f"runs: {tracking.experiment_url(uri, exp_id)}")
    if register:
        print(f"registered: {register_best(mlf, uri, rows[0], register)}")
    return doc


def _attach(mlf, run_id: str, out: Path) -> None:
    mlf.log_artifact(run_id, str(out / SUMMARY), "report")
    mlf.log_artifact(run_id, str(out / METRICS), "report")
    for png in sorted((out / PLOTS).glob("*.png")):
        mlf.log_artifact(run_id, str(png), "report/plots")


def register_best(mlf, uri: str, best: dict, name: str) -> str:
    """Register the best config's MLflow model as a new version of `name`; returns 'name vN'."""
    import mlflow

    from pagating import tracking

    model_id = tracking.run_model_id(mlf, mlf.get_run(best["run_id"]))
    if model_id is None:
        raise UserError(f"the best run {best['run_id']} ({best['name']}) logged no MLflow model; rerun it "
                        "with this version of pagating to register it")
    with tracking.fluent_scope(uri):
        mv = mlflow.register_model(f"models:/{model_id}", name)
    mlf.set_model_version_tag(name, mv.version, "pagating.config", best["name"])
    return f"{name} v{mv.version} ({tracking.ui_base(uri)}/#/models/{name}/versions/{mv.version})"


def cli_report(args) -> int:
    cfg = config_from_args(args)
    if args.sweep_json and not Path(args.sweep_json).is_file():
        raise UserError(f"{args.sweep_json} not found: give the file `pagating sweep` wrote, or leave "
                        "--sweep-json out to find the sweep in MLflow")
    doc = report(cfg, sweep_json=args.sweep_json or SWEEP_JSON, sweep_id=args.sweep_id, out_dir=args.out,
                 register=args.register)
    best = doc["best_config"]
    print(f"pagating report: {len(doc) - 1} configs -> {Path(args.out) / SUMMARY}, {Path(args.out) / METRICS}, "
          f"{Path(args.out) / PLOTS}/; best: {best} (best eval loss {doc[best]['best_eval_loss']:.4f})")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("report", help="tables, DVC metrics and plots of a sweep, read from MLflow")
    add_config_args(p, "report")
    p.add_argument("--sweep-id", help="the sweep to report (default: the one in reports/sweep.json, "
                   "else the newest sweep in the profile's experiment)")
    p.add_argument("--sweep-json", help="the run list `pagating sweep` wrote (default: reports/sweep.json if present)")
    p.add_argument("--out", default=REPORTS_DIR, help=f"output folder (default: {REPORTS_DIR})")
    p.add_argument("--register", metavar="NAME", help="register the best config's model in the Model Registry")
    p.set_defaults(func=cli_report)
