"""`pagating vast status` and `pagating vast watch`: what runs, what each instance last reported on the
sweep's parent run, and (watch) closing every loop: destroy any instance that should be gone (it
reported failed, finished or killed, whatever Vast's state; or sits loading/exited/offline past the
start timeout), retry a destroy that failed, relaunch an outbid bid instance, re-run a shard whose
instance died before its configs finished (at most `cloud.max_relaunches` times, within the shard's
remaining budget, resuming from MLflow checkpoints), and set the parent run to the truth once the last
instance is gone. Run it unattended beside the tracking server (docs/vast.md): it is what catches a box
that cannot destroy itself. What it must not forget across a restart (each shard's latest instance,
how often it was relaunched) is on the parent run, so `--sweep ID` also re-runs shards that died
before this watch started.
"""

from __future__ import annotations

import json
import os
import sys
import time

from pagating import cloud, cost
from pagating.cloud import format_table
from pagating.config import UserError, defaults
from pagating.tracking import store
from pagating.tracking.store import mask_uri
from pagating.vast import (
    OfferTaken,
    Vast,
    VastError,
    _guard,
    cuda_ok,
    hourly_rate,
    image_cuda,
    load_profile,
    offer_query,
    require_key,
)


def red(text: str) -> str:
    """Red on a terminal (what must be acted on); plain text elsewhere (logs, tests)."""
    return f"\033[31m{text}\033[0m" if sys.stdout.isatty() else text


def sweep_instances(client: Vast, sweep_id: str | None = None) -> list[dict]:
    out = []
    for inst in client.instances():
        parsed = cloud.parse_label(inst.get("label"))
        if parsed and (sweep_id is None or parsed[0] == sweep_id):
            out.append(inst)
    return sorted(out, key=lambda i: (cloud.parse_label(i["label"]), i["id"]))


def is_outbid(inst: dict) -> bool:
    """A bid instance Vast stopped while we still want it running: what an outbid looks like."""
    stopped = inst.get("cur_state") == "stopped" or inst.get("actual_status") in ("exited", "stopped")
    return bool(inst.get("is_bid")) and inst.get("intended_status") != "stopped" and stopped


_env = cloud.env_of


def spent(inst: dict) -> float:
    hours = float(inst.get("duration") or 0) / 3600
    return hours * float(inst.get("dph_total") or 0)


def should_be_gone(report: str | None) -> bool:
    return bool(report) and report.startswith(cloud.DONE_STATES)


def instances_table(insts: list[dict], reports: dict[int, str]) -> str:
    rows = []
    for i in insts:
        report = reports.get(int(i["id"]), "")
        state = "OUTBID" if is_outbid(i) else (i.get("actual_status") or i.get("cur_state") or "?")
        if should_be_gone(report):
            state = red(f"{state}, STILL BILLING")  # it is done, yet Vast still has it: a destroy failed
        rows.append([i["id"], i.get("label"), state, i.get("gpu_name"), f"{float(i.get('dph_total') or 0):.3f}",
                     f"{float(i.get('duration') or 0) / 3600:.2f}", f"{spent(i):.2f}", report[:60] or "-"])
    return format_table(rows, ["instance", "label", "state", "gpu", "$/h", "hours", "$ so far", "last report"])


# ---- the sweep's shards on the parent run: what `watch` re-runs, even after its own restart ----------

SHARD_TAG = "pagating.shard."            # + index: the shard's latest instance (JSON, secrets left out)
RELAUNCHES_TAG = "pagating.relaunches."  # + index: how often watch re-ran the shard (cloud.max_relaunches)


def shard_record(label: str, iid: int, env: dict[str, str], *, image: str, disk: float, bid: bool,
                 gpu_name: str | None, num_gpus: int, rate: float) -> dict:
    """What it takes to rent a shard again, less its secrets (named in secret_env: watch takes their
    values from a live instance of the sweep or its own environment)."""
    secret = sorted(k for k, v in env.items() if cloud.SECRET_NAME.search(k) or mask_uri(str(v)) != str(v))
    return {"label": label, "instance": int(iid), "created": time.time(), "rate": rate, "image": image,
            "disk": disk, "bid": bid, "gpu_name": gpu_name, "num_gpus": num_gpus, "secret_env": secret,
            "env": {k: str(v) for k, v in env.items() if k not in secret}}


