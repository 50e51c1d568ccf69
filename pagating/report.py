"""`pagating report`: a sweep's runs, read back from MLflow, as tables, DVC metrics and plots.

Every figure here is read from MLflow (or derived from what is read: a mean, a product, a sum, a
confidence interval), except the seed plan's quoted figures (SEED_PLAN) and the pagating.flops estimate
beside them. Files are written only after every read succeeded, with sorted keys and
fixed float formats, so two reports over the same runs are byte-identical (PNGs aside).

Which runs: the run ids of `reports/sweep.json` (written by `pagating sweep`; it also names configs
satisfied by a finished run outside the sweep's parent), else the FINISHED children of the sweep's
parent run (`--sweep-id`, or the newest run tagged `pagating.role=sweep` in `pagating-<profile>`).

The statistics (configs over seeds, chosen on validation, judged on test) and their "Does gating help?"
section are pagating.stats'; the figures pagating.report_plots' (a figure without data is not written
or linked); the plan-vs-measured table pagating.report_perf's. Runs left out of the statistics (no
whole-split `final/eval_loss`, or a seed run twice in one config) are listed under "Not ranked".
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pagating.config import PLAIN, UserError, add_config_args, config_from_args, experiment_name, is_plain
from pagating.report_perf import fmt_usd, perf_md, performance, plan_estimate

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
    """One run's figures from MLflow; None without `final/eval_loss`. The intermediate `eval/loss` is no
    stand-in: on the sample profile it is a subset of validation (eval.subset_blocks), and ranking it
    beside whole-split losses would mix two measures."""
    from pagating.flops import flops_per_token
    from pagating.stats import config_label

    rid, metrics, params, tags = run.info.run_id, run.data.metrics, run.data.params, run.data.tags
    h = {key: _history(mlf, rid, key) for key in
         ("eval/loss", "eval/ppl", "perf/step_time_s", "perf/tokens_per_s", "perf/mfu")}
    h["gpu_util"] = gpu_util_history(mlf, rid, metrics)
    if "final/eval_loss" not in metrics:
        return None
    losses = [v for _, v in h["eval/loss"]]
    final = metrics["final/eval_loss"]
    best = metrics.get("best/eval_loss", min(losses, default=final))
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
        "name": name, "run_id": rid, "config_hash": tags.get("pagating.config_hash", ""),
        "start_time": run.info.start_time,
        "seed": as_int["train.seed"], "n_params": as_int["model.n_params"], "d_ff": as_int["model.d_ff"],
        "flops_per_token": fpt, "alpha_mode": mode, "unit": unit, "learning_rate": num["train.learning_rate"],
        "max_steps": as_int["train.max_steps"] or None, "batch_size": as_int["train.batch_size"],
        "block_size": as_int["data.block_size"],
        "gpu": tags.get("gpu.name") or "unknown", "usd_per_hour": rate,
        "val_loss": final, "test_loss": metrics.get("test/loss"),
        "best_eval_loss": best, "final_eval_loss": final,
        "first_eval_loss": losses[0] if losses else None,
        "best_eval_ppl": min(ppls) if ppls else (math.exp(min(best, 50.0)) if best is not None else None),
        "final_eval_ppl": metrics.get("final/eval_ppl", math.exp(min(final, 50.0))),
        "s_per_step": steady_mean(h["perf/step_time_s"]),
        "tokens_per_s": steady_mean(h["perf/tokens_per_s"], harmonic=True),
        "gpu_util_pct": steady_mean(h["gpu_util"]), "cost_usd": cost, "mfu": steady_mean(h["perf/mfu"]),
        "eval_curve": h["eval/loss"], "alpha_curve": alpha,
    }


# Does gating help? (pagating.stats computes it and writes its section) ------------------------

def gating(rows: list[dict]) -> dict[str, Any]:
    """Configs, comparisons, verdict; `dropped`: the (row, why) its statistics leave out."""
    from pagating import stats

    groups = stats.group(rows)
    comparisons = stats.compare(groups)
    return {"groups": groups, "comparisons": comparisons, "verdict": stats.verdict(groups, comparisons),
            "best": groups[0], "dropped": [d for g in groups for d in g["dropped"]]}


def _num(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")  # fixed precision: identical bytes on every re-run


PLOT_TITLES = {"eval_loss": "validation loss vs step", "final_eval_loss": "final loss, mean ± 95% CI",
               "alpha": "α trajectories", "perf": "speed per run"}
RUN_KEYS = ("best_eval_loss", "final_eval_loss", "first_eval_loss", "best_eval_ppl", "final_eval_ppl",
            "s_per_step", "tokens_per_s", "gpu_util_pct", "cost_usd", "mfu")


def metrics_doc(rows: list[dict], gate: dict[str, Any]) -> dict[str, Any]:
    """reports/metrics.json (schema: docs/report.md): groups, best_config, comparisons, verdict, and per run
    its losses and speed (`runs`, for `dvc metrics diff`)."""
    groups = [{"config": g["config"], "unit": g["unit"], "alpha_mode": g["alpha_mode"],
               "learning_rate": g["learning_rate"], "n_params": g["n_params"],
               "flops_per_token": _num(g["flops_per_token"]), "seeds": g["seeds"], "test_seeds": g["test_seeds"],
               "val_mean": _num(g["val_mean"]), "val_ci95": _num(g["val_ci95"]),
               "test_mean": _num(g["test_mean"]), "test_ci95": _num(g["test_ci95"]),
               "run_ids": [r["run_id"] for r in sorted(g["runs"], key=lambda r: (r["seed"] is None, r["seed"]))]}
              for g in gate["groups"]]
    comparisons = [{"config": c["config"], "baseline": c["baseline"], "kind": c["kind"], "split": c["split"],
                    "diff_mean": _num(c["diff_mean"]), "diff_ci95": _num(c["diff_ci95"]), "p": _num(c["p"]),
                    "p_holm": _num(c.get("p_holm")), "n": c["n"], "matched": c["matched"], "p_note": c["p_note"]}
                   for c in gate["comparisons"]]
    runs = {r["name"]: {k: _num(r[k]) for k in RUN_KEYS if r[k] is not None} for r in rows}
    return {"groups": groups, "best_config": gate["best"]["config"], "comparisons": comparisons,
            "verdict": gate["verdict"], "runs": runs}


def _opt(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_md(info: dict, exp_name: str, rows: list[dict], perf: dict[str, dict], gate: dict[str, Any],
               estimate: dict | None = None, plots: Iterable[str] = ()) -> str:
    """`plots`: the file names written under plots/; only those are linked (a figure without data is not)."""
    from pagating.stats import gating_md

    out = io.StringIO()
    w = out.write
    w(f"# Sweep report: {info['sweep_id']}\n\n")
    w(f"**Verdict:** {gate['verdict']}\n\n")
    w(f"Profile `{info['profile']}`, MLflow experiment `{exp_name}`"
      + (f", parent run `{info['parent_run_id']}`" if info.get("parent_run_id") else "")
      + f". {len(rows)} finished runs, {len(gate['groups'])} configs; best config (lowest mean validation loss): "
        f"{gate['best']['config']}. Every number below is read from MLflow; regenerate with `pagating report`.\n\n")
    w(gating_md(gate))
    w("## Runs\n\n")
    w("| # | run | validation loss | test loss | best eval loss | final eval ppl | s/step | tokens/s "
      "| GPU util | $ | MFU | run id |\n")
    w("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    for i, r in enumerate(rows, 1):
        util = "n/a" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.1f}%"
        w(f"| {i} | {r['name']} | {r['val_loss']:.4f} | {_opt(r['test_loss'], '.4f')} | {r['best_eval_loss']:.4f} "
          f"| {_opt(r['final_eval_ppl'], '.2f')} | {_opt(r['s_per_step'], '.4g')} "
          f"| {_opt(r['tokens_per_s'], '.0f')} | {util} | {fmt_usd(r['cost_usd'])} "
          f"| {'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} | `{r['run_id']}` |\n")
    if info["excluded"]:
        w("\nNot ranked: " + "; ".join(f"{n} ({why})" for n, why in info["excluded"]) + ".\n")
    w("\nRuns in the order of their config's rank, then seed. Validation loss: `final/eval_loss`; best eval loss "
      "(`best/eval_loss`, the lowest of the run's evals) is shown, not used: choosing on it would pick a luckier "
      "moment than the saved model. s/step, tokens/s and GPU util: means over the run's logging windows, without "
      "the first (warm-up). $: the run's last `cost/usd`, else its wall time × `cost.usd_per_hour`. MFU: "
      "`perf/mfu`, per device (FLOPs per token × tokens/s over world size × one device's peak, the peak table "
      "`vast offers` ranks by), the same steady mean; n/a where the device's peak is unknown (CPU).\n\n")
    w(perf_md(perf, estimate))
    w("\n## Plots\n\n")
    for name, title in PLOT_TITLES.items():
        if f"{name}.png" in plots:
            w(f"![{title}]({PLOTS}/{name}.png)\n")
    return out.getvalue()


# The stage -----------------------------------------------------------------------------------

def _rows(mlf, info: dict) -> list[dict]:
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


def _ranked(rows: list[dict], gate: dict[str, Any], info: dict) -> list[dict]:
    """The rows the statistics use, in their config's rank, then seed; a run they leave out (a seed run
    twice in one config) is listed under "Not ranked" with why, so the table and the means agree."""
    info["excluded"] = sorted(info["excluded"] + [(r["name"], why) for r, why in gate["dropped"]])
    rank = {r["run_id"]: i for i, g in enumerate(gate["groups"]) for r in g["runs"]}
    kept = [r for r in rows if r["run_id"] in rank]
    return sorted(kept, key=lambda r: (rank[r["run_id"]], r["seed"] if r["seed"] is not None else 0, r["name"]))


def report(cfg: dict, sweep_json: str | Path | None = SWEEP_JSON, sweep_id: str | None = None,
           out_dir: str | Path = REPORTS_DIR, register: str | None = None) -> dict[str, Any]:
    """Write summary.md, metrics.json and plots/ for a sweep, attach them to the sweep's parent run, and
    (register=NAME) register the best config's median-seed model as `champion`; returns the metrics dict."""
    from pagating import tracking
    from pagating.report_plots import plot_files

    uri = tracking.tracking_uri(cfg)
    tracking.check_server(uri)
    if register:  # before any work: the GPU user may not register models (pagating.server_auth)
        tracking.require_admin(uri, "`pagating report --register`")
    m = re.match(r"sqlite:///(.+)", uri)
    if m and not Path(m.group(1)).exists():  # do not create an empty store by looking
        raise UserError(f"no MLflow store at {m.group(1)}: run `pagating sweep` first or set MLFLOW_TRACKING_URI")
    mlf = tracking.client(uri)
    info = find_sweep(mlf, cfg, uri, sweep_json, sweep_id)
    exp_name = mlf.get_experiment(info["runs"][0][1].info.experiment_id).name
    n_ran = len(info["runs"]) + len(info["excluded"])  # finished runs and failed configs, before _rows adds
    rows = _rows(mlf, info)
    estimate = plan_estimate(rows, n_ran)
    gate = gating(rows)
    rows = _ranked(rows, gate, info)
    doc = metrics_doc(rows, gate)
    plots = plot_files(gate["groups"], rows)
    summary = summary_md(info, exp_name, rows, performance(rows), gate, estimate, plots)
    out = Path(out_dir)
    (out / PLOTS).mkdir(parents=True, exist_ok=True)
    (out / METRICS).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / SUMMARY).write_text(summary)
    for fname, content in plots.items():
        path = out / PLOTS / fname
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    for name in PLOT_TITLES:  # a figure left out this time must not survive from an earlier report
        if f"{name}.png" not in plots:
            (out / PLOTS / f"{name}.png").unlink(missing_ok=True)
    exp_id = info["runs"][0][1].info.experiment_id
    if info.get("parent_run_id"):  # the sweep row in the UI carries its report
        parent = info["parent_run_id"]
        tracking.retry(lambda: _attach(mlf, parent, out), "attach the report to the sweep run", attempts=4)
        print(f"sweep run (report attached): {tracking.run_url(uri, exp_id, parent)}")
    print(f"runs: {tracking.experiment_url(uri, exp_id)}")
    if register:
        print(f"registered: {register_champion(mlf, uri, gate['best'], register)}")
    return doc


