"""`pagating <provider> ...` for every registered provider (pagating.cloud.provider.PROVIDERS), from the
shared flows: rent GPUs there, run the sweep on them, watch it, never leave one billing.

    offers    cheapest offers matching the seed's filters, ranked by projected sweep cost
    launch    rent the cheapest offer(s) within the budget; wait until each reports "ready"
    status    instances of pagating sweeps, their last reports, progress and the parent run from MLflow
    watch     status in a loop: destroy what should be gone, relaunch outbid instances and dead shards,
              until the grid is done
    logs      an instance's onstart log (the provider's while it lives, the uploaded one after)
    destroy   destroy instances by id, by sweep, or all pagating instances
    watchdog  (on the instance) destroy it at the budget or when training stalls

The provider's module is imported only when one of its commands runs. Secrets stay in the instance
env; the onstart text and everything printed carry none.
"""

from __future__ import annotations

import argparse
import functools
import sys

from pagating.cloud import instances, launch, offers, status, watch, watchdog
from pagating.cloud.provider import PROVIDERS, ProviderError
from pagating.config import add_config_args, defaults

DEFAULT_STALL_MINUTES = 30
# The settings' own flags (pagating/config.py `verbs`) are declared for these flows, whatever the provider.
OFFERS_VERB, LAUNCH_VERB = "cloud offers", "cloud launch"


def guard(func):
    """The provider's failures print one line and exit 1 instead of a traceback."""
    @functools.wraps(func)
    def wrapped(args):
        try:
            return func(args)
        except ProviderError as exc:
            print(f"pagating {args.provider}: {exc}", file=sys.stderr)
            return 1
    return wrapped


def _offer_flags(p: argparse.ArgumentParser, verb: str) -> None:
    # --profile, --set cloud.KEY=VALUE and the cloud flags (--gpu-name, --budget, ...): pagating/config.py.
    add_config_args(p, verb, default_profile=offers.DEFAULT_PROFILE)
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per instance (one config per GPU)")
    p.add_argument("--interruptible", action="store_true",
                   help="bid (interruptible) offers instead of on-demand")
    p.add_argument("--bid", type=float, default=None, metavar="USD_PER_H",
                   help="bid price for --interruptible (default: the provider's, from the offer's minimum bid)")
    p.add_argument("--instances", type=int, default=1, help="instances; instance i runs shard i/N")
    p.add_argument("--disk", type=float, default=None, metavar="GB",
                   help="disk to rent (default --min-disk-gb)")
    p.add_argument("--s-per-step", type=float, default=None,
                   help="seconds per step to project with (default: measured in MLflow, else estimated)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI)")


def source_flags(p: argparse.ArgumentParser, machine: str, named: str, stops: str, env_note: str = "") -> None:
    """What a launch runs and how it stops, for every provider's launch (the shared flows' and sky's):
    `machine` is what runs a shard ("instance", "job"), `named` what carries the sweep id."""
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help=f"extra {machine} env, e.g. DVC remote credentials (NAME alone forwards this shell's "
                   f"value{env_note})")
    p.add_argument("--repo", default=None, help=f"git URL the {machine} clones (default PAGATING_REPO, else origin)")
    p.add_argument("--commit", default=None, help="commit to run (default HEAD)")
    p.add_argument("--allow-dirty", action="store_true", help="launch HEAD despite uncommitted changes")
    p.add_argument("--sweep-id", default=None, help=f"id in {named} and PAGATING_SWEEP_ID (default: new)")
    p.add_argument("--stall-minutes", type=float, default=DEFAULT_STALL_MINUTES,
                   help=f"the {machine} {stops} after this long without progress")


def _launch_parser(verbs) -> None:
    p = verbs.add_parser("launch", help="rent the cheapest offer(s) within the budget and run the sweep")
    _offer_flags(p, LAUNCH_VERB)
    source_flags(p, "instance", "labels", "destroys itself")
    p.add_argument("--no-wait", action="store_true",
                   help="return once the instances exist (`watch` then destroys stuck ones)")
    p.add_argument("--dry-run", action="store_true",
                   help="print offer, env (masked), onstart and cost; rent nothing")
    p.set_defaults(func=guard(launch.cmd_launch))


def _status_parsers(verbs) -> None:
    for name, helptext, func in (
            ("status", "instances, their reports and sweep progress", status.cmd_status),
            ("watch", "status every --interval s: destroy what should be gone, re-run dead shards until the "
             "grid is done", watch.cmd_watch)):
        p = verbs.add_parser(name, help=helptext)
        p.add_argument("--sweep", default=None, help="only this sweep id")
        p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI, "
                       "else the instance's)")
        if name == "status":
            p.add_argument("--relaunch", action="store_true",
                           help="destroy outbid instances and relaunch their shards")
        else:
            p.add_argument("--interval", type=float, default=60.0, help="seconds between checks")
            p.add_argument("--once", action="store_true", help="one round, then exit")
            p.add_argument("--start-timeout", type=float, default=None, metavar="MIN",
                           help="destroy instances loading, exited or offline this long "
                                f"(default {defaults('cloud')['start_timeout_min']:g})")
        p.set_defaults(func=guard(func))


def _instance_parsers(verbs) -> None:
    p = verbs.add_parser("logs", help="an instance's onstart log (from MLflow once the instance is gone)")
    p.add_argument("instance", type=int)
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI)")
    p.add_argument("--tail", type=int, default=200, help="last N lines")
    p.set_defaults(func=guard(instances.cmd_logs))

    p = verbs.add_parser("destroy", help="destroy instances (ends billing)")
    p.add_argument("ids", nargs="*", help="instance ids")
    p.add_argument("--sweep", default=None, help="every instance of this sweep")
    p.add_argument("--all", action="store_true", help="every pagating-* instance")
    p.set_defaults(func=guard(instances.cmd_destroy))

    p = verbs.add_parser("watchdog", help="(on the instance) destroy it at the budget or on a stall")
    watchdog.add_arguments(p)
    p.set_defaults(func=watchdog.run)


def register_provider_cli(sub, name: str) -> None:
    """`pagating <name> <command>`: the shared flows, run on provider `name`'s client."""
    top = sub.add_parser(name, help=f"rent a GPU at {name} and run the sweep there",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.set_defaults(func=lambda a: top.print_help() or 2, provider=name)
    verbs = top.add_subparsers(dest="cloud_verb", metavar="<command>")
    p = verbs.add_parser("offers", help="offers ranked by projected sweep cost")
    _offer_flags(p, OFFERS_VERB)
    p.add_argument("--limit", type=int, default=10, help="rows to print")
    p.set_defaults(func=guard(offers.cmd_offers))
    _launch_parser(verbs)
    _status_parsers(verbs)
    _instance_parsers(verbs)


def register_cli(sub, names: list[str] | None = None) -> None:
    """Every registered provider's verb (or those in `names`)."""
    for name in names or list(PROVIDERS):
        register_provider_cli(sub, name)
