"""`pagating <verb>`: each verb is registered by the module that implements it.

Only the module of the verb being run is imported, so `pagating vast offers` does not pay for
importing torch. A module registers its verbs with `register_cli(subparsers)` and sets
`func=<callable(args) -> int | None>` as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pagating.cloud import provider
from pagating.config import UserError

# verb -> module that registers it (help text lives in the module); GPU providers come from
# pagating.cloud.provider.PROVIDERS, their verbs from the shared flows (CLOUD_CLI), and ORCHESTRATORS (own verbs).
VERBS = {
    "data": "pagating.data.cli",
    "prepare": "pagating.data.cli",
    "train": "pagating.train",
    "sweep": "pagating.sweep",
    "quickstart": "pagating.quickstart",
    "report": "pagating.report.build",
    "server": "pagating.server",
    "grant": "pagating.server",
    "sync": "pagating.publish",
}
CLOUD_CLI = "pagating.cloud.cli"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagating", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    verbs = {**VERBS, **dict.fromkeys(provider.PROVIDERS, CLOUD_CLI), **provider.ORCHESTRATORS}
    wanted = argv[0] if argv and argv[0] in verbs else None
    modules = [verbs[wanted]] if wanted else list(dict.fromkeys(verbs.values()))
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not a verb still to be written
                raise
            continue
        if name == CLOUD_CLI and wanted:  # only the provider being run
            module.register_cli(sub, [wanted])
        else:
            module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # verbs that re-launch themselves (train --nproc) need the original command
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"pagating {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pagating {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
