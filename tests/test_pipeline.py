"""`dvc repro` end to end (prepare -> sweep -> report) in a temporary clone, offline, embedded sqlite."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(args, cwd, env=None):
    import os

    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                               "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})})
    assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_dvc_repro_end_to_end_then_noop(tmp_path):
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml", "data.dvc", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "pagating", root / "pagating", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["sample"].update(max_steps=6, eval_steps=3, save_steps=3, logging_steps=3, max_eval_batches=2)
    params["sweep"]["sample"] = {"alpha_mode": ["static_0.5", "learnable"], "learning_rate": [1e-3]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], root)
    sh([str(BIN / "pagating"), "data", "sample"], root)
    first = sh([str(BIN / "dvc"), "repro"], root)
    for stage in ("prepare", "sweep", "report"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout
    assert (root / "mlflow.db").exists()  # the embedded default tracking store
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    sweep = json.loads((root / "reports" / "sweep.json").read_text())
    assert len(sweep["configs"]) == 2 and all(c["status"] == "ran" for c in sweep["configs"])
    assert (root / "reports" / "summary.md").read_text().count("paGLU") >= 2
    assert metrics
    shown = sh([str(BIN / "dvc"), "metrics", "show", "--json"], root)
    assert "reports/metrics.json" in shown.stdout
    second = sh([str(BIN / "dvc"), "repro"], root)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout.lower()
