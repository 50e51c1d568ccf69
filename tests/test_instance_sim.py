"""A rented instance, simulated end to end: `pagating vast launch` sends its create request to the
fake Vast API; the body it sent is then run as Vast would run it (its `onstart` under bash, its
`env`), against a file:// clone at the launched commit, an S3 DVC remote (moto server on 127.0.0.1,
the sample corpus `dvc push`ed there), a real `pagating server` with basic auth, and the fake API
for the self-destroy. The grid is two configs of two steps over two shards: shard 0's instance runs,
shard 1's sits loading until `vast watch` destroys it and re-runs the shard on another offer (the
fake boots what watch rents). The failure variants run in parallel; one of them cannot destroy itself
(its key refused on DELETE) and watch destroys it. The GPU user's password is 400 characters: longer
than one Vast env entry, it only logs in if the bootstrap joined its parts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO, free_port, running_auth_server
from fake_vast import FakeVast, FakeVastServer, offer

from pagating import cli
from pagating.cloud import env as cloud_env
from pagating.cloud import sweep_run

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
ADMIN_PW, GPU_PW = "sim-Admin-Pw-5521", "sim-Gpu-Runner-Pw-8830-" + "k7Q2x9Lm" * 47  # 400 chars
AWS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key-7b2e"}
BUCKET = "pagating-sim"
GIT_URL = "https://git.example.org/me/pagating.git"


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited")
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start")


@pytest.fixture(scope="module")
def s3():
    """A real S3 API on 127.0.0.1 (moto server) with an empty bucket."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(port, proc, "moto server")
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", **{k.lower(): v for k, v in AWS.items()}
                     ).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    from pagating import server

    with running_auth_server(tmp_path_factory.mktemp("sim-server"), ADMIN_PW, GPU_PW) as proc:
        # least privilege: the admin makes the experiment and grants it (`pagating grant`)
        server.grant_experiments(proc.uri, ("admin", ADMIN_PW), ["pagating-sample"], "gpu-runner")
        yield proc


@pytest.fixture(scope="module")
def pushed_repo(tmp_path_factory, s3):
    """The project at one commit, with the smallest grid and an S3 DVC remote holding the sample."""
    from pagating.data.corpora import build_sample

    repo = tmp_path_factory.mktemp("sim") / "repo"
    anywhere = shutil.ignore_patterns(".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "mlflow-server",
                                      "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", ".dvc")

    def ignore(folder, names):  # the checkout's own data/, outputs/...; not the package pagating/data/
        top = {"data", "outputs", "logs", "reports"} if Path(folder) == REPO else set()
        return anywhere(folder, names) | (top & set(names))

    shutil.copytree(REPO, repo, ignore=ignore)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["sample"].update(max_steps=2, eval_steps=2, save_steps=2, logging_steps=1, max_eval_batches=1)
    params["sweep"]["sample"] = {"alpha_mode": ["static_0.5", "static_1.0"], "learning_rate": [1.0e-3]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (repo / ".dvc" / "config").write_text(f"[core]\n    remote = storage\n['remote \"storage\"']\n"
                                          f"    url = s3://{BUCKET}/pagating\n    endpointurl = {s3}\n")
    build_sample(repo / "data" / "raw")
    env = {**os.environ, **AWS, "AWS_EC2_METADATA_DISABLED": "true"}

    def sh(*cmd):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=300)

    sh("git", "init", "-q")
    sh(str(VENV_BIN / "dvc"), "commit", "-f", "-q", "data.dvc")  # the sample is byte for byte data.dvc
    sh(str(VENV_BIN / "dvc"), "push", "-q", "data.dvc")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "sim")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return repo, sha


