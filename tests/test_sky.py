"""`pagating sky`: SkyPilot's CLI is reached through one seam
(pagating.cloud.providers.sky.sky); a fake `sky` on PATH records every call (arguments, task files, whether
each `--secret NAME` found its value in its environment). The
generated tasks are loaded by SkyPilot's own `sky.Task.from_yaml` in SkyPilot's own venv (`make sky-env`),
and one task's setup and run are executed locally as the job's machine would run them (test_instance_sim's
file:// repo, moto S3 DVC remote and basic-auth `pagating server`), killed mid-shard and run again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO
from test_instance_sim import AWS, GIT_URL, GPU_PW, auth_server, pushed_repo, s3  # noqa: F401 (fixtures)

from pagating import cli
from pagating.cloud import env as cloud_env
from pagating.cloud import sweep_run
from pagating.cloud.providers import sky

REPO_URL = "https://github.com/example/pagating.git"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "mlflow-pw-51e2d0", "AWS_ACCESS_KEY_ID": "aws-id-AKIA77",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-c0ffee"}
SKY_PYTHON = REPO / ".venv" / "sky" / "bin" / "python"
VENV_BIN = Path(sys.executable).parent

FAKE_SKY = r'''#!PYTHON
"""A stand-in for SkyPilot's `sky`: records each call in $FAKE_SKY_DIR and answers like SkyPilot 0.14."""
import json, os, pathlib, shutil, sys

rec = pathlib.Path(os.environ["FAKE_SKY_DIR"])
argv = sys.argv[1:]
names = [argv[i + 1] for i, a in enumerate(argv) if a == "--secret"]
with (rec / "calls.jsonl").open("a") as f:  # whether each secret was there, never its value
    f.write(json.dumps({"argv": argv, "secrets": {n: bool(os.environ.get(n)) for n in names}}) + "\n")
missing = [n for n in names if n not in os.environ]
if missing:  # SkyPilot's own refusal of `--secret NAME` without NAME in its environment
    sys.exit(f"{missing[0]} is not set in local environment.")
jobs_file = rec / "jobs.json"
jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else []
if argv[:2] == ["launch", "--dryrun"]:
    print("Considered resources (1 node):")
    print(" INFRA           INSTANCE          vCPUs   Mem(GB)   GPUS        COST ($)   CHOSEN")
    print(f" Vast (us-west)  1x-RTX4090-16-64  16      64        RTX4090:1   {os.environ.get('FAKE_SKY_PRICE', '0.35')}"
          "       \x1b[32m   \u2714\x1b[0m")
    print(" RunPod (CA)     1x_RTX4090_SECURE 16      62        RTX4090:1   0.69")
elif argv[:2] == ["jobs", "launch"]:
    name = argv[argv.index("--name") + 1]
    shutil.copy(argv[2], rec / f"{name}.yaml")  # the task as SkyPilot read it
    if name == os.environ.get("FAKE_SKY_FAIL"):
        sys.exit("sky.exceptions.ResourcesUnavailableError: no offer")
    jobs.append({"job_id": len(jobs) + 1, "job_name": name, "status": "PENDING", "recovery_count": 0,
                 "resources": "1x[RTX4090:1]"})
    print(f"Managed job ID: {len(jobs)}")
elif argv[:2] == ["jobs", "queue"]:
    print(json.dumps(jobs + [{"job_id": 99, "job_name": "not-ours", "status": "RUNNING"}]))
elif argv[:2] == ["jobs", "cancel"]:
    for job in jobs:
        if job["job_name"] == argv[argv.index("--name") + 1]:
            job["status"] = "CANCELLED"
elif argv[:2] == ["jobs", "logs"]:
    print(f"the log of {argv[argv.index('--name') + 1]}")