def record_shards(uri: str, run_id: str, records: list[dict]) -> None:
    """Tag the parent run with each shard's record (one request, retried: watch depends on it)."""
    from mlflow.entities import RunTag

    tags = [RunTag(f"{SHARD_TAG}{cloud.parse_label(r['label'])[1]}", json.dumps(r)) for r in records]
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


def shard_row(rec: dict, known_env: dict[str, str]) -> dict:
    """An instance row (as Vast lists one) for a recorded shard, its secrets from `known_env` or this
    machine's environment (those found nowhere listed in `_missing`). Its spend counts from its creation
    to now: more than it spent if it died earlier, so a relaunch never exceeds the shard's budget."""
    env, missing = dict(rec.get("env") or {}), []
    for k in rec.get("secret_env") or []:
        value = known_env.get(k) or os.environ.get(k)
        if value:
            env[k] = value
        else:
            missing.append(k)
    return {"id": int(rec["instance"]), "label": rec["label"], "extra_env": env, "is_bid": bool(rec.get("bid")),
            "disk_space": rec.get("disk"), "image_uuid": rec.get("image"), "gpu_name": rec.get("gpu_name"),
            "num_gpus": rec.get("num_gpus") or 1, "dph_total": rec.get("rate") or 0,
            "duration": max(0.0, time.time() - float(rec.get("created") or time.time())), "_missing": missing}


def find_sweep_run(uri: str, sweep_id: str, prefix: str = "pagating") -> str | None:
    """The parent run of sweep `sweep_id` (the newest), or None."""
    mlf = store.client(uri)
    exps = cost.pagating_experiments(mlf, prefix)
    runs = mlf.search_runs(exps, filter_string=f"tags.`pagating.sweep_id` = '{sweep_id}' and "
                           "tags.`pagating.role` = 'sweep'", max_results=1,
                           order_by=["attributes.start_time DESC"]) if exps else []
    return runs[0].info.run_id if runs else None


# ---- relaunch ------------------------------------------------------------------------------------

def relaunch(client: Vast, inst: dict, cfg: dict, siblings: list[dict], *, dead: bool = False,
             tracking_uri: str | None = None) -> int | None:
    """Rent `inst`'s shard again on the cheapest other offer of its kind (bid for a bid instance) with
    the budget that is left, then destroy `inst` (unless `dead`: it is gone already). Safe to repeat:
    when a live instance already carries the label (an earlier round rented it), only the destroy is
    left to do. The new instance resumes from MLflow checkpoints (the sweep's job)."""
    env, label, old = dict(_env(inst)), inst["label"], int(inst["id"])
    bid = bool(inst.get("is_bid"))
    what = "died" if dead else "was outbid"
    if any(s["label"] == label and s["id"] != old and not is_outbid(s) for s in siblings):
        if not dead:
            client.destroy(old)
            print(f"{label}: outbid instance {old} destroyed (its shard already runs elsewhere)")
        return None
    budget_left = float(env.get("PAGATING_BUDGET_USD") or 0) - spent(inst)
    if budget_left <= 0:
        if not dead:
            client.destroy(old)
        print(f"{label}: instance {old} {what}; no budget left for its shard (${budget_left:.2f})")
        raise UserError(f"no budget left for shard {env.get('PAGATING_SHARD')} (${budget_left:.2f})")
    c = cfg["cloud"]
    disk = float(inst.get("disk_space") or c["min_disk_gb"])
    machine = inst.get("machine_id")
    image = inst.get("image_uuid") or c["image"]  # Vast refuses a create without an image
    min_cuda = image_cuda(image, c["image_cuda"])
    query = offer_query(inst.get("gpu_name") or c["gpu_name"], c["min_reliability"], disk,
                        c["min_inet_down_mbps"], int(inst.get("num_gpus") or 1),
                        exclude_machines=[machine] if machine else None, min_cuda=min_cuda)
    offers = sorted((o for o in client.search_offers(query, bid, disk)
                     if o.get("machine_id") != machine and cuda_ok(o, min_cuda)), key=lambda o: hourly_rate(o, bid))
    for offer in offers:  # cheapest first; one taken meanwhile: the next
        rate = hourly_rate(offer, bid)
        env.update({"PAGATING_USD_PER_HOUR": f"{rate:.4f}", "PAGATING_BUDGET_USD": f"{budget_left:.2f}"})
        try:
            iid = client.create(offer["id"], label, exclude={old}, image=image, disk=disk,
                                env=env, onstart_cmd=cloud.bootstrap_text(), ssh=True, price=rate if bid else None)
        except OfferTaken:
            print(f"{label}: offer {offer['id']} was taken meanwhile; trying the next")
            continue
        _record_relaunch(tracking_uri, shard_record(label, iid, env, image=image, disk=disk, bid=bid, rate=rate,
                                                    gpu_name=offer.get("gpu_name"),
                                                    num_gpus=int(offer.get("num_gpus") or 1)))
        if not dead:
            client.destroy(old)
        print(f"{label}: instance {old} {what}; relaunched as {iid} on offer {offer['id']} at "
              f"${rate:.3f}/h (${budget_left:.2f} budget left)" + ("" if dead else f"; destroyed {old}"))
        return iid
    print(f"{label}: instance {old} {what} and no other offer matches now; trying again next round")
    return None


