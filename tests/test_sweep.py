"""The sweep against a real `mlflow server`: parent/children, idempotent re-run, kill and resume, shards."""

import contextlib
import json
import os
import signal
import statistics
import subprocess
import time

import psutil
import pytest
from conftest import launch_cli, run_cli
from mlflow.tracking import MlflowClient

from pagating.config import UserError, load_config
from pagating.grid import grid, parse_shard, take_shard
from pagating.runtime import thread_share

SMALL = ["--set", "train.max_steps=10", "--set", "train.eval_steps=5", "--set", "train.save_steps=5",
         "--set", "train.logging_steps=5", "--set", "train.batch_size=8", "--set", "train.warmup_steps=2",
         "--set", "train.max_eval_batches=4",  # 32 blocks spread over the validation split: fast evals
         "--set", "sweep.unit=[paGLU]"]  # the default grid adds plain at each lr; these tests count configs


@pytest.mark.parametrize("profile", ["sample", "wikitext103"])
def test_default_grid_is_the_seed_grid_plus_the_baseline_at_equal_size(profile):
    """The seed's 10 paGLU configs + GPT-2's own MLP at each lr; param-matched, so the arms are within 1%."""
    import torch

    from pagating.flops import padded_vocab
    from pagating.model import build_config, build_model, count_parameters

    cfg = load_config(profile)
    configs = grid(cfg)
    gated = [c for c in configs if c["model.unit"] == "paGLU"]
    plain = [c for c in configs if c["model.unit"] == "plain"]
    assert len(configs) == 12 and len(gated) == 10 and len(plain) == 2
    assert {c["train.alpha_mode"] for c in gated} == {"static_0.0", "static_0.5", "static_1.0", "learnable",
                                                       "scheduler_cosine"}
    assert {c["train.learning_rate"] for c in gated} == {c["train.learning_rate"] for c in plain} == {5e-4, 1e-3}
    counts = {}
    for unit in ("paGLU", "plain"):
        config = build_config({**cfg["model"], "unit": unit}, vocab_size=padded_vocab(cfg["data"]["vocab_size"]),
                              block_size=cfg["data"]["block_size"])
        with torch.device("meta"):  # shapes only: GPT-2 small's 124M parameters need no memory here
            counts[unit] = count_parameters(build_model(config))
    assert cfg["model"]["param_matched"] is True
    assert abs(counts["paGLU"] - counts["plain"]) / counts["plain"] < 0.01, counts


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_shards_partition_the_grid(n):
    configs = grid(load_config("sample", {"sweep.unit": "[paGLU, paGTU]"}))
    assert len(configs) == 20
    parts = [take_shard(configs, i, n) for i in range(n)]
    flat = [json.dumps(c, sort_keys=True) for p in parts for c in p]
    assert sorted(flat) == sorted(json.dumps(c, sort_keys=True) for c in configs)  # each exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["3/2", "2/2", "-1/2", "1/0", "a/b", "1"])
def test_bad_shard(text):
    with pytest.raises(UserError):
        parse_shard(text)


def _children(mlf, parent_id):
    exp = mlf.get_run(parent_id).info.experiment_id
    return mlf.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_sweep_parent_children_rerun_skips(sample_project, mlflow_server, tmp_path):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    args = ["sweep", *SMALL, "--set", "sweep.alpha_mode=[static_0.0, learnable, scheduler_cosine]",
            "--set", "sweep.learning_rate=[2e-3]", "--set", f"train.output_dir={tmp_path / 'out'}",
            "--summary", str(tmp_path / "sweep.json")]
    proc = run_cli(args, cwd=sample_project, env=env, check=True)
    assert "3 ran, 0 skipped, 0 resumed, 0 failed" in proc.stdout
    summary = json.loads((tmp_path / "sweep.json").read_text())
    mlf = MlflowClient(mlflow_server.uri)
    parent = mlf.get_run(summary["parent_run_id"])
    assert parent.info.run_name == f"sweep {summary['sweep_id']}" and parent.info.status == "FINISHED"
    assert parent.data.tags["pagating.sweep_id"] == summary["sweep_id"]
    assert json.loads(parent.data.params["sweep.alpha_mode"]) == ["static_0.0", "learnable", "scheduler_cosine"]
    kids = _children(mlf, parent.info.run_id)
    assert sorted(r.info.run_name for r in kids) == ["paGLU learnable lr=0.002", "paGLU scheduler_cosine lr=0.002",
                                                     "paGLU static_0.0 lr=0.002"]
    assert all(r.info.status == "FINISHED" and r.data.tags["pagating.sweep_id"] == summary["sweep_id"]
               for r in kids)
    assert {r.info.run_id for r in kids} == {c["run_id"] for c in summary["configs"]}

    again = run_cli(args, cwd=sample_project, env=env, check=True)
    assert "0 ran, 3 skipped, 0 resumed, 0 failed" in again.stdout
    assert len(_children(mlf, parent.info.run_id)) == 3


