"""summary.md: the verdict, the "Does gating help?" tables (pagating.report.stats' figures written down),
the runs, the plan-vs-measured table (pagating.report.perf) and links to the plots that were written.

Fixed float formats throughout, so two reports over the same runs are byte-identical.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from pagating import names
from pagating.report.perf import fmt_usd, perf_md
from pagating.report.plots import PLOT_TITLES
from pagating.report.stats import MIN_SEEDS


def _opt(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_md(info: dict, exp_name: str, rows: list[dict], perf: dict[str, dict], gate: dict[str, Any],
               estimate: dict | None = None, plots: Iterable[str] = ()) -> str:
    """`plots`: the file names written under plots/; only those are linked (a figure without data is not)."""
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
            w(f"![{title}]({names.PLOTS}/{name}.png)\n")
    return out.getvalue()


def _pm(mean: float | None, half: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if half is None else f"{mean:.4f} ± {half:.4f}"


def _spread(values: dict[int, float]) -> str:
    """With too few seeds for a CI a reader still sees how far apart the seeds landed."""
    if len(values) < 2 or len(values) >= MIN_SEEDS:
        return ""
    return f" (seeds {min(values.values()):.4f}–{max(values.values()):.4f})"


def _cmp_cell(c: dict) -> str:
    if c["diff_mean"] is None:
        return "no common seeds"
    text = f"{c['diff_mean']:+.4f}" + ("" if c["diff_ci95"] is None else f" ± {c['diff_ci95']:.4f}")
    if c["p"] is None:
        lo, hi = c["range"]
        spread = f"seeds {lo:+.4f} to {hi:+.4f}; " if c["n"] > 1 else ""
        return f"{text} ({spread}no p: {c['p_note']})"
    return f"{text} (p={c['p']:.3g}, Holm {c['p_holm']:.3g}, {c['n']} seeds)"


def _seeds_cell(g: dict) -> str:
    """Seeds behind the validation mean, and behind the test mean when fewer logged test/loss."""
    n, t = len(g["seeds"]), len(g["test_seeds"])
    return str(n) if t == n else f"{n} (test {t})"


def gating_md(gate: dict[str, Any]) -> str:
    out = io.StringIO()
    w = out.write
    groups, cmps = gate["groups"], gate["comparisons"]
    w("## Does gating help?\n\n")
    w("Configs ranked by mean validation loss (`final/eval_loss`, the evaluation of the saved weights); the test "
      "split (`test/loss`) judges. Mean over seeds ± the half-width of its 95% t interval; seeds: the runs behind "
      "the validation mean (and the test mean where fewer runs logged `test/loss`).\n\n")
    w("| # | config | unit | α mode | lr | params | FLOPs/token | seeds | validation loss | test loss |\n"
      "|---:|---|---|---|---:|---:|---:|---:|---:|---:|\n")
    for i, g in enumerate(groups, 1):
        label = f"{g['config']} (baseline)" if g["plain"] else g["config"]
        lr = "n/a" if g["learning_rate"] is None else f"{g['learning_rate']:g}"
        params = f"{g['n_params']:,}" if g["n_params"] else "n/a"
        fpt = f"{g['flops_per_token']:.4g}" if g["flops_per_token"] else "n/a"
        val = _pm(g["val_mean"], g["val_ci95"]) + _spread(g["val"])
        test = _pm(g["test_mean"], g["test_ci95"]) + _spread(g["test"])
        w(f"| {i} | {label} | {g['unit']} | {'-' if g['plain'] else g['alpha_mode']} | {lr} | {params} | {fpt} "
          f"| {_seeds_cell(g)} | {val} | {test} |\n")
    if not any(g["plain"] for g in groups):
        w("\nNo `plain` run (GPT-2's own MLP) in this sweep: add `sweep.unit: [paGLU, plain]` for a baseline.\n")
    if cmps:
        _comparisons_md(w, cmps)
    w("\n")
    return out.getvalue()


def _comparisons_md(w, cmps: list[dict]) -> None:
    w("\n### Against the baseline\n\nconfig − baseline over the seeds both ran (negative: lower loss than the "
      "baseline), ± its 95% CI; the paired t-test's two-sided p and Holm's correction over the comparisons of "
      "that split. Each gated config meets the baseline at its own lr and the baseline at the baseline's best "
      "lr (on validation).\n\n| config | baseline | params | test: diff | validation: diff |\n"
      "|---|---|---|---:|---:|\n")
    by_pair: dict[tuple, dict] = {}
    for c in cmps:
        by_pair.setdefault((c["config"], c["baseline"], c["kind"]), {})[c["split"]] = c
    for (config, base, kind), pair in by_pair.items():
        c = pair["test"]
        gap = "n/a" if c["param_gap"] is None else (f"matched ({c['param_gap']:.2%} apart)" if c["matched"]
                                                    else f"**unmatched**: {c['param_gap']:.1%} apart")
        w(f"| {config} | {base} ({kind}) | {gap} | {_cmp_cell(c)} | {_cmp_cell(pair['val'])} |\n")
    if any(c["p"] is None and 0 < c["n"] < MIN_SEEDS for c in cmps):
        w(f"\nNo p-value from fewer than {MIN_SEEDS} seeds both sides ran: one seed has no spread to test a "
          "difference against, and with 2 a paired test has one degree of freedom, so its p-value swings with every "
          "seed; the per-seed spread is shown instead. Add `sweep.seed: [1, 2, 3]` (the same seeds for every arm).\n")
    if any(c["p"] is None and c["n"] >= MIN_SEEDS for c in cmps):
        w("\nNo p-value where every seed gave the same difference (zero spread): the t statistic divides by that "
          "spread, so it is undefined, not 0.\n")
    if any(c["matched"] is False for c in cmps):
        w("\n**Unmatched arms**: the gated config and the baseline differ by more than 2% in parameters, so a "
          "difference mixes gating with size; `model.param_matched: true` (the default) equalises them.\n")
