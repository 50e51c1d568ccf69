"""`pagating <provider> watch`: status in a loop that closes every loop: destroy any instance that should be
gone (it reported failed, finished or killed, whatever the provider's state; or runs nothing past the start
timeout), retry a destroy that failed, relaunch an outbid bid instance, re-run a shard whose instance died
before its configs finished (at most `cloud.max_relaunches` times, within the shard's remaining budget,
resuming from MLflow checkpoints), and set the parent run to the truth once the last instance is gone. Run
it unattended beside the tracking server (docs/vast.md): it is what catches a box that cannot destroy
itself. What it must not forget across a restart (each shard's latest instance, how often it was
relaunched) is on the parent run, so `--sweep ID` also re-runs shards that died before this watch started.
"""

from __future__ import annotations

import time

from pagating.cloud import provider
from pagating.cloud.env import parse_label, tracking_uri_for_lookup
from pagating.cloud.instances import should_be_gone, stuck_reason
from pagating.cloud.provider import Provider, ProviderError
from pagating.cloud.relaunch import relaunch, shard_row
from pagating.cloud.show import red
from pagating.cloud.status import report_status
from pagating.cloud.sweep_run import RELAUNCHES_TAG, note_instance, relaunch_counts, reports_in, shard_records
from pagating.config import UserError, defaults
from pagating.grid import parse_shard, take_shard
from pagating.tracking import store


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
        self.parents: dict[str, str] = {}  # sweep id -> parent run found in MLflow (none of its instances seen)
        self.round = 0
        self.done_since: dict[int, int] = {}  # instance -> the round that first saw it report done

    def destroy_due(self, client: Provider, insts: list[dict], reports: dict[int, str], uri: str | None,
                    parent: str | None) -> set[int]:
        """Destroy instances that should be gone: reported done (whatever the provider's state), stuck past the
        timeout, or whose earlier destroy failed. Returns the ids gone."""
        now, gone = time.time(), set()
        self.round += 1
        for inst in insts:
            iid, state = int(inst["id"]), inst.get("status")
            if iid not in self.seen or self.seen[iid][0] != state:  # None is a state too (not yet provisioned)
                self.seen[iid] = (state, now)
            report = reports.get(iid)
            if should_be_gone(report):
                self.done_since.setdefault(iid, self.round)
            # A round of grace (not with --once): an instance reports done just before its own DELETE.
            why = (f"it reported '{report[:200]}' but {client.name} still has it {state or 'provisioning'}"
                   if should_be_gone(report) and self.done_since[iid] + self.grace_rounds <= self.round else None)
            if not why and not inst.get("outbid"):  # an outbid one is relaunch's business
                why = stuck_reason(inst, now, self.timeout_s, self.seen[iid][1])
            if iid in self.retry:
                why = why or "its earlier destroy failed"
            if not why:
                continue
            try:
                client.destroy(iid)
            except (ProviderError, UserError) as exc:
                if iid not in self.retry:  # on the parent once: `status` shows it red while listed
                    note_instance(uri, parent, iid, f"destroy failed ({client.name} watch): {why}; retrying")
                self.retry.add(iid)
                print(red(f"instance {iid} ({inst.get('label')}): {why}; destroy failed ({exc}), "
                          "retrying next round: it is billing"))
                continue
            self.retry.discard(iid)
            gone.add(iid)
            print(f"instance {iid} ({inst.get('label')}): {why}; destroyed it")
            note_instance(uri, parent, iid, f"{report}; destroyed by {client.name} watch" if should_be_gone(report)
                          else f"destroyed by {client.name} watch: {why}")
        return gone

    def shard_rows(self, sid: str, tags: dict[str, str], sweep_env: dict[str, str]) -> dict[str, dict]:
        """The newest instance of each shard of sweep `sid` by label: as this watcher last saw it live, or
        as the parent run records it (newer, or never seen: destroyed by launch, dead before this watch)."""
        rows = {}
        for _iid, row in sorted(self.known.items()):
            if parse_label(row["label"])[0] == sid:
                rows[row["label"]] = row
        for rec in shard_records(tags).values():
            row = rows.get(rec["label"])
            if row is None or int(row["id"]) < int(rec["instance"]):
                rows[rec["label"]] = shard_row(rec, sweep_env)
        return rows

    def rerun_dead_shards(self, client: Provider, sid: str, live: list[dict], tags: dict[str, str], cfg: dict,
                          uri: str, state: dict[str, str], sweep_env: dict[str, str]) -> list[int]:
        """Relaunch each shard of sweep `sid` that has no live instance and configs not FINISHED (the
        sweep's round-robin shards of the grid, in `state`'s order), at most cloud.max_relaunches times
        counting the relaunches on the parent run (a restarted watch included). Returns the new ids."""
        new, config_names, counts = [], list(state), relaunch_counts(tags)
        reports = reports_in(tags, include_created=True)
        for label, row in self.shard_rows(sid, tags, sweep_env).items():
            if any(i["label"] == label for i in live) or label in self.gave_up:
                continue
            shard = str(row["env"].get("PAGATING_SHARD") or "0/1")
            try:
                i, n = parse_shard(shard)
            except UserError:
                continue
            if all(state[name] == "FINISHED" for name in take_shard(config_names, i, n)):
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
            except ProviderError as exc:
                print(f"{label}: relaunch failed: {exc}; trying again next round")
                continue
            if iid is not None:
                self.relaunches[label] = done + 1
                count_relaunch(uri, sweep_env.get("PAGATING_PARENT_RUN_ID"), label, i, done + 1)
                new.append(iid)
        return new


def count_relaunch(uri: str, parent: str | None, label: str, index: int, count: int) -> None:
    """The shard's relaunch count on the parent run: a restarted watch goes on from it."""
    if not parent:
        return
    try:
        store.retry(lambda: store.client(uri).set_tag(parent, f"{RELAUNCHES_TAG}{index}", str(count)),
                       "relaunch count", attempts=4)
    except Exception as exc:
        print(red(f"{label}: could not record relaunch {count} on the parent run ({type(exc).__name__}): a "
                  "restarted watch would not count it"))


def cmd_watch(args) -> int:
    uri = tracking_uri_for_lookup(args)
    client = provider.client(args.provider)
    timeout = args.start_timeout if args.start_timeout is not None else defaults("cloud")["start_timeout_min"]
    watcher = Watcher(timeout * 60, grace_rounds=0 if args.once else 1)
    while True:
        print(time.strftime("-- %H:%M:%S"))
        try:
            left, verdicts = report_status(client, args.sweep, True, uri, watcher)
        except ProviderError as exc:  # the provider unreachable for a while: keep watching
            print(f"round failed: {exc}")
            left, verdicts = -1, []
        if left == 0 and verdicts is None:
            return 0  # nothing of ours at the provider, nothing seen: nothing to watch
        if left == 0:
            for line in verdicts:
                print(line)
            done = bool(verdicts) and all(": done:" in line for line in verdicts)
            print("all instances are gone" + (": `pagating report` builds the report from MLflow" if done else ""))
            return 0 if done else 1
        if args.once:
            return 0 if left > 0 else 1
        time.sleep(args.interval)
