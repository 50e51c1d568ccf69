"""`pagating vast`: the real vastai SDK against a fake Vast API on 127.0.0.1 (tests/fake_vast.py),
a real MLflow server where progress or measured step times are read. The instance's side has its own files:
test_onstart.py (scripts/onstart.sh), test_watchdog.py, test_instance.py; the projection is test_vast_cost.py."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import DVC_CONFIG
from fake_vast import offer

from pagating import cli, cost
from pagating.cloud import env as cloud
from pagating.cloud import offers
from pagating.cloud.providers import vast
from pagating.config import load_config
from pagating.tracking import provenance, store

REPO_URL = "https://github.com/example/pagating.git"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRETS = {"VAST_API_KEY": "vast-key-7f3a9c", "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-51e2d0",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-c0ffee"}
REMOTE_URI = "https://mlflow.example.org"
# status/watch read progress from MLflow; point them at a closed local port, never the internet
NO_MLFLOW = ["--tracking-uri", "http://127.0.0.1:9"]
LAUNCH = ["vast", "launch", "--s-per-step", "0.05", "--repo", REPO_URL, "--commit", COMMIT, "--no-wait"]


def git_remote(env, tmp_path, url: str = REPO_URL, commit: str = COMMIT) -> None:
    """`url` answers `git ls-remote` with `commit` on main: a bare repo whose ref names it, reached through
    git's own url.<base>.insteadOf (env config), so no test talks to a real git host."""
    import subprocess

    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    (bare / "refs" / "heads" / "main").write_text(commit + "\n")
    env.setenv("GIT_CONFIG_COUNT", "1")
    env.setenv("GIT_CONFIG_KEY_0", f"url.file://{bare}.insteadOf")
    env.setenv("GIT_CONFIG_VALUE_0", url)


@pytest.fixture
def keyed(fake, env, tmp_path):
    """Key, a git remote holding the commit, and a remote tracking server with credentials: everything
    launch checks before it writes anything."""
    git_remote(env, tmp_path)
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
        s = cost.estimated_step_time(cfg, o["gpu_name"])
        hours = cost.instance_hours(cfg, cost.grid_size(cfg), 1, s)
        assert float(row[-1]) == pytest.approx(o["dph_total"] * hours, abs=0.006)
        assert float(row[-2]) == pytest.approx(hours, abs=0.06)


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
    times, note = cost.step_times(cfg, ["RTX 4090", "RTX 3090"], mlflow_server.uri)
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
    # The runs' dataset source reads the same remote, as DVC writes it (quoted section), plus config.local.
    assert provenance.dvc_data_source(tmp_path) == "s3://example-bucket/pagating"
    (tmp_path / ".dvc" / "config.local").write_text(
        "['remote \"storage\"']\n    url = s3://key:secret@example-bucket/mine\n")
    assert cloud.dvc_default_remote(tmp_path) == ("storage", "s3://example-bucket/pagating")  # committed only
    assert provenance.dvc_data_source(tmp_path) == "s3://example-bucket/mine"  # this machine's, no credentials


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
                                  "http with token", "credentials in the uri"])
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
               "private": "https://192.168.1.20:5000", "http with password": "http://mlflow.example.org",
               "credentials in the uri": "https://gpu-runner:pw-in-uri-1f9a@mlflow.example.org"}[case]
        env.setenv("MLFLOW_TRACKING_URI", uri)
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert keyed.calls("PUT", "/api/v0/asks/") == [] and keyed.creates() == []
    assert err.startswith("pagating vast: error: ") and err.count("\n") == 1
    if case == "missing key":
        assert keyed.requests == []  # refused before talking to Vast at all
    if case == "credentials in the uri":
        assert "carries credentials" in err and keyed.requests == []
    for secret in (*SECRETS.values(), "pw-in-uri-1f9a"):
        assert secret not in out + err


@pytest.mark.parametrize("verb", ["status", "watch", "logs"])
def test_status_watch_and_logs_refuse_credentials_in_the_tracking_uri(keyed, capsys, verb):
    argv = ["vast", verb, *(["7001"] if verb == "logs" else []), "--tracking-uri",
            "https://gpu-runner:pw-in-uri-1f9a@mlflow.example.org"]
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and "carries credentials" in err, err
    assert "pw-in-uri-1f9a" not in out + err and keyed.requests == []


