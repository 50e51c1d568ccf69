"""Tracking that survives the server: stop it for > 20 s mid-run, restart it on the same store."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import MlflowServer, run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_server_down_20s_mid_run_loses_nothing(sample_project, tmp_path):
    server = MlflowServer(tmp_path / "srv").start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
        cmd = [sys.executable, "-m", "pagating.cli", "train", "--output_dir", str(tmp_path / "out"),
               "--max_steps", "300", "--logging_steps", "5", "--eval_steps", "100", "--save_steps", "100",
               "--batch_size", "8", "--set", "train.max_eval_batches=2"]
        proc = subprocess.Popen(cmd, cwd=sample_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        mlf = MlflowClient(server.uri)
        deadline = time.time() + 300
        run_id = None
        while time.time() < deadline and run_id is None:
            runs = mlf.search_runs([e.experiment_id for e in mlf.search_experiments()])
            if runs and "train/loss" in runs[0].data.metrics:
                run_id = runs[0].info.run_id
            time.sleep(0.2)
        assert run_id and proc.poll() is None
        server.stop()
        down_at = time.time()
        time.sleep(22)
        still_training = proc.poll() is None  # training never waited on the server
        server.start()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert still_training
        result = json.loads(out.strip().splitlines()[-1])
        assert result["run_id"] == run_id
        mlf = MlflowClient(server.uri)
        run = mlf.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in mlf.get_metric_history(run_id, "train/loss")]
        assert steps == list(range(5, 301, 5)), steps  # every step, exactly once
        assert "final/eval_loss" in run.data.metrics
        assert any(a.path == "model" for a in mlf.list_artifacts(run_id))
        assert time.time() - down_at > 22
    finally:
        server.stop()


def test_sync_pushes_a_leftover_spool(sample_project, tmp_path):
    """A run that ended while the server was down leaves its spool; `pagating sync` sends it later."""
    from pagating.tracking import SPOOL_FILE, MetricSpool, write_run_file

    server = MlflowServer(tmp_path / "srv").start()
    try:
        mlf = MlflowClient(server.uri)
        run_id = mlf.create_run(mlf.create_experiment("pagating-sync")).info.run_id
        out = tmp_path / "out" / "run"
        write_run_file(out, {"run_id": run_id, "tracking_uri": server.uri})
        spool = MetricSpool(out / SPOOL_FILE, run_id, server.uri)
        for step in range(1, 8):
            spool.log({"train/loss": 10.0 - step}, step)
        spool.close()  # never flushed: the lines are only on disk
        assert mlf.get_metric_history(run_id, "train/loss") == []
        proc = run_cli(["sync", str(tmp_path / "out")], cwd=sample_project,
                       env={"MLFLOW_TRACKING_URI": server.uri}, check=True)
        assert "7 sent, 0 left" in proc.stdout
        assert [(m.step, m.value) for m in mlf.get_metric_history(run_id, "train/loss")] == \
            [(s, 10.0 - s) for s in range(1, 8)]
        again = run_cli(["sync", str(tmp_path / "out")], cwd=sample_project, env={"MLFLOW_TRACKING_URI": server.uri},
                        check=True)
        assert "7 sent, 0 left" in again.stdout
        assert len(mlf.get_metric_history(run_id, "train/loss")) == 7  # nothing sent twice
    finally:
        server.stop()
