"""One tracked training run against a real `mlflow server` on 127.0.0.1, on the sample corpus."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ThrottleProxy, fake_nvml_dir, launch_cli, run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

FAST = ["--max_steps", "30", "--eval_steps", "10", "--save_steps", "10", "--logging_steps", "5",
        "--batch_size", "8"]


def env_for(server, **extra):
    return {"MLFLOW_TRACKING_URI": server.uri, **extra}


def metric_steps(mlf, run_id, key):
    return [m.step for m in mlf.get_metric_history(run_id, key)]


def hand_eval_loss(model, project, params) -> float:
    """Shifted cross-entropy summed over every predicted token of the whole validation split (the final eval's
    blocks, whatever the intermediate evals' subset), over their count."""
    from pagating.data.dataset import PackedDataset

    ds = PackedDataset(project / params["data.prepared_dir"], "validation")
    ids = torch.stack([ds[i]["input_ids"] for i in range(len(ds))])
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(64):
            logits = model(chunk).logits[:, :-1].double()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += chunk[:, 1:].numel()
    return total / count


def test_tiny_run_logs_everything(sample_project, mlflow_server, tmp_path, monkeypatch):
    out = tmp_path / "out"
    proc = run_cli(["train", "--unit", "paSwishU", "--alpha_mode", "learnable", "--learning_rate", "3e-3",
                    "--output_dir", str(out), *FAST], cwd=sample_project,
                   env=env_for(mlflow_server, PAGATING_PEAK_TFLOPS="1.0", PAGATING_USD_PER_HOUR="0.40"),
                   check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    mlf = MlflowClient(mlflow_server.uri)
    run = mlf.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "paSwishU learnable lr=0.003"
    assert mlf.get_experiment(run.info.experiment_id).name == "pagating-sample"
    params = run.data.params
    for key in ("profile", "train.alpha_mode", "train.learning_rate", "train.batch_size", "train.max_steps",
                "train.seed", "model.unit", "model.n_layer", "model.d_ff", "model.n_params", "data.block_size",
                "data.tokenizer", "train.device", "alpha.kind"):
        assert key in params, key
    assert params["train.learning_rate"] == "0.003" and params["train.max_steps"] == "30"
    tags = run.data.tags
    for key in ("git.commit", "dvc.data_md5", "pagating.config_hash", "gpu.name", "host", "cost.usd_per_hour"):
        assert key in tags, key
    assert tags["gpu.name"] == "cpu" and tags["pagating.config_hash"] == result["config_hash"]
    import hashlib

    import pagating
    lock = Path(pagating.__file__).resolve().parents[1] / "requirements" / "lock-cpu.txt"
    assert tags["pagating.lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()  # what it installed from
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/step_time_s", "perf/tokens_per_s",
                "perf/mfu", "alpha/layer_00", "alpha/layer_01", "cost/usd"):
        assert metric_steps(mlf, run.info.run_id, key) == [5, 10, 15, 20, 25, 30], key
    assert metric_steps(mlf, run.info.run_id, "eval/loss") == [10, 20, 30]
    # Intermediate evals see a spread subset of the validation split, the final eval the whole split; the test
    # split is evaluated once at the end.
    meta = json.loads((sample_project / params["data.prepared_dir"] / "meta.json").read_text())
    assert int(params["eval.tokens"]) == meta["splits"]["validation"]["tokens_packed"]
    subset = int(params["eval.subset_blocks"])
    assert subset == int(params["train.max_eval_batches"]) * int(params["train.batch_size"])
    assert 0 < subset < int(params["eval.blocks"]) == meta["splits"]["validation"]["blocks"]
    assert int(params["test.tokens"]) == meta["splits"]["test"]["tokens_packed"]
    assert metric_steps(mlf, run.info.run_id, "test/loss") == [30]
    assert abs(run.data.metrics["test/ppl"] - math.exp(run.data.metrics["test/loss"])) < 1e-6 * run.data.metrics[
        "test/ppl"]
    # The real Trainer's optimizer groups: α, β, biases and norms undecayed, every matrix decayed.
    (tmp_path / "g").mkdir()
    with open(mlf.download_artifacts(run.info.run_id, "optimizer_groups.json", str(tmp_path / "g"))) as f:
        groups = json.load(f)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["params"]}
    undecayed = {n for g in groups if g["weight_decay"] == 0 for n in g["params"]}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}
    for i in range(2):
        unit = f"transformer.h.{i}.mlp.unit"
        assert {f"{unit}.alpha_module.alpha_param", f"{unit}.beta", f"{unit}.value_proj.bias",
                f"transformer.h.{i}.ln_1.weight", f"transformer.h.{i}.ln_2.bias"} <= undecayed
        assert {f"{unit}.value_proj.weight", f"{unit}.gate_proj.weight", f"transformer.h.{i}.attn.c_attn.weight",
                f"transformer.h.{i}.mlp.c_proj.weight"} <= decayed
    assert "transformer.ln_f.weight" in undecayed and "transformer.wte.weight" in decayed
    evals = [m.value for m in mlf.get_metric_history(run.info.run_id, "eval/loss")]
    assert evals[-1] < evals[0]
    ppl = mlf.get_metric_history(run.info.run_id, "eval/ppl")[-1].value
    assert abs(ppl - torch.tensor(evals[-1]).exp().item()) < 1e-3 * ppl
    assert run.data.metrics["best/eval_loss"] == min(evals)
    assert not any(k.startswith("system/gpu_") for k in run.data.metrics)  # no GPU here: none logged
    assert "system/cpu_utilization_percentage" in run.data.metrics
    tps = mlf.get_metric_history(run.info.run_id, "perf/tokens_per_s")[-1].value
    st = mlf.get_metric_history(run.info.run_id, "perf/step_time_s")[-1].value
    assert abs(tps * st - 8 * 64) < 1e-6 * tps * st  # tokens per step = batch x block
    assert mlf.get_metric_history(run.info.run_id, "alpha/layer_00")[0].value != 0.5  # α learned
    # Artifacts: the MLflow model loads with one call, gives the same logits as the local copy, generates
    # with the tokenizer it carries.
    arts = {a.path for a in mlf.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "params.yaml"} <= arts
    import mlflow
    from transformers import AutoTokenizer

    from pagating.model import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # for this test only
    uri = f"runs:/{run.info.run_id}/model"
    model = mlflow.pytorch.load_model(uri).eval()
    ref = load_model(os.path.join(result["run_dir"] if os.path.isabs(
        result["run_dir"]) else sample_project / result["run_dir"], "model")).eval()
    x = torch.randint(0, 2000, (2, 16))
    assert torch.equal(model(x).logits, ref(x).logits)
    # The logged eval loss is the mean next-token cross-entropy over the predicted tokens (T-1 per block),
    # recomputed here by hand from the saved model on the same eval blocks.
    assert abs(hand_eval_loss(model, sample_project, run.data.params) - run.data.metrics["final/eval_loss"]) \
        < 1e-5 * run.data.metrics["final/eval_loss"]
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"))
    tok = AutoTokenizer.from_pretrained(os.path.join(local, "extra_files"))
    ids = tok("ROMEO. What", return_tensors="pt").input_ids
    text = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("ROMEO. What") and len(text) > len("ROMEO. What")