def _attach(mlf, run_id: str, out: Path) -> None:
    mlf.log_artifact(run_id, str(out / SUMMARY), "report")
    mlf.log_artifact(run_id, str(out / METRICS), "report")
    for png in sorted((out / PLOTS).glob("*.png")):
        mlf.log_artifact(run_id, str(png), "report/plots")



CHAMPION = "champion"


def register_champion(mlf, uri: str, best: dict, name: str) -> str:
    """Register the best config's median-seed MLflow model as a new version of `name`, alias `champion`;
    returns 'name vN ...' saying which run it is."""
    import mlflow

    from pagating import tracking
    from pagating.stats import median_run

    pick = median_run(best)
    model_id = tracking.run_model_id(mlf, mlf.get_run(pick["run_id"]))
    if model_id is None:
        raise UserError(f"the best config's median run {pick['run_id']} ({pick['name']}) logged no MLflow model; "
                        "rerun it with this version of pagating to register it")
    with tracking.fluent_scope(uri):
        mv = mlflow.register_model(f"models:/{model_id}", name)
    mlf.set_model_version_tag(name, mv.version, "pagating.config", best["config"])
    mlf.set_model_version_tag(name, mv.version, "pagating.seed", str(pick["seed"]))
    mlf.set_registered_model_alias(name, CHAMPION, mv.version)
    return (f"{name} v{mv.version} @{CHAMPION}: {best['config']}, run {pick['run_id']} (seed {pick['seed']}, the "
            f"median validation loss {pick['val_loss']:.4f} of its {len(best['runs'])} seed"
            f"{'s' if len(best['runs']) != 1 else ''}) ({tracking.ui_base(uri)}/#/models/{name}/versions/{mv.version})")


def cli_report(args) -> int:
    cfg = config_from_args(args)
    if args.sweep_json and not Path(args.sweep_json).is_file():
        raise UserError(f"{args.sweep_json} not found: give the file `pagating sweep` wrote, or leave "
                        "--sweep-json out to find the sweep in MLflow")
    doc = report(cfg, sweep_json=args.sweep_json or SWEEP_JSON, sweep_id=args.sweep_id, out_dir=args.out,
                 register=args.register)
    best = next(g for g in doc["groups"] if g["config"] == doc["best_config"])
    print(f"pagating report: {len(doc['groups'])} configs, {len(doc['runs'])} runs -> {Path(args.out) / SUMMARY}, "
          f"{Path(args.out) / METRICS}, {Path(args.out) / PLOTS}/; best: {doc['best_config']} (mean validation loss "
          f"{best['val_mean']:.4f} over {len(best['seeds'])} seed{'s' if len(best['seeds']) != 1 else ''})\n"
          f"verdict: {doc['verdict']}")
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
