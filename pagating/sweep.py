"""The sweep: the α × lr grid of params.yaml, one parent MLflow run, one child run per config.

Optional axes: `unit` (e.g. [paGLU, plain]: `plain` is GPT-2's own MLP, the baseline, run once per lr
and seed since it has no α) and `seed` (repeats of every config, so the report can put confidence
intervals on differences).

Each config runs as its own `pagating train` in a long-lived worker process per slot (imports paid once
per slot, not per config): a crash or OOM in one config cannot take the others down, and on a
multi-GPU box each slot's worker gets its own CUDA_VISIBLE_DEVICES. Re-running is
idempotent: a config whose run FINISHED (same config hash) is skipped, an interrupted one resumes
from its checkpoint (local, else MLflow), a failed one is retried once.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagating import names, runtime
from pagating.config import UserError, add_config_args, config_from_args, sets_from_args, view
from pagating.data.dataset import check_prepared
from pagating.data.dvc import data_md5
from pagating.grid import config_for, grid, parse_shard, sweep_identity, take_shard
from pagating.identity import RunIdentity, config_label
from pagating.names import SWEEP_JSON
from pagating.report import stats
from pagating.sweep_worker import Worker
from pagating.tracking import claim, provenance, store
from pagating.train import launcher_parent, validate


def parse_gpus(text: str) -> list[str | None]:
    """Worker slots: one per GPU id, or a single CPU slot."""
    if text in ("none", "cpu", ""):
        return [None]
    if text in ("auto", "all"):
        try:
            import torch  # heavy: ~1 s, only counting GPUs needs it

            count = torch.cuda.device_count()
        except ImportError:
            count = 0
        if runtime.cuda_required() and count < runtime.cuda_required():  # a rented GPU box: no silent CPU fallback
            ok, line = runtime.check_cuda()
            if not ok:
                raise UserError(line)
        return [str(i) for i in range(count)] or [None]
    ids = [x.strip() for x in text.split(",") if x.strip()]
    if not ids or not all(x.isdigit() for x in ids):
        raise UserError(f"--gpus wants all, none or a list like 0,1; got {text!r}")
    return ids


def _train_argv(profile: str, overrides: dict, parent: Parent, resume: str, device: str,
                extra_sets: list[str]) -> list[str]:
    cmd = ["train", "--profile", profile, "--resume", resume, "--parent-run-id", parent.run_id,
           "--sweep-id", parent.sweep_id, "--device", device, "--if-claimed", "skip"]
    for item in extra_sets:
        cmd += ["--set", item]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def _sweep_note(base: dict, configs: list[dict], command: str) -> str:
    axes = "; ".join(f"{k} ∈ {{{', '.join(str(v) for v in (vals if isinstance(vals, list) else [vals]))}}}"
                     for k, vals in base["sweep"].items())
    v = view(base)
    t, m = v.train, v.model
    units = " or ".join(sorted({c.get("model.unit", m.unit) for c in configs}))
    matched = ", param-matched" if m.param_matched else ""
    return (f"Sweep of {len(configs)} configs on the {v.profile} profile: {axes}. Each child run trains "
            f"GPT-2 ({m.n_layer} layers, d_model {m.n_embd}) with a {units} MLP{matched} for {t.max_steps} "
            f"steps, batch {t.batch_size}; finished configs are skipped on a re-run.\n\nReproduce:\n\n"
            f"    {command}\n")


def log_best(mlf, parent_id: str, exp_id: str, sweep_id: str, run_ids: list[str]) -> dict | None:
    """The sweep row's summary: the best config by mean validation loss (`final/eval_loss`) over its seeds
    (pagating.report.stats, as the report ranks), its means as metrics, and the run of its median seed."""
    from mlflow.entities import Metric, RunTag  # heavy: mlflow, only the end of a sweep needs its entities

    runs = {r.info.run_id: r for r in mlf.search_runs(
        [exp_id], filter_string=f"tags.`{names.SWEEP_ID}` = '{sweep_id}' and attributes.status = 'FINISHED'")}
    for rid in run_ids:
        if rid and rid not in runs:
            run = mlf.get_run(rid)
            if run.info.status == "FINISHED":
                runs[rid] = run
    rows = []
    for r in runs.values():
        p, m = r.data.params, r.data.metrics
        if names.FINAL_EVAL_LOSS not in m:
            continue
        lr, seed = p.get("train.learning_rate"), p.get("train.seed")
        rows.append({"config": config_label(p.get("model.unit", "?"), p.get("train.alpha_mode", "?"),
                                                  float(lr) if lr else None),
                     "unit": p.get("model.unit", "?"), "d_ff": p.get("model.d_ff"), "run_id": r.info.run_id,
                     "seed": int(seed) if seed else None, "val_loss": m[names.FINAL_EVAL_LOSS],
                     "test_loss": m.get(names.TEST_LOSS), "start_time": r.info.start_time})
    if not rows:
        return None
    best = stats.group(rows)[0]
    pick = stats.median_run(best)
    now = int(time.time() * 1000)
    metrics = {names.FINAL_EVAL_LOSS: best["val_mean"], names.FINAL_EVAL_PPL: math.exp(min(best["val_mean"], 50.0)),
               "best/seeds": len(best["seeds"])}
    if best["test_mean"] is not None:
        metrics[names.TEST_LOSS] = best["test_mean"]
    mlf.log_batch(parent_id, metrics=[Metric(k, v, now, len(rows)) for k, v in metrics.items()],
                  tags=[RunTag(names.BEST_CONFIG, best["config"]), RunTag(names.BEST_RUN_ID, pick["run_id"])])
    return {"run_id": pick["run_id"], "name": best["config"], **metrics}


def sweep(base: dict, *, shard: str = "0/1", gpus: str = "auto", device: str = "auto",
          sweep_id: str | None = None, extra_sets: list[str] | None = None,
          summary_path: str | Path = SWEEP_JSON) -> dict[str, Any]:
    """Check everything, open the parent run, plan (skip / resume / run), run what is left, summarise."""
    extra_sets = list(extra_sets or [])
    # 1. Everything checkable is checked before the parent run exists.
    configs = grid(base)
    i, n = parse_shard(shard)
    for overrides in configs:
        validate(config_for(base, overrides))
    meta = check_prepared(base)
    slots = parse_gpus(gpus)
    uri = store.tracking_uri(base)
    store.check_server(uri)
    mlf = store.client(uri)
    sweep_id = sweep_id or os.environ.get("PAGATING_SWEEP_ID") or sweep_identity(base, configs)
    exp_id, parent_id = open_parent(mlf, base, configs, meta, sweep_id, extra_sets)
    plan = plan_shard(mlf, exp_id, base, take_shard(configs, i, n), meta)
    print(f"sweep {sweep_id}: {len(configs)} configs, shard {i}/{n}: {len(plan)} here "
          f"({sum(e['status'] == 'skipped' for e in plan)} already finished); parent run {parent_id}",
          file=sys.stderr)
    runner = Runner(base, slots, Parent(mlf, exp_id, parent_id, sweep_id), device, extra_sets, plan)
    try:
        runner.run_all()
        runner.wait_elsewhere()
    finally:
        runner.close()
    return finish(mlf, base, plan, uri=uri, exp_id=exp_id, parent_id=parent_id, sweep_id=sweep_id,
                  shard=f"{i}/{n}", summary_path=summary_path)


def open_parent(mlf, base: dict, configs: list[dict], meta: dict, sweep_id: str,
                extra_sets: list[str]) -> tuple[str, str]:
    """2. The parent run: the one `mlflow run` opened, else this sweep's earlier parent, else a new one;
    tagged, with the grid as params. `mlflow run` without --experiment-name puts its run in Default:
    then it only points to this sweep. Returns (experiment id, parent run id)."""
    from mlflow.entities import Param, RunTag  # heavy: mlflow, only opening the parent needs its entities

    exp_id = store.experiment_id(mlf, base)
    parent_id = launcher_parent(mlf, exp_id)
    if parent_id is None:
        mine = f"tags.`{names.SWEEP_ID}` = '{sweep_id}' and tags.`{names.ROLE}` = '{names.ROLE_SWEEP}'"
        earlier = mlf.search_runs([exp_id], filter_string=mine, order_by=["attributes.start_time DESC"])
        parent_id = earlier[0].info.run_id if earlier else mlf.create_run(exp_id).info.run_id
    mlf.update_run(parent_id, status="RUNNING", name=f"sweep {sweep_id}")
    commit = provenance.git_commit()
    command = " ".join(["pagating", "sweep", "--profile", base["profile"], *(f"--set '{x}'" for x in extra_sets)])
    parent_tags = {names.SWEEP_ID: sweep_id, names.ROLE: names.ROLE_SWEEP, "git.commit": commit,
                   "dvc.data_md5": data_md5(), **provenance.source_tags("sweep", commit),
                   names.NOTE: _sweep_note(base, configs, f"git checkout {commit} && {command}"
                                           if commit else command)}
    mlf.log_batch(parent_id, tags=[RunTag(k, v) for k, v in parent_tags.items()])
    grid_params = {"profile": base["profile"], "sweep.n_configs": len(configs)}
    grid_params.update({f"sweep.{k}": json.dumps(v if isinstance(v, list) else [v])
                        for k, v in base["sweep"].items()})
    mlf.log_batch(parent_id, params=[Param(k, str(v)) for k, v in grid_params.items()])
    # The grid's identities: progress counts a finished config whichever sweep finished it.
    mlf.set_tag(parent_id, names.GRID_HASHES, ",".join(
        RunIdentity.of(config_for(base, o), meta).config_hash for o in configs))
    return exp_id, parent_id


def plan_shard(mlf, exp_id: str, base: dict, mine: list[dict], meta: dict) -> list[dict]:
    """3. Per config of this shard: skip (FINISHED), resume (interrupted), or run."""
    plan = []
    for overrides in mine:
        identity = RunIdentity.of(config_for(base, overrides), meta)
        h = identity.config_hash
        runs = store.runs_with_hash(mlf, exp_id, h)
        done = [r for r in runs if r.info.status == "FINISHED"]
        entry = {"name": identity.run_name, "config_hash": h, "overrides": overrides,
                 "run_id": done[0].info.run_id if done else (runs[0].info.run_id if runs else None),
                 "status": "skipped" if done else ("resume" if runs else "run"),
                 "log": str(identity.run_dir) + ".log"}
        if done:
            entry["final_eval_loss"] = done[0].data.metrics.get(names.FINAL_EVAL_LOSS)
        plan.append(entry)
    return plan


@dataclass(frozen=True)
class Parent:
    """Where the children go: the experiment, the sweep's parent run and its id (read by the Runner)."""

    mlf: Any
    exp_id: str
    run_id: str
    sweep_id: str


