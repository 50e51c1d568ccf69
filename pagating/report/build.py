"""`pagating report`: a sweep's runs, read back from MLflow, as summary.md, metrics.json and plots/ under
reports/, attached to the sweep's parent run; `--register` puts the best config's model in the registry.

Every figure is read from MLflow (pagating.report.read) or derived from what is read (a mean, a product,
a sum, a confidence interval), except the seed plan's quoted figures (pagating.report.perf.SEED_PLAN)
and the pagating.cost estimate beside them. Files are written only after every read succeeded, so a
failed read leaves the last report whole. Runs left out of the statistics (no whole-split
`final/eval_loss`, or a seed run twice in one config) are listed under "Not ranked".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pagating import names
from pagating.config import UserError, add_config_args, config_from_args
from pagating.report.markdown import summary_md
from pagating.report.metrics import metrics_doc
from pagating.report.perf import performance, plan_estimate
from pagating.report.plots import PLOT_TITLES, plot_files
from pagating.report.read import find_sweep, read_rows
from pagating.report.stats import gating, median_run
from pagating.tracking import store

CHAMPION = "champion"


def _ranked(rows: list[dict], gate: dict[str, Any], info: dict) -> list[dict]:
    """The rows the statistics use, in their config's rank, then seed; a run they leave out (a seed run
    twice in one config) is listed under "Not ranked" with why, so the table and the means agree."""
    info["excluded"] = sorted(info["excluded"] + [(r["name"], why) for r, why in gate["dropped"]])
    rank = {r["run_id"]: i for i, g in enumerate(gate["groups"]) for r in g["runs"]}
    kept = [r for r in rows if r["run_id"] in rank]
    return sorted(kept, key=lambda r: (rank[r["run_id"]], r["seed"] if r["seed"] is not None else 0, r["name"]))


def report(cfg: dict, sweep_json: str | Path | None = names.SWEEP_JSON, sweep_id: str | None = None,
           out_dir: str | Path = names.REPORTS_DIR, register: str | None = None) -> dict[str, Any]:
    """Write summary.md, metrics.json and plots/ for a sweep, attach them to the sweep's parent run, and
    (register=NAME) register the best config's median-seed model as `champion`; returns the metrics dict."""
    uri = store.tracking_uri(cfg)
    mlf = _open_store(uri, register)
    info = find_sweep(mlf, cfg, uri, sweep_json, sweep_id)
    exp_id = info["runs"][0][1].info.experiment_id
    exp_name = mlf.get_experiment(exp_id).name
    n_ran = len(info["runs"]) + len(info["excluded"])  # finished runs and failed configs, before read_rows adds
    rows = read_rows(mlf, info)
    estimate = plan_estimate(rows, n_ran)
    gate = gating(rows)
    rows = _ranked(rows, gate, info)
    doc = metrics_doc(rows, gate)
    plots = plot_files(gate["groups"], rows)
    out = Path(out_dir)
    _write(out, doc, summary_md(info, exp_name, rows, performance(rows), gate, estimate, plots), plots)
    if info.get("parent_run_id"):  # the sweep row in the UI carries its report
        parent = info["parent_run_id"]
        store.retry(lambda: _attach(mlf, parent, out), "attach the report to the sweep run", attempts=4)
        print(f"sweep run (report attached): {store.run_url(uri, exp_id, parent)}")
    print(f"runs: {store.experiment_url(uri, exp_id)}")
    if register:
        print(f"registered: {register_champion(mlf, uri, gate['best'], register)}")
    return doc


def _open_store(uri: str, register: str | None):
    """The MLflow client, once the server answers, the user may register (if asked) and the store exists."""
    store.check_server(uri)
    if register:  # before any work: the GPU user may not register models (pagating.server_auth)
        store.require_admin(uri, "`pagating report --register`")
    m = re.match(r"sqlite:///(.+)", uri)
    if m and not Path(m.group(1)).exists():  # do not create an empty store by looking
        raise UserError(f"no MLflow store at {m.group(1)}: run `pagating sweep` first or set MLFLOW_TRACKING_URI")
    return store.client(uri)