def launch_body(monkeypatch, fake_url: str, uri: str, repo: Path, sha: str, sweep_id: str, capsys) -> dict:
    """`pagating vast launch` in the pushed repo; returns the create body the fake API received."""
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "VAST_", "PAGATING_", "AWS_", "CONTAINER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VAST_SERVER_URL", fake_url)
    monkeypatch.setenv("VAST_API_KEY", "sim-vast-key")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "gpu-runner")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", GPU_PW)
    for k, v in AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cloud_env, "check_tracking_uri", lambda u: u)  # the test server is on 127.0.0.1
    # the git host launch asks (`git ls-remote`) is the file:// repo, through git's url.insteadOf
    for k, v in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.file://{repo}.insteadOf",
                 "GIT_CONFIG_VALUE_0": GIT_URL}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(repo)
    rc = cli.main(["vast", "launch", "--profile", "sample", "--repo", GIT_URL, "--instances", "2",
                   "--commit", sha, "--no-wait", "--sweep-id", sweep_id, "--s-per-step", "0.01",
                   "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    return out


def start_instance(body: dict, iid: int, repo: Path, work: Path, **override) -> subprocess.Popen:
    """Run a create body as Vast would: `onstart` under bash with `env`, plus what Vast adds."""
    work.mkdir(parents=True)
    script = work / "onstart.sh"
    script.write_text(body["onstart"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "VAST_", "PAGATING_", "AWS_", "CONTAINER_", "PYTHONPATH"))}
    env.update(body["env"])
    env.update({"CONTAINER_ID": str(iid), "CONTAINER_API_KEY": f"container-key-{iid}",
                "PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "HOME": str(work / "home"),
                # the instance's git host is a file:// clone here; its checkout is the code that runs
                "PAGATING_REPO": f"file://{repo}", "PAGATING_WORKDIR": str(work / "checkout"),
                "PYTHONPATH": str(work / "checkout"), "PAGATING_LOG": str(work / "onstart.log"),
                "PAGATING_PYTHON": sys.executable, "PAGATING_SKIP_INSTALL": "1",  # the venv has it all
                "PAGATING_LOG_UPLOAD_S": "20", "AWS_EC2_METADATA_DISABLED": "true",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    for k, v in override.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    # its own session: Vast ending the container is killpg here
    return subprocess.Popen(["bash", str(script)], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_launched_sweep_runs_every_shard_and_the_failures_end_cleanly(
        pushed_repo, auth_server, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    repo, sha = pushed_repo
    with FakeVastServer(FakeVast(offers=[offer(11, 0.30), offer(12, 0.32), offer(13, 0.35)])) as fake:
        launch_body(monkeypatch, fake.url, auth_server.uri, repo, sha, "sim1", capsys)
        first, second = fake.creates()
        body, iid = first.body, first.body["_created"]
        assert len(body["onstart"]) <= 4096 and first.status == second.status == 0
        assert max(len(f"{k}={v}") for k, v in body["env"].items()) <= 256  # the password went split
        assert "MLFLOW_TRACKING_PASSWORD:" in body["env"]["PAGATING_SPLIT_ENV"]
        parent = body["env"]["PAGATING_PARENT_RUN_ID"]
        procs: dict = {}
        # what watch rents boots at once (Vast would); instance 5002 (shard 1) stays `loading` for good
        fake.on_create = lambda new, b: (fake.instances[new].update(actual_status="running"),
                                         procs.setdefault(new, start_instance(b, new, repo, tmp_path / str(new),
                                                                              PAGATING_TEST_ALLOW_CPU="1")))
        fake.instances[iid]["actual_status"] = "running"
        # more instances of the same launch, each broken in one way
        variants = {"unknown commit": {"PAGATING_COMMIT": "f" * 40},
                    "unreachable tracking server": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
                    "no CUDA": {},
                    "DVC remote without credentials": {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                                       "PAGATING_TEST_ALLOW_CPU": "1"},
                    "key refused on DELETE": {}}  # no CUDA either, and it cannot destroy itself
        ids = {}
        for n, name in enumerate(variants):
            ids[name] = 6001 + n
            label = "pagating-sim1-0" if name == "key refused on DELETE" else f"pagating-sim1-v{n}"
            fake.add_instance(ids[name], label=label, actual_status="running", extra_env=first.body["env"])
            sweep_run.mark_created(auth_server.uri, parent, ids[name])
        refused = ids["key refused on DELETE"]
        fake.refused_keys.add(f"container-key-{refused}")
        fake.on_destroy = lambda gone: gone == refused and os.killpg(procs[refused].pid, 9)  # Vast ends it
        t0 = time.time()
        procs[iid] = start_instance(body, iid, repo, tmp_path / "ok", PAGATING_TEST_ALLOW_CPU="1")
        for name, override in variants.items():
            procs[ids[name]] = start_instance(body, ids[name], repo, tmp_path / name.replace(" ", "_"), **override)
        # watch until every instance of the sweep is gone: destroys 5002 (loading), re-runs shard 1, destroys
        # the instance that cannot destroy itself
        rc = cli.main(["vast", "watch", "--sweep", "sim1", "--interval", "3", "--start-timeout", "0.1"])
        watch_out, _ = capsys.readouterr()
        outs = {i: p.communicate(timeout=600)[0] for i, p in procs.items()}
        wall = time.time() - t0
        assert rc == 0 and "sweep sim1: done: every config of the grid FINISHED (2/2)" in watch_out, watch_out

        # the grid: every config FINISHED exactly once, the parent FINISHED after its last child
        client = MlflowClient(auth_server.uri)
        runs = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
        assert sorted((r.info.run_name, r.info.status) for r in runs) == [
            ("paGLU static_0.5 lr=0.001", "FINISHED"), ("paGLU static_1.0 lr=0.001", "FINISHED")]
        parent_run = client.get_run(parent)
        assert parent_run.info.status == "FINISHED"
        assert parent_run.info.end_time >= max(r.info.end_time for r in runs)
        # shard 1: 5002 destroyed while loading, relaunched as the third instance, which ran it
        relaunched = fake.creates()[2].body["_created"]
        assert fake.creates()[2].body["env"]["PAGATING_SHARD"] == "1/2" and len(fake.creates()) == 3
        assert len(fake.destroys(second.body["_created"])) == 1 and "loading for" in watch_out
        assert procs[relaunched].returncode == 0, outs[relaunched][-3000:]

        # success: one DELETE each by the instance itself, the log on the parent run
        assert procs[iid].returncode == 0, outs[iid][-4000:]
        assert [r.path for r in fake.destroys(iid)] == [f"/api/v0/instances/{iid}/"]
        assert fake.destroys(iid)[0].auth == f"Bearer container-key-{iid}"
        assert parent_run.data.tags[f"pagating.instance.{iid}"].startswith("finished")
        log = sweep_run.instance_log(auth_server.uri, iid)
        assert "dvc pull data.dvc" in log and "sweep shard 0/2 finished" in log, outs[iid][-3000:]
        assert "skipping the install of .[s3]" in log  # the S3 remote's plugin is what it would install
        assert "testing-secret-key-7b2e" not in log and GPU_PW not in log and GPU_PW[-100:] not in log

        # the instance that cannot destroy itself: it kept trying; watch destroyed it within two rounds
        mine = fake.destroys(refused)
        assert mine[0].status == 401 and mine[0].auth == f"Bearer container-key-{refused}", mine
        by_watch = [r for r in mine if r.auth == "Bearer sim-vast-key"]
        assert len(by_watch) == 1 and by_watch[0].status == 0
        rounds = [r for r in fake.calls("GET", "/api/v1/instances/") if mine[0].t < r.t < by_watch[0].t]
        assert len(rounds) <= 2, len(rounds)
        assert procs[refused].returncode == -9  # the sim ended: Vast took the container
        why = parent_run.data.tags[f"pagating.instance.{refused}"]
        assert why.startswith("failed: CUDA required") and why.endswith("destroyed by vast watch")

        # failures: non-zero exit, exactly one DELETE each, the log or the reason it has none
        expected = {"unknown commit": f"cannot check out commit {'f' * 40}",
                    "unreachable tracking server": "never reported",
                    "no CUDA": "CUDA required: found 0 usable CUDA GPU(s)",
                    "DVC remote without credentials": "dvc pull data.dvc failed"}
        for name, want in expected.items():
            assert procs[ids[name]].returncode != 0, (name, outs[ids[name]][-3000:])
            assert len(fake.destroys(ids[name])) == 1, (name, outs[ids[name]][-3000:])
            assert want in sweep_run.instance_log(auth_server.uri, ids[name]), (name, outs[ids[name]][-3000:])
        assert "expected 1; refusing to train on CPU" in outs[ids["no CUDA"]]

        # and `pagating vast logs <id>` shows the uploaded log once the instance is gone
        rc = cli.main(["vast", "logs", str(ids["no CUDA"])])
        out, _ = capsys.readouterr()
        assert rc == 0 and "CUDA required: found 0" in out
    print(f"instance simulation: {wall:.0f} s for two shards (one re-run) and five failures in parallel")
