"""The sweep's parent run in MLflow, for any provider: made before any instance exists; the instances'
reports on it (tag pagating.instance.<id>), their logs, each shard's latest instance and relaunch count
(what `watch` re-runs, even after its own restart), the sweep's progress, and its status set to the truth.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

from pagating import cost, names
from pagating.cloud.env import is_secret, parse_label
from pagating.config import UserError, experiment_name
from pagating.grid import config_for, grid
from pagating.identity import run_name
from pagating.tracking import store
from pagating.tracking.store import mask_uri

REPORT_TAG = names.INSTANCE_TAG          # + instance id; value "<state>: <detail>"
SHARD_TAG = names.SHARD_TAG              # + index: the shard's latest instance (JSON, secrets left out)
RELAUNCHES_TAG = names.RELAUNCHES_TAG    # + index: how often watch re-ran the shard (cloud.max_relaunches)
REASON_TAG = names.STATUS_REASON         # why a sweep's parent run is FAILED (or still RUNNING)


def log_artifact_name(iid: str | int) -> str:
    """The instance's onstart log on the parent run, under names.LOG_ARTIFACT_DIR."""
    return f"instance-{iid}.log"


# An instance report after which nothing runs. "destroy..." covers "destroyed by launch: ..." and "destroy
# failed (...)": while the provider still lists an instance reported so, `status` shows it red.
DONE_STATES = ("finished", "failed", "killed", "destroy")


# ---- the sweep's parent run and the instances' reports (MLflow) ---------------------------------


def open_sweep_run(uri: str, cfg: dict, sweep_id: str) -> str:
    """The sweep's parent run, made before any instance exists: instances report to it, upload
    their logs to it, and run the sweep under it (`mlflow run --run-id`). A tracking server this
    machine cannot reach or that refuses the credentials stops the launch here (exit 2)."""
    store.check_server(uri)
    mlf = store.client(uri)
    try:
        exp_id = store.experiment_id(mlf, cfg)
        run = mlf.create_run(exp_id, run_name=f"sweep {sweep_id}",
                             tags={names.SWEEP_ID: sweep_id, names.ROLE: names.ROLE_SWEEP})
    except Exception as exc:
        raise UserError(f"cannot create the sweep's run in {experiment_name(cfg)} on "
                        f"{mask_uri(uri)} ({type(exc).__name__}): check MLFLOW_TRACKING_* credentials "
                        f"and permissions (the GPU user only logs into experiments an admin made: "
                        f"`pagating grant --experiment {experiment_name(cfg)}`)") from None
    return run.info.run_id


def mark_created(uri: str, run_id: str, instance_id: int) -> None:
    store.client(uri).set_tag(run_id, f"{REPORT_TAG}{instance_id}", "created: waiting for the instance")


def note_instance(uri: str | None, run_id: str | None, instance_id: int, text: str) -> None:
    """Write an instance's report on the parent run for it (a destroy and why); best effort: the
    destroy is what matters, the note is for the record."""
    if not (uri and run_id):
        return
    try:
        with cost.quick_mlflow():
            store.client(uri).set_tag(run_id, f"{REPORT_TAG}{instance_id}", text[:4000])
    except Exception as exc:
        print(f"could not note instance {instance_id} on the parent run ({type(exc).__name__})")


def reports_in(tags: dict[str, str], include_created: bool = False) -> dict[int, str]:
    """The last report of each instance in a parent run's tags, by instance id (with `include_created`,
    also those only launch wrote about)."""
    return {int(k[len(REPORT_TAG):]): v for k, v in tags.items()
            if k.startswith(REPORT_TAG) and k[len(REPORT_TAG):].isdigit()
            and (include_created or not v.startswith("created"))}


def instance_reports(uri: str, run_id: str, include_created: bool = False) -> dict[int, str]:
    """reports_in of the parent run (one read for all of them: launch polls every round)."""
    return reports_in(store.client(uri).get_run(run_id).data.tags, include_created)


def find_instance_run(uri: str, instance_id: int, prefix: str = "pagating"):
    """The sweep parent run an instance belongs to (the one carrying its report tag), or None."""
    mlf = store.client(uri)
    exps = cost.pagating_experiments(mlf, prefix)
    if not exps:
        return None
    runs = mlf.search_runs(exps, filter_string=f"tags.`{REPORT_TAG}{instance_id}` LIKE '%'", max_results=1)
    return runs[0] if runs else None