def test_fake_nvml_gpu_metrics(sample_project, mlflow_server, tmp_path):
    fake = fake_nvml_dir(tmp_path / "fakenvml")
    env = env_for(mlflow_server, PYTHONPATH=f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = run_cli(["train", "--output_dir", str(tmp_path / "o"), "--max_steps", "10", "--eval_steps", "10",
                    "--save_steps", "10", "--logging_steps", "5"], cwd=sample_project, env=env, check=True)
    run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
    m = MlflowClient(mlflow_server.uri).get_run(run_id).data.metrics
    assert m["system/gpu_0_utilization_percentage"] == 87
    assert m["system/gpu_0_memory_usage_megabytes"] == 3000  # MB (10**6 bytes), as MLflow's monitor
    assert m["system/gpu_0_power_usage_watts"] == 215 and m["system/gpu_0_temperature_celsius"] == 61


def _server_artifacts(server, run_id: str) -> Path:
    return next(server.root.glob(f"artifacts/*/{run_id}/artifacts"))


def _marker(folder: Path) -> dict:
    try:
        return json.loads((folder / "pagating_checkpoint.json").read_text())
    except (OSError, ValueError):
        return {}


def test_kill9_mid_checkpoint_upload_then_resume_from_mlflow(sample_project, mlflow_server, tmp_path):
    """SIGKILL while the second checkpoint is half uploaded (a throttling proxy slows the upload):
    MLflow keeps the first one whole, and a fresh folder resumes from exactly it."""
    args = ["train", "--alpha_mode", "scheduler_cosine", "--max_steps", "40", "--eval_steps", "10",
            "--save_steps", "10", "--logging_steps", "5", "--batch_size", "8", "--seed", "7"]
    env = env_for(mlflow_server)
    # The uninterrupted reference: same config, its own experiment (one run per config per experiment).
    ref = run_cli([*args, "--output_dir", str(tmp_path / "ref"), "--set", "tracking.experiment_prefix=ref"],
                  cwd=sample_project, env=env, check=True)
    ref_id = json.loads(ref.stdout.strip().splitlines()[-1])["run_id"]
    mlf = MlflowClient(mlflow_server.uri)

    proxy = ThrottleProxy(mlflow_server.port, rate=600_000)  # ~3.4 MB checkpoint: ~6 s per upload
    proc = launch_cli([*args, "--output_dir", str(tmp_path / "a")], sample_project, {"MLFLOW_TRACKING_URI": proxy.uri},
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    killed_id, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None and killed_id is None:
        exp = mlf.get_experiment_by_name("pagating-sample")
        for r in mlf.search_runs([exp.experiment_id] if exp else [], filter_string="attributes.status = 'RUNNING'"):
            try:
                slots = _server_artifacts(mlflow_server, r.info.run_id) / "checkpoints"
            except StopIteration:
                continue
            whole = [s for s in slots.glob("slot-*") if _marker(s).get("state") == "complete"]
            cut = [s for s in slots.glob("slot-*") if _marker(s).get("state") == "writing"
                   and (s / "model.safetensors").exists()]
            if whole and cut:  # the second upload has begun: new weights are up, the rest is not
                os.killpg(proc.pid, signal.SIGKILL)
                killed_id = r.info.run_id
                break
        time.sleep(0.05)
    proc.wait()
    proxy.close()
    assert killed_id, f"no kill mid-upload: {proc.stdout.read().decode()[-2000:]}"
    named = whole[0]
    named_step = _marker(named)["step"]

    # What a fresh machine downloads: the whole checkpoint, byte for byte, not the cut-off one.
    from pagating.tracking.checkpoints import download_checkpoint

    probe = download_checkpoint(mlf, killed_id, tmp_path / "probe")
    assert probe is not None and probe.name == f"checkpoint-{named_step}"
    for f in ("model.safetensors", "optimizer.pt", "trainer_state.json", "scheduler.pt", "rng_state.pth"):
        assert (probe / f).read_bytes() == (named / f).read_bytes(), f
    assert json.loads((probe / "trainer_state.json").read_text())["global_step"] == named_step

    # A fresh output dir and no proxy: the checkpoint can only come from MLflow.
    res = run_cli([*args, "--output_dir", str(tmp_path / "b"), "--resume", "auto"], cwd=sample_project, env=env,
                  check=True)
    assert f"resumed from {tmp_path / 'b'}" in res.stderr and f"checkpoint-{named_step})" in res.stderr, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["run_id"] == killed_id
    run = mlf.get_run(killed_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "eval/loss", "alpha/layer_00", "perf/step_time_s", "final/eval_loss"):
        steps = metric_steps(mlf, killed_id, key)
        assert steps == sorted(set(steps)), f"{key} has duplicate steps {steps}"
        assert steps == metric_steps(mlf, ref_id, key), key
    final = mlf.get_metric_history(killed_id, "train/loss")[-1]
    ref_final = mlf.get_metric_history(ref_id, "train/loss")[-1]
    assert final.step == ref_final.step == 40
    assert abs(final.value - ref_final.value) < 1e-4
    assert abs(run.data.metrics["eval/loss"] - mlf.get_run(ref_id).data.metrics["eval/loss"]) < 1e-4
    assert abs(run.data.metrics["alpha/layer_00"] - mlf.get_run(ref_id).data.metrics["alpha/layer_00"]) < 1e-6
    # Only the last two checkpoints stay in MLflow, each whole, and the pointer names the newest.
    slots = _server_artifacts(mlflow_server, killed_id) / "checkpoints"
    assert sorted(p.name for p in slots.iterdir()) == ["latest.json", "slot-0", "slot-1"]
    pointer = json.loads((slots / "latest.json").read_text())
    assert pointer["step"] == 40 and _marker(slots / pointer["slot"])["state"] == "complete"


def test_each_step_once_finished_is_done_corrupt_checkpoint_skipped(sample_project, mlflow_server, tmp_path):
    args = ["train", "--max_steps", "12", "--eval_steps", "5", "--save_steps", "5", "--logging_steps", "5",
            "--batch_size", "8", "--seed", "5", "--output_dir", str(tmp_path / "o")]
    env = env_for(mlflow_server)
    mlf = MlflowClient(mlflow_server.uri)
    first = json.loads(run_cli(args, cwd=sample_project, env=env, check=True).stdout.strip().splitlines()[-1])
    run_id, run_dir = first["run_id"], Path(first["run_dir"])
    if not run_dir.is_absolute():
        run_dir = sample_project / run_dir

    def all_steps():
        return {k: metric_steps(mlf, run_id, k) for k in mlf.get_run(run_id).data.metrics}

    assert metric_steps(mlf, run_id, "eval/loss") == [5, 10, 12]  # one evaluation at the last step
    steps = all_steps()
    assert all(v == sorted(set(v)) for v in steps.values()), steps

    # The same config again (resume or not): it is FINISHED, so nothing happens.
    end = mlf.get_run(run_id).info.end_time
    for extra in (["--resume", "auto"], []):
        again = run_cli([*args, *extra], cwd=sample_project, env=env, check=True)
        assert "already FINISHED" in again.stderr and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert mlf.get_run(run_id).info.end_time == end and all_steps() == steps
    assert len(mlf.search_runs([mlf.get_run(run_id).info.experiment_id],
                               filter_string=f"tags.`pagating.config_hash` = '{first['config_hash']}'")) == 1

    # Interrupted (as MLflow sees it) with a corrupt newest local checkpoint: named once, skipped.
    mlf.set_terminated(run_id, "KILLED")
    (run_dir / "checkpoint-12" / "model.safetensors").unlink()
    res = run_cli([*args, "--resume", "auto"], cwd=sample_project, env=env, check=True)
    named = [ln for ln in res.stderr.splitlines() if "checkpoint-12" in ln]
    assert len(named) == 1 and "skipping" in named[0] and "model.safetensors missing" in named[0], res.stderr
    assert f"resumed from {run_dir / 'checkpoint-10'}" in res.stderr
    assert mlf.get_run(run_id).info.status == "FINISHED" and all_steps() == steps

    # Every local checkpoint corrupt: the whole one in MLflow (the last step: nothing left to train).
    mlf.set_terminated(run_id, "KILLED")
    for ckpt in run_dir.glob("checkpoint-*"):
        with open(ckpt / "optimizer.pt", "r+b") as f:
            f.truncate(100)
    res = run_cli([*args, "--resume", "auto"], cwd=sample_project, env=env, check=True)
    assert len([ln for ln in res.stderr.splitlines() if "skipping" in ln]) == 2, res.stderr
    assert f"resumed from {run_dir / 'checkpoint-12'}" in res.stderr
    assert mlf.get_run(run_id).info.status == "FINISHED" and all_steps() == steps


def test_seed_command_runs(sample_project, mlflow_server):
    proc = subprocess.run([sys.executable, str(os.path.join(os.path.dirname(__file__), "..", "scripts",
                                                             "train_pagating.py")),
                           "--alpha_mode", "static_0.0", "--learning_rate", "5e-4", "--batch_size", "16",
                           "--max_steps", "20", "--output_dir", "logs/phase2_sweeps"],
                          cwd=sample_project, env={**os.environ, **env_for(mlflow_server)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sample_project / "logs" / "phase2_sweeps").is_dir()
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert MlflowClient(mlflow_server.uri).get_run(result["run_id"]).data.params["train.alpha_mode"] == "static_0.0"


@pytest.mark.parametrize("args, message", [
    (["--alpha_mode", "cosine"], "unknown alpha mode"),
    (["--alpha_mode", "static_1.5"], "alpha must be in [0, 1]"),
    (["--learning_rate", "0"], "learning_rate must be"),
    (["--batch_size", "-4"], "batch_size must be"),
    (["--unit", "paFoo"], "unknown unit"),
    (["--resume", "auto", "--seed", "12345"], "nothing to resume"),
    # Data that does not match the config: the other profile's folder, or a block size it was not packed with.
    (["--profile", "wikitext103"], "data/prepared/wikitext103 not found: run `pagating prepare --profile wikitext103`"),
    (["--set", "data.block_size=128"], "prepared with data.block_size=64 but the config says 128: run "
                                       "`pagating prepare --profile sample --set data.block_size=128`"),
])
def test_bad_input_one_line_exit_2_no_run(sample_project, mlflow_server, tmp_path, args, message):
    mlf = MlflowClient(mlflow_server.uri)
    before = len(mlf.search_runs([e.experiment_id for e in mlf.search_experiments()]))
    proc = run_cli(["train", "--output_dir", str(tmp_path / "o"), *args], cwd=sample_project,
                   env=env_for(mlflow_server))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert len(mlf.search_runs([e.experiment_id for e in mlf.search_experiments()])) == before
    assert not (tmp_path / "o").exists()


def test_missing_data_and_unreachable_server(tmp_path, mlflow_server):
    import shutil

    from conftest import REPO, free_port

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = run_cli(["train"], cwd=tmp_path, env=env_for(mlflow_server))
    assert proc.returncode == 2 and "run `pagating prepare --profile sample`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(["train"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert proc.returncode == 2  # data is checked first; both are one line
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreachable_server_exit_2(sample_project, tmp_path):
    from conftest import free_port

    proc = run_cli(["train", "--output_dir", str(tmp_path / "o")], cwd=sample_project,
                   env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert proc.returncode == 2 and "unreachable" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_disk_full_downloading_the_resume_checkpoint(sample_project, mlflow_server, tmp_path):
    """A fresh machine continues an interrupted run whose checkpoint (~3.4 MB) is only in MLflow, into a
    1 MiB tmpfs (own mount namespace): one line with the size needed, exit 2, nothing left in the folder."""
    from test_bad_input import in_small_tmpfs

    args = ["train", "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "2",
            "--batch_size", "4", "--set", "tracking.experiment_prefix=dlfull"]
    first = run_cli([*args, "--output_dir", str(tmp_path / "first")], cwd=sample_project, env=env_for(mlflow_server),
                    check=True)
    run_id = json.loads(first.stdout.strip().splitlines()[-1])["run_id"]
    mlf = MlflowClient(mlflow_server.uri)
    mlf.set_terminated(run_id, "KILLED")  # interrupted: the next launch of this config continues it
    small, listing = tmp_path / "small", tmp_path / "listing.txt"
    small.mkdir()
    proc = in_small_tmpfs(small, 2**20, [sys.executable, "-m", "pagating.cli", *args, "--output_dir",
                                         str(small / "out")],
                          after=f"find {small} -mindepth 1 > {listing}", cwd=sample_project,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Downloading artifacts" not in ln]  # MLflow's bars
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("pagating train: error: not enough disk space in"), lines
    assert f"MLflow run {run_id} checkpoints/slot-" in lines[0] and "needs about 3 MiB" in lines[0], lines[0]
    assert str(small / "out") in lines[0] and "MiB free" in lines[0]
    assert ".download" not in listing.read_text() and "checkpoint-" not in listing.read_text()
    assert [(r.info.run_id, r.info.status) for r in mlf.search_runs([mlf.get_run(run_id).info.experiment_id])] \
        == [(run_id, "KILLED")]  # not reopened: nothing left RUNNING


def test_disk_full_midway_through_the_checkpoint_download(tmp_path, monkeypatch):
    """The disk fills while the slot downloads (MLflow swallows the OSError and raises its own error): one
    line saying so and how much the checkpoint needs; the half `.download` is removed."""
    from mlflow.entities import FileInfo
    from mlflow.exceptions import MlflowException

    from pagating.config import UserError
    from pagating.tracking import checkpoints

    marker = {"step": 4, "state": "complete", "files": {"model.safetensors": {"size": 5 * 2**20, "sha256": "x"}}}

    class Server:
        def list_artifacts(self, run_id, path):
            return [FileInfo("checkpoints/slot-0", True, None)]

        def download_artifacts(self, run_id, path, dst):  # as MLflow: under the path's last part
            out = Path(dst, path.split("/", 2)[-1] if path.endswith(checkpoints.CKPT_MARKER) else "slot-0")
            out.parent.mkdir(parents=True, exist_ok=True)
            if path.endswith(checkpoints.CKPT_MARKER):
                out.write_text(json.dumps(marker))
                return str(out)
            out.mkdir()
            (out / "model.safetensors").write_bytes(b"half")
            raise MlflowException("Failed to download artifacts from path 'slot-0'")

    free = iter([10 * 2**20] + [2**20] * 10)  # room at the pre-check, 1 MiB left once it failed
    monkeypatch.setattr(checkpoints, "free_bytes", lambda where: next(free))
    with pytest.raises(UserError, match="disk full writing") as err:
        checkpoints.download_checkpoint(Server(), "r1", tmp_path / "run")
    assert "MLflow run r1 checkpoints/slot-0 (step 4)" in str(err.value) and "needs about 5 MiB" in str(err.value)
    assert list((tmp_path / "run").iterdir()) == []


def test_sigterm_ends_the_run_killed_and_releases_the_claim(sample_project, mlflow_server, tmp_path):
    """`kill` (SIGTERM, as the Vast watchdog sends) mid-training takes Ctrl-C's path: the run ends KILLED,
    its claim record is removed and the process exits, instead of vanishing with the run RUNNING."""
    args = ["train", "--max_steps", "3000", "--eval_steps", "1000", "--save_steps", "1000", "--logging_steps", "2",
            "--batch_size", "4", "--set", "tracking.experiment_prefix=sigterm", "--output_dir", str(tmp_path / "o")]
    proc = launch_cli(args, sample_project, env_for(mlflow_server), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    mlf = MlflowClient(mlflow_server.uri)
    try:
        deadline, run = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None and not (run and "train/loss" in run.data.metrics):
            time.sleep(1)
            exp = mlf.get_experiment_by_name("sigterm-sample")
            runs = mlf.search_runs([exp.experiment_id]) if exp else []
            run = mlf.get_run(runs[0].info.run_id) if runs else None
        assert run is not None and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "no run"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err.strip().splitlines()[-1], err[-3000:]
    assert mlf.get_run(run.info.run_id).info.status == "KILLED"
    assert not [k for k in mlf.get_experiment(run.info.experiment_id).tags if k.startswith("pagating.claim.")]