def _record_relaunch(uri: str | None, rec: dict) -> None:
    """The new instance on the parent run: its report ("created") and its shard's record."""
    parent = rec["env"].get("PAGATING_PARENT_RUN_ID")
    if not (uri and parent):
        return
    try:
        cloud.mark_created(uri, parent, rec["instance"])
        record_shards(uri, parent, [rec])
    except Exception as exc:  # rented all the same: this watch remembers it; a restarted one may not
        print(red(f"{rec['label']}: could not record instance {rec['instance']} on the parent run "
                  f"({type(exc).__name__})"))


# ---- the watcher's memory and rules ----------------------------------------------------------------

class Watcher:
    """What `watch` remembers between rounds: when it first saw an instance in a state, destroys that
    failed (retried every round), the last row of every instance (to re-run a shard whose instance is
    gone), how often each shard was relaunched (also on the parent run) and each sweep's parent run."""

    def __init__(self, timeout_s: float, grace_rounds: int = 1):
        self.timeout_s, self.grace_rounds = timeout_s, grace_rounds
        self.seen: dict[int, tuple[str | None, float]] = {}
        self.retry: set[int] = set()
        self.known: dict[int, dict] = {}
        self.relaunches: dict[str, int] = {}
        self.gave_up: dict[str, str] = {}
        self.parents: dict[str, str] = {}  # sweep id -> parent run found in MLflow (nothing of it seen on Vast)
        self.round = 0
        self.done_since: dict[int, int] = {}  # instance -> the round that first saw it report done

    def destroy_due(self, client: Vast, insts: list[dict], reports: dict[int, str], uri: str | None,
                    parent: str | None) -> set[int]:
        """Destroy instances that should be gone: reported done (whatever Vast's state), stuck past the
        timeout, or whose earlier destroy failed. Returns the ids gone."""
        now, gone = time.time(), set()
        self.round += 1
        for inst in insts:
            iid, state = int(inst["id"]), cloud.state_of(inst)
            if iid not in self.seen or self.seen[iid][0] != state:  # None is a state too (not yet provisioned)
                self.seen[iid] = (state, now)
            report = reports.get(iid)
            if should_be_gone(report):
                self.done_since.setdefault(iid, self.round)
            # A round of grace (not with --once): an instance reports done just before its own DELETE.
            why = (f"it reported '{report[:200]}' but Vast still has it {state or 'provisioning'}"
                   if should_be_gone(report) and self.done_since[iid] + self.grace_rounds <= self.round else None)
            if not why and not is_outbid(inst):  # an outbid one is relaunch's business
                why = cloud.stuck_reason(inst, now, self.timeout_s, self.seen[iid][1])
            if iid in self.retry:
                why = why or "its earlier destroy failed"
            if not why:
                continue
            try:
                client.destroy(iid)
            except (VastError, UserError) as exc:
                if iid not in self.retry:  # on the parent once: `status` shows it red while Vast lists it
                    cloud.note_instance(uri, parent, iid, f"destroy failed (vast watch): {why}; retrying")
                self.retry.add(iid)
                print(red(f"instance {iid} ({inst.get('label')}): {why}; destroy failed ({exc}), "
                          "retrying next round: it is billing"))
                continue
            self.retry.discard(iid)
            gone.add(iid)
            print(f"instance {iid} ({inst.get('label')}): {why}; destroyed it")
            cloud.note_instance(uri, parent, iid, f"{report}; destroyed by vast watch" if should_be_gone(report)
                                else f"destroyed by vast watch: {why}")
        return gone

    def shard_rows(self, sid: str, tags: dict[str, str], sweep_env: dict[str, str]) -> dict[str, dict]:
        """The newest instance of each shard of sweep `sid` by label: as this watcher last saw it live, or
        as the parent run records it (newer, or never seen: destroyed by launch, dead before this watch)."""
        rows = {}
        for _iid, row in sorted(self.known.items()):
            if cloud.parse_label(row["label"])[0] == sid:
                rows[row["label"]] = row
        for rec in shard_records(tags).values():
            row = rows.get(rec["label"])
            if row is None or int(row["id"]) < int(rec["instance"]):
                rows[rec["label"]] = shard_row(rec, sweep_env)
        return rows

    def rerun_dead_shards(self, client: Vast, sid: str, live: list[dict], tags: dict[str, str], cfg: dict,
                          uri: str, state: dict[str, str], sweep_env: dict[str, str]) -> list[int]:
        """Relaunch each shard of sweep `sid` that has no live instance and configs not FINISHED (the
        sweep's round-robin shards of the grid, in `state`'s order), at most cloud.max_relaunches times
        counting the relaunches on the parent run (a restarted watch included). Returns the new ids."""
        new, names, counts = [], list(state), relaunch_counts(tags)
        reports = cloud.reports_in(tags, include_created=True)
        for label, row in self.shard_rows(sid, tags, sweep_env).items():
            if any(i["label"] == label for i in live) or label in self.gave_up:
                continue
            shard = str(_env(row).get("PAGATING_SHARD") or "0/1")
            try:
                i, n = (int(x) for x in shard.split("/"))
            except ValueError:
                continue
            if all(state[name] == "FINISHED" for name in names[i::n]):
                continue
            done = max(self.relaunches.get(label, 0), counts.get(i, 0))
            why = (f"gave up after {done} relaunch(es); last instance {row['id']}: "
                   f"{reports.get(int(row['id'])) or 'no report'}" if done >= int(cfg["cloud"]["max_relaunches"])
                   else f"cannot relaunch it: {', '.join(row['_missing'])} not known here (no live instance of the "
                   "sweep carries it and this environment has none)" if row.get("_missing") else None)
            if why:
                self.gave_up[label] = f"shard {shard} {why}"
                print(red(f"{label}: {self.gave_up[label]}"))
                continue
            try:
                iid = relaunch(client, row, cfg, live, dead=True, tracking_uri=uri)
            except UserError as exc:
                self.gave_up[label] = f"shard {shard}: {exc}"
                continue
            except VastError as exc:
                print(f"{label}: relaunch failed: {exc}; trying again next round")
                continue
            if iid is not None:
                self.relaunches[label] = done + 1
                _count_relaunch(uri, sweep_env.get("PAGATING_PARENT_RUN_ID"), label, i, done + 1)
                new.append(iid)
        return new


