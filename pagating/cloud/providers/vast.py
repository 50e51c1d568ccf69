"""The Vast.ai provider: the `vastai` SDK behind `pagating.cloud.provider.Provider`, with one retry policy,
Vast's offer query, its rows mapped to the neutral offer and instance rows (state, outbid), bidding, and
its request limits. Everything else `pagating vast ...` does is the shared flows of pagating/cloud/.

Every Vast call goes through the real `vastai` SDK (`VAST_SERVER_URL` points it elsewhere, e.g. at the
tests' fake API). The instance destroys itself through Vast's API (pagating/cloud/watchdog.py).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from pagating.cloud.env import join_env
from pagating.cloud.provider import (
    DOWN,
    STARTING,
    UP,
    InstanceGone,
    OfferFilter,
    OfferTaken,
    ProviderError,
    RequestLimits,
)
from pagating.config import UserError
from pagating.tracking.store import retry

OFFER_SEARCH_LIMIT = 64
# A bid this much above the offer's current minimum, so the first small counter-bid does not stop it.
BID_MARGIN = 1.10
# The SDK retries 429/502/503/504 itself but only for ~0.4 s and never a 500; we retry every
# 429/5xx and connection error here with tracking.retry (the SDK's own retry is turned off: one policy).
# Vast sends no Retry-After on 429 (docs: rate limits and errors), so the backoff is ours.
RETRY_ATTEMPTS = 5
RETRY_BACKOFF_S = 2.0
RETRY_AFTER_CAP_S = 60.0
# Vast's create-instance spec (x-input-validation of PUT /api/v0/asks/{id}/).
LIMITS = RequestLimits(startup_chars=4096, env_entry_chars=256, env_total_chars=32768,
                       label_chars=256, image_chars=1024)
# Seconds between instance polls while launch waits (Vast rate-limits ~4.5 requests/s per endpoint).
POLL_S = float(os.environ.get("PAGATING_VAST_POLL_S") or 15)
# actual_status values: nothing of ours runs yet / any more (an instance stuck so past the timeout goes).
STARTING_STATES = (None, "", "created", "loading")
DOWN_STATES = ("exited", "offline", "unknown")


class VastError(ProviderError):
    """Vast.ai failed us (not the user's doing): one line, exit 1."""


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
    """The Vast.ai provider (pagating.cloud.provider.Provider): the `vastai` SDK with one retry policy
    (backoff on 429/5xx/connection errors) around it."""

    name = "vast"
    limits = LIMITS
    never_sent = ("VAST_API_KEY", "CONTAINER_ID", "CONTAINER_API_KEY")  # the instance gets its own key
    forwarded_env = ("VAST_SERVER_URL",)  # the watchdog destroys the instance through the same API

    def __init__(self, key: str | None, server_url: str | None = None):
        from vastai import VastAI  # heavy: the SDK pulls in requests and friends; only Vast's verbs need it

        self.url = server_url or os.environ.get("VAST_SERVER_URL") or None
        self.sdk = VastAI(api_key=key or "-", server_url=self.url, retry=1, raw=True, quiet=True)
        if key is None:
            self.sdk.client.api_key = None  # offers can be searched without an account

    @property
    def poll_s(self) -> float:
        return POLL_S  # read when used: tests shorten it

    def _retrying(self, what: str, fn, recover=None):
        import requests  # heavy: ~0.3 s, only the API calls need it

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

    def search_offers(self, want: OfferFilter) -> list[dict]:
        # storage=disk: the quoted dph_total then includes this instance's disk.
        found = self.call("search_offers", query=offer_query(want), type="bid" if want.interruptible else "on-demand",
                          order="dph_total", limit=OFFER_SEARCH_LIMIT, storage=want.min_disk_gb)
        return [offer_row(o) for o in found]

    def hourly_rate(self, offer: dict, interruptible: bool, bid: float | None = None) -> float:
        """$/h the instance will bill: dph_total on demand; for a bid, --bid or the minimum bid x margin
        (an approximation: a bid instance bills what it bid while it runs)."""
        if not interruptible:
            return offer["price"]
        if bid:
            return float(bid)
        return round(float(offer.get("min_bid") or offer["price"]) * BID_MARGIN, 4)

    def credit(self) -> float | None:
        credit = self.call("show_user").get("credit")
        return None if credit is None else float(credit)

    def instances(self) -> list[dict]:
        return [instance_row(i) for i in self.call("show_instances")]

    def instance(self, instance_id: int) -> dict | None:
        """The instance, or None once it is gone."""
        inst = self.call("show_instance", int(instance_id))
        return None if inst is None else instance_row(inst)

    def logs(self, instance_id: int, tail: int | None) -> str:
        text = self.call("logs", int(instance_id), tail=str(tail) if tail else None)
        return text if isinstance(text, str) else str(text.get("msg") or text)

    def _with_label(self, label: str, exclude: set[int]) -> int | None:
        for inst in self.call("show_instances"):
            if inst.get("label") == label and inst["id"] not in exclude:
                return int(inst["id"])
        return None

    def create(self, offer: dict, label: str, *, image: str, disk_gb: float, env: dict[str, str], startup: str,
               price: float | None, exclude: set[int] = frozenset()) -> int:
        """Rent `offer` (at `price` for a bid); returns the instance id. A create that failed with 5xx may
        still have rented: before each retry, an instance already carrying `label` is adopted, never
        doubled. Raises OfferTaken when someone else rented the offer first."""
        def once() -> int:
            res = self.sdk.create_instance(offer["id"], label=label, image=image, disk=disk_gb, env=env,
                                           onstart_cmd=startup, ssh=True, price=price)
            if not isinstance(res, dict) or not res.get("success", True) or not res.get("new_contract"):
                raise VastError(f"Vast.ai create on offer {offer['id']} answered {res!r:.300}")
            return int(res["new_contract"])
        return self._retrying(f"create on offer {offer['id']}", once,
                              recover=lambda: self._with_label(label, exclude))

    def destroy(self, instance_id: int) -> None:
        """Destroy; one that is gone already counts as destroyed (the instance may have beaten us to it)."""
        try:
            self.call("destroy_instance", int(instance_id))
        except InstanceGone:
            pass


def connect(need_key: bool = True) -> Vast:
    """The client `pagating vast ...` runs on (registered in pagating.cloud.provider.PROVIDERS)."""
    return Vast(require_key() if need_key else api_key())


# ---- Vast's rows -> the neutral rows (pagating.cloud.provider) -----------------------------------


def offer_query(want: OfferFilter) -> dict:
    q: dict[str, Any] = {"reliability": {"gte": want.min_reliability}, "disk_space": {"gte": want.min_disk_gb},
                         "inet_down": {"gte": want.min_inet_down}, "num_gpus": {"eq": want.num_gpus},
                         "rentable": {"eq": True}, "rented": {"eq": False}}
    if want.gpu_name and want.gpu_name.lower() not in ("any", "*"):
        q["gpu_name"] = {"eq": want.gpu_name}
    if want.exclude_machines:
        q["machine_id"] = {"notin": list(want.exclude_machines)}
    if want.min_cuda:  # the host driver's highest CUDA must run the image's CUDA
        q["cuda_max_good"] = {"gte": want.min_cuda}
    return q


def offer_row(o: dict) -> dict:
    return {"id": o["id"], "gpu_name": o.get("gpu_name"), "num_gpus": o.get("num_gpus") or 1,
            "price": float(o["dph_total"]), "min_bid": o.get("min_bid"),
            "reliability": o.get("reliability2") or o.get("reliability"), "inet_down": o.get("inet_down"),
            "disk_gb": o.get("disk_space"), "cuda": o.get("cuda_max_good"), "where": o.get("geolocation"),
            "machine": o.get("machine_id")}


def state_of(inst: dict) -> str:
    status = inst.get("actual_status")
    return STARTING if status in STARTING_STATES else DOWN if status in DOWN_STATES else UP


def is_outbid(inst: dict) -> bool:
    """A bid instance Vast stopped while we still want it running: what an outbid looks like."""
    stopped = inst.get("cur_state") == "stopped" or inst.get("actual_status") in ("exited", "stopped")
    return bool(inst.get("is_bid")) and inst.get("intended_status") != "stopped" and stopped


def instance_row(inst: dict) -> dict:
    env = inst.get("extra_env") or {}  # Vast lists it as [[name, value], ...]
    return {"id": int(inst["id"]), "label": inst.get("label"), "state": state_of(inst),
            "status": inst.get("actual_status"), "status_msg": inst.get("status_msg"),
            "started": inst.get("start_date"), "bid": bool(inst.get("is_bid")), "outbid": is_outbid(inst),
            "gpu_name": inst.get("gpu_name"), "num_gpus": inst.get("num_gpus") or 1,
            "rate": float(inst.get("dph_total") or 0), "hours": float(inst.get("duration") or 0) / 3600,
            "env": join_env(env if isinstance(env, dict) else dict(env)), "disk_gb": inst.get("disk_space"),
            "image": inst.get("image_uuid"), "machine": inst.get("machine_id")}