jobs_file.write_text(json.dumps(jobs))
'''


@pytest.fixture
def fake_sky(env, tmp_path):
    """A fake `sky` first on PATH; returns its record folder."""
    bin_dir, rec = tmp_path / "bin", tmp_path / "fake-sky"
    bin_dir.mkdir()
    rec.mkdir()
    (bin_dir / "sky").write_text(FAKE_SKY.replace("PYTHON", sys.executable, 1))
    (bin_dir / "sky").chmod(0o755)
    env.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env.setenv("FAKE_SKY_DIR", str(rec))
    return rec


def calls(rec: Path) -> list[dict]:
    path = rec / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def launchable(fake_sky, env, tmp_path, mlflow_server):
    """A git remote holding COMMIT (git's url.insteadOf to a bare repo), the local tracking server (the
    reachability check off) and the secrets in the environment: everything launch checks."""
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    (bare / "refs" / "heads" / "main").write_text(COMMIT + "\n")
    for k, v in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.file://{bare}.insteadOf",
                 "GIT_CONFIG_VALUE_0": REPO_URL, "MLFLOW_TRACKING_URI": mlflow_server.uri,
                 "MLFLOW_TRACKING_USERNAME": "gpu-runner", **SECRETS}.items():
        env.setenv(k, v)
    env.setattr(cloud_env, "check_tracking_uri", lambda uri: uri)
    return fake_sky


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


LAUNCH = ["sky", "launch", "--repo", REPO_URL, "--commit", COMMIT, "--s-per-step", "0.05",
          "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]


def parent_runs(uri: str, sweep_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, f"tags.`pagating.sweep_id` = '{sweep_id}'") if exps else []


# ---- the seam and the task ------------------------------------------------------------------------

def test_accelerators_in_skypilot_spelling():
    assert sky.accelerator("RTX 4090", 1) == "RTX4090:1"
    assert sky.accelerator("RTX A6000", 2) == "A6000:2"
    assert sky.accelerator("H100 SXM", 8) == "H100:8"
    assert sky.accelerator("L40S", 1) == "L40S:1"
    for bad in ("any", ""):
        with pytest.raises(sky.UserError, match="--gpu-name"):
            sky.accelerator(bad, 1)


def test_urls_carrying_credentials_go_through_secrets_whatever_their_name():
    """The rule shard records use too (cloud.env.is_secret): a task file never holds a credential."""
    envs, secrets = sky.split_secrets({"PAGATING_REPO": "https://user:tok@example.com/r.git",
                                       "EXTRA_MIRROR": "https://u:pw@mirror.example/x", "DVC_TOKEN_X": "t",
                                       "PAGATING_PROFILE": "sample", "PLAIN_URL": "https://example.com/x"})
    assert set(secrets) == {"PAGATING_REPO", "EXTRA_MIRROR", "DVC_TOKEN_X"}
    assert envs == {"PAGATING_PROFILE": "sample", "PLAIN_URL": "https://example.com/x"}


def test_without_sky_one_line_says_how_to_install_exit_2(env, capsys):
    env.setenv("PATH", "/usr/bin:/bin")
    for verb in (["status"], ["cancel", "--all"], ["logs", "pagating-x-0"], LAUNCH[1:]):
        rc, _, err = run(capsys, "sky", *verb)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "uv tool install 'skypilot[vast]==0.14.1'" in err and "--sky-bin" in err


def test_launch_submits_one_named_managed_job_per_shard_and_no_secret_on_any_command_line(launchable, capsys):
    rc, out, err = run(capsys, *LAUNCH, "--jobs", "3", "--sweep-id", "s1", "--infra", "vast",
                       "--infra", "runpod,kubernetes", "--interruptible")
    assert rc == 0, out + err
    made = calls(launchable)
    assert [c["argv"][:2] for c in made] == [["launch", "--dryrun"]] + [["jobs", "launch"]] * 3
    names = [c["argv"][c["argv"].index("--name") + 1] for c in made[1:]]
    assert names == ["pagating-s1-0", "pagating-s1-1", "pagating-s1-2"]
    (parent,) = parent_runs(os.environ["MLFLOW_TRACKING_URI"], "s1")
    secret_names = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}
    for i, (call, name) in enumerate(zip(made[1:], names, strict=True)):
        assert call["argv"][2] == str(Path.cwd() / "sky" / f"{name}.yaml")
        assert "--detach-run" in call["argv"] and "--yes" in call["argv"]
        assert call["secrets"] == dict.fromkeys(secret_names, True)  # each value reached `sky` by its env
        task = yaml.safe_load((launchable / f"{name}.yaml").read_text())
        assert task["name"] == name and task["secrets"] == dict.fromkeys(secret_names)
        assert task["resources"] | {"any_of": None} == {
            "accelerators": "RTX4090:1", "disk_size": 50, "use_spot": True,
            "job_recovery": {"max_restarts_on_errors": 0},
            "image_id": "docker:pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime", "any_of": None}
        assert task["resources"]["any_of"] == [{"infra": "vast"}, {"infra": "runpod"}, {"infra": "kubernetes"}]
        envs = task["envs"]
        assert envs["PAGATING_SHARD"] == f"{i}/3" and envs["PAGATING_PROVIDER"] == "sky"
        assert envs["PAGATING_PARENT_RUN_ID"] == parent.info.run_id and envs["PAGATING_COMMIT"] == COMMIT
        assert envs["PAGATING_USD_PER_HOUR"] == "0.3500" and envs["PAGATING_INTERRUPTIBLE"] == "1"
        assert envs["MLFLOW_TRACKING_USERNAME"] == "gpu-runner" and not secret_names & set(envs)
    for secret in SECRETS.values():  # nowhere: command lines, task files, output
        assert not any(secret in " ".join(c["argv"]) for c in made)
        assert not any(secret in p.read_text() for p in [*Path("sky").iterdir(), *launchable.glob("*.yaml")])
        assert secret not in out + err
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("pagating.instance.")} == {
        f"pagating.instance.{i}": "created: waiting for the instance" for i in range(3)}
    assert "projected $" in out and "$0.35/h" in out


def test_launch_over_budget_by_the_optimizers_price_is_refused_before_anything_runs(launchable, env, capsys):
    env.setenv("FAKE_SKY_PRICE", "900.00")
    rc, out, err = run(capsys, *LAUNCH, "--jobs", "2", "--sweep-id", "s2", "--infra", "vast")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "over the budget $50.00" in err and "$900.00/h" in err
    assert [c["argv"][:2] for c in calls(launchable)] == [["launch", "--dryrun"]]
    assert parent_runs(os.environ["MLFLOW_TRACKING_URI"], "s2") == []


def test_a_failed_submission_cancels_the_submitted_jobs_and_fails_the_parent(launchable, env, capsys):
    env.setenv("FAKE_SKY_FAIL", "pagating-s3-1")
    rc, _, err = run(capsys, *LAUNCH, "--jobs", "2", "--sweep-id", "s3")
    assert rc == 1 and "pagating-s3-1 failed" in err
    assert calls(launchable)[-1]["argv"] == ["jobs", "cancel", "--name", "pagating-s3-0", "--yes"]
    (parent,) = parent_runs(os.environ["MLFLOW_TRACKING_URI"], "s3")
    assert parent.info.status == "FAILED" and "launch failed" in parent.data.tags[sweep_run.REASON_TAG]


def test_dry_run_writes_each_task_and_prints_its_launch_command(launchable, capsys):
    rc, out, err = run(capsys, *LAUNCH, "--jobs", "2", "--sweep-id", "d1", "--dry-run")
    assert rc == 0, err
    for i in range(2):
        assert (f"sky jobs launch {Path.cwd()}/sky/pagating-d1-{i}.yaml --name pagating-d1-{i} --detach-run --yes "
                "--secret AWS_ACCESS_KEY_ID --secret AWS_SECRET_ACCESS_KEY --secret MLFLOW_TRACKING_PASSWORD") in out
        assert "PAGATING_PARENT_RUN_ID" not in yaml.safe_load(Path(f"sky/pagating-d1-{i}.yaml").read_text())["envs"]
    assert [c["argv"][:2] for c in calls(launchable)] == [["launch", "--dryrun"]]  # priced, not launched
    assert parent_runs(os.environ["MLFLOW_TRACKING_URI"], "d1") == []


def test_status_logs_and_cancel_drive_sky_jobs(launchable, capsys):
    assert run(capsys, *LAUNCH, "--jobs", "2", "--sweep-id", "q1")[0] == 0
    assert run(capsys, *LAUNCH, "--sweep-id", "q2")[0] == 0
    rc, out, _ = run(capsys, "sky", "status", "--sweep", "q1", "--tracking-uri", "http://127.0.0.1:9")
    assert rc == 0 and "pagating-q1-0" in out and "pagating-q1-1" in out and "PENDING" in out
    assert "pagating-q2-0" not in out and "not-ours" not in out
    assert calls(launchable)[-1]["argv"] == ["jobs", "queue", "--all", "-o", "json"]
    rc, out, _ = run(capsys, "sky", "logs", "pagating-q1-1")
    assert rc == 0 and calls(launchable)[-1]["argv"] == ["jobs", "logs", "--name", "pagating-q1-1", "--no-follow",
                                                         "--tail", "200"]
    rc, _, _ = run(capsys, "sky", "cancel", "--sweep", "q1")
    assert rc == 0
    assert [c["argv"] for c in calls(launchable)[-4:]] == [  # the queue, each job, the queue (none left?)
        ["jobs", "queue", "--all", "-o", "json"], *(["jobs", "cancel", "--name", f"pagating-q1-{i}", "--yes"]
                                                    for i in range(2)), ["jobs", "queue", "--all", "-o", "json"]]
    rc, out, _ = run(capsys, "sky", "cancel", "--sweep", "q1")  # nothing left running
    assert rc == 0 and "nothing to cancel" in out
    (parent,) = parent_runs(os.environ["MLFLOW_TRACKING_URI"], "q1")  # its jobs' reports say cancelled
    assert parent.info.status == "FAILED" and "cancelled" in parent.data.tags[sweep_run.REASON_TAG]
    assert parent.data.tags["pagating.instance.1"] == "killed: cancelled by `pagating sky cancel`"
    (other,) = parent_runs(os.environ["MLFLOW_TRACKING_URI"], "q2")
    assert other.info.status == "RUNNING"


# ---- SkyPilot's own validation -------------------------------------------------------------------

VALIDATE = """
import sys, sky
for path in sys.argv[1:]:
    try:
        print(path, sky.Task.from_yaml(path).resources)
    except Exception as exc:
        print(path, "INVALID", type(exc).__name__)
"""


@pytest.mark.skipif(not SKY_PYTHON.exists(), reason="SkyPilot's own venv is missing: run `make sky-env`")
def test_every_task_loads_with_skypilots_own_task_from_yaml(launchable, capsys, tmp_path):
    """Schema and resources validation by SkyPilot 0.14.1 itself, in its own venv, for each infra kind with
    the seed's GPU and disk, on demand and spot."""
    cases = {f"{infra}-{spot}": [*(["--infra", infra] if infra != "any_of" else
                                   ["--infra", "vast,runpod,kubernetes"]), *(["--interruptible"] if spot else [])]
             for infra in ("vast", "runpod", "kubernetes", "any_of") for spot in (0, 1)}
    paths = {}
    for n, (case, flags) in enumerate(cases.items()):
        rc, out, err = run(capsys, *LAUNCH, "--sweep-id", f"v{n}", "--dry-run", *flags)
        assert rc == 0, err
        paths[case] = Path.cwd() / "sky" / f"pagating-v{n}-0.yaml"
    broken = tmp_path / "broken.yaml"  # the validator is not a rubber stamp: a misspelled field fails
    broken.write_text(paths["vast-0"].read_text().replace("disk_size:", "disk_sizes:"))
    proc = subprocess.run([str(SKY_PYTHON), "-c", VALIDATE, *map(str, paths.values()), str(broken)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)})
    loaded = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith("/"))
    assert proc.returncode == 0 and len(loaded) == len(paths) + 1, proc.stdout + proc.stderr
    clouds = {"vast": ["Vast"], "runpod": ["RunPod"], "kubernetes": ["Kubernetes"],
              "any_of": ["Vast", "RunPod", "Kubernetes"]}
    for case, path in paths.items():
        infra, spot = case.rsplit("-", 1)
        got = loaded[str(path)]
        assert "INVALID" not in got, (case, got)
        for name in clouds[infra]:
            assert f"{name}({'[Spot], ' if spot == '1' else ''}{{'RTX4090': 1}}" in got, (case, got)
        assert got.count("disk_size=50") == len(clouds[infra]), (case, got)
    assert "INVALID" in loaded[str(broken)]


# ---- the job, run locally as its machine would ---------------------------------------------------

MAX_STEPS = 6


@pytest.fixture(scope="module")
def sky_repo(pushed_repo):  # noqa: F811 (the fixture imported above)
    """The simulation's repo one commit on: configs long enough (6 steps, a checkpoint every 2) to be
    killed mid-shard."""
    repo, _ = pushed_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["sample"].update(max_steps=MAX_STEPS, save_steps=2, eval_steps=MAX_STEPS)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "-m", "longer configs"], cwd=repo, check=True, timeout=60)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return repo, sha


def run_task(task: dict, repo: Path, work: Path, **override) -> subprocess.Popen:
    """A task's setup, then its run, under bash as SkyPilot runs them on the job's machine: its envs and
    its secrets' values (which SkyPilot takes from the launching shell, `--secret NAME`) in the environment."""
    work.mkdir(parents=True)
    (work / "setup.sh").write_text(task["setup"])
    (work / "run.sh").write_text(task["run"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "VAST_", "PAGATING_", "AWS_", "CONTAINER_", "PYTHONPATH", "GIT_CONFIG"))}
    env.update(task["envs"])
    env.update({name: os.environ[name] for name in task["secrets"]})
    env.update({"PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "HOME": str(work / "home"),
                "PAGATING_REPO": f"file://{repo}", "PAGATING_WORKDIR": str(work / "checkout"),
                "PYTHONPATH": str(work / "checkout"), "PAGATING_PYTHON": sys.executable,
                "PAGATING_SKIP_INSTALL": "1", "PAGATING_LOG_UPLOAD_S": "20", "AWS_EC2_METADATA_DISABLED": "true",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    for k, v in override.items():
        env.pop(k, None) if v is None else env.__setitem__(k, v)
    return subprocess.Popen(["bash", "-c", "bash setup.sh && exec bash run.sh"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_machine(proc: subprocess.Popen) -> None:
    """The machine is gone (a preemption): every process of the job dies at once, its own sessions too."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.communicate(timeout=60)


def wait_mid_shard(client, parent: str, proc: subprocess.Popen, timeout: float = 400):
    """The shard's RUNNING child once it is past its first checkpoint (train/loss beyond step 2)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        runs = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'")
        for r in runs:
            if max((m.step for m in client.get_metric_history(r.info.run_id, "train/loss")), default=0) >= 3:
                return r
        time.sleep(0.2)
    return None


@pytest.mark.slow
def test_a_job_runs_its_shard_like_a_vast_instance_and_a_killed_one_resumes_its_runs(
        sky_repo, auth_server, fake_sky, env, tmp_path, capsys):  # noqa: F811
    from mlflow.tracking import MlflowClient

    repo, sha = sky_repo
    for k, v in {"MLFLOW_TRACKING_URI": auth_server.uri, "MLFLOW_TRACKING_USERNAME": "gpu-runner",
                 "MLFLOW_TRACKING_PASSWORD": GPU_PW, **AWS, "GIT_CONFIG_COUNT": "1",
                 "GIT_CONFIG_KEY_0": f"url.file://{repo}.insteadOf", "GIT_CONFIG_VALUE_0": GIT_URL}.items():
        env.setenv(k, v)
    env.setattr(cloud_env, "check_tracking_uri", lambda u: u)  # the test server is on 127.0.0.1
    env.chdir(repo)
    rc, out, err = run(capsys, "sky", "launch", "--profile", "sample", "--repo", GIT_URL, "--commit", sha,
                       "--jobs", "2", "--sweep-id", "sim", "--s-per-step", "0.01", "--infra", "vast",
                       "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY")
    assert rc == 0, out + err
    tasks = [yaml.safe_load((fake_sky / f"pagating-sim-{i}.yaml").read_text()) for i in range(2)]
    parent = tasks[0]["envs"]["PAGATING_PARENT_RUN_ID"]
    client = MlflowClient(auth_server.uri)

    # shard 1 runs through; the same task without the test's CPU switch refuses (no parent: a bystander)
    one = run_task(tasks[1], repo, tmp_path / "job1", PAGATING_TEST_ALLOW_CPU="1")
    no_cuda = run_task(tasks[1], repo, tmp_path / "no-cuda", PAGATING_PARENT_RUN_ID=None)
    # shard 0's machine is taken away mid-config; SkyPilot relaunches the job on a fresh one
    zero = run_task(tasks[0], repo, tmp_path / "job0", PAGATING_TEST_ALLOW_CPU="1")
    killed = wait_mid_shard(client, parent, zero)
    assert killed is not None, zero.communicate(timeout=600)[0][-3000:]
    kill_machine(zero)
    again = run_task(tasks[0], repo, tmp_path / "job0-relaunched", PAGATING_TEST_ALLOW_CPU="1")
    outs = {name: p.communicate(timeout=600)[0] for name, p in (("one", one), ("no_cuda", no_cuda), ("again", again))}
    assert one.returncode == 0, outs["one"][-4000:]
    assert again.returncode == 0, outs["again"][-4000:]
    assert no_cuda.returncode != 0 and "CUDA required: found 0 usable CUDA GPU(s)" in outs["no_cuda"], outs["no_cuda"]
    assert all("not on Vast, nothing to destroy" in out for out in outs.values())  # no Vast self-destroy

    # every config FINISHED once under the parent; the killed run is the one that finished, without a repeated step
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("paGLU static_0.5 lr=0.001", "FINISHED"), ("paGLU static_1.0 lr=0.001", "FINISHED")]
    assert killed.info.run_id in {r.info.run_id for r in runs}
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS, (r.info.run_name, steps)
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED", parent_run.data.tags.get(sweep_run.REASON_TAG)

    # each job's log on the parent run, no secret in it
    for i in range(2):
        assert parent_run.data.tags[f"pagating.instance.{i}"].startswith("finished")
        log = Path(client.download_artifacts(parent, f"logs/pagating-sim-{i}.log", str(tmp_path))).read_text()
        assert f"sweep shard {i}/2 finished" in log and "dvc pull data.dvc" in log
        assert not any(s in log for s in (GPU_PW, GPU_PW[-100:], AWS["AWS_SECRET_ACCESS_KEY"]))
