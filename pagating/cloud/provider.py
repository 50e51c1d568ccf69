"""The seam between the shared cloud flows and a GPU provider: the `Provider` protocol the flows call,
the provider-neutral offer and instance rows it returns, its request limits, and the registry that
maps `pagating <name>` to it.

A provider implements the client methods of `Provider` over its own API and nothing else: ranking
offers, launching, waiting, status, watch, relaunch, budget and destroy are written once in
pagating/cloud/ over these methods (see tests/test_cloud_providers.py for the least a provider needs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pagating.config import UserError

# ---- neutral rows -----------------------------------------------------------------------------
#
# An offer: {"id", "gpu_name", "num_gpus", "price" ($/h on demand, disk included), "min_bid" ($/h or None),
#   "reliability", "inet_down" (Mb/s), "disk_gb", "cuda" (the host's highest CUDA), "where", "machine"}.
# An instance: {"id", "label", "state" (one of STATES), "status" (the provider's own word, shown to the user;
#   None while not provisioned), "status_msg", "started" (unix time), "bid" (bool), "outbid" (bool),
#   "gpu_name", "num_gpus", "rate" ($/h), "hours" (billed so far), "env" (as launch sent it, joined),
#   "disk_gb", "image", "machine"}.

# An instance's state, as far as the flows care: in STARTING and DOWN nothing of ours runs, and an instance
# that stays so past the start timeout is destroyed (STARTING counted from its start, DOWN from when a
# watcher first saw it so); UP is every other state (running, or stopped on purpose).
STARTING = "starting"
DOWN = "down"
UP = "up"
STATES = (STARTING, DOWN, UP)


class ProviderError(RuntimeError):
    """The provider failed us (not the user's doing): one line, exit 1."""


class OfferTaken(ProviderError):
    """The offer was rented by someone else between our search and our create."""


class InstanceGone(ProviderError):
    """The instance is destroyed already."""


@dataclass(frozen=True)
class RequestLimits:
    """A provider's caps on a create request (characters)."""
    startup_chars: int       # the startup command(s) together (Vast: args + args_str + onstart)
    env_entry_chars: int     # one NAME=value
    env_total_chars: int     # all of env
    label_chars: int
    image_chars: int


@dataclass(frozen=True)
class OfferFilter:
    """What an offer must have (the cloud settings of the profile and the offer flags)."""
    gpu_name: str             # "any" or "*": every GPU
    min_reliability: float
    min_disk_gb: float
    min_inet_down: float
    num_gpus: int
    interruptible: bool
    min_cuda: float | None = None
    exclude_machines: tuple = ()


class Provider(Protocol):
    """The client a GPU provider implements; every shared flow talks to the provider through it."""

    name: str               # the CLI verb: `pagating <name> ...`
    limits: RequestLimits
    poll_s: float           # seconds between instance polls while launch waits (the API's rate limit)
    never_sent: tuple[str, ...]     # its credentials: refused as --env, never in an instance's env
    forwarded_env: tuple[str, ...]  # this machine's variables the instance gets too, when set

    def search_offers(self, want: OfferFilter) -> list[dict]: ...
    def hourly_rate(self, offer: dict, interruptible: bool, bid: float | None = None) -> float: ...
    def credit(self) -> float | None: ...
    def create(self, offer: dict, label: str, *, image: str, disk_gb: float, env: dict[str, str], startup: str,
               price: float | None, exclude: set[int] = ...) -> int: ...
    def destroy(self, instance_id: int) -> None: ...
    def instances(self) -> list[dict]: ...
    def instance(self, instance_id: int) -> dict | None: ...
    def logs(self, instance_id: int, tail: int | None) -> str: ...


def check_request(limits: RequestLimits, *, startup: str, env: dict[str, str], label: str, image: str) -> None:
    """Refuse (exit 2, nothing rented) a create request the provider would reject."""
    if len(startup) > limits.startup_chars:  # our own text: a bug, not the user's doing
        raise RuntimeError(f"bootstrap text is {len(startup)} characters, over the {limits.startup_chars} allowed")
    for k, v in env.items():
        if len(k) + 1 + len(str(v)) > limits.env_entry_chars:
            raise UserError(f"instance env {k} is {len(k) + 1 + len(str(v))} characters as NAME=value; the "
                            f"provider allows {limits.env_entry_chars}: shorten it (e.g. a shorter repo URL "
                            "or tracking URI)")
    total = sum(len(k) + 1 + len(str(v)) for k, v in env.items())
    if total > limits.env_total_chars:
        raise UserError(f"instance env is {total} characters; the provider allows {limits.env_total_chars}: "
                        "pass fewer --env values")
    if len(label) > limits.label_chars:
        raise UserError(f"label {label[:40]}... is {len(label)} characters (max {limits.label_chars}): "
                        "use a shorter --sweep-id")
    if len(image) > limits.image_chars:
        raise UserError(f"--image is {len(image)} characters (max {limits.image_chars})")


# ---- the registry -----------------------------------------------------------------------------

# `pagating <name> ...` -> how to get the provider's client: a module name (its `connect(need_key)` is
# called; the module is imported only when the verb runs) or the `connect` callable itself.
PROVIDERS: dict[str, str | Callable[[bool], Provider]] = {"vast": "pagating.cloud.providers.vast"}
# Providers that hand the machines to another orchestrator (SkyPilot's managed jobs rent, recover and stop
# them), so the shared rent/watch/destroy flows do not apply: `pagating <name> ...` is the module's own
# `register_cli(sub)`, over the same shared parts (cloud.env, cloud.sweep_run, pagating.cost).
ORCHESTRATORS: dict[str, str] = {"sky": "pagating.cloud.providers.sky"}


def register_provider(name: str, connect: str | Callable[[bool], Provider]) -> None:
    """Make `pagating <name>` run the shared flows on the provider `connect(need_key)` returns."""
    PROVIDERS[name] = connect


def client(name: str, need_key: bool = True) -> Provider:
    """The provider's client; `need_key=False` where its API answers without an account (offers)."""
    connect = PROVIDERS[name]
    if isinstance(connect, str):
        connect = importlib.import_module(connect).connect
    return connect(need_key)
