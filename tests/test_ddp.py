"""`pagating train --nproc 2`: torchrun + the Trainer's DDP on CPU (gloo), one MLflow run from rank 0."""

import json

import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient

from pagating.flops import flops_per_token
from pagating.runtime import thread_share

pytestmark = pytest.mark.slow

ARGS = ["train", "--alpha_mode", "static_0.5", "--max_steps", "16", "--eval_steps", "8", "--save_steps", "8",
        "--logging_steps", "4", "--batch_size", "8", "--seed", "3", "--device", "cpu"]


def test_two_processes_match_one(sample_project, mlflow_server, tmp_path):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri, "OMP_NUM_THREADS": "1"}
    mlf = MlflowClient(mlflow_server.uri)
    # Its own experiment: one config gets one run per experiment, and the DDP run is the same config.
    single = run_cli([*ARGS, "--output_dir", str(tmp_path / "one"), "--set", "tracking.experiment_prefix=ddp-one"],
                     cwd=sample_project, env=env, check=True)
    one_id = json.loads(single.stdout.strip().splitlines()[-1])["run_id"]
    exp = mlf.get_experiment_by_name("pagating-sample")
    exp = exp.experiment_id if exp else mlf.create_experiment("pagating-sample")
    before = {r.info.run_id for r in mlf.search_runs([exp])}

    # No OMP_NUM_THREADS: each of the two processes takes half the usable cores (torchrun alone would give 1).
    # A forced peak (CPU has none): perf/mfu is then computed, per device.
    ddp = run_cli([*ARGS, "--output_dir", str(tmp_path / "two"), "--nproc", "2"], cwd=sample_project,
                  env={**env, "OMP_NUM_THREADS": "", "PAGATING_PEAK_TFLOPS": "0.01"}, check=True)
    new = [r for r in mlf.search_runs([exp]) if r.info.run_id not in before]
    assert len(new) == 1, "exactly one MLflow run for the two processes"
    run = new[0]
    assert run.info.status == "FINISHED" and run.data.params["train.world_size"] == "2"
    assert run.data.params["train.batch_size"] == "8"  # the global batch, split 4 + 4
    assert 1 <= int(run.data.params["train.threads"]) <= thread_share(2)  # its share (fewer if cores are busy)
    assert json.loads(ddp.stdout.strip().splitlines()[-1])["run_id"] == run.info.run_id
    a = mlf.get_metric_history(one_id, "train/loss")
    b = mlf.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in a] == [m.step for m in b] == [4, 8, 12, 16]
    for x, y in zip(a, b, strict=True):
        assert abs(x.value - y.value) < 1e-3 * abs(x.value), (x.value, y.value)
    assert len(mlf.get_metric_history(run.info.run_id, "eval/loss")) == 2
    # MFU per device: tokens/s (the global batch's) x FLOPs per token over the peak of both processes.
    p = run.data.params
    fpt = flops_per_token(n_layer=int(p["model.n_layer"]), n_embd=int(p["model.n_embd"]), d_ff=int(p["model.d_ff"]),
                          vocab_size=int(p["model.vocab_size"]), block_size=int(p["data.block_size"]), gated=True)
    tps = {m.step: m.value for m in mlf.get_metric_history(run.info.run_id, "perf/tokens_per_s")}
    mfu = {m.step: m.value for m in mlf.get_metric_history(run.info.run_id, "perf/mfu")}
    assert mfu and set(mfu) == set(tps)
    for step, value in mfu.items():
        assert value == pytest.approx(tps[step] * fpt / (2 * 0.01e12), rel=1e-9), step
