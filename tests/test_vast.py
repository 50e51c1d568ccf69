"""`pagating vast`: the real vastai SDK against a fake Vast API on 127.0.0.1 (tests/fake_vast.py),
a real MLflow server where progress or measured step times are read, and onstart.sh under bash."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_vast import FakeVast, FakeVastServer, offer

from pagating import cli, cloud, vast, vast_cost, vast_watchdog
from pagating.config import UserError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
REPO_URL = "https://github.com/example/pagating.git"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRETS = {"VAST_API_KEY": "vast-key-7f3a9c", "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-51e2d0",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-c0ffee"}
REMOTE_URI = "https://mlflow.example.org"
# status/watch read progress from MLflow; point them at a closed local port, never the internet
NO_MLFLOW = ["--tracking-uri", "http://127.0.0.1:9"]
DVC_CONFIG = """\
[core]
    remote = storage
['remote "storage"']
    url = s3://example-bucket/pagating
"""
LAUNCH = ["vast", "launch", "--s-per-step", "0.05", "--repo", REPO_URL, "--commit", COMMIT, "--no-wait"]


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No key, tracking URI or Vast URL from the developer's shell; fast retries."""
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "VAST_", "PAGATING_", "AWS_", "CONTAINER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    # the project root launch reads: params.yaml and a committed DVC remote in the cloud
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(DVC_CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vast, "RETRY_BACKOFF_S", 0.01)
    return monkeypatch


@pytest.fixture
def fake(env):
    offers = [offer(11, 0.50), offer(12, 0.30), offer(13, 0.40), offer(14, 0.45)]
    server = FakeVastServer(FakeVast(offers=offers))
    with server as f:
        env.setenv("VAST_SERVER_URL", server.url)
        yield f


@pytest.fixture
def keyed(fake, env):
    """Key and a remote tracking server with credentials: everything launch checks before it
    writes anything."""
    env.setenv("VAST_API_KEY", SECRETS["VAST_API_KEY"])
    env.setenv("MLFLOW_TRACKING_URI", REMOTE_URI)
    env.setenv("MLFLOW_TRACKING_USERNAME", "gpu-runner")
    env.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["MLFLOW_TRACKING_PASSWORD"])
    return fake


@pytest.fixture
def launchable(keyed, env, mlflow_server):
    """`keyed`, with a tracking server that answers (the sweep's parent run is made before renting):
    the local test server, which the instance-reachability check would refuse, so that check is off."""
    env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    env.setattr(cloud, "check_tracking_uri", lambda uri: uri)
    env.setattr(vast, "POLL_S", 0.3)
    return keyed


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def search_body(fake):
    calls = fake.calls("POST", "/api/v0/bundles/")
    assert calls, "no offer search was sent"
    return calls[-1].body


# ---- offers ---------------------------------------------------------------------------------

def test_offers_query_carries_the_seed_filters(fake, capsys):
    rc, out, _ = run(capsys, "vast", "offers")
    assert rc == 0
    q = search_body(fake)
    cloud = load_config("wikitext103")["cloud"]
    assert q["gpu_name"] == {"eq": cloud["gpu_name"]} == {"eq": "RTX 4090"}
    assert q["reliability"] == {"gte": 0.95}
    assert q["disk_space"] == {"gte": 50}
    assert q["inet_down"] == {"gte": 100}
    assert q["num_gpus"] == {"eq": 1}
    assert q["type"] == "on-demand"
    assert q["rentable"] == {"eq": True} and q["rented"] == {"eq": False}
    assert q["allocated_storage"] == 50
    assert fake.calls("POST")[-1].auth is None  # searching needs no account
    assert "offer" in out and "$ sweep" in out


def test_offers_flags_override_every_filter(fake, capsys):
    rc, _, _ = run(capsys, "vast", "offers", "--gpu-name", "RTX 3090", "--min-reliability", "0.99",
                   "--min-disk-gb", "80", "--min-inet-down", "500", "--num-gpus", "2", "--interruptible")
    assert rc == 0
    q = search_body(fake)
    assert q["gpu_name"] == {"eq": "RTX 3090"}
    assert q["reliability"] == {"gte": 0.99}
    assert q["disk_space"] == {"gte": 80}
    assert q["inet_down"] == {"gte": 500}
    assert q["num_gpus"] == {"eq": 2}
    assert q["type"] == "bid"


def test_vast_set_and_flags_override_cloud_settings(fake, capsys):
    rc, _, _ = run(capsys, "vast", "offers", "--set", "cloud.gpu_name=RTX 3090", "--set", "cloud.min_disk_gb=70",
                   "--min-reliability", "0.9")
    assert rc == 0
    q = search_body(fake)
    assert q["gpu_name"] == {"eq": "RTX 3090"} and q["disk_space"] == {"gte": 70} and q["reliability"] == {"gte": 0.9}


@pytest.mark.parametrize("verb", ["offers", "launch"])
def test_vast_set_takes_cloud_settings_only(keyed, capsys, verb):
    # the instance runs the committed params.yaml: a local train/model change would be projected, not run
    rc, _, err = run(capsys, "vast", verb, "--set", "train.max_steps=5")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--set train.max_steps" in err and "cloud.*" in err and not keyed.calls("POST")


