"""`pagating server`: a real basic-auth MLflow server on 127.0.0.1 that refuses strangers."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import REPO, free_port, running_auth_server

from pagating import cli, server
from pagating.config import UserError
from pagating.tracking.store import run_model_id

ADMIN_PW = "adm1n-Secret-Pw-4821"
GPU_PW = "gpu-Runner-Pw-7730"
GPU_PW_2 = "gpu-Rotated-Pw-9911"
SECRETS = (ADMIN_PW, GPU_PW, GPU_PW_2)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    with running_auth_server(tmp_path_factory.mktemp("auth-server"), ADMIN_PW, GPU_PW) as proc:
        yield proc


def get(uri: str, auth=None) -> requests.Response:
    return requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                        auth=auth, timeout=30)


@pytest.fixture
def as_gpu_user(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "gpu-runner")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", GPU_PW)


@pytest.mark.slow
def test_strangers_get_401(auth_server):
    uri = auth_server.uri
    assert requests.get(f"{uri}/health", timeout=10).status_code == 200  # unprotected, for monitors
    assert get(uri).status_code == 401
    assert get(uri, ("gpu-runner", "wrong-password-123")).status_code == 401
    assert get(uri, ("admin", GPU_PW)).status_code == 401
    assert get(uri, ("nobody", GPU_PW)).status_code == 401
    assert get(uri, ("gpu-runner", GPU_PW)).status_code == 200
    assert get(uri, ("admin", ADMIN_PW)).status_code == 200


@pytest.mark.slow
def test_gpu_user_logs_with_the_mlflow_client(auth_server, as_gpu_user, tmp_path):
    from mlflow import MlflowClient

    # The admin makes the experiment and grants it (`pagating grant`); the GPU user only logs into it.
    exp = server.grant_experiments(auth_server.uri, ("admin", ADMIN_PW), ["pagating-test-gpu"],
                                   "gpu-runner")["pagating-test-gpu"]
    client = MlflowClient(tracking_uri=auth_server.uri)
    run = client.create_run(exp, run_name="paGLU static_0.5 lr=0.001")
    client.log_param(run.info.run_id, "train.learning_rate", 0.001)
    for step, loss in enumerate([3.0, 2.5, 2.0]):
        client.log_metric(run.info.run_id, "train/loss", loss, step=step)
    (tmp_path / "note.txt").write_text("checkpoint stand-in")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), "checkpoints/latest")
    client.set_terminated(run.info.run_id)

    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.5), (2, 2.0)]
    assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints/latest")] == \
        ["checkpoints/latest/note.txt"]
    # A stranger cannot read what the GPU user logged.
    r = requests.get(f"{auth_server.uri}/api/2.0/mlflow/runs/get", params={"run_id": run.info.run_id},
                     timeout=30)
    assert r.status_code == 401


@pytest.mark.slow
def test_gpu_user_edits_only_granted_experiments(auth_server, tmp_path):
    """NO_PERMISSIONS by default: the GPU credential cannot rename, re-status, re-tag or overwrite
    artifacts in an admin experiment it was not granted; `pagating grant` gives EDIT on exactly one."""
    from conftest import run_cli

    uri, admin, gpu = auth_server.uri, ("admin", ADMIN_PW), ("gpu-runner", GPU_PW)
    api = f"{uri}/api/2.0/mlflow"

    def post(path, body, auth):
        return requests.post(f"{api}/{path}", json=body, auth=auth, timeout=30)

    exps, runs = {}, {}
    for name in ("pagating-granted", "pagating-private"):
        exps[name] = post("experiments/create", {"name": name}, admin).json()["experiment_id"]
        runs[name] = post("runs/create", {"experiment_id": exps[name]}, admin).json()["run"]["info"]["run_id"]
    # The verb, as a researcher runs it: admin password in the env, the experiment by name.
    res = run_cli(["grant", "--experiment", "pagating-granted"], cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": uri, server.ADMIN_PASSWORD_ENV: ADMIN_PW})
    assert res.returncode == 0 and "'gpu-runner' has EDIT on experiment pagating-granted" in res.stdout, res.stderr

    def attempts(name):
        exp, run = exps[name], runs[name]
        return {
            "status": post("runs/update", {"run_id": run, "status": "FAILED"}, gpu),
            "run tag": post("runs/set-tag", {"run_id": run, "key": "k", "value": "v"}, gpu),
            "experiment tag": post("experiments/set-experiment-tag",
                                   {"experiment_id": exp, "key": "k", "value": "v"}, gpu),
            "artifact": requests.put(f"{uri}/api/2.0/mlflow-artifacts/artifacts/{exp}/{run}/artifacts/x.txt",
                                     data=b"tampered", auth=gpu, timeout=30),
            "new run": post("runs/create", {"experiment_id": exp}, gpu),
        }

    for what, r in attempts("pagating-private").items():
        assert r.status_code == 403, (what, r.status_code, r.text[:200])
    for what, r in attempts("pagating-granted").items():
        assert r.status_code == 200, (what, r.status_code, r.text[:200])
    # Renaming is not logging (pagating.server_auth); EDIT is not MANAGE: no deleting, no granting itself more.
    assert post("experiments/update", {"experiment_id": exps["pagating-granted"], "new_name": "x"}, gpu).status_code \
        == 403
    assert post("experiments/delete", {"experiment_id": exps["pagating-granted"]}, gpu).status_code == 403
    r = requests.post(f"{uri}/api/3.0/mlflow/users/permissions/grant", auth=gpu, timeout=30,
                      json={"username": "gpu-runner", "resource_type": "experiment",
                            "resource_id": exps["pagating-private"], "permission": "EDIT"})
    assert r.status_code == 403
    assert post("users/create", {"username": "x", "password": "y" * 12}, gpu).status_code == 403
    # Granting again is idempotent, and the private experiment's run is untouched.
    assert server.grant_experiments(uri, admin, ["pagating-granted"], "gpu-runner") == \
        {"pagating-granted": exps["pagating-granted"]}
    run = requests.get(f"{api}/runs/get", params={"run_id": runs["pagating-private"]}, auth=admin, timeout=30)
    assert run.json()["run"]["info"]["status"] == "RUNNING"
    assert "k" not in {t["key"] for t in run.json()["run"]["data"].get("tags", [])}


@pytest.mark.slow
def test_gpu_user_creates_nothing_but_runs(auth_server, tmp_path):
    """Experiments, registered models, prompts, users, permissions, webhooks, gateway secrets: 403 for the
    GPU user over the REST (/api/) and the UI's (/ajax-api/) routes; the admin still creates them."""
    uri, admin, gpu = auth_server.uri, ("admin", ADMIN_PW), ("gpu-runner", GPU_PW)
    exp_id = server.grant_experiments(uri, admin, ["pagating-least"], "gpu-runner")["pagating-least"]
    attempts = {
        "experiment": ("POST", "2.0/mlflow/experiments/create", {"name": "gpu-made"}),
        "registered model": ("POST", "2.0/mlflow/registered-models/create", {"name": "gpu-model"}),
        "prompt": ("POST", "2.0/mlflow/registered-models/create",
                   {"name": "gpu-prompt", "tags": [{"key": "mlflow.prompt.is_prompt", "value": "true"}]}),
        "model version": ("POST", "2.0/mlflow/model-versions/create", {"name": "gpu-model", "source": "x"}),
        "user": ("POST", "2.0/mlflow/users/create", {"username": "gpu-friend", "password": "f" * 14}),
        "own password": ("PATCH", "2.0/mlflow/users/update-password", {"username": "gpu-runner",
                                                                        "password": "n" * 14}),
        "permission": ("POST", "3.0/mlflow/users/permissions/grant",
                       {"username": "gpu-runner", "resource_type": "experiment", "resource_id": exp_id,
                        "permission": "MANAGE"}),
        "webhook": ("POST", "2.0/mlflow/webhooks", {"name": "w", "url": "https://example.org/hook",
                                                     "events": [{"entity": "model_version", "action": "created"}]}),
        "gateway secret": ("POST", "3.0/mlflow/gateway/secrets/create", {"secret_name": "s", "secret_value": "v"}),
        "rename experiment": ("POST", "2.0/mlflow/experiments/update", {"experiment_id": exp_id, "new_name": "x"}),
    }
    for root in ("api", "ajax-api"):
        for what, (method, path, body) in attempts.items():
            r = requests.request(method, f"{uri}/{root}/{path}", json=body, auth=gpu, timeout=30)
            assert r.status_code == 403, (root, what, r.status_code, r.text[:200])
    # What a training run does is still allowed, in the granted experiment only.
    r = requests.post(f"{uri}/ajax-api/2.0/mlflow/runs/create", json={"experiment_id": exp_id}, auth=gpu, timeout=30)
    assert r.status_code == 200, r.text[:200]
    names = {e["name"] for e in requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 100},
                                             auth=admin, timeout=30).json()["experiments"]}
    assert "gpu-made" not in names
    r = requests.get(f"{uri}/api/2.0/mlflow/registered-models/search", auth=admin, timeout=30)
    assert not r.json().get("registered_models")
    # The admin is not limited by it.
    r = requests.post(f"{uri}/api/2.0/mlflow/experiments/create", json={"name": "admin-made"}, auth=admin, timeout=30)
    assert r.status_code == 200, r.text[:200]


