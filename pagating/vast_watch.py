"""`pagating vast status` and `pagating vast watch`: what runs, what each instance last reported on the
sweep's parent run, and (watch) closing every loop: destroy any instance that should be gone (it
reported failed, finished or killed, whatever Vast's state; or sits loading/exited/offline past the
start timeout), retry a destroy that failed, relaunch an outbid bid instance, re-run a shard whose
instance died before its configs finished (at most `cloud.max_relaunches` times, within the shard's
remaining budget, resuming from MLflow checkpoints), and set the parent run to the truth once the last
instance is gone. Run it unattended beside the tracking server (docs/vast.md): it is what catches a box
that cannot destroy itself.
"""

from __future__ import annotations

import os
import sys
import time

from pagating import cloud, tracking, vast_cost
from pagating.cloud import format_table
from pagating.config import UserError, defaults
from pagating.tracking import mask_uri
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


def _env(inst: dict) -> dict:
    """The instance's env as launch meant it (values split over several Vast entries joined)."""
    env = inst.get("extra_env") or {}
    return cloud.join_env(env if isinstance(env, dict) else {k: v for k, v in env})


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
        if tracking_uri and env.get("PAGATING_PARENT_RUN_ID"):
            cloud.mark_created(tracking_uri, env["PAGATING_PARENT_RUN_ID"], iid)
        if not dead:
            client.destroy(old)
        print(f"{label}: instance {old} {what}; relaunched as {iid} on offer {offer['id']} at "
              f"${rate:.3f}/h (${budget_left:.2f} budget left)" + ("" if dead else f"; destroyed {old}"))
        return iid
    print(f"{label}: instance {old} {what} and no other offer matches now; trying again next round")
    return None


# ---- the watcher's memory and rules ----------------------------------------------------------------

class Watcher:
    """What `watch` remembers between rounds: when it first saw an instance in a state, destroys that
    failed (retried every round), the last row of every instance (to re-run a shard whose instance is
    gone) and how often each shard was relaunched."""

    def __init__(self, timeout_s: float, grace_rounds: int = 1):
        self.timeout_s, self.grace_rounds = timeout_s, grace_rounds
        self.seen: dict[int, tuple[str | None, float]] = {}
        self.retry: set[int] = set()
        self.known: dict[int, dict] = {}
        self.relaunches: dict[str, int] = {}
        self.gave_up: dict[str, str] = {}
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
                self.retry.add(iid)
                print(red(f"instance {iid} ({inst.get('label')}): {why}; destroy failed ({exc}), "
                          "retrying next round: it is billing"))
                continue
            self.retry.discard(iid)
            gone.add(iid)
            print(f"instance {iid} ({inst.get('label')}): {why}; destroyed it")
            if uri and parent:
                _note(uri, parent, iid, f"{report}; destroyed by vast watch" if should_be_gone(report)
                      else f"destroyed by vast watch: {why}")
        return gone

    def rerun_dead_shards(self, client: Vast, sid: str, live: list[dict], reports: dict[int, str], cfg: dict,
                          uri: str, state: dict[str, str]) -> list[int]:
        """Relaunch each shard of sweep `sid` that has no live instance and configs not FINISHED (the
        sweep's round-robin shards of the grid, in `state`'s order). Returns the new ids."""
        new, names = [], list(state)
        labels = {}
        for _iid, row in sorted(self.known.items()):
            if cloud.parse_label(row["label"])[0] == sid:
                labels[row["label"]] = row  # the newest instance of each shard
        for label, row in labels.items():
            if any(i["label"] == label for i in live) or label in self.gave_up:
                continue
            try:
                i, n = (int(x) for x in str(_env(row).get("PAGATING_SHARD") or "0/1").split("/"))
            except ValueError:
                continue
            if all(state[name] == "FINISHED" for name in names[i::n]):
                continue
            n = self.relaunches.get(label, 0)
            if n >= int(cfg["cloud"]["max_relaunches"]):  # the sweep's profile (params.yaml)
                self.gave_up[label] = (f"shard {_env(row).get('PAGATING_SHARD')} gave up after {n} relaunch(es); "
                                       f"last instance {row['id']}: {reports.get(int(row['id'])) or 'no report'}")
                print(red(f"{label}: {self.gave_up[label]}"))
                continue
            try:
                iid = relaunch(client, row, cfg, live, dead=True, tracking_uri=uri)
            except UserError as exc:
                self.gave_up[label] = f"shard {_env(row).get('PAGATING_SHARD')}: {exc}"
                continue
            except VastError as exc:
                print(f"{label}: relaunch failed: {exc}; trying again next round")
                continue
            if iid is not None:
                self.relaunches[label] = n + 1
                new.append(iid)
        return new


def _note(uri: str, parent: str, iid: int, text: str) -> None:
    try:
        cloud.tracking.client(uri).set_tag(parent, f"{cloud.REPORT_TAG}{iid}", text[:4000])
    except Exception as exc:  # the destroy is what matters; the note is for the record
        print(f"could not note instance {iid} on the parent run ({type(exc).__name__})")


def _reports(uri: str | None, parent: str | None) -> dict[int, str]:
    if not (uri and parent):
        return {}
    try:
        with vast_cost.quick_mlflow():
            return cloud.instance_reports(uri, parent, include_created=True)
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
        live, verdict = _sweep_round(client, sid, members, env, do_relaunch, tracking_uri, watcher)
        up += live
        if verdict:
            verdicts.append(verdict)
    return up, verdicts


def _sweep_round(client: Vast, sid: str, members: list[dict], env: dict, do_relaunch: bool,
                 tracking_uri: str | None, watcher: Watcher | None) -> tuple[int, str | None]:
    uri, parent = tracking_uri or env.get("MLFLOW_TRACKING_URI"), env.get("PAGATING_PARENT_RUN_ID")
    reports = _reports(uri, parent)
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
    if do_relaunch:
        for inst in members:
            if is_outbid(inst):
                try:
                    relaunch(client, inst, cfg, members, tracking_uri=uri)
                except (VastError, UserError) as exc:  # the next round tries again
                    print(f"{inst['label']}: relaunch failed: {exc}")
    elif any(is_outbid(i) for i in members):
        print(f"sweep {sid}: outbid instance(s): `pagating vast watch --sweep {sid}` destroys and relaunches them")
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
    print(cloud.progress_line(sid, prog, vast_cost.estimated_step_time(cfg, gpu), parallel))
    for link in prog.get("links", []):
        print(f"sweep {sid}: {link}")
    if watcher is None:
        _print_parent(uri, parent, sid)
        return len(members), None
    if cloud.missing_configs(state):
        members += [{"id": i, "label": "new"} for i in watcher.rerun_dead_shards(client, sid, members, reports,
                                                                                 cfg, uri, state)]
    return len(members), _settle(uri, parent, sid, state, bool(members), watcher)


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
        tracking.check_no_credentials(uri)
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
