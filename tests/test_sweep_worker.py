"""The sweep worker's background ends: a FINISHED run's final uploads drain in a thread while the next config
starts, with the config's claim held until they are done, and their lines in the config's own log."""

import sys
import threading

import pytest
from mlflow.tracking import MlflowClient

from pagating import names, publish
from pagating import run as run_module
from pagating.sweep_worker import Ends, _Routed


@pytest.mark.slow
def test_a_finished_runs_end_drains_in_the_background_with_its_claim_held(sample_project, mlflow_server, tmp_path,
                                                                          monkeypatch):
    from pagating.config import load_config
    from pagating.tracking import claim, store
    from pagating.train import train

    monkeypatch.chdir(sample_project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    entered, gate = threading.Event(), threading.Event()
    real = publish.log_model

    def held_log_model(*args, **kwargs):  # the end's slowest part (the model upload), held until the test says
        entered.set()
        assert gate.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(publish, "log_model", held_log_model)
    ended = []
    monkeypatch.setattr(run_module, "BACKGROUND", Ends(lambda key, ok: ended.append((key, ok))))
    run_module.BACKGROUND.log = str(tmp_path / "config.log")
    cfg = load_config("sample", {"train.max_steps": "4", "train.eval_steps": "2", "train.save_steps": "2",
                                 "train.logging_steps": "2", "train.batch_size": "2",
                                 "tracking.experiment_prefix": "background",
                                 "train.output_dir": str(tmp_path / "out")})
    result = train(cfg, device="cpu", compile_model="off", threads=1)
    # train() is back (the worker would start the next config now) while the end is still draining.
    assert result["status"] == "FINISHED" and result["finishing"]
    assert entered.wait(120)
    mlf = MlflowClient(mlflow_server.uri)
    run = mlf.get_run(result["run_id"])
    assert run.info.status == "RUNNING" and store.run_model_id(mlf, run) is None
    # The config stays claimed until its end is done: no other process (or next config) can take it.
    again = train(cfg, device="cpu", compile_model="off", threads=1, if_claimed="skip")
    assert again["status"] == "claimed" and again["run_id"] == result["run_id"]
    assert ended == []

    gate.set()
    run_module.BACKGROUND.join()
    assert ended == [(result["run_id"], True)]
    run = mlf.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and store.run_model_id(mlf, run) is not None
    assert names.FINAL_EVAL_LOSS in run.data.metrics and "test/loss" in run.data.metrics
    assert [m.step for m in mlf.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    held = claim.Claim.for_config(mlf, run.info.experiment_id, result["config_hash"], cfg["tracking"])
    assert held.current() is None  # released once the end was done


def test_a_background_ends_lines_go_to_its_own_log(tmp_path, monkeypatch):
    """While config b trains (its lines on the worker's fds), the end of config a writes into a's log only."""
    training_now = tmp_path / "b.log"
    with open(training_now, "a", buffering=1) as fd_target:
        monkeypatch.setattr(sys, "stderr", _Routed(fd_target))
        done, go = [], threading.Event()

        def end_of_a():
            assert go.wait(30)
            print("end of a: uploads done", file=sys.stderr)
            raise RuntimeError("upload refused")  # its traceback too goes to a's log

        ends = Ends(lambda key, ok: done.append((key, ok)))
        ends.log = str(tmp_path / "a.log")
        ends.submit("run-a", end_of_a)
        ends.log = str(training_now)
        go.set()
        print("b: step 1", file=sys.stderr)
        ends.join()
        print("b: step 2", file=sys.stderr)
    assert done == [("run-a", False)]
    a = (tmp_path / "a.log").read_text()
    assert "end of a: uploads done" in a and "RuntimeError: upload refused" in a and "b: step" not in a
    b = training_now.read_text()
    assert b.splitlines() == ["b: step 1", "b: step 2"]
