"""GPU acceptance = the product's own path: `pagating train` / `sweep` as a user runs them, then what the user sees.

    python bench/gpu_accept.py train|nproc|sweep --kit gpu-kit --work DIR [--cpu]

Run by bench/gpu_check.sh with the python of the venv `bench/gpu_kit.py install` made. Each command runs
the CLI in a fresh project folder (params.yaml only) under DIR against a local `sqlite:///` MLflow store,
reads the store back with MlflowClient and ends with one JSON line: the figures and `checks`
(name -> true/false); it exits 1 when a check failed.

  train   the seed's shape: GPT-2 small paGLU (12 x 768, d_ff 3072), batch 16 x 128, bf16, torch.compile,
          on the kit's sample data prepared at block 128 (its BPE stops at ~25k tokens, so the vocabulary is
          smaller than GPT-2's 50257), 300 steps, a checkpoint every 150. Checks: run FINISHED,
          perf/step_time_s and perf/mfu logged, NVML metrics > 0 (utilization, memory, power),
          the newest MLflow checkpoint whole (sizes + sha256), the logged model loads back and runs.
  nproc   `pagating train --nproc <GPUs present>` on the tiny config: one FINISHED run, world size = GPUs.
  sweep   `pagating sweep --gpus all` with two tiny configs: both FINISHED under one FINISHED parent.
--cpu (the dry run of gpu_check.sh): tiny sizes, CPU, --nproc 2 over gloo, and PAGATING_PEAK_TFLOPS=1 so the
MFU path runs; NVML checks are reported but not required.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NVML = {"util": ("system/gpu_0_utilization_percentage", "gpu/util_pct"),
        "mem_mb": ("system/gpu_0_memory_usage_megabytes", "gpu/mem_used_mb"),
        "power_w": ("system/gpu_0_power_usage_watts", "gpu/power_w")}
SEED_MODEL = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.ffn_dim=3072", "model.dropout=0.1"]


class Project:
    """A fresh project folder with its own sqlite store; runs the CLI there with this interpreter."""

    def __init__(self, work: Path, name: str, cpu: bool):
        self.dir = work / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        shutil.copy(ROOT / "params.yaml", self.dir / "params.yaml")
        self.uri = f"sqlite:///{self.dir / 'mlflow.db'}"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri,
                    "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                               if os.environ.get("PYTHONPATH") else "")}
        if cpu:
            self.env["PAGATING_PEAK_TFLOPS"] = "1"  # no GPU peak: a made-up one, so perf/mfu is computed
        self.log = open(self.dir / "cli.log", "w")

    def cli(self, *args: str) -> tuple[int, dict, float]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pagating.cli", *args], cwd=self.dir, env=self.env,
                              stdout=subprocess.PIPE, stderr=self.log, text=True)
        wall = time.perf_counter() - t0
        result = {}
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
        if proc.returncode:
            self.log.flush()
            tail = (self.dir / "cli.log").read_text(errors="replace").strip().splitlines()[-8:]
            print(f"pagating {args[0]} exited {proc.returncode}:\n  " + "\n  ".join(tail), file=sys.stderr)
        return proc.returncode, result, wall

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def values(mlf, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlf.get_metric_history(run_id, key), key=lambda m: m.step)]


def finish(figures: dict, checks: dict) -> int:
    figures["checks"] = checks
    figures["failed"] = sorted(k for k, ok in checks.items() if not ok)
    for k, ok in checks.items():
        print(f"  {'ok ' if ok else 'FAIL'} {k}")
    print(json.dumps(figures, default=str), flush=True)
    return 1 if figures["failed"] else 0


def cmd_train(a) -> int:
    p = Project(Path(a.work), "train", a.cpu)
    if a.cpu:
        data, model = "tiny", []
        train = ["train.max_steps=6", "train.logging_steps=2", "train.save_steps=3", "train.eval_steps=6",
                 "train.warmup_steps=1", "train.max_eval_batches=2", "train.batch_size=8"]
        device = "cpu"
    else:
        data, model = "seed", SEED_MODEL
        train = ["train.max_steps=300", "train.logging_steps=25", "train.save_steps=150", "train.eval_steps=300",
                 "train.warmup_steps=30", "train.max_eval_batches=20", "train.batch_size=16"]
        device = "cuda"
    data_sets = [f"data.prepared_dir={Path(a.kit).resolve() / 'data' / data}"]
    if data == "seed":
        data_sets += ["data.vocab_size=50257", "data.block_size=128"]
    rc, result, wall = p.cli("train", "--device", device, "--precision", "bf16", "--compile", "on",
                             "--output_dir", str(p.dir / "out"), *sets(data_sets + model + train))
    figures: dict = {"wall_s": round(wall, 1), "rc": rc, "run_id": result.get("run_id")}
    checks: dict = {"exit 0": rc == 0}
    if not result.get("run_id"):
        return finish(figures, checks)
    mlf = p.client()
    run = mlf.get_run(result["run_id"])
    params, metrics = run.data.params, run.data.metrics
    steps = values(mlf, run.info.run_id, "perf/step_time_s")
    mfu = values(mlf, run.info.run_id, "perf/mfu")
    steady = steps[1:] or steps  # the first window holds the first steps' warm-up
    figures.update(status=run.info.status, n_params=int(params.get("model.n_params", 0)),
                   vocab_size=int(params.get("model.vocab_size", 0)), precision=params.get("train.precision"),
                   compile=params.get("train.compile"), final_eval_loss=result.get("final_eval_loss"),
                   s_per_step=statistics.median(steady) if steady else None,
                   tokens_per_s=statistics.median(values(mlf, run.info.run_id, "perf/tokens_per_s")[1:] or [0]),
                   mfu=statistics.median(mfu[1:] or mfu) if mfu else None,
                   compile_time_s=metrics.get("perf/compile_time_s"), recompiles=metrics.get("perf/recompiles"))
    figures["ms_per_step"] = None if figures["s_per_step"] is None else round(figures["s_per_step"] * 1e3, 2)
    checks.update({"run FINISHED": run.info.status == "FINISHED", "perf/step_time_s logged": bool(steps),
                   "perf/mfu logged": bool(mfu), "bf16 + compile": (figures["precision"], figures["compile"])
                   == ("bf16", "on"), "perf/compile_time_s logged": figures["compile_time_s"] is not None})
    nvml = {}
    for name, keys in NVML.items():
        key = next((k for k in keys if k in metrics), None)
        nvml[name] = max(values(mlf, run.info.run_id, key)) if key else None
    figures["nvml_max"] = nvml
    if not a.cpu:
        checks.update({f"NVML {name} > 0": bool(v and v > 0) for name, v in nvml.items()})
    sys.path.insert(0, str(ROOT))  # the checkout's package, as the CLI runs get it
    from pagating.tracking.checkpoints import download_checkpoint

    whole = download_checkpoint(mlf, run.info.run_id, p.dir / "ckpt-check")  # verified against its hashes
    checks["checkpoint in MLflow whole (sha256)"] = whole is not None
    try:
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(p.uri)
        model = mlflow.pytorch.load_model(f"models:/{result['model_id']}" if result.get("model_id")
                                          else f"runs:/{run.info.run_id}/model", map_location="cpu")
        with torch.no_grad():
            logits = model(torch.randint(0, 100, (1, 16))).logits
        checks["model loads back"] = bool(torch.isfinite(logits).all()) and logits.shape[-1] == figures["vocab_size"]
    except Exception as exc:  # reported, not raised: the other figures still count
        print(f"model load: {type(exc).__name__}: {exc}", file=sys.stderr)
        checks["model loads back"] = False
    return finish(figures, checks)


def tiny_sets(a) -> list[str]:
    return sets([f"data.prepared_dir={Path(a.kit).resolve() / 'data' / 'tiny'}", "train.max_steps=8",
                 "train.logging_steps=4", "train.save_steps=8", "train.eval_steps=8", "train.warmup_steps=1",
                 "train.max_eval_batches=2", "train.batch_size=8"])


def cmd_nproc(a) -> int:
    import torch

    n = 2 if a.cpu else max(1, torch.cuda.device_count())
    p = Project(Path(a.work), "nproc", a.cpu)
    rc, result, wall = p.cli("train", "--nproc", str(n), "--device", "cpu" if a.cpu else "cuda",
                             "--output_dir", str(p.dir / "out"), *tiny_sets(a))
    figures: dict = {"nproc": n, "wall_s": round(wall, 1), "rc": rc, "run_id": result.get("run_id")}
    checks = {"exit 0": rc == 0}
    if result.get("run_id"):
        mlf = p.client()
        runs = mlf.search_runs([mlf.get_run(result["run_id"]).info.experiment_id])
        run = runs[0]
        figures.update(runs=len(runs), world_size=run.data.params.get("train.world_size"),
                       threads=run.data.params.get("train.threads"))
        checks.update({"one run": len(runs) == 1, "run FINISHED": run.info.status == "FINISHED",
                       "world size": figures["world_size"] == str(n)})
    return finish(figures, checks)


def cmd_sweep(a) -> int:
    p = Project(Path(a.work), "sweep", a.cpu)
    grid = sets(["sweep.alpha_mode=[static_0.5, learnable]", "sweep.learning_rate=[1e-3]",
                 f"train.output_dir={p.dir / 'out'}"])
    rc, _, wall = p.cli("sweep", "--gpus", "all", "--summary", str(p.dir / "sweep.json"), *tiny_sets(a), *grid)
    figures: dict = {"wall_s": round(wall, 1), "rc": rc}
    checks = {"exit 0": rc == 0}
    summary_path = p.dir / "sweep.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        mlf = p.client()
        runs = [mlf.get_run(c["run_id"]) for c in summary["configs"] if c.get("run_id")]
        figures.update(configs=[c["status"] for c in summary["configs"]],
                       gpus=sorted({r.data.tags.get("gpu.visible_devices", "-") for r in runs}))
        checks.update({"two configs ran": [c["status"] for c in summary["configs"]] == ["ran", "ran"],
                       "children FINISHED": len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs),
                       "parent FINISHED": mlf.get_run(summary["parent_run_id"]).info.status == "FINISHED"})
    return finish(figures, checks)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=["train", "nproc", "sweep"])
    p.add_argument("--kit", default=str(ROOT / "gpu-kit"), help="the folder `make gpu-kit` wrote")
    p.add_argument("--work", default=None, help="where the projects go (default: a temp dir)")
    p.add_argument("--cpu", action="store_true", help="the dry run: tiny sizes on CPU")
    a = p.parse_args(argv)
    if a.what is None:  # `make bench` runs every bench/*.py bare: this one needs gpu_check.sh's set-up
        p.print_help()
        return 0
    if a.work is None:
        import tempfile

        a.work = tempfile.mkdtemp(prefix="pagating-accept-")
    return {"train": cmd_train, "nproc": cmd_nproc, "sweep": cmd_sweep}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
