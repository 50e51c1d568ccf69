"""Does gating help? Runs grouped by config, selected on validation, judged on test.

A config is everything but the seed. Per config: mean ± 95% t interval over seeds of the final
validation loss (`final/eval_loss`, the evaluation of the weights that are saved) and of `test/loss`.
The best config is the lowest mean validation loss. Every gated config is compared with the `plain`
baseline at the same learning rate and with the baseline at its own best learning rate (chosen on
validation): the per-seed difference (config − baseline, over the seeds both ran), its 95% CI and the
paired t-test's two-sided p, Holm-corrected over the comparisons of one split. No p-value from fewer
than MIN_SEEDS common seeds, nor from differences that do not vary across seeds (t is undefined). One
run per seed and config: a seed run twice keeps its newest run. The verdict is read off the test
split. scipy does the t distribution; Holm's step-down is four lines here
(scipy.stats.false_discovery_control only does Benjamini-Hochberg). pagating.report.markdown writes
these down as summary.md's "Does gating help?" section.
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
ZERO_SPREAD = 1e-9  # per-seed differences whose sd is below this share of the losses count as constant


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t confidence interval (None for one value)."""
    from scipy import stats  # heavy: ~1 s, paid only where a statistic is computed

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, float(stats.t.ppf(1 - ALPHA / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """a − b over the seeds both ran: mean, 95% CI half-width (2+ seeds), the per-seed range, and the
    paired t-test's two-sided p (MIN_SEEDS+ seeds, else None); `p_note` says why p is None."""
    from scipy import stats  # heavy: ~1 s, paid only where a statistic is computed

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return {"n": 0, "diff_mean": None, "diff_ci95": None, "p": None, "range": None, "sd": None,
                "p_note": "no common seeds"}
    mean, half = mean_ci(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else None
    p, note = None, None
    if len(diffs) < MIN_SEEDS:
        note = f"{len(diffs)} seed{'s' if len(diffs) != 1 else ''} < {MIN_SEEDS}"  # seeds both ran
    elif sd <= ZERO_SPREAD * max(abs(x) for s in seeds for x in (a[s], b[s])):
        # Every seed gave the same difference (up to float rounding): t = mean/0 has no distribution, and
        # scipy's nan (or a rounding-sized sd) would read as p = 0 for any constant offset.
        note = "zero spread: every seed gave the same difference"
    else:
        p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return {"n": len(diffs), "diff_mean": mean, "diff_ci95": half, "p": p, "range": (min(diffs), max(diffs)),
            "sd": sd, "p_note": note}


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
    n_params, flops_per_token, d_ff, seed, val_loss (required), test_loss, run_id, start_time (optional).
    A group's `runs` are the runs its statistics use (one per seed); `dropped` the (run, why) left out."""
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
        by_seed, g["dropped"] = one_per_seed(g["runs"])
        g["runs"] = list(by_seed.values())
        g["val"] = {s: r["val_loss"] for s, r in by_seed.items()}
        g["test"] = {s: r["test_loss"] for s, r in by_seed.items() if r.get("test_loss") is not None}
        g["seeds"], g["test_seeds"] = sorted(g["val"]), sorted(g["test"])
        g["val_mean"], g["val_ci95"] = mean_ci(list(g["val"].values()))
        g["test_mean"], g["test_ci95"] = mean_ci(list(g["test"].values())) if g["test"] else (None, None)
        out.append(g)
    out.sort(key=lambda g: (g["val_mean"], g["config"]))
    return out


def one_per_seed(runs: list[dict]) -> tuple[dict[int, dict], list[tuple[dict, str]]]:
    """seed -> the run that counts, and the (run, why) left out. A seed run twice in one config (two runs
    whose differences lie outside the config label, e.g. train.max_steps) keeps its newest run (start_time,
    then run id): one value per seed, so the paired tests pair like with like. Runs without a seed param
    are numbered -1, -2, ... in that order."""
    kept: dict[int, dict] = {}
    dropped = []
    for i, r in enumerate(sorted(runs, key=lambda r: (r.get("start_time") or 0, str(r.get("run_id"))))):
        seed = r["seed"] if r.get("seed") is not None else -1 - i
        if seed in kept:
            dropped.append((kept[seed], f"seed {seed} of {r['config']} ran again; the newer run {r['run_id']} "
                                        "counts"))
        kept[seed] = r
    return dict(sorted(kept.items())), dropped


def median_run(group: dict) -> dict:
    """The run of a config with the median validation loss among the seeds its statistics use (the lower
    middle one of an even count): the model that stands for the config, not its luckiest seed."""
    runs = sorted(group["runs"], key=lambda r: (r["val_loss"], r["seed"] if r["seed"] is not None else 0))
    return runs[(len(runs) - 1) // 2]


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
    with df = n − 1 (the usual normal-approximation formula, with t quantiles for few seeds). Only the
    comparisons that got a p count (a zero-spread one has none, and would make the answer 0)."""
    from scipy import stats  # heavy: ~1 s, paid only where a statistic is computed

    tests = [c for c in comparisons if c["split"] == "test" and c["p"] is not None]
    if not tests:
        return None
    n, m = min(c["n"] for c in tests), len(tests)
    sd = statistics.median(c["sd"] for c in tests)
    return float((stats.t.ppf(1 - ALPHA / (2 * m), n - 1) + stats.t.ppf(POWER, n - 1)) * sd / math.sqrt(n))


def _loss(x: float) -> str:
    """A loss difference to 4 decimals, or in 2 significant digits when 4 decimals would print zero."""
    return f"{x:.4f}" if x == 0 or abs(x) >= 5e-5 else f"{x:.1e}"


def verdict(groups: list[dict], comparisons: list[dict]) -> str:
    """One sentence: the significant test-split comparison of the gated config ranked best on validation,
    or why there is none."""
    tests = [c for c in comparisons if c["split"] == "test" and c["diff_mean"] is not None]
    if not tests:
        why = "no `plain` baseline in this sweep" if not any(g["plain"] for g in groups) else \
            "no test/loss shared by a gated config and the baseline"
        return f"No verdict: {why} (the default grid has `sweep.unit: [paGLU, plain]`)."
    unmatched = ("" if not any(c["matched"] is False for c in tests)
                 else " (unmatched: the arms differ by more than 2% in parameters)")
    rank = {g["config"]: i for i, g in enumerate(groups)}
    if all(c["p"] is None for c in tests):
        return _no_p(groups, tests, rank, unmatched)
    hits = [c for c in tests if c["p_holm"] is not None and c["p_holm"] < ALPHA]
    if not hits:
        x = smallest_detectable(comparisons)
        n = min(c["n"] for c in tests if c["p"] is not None)
        return (f"No difference detectable with {n} seeds on test; the smallest detectable difference is about "
                f"{_loss(x)} in test loss ({POWER:.0%} power, Holm over {sum(c['p'] is not None for c in tests)} "
                f"comparisons){unmatched}.")
    c = min(hits, key=lambda c: (rank[c["config"]], c["p_holm"]))
    g = next(g for g in groups if g["config"] == c["config"])
    word = "lower" if c["diff_mean"] < 0 else "higher"
    ci = f" ± {_loss(c['diff_ci95'])}" if c["diff_ci95"] is not None else ""
    lr = "?" if g["learning_rate"] is None else f"{g['learning_rate']:g}"
    return (f"{g['unit']} with α {g['alpha_mode']} at lr {lr} has a {word} test loss than "
            f"{c['baseline']} ({c['kind']}) by {_loss(abs(c['diff_mean']))}{ci} (95% CI; test loss "
            f"{g['test_mean']:.4f}), Holm-corrected p = {c['p_holm']:.3g}, paired over {c['n']} seeds"
            + (f" ({len(hits) - 1} more comparison{'s' if len(hits) > 2 else ''} significant)" if len(hits) > 1
               else "") + f"{unmatched}.")


def _no_p(groups: list[dict], tests: list[dict], rank: dict, unmatched: str) -> str:
    """Why no test comparison has a p: the seeds a config and its baseline share (not the seeds per
    config: arms run on different seeds pair nothing), or a difference that never varies."""
    top = min(tests, key=lambda c: (rank[c["config"]], c["kind"]))
    shared = max(c["n"] for c in tests)
    per_config = max(len(g["seeds"]) for g in groups)
    s = "s" if shared != 1 else ""
    if shared >= MIN_SEEDS:  # then every comparison with enough seeds had zero spread
        why = ("the per-seed test differences have zero spread (every seed gave the same difference), so a "
               "paired t-test is undefined")
    elif per_config == shared:
        why = (f"{shared} seed{s} per config, and a paired test needs at least {MIN_SEEDS} (add "
               f"`sweep.seed: [1, 2, 3]`)")
    else:
        why = (f"a gated config and its baseline share at most {shared} seed{s} ({per_config} per config at "
               f"most), and a paired test needs at least {MIN_SEEDS} common seeds (run both arms on the same seeds)")
    lo, hi = top["range"]
    return (f"No p-value: {why}; on test, {top['config']} (best gated config on validation) minus "
            f"{top['baseline']} is {top['diff_mean']:+.4f}"
            + (f" (per-seed range {lo:+.4f} to {hi:+.4f})" if top["n"] > 1 else " from one seed") + f"{unmatched}.")


def gating(rows: list[dict]) -> dict[str, Any]:
    """Configs, comparisons, verdict; `dropped`: the (row, why) its statistics leave out."""
    groups = group(rows)
    comparisons = compare(groups)
    return {"groups": groups, "comparisons": comparisons, "verdict": verdict(groups, comparisons),
            "best": groups[0], "dropped": [d for g in groups for d in g["dropped"]]}