class Runner:
    """4. Runs what is left of the plan, one config per worker slot (GPU) at a time, each a `pagating
    train` in the slot's long-lived worker process (pagating.sweep_worker: imports once, crash-isolated),
    retrying a failure once; updates the plan's entries in place from what MLflow says of each config."""

    def __init__(self, base: dict, slots: list[str | None], parent: Parent, device: str,
                 extra_sets: list[str], plan: list[dict]):
        self.base, self.slots, self.parent = base, slots, parent
        self.device, self.extra_sets, self.plan = device, extra_sets, plan
        self.free: queue.Queue = queue.Queue()
        for slot in slots:
            self.free.put(slot)
        self.lock = threading.Lock()
        self.todo = [e for e in plan if e["status"] != "skipped"]
        # Concurrent children split the cores (else each takes them all and they thrash): each gets its
        # share (PAGATING_THREAD_SHARE); the user's OMP_NUM_THREADS, inherited by every child, wins.
        self.share = None if runtime.explicit_threads() else runtime.thread_share(min(len(slots), len(self.todo)))
        self.counter = itertools.count(1)
        self.workers: dict[str | None, Worker] = {}  # slot -> its worker; a slot is used by one thread at a time

    def run_all(self) -> None:
        # Two threads per slot: while one waits for its config's run to end in the background (final uploads,
        # pagating.sweep_worker.Ends), the other trains the next config on the same worker.
        with ThreadPoolExecutor(max_workers=2 * len(self.slots)) as pool:
            list(pool.map(self.run_one, self.todo))

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()

    def run_one(self, entry: dict) -> None:
        entry["seconds"] = 0.0  # on a slot and until its end was drained: not the wait for a free slot
        for attempt in (1, 2):
            if self._attempt(entry, attempt):
                break
        entry["seconds"] = round(entry["seconds"], 1)
        if entry["status"] != "elsewhere":
            self._report(entry)

    def _env(self, slot: str | None) -> dict[str, str]:
        # A child's parent is its --parent-run-id; without MLFLOW_RUN_ID it cannot take `mlflow run`'s run
        # (MLflow's fluent API would write into it).
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        if self.share:
            env[runtime.SHARE_ENV] = str(self.share)
        return env

    def _attempt(self, entry: dict, attempt: int) -> bool:
        """One `pagating train` of the entry on a free slot's worker; True when there is no point in a
        second attempt. The slot is free again as soon as the training is over: the run's end (final
        uploads) may still drain in the worker's background while the slot's next config starts."""
        resume = "if-any" if entry["status"] == "resume" or attempt == 2 else "none"
        Path(entry["log"]).parent.mkdir(parents=True, exist_ok=True)
        slot = self.free.get()
        started = time.time()
        try:
            argv = _train_argv(self.base["profile"], entry["overrides"], self.parent, resume,
                               self.device if slot is None else "auto", self.extra_sets)
            if slot not in self.workers:
                self.workers[slot] = Worker(self._env(slot))
            worker = self.workers[slot]
            started_ms = int(time.time() * 1000)
            answer = worker.run(argv, entry["log"])
            if answer is None:  # the worker process died (OOM kill, segfault): this config failed, not the sweep
                del self.workers[slot]
                with open(entry["log"], "a") as log:
                    print(f"pagating sweep: the worker training this config died (exit {worker.proc.returncode})",
                          file=log)
                answer = {"rc": 1, "clean": False}
            elif not answer["clean"]:  # whatever the error left half-set goes with this worker
                self.workers.pop(slot).close(wait_s=None)
        finally:
            self.free.put(slot)
        if answer.get("finishing"):  # trained; MLflow has its outcome once the end is drained (or the worker died)
            worker.ended(answer["finishing"])
        entry["seconds"] += time.time() - started
        return self._settle(entry, answer["rc"], started_ms)

    def _settle(self, entry: dict, rc: int, started_ms: int) -> bool:
        """The attempt's outcome as MLflow records it (the worker only says how `pagating train` exited):
        the config's FINISHED run (finished before the attempt: skipped; existing before it: resumed; else
        ran), or its claim held by a live process elsewhere, or a failure. True: no second attempt."""
        p = self.parent
        runs = store.runs_with_hash(p.mlf, p.exp_id, entry["config_hash"])
        done = [r for r in runs if r.info.status == "FINISHED"]
        run_id = runs[0].info.run_id if runs else entry["run_id"]
        if rc == 0 and done:
            run = done[0]
            status = ("skipped" if (run.info.end_time or 0) < started_ms
                      else "resumed" if run.info.start_time < started_ms else "ran")
            entry.update(status=status, run_id=run.info.run_id,
                         final_eval_loss=run.data.metrics.get(names.FINAL_EVAL_LOSS),
                         first_eval_loss=None if status == "skipped" else _first_eval_loss(p.mlf, run.info.run_id))
            return True
        if rc == 0 and self._claimed_elsewhere(entry["config_hash"]):
            entry.update(status="elsewhere", run_id=run_id)  # another sweep over this grid trains it: come back
            return True
        entry.update(status="failed", run_id=run_id, error=_tail(entry["log"]))
        return rc == 2  # a user error will not go away on retry

    def _claimed_elsewhere(self, h: str) -> bool:
        held = claim.Claim.for_config(self.parent.mlf, self.parent.exp_id, h, self.base["tracking"])
        return held.is_live(held.current())

    def _report(self, entry: dict) -> None:
        with self.lock:
            k = next(self.counter)
            detail = (f"eval loss {entry['first_eval_loss']:.3f} -> {entry['final_eval_loss']:.3f}"
                      if entry.get("final_eval_loss") is not None and entry.get("first_eval_loss") is not None
                      else "" if entry["status"] != "failed" else f"see {entry['log']}: {entry['error']}")
            print(f"[{k}/{len(self.todo)}] {entry['name']}: {entry['status']} in {entry['seconds']:.0f}s, {detail}",
                  file=sys.stderr)

    def wait_elsewhere(self) -> None:
        """Configs another process held: wait until they finish there, or take them over when its
        heartbeat stops."""
        p = self.parent
        poll_s = min(view(self.base).tracking.heartbeat_s, 10.0)
        for entry in [e for e in self.plan if e["status"] == "elsewhere"]:
            held = claim.Claim.for_config(p.mlf, p.exp_id, entry["config_hash"], self.base["tracking"])
            print(f"sweep {p.sweep_id}: {entry['name']} is being trained elsewhere; waiting for it",
                  file=sys.stderr)
            while entry["status"] == "elsewhere":
                done = [r for r in store.runs_with_hash(p.mlf, p.exp_id, entry["config_hash"])
                        if r.info.status == "FINISHED"]
                if done:
                    entry.update(status="skipped", run_id=done[0].info.run_id,
                                 final_eval_loss=done[0].data.metrics.get(names.FINAL_EVAL_LOSS))
                elif not held.is_live(held.current()):
                    entry["status"] = "resume"
                    self.run_one(entry)
                else:
                    time.sleep(poll_s)


