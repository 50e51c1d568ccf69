"""The tracking store: which MLflow server, a client for it, checks that it answers and lets us in, the
profile's experiment, retries with backoff, and the links into MLflow's web UI."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from urllib.parse import urlsplit, urlunsplit

from pagating import names
from pagating.config import UserError, experiment_name

# MLflow's own fields: what its UI reads ----------------------------------------------------------

# MLflow 3 opens an experiment without a kind in its GenAI view (traces); this tag and the
# workflowType query parameter (the UI's `mlflow.workflowType` switch) pick its runs table.
KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = {KIND_TAG: "custom_model_development"}
ML_VIEW = "workflowType=machine_learning"
MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"  # `mlflow ui` / `mlflow server` default address


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


def strip_credentials(url: str) -> str:
    """A URL without user:password@ (for links and tags; mask_uri keeps a placeholder instead)."""
    return re.sub(r"^([A-Za-z][\w+.-]*://)[^/@]*@", r"\1", url)


def client(uri: str | None = None):
    _mlflow_env_defaults()
    from mlflow.tracking import MlflowClient  # heavy: ~2 s, paid by the first client, not at CLI start-up

    return MlflowClient(tracking_uri=uri or tracking_uri())


def check_server(uri: str) -> None:
    """Fail fast (UserError) when an http(s) tracking server is unreachable or refuses us."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests  # heavy: ~0.3 s, only an http(s) server needs it

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
    import requests  # heavy: ~0.3 s, only an http(s) server needs it

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
    from mlflow.exceptions import MlflowException  # heavy: ~2 s; only reached after an MLflow call failed

    return isinstance(exc, MlflowException) and (exc.get_http_status_code() == 403
                                                 or exc.error_code == "PERMISSION_DENIED")


def runs_with_hash(mlf, exp_id: str, config_hash: str) -> list:
    """Runs of this config, newest first."""
    return mlf.search_runs([exp_id], filter_string=f"tags.`{names.CONFIG_HASH}` = '{config_hash}'",
                           order_by=["attributes.start_time DESC"], max_results=100)



def last_steps(mlf, run_id: str) -> dict[str, int]:
    """Highest step logged per metric key: a resumed run never logs a (key, step) twice."""
    run = mlf.get_run(run_id)
    steps = {}
    for key in run.data.metrics:
        history = mlf.get_metric_history(run_id, key)
        if history:
            steps[key] = max(m.step for m in history)
    return steps


class Backoff:
    """Doubling waits from `first` up to `cap`, back to `first` after a success."""

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
    backoff = Backoff(first=first, cap=cap)
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


# `mlflow run`'s own run and links into the web UI ----------------------------------------------

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
    mlf.set_tag(launcher_run_id, names.NOTE,
                f"The runs this `mlflow run` started are in experiment {name}: {experiment_url(uri, exp_id)}")
    print(f"pagating: runs go to experiment {name!r}, not {here!r} where `mlflow run` put its own run; "
          f"add `--experiment-name {name}` to `mlflow run` to have them in one place", file=sys.stderr)
    return False


def ui_base(uri: str) -> str:
    """The web UI of a tracking URI: the server itself, else where `mlflow ui` serves a local store."""
    if uri.startswith(("http://", "https://")):
        return strip_credentials(uri).rstrip("/")
    return os.environ.get("PAGATING_UI_URL", MLFLOW_UI_DEFAULT).rstrip("/")


def experiment_url(uri: str, exp_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs?{ML_VIEW}"


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs/{run_id}?{ML_VIEW}"


# MLflow's fluent API, scoped ---------------------------------------------------------------------

@contextlib.contextmanager
def fluent_scope(uri: str, experiment_id: str | None = None):
    """MLflow's fluent API (log_model, register_model) pointed at `uri` and `experiment_id` for one call.

    Why by hand: set_tracking_uri and set_experiment are process-wide and also export MLFLOW_TRACKING_URI
    and MLFLOW_EXPERIMENT_ID to os.environ, so every later child inherits them: an `mlflow run` started
    after an in-process training run would open its run in that experiment, and later fluent reads
    (mlflow.artifacts) would go to this server. Everything is put back on exit.
    """
    # heavy: ~2 s, only the callers of MLflow's fluent API (model logging, the report) need it
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


def run_model_id(mlf, run) -> str | None:
    """The id of the MLflow model a run logged as `model` (its newest), or None."""
    outputs = getattr(run, "outputs", None)
    ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    for model_id in reversed(ids):
        if mlf.get_logged_model(model_id).name == names.MODEL_ARTIFACT:
            return model_id
    return None
