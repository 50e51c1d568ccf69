"""MLflow for pagating: run identity and tags, a metric spool that survives server outages, and
background checkpoint upload.

Why not MLflow's own pieces: transformers' MLflowCallback logs a pyfunc model per checkpoint and
opens a new run on resume; MLflow's async logging drops a batch whose request fails, and its
system-metrics thread stops at the first error. Here every metric goes first to an append-only
file in the run's output dir and a flusher thread sends it with `log_batch`, retrying with backoff
until the server answers; training only ever appends to a local file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pagating.claim import Claim, ClaimLost, LeaseLapsed, describe_claim, host_tag  # noqa: F401 (re-exported)
from pagating.config import UserError, experiment_name
from pagating.disk import LOW_FREE, disk_full, free_bytes, mib

log = logging.getLogger("pagating.tracking")

RUN_FILE = "pagating_run.json"  # run identity, kept in the output dir and in every checkpoint
SPOOL_GLOB = "mlflow_spool.*.jsonl"  # one spool per run id: a run dir reused by a new run never mixes them


def spool_path(run_dir: str | Path, run_id: str) -> Path:
    return Path(run_dir) / f"mlflow_spool.{run_id}.jsonl"


CKPT_ROOT = "checkpoints"  # slot-0/, slot-1/ and the pointer latest.json
CKPT_POINTER = "latest.json"
CKPT_MARKER = "pagating_checkpoint.json"  # files' sizes + sha256, written last: without it a checkpoint is incomplete


def _mlflow_env_defaults() -> None:
    # Our own loops retry outages for as long as it takes; MLflow's per-request retries (7 with
    # factor-2 backoff by default) would only make each attempt block for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def tracking_uri(cfg: dict | None = None) -> str:
    """MLFLOW_TRACKING_URI, else params.yaml's embedded default (sqlite:///mlflow.db in the project).

    A URI with user:password@ in it is refused: MLflow itself prints the tracking URI in clear (its
    "View run ... at:" line), so a password there would land in every log."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (cfg or {}).get("tracking", {}).get(
        "tracking_uri", "sqlite:///mlflow.db")
    check_no_credentials(uri)
    return uri


def check_no_credentials(uri: str) -> None:
    """UserError when a tracking URI carries credentials (user:password@, token@, or masked ones)."""
    if uri.startswith(("http://", "https://")) and "@" in urlsplit(uri).netloc:
        raise UserError(f"MLFLOW_TRACKING_URI carries credentials ({mask_uri(uri)}): give the server without them "
                        f"({strip_credentials(uri)}) and put them in MLFLOW_TRACKING_USERNAME and "
                        f"MLFLOW_TRACKING_PASSWORD (MLflow prints the URI in its logs)")


def mask_uri(uri: str) -> str:
    """The one masker of URIs fit to print: https://user:pw@host -> https://user:***@host, a bare
    token -> ***@host; anything without credentials comes back as it is."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if not parts.scheme or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    masked = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    return urlunsplit(parts._replace(netloc=masked))


def client(uri: str | None = None):
    _mlflow_env_defaults()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def check_server(uri: str) -> None:
    """Fail fast (UserError) when an http(s) tracking server is unreachable or refuses us."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    shown = mask_uri(uri)
    auth = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    try:
        health = requests.get(uri.rstrip("/") + "/health", timeout=5)
        r = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                         params={"max_results": 1}, auth=auth, timeout=10)
    except requests.RequestException:
        raise UserError(f"tracking server {shown} is unreachable: start it (`pagating server`) or "
                        "set MLFLOW_TRACKING_URI to a running one") from None
    if r.status_code in (401, 403):
        raise UserError(f"tracking server {shown} refused the credentials: set "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    for answer in (health, r):
        if answer.status_code >= 500:  # e.g. a reverse proxy whose MLflow is down
            raise UserError(f"tracking server {shown} answers HTTP {answer.status_code} {answer.reason}: the "
                            f"server (or the proxy in front of it) is failing; fix it or point "
                            f"MLFLOW_TRACKING_URI at a working MLflow server")
    try:
        is_mlflow = r.status_code == 200 and isinstance(r.json(), dict)
    except ValueError:
        is_mlflow = False
    if not is_mlflow:
        raise UserError(f"{shown} is not an MLflow tracking server (its experiments API answered HTTP "
                        f"{r.status_code} {r.headers.get('content-type', '')}): check MLFLOW_TRACKING_URI")


def require_admin(uri: str, what: str) -> None:
    """UserError unless the credentials in the environment are an admin's on a basic-auth server (where
    a non-admin, the GPU user, may only log runs: pagating.server_auth); a server without auth passes."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    r = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/users/current", auth=auth, timeout=10)
    try:
        is_admin = bool(r.json()["user"]["is_admin"]) if r.ok else r.status_code == 404  # 404: no auth
    except (ValueError, KeyError, TypeError):
        is_admin = True  # not MLflow's auth app answering: nothing to tell
    if not is_admin:
        raise UserError(f"{what} needs the admin's credentials, not those of {user or 'nobody'!r} (it may only log "
                        f"runs): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the admin's, run again")


def experiment_id(mlf, cfg: dict) -> str:
    """The profile's experiment (`pagating-<profile>`), created or restored as needed. A user the server
    refuses that (the GPU user of `pagating server`: no experiment of its own, none it was not granted)
    gets one line naming `pagating grant`, before any run exists."""
    name = experiment_name(cfg)
    try:
        return _experiment_id(mlf, name)
    except Exception as exc:
        if not _denied(exc):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "this user"
        raise UserError(f"{mask_uri(mlf.tracking_uri)} does not let {user!r} use experiment {name} (the GPU user "
                        f"only logs into experiments an admin made and granted): have the admin run "
                        f"`pagating grant --experiment {name}`, then run again") from None


def _experiment_id(mlf, name: str) -> str:
    exp = mlf.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlf.restore_experiment(exp.experiment_id)
        if KIND_TAG not in exp.tags:  # made by `mlflow run --experiment-name` or an older version
            mlf.set_experiment_tag(exp.experiment_id, KIND_TAG, EXPERIMENT_KIND[KIND_TAG])
        return exp.experiment_id
    try:
        return mlf.create_experiment(name, tags=EXPERIMENT_KIND)
    except Exception:  # created by a concurrent process in the meantime, else the create's own error
        exp = mlf.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _denied(exc: BaseException) -> bool:
    """MLflow's answer for a user without the permission (HTTP 403, PERMISSION_DENIED)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and (exc.get_http_status_code() == 403
                                                 or exc.error_code == "PERMISSION_DENIED")