def _first_eval_loss(mlf, run_id: str) -> float | None:
    history = sorted(mlf.get_metric_history(run_id, names.EVAL_LOSS), key=lambda m: m.step)
    return history[0].value if history else None


def finish(mlf, base: dict, plan: list[dict], *, uri: str, exp_id: str, parent_id: str, sweep_id: str,
           shard: str, summary_path: str | Path) -> dict[str, Any]:
    """5. The parent's best config and status, the summary file, the table and the links."""
    failed = [e for e in plan if e["status"] == "failed"]
    # Hours of training end here: a dropped connection must not fail the sweep (both calls are idempotent).
    best = store.retry(lambda: log_best(mlf, parent_id, exp_id, sweep_id, [e.get("run_id") for e in plan]),
                          "record the best config", attempts=5)
    if failed or shard.endswith("/1") or store.retry(lambda: _grid_finished(mlf, exp_id, parent_id),
                                                        "read the grid", attempts=5):
        store.retry(lambda: mlf.set_terminated(parent_id, "FAILED" if failed else "FINISHED"),
                       "end the sweep run", attempts=5)
    # else: other shards still run; the last to end (or `vast watch`) sets FINISHED
    summary = {"sweep_id": sweep_id, "parent_run_id": parent_id, "experiment_id": exp_id,
               "profile": base["profile"], "shard": shard,
               "configs": [{k: e.get(k) for k in ("name", "config_hash", "run_id", "status")} for e in plan]}
    if summary_path:
        Path(summary_path).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_path).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print_table(plan)
    if best:
        print(f"best: {best['name']} (mean validation loss {best[names.FINAL_EVAL_LOSS]:.4f} over "
              f"{best['best/seeds']} seed{'s' if best['best/seeds'] != 1 else ''})")
    print(f"runs: {store.experiment_url(uri, exp_id)}\nsweep run: {store.run_url(uri, exp_id, parent_id)}")
    return summary


