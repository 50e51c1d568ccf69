"""`pagating sky`: the sweep's shards as SkyPilot managed jobs, on whatever SkyPilot reaches (Vast,
RunPod, Lambda, Kubernetes, AWS, GCP ...).

    launch    one managed job `pagating-<sweep id>-<i>` per shard, each from a task YAML under sky/;
              refused (exit 2) when SkyPilot's optimizer prices the plan over --budget
    status    the sweep's managed jobs (`sky jobs queue`) and the grid's progress from MLflow
    logs      a job's log (`sky jobs logs`); the whole log is also on the sweep's parent run
    cancel    cancel jobs by name, by sweep, or every pagating job (`sky jobs cancel`)

SkyPilot cannot live in this project's environment (skypilot 0.14 pins click<8.2, huggingface-hub 2.x
needs click>=8.4.2), so nothing here imports it: every SkyPilot action is its own CLI, from its own
environment, through `sky()` (the `sky` on PATH, or the cloud.sky_bin setting). A job runs what a Vast
instance runs (scripts/onstart.sh, with PAGATING_PROVIDER=sky): SkyPilot supplies and relaunches the
machine, MLflow's checkpoints and claims make a relaunched shard resume. Secrets go through SkyPilot's
`secrets:`: names only in the YAML, `--secret NAME` on the command line, the value in the environment
of the `sky` process; no file, command line or `sky jobs queue` shows one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pagating import cost, names
from pagating.cloud import env as cloud_env
from pagating.cloud import offers, show, sweep_run
from pagating.cloud.cli import guard, source_flags
from pagating.cloud.provider import ProviderError
from pagating.config import UserError, add_config_args, project_root
from pagating.grid import grid
from pagating.tracking import store

TASK_DIR = "sky"  # the task YAMLs, one per shard (.gitignore keeps them out of git)
INSTALL = ("SkyPilot's `sky` command not found: install it in its own environment (`uv tool install "
           "'skypilot[vast]==0.14.1'` or pipx; it cannot share this project's venv), or pass --sky-bin PATH "
           "(params cloud.sky_bin)")
# Vast's GPU spellings (cloud.gpu_name) that SkyPilot spells otherwise; any other name loses its spaces
# (RTX 4090 -> RTX4090). `sky show-gpus` lists SkyPilot's names.
SKY_GPU = {"RTX A6000": "A6000", "RTX A5000": "A5000", "RTX A4000": "A4000", "RTX 6000Ada": "RTX6000-Ada",
           "A100 PCIE": "A100", "A100 SXM4": "A100", "A100X": "A100", "H100 PCIE": "H100", "H100 SXM": "H100",
           "H100 NVL": "H100", "Tesla V100": "V100", "Tesla T4": "T4"}
NOT_SENT = ("VAST_SERVER_URL",)  # cloud_env.instance_env forwards it to Vast instances; a SkyPilot job has no use
INFRA = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.*/-]*$")  # vast, aws/us-east-1, k8s/my-context ...
ANSI = re.compile(r"\x1b\[[0-9;]*m")
CHOSEN = "\u2714"  # the optimizer's mark on the row it picked
# cloud settings `sky launch` takes as flags (config.py declares them for `vast`'s verbs)

SETUP = """\
# pagating: check out the pinned commit (what scripts/bootstrap.sh does on Vast)
W="${PAGATING_WORKDIR:-$HOME/pagating}"
command -v git >/dev/null || { apt-get update -qq && apt-get install -y -qq git; } >/dev/null 2>&1 \\
  || { echo "pagating-sky: no git, and apt-get could not install it"; exit 1; }
mkdir -p "$W" && cd "$W" && { [ -d .git ] || git init -q; } || exit 1
git remote remove origin 2>/dev/null; git remote add origin "$PAGATING_REPO" || exit 1
# the URL may hold a token: git's own messages stay out of the log
{ git fetch -q --depth 1 origin "$PAGATING_COMMIT" || git fetch -q origin; } >/dev/null 2>&1
git checkout -q --force "$PAGATING_COMMIT" >/dev/null 2>&1 && [ "$(git rev-parse HEAD)" = "$PAGATING_COMMIT" ] \\
  || { echo "pagating-sky: cannot check out commit $PAGATING_COMMIT (pushed? repo URL and access right?)"; exit 1; }
