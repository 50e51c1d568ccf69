"""CPU contention: a sample config through `pagating train`, alone and beside two busy processes.

    .venv/bin/python bench/cpu_contention.py [--quick] [--steps 100] [--busy 2]

The same run (sample profile, tiny GPT-2, CPU, a local `sqlite:///` MLflow store in a temp project)
four times: with pagating's thread defaults (`pagating`: its share of the usable cores, idle OpenMP
threads sleep) and with torch's own (`torch_default`: one thread per core, OpenMP's spin-then-sleep
waits), each alone and then beside `--busy` processes that spin on a core each. The figure is the
median `perf/step_time_s` the run logged (evaluation, saving and start-up excluded), and
`ratio` = busy / alone for pagating's defaults (goal <= 2; torch's default measured 5.7x in a sweep).
Any OMP_NUM_THREADS / OMP_WAIT_POLICY of the caller is removed for the runs: they measure the defaults.
The machine's other load (the load average) is printed with the figures. Ends with one JSON line.
"""

from __future__ import annotations

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

GOAL = 2.0
SPIN = "while True:\n    pass\n"


def make_project(root: Path) -> None:
    """params.yaml, the sample corpus and its prepared blocks, as `pagating quickstart` makes them."""
    from pagating.config import load_config
    from pagating.data.corpora import build_sample
    from pagating.data.prepare import prepare

    shutil.copy(C.ROOT / "params.yaml", root / "params.yaml")
    with contextlib.chdir(root):
        build_sample(root / "data" / "raw")
        prepare(load_config("sample"))


def run_train(root: Path, name: str, steps: int, torch_default: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    # A store per run: the same config already FINISHED in a store would be skipped, not trained again.
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / f'mlflow-{name}.db'}"
    env["PYTHONPATH"] = str(C.ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    flags = []
    if torch_default:
        # Present but empty: libgomp keeps its default wait policy, and pagating leaves it alone.
        env["OMP_WAIT_POLICY"] = ""
        flags = ["--threads", str(os.cpu_count() or 1)]  # torch's default: one thread per core
    cmd = [sys.executable, "-m", "pagating.cli", "train", "--device", "cpu", "--compile", "off",
           "--max_steps", str(steps), "--logging_steps", "10", "--eval_steps", str(steps), "--save_steps", str(steps),
           "--output_dir", str(root / "out" / name), *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cpu_contention: {name} failed:\n{proc.stderr[-3000:]}")
    run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
    from mlflow.tracking import MlflowClient

    mlf = MlflowClient(env["MLFLOW_TRACKING_URI"])
    steps_s = [m.value for m in mlf.get_metric_history(run_id, "perf/step_time_s")]
    threads = mlf.get_run(run_id).data.params.get("train.threads")
    return {"s_per_step": C.rnd(C.median(steps_s)), "wall_s": C.rnd(wall), "threads": int(threads),
            "load": C.rnd(os.getloadavg()[0], 3)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="30 steps per run (checks that it runs)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--busy", type=int, default=2, help="spinning processes beside the busy runs")
    a = p.parse_args(argv)
    steps = 30 if a.quick else a.steps
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise SystemExit("cpu_contention: needs mlflow (it runs `pagating train`)") from None

    figures: dict = {"bench": "cpu_contention", "steps": steps, "busy": a.busy, "cpus": os.cpu_count(),
                     "load_before": C.rnd(os.getloadavg()[0], 3), "goal": GOAL, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="pagating-contention-") as tmp:
        root = Path(tmp)
        make_project(root)
        results: dict[str, dict] = {"pagating": {}, "torch_default": {}}
        for case in results:
            results[case]["alone"] = run_train(root, f"{case}-alone", steps, case == "torch_default")
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(a.busy)]
        try:
            time.sleep(1.0)
            for case in results:
                results[case]["busy"] = run_train(root, f"{case}-busy", steps, case == "torch_default")
        finally:
            for s in spinners:
                s.kill()
                s.wait()
    for case, r in results.items():
        r["ratio"] = C.rnd(r["busy"]["s_per_step"] / r["alone"]["s_per_step"], 3)
        figures["cases"][case] = r
    figures["ratio"] = figures["cases"]["pagating"]["ratio"]
    figures["torch_default_ratio"] = figures["cases"]["torch_default"]["ratio"]

    rows = [[f"{case} ({r['alone']['threads']} threads)", r["alone"]["s_per_step"] * 1e3, r["busy"]["s_per_step"] * 1e3,
             r["ratio"], r["alone"]["wall_s"], r["busy"]["wall_s"]] for case, r in figures["cases"].items()]
    print(f"{steps} steps of the sample config beside {a.busy} busy processes; {C.load_note()}")
    C.print_table(rows, ["case", "alone ms/step", "busy ms/step", "busy/alone", "alone wall s", "busy wall s"])
    verdict = "meets" if figures["ratio"] <= GOAL else "misses"
    print(f"pagating's defaults: {figures['ratio']:.2f}x slower beside busy processes ({verdict} the goal <= {GOAL}x)")
    C.emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
