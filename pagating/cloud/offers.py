"""Offers for any provider: the profile and cloud flags a cloud verb runs with, the offer filter, each
offer's projected cost for the whole sweep (pagating.cost's projection at the provider's hourly rate), the
ranking, and the launch plan within the budget.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from pagating import cost
from pagating.cloud import provider
from pagating.cloud.env import tracking_uri_for_lookup
from pagating.cloud.provider import OfferFilter, Provider
from pagating.cloud.show import format_table
from pagating.config import UserError, load_config, overrides_from_args

DEFAULT_PROFILE = "wikitext103"  # the GPU runs the real thing; --profile overrides


def load_profile(profile: str | None) -> dict[str, Any]:
    return load_config(profile or DEFAULT_PROFILE)


def config_for(args) -> dict[str, Any]:
    """The profile with this command's cloud flags and `--set`s applied. The instance runs the committed
    params.yaml, so only `cloud` (what to rent, how much to spend) may be changed from here."""
    overrides = overrides_from_args(args)
    other = sorted(k for k in overrides if not k.startswith("cloud."))
    if other:
        raise UserError(f"--set {other[0]}: the instance runs the committed params.yaml, so `{args.provider}` takes "
                        "cloud.* settings only; commit the change to params.yaml and launch that commit")
    return load_config(args.profile or DEFAULT_PROFILE, overrides)


def fill_cloud_defaults(args, cfg: dict) -> None:
    """The cloud settings onto `args` (the cloud flags of pagating/config.py are already applied to cfg)."""
    c = cfg["cloud"]
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
    if args.instances > cost.grid_size(cfg):
        raise UserError(f"--instances {args.instances} is more than the {cost.grid_size(cfg)} configs "
                        "of the grid: use fewer instances")


def image_cuda(image: str, fallback: float | None) -> float | None:
    """The CUDA version an image needs from the host driver: from its tag (pytorch/pytorch:2.6.0-
    cuda12.4-cudnn9-runtime -> 12.4), else `fallback` (--image-cuda, params cloud.image_cuda)."""
    m = re.search(r"cuda[-_]?(\d+)\.(\d+)", image or "", re.I)
    return float(f"{m.group(1)}.{m.group(2)}") if m else fallback


def cuda_ok(offer: dict, min_cuda: float | None) -> bool:
    """Checked here too: the search filter is the provider's business, a CPU-only sweep is ours."""
    return not min_cuda or float(offer.get("cuda") or 0) >= min_cuda


def search(client: Provider, want: OfferFilter) -> list[dict]:
    """The provider's offers for `want` whose host can run the image's CUDA."""
    return [o for o in client.search_offers(want) if cuda_ok(o, want.min_cuda)]


def rank_offers(client: Provider, args, cfg: dict) -> tuple[list[dict], str | None]:
    """Search offers and annotate each with rate, s/step, hours and projected cost for the whole sweep
    (all instances at that offer's price), cheapest first."""
    disk = max(args.disk or 0, args.min_disk_gb)
    want = OfferFilter(args.gpu_name, args.min_reliability, disk, args.min_inet_down, args.num_gpus,
                       args.interruptible, min_cuda=image_cuda(args.image, args.image_cuda))
    offers = search(client, want)
    uri = tracking_uri_for_lookup(args) or cfg["tracking"]["tracking_uri"]
    times, note = cost.step_times(cfg, [o.get("gpu_name", "") for o in offers], uri, args.s_per_step)
    sizes = cost.shard_sizes(cost.grid_size(cfg), args.instances)
    for o in offers:
        st = times[o.get("gpu_name", "")]
        gpus = int(o.get("num_gpus") or 1)
        o["_rate"] = client.hourly_rate(o, args.interruptible, getattr(args, "bid", None))
        o["_s_per_step"], o["_source"] = st.seconds, st.source
        o["_hours"] = [cost.instance_hours(cfg, n, gpus, st.seconds) for n in sizes]
        o["_cost"] = o["_rate"] * sum(o["_hours"])
    offers.sort(key=lambda o: (o["_cost"], o["_rate"]))
    return offers, note


def offers_table(offers: list[dict], budget: float | None = None) -> str:
    rows = []
    for o in offers:
        over = " >budget" if budget is not None and o["_cost"] > budget else ""
        rows.append([o["id"], o.get("gpu_name") or "?", o.get("num_gpus") or 1, f"{o['_rate']:.3f}",
                     f"{float(o.get('reliability') or 0):.3f}", f"{float(o.get('inet_down') or 0):.0f}",
                     f"{float(o.get('disk_gb') or 0):.0f}", f"{float(o.get('cuda') or 0):.1f}",
                     str(o.get("where") or "?")[:18], f"{o['_s_per_step']:.4f}", o["_source"],
                     f"{sum(o['_hours']):.1f}", f"{o['_cost']:.2f}{over}"])
    return format_table(rows, ["offer", "gpu", "n", "$/h", "reliab", "down Mb/s", "disk GB", "cuda", "where",
                               "s/step", "s/step from", "hours", "$ sweep"])


def plan_launch(instances: int, budget: float, cfg: dict, offers: list[dict]) -> list[dict]:
    """Pair shard i with the i-th cheapest offer (offers carry _rate and _hours per shard);
    refuse when the total exceeds the budget."""
    if len(offers) < instances:
        raise UserError(f"only {len(offers)} offer(s) match the filters for {instances} instance(s): "
                        "relax the filters or use fewer --instances")
    sizes = cost.shard_sizes(cost.grid_size(cfg), instances)
    by_instance_cost = sorted(offers, key=lambda o: (o["_rate"] * o["_hours"][0], o["_rate"]))
    plan = []
    for i, offer in enumerate(by_instance_cost[:instances]):
        hours = offer["_hours"][i]
        plan.append({"index": i, "offer": offer, "configs": sizes[i], "hours": hours,
                     "rate": offer["_rate"], "cost": offer["_rate"] * hours})
    total = sum(p["cost"] for p in plan)
    if total > budget:
        hours = sum(p["hours"] for p in plan)
        raise UserError(f"projected cost ${total:.2f} is over the budget ${budget:.2f} (cheapest "
                        f"offers, {hours:.1f} instance-hours): raise --budget, shrink the grid or steps, "
                        "or try --interruptible")
    return plan


def cmd_offers(args) -> int:
    client = provider.client(args.provider, need_key=False)  # searching needs no account
    cfg = config_for(args)
    fill_cloud_defaults(args, cfg)
    offers, note = rank_offers(client, args, cfg)
    if note:
        print(f"note: {note}", file=sys.stderr)
    n, steps = cost.grid_size(cfg), cfg["train"]["max_steps"]
    print(f"profile {cfg['profile']}: {n} configs x {steps} steps over {args.instances} instance(s); "
          f"{'bid' if args.interruptible else 'on-demand'} offers, cheapest projected sweep first")
    if not offers:
        print("no offers match: relax the filters (--gpu-name, --min-reliability, --min-disk-gb, "
              "--min-inet-down; hosts whose driver runs the image's CUDA)")
        return 1
    print(offers_table(offers[:args.limit], args.budget))
    return 0
