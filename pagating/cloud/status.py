"""`pagating <provider> status`, and the round `watch` repeats: the instances of pagating's sweeps with
what each last reported on its sweep's parent run, what they spent, the sweep's progress and its parent
run's status. With a watcher (pagating/cloud/watch.py) a round also closes the loops: it destroys what
should be gone, relaunches outbid instances and dead shards, and settles the parent run.
"""

from __future__ import annotations

from pagating import cost
from pagating.cloud import provider
from pagating.cloud.env import parse_label, tracking_uri_for_lookup
from pagating.cloud.instances import should_be_gone, spent, sweep_instances
from pagating.cloud.offers import load_profile
from pagating.cloud.provider import Provider, ProviderError
from pagating.cloud.relaunch import relaunch
from pagating.cloud.show import format_table, red
from pagating.cloud.sweep_run import (
    REASON_TAG,
    find_sweep_run,
    grid_state,
    missing_configs,
    progress_line,
    reports_in,
    settle_parent,
    shard_records,
    sweep_progress,
)
from pagating.config import UserError
from pagating.tracking import store
from pagating.tracking.store import mask_uri


def instances_table(insts: list[dict], reports: dict[int, str]) -> str:
    rows = []
    for i in insts:
        report = reports.get(int(i["id"]), "")
        state = "OUTBID" if i.get("outbid") else (i.get("status") or "?")
        if should_be_gone(report):
            state = red(f"{state}, STILL BILLING")  # it is done, yet the provider still has it: a destroy failed
        rows.append([i["id"], i.get("label"), state, i.get("gpu_name"), f"{float(i.get('rate') or 0):.3f}",
                     f"{float(i.get('hours') or 0):.2f}", f"{spent(i):.2f}", report[:60] or "-"])
    return format_table(rows, ["instance", "label", "state", "gpu", "$/h", "hours", "$ so far", "last report"])


def _parent_tags(uri: str | None, parent: str | None) -> dict[str, str]:
    """The parent run's tags (instances' reports, shard records, relaunch counts); {} when unreadable."""
    if not (uri and parent):
        return {}
    try:
        with cost.quick_mlflow():
            return dict(store.client(uri).get_run(parent).data.tags)
    except Exception as exc:  # the server blinked: the provider's states still count this round
        print(f"instances' reports unavailable from {mask_uri(uri)} ({type(exc).__name__})")
        return {}


# ---- one round -------------------------------------------------------------------------------------


def report_status(client: Provider, sweep_id: str | None, do_relaunch: bool, tracking_uri: str | None,
                  watcher=None) -> tuple[int, list[str] | None]:
    """Print instances and progress per sweep; with a watcher (a watch.Watcher), destroy what should be
    gone, relaunch outbid instances and dead shards. Returns (instances still up, one verdict line per sweep whose
    instances are all gone; None when there is no sweep at all to watch)."""
    insts = sweep_instances(client, sweep_id)
    if watcher is not None:
        watcher.known.update({int(i["id"]): i for i in insts})
    sweeps: dict[str, list[dict]] = {}
    for inst in [*insts, *(watcher.known.values() if watcher else [])]:
        sweeps.setdefault(parse_label(inst["label"])[0], [])
    for inst in insts:
        sweeps[parse_label(inst["label"])[0]].append(inst)
    if watcher is not None and sweep_id and sweep_id not in sweeps and tracking_uri:
        _find_parent(watcher, tracking_uri, sweep_id)  # nothing of it at the provider: its shards may need re-running
        if sweep_id in watcher.parents:
            sweeps[sweep_id] = []
    if not sweeps:
        print(f"no pagating instances{f' for sweep {sweep_id}' if sweep_id else ''}")
        return 0, None
    up, verdicts = 0, []
    for sid, members in sweeps.items():
        rows = members or [r for r in watcher.known.values() if parse_label(r["label"])[0] == sid]
        env: dict = {}
        for row in rows:  # the sweep's settings (URI, parent, profile), from whichever instance has them
            for k, v in (row.get("env") or {}).items():
                env.setdefault(k, v)
        if watcher is not None and sid in watcher.parents:
            env.setdefault("PAGATING_PARENT_RUN_ID", watcher.parents[sid])
        live, verdict = _sweep_round(client, sid, members, env, do_relaunch, tracking_uri, watcher)
        up += live
        if verdict:
            verdicts.append(verdict)
    return up, verdicts


def _find_parent(watcher, uri: str, sid: str) -> None:
    if sid in watcher.parents:
        return
    try:
        with cost.quick_mlflow():
            parent = find_sweep_run(uri, sid)
    except Exception as exc:
        print(f"sweep {sid}: its parent run unavailable from {mask_uri(uri)} ({type(exc).__name__})")
        return
    if parent:
        watcher.parents[sid] = parent


