"""A provider is its client and nothing else: a toy cloud kept in memory, registered here, runs
`pagating toy launch -> status -> watch -> destroy` through the shared flows of pagating/cloud/ against a
real MLflow server (the sweep's parent run, the instances' reports, the grid's progress)."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from pagating import cli
from pagating.cloud import env as cloud_env
from pagating.cloud import provider
from pagating.cloud.provider import UP, RequestLimits
from pagating.config import load_config

REPO_URL = "https://git.example.org/me/pagating.git"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class ToyCloud:
    """The whole provider: the client methods of pagating.cloud.provider.Provider over an in-memory cloud."""

    name = "toy"
    limits = RequestLimits(startup_chars=8192, env_entry_chars=4096, env_total_chars=65536, label_chars=128,
                           image_chars=512)
    poll_s = 0.1
    never_sent = ("TOY_API_KEY",)
    forwarded_env = ()

    def __init__(self):
        self.offers = [{"id": i, "gpu_name": "RTX 4090", "num_gpus": 1, "price": price, "min_bid": None,
                        "reliability": 0.99, "inet_down": 800, "disk_gb": 200, "cuda": 12.8, "where": "toyland",
                        "machine": i} for i, price in ((1, 0.30), (2, 0.20), (3, 0.25))]
        self.running: dict[int, dict] = {}
        self.destroyed: list[int] = []

    def search_offers(self, want):
        return [dict(o) for o in self.offers if o["machine"] not in want.exclude_machines]

    def hourly_rate(self, offer, interruptible, bid=None):
        return offer["price"]

    def credit(self):
        return 100.0

    def create(self, offer, label, *, image, disk_gb, env, startup, price, exclude=frozenset()):
        iid = 100 + len(self.running) + len(self.destroyed)
        self.running[iid] = {"id": iid, "label": label, "state": UP, "status": "running", "status_msg": "",
                             "started": time.time(), "bid": False, "outbid": False, "gpu_name": offer["gpu_name"],
                             "num_gpus": 1, "rate": offer["price"], "hours": 0.5, "env": dict(env),
                             "disk_gb": disk_gb, "image": image, "machine": offer["machine"]}
        return iid

    def destroy(self, instance_id):
        self.running.pop(instance_id, None)
        self.destroyed.append(instance_id)

    def instances(self):
        return list(self.running.values())

    def instance(self, instance_id):
        return self.running.get(instance_id)

    def logs(self, instance_id, tail):
        return f"toy instance {instance_id}: hello"


@pytest.fixture
def toy(env, tmp_path, mlflow_server):
    """The toy provider registered as `pagating toy`, a two-config sample grid, a git remote holding COMMIT,
    and the local MLflow server as the instances' tracking server."""
    cloud = ToyCloud()
    env.setattr(provider, "PROVIDERS", {**provider.PROVIDERS, "toy": lambda need_key: cloud})
    env.setattr(cloud_env, "check_tracking_uri", lambda uri: uri)  # the test server is on 127.0.0.1
    env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["sweep"]["sample"] = {"alpha_mode": ["static_0.5", "static_1.0"], "learning_rate": [1.0e-3]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bare = tmp_path / "remote.git"  # `git ls-remote REPO_URL` answers COMMIT (git's insteadOf, no network)
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    (bare / "refs" / "heads" / "main").write_text(COMMIT + "\n")
    for k, v in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.file://{bare}.insteadOf",
                 "GIT_CONFIG_VALUE_0": REPO_URL}.items():
        env.setenv(k, v)
    return cloud


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_toy_provider_runs_launch_status_watch_destroy_through_the_shared_flows(toy, capsys, mlflow_server):
    from mlflow.tracking import MlflowClient

    from pagating.grid import config_for, grid
    from pagating.identity import run_name

    sweep = f"toy{int(time.time() * 1000) % 10**8}"
    rc, out, err = run(capsys, "toy", "offers", "--profile", "sample", "--s-per-step", "0.05")
    assert rc == 0, err
    assert [ln.split()[0] for ln in out.splitlines()[2:]] == ["2", "3", "1"]  # cheapest projected sweep first

    rc, out, err = run(capsys, "toy", "launch", "--profile", "sample", "--instances", "2", "--s-per-step", "0.05",
                       "--repo", REPO_URL, "--commit", COMMIT, "--sweep-id", sweep, "--no-wait")
    assert rc == 0, err
    assert sorted(toy.running) == [100, 101] and "pagating toy watch" in out
    first, second = (toy.running[i] for i in (100, 101))
    assert [first["label"], second["label"]] == [f"pagating-{sweep}-0", f"pagating-{sweep}-1"]
    assert first["env"]["PAGATING_SHARD"] == "0/2" and first["env"]["PAGATING_COMMIT"] == COMMIT
    assert cloud_env.bootstrap_text().strip()  # what each create carried as its startup
    parent = first["env"]["PAGATING_PARENT_RUN_ID"]

    # What the instances do: shard 0 runs its config to the end and reports so; shard 1 is still running.
    client = MlflowClient(mlflow_server.uri)
    run_ = client.get_run(parent)
    names = [run_name(config_for(load_config("sample"), o)) for o in grid(load_config("sample"))]
    child = client.create_run(run_.info.experiment_id, run_name=names[0],
                              tags={"pagating.sweep_id": sweep, "mlflow.parentRunId": parent})
    client.set_terminated(child.info.run_id)
    client.set_tag(parent, "pagating.instance.100", "finished: shard 0/2")
    client.set_tag(parent, "pagating.instance.101", "running: sweep")

    rc, out, err = run(capsys, "toy", "status", "--sweep", sweep)
    assert rc == 0, err
    assert "STILL BILLING" in out and "running: sweep" in out and f"sweep {sweep}: 1/2 configs done" in out

    rc, out, err = run(capsys, "toy", "watch", "--once", "--sweep", sweep)
    assert rc == 0, err
    assert toy.destroyed == [100] and sorted(toy.running) == [101]  # it reported finished: gone; no relaunch
    assert client.get_run(parent).data.tags["pagating.instance.100"].endswith("destroyed by toy watch")

    rc, out, err = run(capsys, "toy", "destroy", "--sweep", sweep)
    assert rc == 0, err
    assert toy.destroyed == [100, 101] and toy.running == {}
    assert client.get_run(parent).data.tags["pagating.instance.101"] == "destroyed by toy destroy: by hand"
