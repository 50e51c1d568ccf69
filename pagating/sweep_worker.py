"""A sweep's long-lived trainer, one per worker slot: imports torch, transformers and mlflow once,
then trains the configs the sweep hands it one after another, each still its own `pagating train`
(its own claim, MLflow run and log file).

Why a process and not a thread: a config that crashes the interpreter (OOM kill, a segfault in a
kernel) takes only this worker down; the sweep sees the pipe close, records the config as failed and
starts a fresh worker for the next one. A config that ended in a Python error also gets a fresh worker
(whatever it left half-set in this process goes with it); a clean one leaves the worker for the next.

Protocol, one JSON object per line: the sweep writes {"argv": [...train args...], "log": path} on the
worker's stdin; the worker answers {"rc": int, "clean": bool, "finishing": run id or null} (how `pagating
train` exited, whether the worker is fit for the next config, and whether the run's end is still being
uploaded) on its stdout, which is kept for these messages only (everything a run prints, at the Python or
the C level, goes to the config's log file). A FINISHED run's end (final metrics, checkpoint, MLflow model,
status; Ends below) drains in a thread while the next config trains; {"ended": run id, "ok": bool} says
it is done. What the run did (its status and metrics) the sweep reads from MLflow, where the run recorded it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import subprocess
import sys
import threading
import traceback
from typing import Any

from pagating import run, train
from pagating.config import UserError


class Worker:
    """The sweep's side: one worker process for one slot (spawned on first use). A thread reads the
    worker's messages: answers go to `run`, "ended" notices to whoever waits in `ended`."""

    def __init__(self, env: dict[str, str], cwd: str | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "pagating.sweep_worker"], env=env, cwd=cwd, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1)
        self.answers: queue.Queue = queue.Queue()
        self.ends: dict[str, bool | None] = {}  # run id -> its end raised nothing (None: the worker died first)
        self.cond = threading.Condition()
        self.gone = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "ended" in msg:
                with self.cond:
                    self.ends[msg["ended"]] = msg["ok"]
                    self.cond.notify_all()
            else:
                self.answers.put(msg)
        self.proc.wait()
        with self.cond:
            self.gone = True
            self.cond.notify_all()
        self.answers.put(None)

    def run(self, argv: list[str], log: str) -> dict[str, Any] | None:
        """One config; None when the worker died on it (then this worker is gone)."""
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the reader sees the pipe close and answers None
        return self.answers.get()

    def ended(self, run_id: str) -> bool | None:
        """Wait for a run's background end; whether it raised nothing (None: the worker died before it was done)."""
        with self.cond:
            self.cond.wait_for(lambda: run_id in self.ends or self.gone)
            return self.ends.pop(run_id, None)

    def close(self, wait_s: float | None = 60) -> None:
        """End of jobs: an idle worker exits once its last run's background end is done; one still training
        (the sweep is being torn down by an error) gets wait_s, then is killed: its run stays resumable
        from its checkpoints. wait_s None: the worker has answered, only an end (bounded by the drain
        budget) can be left, and cutting it would cost that config a second attempt."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _train(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="pagating")
    train.register_cli(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    args.argv = argv
    return train.train_from_args(args)


class _Routed:
    """sys.stdout/sys.stderr of the worker: a background end's lines go to its own config's log (a
    thread-local file), everything else to fds 1/2, which point at the config training now."""

    local = threading.local()

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return (getattr(self.local, "file", None) or self.stream).write(text)

    def flush(self) -> None:
        (getattr(self.local, "file", None) or self.stream).flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Ends:
    """pagating.run.BACKGROUND in a worker: the end of a FINISHED run (final metrics, last checkpoint, MLflow
    model, status) drains in a thread while the next config starts. The same finish_run as in the
    foreground, with the config's claim held (and beating) until it is done, so whole-or-absent holds and
    no other process can take the config meanwhile. One end at a time: a second waits for the first, so a
    slow server never piles ends up. The end's lines (and its traceback, if it raises) go to the log of
    the config it belongs to. `notify(key, ok)` is called from the thread once an end is over (ok: it
    raised nothing)."""

    log: str | None = None  # the config training now (set per job); its run's end is submitted from it

    def __init__(self, notify):
        self.notify = notify
        self.thread: threading.Thread | None = None

    def submit(self, key, end) -> None:
        self.join()
        self.thread = threading.Thread(target=self._run, args=(key, end, self.log), name=f"pagating-end-{key}",
                                       daemon=True)
        self.thread.start()

    def _run(self, key, end, log: str) -> None:
        ok = False
        try:
            with open(log, "a", buffering=1) as f:
                _Routed.local.file = f
                try:
                    end()
                    ok = True
                except BaseException:  # said in its log; the sweep reads the outcome from MLflow
                    traceback.print_exc()
                finally:
                    _Routed.local.file = None
        finally:
            self.notify(key, ok)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def _job(job: dict) -> dict[str, Any]:
    """Run one job with fds 1 and 2 pointing at its log, then put them back."""
    saved = os.dup(1), os.dup(2)
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(log, 1), os.dup2(log, 2)
    run.BACKGROUND.log = job["log"]
    try:
        result = _train(job["argv"])
        rc = train.exit_code(result)
        answer = {"rc": rc, "clean": rc == 0, "finishing": result["run_id"] if result.get("finishing") else None}
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
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # the sweep's channel: nothing else writes here
    lock = threading.Lock()  # answers (main thread) and "ended" notices (the end's thread) share it

    def send(msg: dict) -> None:
        with lock:
            channel.write(json.dumps(msg, default=str) + "\n")

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints between jobs go nowhere, never into the answers
    os.close(devnull)
    sys.stdout, sys.stderr = _Routed(sys.stdout), _Routed(sys.stderr)
    run.BACKGROUND = Ends(lambda key, ok: send({"ended": key, "ok": ok}))
    # heavy: torch and transformers, imported once here for every config (after stdout went to /dev/null)
    import pagating.model  # noqa: F401
    import pagating.trainer  # noqa: F401

    for line in sys.stdin:
        if line.strip():
            send(_job(json.loads(line)))
    run.BACKGROUND.join()  # the last run's end, before the process goes
    return 0


if __name__ == "__main__":
    sys.exit(main())
