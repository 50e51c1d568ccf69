"""One run per config, however it is launched: claims in MLflow against a real `mlflow server`."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

TINY = ["--set", "train.max_steps=10", "--set", "train.eval_steps=5", "--set", "train.save_steps=5",
        "--set", "train.logging_steps=5", "--set", "train.batch_size=8", "--set", "train.warmup_steps=2",
        "--set", "tracking.heartbeat_s=1", "--set", "tracking.claim_settle_s=1"]


def launch(args, cwd, uri):
    return subprocess.Popen([sys.executable, "-m", "pagating.cli", *args], cwd=cwd, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def runs_of(mlf, prefix):
    exp = mlf.get_experiment_by_name(f"{prefix}-sample")
    return mlf.search_runs([exp.experiment_id]) if exp else []


def test_same_config_twice_at_once_one_run(sample_project, mlflow_server, tmp_path):
    args = ["train", *TINY, "--set", "tracking.experiment_prefix=twice", "--output_dir", str(tmp_path / "o")]
    procs = [launch(args, sample_project, mlflow_server.uri) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert len(loser.strip().splitlines()) == 1 and "already being trained by" in loser, loser
    runs = runs_of(MlflowClient(mlflow_server.uri), "twice")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_live_claim_refused_stale_claim_taken_over(sample_project, mlflow_server, tmp_path, monkeypatch):
    mlf = MlflowClient(mlflow_server.uri)
    exp_id = mlf.create_experiment("takeover-sample")
    args = ["train", *TINY, "--set", "tracking.experiment_prefix=takeover", "--set", "tracking.claim_timeout_s=60",
            "--output_dir", str(tmp_path / "o")]
    # A process on another machine holds the config; its run was created before it went silent.
    from pagating.config import config_hash, load_config, parse_sets
    from pagating.data import load_meta

    monkeypatch.chdir(sample_project)
    cfg = load_config("sample", parse_sets(args[2:-2:2]))
    h = config_hash(cfg, load_meta(cfg["data"]["prepared_dir"])["source_md5"])
    run_id = mlf.create_run(exp_id, run_name="elsewhere", tags={"pagating.config_hash": h}).info.run_id

    def claim(age_s):
        mlf.set_experiment_tag(exp_id, f"pagating.claim.{h}", json.dumps(
            {"owner": "x", "host": "gpu-box-7", "pid": 1, "run_id": run_id, "t": time.time() - age_s}))

    claim(0)
    busy = run_cli(args, cwd=sample_project, env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert busy.returncode == 2 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    assert "already being trained by gpu-box-7 pid 1" in busy.stderr
    assert not (tmp_path / "o").exists()

    claim(600)  # no heartbeat for longer than claim_timeout_s: taken over, its run continued
    res = run_cli(args, cwd=sample_project, env={"MLFLOW_TRACKING_URI": mlflow_server.uri}, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1])["run_id"] == run_id
    assert [r.info.run_id for r in runs_of(mlf, "takeover")] == [run_id]
    assert mlf.get_run(run_id).info.status == "FINISHED"
    assert json.loads(mlf.get_experiment(exp_id).tags[f"pagating.claim.{h}"])["released"] is True


def test_two_sweeps_over_one_grid_share_the_work(sample_project, mlflow_server, tmp_path):
    common = ["sweep", *TINY, "--set", "tracking.experiment_prefix=twosweeps",
              "--set", "sweep.alpha_mode=[static_0.3, static_0.6]", "--set", "sweep.learning_rate=[1e-3]",
              "--set", f"train.output_dir={tmp_path / 'out'}", "--gpus", "none"]
    procs = [launch([*common, "--summary", str(tmp_path / f"s{i}.json")], sample_project, mlflow_server.uri)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    mlf = MlflowClient(mlflow_server.uri)
    children = [r for r in runs_of(mlf, "twosweeps") if r.data.tags.get("pagating.role") != "sweep"]
    assert sorted(r.info.run_name for r in children) == ["paGLU static_0.3 lr=0.001", "paGLU static_0.6 lr=0.001"]
    assert all(r.info.status == "FINISHED" for r in children)
    ids = {r.info.run_id for r in children}
    for i in range(2):  # each sweep reports both configs, with the one run each has
        summary = json.loads((tmp_path / f"s{i}.json").read_text())
        assert {c["run_id"] for c in summary["configs"]} == ids
