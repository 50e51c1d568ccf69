"""One run per config, however it is launched: claims in MLflow against a real `mlflow server`."""

import json
import os
import subprocess
import time

import pytest
from conftest import launch_cli, run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

TINY = ["--set", "train.max_steps=10", "--set", "train.eval_steps=5", "--set", "train.save_steps=5",
        "--set", "train.logging_steps=5", "--set", "train.batch_size=8", "--set", "train.warmup_steps=2",
        "--set", "tracking.heartbeat_s=1", "--set", "tracking.claim_settle_s=1"]


def launch(args, cwd, uri):
    return launch_cli(args, cwd, {"MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)


def runs_of(mlf, prefix):
    exp = mlf.get_experiment_by_name(f"{prefix}-sample")
    return mlf.search_runs([exp.experiment_id]) if exp else []


def test_same_config_twice_at_once_one_run(sample_project, mlflow_server, tmp_path):
    """Two `pagating train` of one config at once, every claim write held 1-5 s by a proxy, the first ones
    until both processes have written (however late the box lets the second start): one trains, the other
    is refused in one line (exit 2) while the config is held, or, when its backing off outlasted the tiny
    run, finds it FINISHED (exit 0, nothing to do). Either way: one run, each step once."""
    from pagating.tracking.store import run_model_id

    proxy = HoldProxy(mlflow_server.uri, gather=2)
    args = ["train", *TINY, "--set", "tracking.experiment_prefix=twice", "--set", "tracking.claim_timeout_s=120",
            "--output_dir", str(tmp_path / "o")]
    try:
        procs = [launch(args, sample_project, proxy.uri) for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        proxy.close()
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 2], [0, 0]), outs
    if codes == [0, 2]:
        loser = outs[[p.returncode for p in procs].index(2)][1]
        assert len(loser.strip().splitlines()) == 1 and "already being trained by" in loser, loser
    else:
        assert sum("already FINISHED" in err and "nothing to do" in err for _, err in outs) == 1, outs
    assert len(proxy.owners - {None}) == 2  # both contended: each wrote a claim record
    mlf = MlflowClient(mlflow_server.uri)
    runs = runs_of(mlf, "twice")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps_unique(mlf, runs[0].info.run_id)
    run = mlf.get_run(runs[0].info.run_id)
    assert run_model_id(mlf, run) and len(run.outputs.model_outputs) == 1


def test_live_claim_refused_stale_claim_taken_over(sample_project, mlflow_server, tmp_path, monkeypatch):
    mlf = MlflowClient(mlflow_server.uri)
    exp_id = mlf.create_experiment("takeover-sample")
    args = ["train", *TINY, "--set", "tracking.experiment_prefix=takeover", "--set", "tracking.claim_timeout_s=60",
            "--output_dir", str(tmp_path / "o")]
    # A process on another machine holds the config; its run was created before it went silent.
    from pagating.config import config_hash, load_config, parse_sets
    from pagating.data.dataset import load_meta

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
    left = [k for k in mlf.get_experiment(exp_id).tags if k.startswith(f"pagating.claim.{h}")]
    assert left == [f"pagating.claim.{h}"]  # the winner removed its own record; the stale one is not its to touch


def test_two_sweeps_over_one_grid_share_the_work(sample_project, mlflow_server, tmp_path):
    common = ["sweep", *TINY, "--set", "tracking.experiment_prefix=twosweeps",
              "--set", "sweep.unit=[paGLU]", "--set", "sweep.alpha_mode=[static_0.3, static_0.6]",
              "--set", "sweep.learning_rate=[1e-3]",
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


class HoldProxy:
    """An HTTP proxy on 127.0.0.1 in front of the tracking server that holds every claim write
    (`set-experiment-tag`) for a random 1-5 s before passing it on: the slow server of the issue.
    gather=n: claim writes also wait (up to 3 min) until n processes (claim owners) have written one, so n
    processes really contend however late the box lets the last of them start."""

    def __init__(self, target: str, hold=(1.0, 5.0), match: str = "experiments/set-experiment-tag", gather: int = 0):
        import random
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import requests

        proxy = self
        self.held, self.hold, self.owners = 0, hold, set()
        owners = self.owners
        arrived = threading.Condition()

        def owner(body: bytes | None) -> str | None:
            try:
                return json.loads(json.loads(body)["value"]).get("owner")
            except (TypeError, ValueError, KeyError, AttributeError):
                return None  # not a claim record (the experiment's own tags)
        skip = {"host", "content-length", "connection", "transfer-encoding", "content-encoding"}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if match in self.path:
                    with arrived:
                        proxy.held += 1
                        owners.add(owner(body))
                        arrived.notify_all()
                        arrived.wait_for(lambda: len(owners - {None}) >= gather, timeout=180)
                    time.sleep(random.uniform(*proxy.hold))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                r = requests.request(self.command, target + self.path, data=body, headers=headers, timeout=300,
                                     allow_redirects=False)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in skip:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def steps_unique(mlf, run_id):
    for key in mlf.get_run(run_id).data.metrics:
        steps = [m.step for m in mlf.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"run {run_id}: {key} logged twice at one step: {sorted(steps)}"


def test_ten_pairs_through_a_slow_server_one_trainer_each(mlflow_server):
    """Ten configs, two processes' worth of claimants each, every claim write held 1-5 s: exactly one
    trains each config (the claim functions themselves, in threads; the CLI pair is the test below)."""
    import threading

    from pagating.tracking.claim import Claim
    from pagating.tracking.store import runs_with_hash

    proxy = HoldProxy(mlflow_server.uri)
    admin = MlflowClient(mlflow_server.uri)
    exp_id = admin.create_experiment("race-sample")
    outcome: dict = {}

    def contender(h: str, i: int) -> None:
        mlf = MlflowClient(proxy.uri)
        claim = Claim(mlf, exp_id, h, settle_s=0.5, timeout_s=120, heartbeat_s=1)
        if claim.acquire() is not None:
            outcome[h, i] = "claimed elsewhere"
            return
        claim.start_heartbeat()
        try:  # what TrainingRun does once the claim is ours
            if any(r.info.status == "FINISHED" for r in runs_with_hash(mlf, exp_id, h)):
                outcome[h, i] = "finished elsewhere"
                return
            run_id = mlf.create_run(exp_id, tags={"pagating.config_hash": h}).info.run_id
            claim.attach(run_id)
            for step in range(4):
                claim.check()
                mlf.log_metric(run_id, "train/loss", 1.0 / (step + 1), step=step)
                time.sleep(0.5)
            claim.check()
            mlf.create_logged_model(exp_id, source_run_id=run_id, name="model")
            claim.check()
            mlf.set_terminated(run_id, "FINISHED")
            outcome[h, i] = "trained"
        finally:
            claim.release()

    hashes = [f"race{n:02d}" for n in range(10)]
    threads = [threading.Thread(target=contender, args=(h, i)) for h in hashes for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        proxy.close()
    assert not any(t.is_alive() for t in threads)
    assert proxy.held >= 40  # every claim really went through the slow path
    for h in hashes:
        assert sorted(outcome[h, i] != "trained" for i in range(2)) == [False, True], outcome
        runs = runs_with_hash(admin, exp_id, h)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
        steps_unique(admin, runs[0].info.run_id)
        models = admin.search_logged_models([exp_id], filter_string=f"source_run_id = '{runs[0].info.run_id}'")
        assert len(models) == 1
    left = [k for k in admin.get_experiment(exp_id).tags if k.startswith("pagating.claim.")]
    assert left == []  # every claimant removed its own record


def test_holder_that_lost_its_claim_stops_and_writes_nothing_more(sample_project, mlflow_server, tmp_path):
    """The holder's heartbeats stop reaching MLflow (held 20 s; its lease is claim_timeout_s / 2 = 8 s) and
    another host claims the config meanwhile: the holder sends nothing more and says why, in one line."""
    proxy = HoldProxy(mlflow_server.uri, hold=(0.0, 0.0))
    args = ["train", "--max_steps", "3000", "--eval_steps", "1000", "--save_steps", "1000", "--logging_steps", "5",
            "--batch_size", "8", "--set", "tracking.heartbeat_s=1", "--set", "tracking.claim_timeout_s=16",
            "--set", "tracking.experiment_prefix=fenced", "--output_dir", str(tmp_path / "o")]
    mlf = MlflowClient(mlflow_server.uri)
    proc = launch(args, sample_project, proxy.uri)
    try:
        deadline, run = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None and not (run and "train/loss" in run.data.metrics):
            time.sleep(1)
            runs = runs_of(mlf, "fenced")
            run = mlf.get_run(runs[0].info.run_id) if runs else None
        assert run is not None and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        proxy.hold = (20.0, 20.0)  # heartbeats from now on take 20 s to be acknowledged
        time.sleep(11)  # past the lease
        before = {k: len(mlf.get_metric_history(run.info.run_id, k)) for k in mlf.get_run(run.info.run_id).data.metrics}
        h = run.data.tags["pagating.config_hash"]
        mlf.set_experiment_tag(run.info.experiment_id, f"pagating.claim.{h}.other", json.dumps(
            {"owner": "other", "host": "gpu-box-9", "pid": 7, "run_id": run.info.run_id, "t": time.time(),
             "state": "held"}))
        out, err = proc.communicate(timeout=120)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "no longer ours" in last and "gpu-box-9 pid 7" in last and "no heartbeat of ours reached MLflow" in last
    assert "Traceback" not in err
    after = mlf.get_run(run.info.run_id)
    assert after.info.status == "RUNNING"  # not ended by the process that lost it: the new holder continues it
    assert {k: len(mlf.get_metric_history(run.info.run_id, k)) for k in after.data.metrics} == before


def test_a_shorter_timeout_cannot_take_over_a_holder_whose_lease_is_valid(mlflow_server):
    """The holder runs on claim_timeout_s=120 and beat 40 s ago; a launcher set to 30 s waits for the holder's
    120 s, not its own, before it may take the config (records carry their holder's timeout_s)."""
    from pagating.tracking.claim import Claim

    mlf = MlflowClient(mlflow_server.uri)
    exp_id = mlf.create_experiment("timeouts-sample")
    holder = Claim(mlf, exp_id, "cfgtimeout", settle_s=0.2, timeout_s=120, heartbeat_s=60)
    assert holder.acquire() is None
    key, = [k for k in mlf.get_experiment(exp_id).tags if k.startswith("pagating.claim.cfgtimeout.")]
    record = json.loads(mlf.get_experiment(exp_id).tags[key])
    assert record["timeout_s"] == 120
    mlf.set_experiment_tag(exp_id, key, json.dumps(record | {"t": time.time() - 40, "host": "gpu-box-3"}))
    try:
        short = Claim(mlf, exp_id, "cfgtimeout", settle_s=0.2, timeout_s=30, heartbeat_s=5)
        held = short.acquire()
        assert held is not None and held["owner"] == holder.me["owner"], held
        mlf.set_experiment_tag(exp_id, key, json.dumps(record | {"t": time.time() - 130, "host": "gpu-box-3"}))
        later = Claim(mlf, exp_id, "cfgtimeout", settle_s=0.2, timeout_s=30, heartbeat_s=5)
        assert later.acquire() is None  # past the holder's own timeout: taken over
        later.release()
    finally:
        holder.release()


def test_same_host_liveness_knows_a_reused_pid(mlflow_server):
    """On this host a record's pid counts only in the same boot and pid namespace, with the start time it
    recorded: a reused pid is not a live holder, a pid of another boot or container is judged by heartbeat."""
    import psutil

    from pagating.tracking.claim import Claim, host_tag

    claim = Claim(MlflowClient(mlflow_server.uri), "0", "cfgpid", timeout_s=60)
    me = claim.me
    assert me["boot"] and me["start"] == pytest.approx(psutil.Process().create_time(), abs=0.02)
    fresh = {"owner": "x", "host": host_tag(), "t": time.time(), "state": "held", "boot": me["boot"],
             "pidns": me["pidns"]}
    assert claim.is_live(fresh | {"pid": os.getpid(), "start": me["start"]})
    # This pid runs, but it is not the process that wrote the record (started 1000 s earlier): gone.
    assert not claim.is_live(fresh | {"pid": os.getpid(), "start": me["start"] - 1000})
    unused = max(psutil.pids()) + 100_000
    assert not claim.is_live(fresh | {"pid": unused, "start": me["start"]})
    # Written before a reboot, or from another pid namespace with this hostname: its pid means nothing
    # here, so a fresh heartbeat keeps it live and an old one does not.
    for other in ({"boot": "another-boot"}, {"pidns": "pid:[1]"}):
        assert claim.is_live(fresh | {"pid": unused, "start": 1.0} | other)
        assert claim.is_live(fresh | {"pid": os.getpid(), "start": 1.0} | other)
        assert not claim.is_live(fresh | {"pid": unused, "t": time.time() - 61} | other)


def test_an_error_right_after_the_claim_releases_it(mlflow_server, tmp_path, monkeypatch):
    """The server fails the read that follows a won claim: the error goes up, the record is gone and the
    heartbeat thread stopped (the claim was taken outside the cleanup before)."""
    import threading

    from pagating.run import Job, TrainingRun
    from pagating.tracking import claim, store

    mlf = MlflowClient(mlflow_server.uri)
    exp_id = mlf.create_experiment("enter-error-sample")
    cfg = {"tracking": {"claim_settle_s": 0.2, "claim_timeout_s": 60, "heartbeat_s": 0.2, "drain_timeout_s": 5}}
    job = Job(cfg=cfg, rank=0, world=1, meta={}, uri=mlflow_server.uri, h="cfgenter", run_dir=tmp_path / "o",
              device="cpu", precision="fp32", n_threads=1, mlf=mlf, exp_id=exp_id, parent_run_id=None)
    reads = []

    def runs_with_hash(*args):
        reads.append(args)
        if len(reads) > 1:
            raise ConnectionError("server gone after the claim")
        return []

    monkeypatch.setattr(store, "runs_with_hash", runs_with_hash)
    run = TrainingRun(job, name="x")
    with pytest.raises(ConnectionError, match="after the claim"):
        with run:
            pytest.fail("entered")
    assert len(reads) == 2 and run.claim is not None
    assert not any(t.name == "pagating-heartbeat" and t.is_alive() for t in threading.enumerate())
    assert not [k for k in mlf.get_experiment(exp_id).tags if k.startswith("pagating.claim.")]
    # A claim lost before its run exists says so, not "writes nothing more into run None".
    lost = claim.Claim(mlf, exp_id, "cfgenter")
    lost._lose("another host holds it")
    assert "run None" not in lost.lost and "creates no run for it" in lost.lost, lost.lost


def test_log_text_and_the_leftover_spool_are_fenced(mlflow_server, tmp_path):
    """Once the claim is lost, neither an artifact upload (TrainingRun.log_text) nor the interrupted
    process's leftover spool (drained when a run is continued) reaches the run."""
    from pagating.run import Job, TrainingRun
    from pagating.tracking import claim
    from pagating.tracking.spool import MetricSpool, spool_path

    mlf = MlflowClient(mlflow_server.uri)
    exp_id = mlf.create_experiment("fence-writes-sample")
    run_id = mlf.create_run(exp_id).info.run_id
    cfg = {"tracking": {"claim_settle_s": 0.2, "claim_timeout_s": 60, "heartbeat_s": 30, "drain_timeout_s": 5}}
    job = Job(cfg=cfg, rank=0, world=1, meta={}, uri=mlflow_server.uri, h="cfgfence", run_dir=tmp_path, device="cpu",
              precision="fp32", n_threads=1, mlf=mlf, exp_id=exp_id, parent_run_id=None)
    run = TrainingRun(job, name="x")
    run.run_id, run.claim = run_id, claim.Claim(mlf, exp_id, "cfgfence")
    run.claim._lose("gpu-box-9 pid 7 holds it")
    with pytest.raises(claim.ClaimLost):
        run.log_text("{}", "optimizer_groups.json")
    spool = MetricSpool(spool_path(tmp_path, run_id), run_id, mlflow_server.uri)
    spool.log({"train/loss": 2.5}, step=3)
    spool.close()
    with pytest.raises(claim.ClaimLost):
        run._continue()
    assert mlf.list_artifacts(run_id) == [] and mlf.get_metric_history(run_id, "train/loss") == []


def at_once(fn, n: int) -> list:
    """fn(i) for i < n in n threads released together; what each returned or raised."""
    import threading

    gate, out = threading.Barrier(n), [None] * n

    def one(i):
        gate.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_runs_starting_at_once_log_the_same_new_dataset(mlflow_server):
    """A sweep's slots start their first configs together, each logging the same dataset (name, digest)
    new to the experiment: MLflow's server looks it up, then inserts it, so all but one could fail with an
    IntegrityError (a crashed first config per slot; about every other round of 8 did). Every run gets both
    inputs, over 6 rounds."""
    from pagating.tracking.provenance import log_datasets

    mlf = MlflowClient(mlflow_server.uri)
    exp = mlf.create_experiment(f"datasets-at-once-{time.time_ns()}")
    for _ in range(6):
        runs = [mlf.create_run(exp).info.run_id for _ in range(8)]
        digest = f"{time.time_ns():032x}"
        said = at_once(lambda i, runs=runs, digest=digest: log_datasets(mlf, runs[i], "sample", digest, "/data/raw"),
                       len(runs))
        assert not [e for e in said if isinstance(e, Exception)], said
        for run_id in runs:
            inputs = mlf.get_run(run_id).inputs.dataset_inputs
            assert sorted((d.dataset.name, d.dataset.digest) for d in inputs) == [
                ("sample", digest), ("sample/validation", digest)]
