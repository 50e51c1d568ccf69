"""Tracking that survives the server: stop it for > 20 s mid-run, restart it on the same store."""

import json
import os
import subprocess
import time

import pytest
from conftest import MlflowServer, launch_cli, run_cli
from mlflow.tracking import MlflowClient

from pagating.tracking.store import run_model_id

pytestmark = pytest.mark.slow


def test_server_down_20s_mid_run_loses_nothing(sample_project, tmp_path):
    server = MlflowServer(tmp_path / "srv").start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
        args = ["train", "--output_dir", str(tmp_path / "out"),
                "--max_steps", "300", "--logging_steps", "5", "--eval_steps", "100", "--save_steps", "100",
                "--batch_size", "8", "--set", "train.max_eval_batches=2"]
        proc = launch_cli(args, sample_project, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        mlf = MlflowClient(server.uri)
        deadline = time.time() + 300
        run_id = None
        while time.time() < deadline and run_id is None and proc.poll() is None:
            runs = mlf.search_runs([e.experiment_id for e in mlf.search_experiments()])
            if runs and "train/loss" in runs[0].data.metrics:
                run_id = runs[0].info.run_id
            time.sleep(0.2)
        assert run_id and proc.poll() is None, proc.communicate()[1][-3000:] if proc.poll() is not None else ""
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
        assert run_model_id(mlf, run) is not None  # the final model, logged as the run's MLflow model
        assert time.time() - down_at > 22
    finally:
        server.stop()


def test_sync_pushes_a_leftover_spool(sample_project, tmp_path):
    """A run that ended while the server was down leaves its spool; `pagating sync` sends it later."""
    from pagating.tracking.provenance import write_run_file
    from pagating.tracking.spool import MetricSpool, spool_path

    server = MlflowServer(tmp_path / "srv").start()
    try:
        mlf = MlflowClient(server.uri)
        run_id = mlf.create_run(mlf.create_experiment("pagating-sync")).info.run_id
        out = tmp_path / "out" / "run"
        write_run_file(out, {"run_id": run_id, "tracking_uri": server.uri})
        spool = MetricSpool(spool_path(out, run_id), run_id, server.uri)
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


def test_sync_refuses_a_uri_with_credentials(tmp_path, monkeypatch):
    """sync ends in log_model, whose MLflow "View run ... at:" line prints the tracking URI: one with a
    password in it (from the environment or the run file) is refused before anything is sent."""
    from pagating.config import UserError
    from pagating.publish import sync
    from pagating.tracking.provenance import write_run_file
    from pagating.tracking.spool import MetricSpool, spool_path

    out = tmp_path / "out"
    write_run_file(out, {"run_id": "r1", "tracking_uri": "http://gpu-runner:run-file-pw@127.0.0.1:9"})
    spool = MetricSpool(spool_path(out, "r1"), "r1", "http://127.0.0.1:9")
    spool.log({"train/loss": 1.0}, 1)
    spool.close()
    for env in ("http://gpu-runner:env-pw-123@127.0.0.1:9", None):
        if env:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with pytest.raises(UserError, match="carries credentials") as err:
            sync(out, timeout_s=1)
        assert "MLFLOW_TRACKING_PASSWORD" in str(err.value)
        assert "env-pw-123" not in str(err.value) and "run-file-pw" not in str(err.value)


def test_resume_sends_the_killed_process_spool_first(sample_project, tmp_path):
    """Killed while the server was down: its spool holds steps past the checkpoint. Resuming in the
    same output dir sends those first and re-logs none of them."""
    server = MlflowServer(tmp_path / "srv").start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
        args = ["train", "--output_dir", str(tmp_path / "out"), "--max_steps", "100", "--logging_steps", "5",
                "--eval_steps", "20", "--save_steps", "20", "--batch_size", "8", "--seed", "11"]
        proc = launch_cli(args, sample_project, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mlf = MlflowClient(server.uri)
        run_id, deadline = None, time.time() + 300
        while time.time() < deadline and run_id is None and proc.poll() is None:
            for r in mlf.search_runs([e.experiment_id for e in mlf.search_experiments()]):
                names = [a.path for a in mlf.list_artifacts(r.info.run_id, "checkpoints")]
                if "checkpoints/latest.json" in names:  # a whole checkpoint is up
                    run_id = r.info.run_id
            time.sleep(0.2)
        assert run_id, "no checkpoint reached MLflow"
        server.stop()
        spool = next((tmp_path / "out").rglob("mlflow_spool.*.jsonl"))
        sent_file = spool.with_suffix(".sent")

        def past_checkpoint() -> int:
            """How far the spool has got past the newest local checkpoint (steps never to be re-run)."""
            ckpts = [int(p.name.split("-")[1]) for p in spool.parent.glob("checkpoint-*")]
            lines = spool.read_text().splitlines()
            return (json.loads(lines[-1])["s"] if lines else 0) - max(ckpts, default=0)

        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and past_checkpoint() < 10:
            time.sleep(0.1)  # until the spool holds unsent steps the resumed run will train again
        proc.kill()
        proc.wait()
        assert past_checkpoint() >= 10
        assert sum(1 for _ in open(spool)) > int(sent_file.read_text() or 0)  # unsent lines were left
        server.start()
        res = run_cli([*args, "--resume", "auto"], cwd=sample_project, env={"MLFLOW_TRACKING_URI": server.uri},
                      check=True)
        assert json.loads(res.stdout.strip().splitlines()[-1])["run_id"] == run_id
        mlf = MlflowClient(server.uri)
        assert mlf.get_run(run_id).info.status == "FINISHED"
        for key in ("train/loss", "train/lr", "perf/step_time_s"):
            steps = [m.step for m in mlf.get_metric_history(run_id, key)]
            assert steps == list(range(5, 101, 5)), (key, steps)
    finally:
        server.stop()


def test_outage_spanning_the_end_of_training(sample_project, tmp_path):
    """The server goes away before training ends (time compressed through the drain budget): a run
    whose budget outlasts the outage finishes by itself; one whose budget runs out exits 0 saying what is
    still local, and `pagating sync` then completes it (FINISHED, model/, last checkpoint, every metric)."""
    server = MlflowServer(tmp_path / "srv").start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
        # Long enough that the later of the two starts (imports on a loaded box) still finds the first training.
        common = ["train", "--max_steps", "150", "--logging_steps", "5", "--eval_steps", "50", "--save_steps", "50",
                  "--batch_size", "8", "--set", "train.max_eval_batches=2", "--set", "tracking.retry_max_s=1"]
        procs = {
            name: launch_cli([*common, "--seed", seed, "--output_dir", str(tmp_path / name),
                              "--set", f"tracking.drain_timeout_s={budget}"],
                             sample_project, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, seed, budget in (("short", "1", 3), ("long", "2", 300))}
        mlf = MlflowClient(server.uri)
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs.values()):
            runs = mlf.search_runs([e.experiment_id for e in mlf.search_experiments()])
            if len(runs) == 2 and all("train/loss" in r.data.metrics for r in runs):
                break
            time.sleep(0.2)
        server.stop()  # both still training: the outage spans their end
        ended = {name: p for name, p in procs.items() if p.poll() is not None}
        assert not ended, {name: (p.returncode, p.communicate()[1][-3000:]) for name, p in ended.items()}
        if time.time() >= deadline:
            for p in procs.values():
                p.kill()
            raise AssertionError({name: p.communicate()[1][-3000:] for name, p in procs.items()})
        out, err = procs["short"].communicate(timeout=600)  # budget spent while the server is away
        assert procs["short"].returncode == 0, err[-3000:]
        assert procs["long"].poll() is None  # still waiting for the server, within its budget
        said = [ln for ln in err.splitlines() if "pagating sync" in ln]
        assert len(said) == 1 and "model/" in said[0] and "checkpoint step 150" in said[0], err[-3000:]
        short = json.loads(out.strip().splitlines()[-1])
        server.start()
        out, err = procs["long"].communicate(timeout=600)
        assert procs["long"].returncode == 0, err[-3000:]
        long_id = json.loads(out.strip().splitlines()[-1])["run_id"]
        mlf = MlflowClient(server.uri)
        assert mlf.get_run(short["run_id"]).info.status == "RUNNING"  # not finished until its uploads arrive
        proc = run_cli(["sync", str(tmp_path / "short")], cwd=sample_project, env={"MLFLOW_TRACKING_URI": server.uri})
        assert proc.returncode == 0 and "run FINISHED" in proc.stdout, proc.stdout + proc.stderr
        for run_id in (short["run_id"], long_id):
            run = mlf.get_run(run_id)
            assert run.info.status == "FINISHED"
            assert [m.step for m in mlf.get_metric_history(run_id, "train/loss")] == list(range(5, 151, 5))
            assert "final/eval_loss" in run.data.metrics
            model_id = run_model_id(mlf, run)  # the final model, logged as the run's MLflow model
            assert model_id and str(mlf.get_logged_model(model_id).status) == "READY"
            pointer = mlf.download_artifacts(run_id, "checkpoints/latest.json", str(tmp_path / run_id))
            assert json.loads(open(pointer).read())["step"] == 150
        assert not list((tmp_path / "short").rglob("pagating_pending.json"))
    finally:
        server.stop()