def _write(out: Path, doc: dict[str, Any], summary: str, plots: dict[str, bytes | str]) -> None:
    (out / names.PLOTS).mkdir(parents=True, exist_ok=True)
    (out / names.METRICS).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / names.SUMMARY).write_text(summary)
    for fname, content in plots.items():
        path = out / names.PLOTS / fname
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    for name in PLOT_TITLES:  # a figure left out this time must not survive from an earlier report
        if f"{name}.png" not in plots:
            (out / names.PLOTS / f"{name}.png").unlink(missing_ok=True)


def _attach(mlf, run_id: str, out: Path) -> None:
    mlf.log_artifact(run_id, str(out / names.SUMMARY), "report")
    mlf.log_artifact(run_id, str(out / names.METRICS), "report")
    for png in sorted((out / names.PLOTS).glob("*.png")):
        mlf.log_artifact(run_id, str(png), "report/plots")


def register_champion(mlf, uri: str, best: dict, name: str) -> str:
    """Register the best config's median-seed MLflow model as a new version of `name`, alias `champion`;
    returns 'name vN ...' saying which run it is."""
    import mlflow  # heavy: ~1 s; only --register needs the fluent API

    pick = median_run(best)
    model_id = store.run_model_id(mlf, mlf.get_run(pick["run_id"]))
    if model_id is None:
        raise UserError(f"the best config's median run {pick['run_id']} ({pick['name']}) logged no MLflow model; "
                        "rerun it with this version of pagating to register it")
    with store.fluent_scope(uri):
        mv = mlflow.register_model(f"models:/{model_id}", name)
    mlf.set_model_version_tag(name, mv.version, "pagating.config", best["config"])
    mlf.set_model_version_tag(name, mv.version, "pagating.seed", str(pick["seed"]))
    mlf.set_registered_model_alias(name, CHAMPION, mv.version)
    return (f"{name} v{mv.version} @{CHAMPION}: {best['config']}, run {pick['run_id']} (seed {pick['seed']}, the "
            f"median validation loss {pick['val_loss']:.4f} of its {len(best['runs'])} seed"
            f"{'s' if len(best['runs']) != 1 else ''}) ({store.ui_base(uri)}/#/models/{name}/versions/{mv.version})")


def cli_report(args) -> int:
    cfg = config_from_args(args)
    if args.sweep_json and not Path(args.sweep_json).is_file():
        raise UserError(f"{args.sweep_json} not found: give the file `pagating sweep` wrote, or leave "
                        "--sweep-json out to find the sweep in MLflow")
    doc = report(cfg, sweep_json=args.sweep_json or names.SWEEP_JSON, sweep_id=args.sweep_id, out_dir=args.out,
                 register=args.register)
    best = next(g for g in doc["groups"] if g["config"] == doc["best_config"])
    out = Path(args.out)
    print(f"pagating report: {len(doc['groups'])} configs, {len(doc['runs'])} runs -> {out / names.SUMMARY}, "
          f"{out / names.METRICS}, {out / names.PLOTS}/; best: {doc['best_config']} (mean validation loss "
          f"{best['val_mean']:.4f} over {len(best['seeds'])} seed{'s' if len(best['seeds']) != 1 else ''})\n"
          f"verdict: {doc['verdict']}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("report", help="tables, DVC metrics and plots of a sweep, read from MLflow")
    add_config_args(p, "report")
    p.add_argument("--sweep-id", help="the sweep to report (default: the one in reports/sweep.json, "
                   "else the newest sweep in the profile's experiment)")
    p.add_argument("--sweep-json", help="the run list `pagating sweep` wrote (default: reports/sweep.json if present)")
    p.add_argument("--out", default=names.REPORTS_DIR, help=f"output folder (default: {names.REPORTS_DIR})")
    p.add_argument("--register", metavar="NAME", help="register the best config's model in the Model Registry")
    p.set_defaults(func=cli_report)