@pytest.mark.slow
def test_sweep_killed_midway_rerun_completes_only_the_rest(sample_project, mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    args = ["sweep", *SMALL, "--set", "train.max_steps=20", "--set", "sweep.alpha_mode=[static_0.5, static_1.0]",
            "--set", "sweep.learning_rate=[1.5e-3]", "--set", f"train.output_dir={tmp_path / 'out'}",
            "--summary", str(tmp_path / "sweep.json")]
    proc = launch_cli(args, sample_project, env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                      start_new_session=True)
    mlf = MlflowClient(mlflow_server.uri)
    first = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        runs = mlf.search_runs([e.experiment_id for e in mlf.search_experiments()],
                               filter_string="attributes.run_name LIKE '%lr=0.0015'")
        done = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING" and "train/loss" in r.data.metrics]
        if done and running:
            first = done[0]
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running child die at once
            break
        time.sleep(0.3)
    proc.wait()
    assert first is not None, "sweep finished before it could be killed midway"

    res = run_cli(args, cwd=sample_project, env={"MLFLOW_TRACKING_URI": mlflow_server.uri}, check=True)
    assert "0 ran, 1 skipped, 1 resumed, 0 failed" in res.stdout or "1 ran, 1 skipped, 0 resumed" in res.stdout
    runs = mlf.search_runs([first.info.experiment_id], filter_string="attributes.run_name LIKE '%lr=0.0015'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # one run per config, no duplicate
    assert mlf.get_run(first.info.run_id).info.end_time == first.info.end_time  # the finished one untouched
    for r in runs:
        steps = [m.step for m in mlf.get_metric_history(r.info.run_id, "train/loss")]
        assert steps == [5, 10, 15, 20]


def _workers(pid: int) -> set[int]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            if "pagating.sweep_worker" in " ".join(kid.cmdline()):
                found.add(kid.pid)
    return found


@pytest.mark.slow
def test_one_worker_per_slot_and_a_killed_worker_costs_one_retry(sample_project, mlflow_server, tmp_path):
    """Three configs in one slot share one worker process (imports paid once); a worker killed while it
    trains (as by the OOM killer) fails only that attempt: a fresh worker resumes the config, the sweep
    ends with every config FINISHED once."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    args = ["sweep", *SMALL, "--set", "train.max_steps=30", "--set", "tracking.experiment_prefix=workers",
            "--set", "sweep.alpha_mode=[static_0.2, static_0.4, static_0.8]", "--set", "sweep.learning_rate=[1e-3]",
            "--set", f"train.output_dir={tmp_path / 'out'}", "--summary", str(tmp_path / "sweep.json")]
    proc = launch_cli(args, sample_project, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mlf = MlflowClient(mlflow_server.uri)
    seen, killed, deadline = set(), None, time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        workers = _workers(proc.pid)
        seen |= workers
        exp = mlf.get_experiment_by_name("workers-sample")
        runs = mlf.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE '%static_0.4%'") \
            if exp else []
        # Once the first config's run has ended (its end drains in the worker's background while the second
        # trains): the kill then cuts the second config's training only.
        first = mlf.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE '%static_0.2%' and "
                                "attributes.status = 'FINISHED'") if exp else []
        if killed is None and first and runs and "train/loss" in runs[0].data.metrics and len(workers) == 1:
            killed = workers.pop()
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert killed is not None, "the second config finished before its worker could be killed"
    assert len(seen) == 2, seen  # the first worker trained configs 1 and 2; the second, 2 again and 3
    summary = json.loads((tmp_path / "sweep.json").read_text())
    # resumed from its checkpoint, or ran again from step 0 when killed before the first one was whole
    assert sorted(c["status"] for c in summary["configs"]) in (["ran", "ran", "resumed"], ["ran", "ran", "ran"])
    runs = mlf.search_runs([exp.experiment_id], filter_string="tags.`mlflow.parentRunId` LIKE '%'")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert [m.step for m in mlf.get_metric_history(r.info.run_id, "train/loss")] == [5, 10, 15, 20, 25, 30]
    logs = [f for f in (tmp_path / "out").rglob("*.log") if "the worker training this config died (exit -9)"
            in f.read_text()]
    assert len(logs) == 1


@pytest.mark.parametrize("sets, message", [
    (["sweep.foo=[1]"], "unknown grid key foo"),
    (["sweep.alpha_mode=[]"], "empty grid"),
    (["sweep.alpha_mode=[static_2]"], "alpha must be in [0, 1]"),
])
def test_bad_grid_exit_2(sample_project, mlflow_server, sets, message):
    args = ["sweep"] + [x for s in sets for x in ("--set", s)]
    proc = run_cli(args, cwd=sample_project, env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_bad_shard_cli_exit_2(sample_project, mlflow_server):
    proc = run_cli(["sweep", "--shard", "3/2"], cwd=sample_project, env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "3/2" in proc.stderr


@pytest.mark.slow
def test_one_config_per_gpu_slot_at_once(sample_project, mlflow_server, tmp_path):
    """--gpus 0,1: two workers, each child pinned to its own CUDA_VISIBLE_DEVICES, running concurrently
    (here the children fall back to CPU, which is enough to check the scheduling)."""
    args = ["sweep", *SMALL, "--set", "train.max_steps=20", "--set", "sweep.alpha_mode=[static_0.25, static_0.75]",
            "--set", "sweep.learning_rate=[1e-3]", "--set", f"train.output_dir={tmp_path / 'out'}",
            "--gpus", "0,1", "--summary", str(tmp_path / "sweep.json")]
    # No OMP_NUM_THREADS: the sweep gives each of its two workers half the usable cores.
    run_cli(args, cwd=sample_project, env={"MLFLOW_TRACKING_URI": mlflow_server.uri, "OMP_NUM_THREADS": ""},
            check=True)
    summary = json.loads((tmp_path / "sweep.json").read_text())
    mlf = MlflowClient(mlflow_server.uri)
    runs = [mlf.get_run(c["run_id"]) for c in summary["configs"]]
    assert sorted(r.data.tags["gpu.visible_devices"] for r in runs) == ["0", "1"]
    assert all(1 <= int(r.data.params["train.threads"]) <= thread_share(2) for r in runs)  # (fewer if busy)
    a, b = (r.info for r in runs)
    assert a.start_time < b.end_time and b.start_time < a.end_time  # they overlapped


def test_plain_unit_runs_once_per_lr_and_seed():
    configs = grid(load_config("sample", {"sweep.unit": "[paGLU, plain]", "sweep.seed": "[1, 2]"}))
    plain = [c for c in configs if c["model.unit"] == "plain"]
    assert len(configs) == 5 * 2 * 2 + 2 * 2 and len(plain) == 4
    assert all("train.alpha_mode" not in c for c in plain)  # GPT-2's own MLP has no α


@pytest.mark.slow
def test_unit_and_seed_axes_give_a_report_with_baseline_cis_and_the_plan(sample_project, mlflow_server, tmp_path):
    """2 units x 3 seeds on the sample, by a real sweep: the report answers "does gating help?" against the
    plain baseline, chosen on validation, tested on test, and its numbers recompute from the MLflow runs."""
    from scipy import stats as sps

    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    tiny = ["--set", "train.max_steps=4", "--set", "train.eval_steps=2", "--set", "train.save_steps=4",
            "--set", "train.logging_steps=2", "--set", "train.batch_size=8", "--set", "train.warmup_steps=1",
            "--set", "train.max_eval_batches=2"]
    proc = run_cli(["sweep", *tiny, "--set", "sweep.unit=[paGLU, plain]", "--set", "sweep.seed=[1, 2, 3]",
                    "--set", "sweep.alpha_mode=[static_1.0]", "--set", "sweep.learning_rate=[3e-3]",
                    "--set", f"train.output_dir={tmp_path / 'out'}", "--summary", str(tmp_path / "sweep.json")],
                   cwd=sample_project, env=env, check=True)
    assert "6 ran, 0 skipped, 0 resumed, 0 failed" in proc.stdout
    run_cli(["report", "--sweep-json", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "rep")],
            cwd=sample_project, env=env, check=True)
    md = (tmp_path / "rep" / "summary.md").read_text()
    section = md.split("## Does gating help?")[1].split("\n\n")[2]
    rows = {r[1]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:])}
    assert set(rows) == {"paGLU static_1.0 lr=0.003", "plain lr=0.003 (baseline)"}
    base, gated = rows["plain lr=0.003 (baseline)"], rows["paGLU static_1.0 lr=0.003"]
    mlf = MlflowClient(mlflow_server.uri)
    kids = {(r.data.params["model.unit"], r.data.params["train.seed"]): r for r in _children(
        mlf, json.loads((tmp_path / "sweep.json").read_text())["parent_run_id"])}
    assert len(kids) == 6
    # The seed axis is in the run names: no two children of the parent share one.
    assert kids[("plain", "1")].info.run_name == "plain lr=0.003 seed=1"
    assert kids[("paGLU", "2")].info.run_name == "paGLU static_1.0 lr=0.003 seed=2"
    seeds = ("1", "2", "3")
    # params in the table; three seeds each; mean ± 95% CI of the seeds' final validation loss.
    for row, unit in ((base, "plain"), (gated, "paGLU")):
        assert row[5] == f"{int(kids[(unit, '1')].data.params['model.n_params']):,}" and row[7] == "3"
        losses = [kids[(unit, s)].data.metrics["final/eval_loss"] for s in seeds]
        mean, half = (float(x) for x in row[8].split(" (")[0].split(" ± "))
        assert mean == pytest.approx(sum(losses) / 3, abs=6e-5)
        sd = statistics.stdev(losses)
        assert half == pytest.approx(sps.t.ppf(0.975, 2) * sd / 3 ** 0.5, abs=1e-4)
    # Param-matched by default: the arms are within 1%.
    n_base, n_gated = (int(r[5].replace(",", "")) for r in (base, gated))
    assert abs(n_gated - n_base) / n_base < 0.01
    # metrics.json: best config = argmin of the validation means; comparisons on test, Holm never below p;
    # one group's test mean and the test comparison's p recomputed from the runs themselves (6 significant
    # digits in the file).
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert doc["best_config"] == min(doc["groups"], key=lambda g: g["val_mean"])["config"]
    group = next(g for g in doc["groups"] if g["unit"] == "paGLU")
    test = {s: kids[("paGLU", s)].data.metrics["test/loss"] for s in seeds}
    assert group["test_mean"] == pytest.approx(sum(test.values()) / 3, rel=1e-5)
    plain_test = {s: kids[("plain", s)].data.metrics["test/loss"] for s in seeds}
    cmp = next(c for c in doc["comparisons"] if c["split"] == "test")
    assert cmp["n"] == 3 and cmp["p_holm"] >= cmp["p"]
    assert cmp["diff_mean"] == pytest.approx(sum(test[s] - plain_test[s] for s in seeds) / 3, rel=1e-5)
    assert cmp["p"] == pytest.approx(sps.ttest_rel([test[s] for s in seeds], [plain_test[s] for s in seeds]).pvalue,
                                     rel=1e-5)
    assert "test" in doc["verdict"] and "3 seeds" in doc["verdict"]
    assert md.splitlines()[2].startswith("**Verdict:**") and doc["verdict"] in md
    # The seed plan's figures beside the measured ones.
    assert "| time per step | 3.04 s | 0.25 s |" in md and "~14 h" in md and "~$12" in md
    assert "cpu (measured)" in md