def instance_log(uri: str, instance_id: int) -> str:
    """The instance's uploaded log, or one line saying why there is none."""
    run = find_instance_run(uri, instance_id)
    if run is None:
        return (f"no sweep run on {mask_uri(uri)} knows instance {instance_id} (launched against another "
                "tracking server? pass --tracking-uri)")
    path = f"{names.LOG_ARTIFACT_DIR}/{log_artifact_name(instance_id)}"
    state = run.data.tags.get(f"{REPORT_TAG}{instance_id}", "")
    # The client of `uri`, not mlflow.artifacts: that reads the process-wide tracking URI.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = store.client(uri).download_artifacts(run.info.run_id, path, tmp)
            return Path(local).read_text(encoding="utf-8", errors="replace")
        except Exception as e:  # absent (the usual case) or unreadable: say which below
            missing = re.sub(r"://[^/@\s]*@", "://***@", f"{type(e).__name__}: {e}")  # no credentials
    if state.startswith("created"):
        return (f"no log for instance {instance_id}: it never reported to {mask_uri(uri)} (last state: {state}); "
                "it could not run its onstart or could not reach the tracking server with its credentials")
    return (f"no log artifact {path} on run {run.info.run_id} for instance {instance_id}: it stopped before it "
            f"could upload one; its last report: {state} ({missing.splitlines()[0][:200]})")


# ---- progress ----------------------------------------------------------------------------------


def sweep_progress(uri: str, sweep_id: str, cfg: dict) -> dict:
    """Configs done (FINISHED runs of the grid's configs, by config hash, whatever sweep ran them),
    running children with their latest train/loss step, the sweep's mean s/step."""
    prefix = cfg["tracking"]["experiment_prefix"]
    with cost.quick_mlflow():
        client = store.client(uri)
        exp_ids = cost.pagating_experiments(client, prefix)
        runs = client.search_runs(exp_ids, filter_string=f"tags.\"{names.SWEEP_ID}\" = '{sweep_id}'",
                                  max_results=1000) if exp_ids else []
        children = [r for r in runs if names.PARENT_RUN_ID in r.data.tags]
        parents = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_SWEEP]
        hashes = set()
        for r in runs:  # the sweep tags its parent with the grid's config hashes
            hashes |= set(filter(None, (r.data.tags.get(names.GRID_HASHES) or "").split(",")))
        done = {r.data.tags.get(names.CONFIG_HASH) or r.info.run_id
                for r in children if r.info.status == "FINISHED"}
        if hashes:
            finished = client.search_runs(exp_ids, filter_string="attributes.status = 'FINISHED'",
                                          max_results=5000) if exp_ids else []
            done = {r.data.tags.get(names.CONFIG_HASH) for r in finished} & hashes
        running = []
        for r in children:
            if r.info.status == "RUNNING":
                history = client.get_metric_history(r.info.run_id, names.TRAIN_LOSS)
                running.append((r.info.run_name or r.info.run_id, max((m.step for m in history), default=0)))
    step_times = [r.data.metrics[names.STEP_TIME] for r in children
                  if names.STEP_TIME in r.data.metrics]
    max_steps = int(next((r.data.params["train.max_steps"] for r in children
                          if "train.max_steps" in r.data.params), cfg["train"]["max_steps"]))
    return {"total": len(hashes) or cost.grid_size(cfg), "done": len(done), "running": running,
            "max_steps": max_steps, "s_per_step": sum(step_times) / len(step_times) if step_times else None,
            "links": [store.run_url(uri, p.info.experiment_id, p.info.run_id)  # the UI's sweep rows
                      for p in parents]}


def progress_line(sweep_id: str, prog: dict, fallback_s_per_step: float, parallel: int) -> str:
    total, done, running, max_steps = prog["total"], prog["done"], prog["running"], prog["max_steps"]
    waiting = max(0, total - done - len(running))
    remaining = waiting * max_steps + sum(max(0, max_steps - step) for _, step in running)
    s_step = prog["s_per_step"] or fallback_s_per_step
    eta_h = remaining * s_step / max(1, parallel, len(running)) / 3600
    now = "; ".join(f"{name} step {step}/{max_steps}" for name, step in running) or "none running"
    return (f"sweep {sweep_id}: {done}/{total} configs done; {now}; "
            f"ETA ~{eta_h:.1f} h at {s_step:.4f} s/step" + ("" if prog["s_per_step"] else " (estimate)"))


# ---- the parent run's truth ----------------------------------------------------------------------


def grid_state(uri: str, sweep_id: str, cfg: dict) -> dict[str, str]:
    """Each config of the grid by run name -> FINISHED | RUNNING | FAILED | KILLED | not started: FINISHED
    when a run of it finished (this sweep's, or any run of the grid's config hashes), else its sweep run's
    latest status."""
    run_names = [run_name(config_for(cfg, o)) for o in grid(cfg)]
    prefix = cfg["tracking"]["experiment_prefix"]
    with cost.quick_mlflow():
        mlf = store.client(uri)
        exps = cost.pagating_experiments(mlf, prefix)
        runs = mlf.search_runs(exps, filter_string=f"tags.`{names.SWEEP_ID}` = '{sweep_id}'",
                               max_results=1000, order_by=["attributes.start_time ASC"]) if exps else []
        hashes = set()
        for r in runs:
            hashes |= set(filter(None, (r.data.tags.get(names.GRID_HASHES) or "").split(",")))
        finished = mlf.search_runs(exps, filter_string="attributes.status = 'FINISHED'",
                                   max_results=5000) if exps and hashes else []
    state = dict.fromkeys(run_names, "not started")
    for r in runs:  # oldest first: the latest run of a config decides, unless one FINISHED
        name = r.info.run_name
        if name in state and names.PARENT_RUN_ID in r.data.tags and state[name] != "FINISHED":
            state[name] = r.info.status
    for r in finished:
        if r.data.tags.get(names.CONFIG_HASH) in hashes and r.info.run_name in state:
            state[r.info.run_name] = "FINISHED"
    return state


