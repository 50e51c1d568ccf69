"""`pagating quickstart`, the README's first command: sample corpus -> prepare -> sweep -> report, all local.

A top-floor module: it chains the stages (data, sweep, report), so none of them has to import another above it.
"""

from __future__ import annotations

from pathlib import Path

from pagating.config import add_config_args, load_config, parse_sets, sets_from_args
from pagating.data.corpora import build_sample
from pagating.data.prepare import prepare
from pagating.names import METRICS, PLOTS, REPORTS_DIR, SUMMARY, SWEEP_JSON
from pagating.report.build import report
from pagating.sweep import sweep
from pagating.tracking import store


def quickstart(profile: str | None = None, sets: list[str] | None = None) -> int:
    """Every stage on the sample corpus; `sets`: SECTION.KEY=VALUE overrides, for every stage and every child run."""
    base = load_config(profile, parse_sets(sets or []))
    raw = Path(base["data"]["raw_dir"])
    if base["data"]["source"] == "sample" and not raw.exists():
        build_sample(raw)
    prepare(base)
    summary = sweep(base, extra_sets=sets)
    report(base, sweep_json=SWEEP_JSON, out_dir=REPORTS_DIR)
    uri = store.tracking_uri(base)
    link = store.experiment_url(uri, summary["experiment_id"])
    shown = f"{REPORTS_DIR}/{SUMMARY}"
    print(f"\nreport: {shown} (plots in {REPORTS_DIR}/{PLOTS}/, DVC metrics in {REPORTS_DIR}/{METRICS})\n"
          f"compare runs: mlflow ui --backend-store-uri {store.mask_uri(uri)}  ->  {link}"
          if uri.startswith("sqlite:") else f"\nreport: {shown}; runs: {link}")
    return 1 if any(c["status"] == "failed" for c in summary["configs"]) else 0


def register_cli(sub) -> None:
    p = sub.add_parser("quickstart", help="sample corpus, prepare, the 12-config sweep and the report, locally")
    add_config_args(p, "quickstart")
    p.set_defaults(func=lambda a: quickstart(a.profile, sets_from_args(a)))
