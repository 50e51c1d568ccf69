"""The report's figures (matplotlib, Agg) and the CSVs beside them for `dvc plots`.

One colour per α mode (`plain` included) and one line style and marker per learning rate in every figure; the
seeds of a config are drawn as their mean with a band (lowest to highest seed), final losses as points
with 95% CI bars on an axis that says where it starts. A panel with no data is left out.
"""

from __future__ import annotations

import csv
import io
import statistics

# The PNGs summary.md links, in its order (a figure without data is not written, nor linked).
PLOT_TITLES = {"eval_loss": "validation loss vs step", "final_eval_loss": "final loss, mean ± 95% CI",
               "alpha": "α trajectories", "perf": "speed per run"}
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _g(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def _figure(size=(8, 5)):
    from matplotlib.figure import Figure  # heavy: ~1 s; only a report that draws needs it

    return Figure(figsize=size)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, as in _figure

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _look(groups: list[dict]) -> tuple[dict, dict]:
    """α mode -> colour; lr -> (line style, marker), distinct for up to 12 lrs; the same in every figure."""
    from matplotlib import colormaps  # heavy, as in _figure

    from pagating.alpha import sort_key  # pagating.alpha imports torch (~2 s); the figures need only its order

    modes = sorted({g["alpha_mode"] for g in groups}, key=sort_key)
    cmap = colormaps["tab10"] if len(modes) <= 10 else colormaps["tab20"]
    lrs = sorted({g["learning_rate"] for g in groups if g["learning_rate"] is not None})
    return ({m: cmap(i % cmap.N) for i, m in enumerate(modes)},
            {lr: (STYLES[i % len(STYLES)], MARKERS[i % len(MARKERS)]) for i, lr in enumerate(lrs)})


def _mean_band(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every seed logged; the mean, lowest and highest value there."""
    per = [dict(c) for c in curves if c]
    if not per:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(p) for p in per)))
    vals = [[p[s] for p in per] for s in steps]
    return steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _curves_figure(groups: list[dict], key: str, ylabel: str, title: str, ylim=None):
    """One line per config (mean over seeds, band lowest to highest seed); None when no run logged `key`."""
    colours, styles = _look(groups)
    drawn = [(g, _mean_band([r[key] for r in g["runs"]])) for g in groups]
    drawn = [(g, band) for g, band in drawn if band[0]]
    if not drawn:
        return None
    fig = _figure((10, 5))
    ax = fig.add_subplot()
    for g, (steps, mean, lo, hi) in drawn:
        colour, (style, marker) = colours[g["alpha_mode"]], styles.get(g["learning_rate"], ("-", "o"))
        n = len(g["runs"])
        ax.plot(steps, mean, linestyle=style, marker=marker, color=colour, ms=3,
                label=g["config"] + (f" (mean of {n} seeds)" if n > 1 else ""))
        if n > 1:
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def eval_loss_figure(groups: list[dict]):
    return _curves_figure(groups, "eval_curve", "validation loss", "Validation loss per config (colour: α mode, "
                          "line style and marker: lr; band: lowest to highest seed)")


def eval_loss_plot(groups: list[dict]) -> dict[str, bytes | str]:
    fig = eval_loss_figure(groups)
    rows = [r for g in groups for r in g["runs"]]
    return {**({"eval_loss.png": _png(fig)} if fig else {}),
            "eval_loss.csv": _csv([["config", "step", "eval_loss"]]
                                  + [[r["name"], s, _g(v)] for r in rows for s, v in r["eval_curve"]])}


def final_loss_figure(groups: list[dict]):
    """Mean final loss per config with its 95% CI, one panel per split that has data (validation, test)."""
    from pagating.alpha import sort_key  # torch, as in _look

    colours, styles = _look(groups)
    modes = sorted({g["alpha_mode"] for g in groups}, key=sort_key)
    lrs = list(styles)
    splits = [(k, t) for k, t in (("val", "validation"), ("test", "test"))
              if any(g[f"{k}_mean"] is not None for g in groups)]
    if not splits:
        return None
    fig = _figure((5.5 * len(splits), 5))
    for k, (split, title) in enumerate(splits):
        ax = fig.add_subplot(1, len(splits), k + 1)
        los, his = [], []
        for g in (g for g in groups if g[f"{split}_mean"] is not None):
            j = lrs.index(g["learning_rate"]) if g["learning_rate"] in styles else 0
            x = modes.index(g["alpha_mode"]) + (j - (len(lrs) - 1) / 2) * 0.8 / max(len(lrs), 1)
            mean, err = g[f"{split}_mean"], g[f"{split}_ci95"]
            ax.errorbar([x], [mean], yerr=None if err is None else [[err], [err]], capsize=4, ms=6, linestyle="none",
                        marker=styles.get(g["learning_rate"], ("-", "o"))[1], color=colours[g["alpha_mode"]],
                        label=g["config"])
            los.append(mean - (err or 0.0))
            his.append(mean + (err or 0.0))
        pad = 0.08 * (max(his) - min(los)) or 0.01 * abs(min(los)) or 0.01  # the data's range with a margin
        ax.set_ylim(min(los) - pad, max(his) + pad)
        ax.set_xticks(range(len(modes)), modes, rotation=15)
        ax.set(ylabel=f"final {title} loss (axis starts at {ax.get_ylim()[0]:.4g}, not 0)",
               title=f"{title.capitalize()}: mean over seeds ± 95% CI")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(handles=[ax.plot([], [], styles[lr][1], color="grey", label=f"lr={lr:g}")[0] for lr in lrs],
                  fontsize=8)
    fig.suptitle("Final loss by α mode (colour) and learning rate (marker)")
    return fig


def final_loss_plot(groups: list[dict]) -> dict[str, bytes | str]:
    from pagating.alpha import sort_key  # torch, as in _look

    fig = final_loss_figure(groups)
    rows = sorted((r for g in groups for r in g["runs"]),
                  key=lambda r: (sort_key(r["alpha_mode"]), r["learning_rate"] or 0, r["name"]))
    return {**({"final_eval_loss.png": _png(fig)} if fig else {}), "final_eval_loss.csv": _csv(
        [["alpha_mode", "learning_rate", "final_eval_loss", "test_loss", "seed"]]
        + [[r["alpha_mode"], _g(r["learning_rate"]), _g(r["val_loss"]), _g(r["test_loss"]),
            "" if r["seed"] is None else r["seed"]] for r in rows])}


def alpha_figure(groups: list[dict]):
    """α trajectories (the modes whose α moves log alpha/layer_NN), mean over layers and seeds; None when
    every config's α is static."""
    return _curves_figure(groups, "alpha_curve", "α (mean over layers)", "α trajectories", ylim=(-0.05, 1.05))


def perf_figure(rows: list[dict]):
    """s/step per run, and GPU util where any run logged it (a CPU-only sweep gets no empty GPU panel)."""
    panels = [(key, label) for key, label in (("s_per_step", "s/step"), ("gpu_util_pct", "GPU util (%)"))
              if any(r[key] is not None for r in rows)]
    if not panels:
        return None
    fig = _figure((5 * len(panels) + 2, 0.3 * len(rows) + 2))
    names = [r["name"] for r in rows]
    for k, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        vals = [r[key] for r in rows]
        bars = ax.barh(range(len(rows)), [v if v is not None else 0.0 for v in vals])
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.4g}" for v in vals], fontsize=7)
        ax.set_yticks(range(len(rows)), names if k == 0 else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel=label, title=label)
    fig.suptitle("Speed per run (steady-state windows)")
    return fig


def plot_files(groups: list[dict], rows: list[dict]) -> dict[str, bytes | str]:
    """{file name under plots/: content}; a figure without data is left out (the CSVs are always there)."""
    figs = {"alpha.png": alpha_figure(groups), "perf.png": perf_figure(rows)}
    return {**eval_loss_plot(groups), **final_loss_plot(groups),
            **{name: _png(fig) for name, fig in figs.items() if fig is not None}}