def test_offers_ranked_by_projected_sweep_cost_not_hourly_price(fake, capsys):
    # The 3090 is cheaper per hour but ~2x slower per step (71 vs 165 peak TFLOPS): the whole sweep costs more on it.
    fake.offers = [offer(21, 0.35, gpu="RTX 3090"), offer(22, 0.45), offer(23, 0.60)]
    rc, out, _ = run(capsys, "vast", "offers", "--gpu-name", "any")
    assert rc == 0
    assert "gpu_name" not in search_body(fake)
    rows = [ln.split() for ln in out.splitlines() if ln[:2] in ("21", "22", "23")]
    assert [r[0] for r in rows] == ["22", "23", "21"]
    cfg = load_config("wikitext103")
    for row in rows:
        o = next(o for o in fake.offers if str(o["id"]) == row[0])
        s = vast_cost.estimated_step_time(cfg, o["gpu_name"])
        hours = vast_cost.instance_hours(cfg, vast_cost.grid_size(cfg), 1, s)
        assert float(row[-1]) == pytest.approx(o["dph_total"] * hours, abs=0.006)
        assert float(row[-2]) == pytest.approx(hours, abs=0.06)


def test_offers_projection_uses_grid_and_max_steps():
    cfg = load_config("wikitext103")
    assert vast_cost.grid_size(cfg) == 10
    s = vast_cost.estimated_step_time(cfg, "RTX 4090")
    assert 0.03 <= s <= 0.07  # conservative vs ~0.03 measured elsewhere for GPT-2 small on a 4090
    hours = vast_cost.instance_hours(cfg, 10, 1, 0.05)
    expected = 10 * 20000 * 0.05 * (1 + vast_cost.eval_overhead(cfg)) / 3600 + vast_cost.SETUP_HOURS
    assert hours == pytest.approx(expected)
    assert vast_cost.instance_hours(cfg, 10, 2, 0.05) < hours  # two GPUs run two configs at once


def test_whole_split_eval_counts_in_the_projection(tmp_path):
    # max_eval_batches 0 = the whole validation split: its batches come from the prepared meta, or from the
    # source's known size when the launcher has not prepared the data.
    cfg = load_config("wikitext103", {"data.prepared_dir": str(tmp_path / "absent")})
    assert cfg["train"]["max_eval_batches"] == 0
    guess = vast_cost.eval_batches(cfg)
    assert guess == math.ceil(250_000 // 128 / 16)
    assert vast_cost.eval_overhead(cfg) == pytest.approx(guess / 1000 / 3)
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "meta.json").write_text(json.dumps({"splits": {"validation": {"blocks": 320}}}))
    assert vast_cost.eval_batches(cfg) == 20
    capped = load_config("wikitext103", {"train.max_eval_batches": 7})
    assert vast_cost.eval_batches(capped) == 7


@pytest.mark.slow
def test_offers_use_step_times_measured_in_mlflow(fake, env, capsys, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("pagating-vasttest")
    exp_id = exp.experiment_id if exp else client.create_experiment("pagating-vasttest")
    cfg = load_config("wikitext103")
    shape = {"model.n_layer": "12", "model.n_embd": "768", "data.block_size": "128", "train.batch_size": "16"}

    def logged(gpu, values, params):
        run = client.create_run(exp_id, tags={"gpu.name": gpu})
        for step, v in enumerate(values):
            client.log_metric(run.info.run_id, "perf/step_time_s", v, step=step)
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id)

    logged("NVIDIA GeForce RTX 4090", [0.9, 0.020], shape)            # last value counts
    logged("NVIDIA GeForce RTX 4090", [0.040], shape)
    logged("NVIDIA GeForce RTX 4090", [5.0], {**shape, "model.n_layer": "2"})  # another model shape
    logged("NVIDIA A100-SXM4-80GB", [7.0], shape)                     # another GPU
    times, note = vast_cost.step_times(cfg, ["RTX 4090", "RTX 3090"], mlflow_server.uri)
    assert note is None
    assert times["RTX 4090"].seconds == pytest.approx(0.030)
    assert times["RTX 4090"].source == "measured (2 runs)"
    assert times["RTX 3090"].source == "estimate"

    env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    rc, out, _ = run(capsys, "vast", "offers")
    assert rc == 0
    assert "0.0300" in out and "measured (2 runs)" in out


def test_offers_fall_back_to_estimate_when_mlflow_is_unreachable(fake, env, capsys):
    env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.time()
    rc, out, err = run(capsys, "vast", "offers")
    assert rc == 0 and "estimate" in out and "could not read measured s/step" in err
    assert time.time() - t0 < 20


# ---- launch ---------------------------------------------------------------------------------

