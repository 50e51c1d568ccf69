"""Does gating help? Runs grouped by config, selected on validation, judged on test.

A config is everything but the seed. Per config: mean ± 95% t interval over seeds of the final
validation loss (`final/eval_loss`, the evaluation of the weights that are saved) and of `test/loss`.
The best config is the lowest mean validation loss. Every gated config is compared with the `plain`
baseline at the same learning rate and with the baseline at its own best learning rate (chosen on
validation): the per-seed difference (config − baseline, over the seeds both ran), its 95% CI and the
paired t-test's two-sided p, Holm-corrected over the comparisons of one split. No p-value from fewer
than MIN_SEEDS seeds. The verdict is read off the test split. scipy does the t distribution; Holm's
step-down is four lines here (scipy.stats.false_discovery_control only does Benjamini-Hochberg).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from pagating.config import is_plain

MIN_SEEDS = 3  # a paired t-test over 2 seeds has 1 degree of freedom: its p says nothing a reader can use
ALPHA = 0.05
POWER = 0.8  # the smallest detectable difference is the one found with this probability
UNMATCHED = 0.02  # arms further apart than this in parameters are compared "unmatched"
SPLITS = ("test", "val")  # the verdict's split first


def config_label(unit: str, alpha_mode: str, lr: float | None) -> str:
    """A config's name, the run name without the seed (pagating.train.run_name)."""
    lr_text = "?" if lr is None else f"{lr:g}"
    return f"plain lr={lr_text}" if is_plain(unit) else f"{unit} {alpha_mode} lr={lr_text}"


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t confidence interval (None for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, float(stats.t.ppf(1 - ALPHA / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """a − b over the seeds both ran: mean, 95% CI half-width (2+ seeds), the per-seed range, and the
    paired t-test's two-sided p (MIN_SEEDS+ seeds, else None)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return {"n": 0, "diff_mean": None, "diff_ci95": None, "p": None, "range": None, "sd": None}
    mean, half = mean_ci(diffs)
    p = None
    if len(diffs) >= MIN_SEEDS:
        p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
        if math.isnan(p):  # every seed gave the same difference: zero spread
            p = 1.0 if mean == 0 else 0.0
    return {"n": len(diffs), "diff_mean": mean, "diff_ci95": half, "p": p, "range": (min(diffs), max(diffs)),
            "sd": statistics.stdev(diffs) if len(diffs) > 1 else None}


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None): the k-th smallest of m is multiplied by
    m − k + 1, kept monotone, capped at 1. Never below the raw p."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p))
        out[i] = running
    return out


def group(rows: list[dict]) -> list[dict]:
    """Runs -> configs, ranked by mean validation loss. A row: config, unit, alpha_mode, learning_rate,
    n_params, flops_per_token, d_ff, seed, val_loss, test_loss, run_id."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["config"], r.get("d_ff"))
        g = groups.setdefault(key, {k: r.get(k) for k in ("config", "unit", "alpha_mode", "learning_rate",
                                                           "n_params", "flops_per_token", "d_ff")})
        g.setdefault("runs", []).append(r)
    labels = [g["config"] for g in groups.values()]
    out = []
    for g in groups.values():
        if labels.count(g["config"]) > 1:  # the same config at two widths (e.g. matched and not): say which
            g["config"] = f"{g['config']} d_ff={g['d_ff']}"
        g["plain"] = is_plain(g["unit"] or "")
        g["val"] = _by_seed(g["runs"], "val_loss")
        g["test"] = _by_seed(g["runs"], "test_loss")
        g["seeds"] = sorted(g["val"])
        g["val_mean"], g["val_ci95"] = mean_ci(list(g["val"].values()))
        g["test_mean"], g["test_ci95"] = mean_ci(list(g["test"].values())) if g["test"] else (None, None)
        out.append(g)
    out.sort(key=lambda g: (g["val_mean"], g["config"]))
    return out


def median_run(group: dict) -> dict:
    """The run of a config with the median validation loss among its seeds (the lower middle one of an
    even count): the model that stands for the config, not its luckiest seed."""
    runs = sorted(group["runs"], key=lambda r: (r["val_loss"], r["seed"] if r["seed"] is not None else 0))
    return runs[(len(runs) - 1) // 2]


def _by_seed(runs: list[dict], key: str) -> dict[int, float]:
    """seed -> value; runs without a seed param are numbered in order."""
    out: dict[int, float] = {}
    for i, r in enumerate(runs):
        if r.get(key) is not None:
            out[r["seed"] if r.get("seed") is not None else -1 - i] = r[key]
    return out


def compare(groups: list[dict]) -> list[dict]:
    """Each gated config vs the baseline at its lr and vs the baseline at the baseline's best lr (one
    comparison when they are the same run set), on both splits, Holm-corrected per split."""
    bases = [g for g in groups if g["plain"]]  # ranked by validation already: bases[0] is the best lr
    out = []
    for g in (g for g in groups if not g["plain"]):
        same = next((b for b in bases if b["learning_rate"] == g["learning_rate"]), None)
        picks = [(same, "same lr")] if same else []
        if bases and bases[0] is not same:
            picks.append((bases[0], "baseline's best lr"))
        elif bases:
            picks = [(same, "same lr = baseline's best lr")]
        for base, kind in picks:
            gap = (abs(g["n_params"] - base["n_params"]) / base["n_params"]
                   if g["n_params"] and base["n_params"] else None)
            for split in SPLITS:
                d = paired(g[split], base[split])
                out.append({"config": g["config"], "baseline": base["config"], "kind": kind, "split": split,
                            **d, "param_gap": gap, "matched": None if gap is None else gap <= UNMATCHED})
    for split in SPLITS:
        rows = [c for c in out if c["split"] == split]
        for c, adj in zip(rows, holm([c["p"] for c in rows]), strict=True):
            c["p_holm"] = adj
    return out


def smallest_detectable(comparisons: list[dict]) -> float | None:
    """The test-split difference a paired t-test over these seeds finds with POWER probability after
    Holm's strictest step, from the median spread of the per-seed differences: (t_{1−α/2m} + t_POWER)·sd/√n
    with df = n − 1 (the usual normal-approximation formula, with t quantiles for few seeds)."""
    from scipy import stats

    tests = [c for c in comparisons if c["split"] == "test" and c["sd"] is not None and c["n"] >= MIN_SEEDS]
    if not tests:
        return None
    n, m = min(c["n"] for c in tests), len(tests)
    sd = statistics.median(c["sd"] for c in tests)
    return float((stats.t.ppf(1 - ALPHA / (2 * m), n - 1) + stats.t.ppf(POWER, n - 1)) * sd / math.sqrt(n))


def verdict(groups: list[dict], comparisons: list[dict]) -> str:
    """One sentence: the significant test-split comparison of the gated config ranked best on validation,
    or why there is none."""
    tests = [c for c in comparisons if c["split"] == "test" and c["diff_mean"] is not None]
    seeds = max((len(g["seeds"]) for g in groups), default=0)
    if not tests:
        why = "no `plain` baseline in this sweep" if not any(g["plain"] for g in groups) else \
            "no test/loss shared by a gated config and the baseline"
        return f"No verdict: {why} (the default grid has `sweep.unit: [paGLU, plain]`)."
    unmatched = ("" if not any(c["matched"] is False for c in tests)
                 else " (unmatched: the arms differ by more than 2% in parameters)")
    rank = {g["config"]: i for i, g in enumerate(groups)}
    if all(c["p"] is None for c in tests):
        top = min(tests, key=lambda c: (rank[c["config"]], c["kind"]))
        lo, hi = top["range"]
        return (f"No p-value: {seeds} seed{'s' if seeds != 1 else ''} per config, and a paired test needs at "
                f"least {MIN_SEEDS} (add `sweep.seed: [1, 2, 3]`); on test, {top['config']} (best gated config "
                f"on validation) minus {top['baseline']} is {top['diff_mean']:+.4f}"
                + (f" (per-seed range {lo:+.4f} to {hi:+.4f})" if top["n"] > 1 else " from one seed")
                + f"{unmatched}.")
    hits = [c for c in tests if c["p_holm"] is not None and c["p_holm"] < ALPHA]
    if not hits:
        x = smallest_detectable(comparisons)
        n = min(c["n"] for c in tests if c["p"] is not None)
        return (f"No difference detectable with {n} seeds on test; the smallest detectable difference is about "
                + (f"{x:.4f} in test loss" if x is not None else "unknown") + f" ({POWER:.0%} power, Holm over "
                f"{sum(c['p'] is not None for c in tests)} comparisons){unmatched}.")
    c = min(hits, key=lambda c: (rank[c["config"]], c["p_holm"]))
    g = next(g for g in groups if g["config"] == c["config"])
    word = "lower" if c["diff_mean"] < 0 else "higher"
    ci = f" ± {c['diff_ci95']:.4f}" if c["diff_ci95"] is not None else ""
    return (f"{g['unit']} with α {g['alpha_mode']} at lr {g['learning_rate']:g} has a {word} test loss than "
            f"{c['baseline']} ({c['kind']}) by {abs(c['diff_mean']):.4f}{ci} (95% CI; test loss "
            f"{g['test_mean']:.4f}), Holm-corrected p = {c['p_holm']:.3g}, paired over {c['n']} seeds"
            + (f" ({len(hits) - 1} more comparison{'s' if len(hits) > 2 else ''} significant)" if len(hits) > 1
               else "") + f"{unmatched}.")
