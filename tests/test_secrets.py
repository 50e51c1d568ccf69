"""Secrets in the environment never reach MLflow params, tags, artifacts, files or printed output."""

import json

import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

SECRETS = {
    "VAST_API_KEY": "vast-secret-7f3a9c1e5b2d4680aa",
    "MLFLOW_TRACKING_USERNAME": "gpu-runner",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-pw-93jd72hs",
    "AWS_ACCESS_KEY_ID": "AKIASECRETTEST12345",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-key-0b9c8d7e6f5a4b3c2d1e",
    "CONTAINER_API_KEY": "container-secret-51ac9e",
    "HF_TOKEN": "hf_secrettokenabcdef123456",
}
NEEDLES = [v for k, v in SECRETS.items() if k != "MLFLOW_TRACKING_USERNAME"]


def test_no_secret_anywhere(sample_project, mlflow_server, tmp_path):
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri, **SECRETS}
    out = tmp_path / "out"
    sweep = run_cli(["sweep", "--set", "train.max_steps=6", "--set", "train.eval_steps=3", "--set",
                     "train.save_steps=3", "--set", "train.logging_steps=3", "--set", "sweep.alpha_mode=[learnable]",
                     "--set", "sweep.learning_rate=[1e-3]", "--set", f"train.output_dir={out}",
                     "--summary", str(tmp_path / "sweep.json")], cwd=sample_project, env=env, check=True)
    report = run_cli(["report", "--sweep-json", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "reports")],
                     cwd=sample_project, env=env, check=True)
    summary = json.loads((tmp_path / "sweep.json").read_text())
    mlf = MlflowClient(mlflow_server.uri)
    texts = [sweep.stdout, sweep.stderr, report.stdout, report.stderr]
    for run_id in [summary["parent_run_id"]] + [c["run_id"] for c in summary["configs"]]:
        run = mlf.get_run(run_id)
        texts.append(json.dumps(run.data.params))
        texts.append(json.dumps(run.data.tags))
        local = mlf.download_artifacts(run_id, "", str(tmp_path / "dl" / run_id))
        texts += [p.read_bytes().decode("latin-1") for p in __import__("pathlib").Path(local).rglob("*")
                  if p.is_file()]
    # What the run leaves on disk (spool, run identity, checkpoints, logs, reports) too.
    for p in list(out.rglob("*")) + list((tmp_path / "reports").rglob("*")):
        if p.is_file():
            texts.append(p.read_bytes().decode("latin-1"))
    assert len(texts) > 20
    for needle in NEEDLES:
        assert not any(needle in t for t in texts), f"secret {needle[:8]}... leaked"


def test_the_one_uri_masker_hides_passwords_and_tokens_keeps_the_rest():
    from pagating.tracking.store import mask_uri

    assert mask_uri("https://gpu-runner:pw-51e2@mlflow.example.org/x") == "https://gpu-runner:***@mlflow.example.org/x"
    assert mask_uri("https://tok3n@github.com/me/r.git") == "https://***@github.com/me/r.git"
    for plain in ("sqlite:///mlflow.db", "http://127.0.0.1:5000", "git@github.com:me/r.git", "/srv/dvc"):
        assert mask_uri(plain) == plain


def test_credentials_inside_the_tracking_uri_refused_in_one_line(sample_project, mlflow_server, tmp_path):
    """MLflow prints the tracking URI itself ("View run ... at:"), so a password in it is refused up front."""
    password = "pw-in-the-uri-5c2e91d0"
    uri = mlflow_server.uri.replace("http://", f"http://gpu-runner:{password}@")
    out = tmp_path / "out"
    for verb in (["sweep", "--set", f"train.output_dir={out}", "--summary", str(tmp_path / "s.json")],
                 ["train", "--output_dir", str(out)]):
        proc = run_cli(verb, cwd=sample_project, env={"MLFLOW_TRACKING_URI": uri})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert "MLFLOW_TRACKING_USERNAME" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0], lines[0]
        assert password not in proc.stdout + proc.stderr
    assert not out.exists() and not (tmp_path / "s.json").exists()
