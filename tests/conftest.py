"""Shared fixtures: a real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact store)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cli_zygote
import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
MLFLOW_BIN = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A stand-in for NVML (no GPU here), put first on a child's PYTHONPATH as `pynvml`: fixed readings.
FAKE_NVML = '''
class NVMLError(Exception):
    pass
class _U:
    gpu = 87
class _M:
    used = 3000 * 10**6
    total = 24000 * 10**6
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUtilizationRates(h): return _U()
def nvmlDeviceGetMemoryInfo(h): return _M()
def nvmlDeviceGetPowerUsage(h): return 215000
def nvmlDeviceGetEnforcedPowerLimit(h): return 450000
def nvmlDeviceGetTemperature(h, sensor): return 61
def nvmlDeviceGetName(h): return "NVIDIA GeForce RTX 4090"
NVML_TEMPERATURE_GPU = 0
'''


def fake_nvml_dir(folder: Path) -> Path:
    """`folder` holding the fake `pynvml` module (FAKE_NVML); returns it for PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pynvml.py").write_text(FAKE_NVML)
    return folder


def auth_server_kwargs(root: Path, port: int) -> dict:
    return {"port": port, "workers": 1, "auth_dir": str(root / "auth"),
            "backend_store_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifacts_destination": str(root / "artifacts")}


@contextlib.contextmanager
def running_auth_server(root: Path, admin_pw: str, gpu_pw: str):
    """A real `pagating server` (basic auth) on 127.0.0.1 with its stores and server.log under `root`;
    yields the process (.uri, and .root/.kwargs to restart it on the same stores)."""
    from pagating import server

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(server.ADMIN_PASSWORD_ENV, admin_pw)
        mp.setenv(server.GPU_PASSWORD_ENV, gpu_pw)
        mp.delenv(server.SECRET_KEY_ENV, raising=False)
        kwargs = auth_server_kwargs(root, free_port())
        with open(root / "server.log", "ab") as log:
            proc = server.start_server(kwargs, stdout=log, stderr=subprocess.STDOUT)
            proc.root, proc.kwargs = root, kwargs
            try:
                yield proc
            finally:
                server.stop_server(proc)


class MlflowServer:
    """A real tracking server process; stop()/start() keep the same backend store and port."""

    def __init__(self, root: Path, port: int | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        cmd = [MLFLOW_BIN, "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1",
               *self.extra_args]
        log = open(self.root / "server.log", "ab")
        # No job-runner workers (a GenAI feature): three fewer processes on a 2-core machine.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError("mlflow server did not start in time")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


def run_cli(args: list[str], cwd, env: dict | None = None, timeout: float = 600, check: bool = False):
    """`pagating <args>` in a process of its own, as a user runs it (subprocess.run with capture_output and
    text): launch_cli's process, forked from this worker's zygote, which paid the imports once."""
    child = launch_cli(args, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise
    proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"pagating {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def launch_cli(args: list[str], cwd, env: dict | None = None, **popen_kw):
    """subprocess.Popen of `pagating <args>` (stdout, stderr, text, start_new_session as Popen takes them),
    forked from this worker's zygote like run_cli, else a fresh interpreter: poll, wait, communicate, kill
    and the pid (its own session with start_new_session) behave as Popen's."""
    env = {**os.environ, **(env or {})}
    proc = cli_zygote.popen(args, cwd, env, **popen_kw)
    if proc is None:
        proc = subprocess.Popen([sys.executable, "-m", "pagating.cli", *args], cwd=cwd, env=env, **popen_kw)
    return proc


@pytest.fixture(scope="session")
def sample_project(tmp_path_factory):
    """A project folder with params.yaml, the sample corpus in data/raw and data/prepared built."""
    import shutil

    from pagating.config import load_config
    from pagating.data.corpora import build_sample
    from pagating.data.prepare import prepare

    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with contextlib.chdir(root):
        trim_eval_splits(build_sample(root / "data" / "raw"))
        prepare(load_config("sample"))
    return root


EVAL_SHARE = 5  # the tests' corpus keeps about 1/5 of the validation and test text


def trim_eval_splits(paths: dict) -> None:
    """Every run of the suite ends with whole-split validation and test evals (~2,400 blocks each on the
    sample: seconds of CPU per tiny run, minutes over the suite). The tests' project keeps the first
    ~1/EVAL_SHARE of those two splits, cut after a blank line (the splits hold only 4 articles each);
    what the tests check about whole-split evals is unchanged."""
    for split in ("validation", "test"):
        lines = paths[split].read_text(encoding="utf-8").splitlines(keepends=True)
        cut = next(i for i in range(len(lines) // EVAL_SHARE, len(lines)) if not lines[i].strip())
        paths[split].write_text("".join(lines[:cut + 1]), encoding="utf-8")


class ThrottleProxy:
    """A TCP proxy on 127.0.0.1 in front of a server that lets client -> server bytes through at
    `rate` bytes/s: uploads through it are slow enough to be cut off midway."""

    def __init__(self, target_port: int, rate: float):
        import threading

        self.target_port, self.rate = target_port, rate
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, self.rate), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, rate) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._sock.close()


# ---- the Vast.ai side: a clean environment and the fake Vast API ----------------------------------

DVC_CONFIG = """\
[core]
    remote = storage
['remote "storage"']
    url = s3://example-bucket/pagating
"""


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No key, tracking URI or Vast URL from the developer's shell; fast retries."""
    import shutil

    from pagating.cloud.providers import vast

    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "VAST_", "PAGATING_", "AWS_", "CONTAINER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    # the project root launch reads: params.yaml and a committed DVC remote in the cloud
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(DVC_CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vast, "RETRY_BACKOFF_S", 0.01)
    return monkeypatch


@pytest.fixture
def fake(env):
    """The fake Vast API on 127.0.0.1 (tests/fake_vast.py) with four offers; VAST_SERVER_URL points at it."""
    from fake_vast import FakeVast, FakeVastServer, offer

    offers = [offer(11, 0.50), offer(12, 0.30), offer(13, 0.40), offer(14, 0.45)]
    server = FakeVastServer(FakeVast(offers=offers))
    with server as f:
        env.setenv("VAST_SERVER_URL", server.url)
        yield f


# The files that take longest (measured, `make test --durations`), scheduled first: pytest-xdist hands whole
# files to its workers in collection order, and a long file started last leaves the other workers idle at the
# end. Every other file keeps its place after these; the order of tests inside a file is unchanged.
LONGEST_FIRST = ["test_sky.py", "test_compile.py", "test_pipeline.py", "test_train.py", "test_instance_sim.py",
                 "test_tracking_spool.py", "test_sweep.py", "test_onstart.py", "test_tracking_claims.py",
                 "test_mlflow_ui.py", "test_bench.py", "test_server.py", "test_secrets.py", "test_ddp.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
