"""`pagating <args>` for the tests without paying the imports each time: a zygote process imports what the
verbs need (torch, transformers, mlflow: ~5 s of CPU, most of a tiny run's cost) once per pytest worker, then
forks a fresh child per call. The child is a real process of its own, as `python -m pagating.cli` started by
subprocess.Popen would be, minus the interpreter start-up: its own pid (signals, kill -9, its own session
with start_new_session), cwd, environment, exit status, and the caller's own fds 0-2 (pipes, files; passed
over a Unix socket), every other fd closed. `popen` hands back a Popen look-alike (poll, wait, communicate,
send_signal, kill; stdout/stderr pipes in text or bytes), so tests that kill or watch their process use it too.

What a fork cannot give, a plain subprocess does (`popen` returns None): an environment that differs from the
zygote's in what is read at import time (PYTHON*, OMP/MKL threads, TORCH*, CUDA, HF caches; except the two
read later, below), and any failure of the zygote itself.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_ENV = dict(os.environ)  # the environment the zygote imports under (as pytest started)
IMPORT_TIME = ("PYTHON", "OMP_", "MKL_", "TORCH", "CUDA", "LD_", "HF_", "TRANSFORMERS", "TOKENIZERS", "NVIDIA")
# Read after import: inductor's cache dir on each use; TORCH_LOGS again by the child (torch._logging._init_logs).
LATER = {"TORCHINDUCTOR_CACHE_DIR", "TORCH_LOGS"}
MAX_MSG = 1 << 20

CODE = r'''
import atexit, json, os, select, signal, socket, sys, traceback
sock = socket.socket(fileno=int(sys.argv[1]))  # SOCK_SEQPACKET: one message per request, fds attached
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1):
    os.dup2(null, fd)
import pagating.cli, pagating.train, pagating.trainer, pagating.model, pagating.publish  # the heavy imports, once
import mlflow, mlflow.pytorch, torch._logging
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)


def child(req, fds):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if req["session"]:
        os.setsid()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if os.environ.get("TORCH_LOGS") != req["base_torch_logs"]:
        torch._logging._init_logs()
    for i, to in enumerate(req["std"]):
        os.dup2(fds[to] if to >= 0 else null, i)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # Popen's close_fds
    sys.stdin = open(0, closefd=False)
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
    return rc


forks = {}  # pid -> the how-many-th fork it is: a pid is reused once reaped, the serial never


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        sock.send(json.dumps({"exit": forks.pop(pid), "rc": os.waitstatus_to_exitcode(status)}).encode())


sock.send(b'{"ready": true}')
n_forks = 0
while True:
    ready = select.select([sock, wake_r], [], [])[0]
    if wake_r in ready:
        os.read(wake_r, 4096)
    if sock in ready:
        msg, fds, _, _ = socket.recv_fds(sock, MAX_MSG, 3)
        if not msg:
            break  # the test worker is gone: its children go on as orphans, as Popen's would
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                rc = child(json.loads(msg), fds)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc)
        for fd in fds:
            os.close(fd)
        forks[pid] = n_forks
        n_forks += 1
        sock.send(json.dumps({"pid": pid}).encode())
    reap()
'''.replace("MAX_MSG", str(MAX_MSG))


class Child:
    """A forked `pagating` process, answering as subprocess.Popen does."""

    def __init__(self, zygote: Zygote, args: list[str], pid: int, serial: int, stdout, stderr):
        self.zygote, self.args, self.pid = zygote, [sys.executable, "-m", "pagating.cli", *args], pid
        self.serial = serial  # the zygote's n-th fork: what its exit is reported by (pids get reused)
        self.stdin, self.stdout, self.stderr = None, stdout, stderr
        self.returncode: int | None = None
        self._read: dict[str, tuple[threading.Thread, list]] = {}  # pipe name -> its reader, what it read

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.serial, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.serial, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, input=None, timeout: float | None = None):
        assert input is None, "no stdin pipe"
        # Both pipes drained at once (as Popen does), each in a thread: a full pipe would block the child.
        for name in ("stdout", "stderr"):
            pipe = getattr(self, name)
            if pipe is not None and name not in self._read:
                box: list = []
                t = threading.Thread(target=lambda p=pipe, b=box: b.append(p.read()), daemon=True)
                t.start()
                self._read[name] = (t, box)
        for t, _ in self._read.values():
            t.join(timeout)
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(timeout)
        out = [self._read[n][1][0] if n in self._read else None for n in ("stdout", "stderr")]
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        return out[0], out[1]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        self.wait()


class Zygote:
    def __init__(self):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-c", CODE, str(theirs.fileno())], cwd=REPO, env=BASE_ENV,
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs.close()
        self.lock = threading.Lock()  # one request in flight: its answer is the next pid message
        self.cond = threading.Condition()
        self.ready = False
        self.dead = False
        self.pids: list[int] = []  # the pid of each fork, in order
        self.exits: dict[int, int] = {}  # fork serial -> exit status
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while msg := self.sock.recv(MAX_MSG):
                m = json.loads(msg)
                with self.cond:
                    if "exit" in m:
                        self.exits[m["exit"]] = m["rc"]
                    elif "pid" in m:
                        self.pids.append(m["pid"])
                    else:
                        self.ready = True
                    self.cond.notify_all()
        except OSError:
            pass
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def exit_code(self, serial: int, timeout: float | None) -> int | None:
        with self.cond:
            self.cond.wait_for(lambda: serial in self.exits or self.dead, timeout)
            if serial not in self.exits and self.dead:
                raise RuntimeError(f"the zygote died while its child {self.pids[serial]} ran")
            return self.exits.get(serial)

    def popen(self, args: list[str], cwd, env: dict, stdout=None, stderr=None, text: bool = False,
              start_new_session: bool = False) -> Child | None:
        if any(k.startswith(IMPORT_TIME) and k not in LATER and env.get(k) != BASE_ENV.get(k)
               for k in {*env, *BASE_ENV}):
            return None
        mine: list = []  # our ends of the pipes
        fds: list[int] = []
        std: list[int] = [-1]  # stdin: /dev/null

        def plumb(spec, inherit: int) -> int:  # an index into fds, or -1 for /dev/null
            if spec == subprocess.STDOUT:
                return std[1]
            if spec is None:
                spec = inherit  # Popen's default: this process's own fd
            if spec == subprocess.DEVNULL:
                return -1
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                mine.append((r, w))
                spec = w
            fds.append(spec if isinstance(spec, int) else spec.fileno())
            return len(fds) - 1

        std.append(plumb(stdout, 1))
        std.append(plumb(stderr, 2))
        with self.lock:
            try:
                with self.cond:
                    if not self.cond.wait_for(lambda: self.ready or self.dead, 300) or self.dead:
                        raise OSError("the zygote is not ready")
                    n = len(self.pids)
                req = {"args": args, "cwd": str(cwd), "env": env, "std": std, "session": start_new_session,
                       "base_torch_logs": BASE_ENV.get("TORCH_LOGS")}
                socket.send_fds(self.sock, [json.dumps(req).encode()], fds)
                with self.cond:
                    if not self.cond.wait_for(lambda: len(self.pids) > n or self.dead, 60) or self.dead:
                        raise OSError("the zygote did not fork")
                    pid = self.pids[n]
            except OSError:
                for r, w in mine:
                    os.close(r)
                    os.close(w)
                return None
        pipes = []
        for r, w in mine:
            os.close(w)
            f = os.fdopen(r, "rb")
            pipes.append(io.TextIOWrapper(f) if text else f)
        out = pipes.pop(0) if stdout == subprocess.PIPE else None
        err = pipes.pop(0) if stderr == subprocess.PIPE else None
        return Child(self, args, pid, n, out, err)

    def close(self) -> None:
        try:
            self.sock.close()
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


_zygote: Zygote | None = None


def popen(args: list[str], cwd, env: dict, **kw) -> Child | None:
    """`pagating <args>` as a forked child of this worker's zygote; None when only a plain subprocess will do."""
    global _zygote
    if _zygote is None or _zygote.dead:
        _zygote = Zygote()
        atexit.register(_zygote.close)
    return _zygote.popen(args, cwd, env, **kw)
