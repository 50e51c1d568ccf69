"""The instances of pagating's sweeps at any provider: listing them (by label), what they spent, when one
must go (it reported done, or runs nothing past the start timeout), destroying them with a note on the
sweep's parent run, and the `logs` and `destroy` verbs.
"""

from __future__ import annotations

import sys

from pagating import cost
from pagating.cloud import provider
from pagating.cloud.env import parse_label, tracking_uri_for_lookup
from pagating.cloud.provider import DOWN, STARTING, Provider
from pagating.cloud.sweep_run import DONE_STATES, instance_log, note_instance
from pagating.config import UserError


def sweep_instances(client: Provider, sweep_id: str | None = None) -> list[dict]:
    """The provider's instances labelled as a sweep's (of `sweep_id` when given), by sweep and shard."""
    out = []
    for inst in client.instances():
        parsed = parse_label(inst.get("label"))
        if parsed and (sweep_id is None or parsed[0] == sweep_id):
            out.append(inst)
    return sorted(out, key=lambda i: (parse_label(i["label"]), i["id"]))


def spent(inst: dict) -> float:
    return float(inst.get("hours") or 0) * float(inst.get("rate") or 0)


def should_be_gone(report: str | None) -> bool:
    return bool(report) and report.startswith(DONE_STATES)


def stuck_reason(inst: dict, now: float, timeout_s: float, seen_since: float | None = None) -> str | None:
    """Why an instance that runs nothing of ours must go now, or None: it sat `timeout_s` in a
    state where nothing runs (starting since its start; down since `seen_since`, the first time a
    watcher saw it so)."""
    if inst.get("state") not in (STARTING, DOWN):
        return None
    started = float(inst.get("started") or now)
    since = started if inst["state"] == STARTING else (seen_since or now)
    if now - since < timeout_s:
        return None
    msg = (inst.get("status_msg") or "").strip().replace("\n", " ")[:200]
    return f"{inst.get('status') or 'provisioning'} for {(now - since) / 60:.0f} min" + (f" ({msg})" if msg else "")


def noter(uri: str | None, parent: str | None, who: str, why):
    """destroy_all's `note`: each attempt on the parent run ("destroyed by launch: <why>", or "destroy
    failed (launch): ..."), so no instance counts as still working once it is gone, and one the provider
    still lists after a failed destroy shows red in `status`. `why` is a text, or {id: text}."""
    def note(iid: int, ok: bool) -> None:
        text = why.get(iid, "") if isinstance(why, dict) else why
        note_instance(uri, parent, iid, f"{f'destroyed by {who}' if ok else f'destroy failed ({who})'}: {text}")
    return note


def destroy_all(client: Provider, ids: list[int], note=None) -> list[int]:
    """Destroy each id, carrying on past failures; returns the ids left billing. `note(id, destroyed)`
    records each attempt (on the sweep's parent run: see noter)."""
    left = []
    for iid in ids:
        try:
            client.destroy(iid)
            print(f"destroyed instance {iid}", file=sys.stderr)
        except Exception as exc:
            left.append(iid)
            print(f"could not destroy instance {iid} ({exc}): run `pagating {client.name} destroy {iid}`",
                  file=sys.stderr)
        if note is not None:
            note(iid, iid not in left)
    return left


def cmd_logs(args) -> int:
    uri = tracking_uri_for_lookup(args)
    client = provider.client(args.provider)
    if client.instance(int(args.instance)) is not None:  # alive: the provider's own copy of its output
        print(client.logs(int(args.instance), args.tail))
        return 0
    if not uri:
        raise UserError(f"instance {args.instance} is gone; its log is on the sweep's run in MLflow: set "
                        "MLFLOW_TRACKING_URI or pass --tracking-uri")
    with cost.quick_mlflow():
        text = instance_log(uri, int(args.instance))
    lines = text.splitlines()
    print("\n".join(lines[-args.tail:] if args.tail else lines))
    return 0


def cmd_destroy(args) -> int:
    if not (args.ids or args.sweep or args.all):
        raise UserError("say what to destroy: instance ids, --sweep ID, or --all (every pagating-* instance)")
    client = provider.client(args.provider)
    ids = [int(i) for i in args.ids]
    rows = {int(i["id"]): i for i in sweep_instances(client)}  # pagating's: their env names their sweep run
    if args.sweep or args.all:
        ids += [iid for iid, i in rows.items() if args.sweep is None or parse_label(i["label"])[0] == args.sweep]
    if not ids:
        print("nothing to destroy")
        return 0

    def note(iid: int, ok: bool) -> None:  # on the instance's sweep run, when it has one
        env = rows.get(iid, {}).get("env") or {}
        noter(env.get("MLFLOW_TRACKING_URI"), env.get("PAGATING_PARENT_RUN_ID"), f"{client.name} destroy",
              "by hand")(iid, ok)
    return 1 if destroy_all(client, sorted(set(ids)), note) else 0