@pytest.mark.slow
def test_report_register_needs_the_admin(auth_server, tmp_path):
    from conftest import run_cli

    env = {"MLFLOW_TRACKING_URI": auth_server.uri, "MLFLOW_TRACKING_USERNAME": "gpu-runner",
           "MLFLOW_TRACKING_PASSWORD": GPU_PW}
    proc = run_cli(["report", "--register", "pagating-champion", "--out", str(tmp_path / "r")], cwd=tmp_path, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "needs the admin's credentials" in lines[0], proc.stderr
    assert "'gpu-runner'" in lines[0] and GPU_PW not in proc.stderr and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_training_run_with_gpu_user_credentials_is_logged(auth_server, sample_project, tmp_path):
    """A real `pagating train` as the GPU user; with a wrong password it stops before training."""
    import json

    from conftest import run_cli
    from mlflow import MlflowClient

    env = {"MLFLOW_TRACKING_URI": auth_server.uri, "MLFLOW_TRACKING_USERNAME": "gpu-runner"}
    run_cli(["grant"], cwd=sample_project, env={"MLFLOW_TRACKING_URI": auth_server.uri,
                                                server.ADMIN_PASSWORD_ENV: ADMIN_PW}, check=True)
    args = ["train", "--output_dir", str(tmp_path / "o"), "--max_steps", "6", "--eval_steps", "3",
            "--save_steps", "3", "--logging_steps", "3"]
    bad = run_cli(args, cwd=sample_project, env={**env, "MLFLOW_TRACKING_PASSWORD": "wrong-password-123"})
    assert bad.returncode == 2 and "refused the credentials" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    ok = run_cli(args, cwd=sample_project, env={**env, "MLFLOW_TRACKING_PASSWORD": GPU_PW}, check=True)
    run_id = json.loads(ok.stdout.strip().splitlines()[-1])["run_id"]
    admin = MlflowClient(tracking_uri=auth_server.uri)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PW)
        run = admin.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in admin.get_metric_history(run_id, "train/loss")] == [3, 6]
        assert "checkpoints" in {a.path for a in admin.list_artifacts(run_id)}
        assert run_model_id(admin, run) is not None  # the final model, logged as the run's MLflow model
    assert GPU_PW not in ok.stdout + ok.stderr

