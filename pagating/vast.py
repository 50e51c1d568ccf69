"""`pagating vast`: rent a GPU on Vast.ai, run the sweep there, watch it, never leave it billing.

    offers    cheapest offers matching the seed's filters, ranked by projected sweep cost
    launch    rent the cheapest offer(s) within the budget; wait until each reports "ready"
    status    instances of pagating sweeps, their last reports, progress and the parent run from MLflow
    watch     status in a loop: destroy what should be gone, relaunch outbid instances and dead shards,
              until the grid is done (pagating/vast_watch.py)
    logs      an instance's onstart log (Vast's while it lives, the uploaded one after)
    destroy   destroy instances by id, by sweep, or all pagating instances
    watchdog  (on the instance) destroy it at the budget or when training stalls

This module is the Vast.ai provider (the `Vast` class: search offers, create, destroy, list,
show) and its verbs but status/watch (pagating/vast_watch.py); what any provider shares is in
pagating/cloud.py. Every Vast call goes
through the real `vastai` SDK (`VAST_SERVER_URL` points it elsewhere, e.g. at the tests' fake API).
Secrets stay in the instance env; the onstart text and everything printed carry none.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from typing import Any

from pagating import cloud, vast_watchdog
from pagating import cost as costs
from pagating.cloud import format_table
from pagating.config import UserError, add_config_args, defaults, project_root
from pagating.tracking import store
from pagating.tracking.store import retry

DEFAULT_PROFILE = "wikitext103"  # the GPU runs the real thing; --profile overrides
OFFER_SEARCH_LIMIT = 64
# A bid this much above the offer's current minimum, so the first small counter-bid does not stop it.
BID_MARGIN = 1.10
DEFAULT_STALL_MINUTES = 30
# The SDK retries 429/502/503/504 itself but only for ~0.4 s and never a 500; we retry every
# 429/5xx and connection error here with store.retry (the SDK's own retry is turned off: one policy).
# Vast sends no Retry-After on 429 (docs: rate limits and errors), so the backoff is ours.
RETRY_ATTEMPTS = 5
RETRY_BACKOFF_S = 2.0
RETRY_AFTER_CAP_S = 60.0
# Vast's create-instance spec (x-input-validation of PUT /api/v0/asks/{id}/).
LIMITS = cloud.RequestLimits(startup_chars=4096, env_entry_chars=256, env_total_chars=32768,
                             label_chars=256, image_chars=1024)
# Seconds between instance polls while launch waits (Vast rate-limits ~4.5 requests/s per endpoint).
POLL_S = float(os.environ.get("PAGATING_VAST_POLL_S") or 15)
READY_STATES = ("ready", "running: sweep", "finished")  # an instance report saying the sweep can run


class VastError(RuntimeError):
    """Vast.ai failed us (not the user's doing): one line, exit 1."""


class OfferTaken(VastError):
    """The offer was rented by someone else between our search and our create (Vast: no_such_ask)."""


class InstanceGone(VastError):
    """The instance is destroyed already (Vast: 404 no_such_instance)."""


# ---- the API client -------------------------------------------------------------------------

def api_key() -> str | None:
    """VAST_API_KEY, else the file `vastai set api-key` writes (same order as the SDK)."""
    key = os.environ.get("VAST_API_KEY", "").strip()
    if key:
        return key
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for path in (os.path.join(config, "vastai", "vast_api_key"), os.path.expanduser("~/.vast_api_key")):
        if os.path.isfile(path) and (key := open(path).read().strip()):
            return key
    return None


def require_key() -> str:
    key = api_key()
    if not key:
        raise UserError("no Vast.ai API key: set VAST_API_KEY or save the key to "
                        "~/.config/vastai/vast_api_key (console.vast.ai > Account > API keys)")
    return key


class Vast:
    """The Vast.ai provider (cloud.Provider): the `vastai` SDK with one retry policy (backoff on
    429/5xx/connection errors) around it."""

    def __init__(self, key: str | None, server_url: str | None = None):
        from vastai import VastAI

        self.url = server_url or os.environ.get("VAST_SERVER_URL") or None
        self.sdk = VastAI(api_key=key or "-", server_url=self.url, retry=1, raw=True, quiet=True)
        if key is None:
            self.sdk.client.api_key = None  # offers can be searched without an account

    def _retrying(self, what: str, fn, recover=None):
        import requests

        def status(exc) -> int:
            resp = getattr(exc, "response", None)
            return resp.status_code if resp is not None else 0

        def transient(exc) -> bool:
            if isinstance(exc, requests.HTTPError):
                return status(exc) == 429 or status(exc) >= 500
            return isinstance(exc, (requests.ConnectionError, requests.Timeout))

        def retry_after(exc, delay: float) -> float:
            try:
                return min(float(exc.response.headers.get("Retry-After", "")), RETRY_AFTER_CAP_S)
            except (AttributeError, ValueError):
                return delay

        def say(exc, attempt: int, wait: float) -> None:
            why = f"HTTP {status(exc)}" if isinstance(exc, requests.HTTPError) else type(exc).__name__
            print(f"vast: {what} answered {why}; retry {attempt}/{RETRY_ATTEMPTS - 1} in {wait:.1f} s",
                  file=sys.stderr)

        try:
            return retry(fn, what, RETRY_ATTEMPTS, first=RETRY_BACKOFF_S, cap=math.inf, transient=transient,
                         wait_for=retry_after, before_wait=recover, say=say)
        except requests.HTTPError as exc:
            if status(exc) in (401, 403):
                raise UserError(f"Vast.ai refused the API key (HTTP {status(exc)}) on {what}: check "
                                "VAST_API_KEY or ~/.config/vastai/vast_api_key") from None
            body = (exc.response.text if exc.response is not None else "")[:300].replace("\n", " ")
            # Vast answers a taken offer 400 (some report 404/410) {"error": "no_such_ask", ...}
            kind = (OfferTaken if "no_such_ask" in body else InstanceGone if "no_such_instance" in body
                    else VastError)
            raise kind(f"Vast.ai {what} failed: HTTP {status(exc)} {body}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise VastError(f"Vast.ai {what} failed: {type(exc).__name__} "
                            f"(server {self.url or 'console.vast.ai'})") from None

    def call(self, method: str, *args, **kwargs):
        return self._retrying(method, lambda: getattr(self.sdk, method)(*args, **kwargs))

    def search_offers(self, query: dict, interruptible: bool, disk_gb: float) -> list[dict]:
        # storage=disk: the quoted dph_total then includes this instance's disk.
        return self.call("search_offers", query=query, type="bid" if interruptible else "on-demand",
                         order="dph_total", limit=OFFER_SEARCH_LIMIT, storage=disk_gb)

    def instances(self) -> list[dict]:
        return self.call("show_instances")

    def instance(self, instance_id: int) -> dict | None:
        """The instance, or None once it is gone."""
        return self.call("show_instance", int(instance_id))

    def with_label(self, label: str, exclude: set[int] = frozenset()) -> int | None:
        for inst in self.instances():
            if inst.get("label") == label and inst["id"] not in exclude:
                return int(inst["id"])
        return None

    def create(self, offer_id: int, label: str, exclude: set[int] = frozenset(), **kwargs) -> int:
        """Rent `offer_id`; returns the instance id. A create that failed with 5xx may still have
        rented: before each retry, an instance already carrying `label` is adopted, never doubled.
        Env values longer than one Vast env entry go split (cloud.split_env). Raises OfferTaken when
        someone else rented the offer first."""
        kwargs["env"] = cloud.split_env(kwargs.get("env") or {}, LIMITS.env_entry_chars)
        cloud.check_request(LIMITS, startup=kwargs.get("onstart_cmd") or "", env=kwargs["env"],
                            label=label, image=kwargs.get("image") or "")

        def once() -> int:
            res = self.sdk.create_instance(offer_id, label=label, **kwargs)
            if not isinstance(res, dict) or not res.get("success", True) or not res.get("new_contract"):
                raise VastError(f"Vast.ai create on offer {offer_id} answered {res!r:.300}")
            return int(res["new_contract"])
        return self._retrying(f"create on offer {offer_id}", once,
                              recover=lambda: self.with_label(label, exclude))

    def destroy(self, instance_id: int) -> None:
        """Destroy; one that is gone already counts as destroyed (the instance may have beaten us to it)."""
        try:
            self.call("destroy_instance", int(instance_id))
        except InstanceGone:
            pass


def _guard(func):
    """Vast failures print one line and exit 1 instead of a traceback."""
    def wrapped(args):
        try:
            return func(args)
        except VastError as exc:
            print(f"pagating vast: {exc}", file=sys.stderr)
            return 1
    return wrapped


# ---- offers and projections -------------------------------------------------------------------

def load_profile(profile: str | None) -> dict[str, Any]:
    from pagating.config import load_config

    return load_config(profile or DEFAULT_PROFILE)


def config_for(args) -> dict[str, Any]:
    """The profile with this command's cloud flags and `--set`s applied. The instance runs the committed
    params.yaml, so only `cloud` (what to rent, how much to spend) may be changed from here."""
    from pagating.config import load_config, overrides_from_args

    overrides = overrides_from_args(args)
    other = sorted(k for k in overrides if not k.startswith("cloud."))
    if other:
        raise UserError(f"--set {other[0]}: the instance runs the committed params.yaml, so `vast` takes cloud.* "
                        "settings only; commit the change to params.yaml and launch that commit")
    return load_config(args.profile or DEFAULT_PROFILE, overrides)


def image_cuda(image: str, fallback: float | None) -> float | None:
    """The CUDA version an image needs from the host driver: from its tag (pytorch/pytorch:2.6.0-
    cuda12.4-cudnn9-runtime -> 12.4), else `fallback` (--image-cuda, params cloud.image_cuda)."""
    m = re.search(r"cuda[-_]?(\d+)\.(\d+)", image or "", re.I)
    return float(f"{m.group(1)}.{m.group(2)}") if m else fallback


def offer_query(gpu_name: str, min_reliability: float, min_disk_gb: float, min_inet_down: float,
                num_gpus: int, exclude_machines: list[int] | None = None, min_cuda: float | None = None) -> dict:
    q: dict[str, Any] = {"reliability": {"gte": min_reliability}, "disk_space": {"gte": min_disk_gb},
                         "inet_down": {"gte": min_inet_down}, "num_gpus": {"eq": num_gpus},
                         "rentable": {"eq": True}, "rented": {"eq": False}}
    if gpu_name and gpu_name.lower() not in ("any", "*"):
        q["gpu_name"] = {"eq": gpu_name}
    if exclude_machines:
        q["machine_id"] = {"notin": exclude_machines}
    if min_cuda:  # the host driver's highest CUDA must run the image's CUDA
        q["cuda_max_good"] = {"gte": min_cuda}
    return q


def cuda_ok(offer: dict, min_cuda: float | None) -> bool:
    """Checked here too: the search filter is the API's business, a CPU-only sweep is ours."""
    return not min_cuda or float(offer.get("cuda_max_good") or 0) >= min_cuda


def hourly_rate(offer: dict, interruptible: bool, bid: float | None = None) -> float:
    """$/h the instance will bill: dph_total on demand; for a bid, --bid or the minimum bid x margin
    (an approximation: a bid instance bills what it bid while it runs)."""
    if not interruptible:
        return float(offer["dph_total"])
    if bid:
        return float(bid)
    return round(float(offer.get("min_bid") or offer["dph_total"]) * BID_MARGIN, 4)


def tracking_uri_for_lookup(args) -> str | None:
    """--tracking-uri or MLFLOW_TRACKING_URI; one with user:password@ in it is refused (exit 2)."""
    uri = getattr(args, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        store.check_no_credentials(uri)
    return uri


def rank_offers(args, cfg: dict) -> tuple[list[dict], str | None]:
    """Search offers and annotate each with rate, s/step, hours and projected cost for the whole sweep
    (all instances at that offer's price), cheapest first."""
    client = Vast(api_key())
    disk = max(args.disk or 0, args.min_disk_gb)
    min_cuda = image_cuda(args.image, args.image_cuda)  # args carry the cloud settings (_fill_cloud_defaults)
    query = offer_query(args.gpu_name, args.min_reliability, disk,
                        args.min_inet_down, args.num_gpus, min_cuda=min_cuda)
    offers = [o for o in client.search_offers(query, args.interruptible, disk) if cuda_ok(o, min_cuda)]
    uri = tracking_uri_for_lookup(args) or cfg["tracking"]["tracking_uri"]
    times, note = costs.step_times(cfg, [o.get("gpu_name", "") for o in offers], uri, args.s_per_step)
    sizes = costs.shard_sizes(costs.grid_size(cfg), args.instances)
    for o in offers:
        st = times[o.get("gpu_name", "")]
        gpus = int(o.get("num_gpus") or 1)
        o["_rate"] = hourly_rate(o, args.interruptible, getattr(args, "bid", None))
        o["_s_per_step"], o["_source"] = st.seconds, st.source
        o["_hours"] = [costs.instance_hours(cfg, n, gpus, st.seconds) for n in sizes]
        o["_cost"] = o["_rate"] * sum(o["_hours"])
    offers.sort(key=lambda o: (o["_cost"], o["_rate"]))
    return offers, note


def offers_table(offers: list[dict], budget: float | None = None) -> str:
    rows = []
    for o in offers:
        over = " >budget" if budget is not None and o["_cost"] > budget else ""
        rows.append([o["id"], o.get("gpu_name", "?"), o.get("num_gpus", 1), f"{o['_rate']:.3f}",
                     f"{float(o.get('reliability2') or o.get('reliability') or 0):.3f}",
                     f"{float(o.get('inet_down') or 0):.0f}", f"{float(o.get('disk_space') or 0):.0f}",
                     f"{float(o.get('cuda_max_good') or 0):.1f}",
                     str(o.get("geolocation") or "?")[:18], f"{o['_s_per_step']:.4f}", o["_source"],
                     f"{sum(o['_hours']):.1f}", f"{o['_cost']:.2f}{over}"])
    return format_table(rows, ["offer", "gpu", "n", "$/h", "reliab", "down Mb/s", "disk GB", "cuda", "where",
                               "s/step", "s/step from", "hours", "$ sweep"])


@_guard
def cmd_offers(args) -> int:
    cfg = config_for(args)
    _fill_cloud_defaults(args, cfg)
    offers, note = rank_offers(args, cfg)
    if note:
        print(f"note: {note}", file=sys.stderr)
    n, steps = costs.grid_size(cfg), cfg["train"]["max_steps"]
    print(f"profile {cfg['profile']}: {n} configs x {steps} steps over {args.instances} instance(s); "
          f"{'bid' if args.interruptible else 'on-demand'} offers, cheapest projected sweep first")
    if not offers:
        print("no offers match: relax the filters (--gpu-name, --min-reliability, --min-disk-gb, "
              "--min-inet-down; hosts whose driver runs the image's CUDA)")
        return 1
    print(offers_table(offers[:args.limit], args.budget))
    return 0


# ---- launch -----------------------------------------------------------------------------------

def _fill_cloud_defaults(args, cfg: dict) -> None:
    c = cfg["cloud"]  # the cloud flags (pagating/config.py) are already applied to it
    for attr, key in (("gpu_name", "gpu_name"), ("min_reliability", "min_reliability"),
                      ("min_disk_gb", "min_disk_gb"), ("min_inet_down", "min_inet_down_mbps"),
                      ("budget", "budget_usd"), ("image", "image"), ("image_cuda", "image_cuda"),
                      ("start_timeout", "start_timeout_min")):
        setattr(args, attr, c[key])
    if args.instances < 1:
        raise UserError("--instances must be >= 1")
    if getattr(args, "bid", None) and not args.interruptible:
        raise UserError("--bid is a bid price: use it with --interruptible")
    if args.num_gpus < 1:
        raise UserError("--num-gpus must be >= 1")
    if args.instances > costs.grid_size(cfg):
        raise UserError(f"--instances {args.instances} is more than the {costs.grid_size(cfg)} configs "
                        "of the grid: use fewer instances")


def wait_started(client: Vast, uri: str, run_id: str, ids: list[int], timeout_s: float) -> dict[int, str]:
    """Poll until each instance reports "ready" on the parent run (checked out, installed, data pulled,
    CUDA found); returns {id: why it failed} for those that did not (gone, failed, or not ready at the
    timeout)."""
    deadline = time.time() + timeout_s
    pending, failed, seen = set(ids), {}, {}
    while pending:
        live = {int(i["id"]): i for i in client.instances()}  # one call per round (rate limits)
        try:
            reports = cloud.instance_reports(uri, run_id)
        except Exception as exc:  # the server blinked: ask again next round
            reports = {}
            print(f"could not read the instances' reports ({type(exc).__name__})", file=sys.stderr)
        for iid in sorted(pending):
            inst, state = live.get(iid), reports.get(iid)
            if state and state.startswith(("failed", "killed")):
                failed[iid] = state
            elif inst is None:
                failed[iid] = f"the instance is gone ({state or 'it never reported in'})"
            elif state and state.startswith(READY_STATES):
                print(f"instance {iid}: {inst.get('actual_status')}, {state}")
            else:  # not yet (or still checking out, installing, pulling data)
                if state and seen.get(iid) != state:
                    print(f"instance {iid}: {state}")
                    seen[iid] = state
                continue
            pending.discard(iid)
        if not pending:
            break
        if time.time() >= deadline:
            for iid in pending:
                inst = live.get(iid) or {}
                msg = (inst.get("status_msg") or "").strip().replace("\n", " ")[:300]
                failed[iid] = (f"not ready after {timeout_s / 60:.0f} min: state {inst.get('actual_status')}"
                               + (f", last report: {seen[iid]}" if iid in seen else "")
                               + (f", Vast says: {msg}" if msg else ""))
            break
        time.sleep(min(POLL_S, max(0.0, deadline - time.time())))
    return failed


@_guard
def cmd_launch(args) -> int:
    key = require_key()
    cfg = config_for(args)
    _fill_cloud_defaults(args, cfg)
    tracking_uri = cloud.check_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    repo = cloud.resolve_repo(args.repo)
    commit = cloud.resolve_commit(args.commit, args.allow_dirty)
    extra_env = {**cloud.data_env(cfg, project_root()), **cloud.parse_env_flags(args.env)}
    sweep_id = args.sweep_id or cloud.new_sweep_id()
    if not cloud.SWEEP_ID.match(sweep_id):
        raise UserError(f"--sweep-id {sweep_id!r}: use letters, digits, '.' and '_' only")
    args.disk = max(args.disk or 0, args.min_disk_gb)
    cloud.check_commit_on_remote(repo, commit)  # before any Vast call: the instance must find it

    offers, note = rank_offers(args, cfg)
    if note:
        print(f"note: {note}", file=sys.stderr)
    plan = cloud.plan_launch(args.instances, args.budget, cfg, offers)
    total = sum(p["cost"] for p in plan)
    client = Vast(key)
    credit = client.call("show_user").get("credit")
    if credit is None:
        print("warning: the account answer has no credit figure; not checked", file=sys.stderr)
    elif float(credit) < total:
        raise UserError(f"account credit ${float(credit):.2f} is below the projected cost ${total:.2f}: add "
                        "credit at console.vast.ai (Billing) or lower the projection")

    onstart = cloud.bootstrap_text()

    def envs(parent: str | None) -> None:
        for p in plan:
            p["label"] = cloud.label_for(sweep_id, p["index"])
            p["env"] = cloud.instance_env(
                repo=repo, commit=commit, profile=cfg["profile"], shard=f"{p['index']}/{args.instances}",
                sweep_id=sweep_id, parent_run_id=parent, rate=p["rate"], budget=args.budget / args.instances,
                stall_s=args.stall_minutes * 60, interruptible=args.interruptible,
                num_gpus=int(p["offer"].get("num_gpus") or 1), tracking_uri=tracking_uri, extra=extra_env)
            cloud.check_request(LIMITS, startup=onstart, env=cloud.split_env(p["env"], LIMITS.env_entry_chars),
                                label=p["label"], image=args.image)

    envs("0" * 32)  # every request checked (with a run id's length) before the parent run exists
    # The parent run comes last of the checks (not in a dry run): instances report and upload logs to it.
    parent = None if args.dry_run else cloud.open_sweep_run(tracking_uri, cfg, sweep_id)
    envs(parent)
    _show_plan(args, cfg, sweep_id, commit, parent, plan, credit, onstart)
    if args.dry_run:
        return 0
    spares = [o for o in offers if all(o is not p["offer"] for p in plan)]
    try:
        created = _rent(client, args, plan, spares, onstart, tracking_uri, parent)
    except BaseException as exc:  # nothing runs for this sweep: its parent must not stay RUNNING
        cloud.fail_parent(tracking_uri, parent, f"launch failed: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    _record_shards(args, tracking_uri, parent, plan, created)
    if args.no_wait:
        print(f"\nnot waiting: `pagating vast watch --sweep {sweep_id}` destroys instances that do not start")
    elif not _await_start(client, args, tracking_uri, parent, created):
        _settle_parent(tracking_uri, parent, cfg, sweep_id, created)
        return 1
    print(f"\nwatch it: pagating vast status --sweep {sweep_id}   (logs: pagating vast logs <id>)")
    print(f"keep `pagating vast watch --sweep {sweep_id}` running (docs/vast.md): it destroys an instance "
          "that cannot destroy itself and re-runs a shard whose instance died")
    return 0


def _show_plan(args, cfg: dict, sweep_id: str, commit: str, parent: str | None, plan: list[dict],
               credit, onstart: str) -> None:
    """What launch is about to rent, and in a dry run what each instance would get (secrets masked)."""
    total = sum(p["cost"] for p in plan)
    print(f"sweep {sweep_id}: profile {cfg['profile']}, commit {commit[:12]}, image {args.image}, "
          f"disk {args.disk} GB" + (f", parent run {parent}" if parent else ""))
    print(format_table([[p["label"], p["offer"]["id"], p["offer"].get("gpu_name"), p["configs"],
                         f"{p['rate']:.3f}", f"{p['hours']:.1f}", f"{p['cost']:.2f}"] for p in plan],
                       ["label", "offer", "gpu", "configs", "$/h", "hours", "$ projected"]))
    print(f"projected total ${total:.2f} of budget ${args.budget:.2f}"
          + (f"; credit ${float(credit):.2f}" if credit is not None else ""))
    if not args.dry_run:
        return
    for p in plan:
        print(f"\nenv of {p['label']} (secrets masked):")
        for k, v in sorted(cloud.mask_env(p["env"]).items()):
            print(f"  {k}={v}")
    print(f"\nonstart ({len(onstart)} of {LIMITS.startup_chars} chars, from {cloud.BOOTSTRAP.name}; it runs "
          f"scripts/onstart.sh of the commit):\n{onstart}")
    print("dry run: nothing rented")


def _rent(client: Vast, args, plan: list[dict], spares: list[dict], onstart: str, tracking_uri: str,
          parent: str | None) -> list[int]:
    """Create one instance per planned offer; an offer taken meanwhile is replaced by the cheapest spare
    that keeps the plan within the budget. On any other failure destroy what was rented, then raise."""
    created: list[int] = []
    try:
        for p in plan:
            kwargs = {"image": args.image, "disk": args.disk, "env": p["env"], "onstart_cmd": onstart, "ssh": True}
            while True:
                if args.interruptible:
                    kwargs["price"] = p["rate"]
                try:
                    iid = client.create(p["offer"]["id"], p["label"], exclude=set(created), **kwargs)
                    break
                except OfferTaken:
                    _next_offer(args, plan, p, spares)
            created.append(iid)
            print(f"rented instance {iid} ({p['label']}) on offer {p['offer']['id']} at ${p['rate']:.3f}/h")
            cloud.mark_created(tracking_uri, parent, iid)
        for iid in created:  # confirm each exists before handing over to the instance's watchdog
            if client.instance(iid) is None:
                raise VastError(f"instance {iid} was created but Vast.ai does not show it")
    except BaseException as exc:
        if created:
            why = f"launch failed after renting ({type(exc).__name__}: {str(exc)[:200]})"
            print(f"{why}; destroying {', '.join(map(str, created))}", file=sys.stderr)
            destroy_all(client, created, _noter(tracking_uri, parent, "launch", why))
        raise
    return created


def _record_shards(args, uri: str, parent: str, plan: list[dict], created: list[int]) -> None:
    """Each shard's instance on the parent run: `watch --sweep` re-runs a shard whose instance is gone,
    even one it never saw (destroyed below while starting, or dead before watch started)."""
    from pagating.vast_watch import record_shards, shard_record

    try:
        record_shards(uri, parent, [shard_record(
            p["label"], iid, p["env"], image=args.image, disk=args.disk, bid=args.interruptible, rate=p["rate"],
            gpu_name=p["offer"].get("gpu_name"), num_gpus=int(p["offer"].get("num_gpus") or 1))
            for p, iid in zip(plan, created, strict=True)])
    except Exception as exc:  # the instances run regardless; only a watch started later is the poorer
        print(f"warning: could not record the shards on the parent run ({type(exc).__name__}): `vast watch` "
              "re-runs only the shards whose instances it sees", file=sys.stderr)


def _noter(uri: str | None, parent: str | None, who: str, why):
    """destroy_all's `note`: each attempt on the parent run ("destroyed by launch: <why>", or "destroy
    failed (launch): ..."), so no instance counts as still working once it is gone, and one Vast still
    lists after a failed destroy shows red in `status`. `why` is a text, or {id: text}."""
    def note(iid: int, ok: bool) -> None:
        text = why.get(iid, "") if isinstance(why, dict) else why
        cloud.note_instance(uri, parent, iid, f"{f'destroyed by {who}' if ok else f'destroy failed ({who})'}: {text}")
    return note


def _next_offer(args, plan: list[dict], p: dict, spares: list[dict]) -> None:
    """Move plan entry `p` to the cheapest spare offer (they passed the same filters) within the budget."""
    taken = p["offer"]["id"]
    others = sum(q["cost"] for q in plan if q is not p)
    for offer in sorted(spares, key=lambda o: (o["_rate"] * o["_hours"][p["index"]], o["_rate"])):
        cost = offer["_rate"] * offer["_hours"][p["index"]]
        spares.remove(offer)
        if others + cost <= args.budget:
            p.update(offer=offer, rate=offer["_rate"], hours=offer["_hours"][p["index"]], cost=cost)
            p["env"]["PAGATING_USD_PER_HOUR"] = f"{offer['_rate']:.4f}"
            print(f"offer {taken} was taken meanwhile; trying offer {offer['id']} at ${offer['_rate']:.3f}/h")
            return
    raise VastError(f"offer {taken} was taken meanwhile and no other offer keeps the sweep within the "
                    f"budget ${args.budget:.2f}: try again (`pagating vast offers`) or raise --budget")


def _await_start(client: Vast, args, tracking_uri: str, parent: str | None, created: list[int]) -> bool:
    """Wait for each instance to report in; destroy those that do not. True when all started."""
    print(f"waiting up to {args.start_timeout:g} min for each instance to be ready: checked out, installed, "
          "data pulled, CUDA found (--start-timeout; --no-wait returns now)")
    failed = wait_started(client, tracking_uri, parent, created, args.start_timeout * 60)
    for iid, why in failed.items():
        print(f"instance {iid}: {why}", file=sys.stderr)
    if failed:
        live = {int(i["id"]) for i in client.instances()}
        left = destroy_all(client, [i for i in failed if i in live], _noter(tracking_uri, parent, "launch", failed))
        for iid in failed:  # gone already: its last report must not say it still works ("created", "running")
            if iid not in live and not failed[iid].startswith(cloud.DONE_STATES):
                cloud.note_instance(tracking_uri, parent, iid, f"destroyed (gone while launch waited): {failed[iid]}")
        print(f"{len(failed)} of {len(created)} instance(s) did not start"
              + (f"; still billing: {left}" if left else "")
              + "; `pagating vast logs <id>` shows what they logged", file=sys.stderr)
        if len(failed) == len(created):
            cloud.fail_parent(tracking_uri, parent, "no instance started: " + "; ".join(
                f"instance {iid}: {why}" for iid, why in failed.items()))
    return not failed


def _settle_parent(uri: str, parent: str, cfg: dict, sweep_id: str, created: list[int]) -> None:
    """After launch destroyed instances that did not start: if none of the sweep works any more (the others
    ended while launch waited), the parent's truth is set here, as nobody else is left to set it."""
    try:
        with costs.quick_mlflow():
            reports = cloud.instance_reports(uri, parent, include_created=True)
            if cloud.instances_working(reports) or all(reports.get(i, "").startswith("destroy") for i in created):
                return  # someone still works and settles it; or none started: fail_parent said why
            cloud.settle_parent(uri, parent, cloud.grid_state(uri, sweep_id, cfg), working=False)
    except Exception as exc:
        print(f"could not set the sweep's parent run to its status ({type(exc).__name__}): `pagating vast "
              f"watch --sweep {sweep_id}` does", file=sys.stderr)


def destroy_all(client: Vast, ids: list[int], note=None) -> list[int]:
    """Destroy each id, carrying on past failures; returns the ids left billing. `note(id, destroyed)`
    records each attempt (on the sweep's parent run: see _noter)."""
    left = []
    for iid in ids:
        try:
            client.destroy(iid)
            print(f"destroyed instance {iid}", file=sys.stderr)
        except Exception as exc:
            left.append(iid)
            print(f"could not destroy instance {iid} ({exc}): run `pagating vast destroy {iid}`",
                  file=sys.stderr)
        if note is not None:
            note(iid, iid not in left)
    return left


@_guard
def cmd_logs(args) -> int:
    uri = tracking_uri_for_lookup(args)
    client = Vast(require_key())
    if client.instance(int(args.instance)) is not None:  # alive: Vast's own copy of its output
        text = client.call("logs", int(args.instance), tail=str(args.tail) if args.tail else None)
        print(text if isinstance(text, str) else text.get("msg") or text)
        return 0
    if not uri:
        raise UserError(f"instance {args.instance} is gone; its log is on the sweep's run in MLflow: set "
                        "MLFLOW_TRACKING_URI or pass --tracking-uri")
    with costs.quick_mlflow():
        text = cloud.instance_log(uri, int(args.instance))
    lines = text.splitlines()
    print("\n".join(lines[-args.tail:] if args.tail else lines))
    return 0


@_guard
def cmd_destroy(args) -> int:
    if not (args.ids or args.sweep or args.all):
        raise UserError("say what to destroy: instance ids, --sweep ID, or --all (every pagating-* instance)")
    from pagating.vast_watch import sweep_instances

    client = Vast(require_key())
    ids = [int(i) for i in args.ids]
    rows = {int(i["id"]): i for i in sweep_instances(client)}  # pagating's: their env names their sweep run
    if args.sweep or args.all:
        ids += [iid for iid, i in rows.items() if args.sweep is None or cloud.parse_label(i["label"])[0] == args.sweep]
    if not ids:
        print("nothing to destroy")
        return 0

    def note(iid: int, ok: bool) -> None:  # on the instance's sweep run, when it has one
        env = cloud.env_of(rows.get(iid, {}))
        _noter(env.get("MLFLOW_TRACKING_URI"), env.get("PAGATING_PARENT_RUN_ID"), "vast destroy", "by hand")(iid, ok)
    return 1 if destroy_all(client, sorted(set(ids)), note) else 0


# ---- CLI --------------------------------------------------------------------------------------

def _offer_flags(p: argparse.ArgumentParser, verb: str) -> None:
    # --profile, --set cloud.KEY=VALUE and the cloud flags (--gpu-name, --budget, ...): pagating/config.py.
    add_config_args(p, f"vast {verb}", default_profile=DEFAULT_PROFILE)
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per instance (one config per GPU)")
    p.add_argument("--interruptible", action="store_true",
                   help="bid (interruptible) offers instead of on-demand")
    p.add_argument("--bid", type=float, default=None, metavar="USD_PER_H",
                   help=f"bid price for --interruptible (default the offer's minimum bid x {BID_MARGIN})")
    p.add_argument("--instances", type=int, default=1, help="instances; instance i runs shard i/N")
    p.add_argument("--disk", type=float, default=None, metavar="GB",
                   help="disk to rent (default --min-disk-gb)")
    p.add_argument("--s-per-step", type=float, default=None,
                   help="seconds per step to project with (default: measured in MLflow, else estimated)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI)")


def register_cli(sub) -> None:
    vast = sub.add_parser("vast", help="rent a GPU on Vast.ai and run the sweep there",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vast.set_defaults(func=lambda a: vast.print_help() or 2)
    verbs = vast.add_subparsers(dest="vast_verb", metavar="<command>")

    p = verbs.add_parser("offers", help="offers ranked by projected sweep cost")
    _offer_flags(p, "offers")
    p.add_argument("--limit", type=int, default=10, help="rows to print")
    p.set_defaults(func=cmd_offers)

    p = verbs.add_parser("launch", help="rent the cheapest offer(s) within the budget and run the sweep")
    _offer_flags(p, "launch")
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
    p.add_argument("--no-wait", action="store_true",
                   help="return once the instances exist (`vast watch` then destroys stuck ones)")
    p.add_argument("--dry-run", action="store_true",
                   help="print offer, env (masked), onstart and cost; rent nothing")
    p.set_defaults(func=cmd_launch)

    from pagating import vast_watch  # status and watch live there (it imports this module)

    for name, helptext, func in (
            ("status", "instances, their reports and sweep progress", vast_watch.cmd_status),
            ("watch", "status every --interval s: destroy what should be gone, re-run dead shards until the "
             "grid is done", vast_watch.cmd_watch)):
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
            p.add_argument("--start-timeout", type=float, default=None, metavar="MIN",
                           help="destroy instances loading, exited or offline this long "
                                f"(default {defaults('cloud')['start_timeout_min']:g})")
        p.set_defaults(func=func)

    p = verbs.add_parser("logs", help="an instance's onstart log (from MLflow once the instance is gone)")
    p.add_argument("instance", type=int)
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI)")
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