def test_launch_create_request_has_image_disk_env_label_onstart(launchable, capsys):
    rc, out, err = run(capsys, *LAUNCH, "--env", f"AWS_SECRET_ACCESS_KEY={SECRETS['AWS_SECRET_ACCESS_KEY']}",
                       "--sweep-id", "t1")
    assert rc == 0, err
    creates = launchable.creates()
    assert len(creates) == 1
    req = creates[0]
    assert req.path == "/api/v0/asks/12/"  # the cheapest offer
    body = req.body
    cloud_cfg = load_config("wikitext103")["cloud"]
    assert body["image"] == cloud_cfg["image"]
    assert body["disk"] == cloud_cfg["min_disk_gb"]
    assert body["label"] == "pagating-t1-0"
    assert body["onstart"] == cloud.bootstrap_text()  # the short bootstrap; onstart.sh comes from the commit
    assert "exec bash scripts/onstart.sh" in body["onstart"] and len(body["onstart"]) <= vast.LIMITS.startup_chars
    assert body["runtype"] == "ssh_proxy"
    assert body.get("price") is None  # on-demand
    e = body["env"]
    assert e["PAGATING_REPO"] == REPO_URL and e["PAGATING_COMMIT"] == COMMIT
    assert e["PAGATING_PROFILE"] == "wikitext103" and e["PAGATING_SHARD"] == "0/1"
    assert e["PAGATING_SWEEP_ID"] == "t1"
    assert e["PAGATING_USD_PER_HOUR"] == "0.3000"
    assert e["PAGATING_BUDGET_USD"] == "50.00"
    assert e["MLFLOW_TRACKING_URI"] == os.environ["MLFLOW_TRACKING_URI"]
    assert e["MLFLOW_TRACKING_USERNAME"] == "gpu-runner"
    assert e["PAGATING_CUDA_GPUS"] == "1" and e["PAGATING_PARENT_RUN_ID"]
    assert e["MLFLOW_TRACKING_PASSWORD"] == SECRETS["MLFLOW_TRACKING_PASSWORD"]
    assert e["AWS_SECRET_ACCESS_KEY"] == SECRETS["AWS_SECRET_ACCESS_KEY"]
    # secrets only in env: never in the onstart text, the label, or anything printed
    for secret in SECRETS.values():
        assert secret not in body["onstart"] and secret not in body["label"]
        assert secret not in out and secret not in err
    # the account key authenticates requests; it is never sent to the instance
    assert SECRETS["VAST_API_KEY"] not in json.dumps(body)
    assert req.auth == f"Bearer {SECRETS['VAST_API_KEY']}"
    assert "rented instance 5001" in out


@pytest.mark.parametrize("config", ["", "[core]\n    remote = here\n['remote \"here\"']\n    url = /srv/dvc\n"])
def test_launch_refuses_data_the_instance_cannot_pull(keyed, capsys, tmp_path, config):
    (tmp_path / ".dvc" / "config").write_text(config)
    rc, _, err = run(capsys, *LAUNCH)
    assert rc == 2 and keyed.requests == [] and "DVC remote" in err


def test_sample_profile_needs_no_dvc_remote(launchable, capsys, tmp_path):
    (tmp_path / ".dvc" / "config").write_text("")
    rc, _, err = run(capsys, *LAUNCH, "--profile", "sample")
    assert rc == 0, err
    e = launchable.creates()[0].body["env"]
    assert e["PAGATING_DATA"] == "sample" and e["PAGATING_PROFILE"] == "sample"


