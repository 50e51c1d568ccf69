"""Where one sample config's wall time goes: one `pagating train` process, as the sweep runs each config,
split from its MLflow run's timestamps and the Trainer's own eval runtimes.

    .venv/bin/python bench/sweep_config.py [--quick] [--set key=value ...]

In a temp project (params.yaml, the sample corpus prepared; not timed) against a sqlite:/// store:
  startup_s   process start -> MLflow run created (interpreter, imports, config, checks, claim)
  setup_s     run created -> first training step (model, data, Trainer)
  train_s     first step -> last step's eval, less the evals (steps, logging, checkpoints)
  evals_s     the validation evals during training (the Trainer's eval_runtime; the last is the whole split)
  final_s     last eval -> run ended (test eval, model save, MLflow model and artifact uploads)
  exit_s      run ended -> process gone (idle waits: thread joins, interpreter exit)
Targets (issue 24): wall <= 30 s, train_s >= 50% of wall. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (puts the repo root on sys.path too)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], help="a setting for the config, as `pagating train`")
    ap.add_argument("--quick", action="store_true", help="20 steps, evals every 10 (a smoke run, not the target)")
    a = ap.parse_args(argv)
    if a.quick:
        a.set = ["train.max_steps=20", "train.eval_steps=10", "train.save_steps=10", "train.logging_steps=5", *a.set]
    from mlflow.tracking import MlflowClient

    from pagating.config import load_config
    from pagating.data import build_sample, prepare

    root = Path(tempfile.mkdtemp(prefix="bench-config-"))
    try:
        shutil.copy(C.ROOT / "params.yaml", root / "params.yaml")
        with contextlib.chdir(root):
            build_sample(root / "data" / "raw")
            prepare(load_config("sample"))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        cmd = [sys.executable, "-m", "pagating.cli", "train", "--output_dir", str(root / "out")]
        for s in a.set:
            cmd += ["--set", s]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        t_exit = time.time()
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        figures = split(MlflowClient(uri), result, root, t0, t_exit)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures["load_avg"] = os.getloadavg()[0]
    figures["target_ok"] = figures["wall_s"] <= 30 and figures["train_share"] >= 0.5
    print(json.dumps(figures))
    return 0


def split(mlf, result: dict, root: Path, t0: float, t_exit: float) -> dict:
    run = mlf.get_run(result["run_id"])
    p = run.data.params
    start, end = run.info.start_time / 1000, run.info.end_time / 1000
    steps = mlf.get_metric_history(run.info.run_id, "perf/step_time_s")
    first = min(steps, key=lambda m: m.step)
    train_begin = first.timestamp / 1000 - first.step * first.value  # back from the first logged window
    last_eval = max(mlf.get_metric_history(run.info.run_id, "eval/loss"), key=lambda m: m.step).timestamp / 1000
    run_dir = Path(result["run_dir"]) if os.path.isabs(result["run_dir"]) else root / result["run_dir"]
    states = sorted(run_dir.glob("**/checkpoint-*/trainer_state.json"), key=lambda f: int(f.parent.name.split("-")[1]))
    history = json.loads(states[-1].read_text())["log_history"] if states else []
    evals = [e["eval_runtime"] for e in history if "eval_runtime" in e]
    wall = t_exit - t0
    train = last_eval - train_begin - sum(evals)
    return {"bench": "sweep_config", "wall_s": round(wall, 2), "startup_s": round(start - t0, 2),
            "setup_s": round(train_begin - start, 2), "train_s": round(train, 2), "evals_s": round(sum(evals), 2),
            "n_evals": len(evals), "final_eval_s": round(evals[-1], 2) if evals else None,
            "final_s": round(end - last_eval, 2), "exit_s": round(t_exit - end, 2),
            "train_share": round(train / wall, 3), "max_steps": int(p["train.max_steps"]),
            "eval_subset_blocks": int(p.get("eval.subset_blocks", p["eval.blocks"])),
            "eval_blocks": int(p["eval.blocks"])}


if __name__ == "__main__":
    sys.exit(main())
