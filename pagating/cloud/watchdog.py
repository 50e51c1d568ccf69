"""The watchdog onstart.sh runs in the background on a rented instance: it destroys the instance
when its spend reaches the budget or training stops making progress (no file under the watched
folders modified for `stall_s`). Standard library only, so it runs before or without the
project's dependencies: `python -m pagating.cloud.watchdog --pid $$ --watch DIR ...`.

The budget, stall and lock rules are any provider's; the self-destroy and the start date are the
provider's own API, read from the variables its host sets: Vast's `DELETE /api/v0/instances/<id>/` with
the instance's CONTAINER_ID / CONTAINER_API_KEY (that key can only manage this instance). A second
provider adds its branch beside `destroy_self` and `vast_start_date`. A lock directory shared with onstart.sh
makes sure only one of them sends the destroy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VAST_SERVER = "https://console.vast.ai"  # VAST_SERVER_URL overrides (the tests' fake API)
LOCK_NAME = "destroyed"
KILL_REASON = "kill-reason"  # in the state dir: why the watchdog stopped the sweep (onstart.sh reports it)
KILL_GRACE_S = 180.0  # onstart.sh's exit (stop training, report, upload the log, destroy) gets this long


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} pagating-watchdog: {msg}", flush=True)


def newest_mtime(dirs: list[Path]) -> float:
    """Latest modification time of any file or folder under `dirs` (0 when none exists)."""
    newest = 0.0
    for root in dirs:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
            for name in [*filenames, *dirnames, "."]:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                except OSError:
                    pass
    return newest


def destroy_self(lock_dir: Path | None, attempts: int | None = None, backoff_s: float = 5.0,
                 cap_s: float = 60.0) -> bool:
    """DELETE this instance through the Vast API, once across the watchdog and onstart.sh. Tried for as
    long as this box lives (`attempts` None): a box that cannot destroy itself keeps billing, and
    `pagating vast watch` may destroy it meanwhile (then Vast answers 404 and ends the container)."""
    iid, key = os.environ.get("CONTAINER_ID"), os.environ.get("CONTAINER_API_KEY")
    if not iid or not key:  # another provider's host: its branch goes here
        log("CONTAINER_ID/CONTAINER_API_KEY unset: not on Vast, nothing to destroy")
        return False
    lock = lock_dir / LOCK_NAME if lock_dir else None
    if lock is not None:
        try:
            lock.mkdir(parents=True)
        except FileExistsError:
            log("the instance is already being destroyed")
            return True
    url = f"{os.environ.get('VAST_SERVER_URL') or VAST_SERVER}/api/v0/instances/{iid}/"
    # Its own loop, not tracking.retry: this module is standard library only (see above).
    attempt = 0
    while attempts is None or attempt < attempts:
        attempt += 1
        req = urllib.request.Request(url, data=b"{}", method="DELETE",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                json.loads(resp.read() or b"{}")
            log(f"destroyed instance {iid}")
            return True
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # destroyed already (by `vast watch`, or by hand)
                log(f"instance {iid} is already destroyed")
                return True
            log(f"destroy attempt {attempt} failed: HTTP {exc.code}; instance {iid} keeps billing until it goes")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log(f"destroy attempt {attempt} failed: {exc}")
        time.sleep(min(backoff_s * attempt, cap_s))
    if lock is not None:
        lock.rmdir()  # let onstart.sh's exit trap try again
    return False


def vast_start_date() -> float | None:
    """When Vast says this instance started (its `start_date`): the budget clock keeps counting
    across reboots and container restarts, which rerun onstart.sh. None when not on Vast or the
    API does not answer."""
    iid, key = os.environ.get("CONTAINER_ID"), os.environ.get("CONTAINER_API_KEY")
    if not iid or not key:
        return None
    url = f"{os.environ.get('VAST_SERVER_URL') or VAST_SERVER}/api/v0/instances/{iid}/?owner=me"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            row = (json.loads(resp.read() or b"{}") or {}).get("instances") or {}
        return float(row["start_date"]) if row.get("start_date") else None
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log(f"could not read the instance's start from Vast ({type(exc).__name__}); counting from now")
        return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists: psutil.pid_exists by hand, this module being standard library only."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(now: float, started_at: float, usd_per_hour: float, budget_usd: float,
          last_change: float, stall_s: float) -> str | None:
    """Why the instance must go now, or None."""
    spent = (now - started_at) / 3600 * usd_per_hour
    if budget_usd > 0 and spent >= budget_usd:
        return f"spend ${spent:.2f} reached the budget ${budget_usd:.2f}"
    if stall_s > 0 and now - last_change >= stall_s:
        return f"no progress: nothing under the watched folders changed for {now - last_change:.0f} s"
    return None


def watch(dirs: list[Path], budget_usd: float, usd_per_hour: float, started_at: float, stall_s: float,
          poll_s: float = 60.0, pid: int | None = None, lock_dir: Path | None = None,
          grace_s: float = KILL_GRACE_S) -> str:
    """Poll until the budget is spent or progress stalls, then stop onstart.sh (`pid`), which records
    the reason on the parent run, uploads its log and destroys the instance; destroy it here only when
    onstart.sh does not exit within `grace_s` (or there is none). Returns the reason, or "parent
    exited" when process `pid` is gone first."""
    armed_at = time.time()
    log(f"watching {', '.join(map(str, dirs))}: budget ${budget_usd:.2f} at ${usd_per_hour:.3f}/h, "
        f"stall {stall_s:.0f} s")
    while True:
        if pid is not None and not pid_alive(pid):
            return "parent exited"
        now = time.time()
        last_change = max(newest_mtime(dirs), armed_at)
        reason = check(now, started_at, usd_per_hour, budget_usd, last_change, stall_s)
        if reason:
            log(f"{reason}; stopping the sweep and destroying the instance")
            if pid is not None and lock_dir is not None:
                (lock_dir / KILL_REASON).write_text(reason)
                os.kill(pid, signal.SIGTERM)
                deadline = time.time() + grace_s
                while pid_alive(pid) and time.time() < deadline:
                    time.sleep(min(poll_s, 1.0))
                if not pid_alive(pid):
                    return reason
                log(f"onstart.sh still runs {grace_s:.0f} s later; destroying the instance from here")
            while not destroy_self(lock_dir) and os.environ.get("CONTAINER_ID"):
                time.sleep(poll_s)
            return reason
        time.sleep(poll_s)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", action="append", default=[], metavar="DIR",
                   help="folder whose file changes count as progress (repeatable; default: current)")
    p.add_argument("--budget-usd", type=float, default=_env_float("PAGATING_BUDGET_USD", 0.0),
                   help="destroy when spend reaches this (env PAGATING_BUDGET_USD; 0 = no limit)")
    p.add_argument("--usd-per-hour", type=float, default=_env_float("PAGATING_USD_PER_HOUR", 0.0),
                   help="the instance's price (env PAGATING_USD_PER_HOUR)")
    p.add_argument("--started-at", type=float, default=None,
                   help="unix time billing started (default: the instance's start_date from the Vast API, "
                        "else env PAGATING_STARTED_AT, else now)")
    p.add_argument("--stall-s", type=float, default=_env_float("PAGATING_STALL_S", 1800.0),
                   help="destroy after this many seconds without progress (env PAGATING_STALL_S)")
    p.add_argument("--poll-s", type=float, default=_env_float("PAGATING_WATCHDOG_POLL_S", 60.0),
                   help="seconds between checks (env PAGATING_WATCHDOG_POLL_S)")
    p.add_argument("--pid", type=int, default=None, help="stop watching when this process exits")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="folder holding the destroy lock shared with onstart.sh")
    p.add_argument("--destroy", action="store_true", help="destroy the instance now and exit (onstart.sh's exit)")


def run(args: argparse.Namespace) -> int:
    if args.destroy:
        return 0 if destroy_self(args.state_dir) else 1
    dirs = [Path(d) for d in (args.watch or [os.getcwd()])]
    started_at = args.started_at or vast_start_date() or _env_float("PAGATING_STARTED_AT", time.time())
    watch(dirs, args.budget_usd, args.usd_per_hour, started_at, args.stall_s, args.poll_s,
          args.pid, args.state_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagating.cloud.watchdog",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
