"""`pagating <provider> launch`, for any provider: check everything before renting (tracking server, repo,
commit, data, request limits, budget, credit), open the sweep's parent run, rent the cheapest offer(s)
within the budget, record each shard on the parent run, and wait until each instance reports "ready"
(checked out, installed, data pulled, CUDA found), destroying those that do not. Nothing is left billing
when launch fails after renting.
"""

from __future__ import annotations

import os
import sys
import time

from pagating import cost as costs
from pagating.cloud import env as cloud_env
from pagating.cloud import provider
from pagating.cloud.instances import destroy_all, noter
from pagating.cloud.offers import config_for, fill_cloud_defaults, plan_launch, rank_offers
from pagating.cloud.provider import OfferTaken, Provider, ProviderError, check_request
from pagating.cloud.show import format_table
from pagating.cloud.sweep_run import (
    DONE_STATES,
    fail_parent,
    grid_state,
    instance_reports,
    instances_working,
    mark_created,
    note_instance,
    open_sweep_run,
    record_shards,
    settle_parent,
    shard_record,
)
from pagating.config import UserError, project_root

READY_STATES = ("ready", "running: sweep", "finished")  # an instance report saying the sweep can run


def _check_credit(client: Provider, total: float) -> float | None:
    """The account's credit, refused (exit 2) below the projected cost; None when the provider gives none."""
    credit = client.credit()
    if credit is None:
        print("warning: the account answer has no credit figure; not checked", file=sys.stderr)
    elif credit < total:
        raise UserError(f"account credit ${credit:.2f} is below the projected cost ${total:.2f}: add "
                        f"credit to your {client.name} account or lower the projection")
    return credit


def wait_started(client: Provider, uri: str, run_id: str, ids: list[int], timeout_s: float) -> dict[int, str]:
    """Poll until each instance reports "ready" on the parent run (checked out, installed, data pulled,
    CUDA found); returns {id: why it failed} for those that did not (gone, failed, or not ready at the
    timeout)."""
    deadline = time.time() + timeout_s
    pending, failed, seen = set(ids), {}, {}
    while pending:
        live = {int(i["id"]): i for i in client.instances()}  # one call per round (rate limits)
        try:
            reports = instance_reports(uri, run_id)
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
                print(f"instance {iid}: {inst.get('status')}, {state}")
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
                failed[iid] = (f"not ready after {timeout_s / 60:.0f} min: state {inst.get('status')}"
                               + (f", last report: {seen[iid]}" if iid in seen else "")
                               + (f", {client.name} says: {msg}" if msg else ""))
            break
        time.sleep(min(client.poll_s, max(0.0, deadline - time.time())))
    return failed