def _count_relaunch(uri: str, parent: str | None, label: str, index: int, count: int) -> None:
    """The shard's relaunch count on the parent run: a restarted watch goes on from it."""
    if not parent:
        return
    try:
        store.retry(lambda: store.client(uri).set_tag(parent, f"{RELAUNCHES_TAG}{index}", str(count)),
                       "relaunch count", attempts=4)
    except Exception as exc:
        print(red(f"{label}: could not record relaunch {count} on the parent run ({type(exc).__name__}): a "
                  "restarted watch would not count it"))


def _parent_tags(uri: str | None, parent: str | None) -> dict[str, str]:
    """The parent run's tags (instances' reports, shard records, relaunch counts); {} when unreadable."""
    if not (uri and parent):
        return {}
    try:
        with cost.quick_mlflow():
            return dict(store.client(uri).get_run(parent).data.tags)
    except Exception as exc:  # the server blinked: Vast's states still count this round
        print(f"instances' reports unavailable from {mask_uri(uri)} ({type(exc).__name__})")
        return {}


# ---- one round -------------------------------------------------------------------------------------

def report_status(client: Vast, sweep_id: str | None, do_relaunch: bool, tracking_uri: str | None,
                  watcher: Watcher | None = None) -> tuple[int, list[str] | None]:
    """Print instances and progress per sweep; with a watcher, destroy what should be gone, relaunch
    outbid instances and dead shards. Returns (instances still up, one verdict line per sweep whose
    instances are all gone; None when there is no sweep at all to watch)."""
    insts = sweep_instances(client, sweep_id)
    if watcher is not None:
        watcher.known.update({int(i["id"]): i for i in insts})
    sweeps: dict[str, list[dict]] = {}
    for inst in [*insts, *(watcher.known.values() if watcher else [])]:
        sweeps.setdefault(cloud.parse_label(inst["label"])[0], [])
    for inst in insts:
        sweeps[cloud.parse_label(inst["label"])[0]].append(inst)
    if watcher is not None and sweep_id and sweep_id not in sweeps and tracking_uri:
        _find_parent(watcher, tracking_uri, sweep_id)  # nothing of it on Vast: its shards may need re-running
        if sweep_id in watcher.parents:
            sweeps[sweep_id] = []
    if not sweeps:
        print(f"no pagating instances{f' for sweep {sweep_id}' if sweep_id else ''}")
        return 0, None
    up, verdicts = 0, []
    for sid, members in sweeps.items():
        rows = members or [r for r in watcher.known.values() if cloud.parse_label(r["label"])[0] == sid]
        env: dict = {}
        for row in rows:  # the sweep's settings (URI, parent, profile), from whichever instance has them
            for k, v in _env(row).items():
                env.setdefault(k, v)
        if watcher is not None and sid in watcher.parents:
            env.setdefault("PAGATING_PARENT_RUN_ID", watcher.parents[sid])
        live, verdict = _sweep_round(client, sid, members, env, do_relaunch, tracking_uri, watcher)
        up += live
        if verdict:
            verdicts.append(verdict)
    return up, verdicts


