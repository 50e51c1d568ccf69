"""The report's "Expected Performance Improvement" table: the seed plan's figures, quoted, beside a
pagating.cost projection of the sweep that ran and what each GPU measured."""

from __future__ import annotations

import io
import math
import statistics
from typing import Any

from pagating import cost

# The seed document's "Expected Performance Improvement" table: the plan's own figures, quoted (the only
# numbers in the report not read from MLflow).
SEED_PLAN = {"M4 (seed, measured)": {"s_per_step": 3.04},
             "RTX 4090 (seed, projected)": {"s_per_step": 0.25, "sweep_h": 14.0, "sweep_usd": 12.0}}


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


def perf_md(perf: dict[str, dict], estimate: dict | None) -> str:
    out = io.StringIO()
    w = out.write
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
        lambda e: f"{fmt_duration(e['one_run_s'])} ({'/'.join(str(s) for s in e['max_steps'])} steps)",
        lambda p: f"{fmt_duration(p['one_run_s'])} ({'/'.join(str(s) for s in p['max_steps'])} steps)")
    row("whole sweep", lambda p: f"~{p['sweep_h']:g} h" if "sweep_h" in p else "-",
        lambda e: f"{fmt_duration(e['sweep_s'])} ({e['configs']} runs)", lambda p: fmt_duration(p["sweep_s"]))
    row("cost of the sweep (hours × $/h)", lambda p: f"~${p['sweep_usd']:g}" if "sweep_usd" in p else "-",
        lambda e: "-",
        lambda p: fmt_usd(p["sweep_usd"]) + (f" at ${'/'.join(f'{x:g}' for x in p['usd_per_hour'])}/h"
                                               if p["sweep_usd"] is not None else ""))
    w("\nSeed columns: the figures of the seed document's plan, quoted. Estimate: FLOPs per step over "
      f"{estimate['mfu_guess']:.0%} of the GPU's peak (pagating.flops, the table MFU and `vast offers` use) for "
      "the runs of this sweep (their shapes and train.max_steps; failed runs counted too). " if estimate else
      "\nSeed columns: the seed plan's figures. ")
    w("Measured: mean s/step of the runs on that GPU; one run = train.max_steps × s/step, averaged; "
      "whole sweep = their sum (training steps only; evaluation, checkpoints and start-up come on top).\n")
    if not perf:
        w("\nNo run logged `perf/step_time_s`.\n")
    return out.getvalue()


def plan_estimate(rows: list[dict], n_runs: int, gpu: str = "RTX 4090") -> dict[str, Any] | None:
    """The sweep that ran (its runs' own shapes and max_steps) on the seed plan's GPU, projected from
    pagating.flops' peak table and formula as `vast offers` does."""
    known = [r for r in rows if r["flops_per_token"] and r["max_steps"] and r["batch_size"] and r["block_size"]]
    if not known:
        return None
    peak = cost.peak_tflops(gpu) * 1e12 * cost.MFU_GUESS
    secs = [r["flops_per_token"] * r["batch_size"] * r["block_size"] / peak + cost.STEP_OVERHEAD_S
            for r in known]
    one_run = statistics.fmean(r["max_steps"] * s for r, s in zip(known, secs, strict=True))
    return {"gpu": gpu, "s_per_step": statistics.fmean(secs), "max_steps": sorted({r["max_steps"] for r in known}),
            "one_run_s": one_run, "configs": n_runs, "sweep_s": n_runs * one_run, "mfu_guess": cost.MFU_GUESS}