def missing_configs(state: dict[str, str]) -> list[str]:
    return [f"{name} ({status})" for name, status in state.items() if status != "FINISHED"]


def settle_parent(uri: str, run_id: str, state: dict[str, str], working: bool, why: str | None = None) -> str:
    """Set the sweep's parent run to what is true: FINISHED when every config of the grid is, RUNNING
    while an instance still works on it, else FAILED with the reason (tag pagating.status_reason).
    Returns the status set."""
    mlf = store.client(uri)
    missing = missing_configs(state)
    if not missing:
        status, reason = "FINISHED", f"every config of the grid FINISHED ({len(state)})"
    elif working:
        status, reason = "RUNNING", f"{len(missing)} of {len(state)} configs to go"
    else:
        status = "FAILED"
        reason = f"configs missing: {', '.join(missing)}" + (f"; {why}" if why else "")
    run = mlf.get_run(run_id)
    mlf.set_tag(run_id, REASON_TAG, reason[:4000])
    if run.info.status != status:
        if status == "RUNNING":
            mlf.update_run(run_id, status="RUNNING")
        else:
            mlf.set_terminated(run_id, status)
    return status


def fail_parent(uri: str, run_id: str | None, reason: str) -> None:
    """The sweep's parent FAILED with `reason` (nothing runs for it); best effort: the caller is failing already."""
    if not run_id:
        return
    try:
        mlf = store.client(uri)
        mlf.set_tag(run_id, REASON_TAG, reason[:4000])
        mlf.set_terminated(run_id, "FAILED")
    except Exception as exc:
        print(f"could not mark the sweep's parent run {run_id} FAILED ({type(exc).__name__})")


def instances_working(reports: dict[int, str], exclude: set[int] = frozenset()) -> bool:
    """Whether an instance's last report on the parent says it may still be working."""
    return any(not v.startswith(DONE_STATES) for k, v in reports.items() if k not in exclude)


# ---- the sweep's shards on the parent run: what `watch` re-runs, even after its own restart ----------


def shard_record(label: str, iid: int, env: dict[str, str], *, image: str, disk: float, bid: bool,
                 gpu_name: str | None, num_gpus: int, rate: float) -> dict:
    """What it takes to rent a shard again, less its secrets (named in secret_env: watch takes their
    values from a live instance of the sweep or its own environment)."""
    secret = sorted(k for k, v in env.items() if is_secret(k, v))
    return {"label": label, "instance": int(iid), "created": time.time(), "rate": rate, "image": image,
            "disk": disk, "bid": bid, "gpu_name": gpu_name, "num_gpus": num_gpus, "secret_env": secret,
            "env": {k: str(v) for k, v in env.items() if k not in secret}}


def record_shards(uri: str, run_id: str, records: list[dict]) -> None:
    """Tag the parent run with each shard's record (one request, retried: watch depends on it)."""
    from mlflow.entities import RunTag

    tags = [RunTag(f"{SHARD_TAG}{parse_label(r['label'])[1]}", json.dumps(r)) for r in records]
    store.retry(lambda: store.client(uri).log_batch(run_id, tags=tags), "shard records", attempts=4)


def shard_records(tags: dict[str, str]) -> dict[int, dict]:
    out = {}
    for k, v in tags.items():
        if k.startswith(SHARD_TAG) and k[len(SHARD_TAG):].isdigit():
            try:
                out[int(k[len(SHARD_TAG):])] = json.loads(v)
            except ValueError:
                continue
    return out


def relaunch_counts(tags: dict[str, str]) -> dict[int, int]:
    return {int(k[len(RELAUNCHES_TAG):]): int(v) for k, v in tags.items()
            if k.startswith(RELAUNCHES_TAG) and k[len(RELAUNCHES_TAG):].isdigit() and v.isdigit()}


def find_sweep_run(uri: str, sweep_id: str, prefix: str = "pagating") -> str | None:
    """The parent run of sweep `sweep_id` (the newest), or None."""
    mlf = store.client(uri)
    exps = cost.pagating_experiments(mlf, prefix)
    runs = mlf.search_runs(exps, filter_string=f"tags.`{names.SWEEP_ID}` = '{sweep_id}' and "
                           f"tags.`{names.ROLE}` = '{names.ROLE_SWEEP}'", max_results=1,
                           order_by=["attributes.start_time DESC"]) if exps else []
    return runs[0].info.run_id if runs else None