def _sweep_round(client: Provider, sid: str, members: list[dict], env: dict, do_relaunch: bool,
                 tracking_uri: str | None, watcher) -> tuple[int, str | None]:
    uri, parent = tracking_uri or env.get("MLFLOW_TRACKING_URI"), env.get("PAGATING_PARENT_RUN_ID")
    tags = _parent_tags(uri, parent)
    reports = reports_in(tags, include_created=True)
    for rec in shard_records(tags).values():  # the profile of a sweep with nothing left at the provider
        for k, v in rec.get("env", {}).items():
            env.setdefault(k, v)
    if members:
        print(instances_table(members, reports))
        budget = sum(float((i.get("env") or {}).get("PAGATING_BUDGET_USD") or 0) for i in members)
        print(f"$ so far {sum(spent(i) for i in members):.2f}" + (f" of budget ${budget:.2f}" if budget else ""))
    if watcher is not None:
        gone = watcher.destroy_due(client, members, reports, uri, parent)
        members = [i for i in members if int(i["id"]) not in gone]
    try:
        cfg = load_profile(env.get("PAGATING_PROFILE"))
    except UserError as exc:
        print(f"sweep {sid}: progress unavailable ({exc})")
        return len(members), None
    _relaunch_outbid(client, sid, members, cfg, do_relaunch, uri)
    if not uri:
        print(f"sweep {sid}: progress unavailable (no tracking URI)")
        return len(members), (f"sweep {sid}: all instances are gone; no tracking URI to tell whether its grid "
                              "is done" if not members else None)
    try:
        prog = sweep_progress(uri, sid, cfg)
        state = grid_state(uri, sid, cfg) if watcher is not None else None
    except Exception as exc:  # progress is a nicety; the instance table above is what matters
        print(f"sweep {sid}: progress unavailable from {mask_uri(uri)} ({type(exc).__name__})")
        return len(members), (f"sweep {sid}: all instances are gone; could not read its grid from "
                              f"{mask_uri(uri)}" if not members else None)
    gpu = (members[0].get("gpu_name") if members else None) or cfg["cloud"]["gpu_name"]
    parallel = sum(int(i.get("num_gpus") or 1) for i in members if not i.get("outbid"))
    print(progress_line(sid, prog, cost.estimated_step_time(cfg, gpu), parallel))
    for link in prog.get("links", []):
        print(f"sweep {sid}: {link}")
    if watcher is None:
        _print_parent(uri, parent, sid)
        return len(members), None
    if missing_configs(state):
        members += [{"id": i, "label": "new"} for i in watcher.rerun_dead_shards(client, sid, members, tags,
                                                                                 cfg, uri, state, env)]
    return len(members), _settle(uri, parent, sid, state, bool(members), watcher)


def _relaunch_outbid(client: Provider, sid: str, members: list[dict], cfg: dict, do_relaunch: bool,
                     uri: str | None) -> None:
    if not do_relaunch:
        if any(i.get("outbid") for i in members):
            print(f"sweep {sid}: outbid instance(s): `pagating {client.name} watch --sweep {sid}` destroys and "
                  "relaunches them")
        return
    for inst in members:
        if inst.get("outbid"):
            try:
                relaunch(client, inst, cfg, members, tracking_uri=uri)
            except (ProviderError, UserError) as exc:  # the next round tries again
                print(f"{inst['label']}: relaunch failed: {exc}")


def _print_parent(uri: str, parent: str | None, sid: str) -> None:
    """The parent run's status and why, as the instances and `watch` last set it."""
    if not parent:
        return
    try:
        run = store.client(uri).get_run(parent)
    except Exception as exc:
        print(f"sweep {sid}: parent run unavailable ({type(exc).__name__})")
        return
    why = run.data.tags.get(REASON_TAG)
    line = f"sweep {sid}: parent run {run.info.status}" + (f" ({why})" if why else "")
    print(red(line) if run.info.status == "FAILED" else line)


def _settle(uri: str, parent: str | None, sid: str, state: dict[str, str], working: bool,
            watcher) -> str | None:
    """The parent run's truth this round; the verdict once nothing of the sweep is left running."""
    why = "; ".join(v for k, v in watcher.gave_up.items() if parse_label(k)[0] == sid) or None
    if parent:
        try:
            settle_parent(uri, parent, state, working, why)
        except Exception as exc:
            print(f"sweep {sid}: could not set the parent run's status ({type(exc).__name__})")
    if working:
        return None
    missing = missing_configs(state)
    if not missing:
        return f"sweep {sid}: done: every config of the grid FINISHED ({len(state)}/{len(state)})"
    return red(f"sweep {sid}: NOT done: configs missing: {', '.join(missing)}" + (f"; {why}" if why else ""))


# ---- the verb --------------------------------------------------------------------------------------


def cmd_status(args) -> int:
    uri = tracking_uri_for_lookup(args)
    client = provider.client(args.provider)
    report_status(client, args.sweep, args.relaunch, uri)
    return 0