def test_the_default_remote_is_read_from_the_committed_dvc_config(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(DVC_CONFIG)
    assert cloud.dvc_default_remote(tmp_path) == ("storage", "s3://example-bucket/pagating")
    assert cloud.data_env(load_config("wikitext103"), tmp_path) == {}


def test_launch_dry_run_prints_masked_env_and_rents_nothing(keyed, capsys):
    aws = f"AWS_SECRET_ACCESS_KEY={SECRETS['AWS_SECRET_ACCESS_KEY']}"
    rc, out, err = run(capsys, *LAUNCH, "--dry-run", "--env", aws)
    assert rc == 0, err
    assert keyed.calls("PUT", "/api/v0/asks/") == []
    assert "MLFLOW_TRACKING_PASSWORD=***" in out and "AWS_SECRET_ACCESS_KEY=***" in out
    assert "PAGATING_COMMIT=" + COMMIT in out
    assert cloud.bootstrap_text().strip() in out
    assert "projected total $" in out and "nothing rented" in out
    for secret in SECRETS.values():
        assert secret not in out and secret not in err


def test_onstart_text_carries_no_secret_and_stays_small(env):
    for name, value in SECRETS.items():
        env.setenv(name, value)
    text = cloud.bootstrap_text()
    assert all(v not in text for v in SECRETS.values())
    assert text.startswith("#!/bin/bash") and "\n#" not in text
    assert len(text) <= vast.LIMITS.startup_chars == 4096


@pytest.mark.parametrize("case", ["missing key", "over budget", "low credit", "sqlite", "file", "plain path",
                                  "loopback", "localhost", "private", "no uri", "http with password",
                                  "http with token"])
def test_refusals_exit_2_before_renting(keyed, env, capsys, case):
    argv = list(LAUNCH)
    if case == "missing key":
        env.delenv("VAST_API_KEY")
    elif case == "over budget":
        argv += ["--budget", "0.5"]
    elif case == "low credit":
        keyed.credit = 0.5
    elif case == "no uri":
        env.delenv("MLFLOW_TRACKING_URI")
    elif case == "http with token":
        env.delenv("MLFLOW_TRACKING_PASSWORD")
        env.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-token-9d1e")
        env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org")
    else:
        uri = {"sqlite": "sqlite:///mlflow.db", "file": "file:///tmp/mlruns", "plain path": "/tmp/mlruns",
               "loopback": "http://127.0.0.1:5000", "localhost": "https://localhost:5000",
               "private": "https://192.168.1.20:5000", "http with password": "http://mlflow.example.org"}[case]
        env.setenv("MLFLOW_TRACKING_URI", uri)
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert keyed.calls("PUT", "/api/v0/asks/") == [] and keyed.creates() == []
    assert err.startswith("pagating vast: error: ") and err.count("\n") == 1
    if case == "missing key":
        assert keyed.requests == []  # refused before talking to Vast at all
    for secret in SECRETS.values():
        assert secret not in out + err


def test_http_without_password_and_https_are_accepted(env):
    env.setenv("MLFLOW_TRACKING_PASSWORD", "x")
    assert cloud.check_tracking_uri("https://mlflow.example.org:8443") == "https://mlflow.example.org:8443"
    env.delenv("MLFLOW_TRACKING_PASSWORD")
    assert cloud.check_tracking_uri("http://mlflow.example.org") == "http://mlflow.example.org"


def test_error_after_creation_destroys_the_created_instance(launchable, capsys):
    launchable.fail("PUT", "/api/v0/asks/13/", 400)  # the second instance's offer is gone
    rc, out, err = run(capsys, *LAUNCH, "--instances", "2", "--sweep-id", "t2")
    assert rc == 1
    assert [r.path for r in launchable.creates()] == ["/api/v0/asks/12/"]
    assert [r.path for r in launchable.destroys()] == ["/api/v0/instances/5001/"]
    assert "destroying 5001" in err


def test_failure_to_confirm_a_created_instance_destroys_it(launchable, capsys):
    launchable.fail("GET", "/api/v0/instances/5001/", *[500] * vast.RETRY_ATTEMPTS)
    rc, _, err = run(capsys, *LAUNCH)
    assert rc == 1
    assert len(launchable.creates()) == 1
    assert [r.path for r in launchable.destroys()] == ["/api/v0/instances/5001/"]


def test_429_and_5xx_answers_are_retried(launchable, capsys):
    launchable.fail("POST", "/api/v0/bundles/", 429, 503)
    launchable.fail("GET", "/api/v0/users/current", 502)
    launchable.fail("PUT", "/api/v0/asks/", 500)
    rc, out, err = run(capsys, *LAUNCH)
    assert rc == 0, err
    assert len(launchable.calls("POST", "/api/v0/bundles/")) == 3
    assert len(launchable.calls("GET", "/api/v0/users/current")) == 2
    assert len(launchable.calls("PUT", "/api/v0/asks/")) == 2 and len(launchable.creates()) == 1
    assert "answered HTTP 429" in err and "answered HTTP 500" in err


def test_a_create_whose_answer_was_lost_is_adopted_not_doubled(launchable, capsys):
    launchable.lose_create_answers = 1  # rented, but the reply was a 500
    rc, out, err = run(capsys, *LAUNCH, "--sweep-id", "t3")
    assert rc == 0, err
    assert len(launchable.creates()) == 1 and launchable.destroys() == []
    assert "rented instance 5001 (pagating-t3-0)" in out


def test_retries_give_up_with_one_line(keyed, capsys):
    keyed.fail("POST", "/api/v0/bundles/", *[503] * vast.RETRY_ATTEMPTS)
    rc, _, err = run(capsys, *LAUNCH)
    assert rc == 1 and keyed.creates() == []
    assert err.strip().splitlines()[-1].startswith("pagating vast: Vast.ai search_offers failed: HTTP 503")


def test_three_instances_run_shards_0_1_2_of_3(launchable, capsys):
    rc, out, err = run(capsys, *LAUNCH, "--instances", "3", "--sweep-id", "t4")
    assert rc == 0, err
    creates = launchable.creates()
    assert len(creates) == 3
    assert [c.body["env"]["PAGATING_SHARD"] for c in creates] == ["0/3", "1/3", "2/3"]
    assert [c.body["label"] for c in creates] == ["pagating-t4-0", "pagating-t4-1", "pagating-t4-2"]
    assert len({c.path for c in creates}) == 3  # three different machines
    assert {c.body["env"]["PAGATING_BUDGET_USD"] for c in creates} == {f"{50 / 3:.2f}"}
    assert vast_cost.shard_sizes(10, 3) == [4, 3, 3]


def test_interruptible_launch_bids(launchable, capsys):
    rc, _, err = run(capsys, *LAUNCH, "--interruptible")
    assert rc == 0, err
    assert search_body(launchable)["type"] == "bid"
    body = launchable.creates()[0].body
    cheapest = min(launchable.offers, key=lambda o: o["min_bid"])
    assert body["price"] == pytest.approx(round(cheapest["min_bid"] * vast.BID_MARGIN, 4))
    assert body["env"]["PAGATING_INTERRUPTIBLE"] == "1"


def test_more_instances_than_configs_is_refused(keyed, capsys):
    rc, _, err = run(capsys, *LAUNCH, "--instances", "11")
    assert rc == 2 and keyed.requests == []


# ---- status, watch, logs, destroy ------------------------------------------------------------

def _instance_env(sweep, shard, profile="sample", budget="10.00", uri=None):
    env = {"PAGATING_PROFILE": profile, "PAGATING_SHARD": shard, "PAGATING_SWEEP_ID": sweep,
           "PAGATING_BUDGET_USD": budget, "PAGATING_USD_PER_HOUR": "0.4000",
           "MLFLOW_TRACKING_PASSWORD": SECRETS["MLFLOW_TRACKING_PASSWORD"]}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return [[k, v] for k, v in env.items()]


@pytest.mark.slow
def test_status_shows_instances_and_sweep_progress(keyed, env, capsys, mlflow_server):
    from mlflow.tracking import MlflowClient

    sweep = f"st{int(time.time() * 1000) % 10**8}"
    keyed.add_instance(901, label=f"pagating-{sweep}-0", dph_total=0.4, start_date=time.time() - 3600,
                       extra_env=_instance_env(sweep, "0/2", uri=mlflow_server.uri))
    keyed.add_instance(902, label=f"pagating-{sweep}-1", is_bid=True, cur_state="stopped",
                       start_date=time.time(), actual_status="exited", extra_env=_instance_env(sweep, "1/2"))
    keyed.add_instance(903, label="someone-else", extra_env=[])
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("pagating-vasttest")
    exp_id = exp.experiment_id if exp else client.create_experiment("pagating-vasttest")
    parent = client.create_run(exp_id, run_name=f"sweep {sweep}", tags={"pagating.sweep_id": sweep})
    for i, status in enumerate(["FINISHED", "FINISHED", "RUNNING"]):
        child = client.create_run(exp_id, run_name=f"cfg{i}", tags={
            "pagating.sweep_id": sweep, "mlflow.parentRunId": parent.info.run_id,
            "pagating.config_hash": f"h{i}"})
        client.log_param(child.info.run_id, "train.max_steps", "120")
        client.log_metric(child.info.run_id, "perf/step_time_s", 0.5, step=10)
        for step in (10, 20, 30):
            client.log_metric(child.info.run_id, "train/loss", 3.0 - step / 100, step=step)
        if status == "FINISHED":
            client.set_terminated(child.info.run_id)
    env.delenv("MLFLOW_TRACKING_URI")  # progress comes from the instance's tracking URI
    capsys.readouterr()  # the client's own "View run" lines
    rc, out, err = run(capsys, "vast", "status")
    assert rc == 0, err
    assert "901" in out and "902" in out and "903" not in out
    assert "OUTBID" in out and "pagating vast watch" in out
    assert f"sweep {sweep}: 2/10 configs done; cfg2 step 30/120" in out
    # remaining: 7 waiting x 120 + 90 steps, 0.5 s/step, one GPU not outbid -> 930 * 0.5 / 3600 h
    assert f"ETA ~{930 * 0.5 / 3600:.1f} h at 0.5000 s/step" in out
    assert "$ so far 0.40" in out
    assert SECRETS["MLFLOW_TRACKING_PASSWORD"] not in out + err


def test_watch_destroys_outbid_instance_and_relaunches_its_shard(keyed, capsys):
    keyed.add_instance(950, label="pagating-w1-1", is_bid=True, cur_state="stopped", actual_status="exited",
                       machine_id=1011, dph_total=0.5, start_date=time.time() - 3600, disk_space=60,
                       image_uuid="ghcr.io/example/pagating:1", extra_env=_instance_env("w1", "1/2"))
    keyed.add_instance(951, label="pagating-w1-0", is_bid=True, extra_env=_instance_env("w1", "0/2"))
    rc, out, err = run(capsys, "vast", "watch", "--once", "--sweep", "w1", *NO_MLFLOW)
    assert rc == 0, err
    assert [r.path for r in keyed.destroys()] == ["/api/v0/instances/950/"]
    q = search_body(keyed)
    assert q["type"] == "bid" and q["machine_id"] == {"notin": [1011]}
    (create,) = keyed.creates()
    assert create.path != "/api/v0/asks/11/"  # offer 11 is the outbid machine (1011)
    body = create.body
    assert body["label"] == "pagating-w1-1" and body["env"]["PAGATING_SHARD"] == "1/2"
    assert body["image"] == "ghcr.io/example/pagating:1" and body["disk"] == 60
    assert body["price"] is not None
    assert float(body["env"]["PAGATING_BUDGET_USD"]) == pytest.approx(10 - 0.5, abs=0.02)
    assert "relaunched as 5001" in out


def test_relaunch_is_safe_to_repeat(keyed, capsys):
    # A replacement already runs under the label (an earlier round rented it, then its destroy failed).
    keyed.add_instance(952, label="pagating-w2-0", is_bid=True, cur_state="stopped", actual_status="exited",
                       extra_env=_instance_env("w2", "0/1"))
    keyed.add_instance(953, label="pagating-w2-0", is_bid=True, extra_env=_instance_env("w2", "0/1"))
    rc, out, _ = run(capsys, "vast", "status", "--relaunch", "--sweep", "w2", *NO_MLFLOW)
    assert rc == 0
    assert keyed.creates() == [] and [r.path for r in keyed.destroys()] == ["/api/v0/instances/952/"]


def test_a_failed_relaunch_keeps_the_outbid_instance_for_the_next_round(keyed, capsys):
    keyed.add_instance(954, label="pagating-w3-0", is_bid=True, cur_state="stopped", actual_status="exited",
                       extra_env=_instance_env("w3", "0/1"))
    keyed.fail("PUT", "/api/v0/asks/", 400, 400)
    rc, out, _ = run(capsys, "vast", "watch", "--once", "--sweep", "w3", *NO_MLFLOW)
    assert rc == 0 and "relaunch failed" in out
    assert keyed.destroys() == []  # still listed: the next round relaunches it


def test_logs_prints_the_instance_log(keyed, capsys):
    keyed.add_instance(960, label="pagating-l1-0")
    rc, out, _ = run(capsys, "vast", "logs", "960")
    assert rc == 0 and "hello from the fake instance" in out
    assert keyed.calls("PUT", "/api/v0/instances/request_logs/960/")


def test_destroy_by_sweep_and_by_id(keyed, capsys):
    keyed.add_instance(970, label="pagating-d1-0")
    keyed.add_instance(971, label="pagating-d1-1")
    keyed.add_instance(972, label="pagating-d2-0")
    rc, _, _ = run(capsys, "vast", "destroy", "--sweep", "d1")
    assert rc == 0
    assert sorted(r.path for r in keyed.destroys()) == ["/api/v0/instances/970/", "/api/v0/instances/971/"]
    rc, _, _ = run(capsys, "vast", "destroy", "972")
    assert rc == 0 and len(keyed.destroys(972)) == 1
    rc, _, err = run(capsys, "vast", "destroy")
    assert rc == 2 and "say what to destroy" in err


# ---- the watchdog -----------------------------------------------------------------------------

def test_watchdog_destroys_at_the_budget_once(fake, env, tmp_path):
    env.setenv("CONTAINER_ID", "5555")
    env.setenv("CONTAINER_API_KEY", "container-key")
    state = tmp_path / "state"
    reason = vast_watchdog.watch([tmp_path], budget_usd=1.0, usd_per_hour=3600.0, started_at=time.time() - 2,
                                 stall_s=1000, poll_s=0.05, lock_dir=state)
    assert "reached the budget" in reason
    (req,) = fake.destroys(5555)
    assert req.auth == "Bearer container-key"
    assert vast_watchdog.destroy_self(state) is True  # onstart.sh's trap after it: no second call
    assert len(fake.destroys(5555)) == 1


def test_watchdog_destroys_when_training_stalls(fake, env, tmp_path):
    env.setenv("CONTAINER_ID", "5556")
    env.setenv("CONTAINER_API_KEY", "container-key")
    t0 = time.time()
    reason = vast_watchdog.watch([tmp_path / "outputs"], budget_usd=0, usd_per_hour=1.0, started_at=t0,
                                 stall_s=0.3, poll_s=0.05, lock_dir=tmp_path / "state")
    assert reason.startswith("no progress") and time.time() - t0 >= 0.3
    assert len(fake.destroys(5556)) == 1


def test_watchdog_counts_file_changes_as_progress(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "spool.jsonl").write_text("x")
    newest = vast_watchdog.newest_mtime([out])
    assert newest >= time.time() - 5
    assert vast_watchdog.check(newest + 10, newest, 0.0, 0.0, newest, stall_s=60) is None
    assert "no progress" in vast_watchdog.check(newest + 61, newest, 0.0, 0.0, newest, stall_s=60)


def test_watchdog_stops_when_onstart_is_gone(fake, env, tmp_path):
    env.setenv("CONTAINER_ID", "5557")
    env.setenv("CONTAINER_API_KEY", "k")
    proc = subprocess.Popen(["true"])
    proc.wait()
    reason = vast_watchdog.watch([tmp_path], 1.0, 1.0, time.time(), 1000, poll_s=0.05, pid=proc.pid)
    assert reason == "parent exited" and fake.destroys() == []


# ---- onstart.sh under bash ----------------------------------------------------------------------

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
                "PAGATING_SKIP_CHECKOUT": "1", "PAGATING_SKIP_INSTALL": "1", "PAGATING_BUDGET_USD": "5",
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
        prog = cloud.sweep_progress(mlflow_server.uri, sweep_id, {**cfg, "sweep": params["sweep"]["sample"]})
        assert prog["done"] == prog["total"] == 2 and prog["running"] == []


# ---- Vast's create-request limits and rate limit (the fake enforces them like Vast) ------------

def test_fake_vast_refuses_what_vast_refuses(fake):
    import requests

    url = f"{fake.url}/api/v0/asks/11/"
    big = {"image": "img", "onstart": "x" * 4097, "env": {}}
    r = requests.put(url, json=big, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_args" and "4096" in r.json()["msg"]
    for body in ({"image": "img", "env": {"A": "v" * 255}}, {"image": "i" * 1025}, {"image": "i", "label": "l" * 257}):
        assert requests.put(url, json=body, timeout=10).status_code == 400
    fake.rate_limit = 4.5
    answers = [requests.get(f"{fake.url}/api/v0/instances/{i}/", timeout=10).status_code for i in range(12)]
    assert answers[:9] == [200] * 9 and 429 in answers[9:]
    assert not fake.creates()


def test_launch_with_the_longest_realistic_inputs_is_accepted(launchable, env, capsys, mlflow_server):
    launchable.offers = [offer(30 + i, 0.30 + i / 100) for i in range(10)]
    # a private repo cloned with a token, a tracking URI carrying a long user and password,
    # DVC credentials, 8 bid instances
    repo = ("https://x-access-token:ghp_" + "A1b2C3d4E5" * 4 + "@github.com/"
            "some-research-group-with-a-long-name/pagating-gpt2-gating-experiments-fork.git")
    host = mlflow_server.uri.split("//", 1)[1]
    env.setenv("MLFLOW_TRACKING_URI", f"http://gpu-runner-for-the-long-sweep:{'p' * 64}@{host}")
    env.setenv("MLFLOW_TRACKING_PASSWORD", "q" * 64)
    env.setenv("AWS_ACCESS_KEY_ID", "AKIA" + "X" * 16)
    env.setenv("AWS_SECRET_ACCESS_KEY", "s" * 40)
    rc, out, err = run(capsys, "vast", "launch", "--s-per-step", "0.05", "--repo", repo, "--commit", COMMIT,
                       "--instances", "8", "--interruptible", "--no-wait", "--env", "AWS_ACCESS_KEY_ID",
                       "--env", "AWS_SECRET_ACCESS_KEY")
    assert rc == 0, err
    puts = launchable.calls("PUT", "/api/v0/asks/")
    assert len(launchable.creates()) == 8 and [r.status for r in puts] == [0] * 8  # no 400, no 429
    for req in launchable.creates():
        body = req.body
        assert len(body["onstart"]) <= 4096 and body["env"]["PAGATING_REPO"] == repo
        assert max(len(f"{k}={v}") for k, v in body["env"].items()) <= 256
    for secret in ("ghp_", "p" * 64, "q" * 64, "s" * 40):
        assert secret not in out + err


def test_an_env_value_over_vasts_limit_is_refused_before_renting(launchable, capsys):
    repo = "https://github.com/" + "x" * 250 + "/pagating.git"
    rc, _, err = run(capsys, *LAUNCH[:5], repo, *LAUNCH[6:])
    assert rc == 2 and "PAGATING_REPO" in err and "256" in err
    assert launchable.calls("PUT", "/api/v0/asks/") == []


# ---- CUDA or nothing ------------------------------------------------------------------------------

def test_offers_are_filtered_by_the_hosts_cuda_against_the_images(fake, capsys):
    fake.offers = [offer(41, 0.20, cuda_max_good=12.2), offer(42, 0.40, cuda_max_good=12.4),
                   offer(43, 0.30, cuda_max_good=12.8)]
    rc, out, _ = run(capsys, "vast", "offers")
    assert rc == 0
    assert search_body(fake)["cuda_max_good"] == {"gte": 12.4}  # pytorch/pytorch:...-cuda12.4-...
    ids = [ln.split()[0] for ln in out.splitlines() if ln.split()[:1] in (["41"], ["42"], ["43"])]
    assert ids == ["43", "42"]  # 41's driver cannot run CUDA 12.4, even if the API returned it
    rc, _, _ = run(capsys, "vast", "offers", "--image", "ghcr.io/me/pagating:abc", "--image-cuda", "12.6")
    assert search_body(fake)["cuda_max_good"] == {"gte": 12.6}
    assert vast.image_cuda("ghcr.io/me/pagating:abc", 12.4) == 12.4


def test_no_cuda_where_cuda_is_required_is_one_line_and_no_cpu_fallback(monkeypatch):
    from pagating import instance, sweep

    monkeypatch.delenv(instance.TEST_ALLOW_CPU_ENV, raising=False)
    monkeypatch.delenv(instance.CUDA_ENV, raising=False)
    assert instance.check_cuda() == (True, "CUDA: not required here")
    assert sweep.parse_gpus("auto") == [None]  # a laptop: the CPU slot
    monkeypatch.setenv(instance.CUDA_ENV, "2")
    ok, line = instance.check_cuda()
    assert not ok and "\n" not in line
    assert line.startswith("CUDA required: found 0 usable CUDA GPU(s)") and "expected 2" in line
    with pytest.raises(UserError, match="CUDA required"):
        sweep.parse_gpus("auto")
    monkeypatch.setenv(instance.TEST_ALLOW_CPU_ENV, "1")
    assert instance.check_cuda()[0] and sweep.parse_gpus("auto") == [None]


def test_the_dvc_plugin_extra_of_each_remote_kind_is_a_project_extra():
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from pagating.instance import dvc_extra

    for url, extra, plugin in [("s3://b/p", "s3", "dvc-s3"), ("gs://b/p", "gs", "dvc-gs"),
                               ("azure://c/p", "azure", "dvc-azure"), ("ssh://u@h/srv/dvc", "ssh", "dvc-ssh"),
                               ("https://h/dvc", "http", "dvc-http"), ("/srv/dvc", "", None)]:
        assert dvc_extra(url) == extra
        if plugin:
            assert any(dep.startswith(plugin) for dep in extras[extra])
            for doc in ("README.md", "docs/vast.md"):  # the docs name each extra for its remote
                assert f"pagating[{extra}]" in (REPO_ROOT / doc).read_text(), (doc, extra)
    with pytest.raises(ValueError, match="no DVC plugin"):
        dvc_extra("webdav://h/p")


# ---- no instance left billing ---------------------------------------------------------------------

def test_launch_destroys_an_instance_that_never_starts(launchable, env, capsys):
    # new fake instances sit in `loading` (an image pull that never ends) and never report in
    rc, out, err = run(capsys, *[a for a in LAUNCH if a != "--no-wait"], "--start-timeout", "0.02")
    assert rc == 1
    assert [r.path for r in launchable.destroys()] == ["/api/v0/instances/5001/"]
    assert "instance 5001: not started after" in err and "loading" in err


def test_launch_returns_once_the_instance_reported_in(launchable, env, capsys, mlflow_server):
    from mlflow.tracking import MlflowClient

    def instance_starts():  # what the bootstrap does: it runs, then tags the parent run
        deadline = time.time() + 30
        while time.time() < deadline:
            inst = launchable.instances.get(5001)
            env_ = dict((inst or {}).get("extra_env") or [])
            if env_.get("PAGATING_PARENT_RUN_ID"):
                time.sleep(0.5)
                inst["actual_status"] = "running"
                MlflowClient(mlflow_server.uri).set_tag(env_["PAGATING_PARENT_RUN_ID"], "pagating.instance.5001",
                                                        "started: checking out")
                return
            time.sleep(0.1)

    import threading

    t = threading.Thread(target=instance_starts)
    t.start()
    rc, out, err = run(capsys, *[a for a in LAUNCH if a != "--no-wait"], "--start-timeout", "1")
    t.join()
    assert rc == 0, err
    assert "instance 5001: running, reported in (started: checking out)" in out
    assert launchable.destroys() == []


def test_watch_destroys_stuck_instances_and_retries_a_failed_destroy(keyed, env, capsys):
    keyed.add_instance(980, label="pagating-s1-0", actual_status="loading", start_date=time.time() - 3600,
                       status_msg="Error response from daemon: pull access denied",
                       extra_env=_instance_env("s1", "0/3"))
    keyed.add_instance(981, label="pagating-s1-1", actual_status="loading", start_date=time.time(),
                       extra_env=_instance_env("s1", "1/3"))
    keyed.add_instance(982, label="pagating-s2-0", actual_status="running", start_date=time.time() - 3600,
                       extra_env=_instance_env("s2", "0/1"))  # another sweep, running: left alone
    keyed.fail("DELETE", "/api/v0/instances/980/", *[500] * vast.RETRY_ATTEMPTS)  # the first destroy fails
    rc, out, _ = run(capsys, "vast", "watch", "--sweep", "s1", "--interval", "0.3", "--start-timeout", "0.05",
                     *NO_MLFLOW)  # it runs until every instance of the sweep is gone
    assert rc == 0 and "all instances are gone" in out
    assert "pull access denied" in out and "retrying next round" in out
    assert len(keyed.destroys(980)) == vast.RETRY_ATTEMPTS + 1  # failed attempts, then the retry that went through
    assert len(keyed.destroys(981)) == 1  # loading past the (short) timeout as well
    assert keyed.destroys(982) == []


def test_logs_of_a_gone_instance_come_from_its_parent_run(keyed, env, capsys, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("pagating-vasttest")
    exp_id = exp.experiment_id if exp else client.create_experiment("pagating-vasttest")
    parent = client.create_run(exp_id, tags={"pagating.instance.7701": "finished: shard 0/1",
                                             "pagating.instance.7702": "created: waiting for the instance",
                                             "pagating.instance.7703": "failed: cannot check out commit abc"})
    log = tmp_path / "instance-7701.log"
    log.write_text("line 1\npagating-onstart: sweep shard 0/1 finished\n")
    client.log_artifact(parent.info.run_id, str(log), "logs")
    env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    rc, out, _ = run(capsys, "vast", "logs", "7701")
    assert rc == 0 and "sweep shard 0/1 finished" in out
    assert keyed.calls("PUT", "/api/v0/instances/request_logs/") == []  # gone: not asked of Vast
    rc, out, _ = run(capsys, "vast", "logs", "7702")
    assert "never reported" in out
    rc, out, _ = run(capsys, "vast", "logs", "7703")
    assert "cannot check out commit abc" in out


def test_watchdog_budget_clock_counts_from_vasts_start_across_reboots(fake, env):
    fake.add_instance(5560, start_date=time.time() - 7200)  # started two hours ago; onstart reran just now
    env.setenv("CONTAINER_ID", "5560")
    env.setenv("CONTAINER_API_KEY", "container-key")
    env.setenv("PAGATING_STARTED_AT", str(time.time()))
    started = vast_watchdog.vast_start_date()
    assert started == pytest.approx(time.time() - 7200, abs=5)
    assert "reached the budget" in vast_watchdog.check(time.time(), started, 1.0, 1.5, time.time(), 1e9)
