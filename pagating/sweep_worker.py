"""A sweep's long-lived trainer, one per worker slot: imports torch, transformers and mlflow once,
then trains the configs the sweep hands it one after another, each still its own `pagating train`
(its own claim, MLflow run and log file).

Why a process and not a thread: a config that crashes the interpreter (OOM kill, a segfault in a
kernel) takes only this worker down; the sweep sees the pipe close, records the config as failed and
starts a fresh worker for the next one. A config that ended in a Python error also gets a fresh worker
(whatever it left half-set in this process goes with it); a clean one leaves the worker for the next.

Protocol, one JSON object per line: the sweep writes {"argv": [...train args...], "log": path} on the
worker's stdin; the worker answers {"rc": int, "clean": bool} (how `pagating train` exited, and whether
the worker is fit for the next config) on its stdout, which is kept for these answers only (everything a
run prints, at the Python or the C level, goes to the config's log file). What the run did (its status and
metrics) the sweep reads from MLflow, where the run recorded it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import traceback
from typing import Any

from pagating import train
from pagating.config import UserError


class Worker:
    """The sweep's side: one worker process for one slot (spawned on first use)."""

    def __init__(self, env: dict[str, str], cwd: str | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "pagating.sweep_worker"], env=env, cwd=cwd, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)

    def run(self, argv: list[str], log: str) -> dict[str, Any] | None:
        """One config; None when the worker died on it (then this worker is gone)."""
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait()
            return None
        return json.loads(line)

    def close(self) -> None:
        """End of jobs: an idle worker exits at once; one still training (the sweep is being torn down
        by an error) gets a minute, then is killed: its run stays resumable from its checkpoints."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pagating")
    train.register_cli(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    args.argv = argv
    return train.exit_code(train.train_from_args(args))


def _job(job: dict) -> dict[str, Any]:
    """Run one job with fds 1 and 2 pointing at its log, then put them back."""
    saved = os.dup(1), os.dup(2)
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(log, 1), os.dup2(log, 2)
    try:
        rc = _train(job["argv"])
        answer = {"rc": rc, "clean": rc == 0}
    except UserError as exc:
        print(f"pagating train: error: {exc}", file=sys.stderr)
        answer = {"rc": 2, "clean": False}
    except SystemExit as exc:  # argparse: bad arguments
        answer = {"rc": exc.code if isinstance(exc.code, int) else 2, "clean": False}
    except Exception:
        traceback.print_exc()
        answer = {"rc": 1, "clean": False}
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)
    _between_jobs()
    return answer


def _between_jobs() -> None:
    """What a finished config leaves in the process and the next must not inherit."""
    import torch  # heavy: loaded by the first config's training already; the sweep's side never needs it

    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()  # compiled frames of the last model: the next one compiles its own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # the sweep's channel: nothing else writes here
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints between jobs go nowhere, never into the answers
    os.close(devnull)
    # heavy: torch and transformers, imported once here for every config (after stdout went to /dev/null)
    import pagating.model  # noqa: F401
    import pagating.trainer  # noqa: F401

    for line in sys.stdin:
        if line.strip():
            answers.write(json.dumps(_job(json.loads(line)), default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