def runs_with_hash(mlf, exp_id: str, config_hash: str) -> list:
    """Runs of this config, newest first."""
    return mlf.search_runs([exp_id], filter_string=f"tags.`pagating.config_hash` = '{config_hash}'",
                           order_by=["attributes.start_time DESC"], max_results=100)


def git_commit(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


# MLflow's own fields: what its UI reads ----------------------------------------------------------

# MLflow 3 opens an experiment without a kind in its GenAI view (traces); this tag and the
# workflowType query parameter (the UI's `mlflow.workflowType` switch) pick its runs table.
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = {KIND_TAG: "custom_model_development"}
ML_VIEW = "workflowType=machine_learning"
MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"  # `mlflow ui` / `mlflow server` default address


def adopt_launcher(mlf, launcher_run_id: str, exp_id: str) -> bool:
    """True when the run `mlflow run` opened is in the profile's experiment (it can be the parent).
    Otherwise (no --experiment-name: it is in Default) it stays a pointer to where the runs are, and
    one line says how to have them together."""
    run = mlf.get_run(launcher_run_id)
    if run.info.experiment_id == exp_id:
        return True
    uri = mlf.tracking_uri
    name = mlf.get_experiment(exp_id).name
    here = mlf.get_experiment(run.info.experiment_id).name
    mlf.set_tag(launcher_run_id, "mlflow.note.content",
                f"The runs this `mlflow run` started are in experiment {name}: {experiment_url(uri, exp_id)}")
    print(f"pagating: runs go to experiment {name!r}, not {here!r} where `mlflow run` put its own run; "
          f"add `--experiment-name {name}` to `mlflow run` to have them in one place", file=sys.stderr)
    return False


def strip_credentials(url: str) -> str:
    """A URL without user:password@ (for links and tags; mask_uri keeps a placeholder instead)."""
    return re.sub(r"^([A-Za-z][\w+.-]*://)[^/@]*@", r"\1", url)


def ui_base(uri: str) -> str:
    """The web UI of a tracking URI: the server itself, else where `mlflow ui` serves a local store."""
    if uri.startswith(("http://", "https://")):
        return strip_credentials(uri).rstrip("/")
    return os.environ.get("PAGATING_UI_URL", MLFLOW_UI_DEFAULT).rstrip("/")


def experiment_url(uri: str, exp_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs?{ML_VIEW}"


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs/{run_id}?{ML_VIEW}"


def git_repo_url(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "remote", "get-url", "origin"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return strip_credentials(out.stdout.strip()) if out.returncode == 0 else ""


def user_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


def lock_sha256(root: str | Path | None = None) -> str:
    """sha256 of the install lock (requirements/lock-cpu.txt) the environment was installed from: a run pins
    its package versions by this tag. "none" when the checkout has no lock."""
    import hashlib

    lock = Path(root or Path(__file__).resolve().parents[1]) / "requirements" / "lock-cpu.txt"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"


def source_tags(entry_point: str, commit: str | None, root: str | Path = ".") -> dict[str, str]:
    """mlflow.source.* / mlflow.user as `mlflow run` sets them: the project at its commit (the caller's
    git_commit), the entry point. The UI's Source column shows `<project>:<entry point>`, linked to the
    commit when the repo is on GitHub."""
    repo = git_repo_url(root)
    tags = {"mlflow.source.type": "PROJECT", "mlflow.source.name": repo or str(Path(root).resolve()),
            "mlflow.project.entryPoint": entry_point, "mlflow.user": user_name()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if repo:
        tags["mlflow.source.git.repoURL"] = repo
    return tags


def dvc_data_source(root: str | Path = ".", path: str = "data/raw") -> str:
    """Where data.dvc's data lives: the default DVC remote's URL (no credentials), else the local path."""
    from pagating.data.dvc import dvc_default_remote

    remote = dvc_default_remote(Path(root), with_local=True)
    return strip_credentials(remote[1]) if remote else str((Path(root) / path).resolve())


def log_datasets(mlf, run_id: str, profile: str, digest: str, source: str) -> None:
    """The run's data as MLflow dataset inputs (the UI's Dataset column): the training split with context
    `training`, the validation split with `eval`. Digest = data.dvc's md5, so the UI names the DVC version.
    (mlflow.log_input does the same for the fluent API's active run; our runs are made with the client.)"""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    src = resolve_dataset_source(source)
    inputs = []
    # One dataset per (name, digest) per run: the two splits need two names.
    for name, context in ((profile, "training"), (f"{profile}/validation", "eval")):
        entity = MetaDataset(src, name=name, digest=digest[:36] or None)._to_mlflow_entity()
        inputs.append(DatasetInput(entity, [InputTag("mlflow.data.context", context)]))
    mlf.log_inputs(run_id, datasets=inputs)


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
    import shlex

    from pagating.config import flatten, load_config

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


def last_steps(mlf, run_id: str) -> dict[str, int]:
    """Highest step logged per metric key: a resumed run never logs a (key, step) twice."""
    run = mlf.get_run(run_id)
    steps = {}
    for key in run.data.metrics:
        history = mlf.get_metric_history(run_id, key)
        if history:
            steps[key] = max(m.step for m in history)
    return steps


def write_run_file(directory: str | Path, info: dict[str, Any]) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / RUN_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))


def read_run_file(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


class _Backoff:
    def __init__(self, first: float = 0.5, cap: float = 15.0):
        self.first, self.cap, self.delay = first, cap, first

    def fail(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def ok(self) -> None:
        self.delay = self.first


def retry(fn, what: str, attempts: int = 8, *, first: float = 1.0, cap: float = 30.0,
          transient=lambda exc: True, wait_for=None, before_wait=None, say=None):
    """fn() with the project's one foreground retry policy, the backoff of the background senders
    (doubling from `first` up to `cap`); raises the last error after `attempts`, or at once when
    `transient(exc)` is false. `wait_for(exc, delay)` may replace a delay (a server's Retry-After),
    `before_wait()` may end the retrying with a result (the failed call went through after all), and
    `say(exc, attempt, delay)` replaces the line printed before each wait."""
    backoff = _Backoff(first=first, cap=cap)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not transient(exc):
                raise
            delay = backoff.fail() if wait_for is None else wait_for(exc, backoff.fail())
            found = before_wait() if before_wait is not None else None
            if found is not None:
                return found
            if say is None:
                print(f"pagating: {what} failed ({type(exc).__name__}), retrying in {delay:.0f}s", file=sys.stderr)
            else:
                say(exc, attempt, delay)
            time.sleep(delay)


class MetricSpool:
    """Append-only local metric log + a background flusher that sends it to MLflow with log_batch.

    The file holds one JSON object per line; `<spool>.sent` holds how many lines reached the
    server, so a later process (or `pagating sync`) continues exactly where this one stopped.
    """

    BATCH = 500  # MLflow accepts up to 1000 metrics per log_batch

    def __init__(self, path: str | Path, run_id: str, uri: str, skip_until: dict[str, int] | None = None,
                 interval_s: float = 1.0, fence=None):
        self.fence = fence  # Claim.check: called before every send; ClaimLost ends the sending for good
        self.path = Path(path)
        self.sent_path = self.path.with_suffix(".sent")
        self.run_id, self.uri = run_id, uri
        self.skip_until = dict(skip_until or {})
        self.interval_s = interval_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")
        self._written = self._count_lines()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._client = None
        self._send_lock = threading.Lock()

    def _count_lines(self) -> int:
        with open(self.path, encoding="utf-8") as f:
            return sum(1 for _ in f)

    def sent(self) -> int:
        try:
            return int(self.sent_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def written(self) -> int:
        return self._written

    def pending(self) -> int:
        return self._written - self.sent()

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        ts = timestamp_ms or int(time.time() * 1000)
        lines = []
        for key, value in metrics.items():
            if step <= self.skip_until.get(key, -1) or value is None:
                continue
            value = float(value)
            if math.isnan(value) or math.isinf(value):
                continue
            lines.append(json.dumps({"k": key, "v": value, "s": int(step), "t": ts}) + "\n")
        if not lines:
            return
        with self._lock:
            self._file.writelines(lines)
            self._file.flush()
            self._written += len(lines)

    def start(self) -> MetricSpool:
        self._thread = threading.Thread(target=self._run, name="pagating-spool", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = _Backoff()
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                while self.flush_once():
                    pass
                backoff.ok()
            except ClaimLost as exc:  # another process trains this config now: never send again
                self.last_error = str(exc)
                return
            except Exception as exc:  # server down, timeout, 5xx: keep the lines, try again later
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                self._stop.wait(backoff.fail())

    def flush_once(self) -> bool:
        """Send the next batch of unsent lines; True if something was sent."""
        with self._send_lock:  # the flusher and the checkpoint uploader both call this
            return self._flush_once()

    def flush_until(self, lines: int) -> None:
        """Send until the first `lines` lines are in MLflow; raises if the server does not answer."""
        while self.sent() < lines and self.flush_once():
            pass

    def _flush_once(self) -> bool:
        from mlflow.entities import Metric

        sent = self.sent()
        batch = []
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i < sent:
                    continue
                if not line.endswith("\n"):
                    break  # a line still being written
                batch.append(json.loads(line))
                if len(batch) >= self.BATCH:
                    break
        if not batch:
            return False
        metrics = [Metric(d["k"], d["v"], d["t"], d["s"]) for d in batch]
        if self._client is None:
            self._client = client(self.uri)
        if self.fence is not None:
            self.fence()
        self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        self.sent_path.write_text(str(sent + len(batch)))
        self.last_error = None
        return True

    def drain(self, timeout_s: float) -> int:
        """Wait up to timeout_s for everything to be sent; returns how many lines are left."""
        deadline = time.time() + timeout_s
        while self.pending() > 0 and time.time() < deadline:
            if self._thread is None or not self._thread.is_alive():
                try:
                    self.flush_once()
                except ClaimLost:
                    break
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                    time.sleep(min(1.0, max(0.0, deadline - time.time())))
                continue
            self._wake.set()
            time.sleep(0.1)
        return self.pending()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._file.close()


def _hardlink_copy(src: Path, dst: Path) -> None:
    # Hard links: instant, no extra disk, and the Trainer's checkpoint rotation (rmtree) cannot pull
    # files out from under a pending upload.
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checkpoint_marker(ckpt: str | Path, step: int, spool_lines: int = 0) -> dict:
    """The marker that makes a checkpoint folder whole: every file's size and sha256, written last.

    A folder without it (a save or an upload cut off midway) or whose files differ from it is never
    resumed from. `spool_lines`: metric lines logged when it was saved (sent before the upload)."""
    ckpt = Path(ckpt)
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != CKPT_MARKER}
    marker = {"step": int(step), "state": "complete", "files": files, "spool_lines": int(spool_lines)}
    tmp = ckpt / (CKPT_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    os.replace(tmp, ckpt / CKPT_MARKER)
    return marker


def verify_checkpoint(ckpt: str | Path) -> str | None:
    """None when the folder is a whole checkpoint (marker present, every file's size and hash match);
    else what is wrong, in a few words."""
    ckpt = Path(ckpt)
    try:
        marker = json.loads((ckpt / CKPT_MARKER).read_text())
    except FileNotFoundError:
        return f"no {CKPT_MARKER} (cut off before it was complete)"
    except (OSError, ValueError):
        return f"unreadable {CKPT_MARKER}"
    if marker.get("state") != "complete" or not isinstance(marker.get("files"), dict):
        return "marked incomplete (cut off mid-upload)"
    for name, want in marker["files"].items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the marker says {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def checkpoint_step(ckpt: str | Path) -> int:
    return int(Path(ckpt).name.rsplit("-", 1)[-1])


class CheckpointUploader:
    """Uploads each new checkpoint in a background thread so that MLflow always holds whole ones.

    Two slots, `checkpoints/slot-0` and `checkpoints/slot-1`: a save goes into the slot the pointer
    `checkpoints/latest.json` does not name, in this order: an "incomplete" marker (the slot stops
    being resumable), the files, the marker with their sizes and hashes, then the pointer. A kill at
    any moment leaves the previous checkpoint whole, and only the last two ever stay (no artifact
    delete needed: the GPU credential has EDIT, which cannot delete). A newer save supersedes a
    pending one; a failed upload is retried with backoff.
    """

    def __init__(self, run_id: str, uri: str, staging: str | Path, spool: MetricSpool | None = None,
                 fence=None):
        self.run_id, self.uri, self.spool = run_id, uri, spool
        self.fence = fence or (lambda: None)  # Claim.check, before every file
        self.staging = Path(staging)
        self._pending: Path | None = None
        self._busy = False
        self._cond = threading.Condition()
        self._stop = False
        self._slot: str | None = None  # the slot the pointer names
        self.uploaded_step: int | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="pagating-ckpt-upload", daemon=True)
        self._thread.start()

    def submit(self, ckpt_dir: str | Path, step: int) -> None:
        """ckpt_dir already holds its marker (write_checkpoint_marker)."""
        dst = self.staging / f"step-{step}"
        if dst.exists():
            shutil.rmtree(dst)
        _hardlink_copy(Path(ckpt_dir), dst)
        with self._cond:
            if self._pending is not None:
                shutil.rmtree(self._pending, ignore_errors=True)
            self._pending = dst
            self._cond.notify_all()

    def upload_now(self, path: Path) -> None:
        """Upload one staged checkpoint in the caller's thread (`pagating sync`); raises on failure."""
        self._upload(path)

    def _upload(self, path: Path) -> None:
        marker = json.loads((path / CKPT_MARKER).read_text())
        if self.spool is not None:
            # The metrics logged so far go to MLflow before the checkpoint does: a run resumed
            # from this checkpoint on another machine then misses no metric step.
            self.spool.flush_until(marker.get("spool_lines", 0))
        mlf = client(self.uri)
        if self._slot is None:
            self._slot = (_read_pointer(mlf, self.run_id) or {}).get("slot")
        slot = "slot-1" if self._slot == "slot-0" else "slot-0"
        dest = f"{CKPT_ROOT}/{slot}"
        with tempfile.TemporaryDirectory() as tmp:
            opening = Path(tmp) / CKPT_MARKER
            opening.write_text(json.dumps({"step": marker["step"], "state": "writing"}))
            self.fence()
            mlf.log_artifact(self.run_id, str(opening), dest)
            for name in sorted(marker["files"]):
                sub = str(Path(dest, name).parent)
                self.fence()
                mlf.log_artifact(self.run_id, str(path / name), sub)
            self.fence()
            mlf.log_artifact(self.run_id, str(path / CKPT_MARKER), dest)
            pointer = Path(tmp) / CKPT_POINTER
            pointer.write_text(json.dumps({"slot": slot, "step": marker["step"]}))
            self.fence()
            mlf.log_artifact(self.run_id, str(pointer), CKPT_ROOT)
        self._slot, self.uploaded_step = slot, marker["step"]

    def _run(self) -> None:
        backoff = _Backoff()
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._pending is None:
                    return
                path, self._pending, self._busy = self._pending, None, True
            try:
                self._upload(path)
                shutil.rmtree(path, ignore_errors=True)
                self.last_error = None
                backoff.ok()
            except ClaimLost as exc:  # another process trains this config now: upload nothing more
                self.last_error = str(exc)
                with self._cond:
                    self._pending, self._busy, self._stop = None, False, True
                    self._cond.notify_all()
                return
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                with self._cond:
                    if self._pending is None:  # nothing newer: retry this one
                        self._pending = path
                    else:
                        shutil.rmtree(path, ignore_errors=True)
                time.sleep(backoff.fail())
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def wait(self, timeout_s: float) -> bool:
        """Wait for pending uploads; True when nothing is left."""
        deadline = time.time() + timeout_s
        with self._cond:
            while (self._pending is not None or self._busy) and time.time() < deadline:
                self._cond.wait(timeout=0.2)
            return self._pending is None and not self._busy

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()


def _read_pointer(mlf, run_id: str, listing: list | None = None) -> dict | None:
    """checkpoints/latest.json of a run, or None when absent (raises when the server does not answer).
    `listing`: the caller's list_artifacts of checkpoints/, if it has one."""
    if listing is None:
        listing = mlf.list_artifacts(run_id, CKPT_ROOT)
    if CKPT_POINTER not in {a.path.rsplit("/", 1)[-1] for a in listing}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(mlf.download_artifacts(run_id, f"{CKPT_ROOT}/{CKPT_POINTER}", tmp)).read_text())
        except ValueError:
            return None


def download_checkpoint(mlf, run_id: str, dst: str | Path) -> Path | None:
    """The newest whole checkpoint of a run, verified against its marker, as dst/checkpoint-<step>;
    a cut-off or corrupt one is named in one line and the older one tried; None if none is whole.
    A full disk is one line (UserError) saying how much the checkpoint needs; no half download stays."""
    try:
        listing = mlf.list_artifacts(run_id, CKPT_ROOT)
        slots = [a.path.rsplit("/", 1)[-1] for a in listing if a.is_dir]
        pointer = _read_pointer(mlf, run_id, listing) or {}
    except Exception:
        return None
    dst, at = Path(dst), {}
    tmp_root = dst / ".download"
    try:
        return _download_newest(mlf, run_id, dst, tmp_root, slots, pointer, at)
    except BaseException as exc:
        # MLflow's download swallows the OSError and raises its own "Failed to download artifacts": a
        # disk all but full before the cleanup says what it was.
        full = isinstance(exc, Exception) and not isinstance(exc, UserError) and (
            disk_full(exc, dst) or free_bytes(dst) < LOW_FREE)
        shutil.rmtree(tmp_root, ignore_errors=True)
        if full:
            need = f"about {mib(at['need'])}" if at.get("need") else "more than that"
            raise UserError(f"disk full writing {tmp_root.absolute()}: downloading {at.get('where', f'run {run_id}')} "
                            f"to resume from needs {need} in {dst.absolute()}, {mib(free_bytes(dst))} free; free "
                            f"space there (or set train.output_dir elsewhere) and run again") from None
        raise


def _download_newest(mlf, run_id: str, dst: Path, tmp_root: Path, slots: list[str], pointer: dict,
                     at: dict) -> Path | None:
    """download_checkpoint's work; `at` says what it is downloading (for the disk-full line)."""
    markers = []
    for slot in slots:
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True)
        at["where"] = f"MLflow run {run_id} {CKPT_ROOT}/{slot}/{CKPT_MARKER}"
        try:
            marker = json.loads(Path(mlf.download_artifacts(run_id, f"{CKPT_ROOT}/{slot}/{CKPT_MARKER}",
                                                            str(tmp_root))).read_text())
        except Exception as exc:
            if disk_full(exc, dst):
                raise
            marker = {"step": -1, "state": "missing"}
        markers.append((slot == pointer.get("slot"), int(marker.get("step", -1)), slot, marker))
    # Newest first; the pointer breaks a tie (it only ever names a slot whose marker went up whole).
    for _, step, slot, marker in sorted(markers, key=lambda m: (m[1], m[0]), reverse=True):
        where = f"MLflow run {run_id} {CKPT_ROOT}/{slot} (step {step})"
        if marker.get("state") != "complete":
            print(f"pagating: skipping {where}: {marker.get('state', 'no marker')}, not a whole checkpoint",
                  file=sys.stderr)
            continue
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir(parents=True)
        at["where"] = where
        at["need"] = sum(int(f.get("size", 0)) for f in (marker.get("files") or {}).values())
        if free_bytes(dst) < at["need"]:
            raise UserError(f"not enough disk space in {dst.absolute()}: the checkpoint to resume from ({where}) "
                            f"needs about {mib(at['need'])}, {mib(free_bytes(dst))} free; free space there (or set "
                            f"train.output_dir elsewhere) and run again")
        local = Path(mlf.download_artifacts(run_id, f"{CKPT_ROOT}/{slot}", str(tmp_root)))
        problem = verify_checkpoint(local)
        if problem:
            print(f"pagating: skipping {where}: {problem}", file=sys.stderr)
            continue
        final = dst / f"checkpoint-{step}"
        shutil.rmtree(final, ignore_errors=True)
        local.rename(final)
        shutil.rmtree(tmp_root, ignore_errors=True)
        return final
    shutil.rmtree(tmp_root, ignore_errors=True)
    return None


# `pagating sync` ------------------------------------------------------------------------------

PENDING_FILE = "pagating_pending.json"  # what a run could not upload before its drain budget ran out
STAGING_DIR = ".upload-staging"


def finish_run(mlf, run_id: str, run_dir: str | Path, status: str, spool: MetricSpool | None,
               uploader: CheckpointUploader | None, model_dir: str | Path | None, model_step: int,
               budget_s: float, backoff_cap_s: float = 30.0, fence=None) -> tuple[list[str], str | None]:
    """The end of a run: last metrics, last checkpoint, the model (log_model: the metrics at model_step
    are in MLflow first, so they link to it), then the run's status, in that order, retried while the
    server is away for up to budget_s. Returns (what is still only local, empty when everything arrived;
    the model id); PENDING_FILE in run_dir then tells `pagating sync` what to finish. `fence` (Claim.check)
    runs before each step: ClaimLost stops it at once, with nothing more written into the run."""
    fence = fence or (lambda: None)
    deadline = time.time() + budget_s
    backoff = _Backoff(first=1.0, cap=backoff_cap_s)
    model_done, said, model_id = model_dir is None, False, None
    # Not `retry`: the same backoff, but bounded by the drain budget rather than a count, and what is
    # left at the end stays local for `pagating sync` instead of raising.
    while True:
        try:
            if spool is not None:
                while spool.flush_once():
                    pass
            if uploader is not None and not uploader.wait(max(0.0, min(10.0, deadline - time.time()))):
                raise ConnectionError(f"checkpoint upload: {uploader.last_error}")
            fence()
            if not model_done:
                model_id = log_model(mlf.tracking_uri, run_id, model_dir, model_step)
                model_done = True
            fence()
            mlf.set_terminated(run_id, status)
            (Path(run_dir) / PENDING_FILE).unlink(missing_ok=True)
            if said:
                print(f"pagating: server back: final uploads done, run {run_id} {status}", file=sys.stderr)
            return [], model_id
        except ClaimLost:
            raise
        except Exception as exc:
            left = deadline - time.time()
            if left <= 0:
                break
            if not said:
                print(f"pagating: MLflow did not take the final uploads ({type(exc).__name__}); waiting up to "
                      f"{budget_s:.0f}s for it (tracking.drain_timeout_s)", file=sys.stderr)
                said = True
            time.sleep(min(backoff.fail(), left))
    local = []
    staged = _staged_checkpoints(run_dir)
    if staged:
        local.append(f"checkpoint step {checkpoint_step(staged[-1])}")
    if not model_done:
        local.append("model/")
    if spool is not None and spool.pending():
        local.append(f"{spool.pending()} metric lines")
    (Path(run_dir) / PENDING_FILE).write_text(json.dumps(
        {"run_id": run_id, "status": status, "model": None if model_done else str(Path(model_dir).name),
         "step": model_step}))
    return local or ["the run's final status"], model_id


def _staged_checkpoints(run_dir: str | Path) -> list[Path]:
    return sorted((p for p in (Path(run_dir) / STAGING_DIR).glob("step-*") if (p / CKPT_MARKER).exists()),
                  key=checkpoint_step)


def sync(output_dir: str | Path, timeout_s: float = 120.0) -> int:
    """Push what runs under output_dir could not send (metric spools, the last checkpoint, model/) and
    finish them; returns how many runs still have something local."""
    spools = sorted(Path(output_dir).rglob(SPOOL_GLOB))
    pendings = sorted(Path(output_dir).rglob(PENDING_FILE))
    if not spools and not pendings:
        raise UserError(f"no metric spool ({SPOOL_GLOB}) under {output_dir}: give the run's output directory")
    runs: dict[str, Path] = {}
    for path in spools:
        runs.setdefault(path.name.split(".")[1], path.parent)
    for path in pendings:
        runs.setdefault(json.loads(path.read_text())["run_id"], path.parent)
    left = 0
    for run_id, run_dir in runs.items():
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (read_run_file(run_dir) or {}).get("tracking_uri")
        if not uri:
            raise UserError("set MLFLOW_TRACKING_URI to the server the run logged to")
        check_no_credentials(uri)  # log_model's own "View run ... at:" line would print it
        check_server(uri)
        spool = MetricSpool(spool_path(run_dir, run_id), run_id, uri)
        remaining = spool.drain(timeout_s)
        done = []
        pending_path = run_dir / PENDING_FILE
        if pending_path.exists() and not remaining:
            pending = json.loads(pending_path.read_text())
            mlf = client(uri)
            try:
                for staged in _staged_checkpoints(run_dir)[-1:]:
                    uploader = CheckpointUploader(run_id, uri, run_dir / STAGING_DIR)
                    uploader.upload_now(staged)
                    uploader.close()
                    shutil.rmtree(staged, ignore_errors=True)
                    done.append(f"checkpoint step {checkpoint_step(staged)}")
                if pending.get("model"):
                    log_model(uri, run_id, run_dir / pending["model"], int(pending.get("step", 0)))
                    done.append("model")
                mlf.set_terminated(run_id, pending["status"])
                pending_path.unlink()
                done.append(f"run {pending['status']}")
            except Exception as exc:
                spool.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        spool.close()
        unfinished = remaining or pending_path.exists()
        print(f"{run_dir}: run {run_id}: {spool.sent()} sent, {remaining} left"
              + (f"; {', '.join(done)}" if done else "")
              + (f" ({spool.last_error})" if unfinished and spool.last_error else ""))
        left += bool(unfinished)
    return left


def register_cli(sub) -> None:
    p = sub.add_parser("sync", help="push what a run could not send in an outage (metrics, last checkpoint, "
                                    "model/) and finish it")
    p.add_argument("output_dir", help="the run's output directory (or a parent of several)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to keep trying per run")
    p.set_defaults(func=lambda a: 1 if sync(a.output_dir, a.timeout) else 0)


# The Trainer callback --------------------------------------------------------------------------

class _Callback:
    """The Trainer's callback protocol without importing transformers (which pulls in torch, ~5 s
    for `pagating report` / `sync`): every event we do not handle is a no-op."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class TrackingCallback(_Callback):
    """Trainer logs -> spool (the metric names README lists), step timing, MFU, GPU telemetry, α, cost,
    and checkpoint upload. Only the main process logs."""

    NAMES = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
             "eval_loss": "eval/loss"}

    def __init__(self, spool: MetricSpool, uploader: CheckpointUploader | None, run_info: dict,
                 tokens_per_step: int, flops_token: float, peak: float | None, sampler=None,
                 usd_per_hour: float | None = None, model=None, log_alpha: bool = False, cuda: bool = False,
                 compile_watch=None, claim: Claim | None = None):
        self.spool, self.uploader, self.run_info = spool, uploader, run_info
        self.claim = claim  # once it is lost, training stops at the next step, log or save
        self.tokens_per_step, self.flops_token, self.peak = tokens_per_step, flops_token, peak
        self.sampler, self.usd_per_hour, self.model = sampler, usd_per_hour, model
        self.log_alpha, self.cuda = log_alpha, cuda
        self.compile_watch = compile_watch  # pagating.runtime.CompileWatch when torch.compile is on
        self.t0: float | None = None
        self.step0 = 0
        self.c0 = 0.0
        self.started = time.time()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # only at logging steps: the step loop itself never waits

    def _restart_window(self, state) -> None:
        self._sync()
        self.t0, self.step0 = time.perf_counter(), state.global_step
        self.c0 = self.compile_watch.seconds() if self.compile_watch is not None else 0.0

    def _fenced(self) -> None:
        if self.claim is not None and self.claim.lost:
            raise ClaimLost(self.claim.lost)

    def on_step_end(self, args, state, control, **kwargs):
        self._fenced()

    def on_train_begin(self, args, state, control, **kwargs):
        from pagating.gpu import cpu_window

        cpu_window()  # primes psutil: the first window's CPU figure then covers that window only
        self.started = time.time()
        self._restart_window(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._restart_window(state)  # evaluation time is not step time

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self._fenced()
        step = state.global_step
        out = {name: logs[key] for key, name in self.NAMES.items() if key in logs}
        if "eval_loss" in logs:
            out["eval/ppl"] = math.exp(min(logs["eval_loss"], 50.0))
        if "loss" in logs and self.t0 is not None and step > self.step0:
            self._sync()
            elapsed = time.perf_counter() - self.t0
            if self.compile_watch is not None:
                # Compiling is a one-off cost, not step time: it is logged apart, cumulative.
                compiled = self.compile_watch.seconds()
                elapsed -= min(compiled - self.c0, 0.99 * elapsed)
                out["perf/compile_time_s"] = compiled
                out["perf/recompiles"] = self.compile_watch.recompiles
            step_time = elapsed / (step - self.step0)
            out["perf/step_time_s"] = step_time
            out["perf/tokens_per_s"] = self.tokens_per_step / step_time
            if self.peak:
                out["perf/mfu"] = self.flops_token * out["perf/tokens_per_s"] / self.peak
            if self.sampler is not None:
                out.update(self.sampler.window())
            from pagating.gpu import cpu_window

            out.update(cpu_window())
            if self.log_alpha and self.model is not None:
                for i, a in enumerate(self.model.alphas()):
                    out[f"alpha/layer_{i:02d}"] = a
            if self.usd_per_hour:
                out["cost/usd"] = self.usd_per_hour * (time.time() - self.started) / 3600.0
            self.spool.log(out, step)
            self._restart_window(state)
        else:
            self.spool.log(out, step)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._fenced()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.exists():
            write_run_file(ckpt, self.run_info)
            # The marker goes last, locally too: a resume never picks a save cut off midway.
            write_checkpoint_marker(ckpt, state.global_step, self.spool.written() if self.spool else 0)
            if self.uploader is not None:
                self.uploader.submit(ckpt, state.global_step)
        self._restart_window(state)  # saving time is not step time


# The final model as an MLflow model ------------------------------------------------------------

@contextlib.contextmanager
def fluent_scope(uri: str, experiment_id: str | None = None):
    """MLflow's fluent API (log_model, register_model) pointed at `uri` and `experiment_id` for one call.

    Why by hand: set_tracking_uri and set_experiment are process-wide and also export MLFLOW_TRACKING_URI
    and MLFLOW_EXPERIMENT_ID to os.environ, so every later child inherits them: an `mlflow run` started
    after an in-process training run would open its run in that experiment, and later fluent reads
    (mlflow.artifacts) would go to this server. Everything is put back on exit.
    """
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri, saved_exp = tracking_utils._tracking_uri, fluent._active_experiment_id
    try:
        mlflow.set_tracking_uri(uri)
        if experiment_id is not None:
            mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        tracking_utils._tracking_uri, fluent._active_experiment_id = saved_uri, saved_exp
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_model(uri: str, run_id: str, model_dir: str | Path, step: int) -> str:
    """Log the saved final model (`model_dir`, HF format) as the run's MLflow model `model`; returns its model id.

    How, not when: the caller decides when and retries (`retry`). The pytorch flavour, because it loads
    back as the same nn.Module (`mlflow.pytorch.load_model("runs:/<id>/model")`) without the custom
    config being registered with transformers' Auto classes first; the pagating package travels with it
    (code_paths), the tokenizer and HF config as extra files. `step` is the run's last step: MLflow links
    the metrics logged at it (final/eval_loss, final/eval_ppl, best/eval_loss) to the model, which is how
    the UI's Logged models list shows them. Checkpoints stay plain artifacts (CheckpointUploader).
    Pickle, not MLflow 3.17's default pt2: torch.export of the Trainer's GPT-2 needs a traced example and
    fixed shapes, and loads back as an ExportedProgram, not the model.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pagating.model import load_model

    model_dir = Path(model_dir)
    model = load_model(str(model_dir)).eval()  # on CPU whatever device trained it: loads anywhere
    vocab = int(model.config.vocab_size)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), "input_ids")]),
                               outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, vocab), "logits")]))
    extra = [str(p) for p in sorted(model_dir.iterdir()) if p.is_file() and p.suffix in (".json", ".txt", ".model")]
    # Explicit requirements: inferring them loads the model in a subprocess (seconds to minutes).
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"mlflow=={mlflow.__version__}"]
    # The model belongs to the run's experiment (log_model takes the fluent API's active one, else Default).
    with fluent_scope(uri, client(uri).get_run(run_id).info.experiment_id):
        info = mlflow.pytorch.log_model(model, name="model", run_id=run_id, step=step, signature=signature,
                                        code_paths=[str(Path(__file__).resolve().parent)], extra_files=extra,
                                        pip_requirements=reqs, serialization_format="pickle")
    return info.model_id


def run_model_id(mlf, run) -> str | None:
    """The id of the MLflow model a run logged as `model` (its newest), or None."""
    outputs = getattr(run, "outputs", None)
    ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    for model_id in reversed(ids):
        if mlf.get_logged_model(model_id).name == "model":
            return model_id
    return None