"""
RUN = """\
# pagating: what a Vast instance runs (install, CUDA check, dvc pull, the shard, its log to the parent run)
cd "${PAGATING_WORKDIR:-$HOME/pagating}" && exec bash scripts/onstart.sh
"""


class SkyError(ProviderError):
    """SkyPilot failed us (not the user's doing): one line, exit 1 (cloud.cli.guard)."""


# ---- the one door to SkyPilot -----------------------------------------------------------------

def sky_binary(cfg: dict) -> str:
    """SkyPilot's `sky`: cloud.sky_bin, else the one on PATH; none is a user error (exit 2)."""
    found = shutil.which(cfg["cloud"]["sky_bin"] or "sky")
    if not found:
        raise UserError(INSTALL)
    return found


def sky(binary: str, *args: str, secrets: dict[str, str] | None = None,
        capture: bool = False) -> subprocess.CompletedProcess:
    """`sky <args>`. Secret values travel in its environment only (`--secret NAME` has SkyPilot read
    NAME there), never in `args`."""
    try:
        return subprocess.run([binary, *args], env={**os.environ, **(secrets or {})}, text=True,
                              capture_output=capture, check=False)
    except OSError as exc:
        raise UserError(f"cannot run {binary} ({exc.strerror or exc}): {INSTALL}") from None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in ANSI.sub("", (proc.stdout or "") + (proc.stderr or "")).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit code {proc.returncode}"


def secret_flags(secret_names) -> list[str]:
    return [arg for name in sorted(secret_names) for arg in ("--secret", name)]


def launch_args(path: Path, name: str, secret_names) -> list[str]:
    """`sky jobs launch` of one shard: named, detached (return once submitted), no prompt."""
    return ["jobs", "launch", str(path), "--name", name, "--detach-run", "--yes", *secret_flags(secret_names)]


def optimizer_rate(binary: str, path: Path, secrets: dict[str, str]) -> tuple[float, str]:
    """$/h of the offer SkyPilot's optimizer picks for a task, and its row: `sky launch --dryrun` prints
    the candidates, the chosen one marked with a check mark and its COST ($), per hour for a task
    without a time estimate."""
    proc = sky(binary, "launch", "--dryrun", "--yes", str(path), *secret_flags(secrets), secrets=secrets,
               capture=True)
    if proc.returncode != 0:
        raise UserError(f"SkyPilot could not place the job ({_last_line(proc)}): check `sky check` (credentials "
                        "of the --infra candidates) and --gpu-name / --num-gpus")
    for line in ANSI.sub("", proc.stdout + proc.stderr).splitlines():
        if CHOSEN in line:
            cells = line.replace(CHOSEN, " ").split()
            try:
                return float(cells[-1]), " ".join(cells)
            except (ValueError, IndexError):
                break
    raise SkyError("SkyPilot's optimizer printed no chosen offer with a price (`sky launch --dryrun "
                   f"{path}` shows what it says)")


def queue(binary: str) -> list[dict]:
    """Every pagating managed job SkyPilot knows (`sky jobs queue --all -o json`)."""
    proc = sky(binary, "jobs", "queue", "--all", "-o", "json", capture=True)
    if proc.returncode != 0:
        raise SkyError(f"`sky jobs queue` failed: {_last_line(proc)}")
    try:
        rows = json.loads(proc.stdout)
    except ValueError:
        raise SkyError("`sky jobs queue -o json` printed no JSON") from None
    return [r for r in rows if cloud_env.parse_label(r.get("job_name"))]


def active(row: dict) -> bool:
    return not str(row.get("status") or "").startswith(("SUCCEEDED", "CANCEL", "FAILED"))


# ---- the task ---------------------------------------------------------------------------------

def accelerator(gpu_name: str, num_gpus: int) -> str:
    """cloud.gpu_name (Vast's spelling) as SkyPilot's accelerator: RTX 4090 -> RTX4090:1."""
    name = (gpu_name or "").strip()
    if not name or name.lower() in ("any", "*"):
        raise UserError("SkyPilot needs one GPU model: pass --gpu-name (e.g. 'RTX 4090', 'A100', 'H100')")
    if num_gpus < 1:
        raise UserError("--num-gpus must be >= 1")
    return f"{SKY_GPU.get(name, name.replace(' ', ''))}:{num_gpus}"


def parse_infra(items: list[str]) -> list[str]:
    """--infra vast --infra runpod, or --infra vast,runpod: the candidates, in order, once each."""
    out = []
    for item in items or []:
        for infra in filter(None, (part.strip() for part in item.split(","))):
            if not INFRA.match(infra):
                raise UserError(f"--infra {infra!r}: not a SkyPilot infra (e.g. vast, runpod, aws/us-east-1, k8s)")
            if infra not in out:
                out.append(infra)
    return out


def resources(args, cfg: dict) -> dict[str, Any]:
    """The task's `resources:` from the cloud settings and flags; several --infra are SkyPilot's any_of."""
    c = cfg["cloud"]
    res: dict[str, Any] = {"accelerators": accelerator(c["gpu_name"], args.num_gpus),
                           "disk_size": math.ceil(float(c["min_disk_gb"])), "use_spot": bool(args.interruptible),
                           # a preempted job is relaunched (it resumes from MLflow); a job that failed is not
                           "job_recovery": {"max_restarts_on_errors": 0}}
    if c["image"]:
        res["image_id"] = f"docker:{c['image']}"  # the Vast path's image: the same Python and torch
    infra = parse_infra(args.infra)
    if len(infra) == 1:
        res["infra"] = infra[0]
    elif infra:
        res["any_of"] = [{"infra": i} for i in infra]
    return res


def split_secrets(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(envs, secrets): secret-looking names and URLs carrying credentials (cloud_env.is_secret: the repo's,
    an --env's) go through SkyPilot's `secrets:`."""
    envs, secrets = {}, {}
    for k, v in env.items():
        (secrets if cloud_env.is_secret(k, v) else envs)[k] = str(v)
    return envs, secrets


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as YAML blocks: the file reads like the scripts it holds."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def task_yaml(name: str, res: dict, envs: dict[str, str], secret_names) -> str:
    task = {"name": name, "resources": res, "envs": envs,
            "secrets": dict.fromkeys(sorted(secret_names)),  # null: the value comes with `--secret NAME`
            "setup": SETUP, "run": RUN}
    return yaml.dump(task, Dumper=_Dumper, sort_keys=False, width=1000)


# ---- launch -----------------------------------------------------------------------------------

def _checks(args, cfg: dict) -> dict[str, Any]:
    """Everything launch checks before it writes a file or calls SkyPilot; the shards' common env."""
    configs = grid(cfg)
    if not 1 <= args.jobs <= len(configs):
        raise UserError(f"--jobs {args.jobs}: give 1 to {len(configs)} (the grid's configs)")
    sweep_id = cloud_env.sweep_id_of(args.sweep_id)
    uri = cloud_env.check_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    repo = cloud_env.resolve_repo(args.repo)
    commit = cloud_env.resolve_commit(args.commit, args.allow_dirty)
    extra = {**cloud_env.data_env(cfg, project_root()), **cloud_env.parse_env_flags(args.env),
             "PAGATING_PROVIDER": "sky"}
    res = resources(args, cfg)
    cloud_env.check_commit_on_remote(repo, commit)
    sizes = cost.shard_sizes(len(configs), args.jobs)
    return {"sweep_id": sweep_id, "uri": uri, "repo": repo, "commit": commit, "extra": extra, "res": res,
            "sizes": sizes}


def write_tasks(args, cfg: dict, plan: dict, rate: float, parent: str | None) -> tuple[list[dict], dict]:
    """Each shard's task YAML under sky/ (names of secrets only); returns the jobs and the secret values."""
    folder = project_root() / TASK_DIR
    folder.mkdir(exist_ok=True)
    jobs, secrets = [], {}
    for i in range(args.jobs):
        name = cloud_env.label_for(plan["sweep_id"], i)
        env = cloud_env.instance_env(
            repo=plan["repo"], commit=plan["commit"], profile=cfg["profile"], shard=f"{i}/{args.jobs}",
            sweep_id=plan["sweep_id"], parent_run_id=parent, rate=rate, budget=cfg["cloud"]["budget_usd"] / args.jobs,
            stall_s=args.stall_minutes * 60, interruptible=args.interruptible, num_gpus=args.num_gpus,
            tracking_uri=plan["uri"], extra=plan["extra"])
        env["PAGATING_LOG_NAME"] = f"{name}.log"  # on the parent as logs/<job>.log
        envs, secrets = split_secrets({k: v for k, v in env.items() if k not in NOT_SENT})
        path = folder / f"{name}.yaml"
        path.write_text(task_yaml(name, plan["res"], envs, secrets))
        jobs.append({"index": i, "name": name, "path": path, "configs": plan["sizes"][i]})
    return jobs, secrets


def price(args, cfg: dict, plan: dict, binary: str) -> float:
    """SkyPilot's $/h for one job x the projected hours of every shard; over --budget is refused (exit 2)."""
    jobs, secrets = write_tasks(args, cfg, plan, 0.0, None)
    rate, row = optimizer_rate(binary, jobs[0]["path"], secrets)  # every shard asks for the same resources
    gpu = cfg["cloud"]["gpu_name"]
    uri = cost.lookup_uri(plan["uri"])
    times, note = cost.step_times(cfg, [gpu], uri, args.s_per_step)
    if note:
        print(f"note: {note}", file=sys.stderr)
    hours = [cost.instance_hours(cfg, n, args.num_gpus, times[gpu].seconds) for n in plan["sizes"]]
    total, budget = rate * sum(hours), float(cfg["cloud"]["budget_usd"])
    print(f"SkyPilot's optimizer: {row} -> ${rate:.2f}/h; {sum(hours):.1f} job-hours at {times[gpu].seconds:.4f} "
          f"s/step ({times[gpu].source}): projected ${total:.2f} of budget ${budget:.2f}")
    if total > budget:
        raise UserError(f"projected cost ${total:.2f} is over the budget ${budget:.2f} (SkyPilot's optimizer: "
                        f"${rate:.2f}/h): raise --budget, shrink the grid or steps, or try --interruptible or "
                        "other --infra")
    return rate


def cmd_launch(args) -> int:
    cfg = offers.config_for(args)
    binary = sky_binary(cfg)
    plan = _checks(args, cfg)
    rate = price(args, cfg, plan, binary)
    # The parent run comes last of the checks (not in a dry run): jobs report and upload their logs to it.
    parent = None if args.dry_run else sweep_run.open_sweep_run(plan["uri"], cfg, plan["sweep_id"])
    jobs, secrets = write_tasks(args, cfg, plan, rate, parent)
    if args.dry_run:
        for job in jobs:
            print(shlex.join(["sky", *launch_args(job["path"], job["name"], secrets)]))
        print(f"dry run: nothing launched; {len(jobs)} task(s) in {TASK_DIR}/ (no parent run: by hand, each shard "
              "runs under its own); `--secret NAME` reads NAME from your environment")
        return 0
    launched: list[str] = []
    try:
        for job in jobs:
            proc = sky(binary, *launch_args(job["path"], job["name"], secrets), secrets=secrets)
            if proc.returncode != 0:
                raise SkyError(f"`sky jobs launch` of {job['name']} failed (exit code {proc.returncode})")
            launched.append(job["name"])
            sweep_run.mark_created(plan["uri"], parent, job["index"])
            print(f"launched managed job {job['name']} ({job['configs']} config(s)) at ~${rate:.2f}/h")
    except BaseException as exc:  # nothing half-launched keeps running, and the parent says why
        for name in launched:
            sky(binary, "jobs", "cancel", "--name", name, "--yes")
        sweep_run.fail_parent(plan["uri"], parent, f"launch failed: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    print(f"\nwatch it: pagating sky status --sweep {plan['sweep_id']}   (logs: pagating sky logs {jobs[0]['name']})")
    return 0


# ---- status, logs, cancel -----------------------------------------------------------------------

def _of_sweep(rows: list[dict], sweep: str | None) -> list[dict]:
    return [r for r in rows if sweep is None or cloud_env.parse_label(r["job_name"])[0] == sweep]


def cmd_status(args) -> int:
    cfg = offers.config_for(args)
    rows = _of_sweep(queue(sky_binary(cfg)), args.sweep)
    if not rows:
        print("no pagating managed jobs" + (f" of sweep {args.sweep}" if args.sweep else ""))
        return 0
    print(show.format_table([[r.get("job_id"), r["job_name"], r.get("status"), r.get("recovery_count") or 0,
                               r.get("resources") or "-"] for r in rows],
                             ["job", "name", "status", "recoveries", "resources"]))
    uri = cloud_env.tracking_uri_for_lookup(args)
    if not uri:
        print("progress: set MLFLOW_TRACKING_URI or pass --tracking-uri")
        return 0
    fallback = cost.estimated_step_time(cfg, cfg["cloud"]["gpu_name"])
    for sweep_id in dict.fromkeys(cloud_env.parse_label(r["job_name"])[0] for r in rows):
        working = sum(active(r) for r in rows if cloud_env.parse_label(r["job_name"])[0] == sweep_id)
        try:
            prog = sweep_run.sweep_progress(uri, sweep_id, cfg)
            print(sweep_run.progress_line(sweep_id, prog, fallback, working))
        except Exception as exc:  # the jobs' table above stands on its own
            print(f"sweep {sweep_id}: progress unavailable ({type(exc).__name__})")
    return 0


def cmd_logs(args) -> int:
    if not cloud_env.parse_label(args.job):
        raise UserError(f"{args.job!r} is not a pagating job name (pagating-<sweep id>-<i>; `pagating sky status`)")
    extra = ["--tail", str(args.tail)] if args.tail else []
    return sky(sky_binary(offers.config_for(args)), "jobs", "logs", "--name", args.job,
               "--follow" if args.follow else "--no-follow", *extra).returncode


def cmd_cancel(args) -> int:
    if not (args.names or args.sweep or args.all):
        raise UserError("say what to cancel: job names, --sweep ID, or --all (every pagating-* job)")
    binary = sky_binary(offers.config_for(args))
    bad = [n for n in args.names if not cloud_env.parse_label(n)]
    if bad:
        raise UserError(f"{bad[0]!r} is not a pagating job name (pagating-<sweep id>-<i>)")
    jobs = list(args.names)
    if args.sweep or args.all:
        jobs += [r["job_name"] for r in _of_sweep(queue(binary), args.sweep) if active(r)]
    if not jobs:
        print("nothing to cancel")
        return 0
    failed = [n for n in dict.fromkeys(jobs) if sky(binary, "jobs", "cancel", "--name", n, "--yes").returncode]
    for name in failed:
        print(f"could not cancel {name}: see `sky jobs queue`", file=sys.stderr)
    _note_cancelled(args, [n for n in jobs if n not in failed], binary)
    return 1 if failed else 0


def _note_cancelled(args, jobs: list[str], binary: str) -> None:
    """Each cancelled job's report on its sweep's parent run (done, so nobody counts it as working), and
    the parent FAILED once none of its jobs is left: a cancelled job may end before its own exit can say
    so. Best effort: the cancel is what matters."""
    try:
        uri = cloud_env.tracking_uri_for_lookup(args)
        if not (uri and jobs):
            return
        left = {cloud_env.parse_label(r["job_name"])[0] for r in queue(binary)
                if active(r) and r["job_name"] not in jobs}
        with cost.quick_mlflow():
            mlf = store.client(uri)
            exps = cost.pagating_experiments(mlf)
            for sweep_id in dict.fromkeys(cloud_env.parse_label(n)[0] for n in jobs):
                query = f"tags.`{names.SWEEP_ID}` = '{sweep_id}' and tags.`{names.ROLE}` = '{names.ROLE_SWEEP}'"
                for run in mlf.search_runs(exps, query) if exps else []:
                    for name in jobs:
                        if cloud_env.parse_label(name)[0] == sweep_id:
                            sweep_run.note_instance(uri, run.info.run_id, cloud_env.parse_label(name)[1],
                                                "killed: cancelled by `pagating sky cancel`")
                    if sweep_id not in left:
                        sweep_run.fail_parent(uri, run.info.run_id, "every job cancelled by `pagating sky cancel`")
    except Exception as exc:
        print(f"could not note the cancel on the sweep's parent run ({type(exc).__name__})", file=sys.stderr)


# ---- CLI --------------------------------------------------------------------------------------

def _launch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--infra", action="append", default=[], metavar="INFRA[,INFRA...]",
                   help="where SkyPilot may run the jobs: vast, runpod, lambda, aws, gcp, kubernetes, ... "
                   "(repeatable; several are SkyPilot's any_of; default: every cloud `sky check` enabled)")
    p.add_argument("--jobs", type=int, default=1, help="managed jobs; job i runs shard i/N")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per job (one config per GPU)")
    p.add_argument("--interruptible", action="store_true", help="spot instances (SkyPilot's use_spot)")
    p.add_argument("--s-per-step", type=float, default=None,
                   help="seconds per step to project with (default: measured in MLflow, else estimated)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI)")
    source_flags(p, "job", "job names", "stops", "; secret-looking names go through SkyPilot's secrets")
    p.add_argument("--dry-run", action="store_true",
                   help=f"write each shard's task to {TASK_DIR}/ and print its `sky jobs launch`; launch nothing")


def register_cli(sub) -> None:
    top = sub.add_parser("sky", help="run the sweep's shards as SkyPilot managed jobs (any cloud)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.set_defaults(func=lambda a: top.print_help() or 2, provider="sky")
    verbs = top.add_subparsers(dest="sky_verb", metavar="<command>")

    p = verbs.add_parser("launch", help="one managed job per shard, within the budget")
    add_config_args(p, "sky launch", default_profile=offers.DEFAULT_PROFILE)
    _launch_flags(p)
    p.set_defaults(func=guard(cmd_launch))

    p = verbs.add_parser("status", help="the sweeps' managed jobs and their progress")
    add_config_args(p, "sky status", default_profile=offers.DEFAULT_PROFILE)
    p.add_argument("--sweep", default=None, help="only this sweep id")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI)")
    p.set_defaults(func=guard(cmd_status))

    p = verbs.add_parser("logs", help="a job's log (`sky jobs logs`)")
    add_config_args(p, "sky logs", default_profile=offers.DEFAULT_PROFILE)
    p.add_argument("job", nargs="?", default="", help="job name, pagating-<sweep id>-<i>")
    p.add_argument("--follow", action="store_true", help="keep printing while the job runs")
    p.add_argument("--tail", type=int, default=200, help="last N lines (0: all)")
    p.set_defaults(func=guard(cmd_logs))

    p = verbs.add_parser("cancel", help="cancel managed jobs (their machines go)")
    add_config_args(p, "sky cancel", default_profile=offers.DEFAULT_PROFILE)
    p.add_argument("names", nargs="*", help="job names")
    p.add_argument("--sweep", default=None, help="every job of this sweep")
    p.add_argument("--all", action="store_true", help="every pagating-* job")
    p.add_argument("--tracking-uri", default=None, help="MLflow server of the parent runs (default "
                   "MLFLOW_TRACKING_URI)")
    p.set_defaults(func=guard(cmd_cancel))