@pytest.mark.parametrize("case", ["over budget", "bad env", "commit not on the remote"])
def test_a_refused_launch_rents_nothing_and_leaves_no_run(launchable, env, capsys, mlflow_server, case):
    from mlflow.tracking import MlflowClient

    sweep = f"rf{int(time.time() * 1000) % 10**8}"
    argv = [*LAUNCH, "--sweep-id", sweep]
    if case == "over budget":
        argv += ["--budget", "0.5"]
    elif case == "bad env":
        argv += ["--env", "BIG=" + "x" * 33000]  # over Vast's 32,768 for all of env
    else:
        argv[argv.index(COMMIT)] = "fedcba9876543210fedcba9876543210fedcba98"
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and err.startswith("pagating vast: error: ") and err.count("\n") == 1, err
    assert launchable.calls("PUT", "/api/v0/asks/") == [] and launchable.creates() == []
    if case == "commit not on the remote":
        assert "is not on" in err and "git push" in err and launchable.requests == []  # before any Vast call
    client = MlflowClient(mlflow_server.uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(exps, f"tags.`pagating.sweep_id` = '{sweep}'") == []


def test_an_offer_taken_between_search_and_create_moves_on_to_the_next(launchable, capsys):
    # ranked: 12 (0.30), 13 (0.40), 14 (0.45), 11 (0.50); someone rents 13 while we create on 12
    launchable.on_create = lambda iid, body: launchable.taken.add(13)
    rc, out, err = run(capsys, *LAUNCH, "--instances", "2", "--sweep-id", "tk1")
    assert rc == 0, err
    puts = launchable.calls("PUT", "/api/v0/asks/")
    assert [(r.path, r.status) for r in puts] == [("/api/v0/asks/12/", 0), ("/api/v0/asks/13/", 400),
                                                  ("/api/v0/asks/14/", 0)]
    assert [c.body["env"]["PAGATING_SHARD"] for c in launchable.creates()] == ["0/2", "1/2"]
    assert launchable.creates()[1].body["env"]["PAGATING_USD_PER_HOUR"] == "0.4500"
    assert launchable.destroys() == [] and "offer 13 was taken meanwhile; trying offer 14" in out


def test_http_without_password_and_https_are_accepted(env):
    env.setenv("MLFLOW_TRACKING_PASSWORD", "x")
    assert cloud.check_tracking_uri("https://mlflow.example.org:8443") == "https://mlflow.example.org:8443"
    env.delenv("MLFLOW_TRACKING_PASSWORD")
    assert cloud.check_tracking_uri("http://mlflow.example.org") == "http://mlflow.example.org"


def test_error_after_creation_destroys_the_created_instance(launchable, capsys, mlflow_server):
    from mlflow.tracking import MlflowClient

    launchable.fail("PUT", "/api/v0/asks/13/", 400)  # the second create refused (not an offer taken)
    rc, out, err = run(capsys, *LAUNCH, "--instances", "2", "--sweep-id", "t2")
    assert rc == 1
    assert [r.path for r in launchable.creates()] == ["/api/v0/asks/12/"]
    assert [r.path for r in launchable.destroys()] == ["/api/v0/instances/5001/"]
    assert "destroying 5001" in err
    parent = MlflowClient(mlflow_server.uri).get_run(launchable.creates()[0].body["env"]["PAGATING_PARENT_RUN_ID"])
    assert parent.info.status == "FAILED" and "launch failed" in parent.data.tags["pagating.status_reason"]


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
    assert cost.shard_sizes(10, 3) == [4, 3, 3]


def test_interruptible_launch_bids(launchable, capsys):
    rc, _, err = run(capsys, *LAUNCH, "--interruptible")
    assert rc == 0, err
    assert search_body(launchable)["type"] == "bid"
    body = launchable.creates()[0].body
    cheapest = min(launchable.offers, key=lambda o: o["min_bid"])
    assert body["price"] == pytest.approx(round(cheapest["min_bid"] * vast.BID_MARGIN, 4))
    assert body["env"]["PAGATING_INTERRUPTIBLE"] == "1"


def test_more_instances_than_configs_is_refused(keyed, capsys):
    too_many = cost.grid_size(load_config("wikitext103")) + 1
    rc, _, err = run(capsys, *LAUNCH, "--instances", str(too_many))
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
    assert f"sweep {sweep}: 2/12 configs done; cfg2 step 30/120" in out  # the default grid: 10 paGLU + 2 plain
    # remaining: 9 waiting x 120 + 90 steps, 0.5 s/step, one GPU not outbid -> 1170 * 0.5 / 3600 h
    assert f"ETA ~{1170 * 0.5 / 3600:.1f} h at 0.5000 s/step" in out
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


# ---- Vast's create-request limits and rate limit (the fake enforces them like Vast) ------------

ACCOUNT = {"Authorization": "Bearer account-key"}


def test_fake_vast_refuses_what_vast_refuses(fake):
    import requests

    url = f"{fake.url}/api/v0/asks/11/"
    big = {"image": "img", "onstart": "x" * 4097, "env": {}}
    r = requests.put(url, json=big, headers=ACCOUNT, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_args" and "4096" in r.json()["msg"]
    for body in ({"image": "img", "env": {"A": "v" * 255}}, {"image": "i" * 1025}, {"image": "i", "label": "l" * 257}):
        assert requests.put(url, json=body, headers=ACCOUNT, timeout=10).status_code == 400
    fake.rate_limit = 4.5
    answers = [requests.get(f"{fake.url}/api/v0/instances/{i}/", headers=ACCOUNT, timeout=10).status_code
               for i in range(12)]
    assert answers[:9] == [200] * 9 and 429 in answers[9:]
    assert not fake.creates()


def test_fake_vast_wants_an_image_a_key_and_an_instance_key_on_its_own_instance(fake):
    import requests

    fake.rate_limit = None
    fake.add_instance(7001)
    fake.add_instance(7002)
    r = requests.put(f"{fake.url}/api/v0/asks/11/", json={"label": "x", "env": {}}, headers=ACCOUNT, timeout=10)
    assert r.status_code == 400 and "image is required" in r.json()["msg"] and not fake.creates()
    for method, path in (("DELETE", "/api/v0/instances/7001/"), ("GET", "/api/v0/instances/7001/"),
                         ("GET", "/api/v1/instances/"), ("PUT", "/api/v0/asks/11/")):
        assert requests.request(method, fake.url + path, json={"image": "i"}, timeout=10).status_code == 401
    mine = {"Authorization": "Bearer container-key-7001"}  # CONTAINER_API_KEY of 7001
    for method, path in (("DELETE", "/api/v0/instances/7002/"), ("GET", "/api/v0/instances/7002/"),
                         ("GET", "/api/v1/instances/"), ("PUT", "/api/v0/asks/11/")):
        assert requests.request(method, fake.url + path, json={"image": "i"}, headers=mine,
                                timeout=10).status_code == 403, (method, path)
    assert not fake.instances[7002].get("_destroyed") and not fake.creates()
    assert requests.get(f"{fake.url}/api/v0/instances/7001/", headers=mine, timeout=10).status_code == 200
    assert requests.delete(f"{fake.url}/api/v0/instances/7001/", headers=mine, timeout=10).status_code == 200
    assert requests.post(f"{fake.url}/api/v0/bundles/", json={}, timeout=10).status_code == 200  # no account needed


def test_launch_with_the_longest_realistic_inputs_is_accepted(launchable, env, capsys, mlflow_server, tmp_path):
    launchable.offers = [offer(30 + i, 0.30 + i / 100) for i in range(10)]
    # a private repo cloned with a token, a long tracking user and password (never in the URI: refused there),
    # DVC credentials, 8 bid instances
    repo = ("https://x-access-token:ghp_" + "A1b2C3d4E5" * 4 + "@github.com/"
            "some-research-group-with-a-long-name/pagating-gpt2-gating-experiments-fork.git")
    git_remote(env, tmp_path / "long", url=repo)
    env.setenv("MLFLOW_TRACKING_USERNAME", "gpu-runner-for-the-long-sweep-" + "u" * 64)
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
    for secret in ("ghp_", "q" * 64, "s" * 40):
        assert secret not in out + err


def test_a_long_secret_is_split_over_env_entries_and_joined_back(launchable, capsys):
    token = "IQoJb3JpZ2luX2VjE" + "Zx9/Ab+3" * 48  # 401 chars: an AWS session token is ~400-1,000
    rc, out, err = run(capsys, *LAUNCH, "--env", f"AWS_SESSION_TOKEN={token}")
    assert rc == 0, err
    env = launchable.creates()[0].body["env"]
    assert max(len(f"{k}={v}") for k, v in env.items()) <= vast.LIMITS.env_entry_chars == 256
    assert "AWS_SESSION_TOKEN" not in env and env[cloud.SPLIT_ENV] == "AWS_SESSION_TOKEN:2"
    assert cloud.join_env(env)["AWS_SESSION_TOKEN"] == token  # what the bootstrap's join gives back
    assert token[:40] not in out + err and token[-40:] not in out + err


def test_an_env_over_vasts_total_is_refused_before_renting(launchable, capsys):
    rc, _, err = run(capsys, *LAUNCH, "--env", "BIG=" + "x" * 33000)
    assert rc == 2 and "32768" in err
    assert launchable.calls("PUT", "/api/v0/asks/") == []


# ---- the image's CUDA against the host's driver --------------------------------------------------

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
    assert offers.image_cuda("ghcr.io/me/pagating:abc", 12.4) == 12.4


# ---- no instance left billing ---------------------------------------------------------------------

def test_launch_destroys_an_instance_that_never_starts(launchable, env, capsys):
    # new fake instances sit in `loading` (an image pull that never ends) and never report in
    rc, out, err = run(capsys, *[a for a in LAUNCH if a != "--no-wait"], "--start-timeout", "0.02")
    assert rc == 1
    assert [r.path for r in launchable.destroys()] == ["/api/v0/instances/5001/"]
    assert "instance 5001: not ready after" in err and "loading" in err
    parent = store.client(os.environ["MLFLOW_TRACKING_URI"]).get_run(
        launchable.creates()[0].body["env"]["PAGATING_PARENT_RUN_ID"])
    assert parent.info.status == "FAILED" and "no instance started" in parent.data.tags["pagating.status_reason"]


def test_launch_returns_once_the_instance_reports_ready(launchable, env, capsys, mlflow_server):
    from mlflow.tracking import MlflowClient

    said = []

    def instance_starts():  # what the bootstrap and onstart.sh do: report as they go, "ready" before the sweep
        deadline = time.time() + 30
        while time.time() < deadline:
            inst = launchable.instances.get(5001)
            env_ = dict((inst or {}).get("extra_env") or [])
            if env_.get("PAGATING_PARENT_RUN_ID"):
                inst["actual_status"] = "running"
                for state in ("started: checking out", "running: onstart.sh",
                              "ready: checked out, installed, data pulled, CUDA found"):
                    time.sleep(0.8)
                    said.append(launchable.destroys() == [] and state)
                    MlflowClient(mlflow_server.uri).set_tag(env_["PAGATING_PARENT_RUN_ID"],
                                                            "pagating.instance.5001", state)
                return
            time.sleep(0.1)

    import threading

    t = threading.Thread(target=instance_starts)
    t.start()
    rc, out, err = run(capsys, *[a for a in LAUNCH if a != "--no-wait"], "--start-timeout", "1")
    t.join()
    assert rc == 0, err
    assert len(said) == 3 and all(said)  # it waited through checkout and install
    assert "instance 5001: running, ready: checked out, installed, data pulled, CUDA found" in out
    assert launchable.destroys() == []


def _ready(fake, uri: str, iid: int, deadline_s: float = 30, then: str | None = None) -> None:
    """Instance `iid` boots and reports "ready" on its parent run (what onstart.sh does), once it exists;
    then reports `then` (e.g. that it finished), if given."""
    from mlflow.tracking import MlflowClient

    deadline = time.time() + deadline_s
    while time.time() < deadline:
        inst = fake.instances.get(iid)
        parent = dict((inst or {}).get("extra_env") or []).get("PAGATING_PARENT_RUN_ID")
        if parent:
            inst["actual_status"] = "running"
            MlflowClient(uri).set_tag(parent, f"pagating.instance.{iid}",
                                      "ready: checked out, installed, data pulled, CUDA found")
            if then:
                time.sleep(1)
                MlflowClient(uri).set_tag(parent, f"pagating.instance.{iid}", then)
            return
        time.sleep(0.1)


def test_an_instance_launch_destroys_is_on_record_and_watch_reruns_its_shard(launchable, env, capsys,
                                                                            mlflow_server):
    import threading

    from pagating.cloud import instance
    from pagating.cloud.sweep_run import RELAUNCHES_TAG, SHARD_TAG

    sweep = f"ld{int(time.time() * 1000) % 10**8}"
    # 5001 gets ready and ends while launch waits; 5002 sits loading and is destroyed: the last of the sweep
    t = threading.Thread(target=_ready, args=(launchable, mlflow_server.uri, 5001), kwargs={"then": "finished: 0/2"})
    t.start()
    rc, out, err = run(capsys, *[a for a in LAUNCH if a != "--no-wait"], "--instances", "2", "--sweep-id", sweep,
                       "--start-timeout", "0.05")
    t.join()
    assert rc == 1 and [r.path for r in launchable.destroys()] == ["/api/v0/instances/5002/"], err
    client = store.client(mlflow_server.uri)
    parent = launchable.creates()[0].body["env"]["PAGATING_PARENT_RUN_ID"]
    run_ = client.get_run(parent)
    assert run_.data.tags["pagating.instance.5002"].startswith("destroyed by launch: not ready")
    assert run_.info.status == "FAILED" and "configs missing" in run_.data.tags["pagating.status_reason"]
    # and 5001's own settle, had it ended later, does not count 5002 as still working either
    client.update_run(parent, status="RUNNING")
    for k, v in {"PAGATING_PARENT_RUN_ID": parent, "PAGATING_SWEEP_ID": sweep, "CONTAINER_ID": "5001",
                 "PAGATING_PROFILE": "wikitext103"}.items():
        env.setenv(k, v)
    assert instance.settle() == f"parent run {parent}: FAILED"  # shard 1's configs never ran
    for k in ("PAGATING_PARENT_RUN_ID", "PAGATING_SWEEP_ID", "CONTAINER_ID", "PAGATING_PROFILE"):
        env.delenv(k)

    # watch never saw 5002: it learns the shard from the parent run and re-runs it, secrets from 5001
    client.set_tag(parent, "pagating.instance.5001", "running: sweep")
    rc, out, err = run(capsys, "vast", "watch", "--once", "--sweep", sweep)
    assert rc == 0, out + err
    create = launchable.creates()[2].body
    assert create["label"] == f"pagating-{sweep}-1" and create["env"]["PAGATING_SHARD"] == "1/2"
    assert create["env"]["MLFLOW_TRACKING_PASSWORD"] == SECRETS["MLFLOW_TRACKING_PASSWORD"]
    tags = client.get_run(parent).data.tags
    assert json.loads(tags[f"{SHARD_TAG}1"])["instance"] == 5003 and tags[f"{RELAUNCHES_TAG}1"] == "1"
    assert SECRETS["MLFLOW_TRACKING_PASSWORD"] not in json.dumps(tags)  # records carry no secret


def test_watch_destroys_stuck_instances_and_retries_a_failed_destroy(keyed, env, capsys):
    keyed.add_instance(980, label="pagating-s1-0", actual_status="loading", start_date=time.time() - 3600,
                       status_msg="Error response from daemon: pull access denied",
                       extra_env=_instance_env("s1", "0/3"))
    keyed.add_instance(981, label="pagating-s1-1", actual_status="loading", start_date=time.time(),
                       extra_env=_instance_env("s1", "1/3"))
    keyed.add_instance(982, label="pagating-s2-0", actual_status="running", start_date=time.time() - 3600,
                       extra_env=_instance_env("s2", "0/1"))  # another sweep, running: left alone
    keyed.add_instance(983, label="pagating-s1-2", actual_status=None, start_date=time.time() - 3600,
                       extra_env=_instance_env("s1", "2/3"))  # never provisioned: Vast reports no status yet
    keyed.fail("DELETE", "/api/v0/instances/980/", *[500] * vast.RETRY_ATTEMPTS)  # the first destroy fails
    rc, out, _ = run(capsys, "vast", "watch", "--sweep", "s1", "--interval", "0.3", "--start-timeout", "0.05",
                     *NO_MLFLOW)  # it runs until every instance of the sweep is gone
    # gone, but with no tracking server to read the grid from it cannot say "done"
    assert rc == 1 and "all instances are gone" in out and "could not read its grid" in out
    assert keyed.creates() == []  # nor re-run shards it cannot tell are unfinished
    assert "pull access denied" in out and "retrying next round" in out
    assert len(keyed.destroys(980)) == vast.RETRY_ATTEMPTS + 1  # failed attempts, then the retry that went through
    assert len(keyed.destroys(981)) == 1  # loading past the (short) timeout as well
    assert len(keyed.destroys(983)) == 1 and "provisioning for 60 min" in out
    assert keyed.destroys(982) == []


def _two_config_sweep(env, tmp_path, mlflow_server, sweep: str, finished: list[int], max_relaunches: int = 1):
    """A sample-profile grid of two configs in this folder's params.yaml, a parent run on the server,
    FINISHED children for the configs in `finished`; returns (parent run id, config names)."""
    import yaml
    from mlflow.tracking import MlflowClient

    from pagating.identity import run_name
    from pagating.sweep import config_for, grid

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["sweep"]["sample"] = {"alpha_mode": ["static_0.5", "static_1.0"], "learning_rate": [1.0e-3]}
    params["cloud"]["max_relaunches"] = max_relaunches
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env.delenv("MLFLOW_TRACKING_URI")  # status/watch read the instances' server
    cfg = load_config("sample")
    names = [run_name(config_for(cfg, o)) for o in grid(cfg)]
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("pagating-sample")
    exp_id = exp.experiment_id if exp else client.create_experiment("pagating-sample")
    parent = client.create_run(exp_id, run_name=f"sweep {sweep}",
                               tags={"pagating.sweep_id": sweep, "pagating.role": "sweep"}).info.run_id
    for i in finished:
        child = client.create_run(exp_id, run_name=names[i], tags={"pagating.sweep_id": sweep,
                                                                   "mlflow.parentRunId": parent})
        client.set_terminated(child.info.run_id)
    return parent, names


def _sweep_instance(fake, iid, sweep, shard, parent, uri, **kw):
    env = dict(_instance_env(sweep, shard, uri=uri), PAGATING_PARENT_RUN_ID=parent)
    return fake.add_instance(iid, label=f"pagating-{sweep}-{shard.split('/')[0]}", extra_env=list(env.items()), **kw)


@pytest.mark.slow
def test_watch_destroys_what_reported_done_and_reruns_its_shard(keyed, env, capsys, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = f"wd{int(time.time() * 1000) % 10**8}"
    parent, names = _two_config_sweep(env, tmp_path, mlflow_server, sweep, finished=[1])
    client = MlflowClient(mlflow_server.uri)
    # shard 0 failed (its DELETE refused: Vast still says running); shard 1 finished its config, destroy failing too
    _sweep_instance(keyed, 990, sweep, "0/2", parent, mlflow_server.uri)
    _sweep_instance(keyed, 991, sweep, "1/2", parent, mlflow_server.uri)
    client.set_tag(parent, "pagating.instance.990", "failed: CUDA required: found 0 usable CUDA GPU(s)")
    client.set_tag(parent, "pagating.instance.991", "finished: shard 1/2")
    rc, out, _ = run(capsys, "vast", "status", "--sweep", sweep)
    assert rc == 0 and out.count("STILL BILLING") == 2 and "failed: CUDA required" in out
    assert f"sweep {sweep}: parent run RUNNING" in out
    assert keyed.destroys() == []  # status only looks

    rc, out, _ = run(capsys, "vast", "watch", "--once", "--sweep", sweep)
    assert sorted(r.path for r in keyed.destroys()) == ["/api/v0/instances/990/", "/api/v0/instances/991/"]
    assert "reported 'failed: CUDA required" in out
    tags = client.get_run(parent).data.tags
    assert tags["pagating.instance.990"].endswith("destroyed by vast watch")  # the parent says why
    (create,) = keyed.creates()  # shard 0's config is not FINISHED: re-run; shard 1's is: left alone
    assert create.body["label"] == f"pagating-{sweep}-0" and create.body["env"]["PAGATING_SHARD"] == "0/2"
    assert create.body["env"]["PAGATING_PARENT_RUN_ID"] == parent
    assert tags["pagating.instance.5001"].startswith("created")
    assert rc == 0 and client.get_run(parent).info.status == "RUNNING"


@pytest.mark.slow
def test_watch_gives_up_after_max_relaunches_and_fails_the_parent(keyed, env, capsys, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = f"wg{int(time.time() * 1000) % 10**8}"
    parent, names = _two_config_sweep(env, tmp_path, mlflow_server, sweep, finished=[1], max_relaunches=0)
    _sweep_instance(keyed, 995, sweep, "0/2", parent, mlflow_server.uri, actual_status="loading",
                    start_date=time.time() - 3600)
    rc, out, _ = run(capsys, "vast", "watch", "--sweep", sweep, "--interval", "0.2", "--start-timeout", "1")
    assert rc == 1 and keyed.creates() == [] and len(keyed.destroys(995)) == 1
    assert f"NOT done: configs missing: {names[0]} (not started)" in out and "gave up after 0 relaunch" in out
    run_ = MlflowClient(mlflow_server.uri).get_run(parent)
    assert run_.info.status == "FAILED"  # never RUNNING once the last instance is gone
    reason = run_.data.tags["pagating.status_reason"]
    assert names[0] in reason and "gave up" in reason


@pytest.mark.slow
def test_watch_reruns_a_shard_dead_before_it_started_and_its_count_survives_a_restart(keyed, env, capsys,
                                                                                    mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pagating.cloud.sweep_run import RELAUNCHES_TAG, record_shards, shard_record

    sweep = f"wr{int(time.time() * 1000) % 10**8}"
    parent, names = _two_config_sweep(env, tmp_path, mlflow_server, sweep, finished=[1], max_relaunches=1)
    image = load_config("sample")["cloud"]["image"]
    # launch rented 990 and 991 and recorded them; both are gone before any watch ran (991 finished its config)
    record_shards(mlflow_server.uri, parent, [shard_record(
        f"pagating-{sweep}-{i}", 990 + i, dict(_instance_env(sweep, f"{i}/2", uri=mlflow_server.uri),
                                               PAGATING_PARENT_RUN_ID=parent),
        image=image, disk=50, bid=False, gpu_name="RTX 4090", num_gpus=1, rate=0.4) for i in (0, 1)])
    watch = ["vast", "watch", "--once", "--sweep", sweep, "--tracking-uri", mlflow_server.uri]
    rc, out, err = run(capsys, *watch)
    assert rc == 0, out + err
    (create,) = keyed.creates()  # shard 0 only: shard 1's config FINISHED
    assert create.body["label"] == f"pagating-{sweep}-0" and create.body["env"]["PAGATING_SHARD"] == "0/2"
    assert create.body["env"]["MLFLOW_TRACKING_PASSWORD"] == SECRETS["MLFLOW_TRACKING_PASSWORD"]  # from here
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(parent).data.tags[f"{RELAUNCHES_TAG}0"] == "1"

    keyed.instances[5001]["_destroyed"] = True  # the relaunched instance dies too; watch restarts (systemd)
    rc, out, _ = run(capsys, *watch)
    assert rc == 1 and len(keyed.creates()) == 1 and "gave up after 1 relaunch" in out  # max_relaunches: 1
    run_ = client.get_run(parent)
    assert run_.info.status == "FAILED" and "gave up" in run_.data.tags["pagating.status_reason"]


@pytest.mark.slow
def test_status_shows_red_an_instance_a_destroy_failed_on(keyed, env, capsys, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = f"rd{int(time.time() * 1000) % 10**8}"
    parent, _ = _two_config_sweep(env, tmp_path, mlflow_server, sweep, finished=[])
    client = MlflowClient(mlflow_server.uri)
    _sweep_instance(keyed, 996, sweep, "0/2", parent, mlflow_server.uri)
    _sweep_instance(keyed, 997, sweep, "1/2", parent, mlflow_server.uri, actual_status="loading",
                    start_date=time.time() - 3600)
    for iid in (996, 997):
        client.set_tag(parent, f"pagating.instance.{iid}", "running: sweep")
    keyed.fail("DELETE", "/api/v0/instances/996/", *[500] * vast.RETRY_ATTEMPTS * 2)
    keyed.fail("DELETE", "/api/v0/instances/997/", *[500] * vast.RETRY_ATTEMPTS)
    rc, _, _ = run(capsys, "vast", "destroy", "996")  # by hand: the destroy fails
    assert rc == 1
    assert client.get_run(parent).data.tags["pagating.instance.996"].startswith("destroy failed (vast destroy)")
    # watch retries 996 (it reads as done now) and destroys 997 (stuck loading): both fail
    rc, out, _ = run(capsys, "vast", "watch", "--once", "--sweep", sweep, "--start-timeout", "1")
    assert out.count("retrying next round") == 2 and keyed.creates() == []
    tags = client.get_run(parent).data.tags
    assert tags["pagating.instance.997"].startswith("destroy failed (vast watch): loading for 60 min")
    rc, out, _ = run(capsys, "vast", "status", "--sweep", sweep)
    assert rc == 0 and out.count("STILL BILLING") == 2, out


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


