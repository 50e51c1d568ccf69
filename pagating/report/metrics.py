"""reports/metrics.json (schema: docs/report.md), for `dvc metrics`: sorted keys and 6 significant digits,
so two reports over the same runs are byte-identical."""

from __future__ import annotations

from typing import Any

RUN_KEYS = ("best_eval_loss", "final_eval_loss", "first_eval_loss", "best_eval_ppl", "final_eval_ppl",
            "s_per_step", "tokens_per_s", "gpu_util_pct", "cost_usd", "mfu")


def _num(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")  # fixed precision: identical bytes on every re-run


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


