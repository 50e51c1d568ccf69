"""scripts/onstart.sh under bash against the fake Vast API and a real MLflow server: it runs the sweep
entry, uploads, and destroys its instance exactly once (not when an interruptible one is stopped)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ThrottleProxy
from fake_vast import FakeVastServer

from pagating.cloud import sweep_run
from pagating.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


STUB_MLPROJECT = """\
name: onstart-stub
entry_points:
  sweep:
    parameters:
      profile: {type: string, default: sample}
      shard: {type: string, default: "0/1"}
    command: "python stub_sweep.py {profile} {shard}"
"""


STUB_SWEEP = """\
import os, pathlib, sys, time
import mlflow
with mlflow.start_run():  # the run `mlflow run` made (MLFLOW_RUN_ID)
    mlflow.log_params({"profile": sys.argv[1], "shard": sys.argv[2]})
    mlflow.set_tag("pagating.sweep_id", os.environ["PAGATING_SWEEP_ID"])
pathlib.Path("started").touch()
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


def onstart_env(fake_url: str, tracking_uri: str, sweep_id: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "VAST_", "PAGATING_", "CONTAINER_", "AWS_"))}
    env.update({"PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "VAST_SERVER_URL": fake_url,
                "CONTAINER_ID": "4242", "CONTAINER_API_KEY": "container-key-4242",
                "MLFLOW_TRACKING_URI": tracking_uri, "PAGATING_SWEEP_ID": sweep_id,
                "PAGATING_SKIP_INSTALL": "1", "PAGATING_BUDGET_USD": "5",
                "PAGATING_USD_PER_HOUR": "0.4", "PAGATING_STALL_S": "600"})
    env.update(extra)
    return env


@pytest.fixture
def stub_project(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "MLproject").write_text(STUB_MLPROJECT)
    (proj / "stub_sweep.py").write_text(STUB_SWEEP)
    return proj


def _runs_with_sweep_id(uri: str, experiment: str, sweep_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return client.search_runs([exp.experiment_id], f"tags.\"pagating.sweep_id\" = '{sweep_id}'")


@pytest.mark.slow
@pytest.mark.parametrize("exit_code", [0, 3])
def test_onstart_runs_the_sweep_entry_and_destroys_once(mlflow_server, stub_project, exit_code):
    sweep_id = f"on{exit_code}x{int(time.time() * 1000) % 10**8}"
    with FakeVastServer() as fake:
        fake.add_instance(4242)  # the instance onstart.sh runs on (Vast answers 404 for one that is gone)
        env = onstart_env(fake.url, mlflow_server.uri, sweep_id, PAGATING_PROFILE="onstartstub",
                          PAGATING_SHARD="1/2", PAGATING_SKIP_DVC="1", PAGATING_SKIP_PREPARE="1",
                          STUB_EXIT=str(exit_code))
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "onstart.sh")], cwd=stub_project, env=env,
                              capture_output=True, text=True, timeout=180)
        assert (proc.returncode == 0) == (exit_code == 0), proc.stdout + proc.stderr
        (req,) = fake.destroys()
        assert req.path == "/api/v0/instances/4242/" and req.auth == "Bearer container-key-4242"
    (run_,) = _runs_with_sweep_id(mlflow_server.uri, "pagating-onstartstub", sweep_id)
    assert run_.data.params == {"profile": "onstartstub", "shard": "1/2"}
    assert "container-key-4242" not in proc.stdout + proc.stderr
    assert "destroyed instance 4242" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("interruptible", ["0", "1"])
def test_onstart_on_sigterm_destroys_unless_interruptible(mlflow_server, stub_project, interruptible):
    with FakeVastServer() as fake:
        fake.add_instance(4242)  # the instance onstart.sh runs on (Vast answers 404 for one that is gone)
        env = onstart_env(fake.url, mlflow_server.uri, f"term{interruptible}", PAGATING_PROFILE="onstartstub",
                          PAGATING_SKIP_DVC="1", PAGATING_SKIP_PREPARE="1", STUB_SLEEP="60",
                          PAGATING_INTERRUPTIBLE=interruptible)
        proc = subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "onstart.sh")], cwd=stub_project,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while not (stub_project / "started").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (stub_project / "started").exists()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert time.time() - t0 < 15  # the trap runs at once, not after the 60 s step
        assert proc.returncode == 143, out
        assert len(fake.destroys()) == (0 if interruptible == "1" else 1), out


