"""Renting a shard again, for any provider: an outbid instance's, or a dead one's that the parent run
records (`watch`), on the cheapest other offer of its kind within the shard's remaining budget.
"""

from __future__ import annotations

import os
import time

from pagating.cloud import env as cloud_env
from pagating.cloud.instances import spent
from pagating.cloud.offers import image_cuda, search
from pagating.cloud.provider import OfferFilter, OfferTaken, Provider
from pagating.cloud.show import red
from pagating.cloud.sweep_run import mark_created, record_shards, shard_record
from pagating.config import UserError


def shard_row(rec: dict, known_env: dict[str, str]) -> dict:
    """An instance row for a recorded shard, its secrets from `known_env` or this machine's environment
    (those found nowhere listed in `_missing`). Its spend counts from its creation to now: more than it
    spent if it died earlier, so a relaunch never exceeds the shard's budget."""
    env, missing = dict(rec.get("env") or {}), []
    for k in rec.get("secret_env") or []:
        value = known_env.get(k) or os.environ.get(k)
        if value:
            env[k] = value
        else:
            missing.append(k)
    return {"id": int(rec["instance"]), "label": rec["label"], "env": env, "bid": bool(rec.get("bid")),
            "disk_gb": rec.get("disk"), "image": rec.get("image"), "gpu_name": rec.get("gpu_name"),
            "num_gpus": rec.get("num_gpus") or 1, "rate": rec.get("rate") or 0,
            "hours": max(0.0, time.time() - float(rec.get("created") or time.time())) / 3600, "_missing": missing}


def _offers_like(client: Provider, inst: dict, cfg: dict, image: str, disk: float) -> list[dict]:
    """Offers of `inst`'s kind (GPU, count, bid) on other machines, cheapest first."""
    c, machine = cfg["cloud"], inst.get("machine")
    want = OfferFilter(inst.get("gpu_name") or c["gpu_name"], c["min_reliability"], disk, c["min_inet_down_mbps"],
                       int(inst.get("num_gpus") or 1), inst["bid"], min_cuda=image_cuda(image, c["image_cuda"]),
                       exclude_machines=(machine,) if machine else ())
    offers = [o for o in search(client, want) if o.get("machine") != machine]
    return sorted(offers, key=lambda o: client.hourly_rate(o, inst["bid"]))


def relaunch(client: Provider, inst: dict, cfg: dict, siblings: list[dict], *, dead: bool = False,
             tracking_uri: str | None = None) -> int | None:
    """Rent `inst`'s shard again on the cheapest other offer of its kind (bid for a bid instance) with
    the budget that is left, then destroy `inst` (unless `dead`: it is gone already). Safe to repeat:
    when a live instance already carries the label (an earlier round rented it), only the destroy is
    left to do. The new instance resumes from MLflow checkpoints (the sweep's job)."""
    env, label, old, bid = dict(inst.get("env") or {}), inst["label"], int(inst["id"]), bool(inst.get("bid"))
    what = "died" if dead else "was outbid"
    if any(s["label"] == label and s["id"] != old and not s.get("outbid") for s in siblings):
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
    disk = float(inst.get("disk_gb") or cfg["cloud"]["min_disk_gb"])
    image = inst.get("image") or cfg["cloud"]["image"]  # a create needs an image
    for offer in _offers_like(client, {**inst, "bid": bid}, cfg, image, disk):  # one taken meanwhile: the next
        rate = client.hourly_rate(offer, bid)
        env.update({"PAGATING_USD_PER_HOUR": f"{rate:.4f}", "PAGATING_BUDGET_USD": f"{budget_left:.2f}"})
        try:
            iid = cloud_env.create(client, offer, label, image=image, disk_gb=disk, env=env,
                                   price=rate if bid else None, exclude={old})
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
        mark_created(uri, parent, rec["instance"])
        record_shards(uri, parent, [rec])
    except Exception as exc:  # rented all the same: this watch remembers it; a restarted one may not
        print(red(f"{rec['label']}: could not record instance {rec['instance']} on the parent run "
                  f"({type(exc).__name__})"))