def _grid_finished(mlf, exp_id: str, parent_id: str) -> bool:
    """Whether every config hash of the parent's grid has a FINISHED run (shards finish in any order)."""
    hashes = set(filter(None, mlf.get_run(parent_id).data.tags.get(names.GRID_HASHES, "").split(",")))
    runs = mlf.search_runs([exp_id], filter_string="attributes.status = 'FINISHED'", max_results=5000)
    return hashes <= {r.data.tags.get(names.CONFIG_HASH) for r in runs}


def _tail(path: str) -> str:
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def print_table(plan: list[dict]) -> None:
    width = max([len(e["name"]) for e in plan] + [6])
    print(f"{'config':<{width}}  {'status':<8}  {'final eval loss':>15}  run")
    for e in plan:
        loss = e.get("final_eval_loss")
        print(f"{e['name']:<{width}}  {e['status']:<8}  {(f'{loss:.4f}' if loss else '-'):>15}  {e['run_id'] or '-'}")
    counts = {s: sum(e["status"] == s for e in plan) for s in ("ran", "skipped", "resumed", "failed")}
    print(", ".join(f"{v} {k}" for k, v in counts.items()))


def cli_sweep(args) -> int:
    base = config_from_args(args)
    summary = sweep(base, shard=args.shard, gpus=args.gpus, device=args.device, sweep_id=args.sweep_id or None,
                    extra_sets=sets_from_args(args), summary_path=args.summary)
    return 1 if any(c["status"] == "failed" for c in summary["configs"]) else 0


def register_cli(sub) -> None:
    p = sub.add_parser("sweep", help="the α × lr grid: one parent run, one child run per config")
    add_config_args(p, "sweep")  # --profile, --set (e.g. --set sweep.alpha_mode=[learnable]) and train flags
    p.add_argument("--shard", default="0/1", help="i/n: run the i-th of n disjoint slices of the grid")
    p.add_argument("--gpus", default="auto", help="auto | all | none | 0,1,..: one config per GPU at once")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--sweep-id", help="join this sweep (default: derived from the grid and settings)")
    p.add_argument("--summary", default=SWEEP_JSON, help="where to write the sweep's run list")
    p.set_defaults(func=cli_sweep)