def cmd_launch(args) -> int:
    client = provider.client(args.provider)
    cfg = config_for(args)
    fill_cloud_defaults(args, cfg)
    tracking_uri = cloud_env.check_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    repo = cloud_env.resolve_repo(args.repo)
    commit = cloud_env.resolve_commit(args.commit, args.allow_dirty)
    extra_env = {**cloud_env.data_env(cfg, project_root()), **cloud_env.parse_env_flags(args.env, client.never_sent)}
    sweep_id = cloud_env.sweep_id_of(args.sweep_id)
    args.disk = max(args.disk or 0, args.min_disk_gb)
    cloud_env.check_commit_on_remote(repo, commit)  # before any provider call: the instance must find it

    offers, note = rank_offers(client, args, cfg)
    if note:
        print(f"note: {note}", file=sys.stderr)
    plan = plan_launch(args.instances, args.budget, cfg, offers)
    credit = _check_credit(client, sum(p["cost"] for p in plan))
    onstart = cloud_env.bootstrap_text()

    def envs(parent: str | None) -> None:
        for p in plan:
            p["label"] = cloud_env.label_for(sweep_id, p["index"])
            p["env"] = cloud_env.instance_env(
                repo=repo, commit=commit, profile=cfg["profile"], shard=f"{p['index']}/{args.instances}",
                sweep_id=sweep_id, parent_run_id=parent, rate=p["rate"], budget=args.budget / args.instances,
                stall_s=args.stall_minutes * 60, interruptible=args.interruptible,
                num_gpus=int(p["offer"].get("num_gpus") or 1), tracking_uri=tracking_uri, extra=extra_env,
                forwarded=client.forwarded_env)
            sent = cloud_env.split_env(p["env"], client.limits.env_entry_chars)
            check_request(client.limits, startup=onstart, env=sent, label=p["label"], image=args.image)

    envs("0" * 32)  # every request checked (with a run id's length) before the parent run exists
    # The parent run comes last of the checks (not in a dry run): instances report and upload logs to it.
    parent = None if args.dry_run else open_sweep_run(tracking_uri, cfg, sweep_id)
    envs(parent)
    _show_plan(client, args, cfg, sweep_id, commit, parent, plan, credit, onstart)
    if args.dry_run:
        return 0
    spares = [o for o in offers if all(o is not p["offer"] for p in plan)]
    try:
        created = _rent(client, args, plan, spares, tracking_uri, parent)
    except BaseException as exc:  # nothing runs for this sweep: its parent must not stay RUNNING
        fail_parent(tracking_uri, parent, f"launch failed: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    _record_shards(args, tracking_uri, parent, plan, created)
    if args.no_wait:
        print(f"\nnot waiting: `pagating {client.name} watch --sweep {sweep_id}` destroys instances that do not start")
    elif not _await_start(client, args, tracking_uri, parent, created):
        _settle_parent(client, tracking_uri, parent, cfg, sweep_id, created)
        return 1
    print(f"\nwatch it: pagating {client.name} status --sweep {sweep_id}   (logs: pagating {client.name} logs <id>)")
    print(f"keep `pagating {client.name} watch --sweep {sweep_id}` running (docs/vast.md): it destroys an instance "
          "that cannot destroy itself and re-runs a shard whose instance died")
    return 0


def _show_plan(client: Provider, args, cfg: dict, sweep_id: str, commit: str, parent: str | None, plan: list[dict],
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
        for k, v in sorted(cloud_env.mask_env(p["env"]).items()):
            print(f"  {k}={v}")
    print(f"\nonstart ({len(onstart)} of {client.limits.startup_chars} chars, from {cloud_env.BOOTSTRAP.name}; it runs "
          f"scripts/onstart.sh of the commit):\n{onstart}")
    print("dry run: nothing rented")


def _rent(client: Provider, args, plan: list[dict], spares: list[dict], tracking_uri: str,
          parent: str | None) -> list[int]:
    """Create one instance per planned offer; an offer taken meanwhile is replaced by the cheapest spare
    that keeps the plan within the budget. On any other failure destroy what was rented, then raise."""
    created: list[int] = []
    try:
        for p in plan:
            while True:
                try:
                    iid = cloud_env.create(client, p["offer"], p["label"], image=args.image, disk_gb=args.disk,
                                           env=p["env"], price=p["rate"] if args.interruptible else None,
                                           exclude=set(created))
                    break
                except OfferTaken:
                    _next_offer(args, plan, p, spares)
            created.append(iid)
            print(f"rented instance {iid} ({p['label']}) on offer {p['offer']['id']} at ${p['rate']:.3f}/h")
            mark_created(tracking_uri, parent, iid)
        for iid in created:  # confirm each exists before handing over to the instance's watchdog
            if client.instance(iid) is None:
                raise ProviderError(f"instance {iid} was created but {client.name} does not show it")
    except BaseException as exc:
        if created:
            why = f"launch failed after renting ({type(exc).__name__}: {str(exc)[:200]})"
            print(f"{why}; destroying {', '.join(map(str, created))}", file=sys.stderr)
            destroy_all(client, created, noter(tracking_uri, parent, "launch", why))
        raise
    return created


def _record_shards(args, uri: str, parent: str, plan: list[dict], created: list[int]) -> None:
    """Each shard's instance on the parent run: `watch --sweep` re-runs a shard whose instance is gone,
    even one it never saw (destroyed below while starting, or dead before watch started)."""
    try:
        record_shards(uri, parent, [shard_record(
            p["label"], iid, p["env"], image=args.image, disk=args.disk, bid=args.interruptible, rate=p["rate"],
            gpu_name=p["offer"].get("gpu_name"), num_gpus=int(p["offer"].get("num_gpus") or 1))
            for p, iid in zip(plan, created, strict=True)])
    except Exception as exc:  # the instances run regardless; only a watch started later is the poorer
        print(f"warning: could not record the shards on the parent run ({type(exc).__name__}): `watch` "
              "re-runs only the shards whose instances it sees", file=sys.stderr)


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
    raise ProviderError(f"offer {taken} was taken meanwhile and no other offer keeps the sweep within the "
                        f"budget ${args.budget:.2f}: try again (`pagating {args.provider} offers`) or raise --budget")


def _await_start(client: Provider, args, tracking_uri: str, parent: str | None, created: list[int]) -> bool:
    """Wait for each instance to report in; destroy those that do not. True when all started."""
    print(f"waiting up to {args.start_timeout:g} min for each instance to be ready: checked out, installed, "
          "data pulled, CUDA found (--start-timeout; --no-wait returns now)")
    failed = wait_started(client, tracking_uri, parent, created, args.start_timeout * 60)
    for iid, why in failed.items():
        print(f"instance {iid}: {why}", file=sys.stderr)
    if failed:
        live = {int(i["id"]) for i in client.instances()}
        left = destroy_all(client, [i for i in failed if i in live], noter(tracking_uri, parent, "launch", failed))
        for iid in failed:  # gone already: its last report must not say it still works ("created", "running")
            if iid not in live and not failed[iid].startswith(DONE_STATES):
                note_instance(tracking_uri, parent, iid, f"destroyed (gone while launch waited): {failed[iid]}")
        print(f"{len(failed)} of {len(created)} instance(s) did not start"
              + (f"; still billing: {left}" if left else "")
              + f"; `pagating {client.name} logs <id>` shows what they logged", file=sys.stderr)
        if len(failed) == len(created):
            fail_parent(tracking_uri, parent, "no instance started: " + "; ".join(
                f"instance {iid}: {why}" for iid, why in failed.items()))
    return not failed


def _settle_parent(client: Provider, uri: str, parent: str, cfg: dict, sweep_id: str, created: list[int]) -> None:
    """After launch destroyed instances that did not start: if none of the sweep works any more (the others
    ended while launch waited), the parent's truth is set here, as nobody else is left to set it."""
    try:
        with costs.quick_mlflow():
            reports = instance_reports(uri, parent, include_created=True)
            if instances_working(reports) or all(reports.get(i, "").startswith("destroy") for i in created):
                return  # someone still works and settles it; or none started: fail_parent said why
            settle_parent(uri, parent, grid_state(uri, sweep_id, cfg), working=False)
    except Exception as exc:
        print(f"could not set the sweep's parent run to its status ({type(exc).__name__}): `pagating "
              f"{client.name} watch --sweep {sweep_id}` does", file=sys.stderr)