@pytest.mark.slow
def test_budget_and_stall_kills_record_the_reason_and_the_log_before_the_delete(mlflow_server, tmp_path):
    """Both kills in parallel (one fake Vast, two instances): the watchdog stops onstart.sh, whose exit
    tags the reason on the parent run and uploads the log, whose last line is the kill, then DELETEs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("pagating-onstartstub")
    exp_id = exp.experiment_id if exp else client.create_experiment("pagating-onstartstub")
    kills = {"budget": {"PAGATING_USD_PER_HOUR": "3600", "PAGATING_BUDGET_USD": "8"},  # $1 a second
             "stall": {"PAGATING_STALL_S": "8"}}
    with FakeVastServer() as fake:
        at_delete = {}

        def on_destroy(iid):  # what the parent run holds when the DELETE arrives
            run_ = client.get_run(parents[iid])
            logs = [a.path for a in client.list_artifacts(parents[iid], "logs")]
            at_delete[iid] = (run_.data.tags.get(f"pagating.instance.{iid}", ""), logs)

        fake.on_destroy = on_destroy
        parents, procs = {}, {}
        for n, (kind, extra) in enumerate(kills.items()):
            iid = 4300 + n
            fake.add_instance(iid, start_date=time.time())
            proj = tmp_path / kind
            proj.mkdir()
            (proj / "MLproject").write_text(STUB_MLPROJECT)
            (proj / "stub_sweep.py").write_text(STUB_SWEEP)
            parents[iid] = client.create_run(exp_id, run_name=f"sweep kill-{kind}").info.run_id
            env = onstart_env(fake.url, mlflow_server.uri, f"kill{kind}", PAGATING_PROFILE="onstartstub",
                              PAGATING_SKIP_DVC="1", PAGATING_SKIP_PREPARE="1", STUB_SLEEP="120",
                              CONTAINER_ID=str(iid), CONTAINER_API_KEY=f"container-key-{iid}",
                              PAGATING_PARENT_RUN_ID=parents[iid], PAGATING_WATCHDOG_POLL_S="0.5",
                              HOME=str(tmp_path / f"home-{kind}"), **extra)
            procs[iid] = subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "onstart.sh")], cwd=proj, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outs = {iid: p.communicate(timeout=180)[0] for iid, p in procs.items()}
        for (kind, _), iid in zip(kills.items(), procs, strict=True):
            want = "spend $" if kind == "budget" else "no progress"
            assert len(fake.destroys(iid)) == 1, outs[iid][-3000:]
            tag, logs = at_delete[iid]
            assert tag.startswith(f"killed: {want}"), (tag, outs[iid][-3000:])
            assert logs == [f"logs/instance-{iid}.log"], outs[iid][-3000:]
            assert sweep_run.instance_log(mlflow_server.uri, iid).strip().splitlines()[-1].endswith(
                f"killed by the watchdog: {tag.removeprefix('killed: ')}")
            assert procs[iid].returncode == 143 and "container-key" not in outs[iid]


class HangingProxy:
    """A TCP proxy on 127.0.0.1 to a server; after hang(), new connections are accepted and never answered
    (a tracking server that hangs: the worst case for the exit path, worse than one that refuses)."""

    def __init__(self, target_port: int):
        self.target_port, self.hanging, self.held = target_port, False, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self.hanging = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.hanging:
                self.held.append(client)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=ThrottleProxy._pipe, args=(a, b, None), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.mark.slow
def test_onstart_exit_destroys_in_bounded_time_when_the_tracking_server_hangs(mlflow_server, stub_project,
                                                                              tmp_path):
    """MLflow hangs (accepts, never answers) as the instance stops: each upload/settle/report on the way out
    is cut at PAGATING_EXIT_CALL_TIMEOUT_S, so the DELETE comes in seconds, not after MLflow's timeouts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("pagating-onstartstub")
    exp_id = exp.experiment_id if exp else client.create_experiment("pagating-onstartstub")
    parent = client.create_run(exp_id, run_name="sweep hang").info.run_id
    proxy = HangingProxy(mlflow_server.port)
    try:
        with FakeVastServer() as fake:
            fake.add_instance(4242)
            env = onstart_env(fake.url, proxy.uri, "hang", PAGATING_PROFILE="onstartstub", PAGATING_SKIP_DVC="1",
                              PAGATING_SKIP_PREPARE="1", STUB_SLEEP="120", PAGATING_PARENT_RUN_ID=parent,
                              PAGATING_EXIT_CALL_TIMEOUT_S="3", MLFLOW_HTTP_REQUEST_TIMEOUT="300",
                              PAGATING_LOG_UPLOAD_S="600", HOME=str(tmp_path / "home"))
            proc = subprocess.Popen(["bash", str(REPO_ROOT / "scripts" / "onstart.sh")], cwd=stub_project,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.time() + 90
                while not (stub_project / "started").exists() and time.time() < deadline and proc.poll() is None:
                    time.sleep(0.1)
                assert (stub_project / "started").exists()
                proxy.hang()
                t0 = time.time()
                proc.send_signal(signal.SIGTERM)
                out, _ = proc.communicate(timeout=120)
            finally:
                proc.kill()
            (req,) = fake.destroys(4242)
            assert req.t - t0 < 50, out[-3000:]  # without the bounds: 300 s per hanging request, x retries
            print(f"DELETE {req.t - t0:.1f} s after SIGTERM, exit {time.time() - t0:.1f} s")
            assert "final log upload failed or timed out" in out
    finally:
        proxy.close()


@pytest.mark.slow
@pytest.mark.parametrize("fails", [False, True])
def test_onstart_runs_a_tiny_real_sweep_and_destroys_once(mlflow_server, tmp_path, fails):
    if not (REPO_ROOT / "pagating" / "sweep.py").exists():
        pytest.skip("sweep not landed yet")
    import yaml

    proj = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT, proj, ignore=shutil.ignore_patterns(
        ".venv", ".git", "data", "outputs", "logs", "mlruns", "mlartifacts", "mlflow.db", "reports",
        "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", ".dvc"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["sample"].update(max_steps=4, eval_steps=2, save_steps=2, logging_steps=1,
                                     max_eval_batches=2)
    params["sweep"]["sample"] = {"alpha_mode": ["static_2.0" if fails else "static_0.5", "static_1.0"],
                                 "learning_rate": [1.0e-3]}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sweep_id = f"real{int(fails)}x{int(time.time() * 1000) % 10**8}"
    with FakeVastServer() as fake:
        fake.add_instance(4242)
        # no DVC remote here: the instance rebuilds the sample corpus, as launch asks it to
        env = onstart_env(fake.url, mlflow_server.uri, sweep_id, PAGATING_PROFILE="sample",
                          PAGATING_DATA="sample")
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "onstart.sh")], cwd=proj, env=env,
                              capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert (proc.returncode != 0) == fails, out[-4000:]
        assert [r.path for r in fake.destroys()] == ["/api/v0/instances/4242/"], out[-4000:]
    if not fails:  # the sweep ran under launch's sweep id: what `pagating vast status` looks up
        runs = _runs_with_sweep_id(mlflow_server.uri, "pagating-sample", sweep_id)
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
        assert {r.data.params.get("train.max_steps") for r in children} == {"4"}
        cfg = load_config("sample")
        prog = sweep_run.sweep_progress(mlflow_server.uri, sweep_id, {**cfg, "sweep": params["sweep"]["sample"]})
        assert prog["done"] == prog["total"] == 2 and prog["running"] == []
