"""`pagating <args>` for the tests without paying the imports each time: a zygote process imports what the
verbs need (torch, transformers, mlflow: ~5 s of CPU, most of a tiny run's cost) once per pytest worker, then
forks a fresh child per call. The child is a real process of its own (its pid, cwd, environment, fds 0-2,
exit status), as `python -m pagating.cli` would be, minus the interpreter start-up.

What a fork cannot give, a plain subprocess does (`run` returns None): a call while another is in flight, an
environment that differs from the zygote's in what is read at import time (PYTHON*, OMP/MKL threads, TORCH*,
CUDA, HF caches), and any failure of the zygote itself.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_ENV = dict(os.environ)  # the environment the zygote imports under (as pytest started)
IMPORT_TIME = ("PYTHON", "OMP_", "MKL_", "TORCH", "CUDA", "LD_", "HF_", "TRANSFORMERS", "TOKENIZERS", "NVIDIA")

CODE = r'''
import atexit, json, os, sys, traceback
channel = os.fdopen(os.dup(1), "w", buffering=1)  # the tests' channel: nothing else writes here
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
os.close(null)
import pagating.cli, pagating.train, pagating.trainer, pagating.model, pagating.publish  # the heavy imports, once
import mlflow, mlflow.pytorch
channel.write("ready\n")
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.close(channel.fileno())
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for fd, to in ((null, 0), (out, 1), (err, 2)):
                os.dup2(fd, to)
                os.close(fd)
            sys.stdin = open(os.devnull)
            sys.argv = [pagating.cli.__file__, *req["args"]]
            try:
                rc = pagating.cli.main(req["args"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                rc = 1
            atexit._run_exitfuncs()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc)
    channel.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    channel.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
'''


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CODE], cwd=REPO, env=BASE_ENV, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.ready = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _next(self, timeout: float | None):
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise RuntimeError("the zygote died")
        return line

    def run(self, args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess | None:
        if any(k.startswith(IMPORT_TIME) and env.get(k) != BASE_ENV.get(k) for k in {*env, *BASE_ENV}):
            return None
        if self.proc.poll() is not None or not self.lock.acquire(blocking=False):
            return None
        try:
            if not self.ready:
                self.ready = self._next(300).strip() == "ready"
                if not self.ready:
                    return None
            with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
                out, err = Path(tmp, "out"), Path(tmp, "err")
                self.proc.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "env": env, "out": str(out),
                                                  "err": str(err)}) + "\n")
                self.proc.stdin.flush()
                pid = json.loads(self._next(60))["pid"]
                try:
                    rc = json.loads(self._next(timeout))["rc"]
                except queue.Empty:
                    os.kill(pid, signal.SIGKILL)
                    self._next(60)
                    raise subprocess.TimeoutExpired(args, timeout) from None
                return subprocess.CompletedProcess([sys.executable, "-m", "pagating.cli", *args], rc,
                                                   out.read_text(errors="replace"), err.read_text(errors="replace"))
        except (RuntimeError, OSError, queue.Empty):
            return None
        finally:
            self.lock.release()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


_zygote: Zygote | None = None


def run(args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess | None:
    """`pagating <args>` in a forked child of the zygote; None when only a plain subprocess will do."""
    global _zygote
    if _zygote is None:
        _zygote = Zygote()
        atexit.register(_zygote.close)
    return _zygote.run(args, cwd, env, timeout)