def _find_parent(watcher: Watcher, uri: str, sid: str) -> None:
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


def _sweep_round(client: Vast, sid: str, members: list[dict], env: dict, do_relaunch: bool,
                 tracking_uri: str | None, watcher: Watcher | None) -> tuple[int, str | None]:
    uri, parent = tracking_uri or env.get("MLFLOW_TRACKING_URI"), env.get("PAGATING_PARENT_RUN_ID")
    tags = _parent_tags(uri, parent)
    reports = cloud.reports_in(tags, include_created=True)
    for rec in shard_records(tags).values():  # the profile of a sweep with nothing left on Vast
        for k, v in rec.get("env", {}).items():
            env.setdefault(k, v)
    if members:
        print(instances_table(members, reports))
        budget = sum(float(_env(i).get("PAGATING_BUDGET_USD") or 0) for i in members)
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
        prog = cloud.sweep_progress(uri, sid, cfg)
        state = cloud.grid_state(uri, sid, cfg) if watcher is not None else None
    except Exception as exc:  # progress is a nicety; the instance table above is what matters
        print(f"sweep {sid}: progress unavailable from {mask_uri(uri)} ({type(exc).__name__})")
        return len(members), (f"sweep {sid}: all instances are gone; could not read its grid from "
                              f"{mask_uri(uri)}" if not members else None)
    gpu = (members[0].get("gpu_name") if members else None) or cfg["cloud"]["gpu_name"]
    parallel = sum(int(i.get("num_gpus") or 1) for i in members if not is_outbid(i))
    print(cloud.progress_line(sid, prog, cost.estimated_step_time(cfg, gpu), parallel))
    for link in prog.get("links", []):
        print(f"sweep {sid}: {link}")
    if watcher is None:
        _print_parent(uri, parent, sid)
        return len(members), None
    if cloud.missing_configs(state):
        members += [{"id": i, "label": "new"} for i in watcher.rerun_dead_shards(client, sid, members, tags,
                                                                                 cfg, uri, state, env)]
    return len(members), _settle(uri, parent, sid, state, bool(members), watcher)


