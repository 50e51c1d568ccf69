"""`pagating server`: the researcher's MLflow tracking server, closed to strangers.

Runs `mlflow server --app-name basic-auth` in the foreground with a generated auth config, then
makes sure the GPU user exists with the password from the environment:

    MLFLOW_AUTH_ADMIN_PASSWORD   the admin's password (>= 12 characters, MLflow's rule)
    PAGATING_GPU_USER_PASSWORD   the GPU user's password (>= 12 characters); runs on rented GPUs log with it

Where secrets live: both passwords only in this process's environment (the admin's also in the
mlflow server's, which reads it to create the admin on first start); the auth store (default
`mlflow-server/basic_auth.db`) keeps salted hashes only. The generated `basic_auth.ini` (mode 0600)
holds no password. Nothing here prints a password.

Permissions: every request without valid credentials gets 401. The admin can do everything; the
GPU user, whose password sits on a rented machine nobody should trust, gets `--default-permission`
(NO_PERMISSIONS: it cannot even read) on experiments it was not granted, and `pagating grant` gives
it EDIT (read and log; no delete, no permission changes) on exactly the experiments a sweep uses.
Creating anything but runs (experiments, registered models, prompts, users, permissions, webhooks,
...) is refused to every non-admin by pagating.server_auth, MLflow's `authorization_function` here.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from pagating.config import UserError, add_config_args, config_from_args, experiment_name
from pagating.tracking import store

ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
ADMIN_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"  # MLflow's own override of admin_username
GPU_PASSWORD_ENV = "PAGATING_GPU_USER_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
MIN_PASSWORD_LEN = 12  # mlflow.utils.validation._validate_password
LEGACY_PASSWORD = "password1234"  # MLflow refuses the password its old basic_auth.ini shipped
PERMISSIONS = ("NO_PERMISSIONS", "READ", "EDIT", "MANAGE")
AUTHORIZATION_FUNCTION = "pagating.server_auth:authenticate"

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 5000,
    "backend_store_uri": "sqlite:///mlflow-server/mlflow.db",
    "artifacts_destination": "./mlflow-server/artifacts",
    "auth_dir": "mlflow-server",
    "auth_db_uri": None,  # default: sqlite:///<auth_dir>/basic_auth.db
    "gpu_user": "gpu-runner",
    "default_permission": "NO_PERMISSIONS",
    "workers": 2,
    "allowed_hosts": None,
}


def register_cli(sub) -> None:
    p = sub.add_parser(
        "server", help="run the MLflow tracking server with basic auth and a GPU user",
        description=f"Start `mlflow server --app-name basic-auth` in the foreground (Ctrl-C stops it). "
                    f"Needs {ADMIN_PASSWORD_ENV} and {GPU_PASSWORD_ENV} (>= 12 characters each) in "
                    f"the environment. Put it behind HTTPS before exposing it: see docs/server.md.")
    p.add_argument("--host", default=DEFAULTS["host"],
                   help="interface to bind (default 127.0.0.1: reach it via a reverse proxy or SSH tunnel)")
    p.add_argument("--port", type=int, default=DEFAULTS["port"])
    p.add_argument("--backend-store-uri", default=DEFAULTS["backend_store_uri"],
                   help="sqlite:///path.db or postgresql://user@host/db (default %(default)s)")
    p.add_argument("--artifacts-destination", default=DEFAULTS["artifacts_destination"],
                   help="local directory or s3://bucket/prefix (default %(default)s)")
    p.add_argument("--auth-dir", default=DEFAULTS["auth_dir"],
                   help="where the generated basic_auth.ini and the default auth store go (%(default)s)")
    p.add_argument("--auth-db-uri", default=None,
                   help="users and permissions store (default sqlite:///<auth-dir>/basic_auth.db); "
                        "not the backend store's database")
    p.add_argument("--gpu-user", default=DEFAULTS["gpu_user"],
                   help=f"user that GPU runs log as; password from {GPU_PASSWORD_ENV} (default %(default)s)")
    p.add_argument("--default-permission", choices=PERMISSIONS, default=DEFAULTS["default_permission"],
                   help="what a logged-in non-admin may do on experiments it was not granted and did not "
                        "create (default %(default)s; `pagating grant` gives the GPU user EDIT on a sweep's)")
    p.add_argument("--workers", type=int, default=DEFAULTS["workers"])
    p.add_argument("--allowed-hosts", default=None,
                   help="Host headers MLflow accepts, e.g. mlflow.example.org (set it behind a proxy)")
    p.set_defaults(func=run_server)

    g = sub.add_parser(
        "grant", help="give the GPU user EDIT on exactly the experiments a sweep uses (run as the admin)",
        description=f"Create the profile's experiment as the admin if needed and grant the GPU user EDIT on it "
                    f"(log runs, metrics, artifacts; no delete, no permission changes). Server: "
                    f"MLFLOW_TRACKING_URI; admin: {ADMIN_PASSWORD_ENV} (or MLFLOW_TRACKING_USERNAME/PASSWORD "
                    f"of an admin).")
    g.add_argument("--experiment", action="append", default=[], help="an experiment name instead (repeatable)")
    g.add_argument("--user", default=DEFAULTS["gpu_user"], help="the GPU user (default %(default)s)")
    add_config_args(g, "grant")  # --profile: whose sweep to grant; --set tracking.experiment_prefix=...
    g.set_defaults(func=cli_grant)


def admin_credentials() -> tuple[str, str]:
    if os.environ.get(ADMIN_PASSWORD_ENV):
        return os.environ.get(ADMIN_USERNAME_ENV) or "admin", os.environ[ADMIN_PASSWORD_ENV]
    if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    raise UserError(f"granting needs the admin: export {ADMIN_PASSWORD_ENV} (the admin's password) and run again")


def grant_experiments(uri: str, admin: tuple[str, str], names: list[str], user: str,
                      permission: str = "EDIT") -> dict[str, str]:
    """Create each experiment as the admin if missing (the admin owns it) and give `user` exactly
    `permission` on it (MLflow's per-user grant API, /api/3.0/mlflow/users/permissions/grant).
    Returns {name: experiment_id}."""
    import requests  # heavy: ~0.3 s, `pagating server --help` does not need it

    api = uri.rstrip("/")

    def post(path: str, body: dict):
        return requests.post(f"{api}/api/{path}", json=body, auth=admin, timeout=30)

    out = {}
    for name in names:
        r = requests.get(f"{api}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name},
                         auth=admin, timeout=30)
        if r.status_code in (401, 403):
            raise UserError(f"{mask_admin(admin)} cannot manage {uri}: give the admin's credentials")
        if r.status_code == 404:
            c = post("2.0/mlflow/experiments/create", {"name": name})
            c.raise_for_status()
            exp_id = c.json()["experiment_id"]
        else:
            r.raise_for_status()
            exp = r.json()["experiment"]
            exp_id = exp["experiment_id"]
            if exp["lifecycle_stage"] == "deleted":
                post("2.0/mlflow/experiments/restore", {"experiment_id": exp_id})
        body = {"username": user, "resource_type": "experiment", "resource_id": exp_id}
        g = post("3.0/mlflow/users/permissions/grant", {**body, "permission": permission})
        if g.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in g.text:  # re-grant: replace, never widen
            post("3.0/mlflow/users/permissions/revoke", body).raise_for_status()
            g = post("3.0/mlflow/users/permissions/grant", {**body, "permission": permission})
        if not g.ok:
            raise UserError(f"could not grant {user!r} {permission} on {name}: HTTP {g.status_code} "
                            f"{g.text[:200].strip()}")
        out[name] = exp_id
    return out


def mask_admin(admin: tuple[str, str]) -> str:
    return f"user {admin[0]!r}"


def cli_grant(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    uri = store.tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        raise UserError(f"MLFLOW_TRACKING_URI must be the `pagating server` (http[s]://...), not {store.mask_uri(uri)}")
    names = args.experiment or [experiment_name(cfg)]
    granted = grant_experiments(uri, admin_credentials(), names, args.user)
    for name, exp_id in granted.items():
        print(f"pagating grant: {args.user!r} has EDIT on experiment {name} (id {exp_id}) at {store.mask_uri(uri)}")
    return 0


def run_server(args: argparse.Namespace) -> int:
    proc = start_server(args, wait=True)
    return proc.returncode or 0


def _options(args_or_kwargs: argparse.Namespace | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(args_or_kwargs, argparse.Namespace):
        given = vars(args_or_kwargs)
    else:
        given = dict(args_or_kwargs or {})
    given = {k: v for k, v in given.items() if k not in ("func", "verb", "argv")}  # the CLI's own
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown server option(s): {', '.join(sorted(unknown))}")
    opts = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    opts["port"], opts["workers"] = int(opts["port"]), int(opts["workers"])
    return opts


def _password(env: str, what: str) -> str:
    value = os.environ.get(env, "")
    if len(value) < MIN_PASSWORD_LEN:
        state = "is not set" if not value else f"is shorter than {MIN_PASSWORD_LEN} characters"
        raise UserError(f"{env} {state}: export {env} with the {what} password "
                        f"({MIN_PASSWORD_LEN}+ characters) and run `pagating server` again")
    if value == LEGACY_PASSWORD:
        raise UserError(f"{env} is MLflow's old public default password: choose another one")
    return value


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    return None


def _check_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port: use 1-65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # Like the server itself: a just-stopped server's TIME_WAIT connections do not block the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): stop what uses it or "
                            f"pick another --port") from None


def _check_store_uri(flag: str, uri: str) -> None:
    if "://" not in uri:
        raise UserError(f"{flag} {uri!r} is not a URI: use sqlite:///path/to/file.db or "
                        f"postgresql://user@host:5432/db")
    scheme = uri.split("://", 1)[0]
    if scheme.startswith("postgresql") and not (find_spec("psycopg2") or find_spec("psycopg")):
        raise UserError(f"{flag} is PostgreSQL but no driver is installed: pip install psycopg2-binary")
    if scheme.startswith("mysql") and not (find_spec("pymysql") or find_spec("MySQLdb")):
        raise UserError(f"{flag} is MySQL but no driver is installed: pip install pymysql")


def _validate(opts: dict[str, Any]) -> tuple[str, str, str]:
    """Every check a user can fail, before anything is written or started."""
    admin_user = os.environ.get(ADMIN_USERNAME_ENV) or "admin"
    admin_password = _password(ADMIN_PASSWORD_ENV, f"MLflow admin ({admin_user!r})")
    gpu_password = _password(GPU_PASSWORD_ENV, f"GPU user ({opts['gpu_user']!r})")
    if not opts["gpu_user"] or opts["gpu_user"] == admin_user:
        raise UserError(f"--gpu-user must be a name other than the admin's ({admin_user!r})")
    if gpu_password == admin_password:
        raise UserError(f"{GPU_PASSWORD_ENV} must differ from {ADMIN_PASSWORD_ENV}: the GPU box must "
                        f"not hold the admin password")
    if not find_spec("flask_wtf"):
        raise UserError("MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'")
    if opts["default_permission"] not in PERMISSIONS:
        raise UserError(f"--default-permission must be one of {', '.join(PERMISSIONS)}")
    if opts["workers"] < 1:
        raise UserError("--workers must be at least 1")
    _check_store_uri("--backend-store-uri", opts["backend_store_uri"])
    if opts["auth_db_uri"]:
        _check_store_uri("--auth-db-uri", opts["auth_db_uri"])
        if opts["auth_db_uri"] == opts["backend_store_uri"]:
            raise UserError("--auth-db-uri must be another database than --backend-store-uri "
                            "(both keep their own schema versions)")
    if str(opts["artifacts_destination"]).startswith("s3://") and not find_spec("boto3"):
        raise UserError("--artifacts-destination is S3 but boto3 is not installed: pip install boto3")
    _check_port_free(opts["host"], opts["port"])
    _check_existing_admin(_auth_db_uri(opts), admin_user, admin_password)
    return admin_user, admin_password, gpu_password


def _check_existing_admin(auth_db_uri: str, admin_user: str, admin_password: str) -> None:
    """On a restart with a sqlite auth store, check the admin password before starting anything:
    MLflow uses the env password only to create the admin, so a wrong one would only show later."""
    path = _sqlite_path(auth_db_uri)
    if path is None or not path.exists():
        return
    from werkzeug.security import check_password_hash  # MLflow's (Flask's) dependency: loaded only on a restart

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute("SELECT password_hash FROM users WHERE username = ?", (admin_user,)).fetchone()
    except sqlite3.Error:
        return  # not initialised yet or another schema: the REST check after start still applies
    if row and row[0] and not check_password_hash(row[0], admin_password):
        raise UserError(_wrong_admin_message(admin_user))


def _wrong_admin_message(admin_user: str) -> str:
    return (f"{ADMIN_PASSWORD_ENV} is not the password of admin {admin_user!r} in the existing auth store "
            f"(MLflow uses it only when it creates the admin): export the original password, or change "
            f"it via the auth API / the MLflow UI")


def _auth_db_uri(opts: dict[str, Any]) -> str:
    return opts["auth_db_uri"] or f"sqlite:///{Path(opts['auth_dir']).resolve() / 'basic_auth.db'}"


def write_auth_config(opts: dict[str, Any], admin_user: str) -> Path:
    """basic_auth.ini for MLFLOW_AUTH_CONFIG_PATH: no password in it (the admin's comes from env)."""
    auth_dir = Path(opts["auth_dir"]).resolve()
    auth_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db_uri = _auth_db_uri(opts)
    text = (
        "# Generated by `pagating server`; rewritten on every start. No password is stored here:\n"
        f"# the admin's comes from {ADMIN_PASSWORD_ENV}; the auth store keeps salted hashes.\n"
        "[mlflow]\n"
        f"default_permission = {opts['default_permission']}\n"
        f"database_uri = {db_uri}\n"
        f"admin_username = {admin_user}\n"
        "# MLflow's basic auth, plus: a non-admin (the GPU user) may only read and log runs (pagating.server_auth)\n"
        f"authorization_function = {AUTHORIZATION_FUNCTION}\n"
        "grant_default_workspace_access = false\n"
        "# Remember a verified login for 60 s per worker: without it every request (a GPU run logs\n"
        "# every few seconds) pays a deliberately slow password hash. A changed password reaches\n"
        "# other workers within this time; a restart clears it.\n"
        "auth_cache_ttl_seconds = 60\n"
    )
    path = auth_dir / "basic_auth.ini"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC
    return path


def _flask_secret_key(auth_dir: Path) -> str:
    """The static key the basic-auth app signs CSRF tokens with: MLFLOW_FLASK_SERVER_SECRET_KEY if
    set, else one generated once and kept in <auth-dir>/flask_secret_key (0600) so UI sessions
    survive restarts and all workers agree."""
    if os.environ.get(SECRET_KEY_ENV):
        return os.environ[SECRET_KEY_ENV]
    path = auth_dir / "flask_secret_key"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _wait_healthy(proc: subprocess.Popen, uri: str, timeout: float) -> None:
    import requests  # heavy: ~0.3 s, `pagating server --help` does not need it

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with status {proc.returncode} before answering: "
                            f"see its output above")
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise UserError(f"mlflow server did not answer {uri}/health within {timeout:.0f} s: see its output")


def ensure_user(uri: str, admin: tuple[str, str], username: str, password: str) -> str:
    """Create `username` with `password`, or set that password if it exists. Returns "created" or
    "updated". Idempotent; uses the auth REST API as the admin."""
    import requests  # heavy: ~0.3 s, `pagating server --help` does not need it

    api = f"{uri}/api/2.0/mlflow/users"
    body = {"username": username, "password": password}
    r = requests.post(f"{api}/create", json=body, auth=admin, timeout=30)
    if r.status_code == 401:
        raise UserError(_wrong_admin_message(admin[0]))
    if r.ok:
        return "created"
    if r.status_code == 400 and "RESOURCE_ALREADY_EXISTS" in r.text:
        # An admin sets another user's password without the current one.
        r = requests.patch(f"{api}/update-password", json=body, auth=admin, timeout=30)
        if r.ok:
            return "updated"
    raise UserError(f"could not create MLflow user {username!r}: HTTP {r.status_code} "
                    f"{r.text[:200].strip()}")


def stop_server(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop the server and its workers (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def start_server(args_or_kwargs: argparse.Namespace | dict[str, Any] | None = None, wait: bool = False, *,
                 stdout=None, stderr=None, timeout: float = 120.0) -> subprocess.Popen:
    """Start the basic-auth tracking server and create/update the GPU user.

    Returns the Popen once /health answers and the GPU user is set (attributes `uri`,
    `auth_config_path`). wait=True: stay in the foreground until the server exits (Ctrl-C and
    SIGTERM stop it) and return the finished Popen. stdout/stderr: where the server's output goes
    (default: this process's).
    """
    opts = _options(args_or_kwargs)
    admin_user, admin_password, gpu_password = _validate(opts)

    ini = write_auth_config(opts, admin_user)  # first, so a new auth dir gets mode 0700
    backend_db = _sqlite_path(opts["backend_store_uri"])
    if backend_db is not None:
        backend_db.parent.mkdir(parents=True, exist_ok=True)

    env = {k: v for k, v in os.environ.items() if k != GPU_PASSWORD_ENV}  # the server never needs it
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    env[SECRET_KEY_ENV] = _flask_secret_key(ini.parent)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI job runner: 3 processes we never use
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
           "--host", opts["host"], "--port", str(opts["port"]),
           "--backend-store-uri", opts["backend_store_uri"],
           "--artifacts-destination", str(opts["artifacts_destination"]),
           "--workers", str(opts["workers"])]
    if opts["allowed_hosts"]:
        cmd += ["--allowed-hosts", opts["allowed_hosts"]]
    # Own process group: stop_server() reaches the uvicorn workers too.
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    uri = f"http://{_connect_host(opts['host'])}:{opts['port']}"
    proc.uri, proc.auth_config_path = uri, ini  # type: ignore[attr-defined]

    previous_term = None
    if wait and _in_main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt
        previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        _wait_healthy(proc, uri, timeout)
        action = ensure_user(uri, (admin_user, admin_password), opts["gpu_user"], gpu_password)
        auth_db = _sqlite_path(_auth_db_uri(opts))
        if auth_db is not None and auth_db.exists():
            os.chmod(auth_db, 0o600)  # password hashes: owner only
        print(f"pagating server: MLflow tracking server at {uri} (basic auth; admin {admin_user!r}, "
              f"GPU user {opts['gpu_user']!r} {action}; auth config {ini})"
              f"{'; Ctrl-C stops it' if wait else ''}", file=sys.stderr, flush=True)
        if opts["host"] not in ("127.0.0.1", "localhost", "::1"):
            print(f"pagating server: warning: listening on {opts['host']} over plain HTTP; passwords "
                  f"cross the network in clear unless an HTTPS proxy is in front (docs/server.md)",
                  file=sys.stderr, flush=True)
        if wait:
            proc.wait()
    except BaseException:
        stop_server(proc)
        raise
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return proc


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
