"""Where a run comes from: the code (git commit, repo URL, user, install lock), the data (DVC remote, MLflow
dataset inputs), the run page's description with the command that reproduces it, and the run file that
names the run in its output dir and in every checkpoint."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from pagating.config import flatten, load_config
from pagating.data.dvc import dvc_default_remote
from pagating.tracking.store import retry, strip_credentials

RUN_FILE = "pagating_run.json"  # run identity, kept in the output dir and in every checkpoint


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_repo_url() -> str:
    try:
        out = subprocess.run(["git", "remote", "get-url", "origin"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return strip_credentials(out.stdout.strip()) if out.returncode == 0 else ""


def user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


def lock_sha256() -> str:
    """sha256 of the install lock (requirements/lock-cpu.txt) the environment was installed from: a run pins
    its package versions by this tag. "none" when the checkout has no lock."""
    checkout = Path(__file__).resolve().parents[2]  # pagating/tracking/provenance.py -> the checkout
    lock = checkout / "requirements" / "lock-cpu.txt"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"


def source_tags(entry_point: str, commit: str | None) -> dict[str, str]:
    """mlflow.source.* / mlflow.user as `mlflow run` sets them: the project at its commit (the caller's
    git_commit), the entry point. The UI's Source column shows `<project>:<entry point>`, linked to the
    commit when the repo is on GitHub."""
    repo = git_repo_url()
    tags = {"mlflow.source.type": "PROJECT", "mlflow.source.name": repo or str(Path.cwd()),
            "mlflow.project.entryPoint": entry_point, "mlflow.user": user_name()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if repo:
        tags["mlflow.source.git.repoURL"] = repo
    return tags


def dvc_data_source(root: str | Path = ".", path: str = "data/raw") -> str:
    """Where data.dvc's data lives: the default DVC remote's URL (no credentials), else the local path."""
    remote = dvc_default_remote(Path(root), with_local=True)
    return strip_credentials(remote[1]) if remote else str((Path(root) / path).resolve())


def log_datasets(mlf, run_id: str, profile: str, digest: str, source: str) -> None:
    """The run's data as MLflow dataset inputs (the UI's Dataset column): the training split with context
    `training`, the validation split with `eval`. Digest = data.dvc's md5, so the UI names the DVC version.
    (mlflow.log_input does the same for the fluent API's active run; our runs are made with the client.)"""
    # heavy: ~2 s, only creating a run needs it
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    src = resolve_dataset_source(source)
    inputs = []
    # One dataset per (name, digest) per run: the two splits need two names.
    for name, context in ((profile, "training"), (f"{profile}/validation", "eval")):
        entity = MetaDataset(src, name=name, digest=digest[:36] or None)._to_mlflow_entity()
        inputs.append(DatasetInput(entity, [InputTag("mlflow.data.context", context)]))
    # MLflow's server looks a dataset up, then inserts it: runs starting together (a sweep's slots) that log
    # the same new one all insert it, and all but one get the unique constraint's error (400). The call is
    # one transaction, rolled back: repeating it finds the row.
    retry(lambda: mlf.log_inputs(run_id, datasets=inputs), "logging the dataset inputs", attempts=5, first=0.1,
          transient=lost_insert_race, say=lambda *_: None)


def lost_insert_race(exc: BaseException) -> bool:
    """A server-side unique-constraint error (sqlite, MySQL, PostgreSQL wording) answered as BAD_REQUEST."""
    return getattr(exc, "error_code", "") == "BAD_REQUEST" and bool(
        re.search(r"integrity|unique|duplicate", str(exc), re.IGNORECASE))


def run_note(cfg: dict, command: str, n_params: int | None = None) -> str:
    """mlflow.note.content (the run page's Description): the config in one paragraph + how to reproduce it."""
    t, m, d = cfg["train"], cfg["model"], cfg["data"]
    size = f"{n_params:,} parameters, " if n_params else ""
    return (f"GPT-2 ({m['n_layer']} layers, d_model {m['n_embd']}, {m['n_head']} heads) with a {m['unit']} MLP "
            f"(d_ff {m['ffn_dim']}{', parameter-matched' if m['param_matched'] else ''}, init {m['init']}), "
            f"{size}α mode {t['alpha_mode']}, learning rate {t['learning_rate']:g}, batch {t['batch_size']} × "
            f"block {d['block_size']}, {t['max_steps']} steps (warm-up {t['warmup_steps']}, cosine), "
            f"seed {t['seed']}, on the {cfg['profile']} profile's data ({d['source']}, {d['tokenizer']} "
            f"tokenizer, vocabulary {d['vocab_size']}).\n\nReproduce:\n\n    {command}\n")


def reproduce_command(cfg: dict, commit: str = "") -> str:
    """The command that reruns this config: `pagating train` with every value that differs from params.yaml."""
    base = flatten(load_config(cfg["profile"]), ("data", "model", "train"))
    now = flatten(cfg, ("data", "model", "train"))
    parts = ["pagating", "train", "--profile", cfg["profile"], "--alpha_mode", str(cfg["train"]["alpha_mode"]),
             "--learning_rate", f"{cfg['train']['learning_rate']:g}"]
    for key in sorted(now):
        if key in ("profile", "train.alpha_mode", "train.learning_rate") or base.get(key) == now[key]:
            continue
        value = json.dumps(now[key]) if isinstance(now[key], list | dict) else now[key]
        parts += ["--set", f"{key}={value}"]
    cmd = " ".join(shlex.quote(str(p)) for p in parts)
    return f"git checkout {commit} && {cmd}" if commit else cmd


def write_run_file(directory: str | Path, info: dict[str, Any]) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / RUN_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))


def read_run_file(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None