@pytest.mark.slow
def test_gpu_user_training_into_an_ungranted_experiment_is_one_line(auth_server, sample_project, tmp_path):
    """As the GPU user, `pagating train` into an experiment that does not exist (it may not create it) or
    that exists but was not granted: one line naming `pagating grant`, exit 2, no run, nothing written."""
    from conftest import run_cli
    from mlflow import MlflowClient

    env = {"MLFLOW_TRACKING_URI": auth_server.uri, "MLFLOW_TRACKING_USERNAME": "gpu-runner",
           "MLFLOW_TRACKING_PASSWORD": GPU_PW}
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PW}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in admin.items():
            mp.setenv(k, v)
        MlflowClient(auth_server.uri).create_experiment("ungranted-sample")  # the admin's, not granted
    for prefix in ("nosuch", "ungranted"):
        out = tmp_path / prefix
        proc = run_cli(["train", "--output_dir", str(out), "--max_steps", "2", "--set",
                        f"tracking.experiment_prefix={prefix}"], cwd=sample_project, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert f"`pagating grant --experiment {prefix}-sample`" in lines[0] and "'gpu-runner'" in lines[0], lines
        assert GPU_PW not in proc.stderr and not out.exists()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in admin.items():
            mp.setenv(k, v)
        mlf = MlflowClient(auth_server.uri)
        assert mlf.get_experiment_by_name("nosuch-sample") is None
        exp_id = mlf.get_experiment_by_name("ungranted-sample").experiment_id
        assert mlf.search_runs([exp_id]) == []


@pytest.mark.slow
def test_auth_config_file(auth_server):
    ini = Path(auth_server.auth_config_path)
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    text = ini.read_text()
    assert "default_permission = NO_PERMISSIONS" in text and "admin_username = admin" in text
    assert "admin_password" not in text
    assert stat.S_IMODE((ini.parent / "basic_auth.db").stat().st_mode) == 0o600


@pytest.mark.slow
def test_ensure_user_is_idempotent_and_needs_the_admin(auth_server):
    uri, admin = auth_server.uri, ("admin", ADMIN_PW)
    assert server.ensure_user(uri, admin, "gpu-runner", GPU_PW) == "updated"
    assert get(uri, ("gpu-runner", GPU_PW)).status_code == 200
    with pytest.raises(UserError, match="not the password of admin"):
        server.ensure_user(uri, ("admin", "not-the-admin-password"), "gpu-runner", GPU_PW)


@pytest.mark.slow
def test_restart_rotates_gpu_password_and_checks_admin(auth_server, monkeypatch, capfd):
    """Runs last among the server tests: it restarts the module's server on the same stores."""
    root, kwargs = auth_server.root, auth_server.kwargs
    server.stop_server(auth_server)
    monkeypatch.setenv(server.GPU_PASSWORD_ENV, GPU_PW_2)
    # A wrong admin password cannot take over an existing auth store: one line, nothing started.
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, "not-the-admin-password")
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
        with pytest.raises(UserError, match="not the password of admin 'admin'"):
            server.start_server(kwargs)
    # Same stores, right admin password, new GPU password: the user is updated, not duplicated.
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, ADMIN_PW)
    with open(root / "server.log", "ab") as log:
        proc = server.start_server(kwargs, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert get(proc.uri, ("gpu-runner", GPU_PW)).status_code == 401
            r = get(proc.uri, ("gpu-runner", GPU_PW_2))
            assert r.status_code == 200
            assert r.json()["experiments"]  # the data of the first start is still there
        finally:
            server.stop_server(proc)
    out = capfd.readouterr()
    assert "GPU user 'gpu-runner' updated" in out.err
    assert not any(s in out.out + out.err for s in SECRETS)


@pytest.mark.slow
def test_no_password_in_output_or_files(auth_server):
    """Server stdout/stderr (server.log) and every file it wrote: no password in clear text.
    The auth store holds salted hashes only. Runs after the other server tests."""
    files = [p for p in auth_server.root.rglob("*") if p.is_file()]
    assert any(p.name == "server.log" for p in files) and any(p.name == "basic_auth.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"password found in {path}"


# --- user errors: exit 2 before anything is written or started -------------------------------------


@pytest.mark.parametrize("admin_pw, gpu_pw, match", [
    ("short-pw", GPU_PW, "MLFLOW_AUTH_ADMIN_PASSWORD is shorter than 12"),
    (None, GPU_PW, "MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
    (ADMIN_PW, "short", "PAGATING_GPU_USER_PASSWORD is shorter than 12"),
    (ADMIN_PW, None, "PAGATING_GPU_USER_PASSWORD is not set"),
    (ADMIN_PW, ADMIN_PW, "must differ"),
    ("password1234", GPU_PW, "old public default"),
])
def test_bad_passwords_exit_2_before_starting(tmp_path, monkeypatch, capsys, admin_pw, gpu_pw, match):
    for env, value in ((server.ADMIN_PASSWORD_ENV, admin_pw), (server.GPU_PASSWORD_ENV, gpu_pw)):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["server", "--port", str(free_port()), "--auth-dir", "auth"])
    err = capsys.readouterr().err
    assert rc == 2
    assert match in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written
    for value in (admin_pw, gpu_pw):
        if value and len(value) >= 8:
            assert value not in err


def test_short_admin_password_cli_process(tmp_path):
    """The real command line: exit status 2, one line, nothing created, no server started."""
    env = {"PATH": "/usr/bin:/bin", server.ADMIN_PASSWORD_ENV: "elevenchars",
           server.GPU_PASSWORD_ENV: GPU_PW, "PYTHONPATH": str(REPO)}
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "pagating.cli", "server", "--port", str(port)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("pagating server: error: MLFLOW_AUTH_ADMIN_PASSWORD is shorter than 12 "
                                "characters: export MLFLOW_AUTH_ADMIN_PASSWORD with the MLflow admin "
                                "('admin') password (12+ characters) and run `pagating server` again")
    assert "elevenchars" not in r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_other_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(server.ADMIN_PASSWORD_ENV, ADMIN_PW)
    monkeypatch.setenv(server.GPU_PASSWORD_ENV, GPU_PW)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    base = {"auth_dir": str(tmp_path / "auth"), "port": free_port()}
    with pytest.raises(UserError, match="--gpu-user"):
        server.start_server({**base, "gpu_user": "admin"})
    with pytest.raises(UserError, match="not a URI"):
        server.start_server({**base, "backend_store_uri": "mlflow.db"})
    with pytest.raises(UserError, match="--workers"):
        server.start_server({**base, "workers": 0})
    with pytest.raises(TypeError, match="unknown server option"):
        server.start_server({**base, "prot": 1})
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="another --port"):
            server.start_server({**base, "port": busy.getsockname()[1]})
    assert not (tmp_path / "auth").exists()