def _relaunch_outbid(client: Vast, sid: str, members: list[dict], cfg: dict, do_relaunch: bool,
                     uri: str | None) -> None:
    if not do_relaunch:
        if any(is_outbid(i) for i in members):
            print(f"sweep {sid}: outbid instance(s): `pagating vast watch --sweep {sid}` destroys and relaunches them")
        return
    for inst in members:
        if is_outbid(inst):
            try:
                relaunch(client, inst, cfg, members, tracking_uri=uri)
            except (VastError, UserError) as exc:  # the next round tries again
                print(f"{inst['label']}: relaunch failed: {exc}")


def _print_parent(uri: str, parent: str | None, sid: str) -> None:
    """The parent run's status and why, as the instances and `watch` last set it."""
    if not parent:
        return
    try:
        run = cloud.tracking.client(uri).get_run(parent)
    except Exception as exc:
        print(f"sweep {sid}: parent run unavailable ({type(exc).__name__})")
        return
    why = run.data.tags.get(cloud.REASON_TAG)
    line = f"sweep {sid}: parent run {run.info.status}" + (f" ({why})" if why else "")
    print(red(line) if run.info.status == "FAILED" else line)


def _settle(uri: str, parent: str | None, sid: str, state: dict[str, str], working: bool,
            watcher: Watcher) -> str | None:
    """The parent run's truth this round; the verdict once nothing of the sweep is left running."""
    why = "; ".join(v for k, v in watcher.gave_up.items() if cloud.parse_label(k)[0] == sid) or None
    if parent:
        try:
            cloud.settle_parent(uri, parent, state, working, why)
        except Exception as exc:
            print(f"sweep {sid}: could not set the parent run's status ({type(exc).__name__})")
    if working:
        return None
    missing = cloud.missing_configs(state)
    if not missing:
        return f"sweep {sid}: done: every config of the grid FINISHED ({len(state)}/{len(state)})"
    return red(f"sweep {sid}: NOT done: configs missing: {', '.join(missing)}" + (f"; {why}" if why else ""))


# ---- the verbs -------------------------------------------------------------------------------------

@_guard
def cmd_status(args) -> int:
    uri = _tracking_uri(args)
    client = Vast(require_key())
    report_status(client, args.sweep, args.relaunch, uri)
    return 0


def _tracking_uri(args) -> str | None:
    """--tracking-uri or MLFLOW_TRACKING_URI, refused (exit 2) with user:password@ in it, as train/sweep do."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        store.check_no_credentials(uri)
    return uri


@_guard
def cmd_watch(args) -> int:
    uri = _tracking_uri(args)
    client = Vast(require_key())
    timeout = args.start_timeout if args.start_timeout is not None else defaults("cloud")["start_timeout_min"]
    watcher = Watcher(timeout * 60, grace_rounds=0 if args.once else 1)
    while True:
        print(time.strftime("-- %H:%M:%S"))
        try:
            left, verdicts = report_status(client, args.sweep, True, uri, watcher)
        except VastError as exc:  # Vast unreachable for a while: keep watching
            print(f"round failed: {exc}")
            left, verdicts = -1, []
        if left == 0 and verdicts is None:
            return 0  # nothing of ours on Vast, nothing seen: nothing to watch
        if left == 0:
            for line in verdicts:
                print(line)
            done = bool(verdicts) and all(": done:" in line for line in verdicts)
            print("all instances are gone" + (": `pagating report` builds the report from MLflow" if done else ""))
            return 0 if done else 1
        if args.once:
            return 0 if left > 0 else 1
        time.sleep(args.interval)
