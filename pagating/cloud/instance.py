"""What a rented instance runs around the sweep (called by scripts/onstart.sh, any provider):

    python -m pagating.cloud.instance dvc-extra     the pip extra of the DVC plugin .dvc/config's remote needs
    python -m pagating.cloud.instance check-cuda    CUDA or nothing: one line, exit 1 when the GPUs are not usable
    python -m pagating.cloud.instance report STATE  tag pagating.instance.<id> on the sweep's parent run
    python -m pagating.cloud.instance upload-log    the onstart log -> logs/instance-<id>.log on the parent run
    python -m pagating.cloud.instance settle        the parent run's status as it now is (FINISHED only when
                                                    the whole grid is; RUNNING while another instance works;
                                                    else FAILED)

Importable before the project is installed (the standard library and PyYAML at import time; MLflow and
torch only inside the commands that need them), so a failed install can still be reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pagating import names
from pagating.cloud.sweep_run import (
    REPORT_TAG,
    grid_state,
    instance_reports,
    instances_working,
    log_artifact_name,
    settle_parent,
)
from pagating.config import experiment_name, load_config
from pagating.data.dvc import dvc_default_remote, dvc_extra
from pagating.runtime import check_cuda
from pagating.tracking.store import check_no_credentials, client, mask_uri, retry

# The variables a provider's host sets to the instance's id (Vast: CONTAINER_ID); a provider whose host
# names it otherwise adds its variable here.
INSTANCE_ID_VARS = ("CONTAINER_ID",)


def instance_id() -> str:
    return next((os.environ[v] for v in INSTANCE_ID_VARS if os.environ.get(v)), "local")


# ---- reporting to the parent run --------------------------------------------------------------


def _uri() -> str | None:
    """MLFLOW_TRACKING_URI, refused with user:password@ in it (MLflow prints the URI in its logs)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_no_credentials(uri)
    return uri


def _client():
    return client(_uri())


def report(state: str) -> None:
    run_id = os.environ.get("PAGATING_PARENT_RUN_ID")
    if run_id:
        # A shared server answers a transient 5xx or reset now and then (several instances report at once).
        mlf = _client()  # a URI refused is not worth retrying
        retry(lambda: mlf.set_tag(run_id, REPORT_TAG + instance_id(), state[:4000]), "report", attempts=4)


def upload_log(path: str | None = None) -> str:
    """Upload the onstart log to the parent run; returns what happened (one line)."""
    run_id = os.environ.get("PAGATING_PARENT_RUN_ID")
    path = path or os.environ.get("PAGATING_LOG")
    if not run_id:
        return "log not uploaded: no PAGATING_PARENT_RUN_ID"
    if not path or not Path(path).is_file():
        return f"log not uploaded: no log file {path!r}"
    # PAGATING_LOG_NAME: a job's own name (`pagating sky`: logs/<job>.log); else logs/instance-<id>.log
    name = Path(os.environ.get("PAGATING_LOG_NAME") or log_artifact_name(instance_id())).name
    mlf = _client()
    with tempfile.TemporaryDirectory() as tmp:  # a snapshot: the live file keeps growing
        shutil.copyfile(path, Path(tmp) / name)
        retry(lambda: mlf.log_artifact(run_id, str(Path(tmp) / name), names.LOG_ARTIFACT_DIR), "log upload",
              attempts=4)
    return f"log uploaded to run {run_id} as {names.LOG_ARTIFACT_DIR}/{name}"


def settle() -> str:
    """As this instance ends: set the parent to the truth (`mlflow run` marks the run it was
    given FINISHED when its command exits, whatever the other shards are doing)."""
    run_id, uri = os.environ.get("PAGATING_PARENT_RUN_ID"), _uri()
    sweep_id = os.environ.get("PAGATING_SWEEP_ID")
    if not (run_id and uri and sweep_id):
        return "parent not settled: no PAGATING_PARENT_RUN_ID / MLFLOW_TRACKING_URI / PAGATING_SWEEP_ID"
    state = grid_state(uri, sweep_id, load_config(os.environ.get("PAGATING_PROFILE")))
    reports = instance_reports(uri, run_id, include_created=True)
    me = int(instance_id()) if instance_id().isdigit() else -1  # ending now: not working, whatever it said
    status = settle_parent(uri, run_id, state, instances_working(reports, exclude={me}))
    return f"parent run {run_id}: {status}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pagating.cloud.instance", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("dvc-extra")
    sub.add_parser("check-cuda")
    sub.add_parser("report").add_argument("state")
    sub.add_parser("upload-log").add_argument("--quiet", action="store_true")
    sub.add_parser("settle")
    sub.add_parser("experiment-name").add_argument("profile")
    args = p.parse_args(argv)
    if args.cmd == "experiment-name":  # onstart.sh asks rather than rebuilding the name
        # The name needs only the profile's name and the shared tracking section; the sweep checks the profile.
        print(experiment_name({**load_config(), "profile": args.profile}))
        return 0
    if args.cmd == "dvc-extra":
        remote = dvc_default_remote(Path.cwd())
        try:
            print(dvc_extra(remote[1] if remote else None))
        except ValueError as exc:
            print(exc)
            return 1
        return 0
    if args.cmd == "check-cuda":
        ok, line = check_cuda()
        print(line)
        return 0 if ok else 1
    try:
        if args.cmd == "report":
            report(args.state)
            return 0
        line = settle() if args.cmd == "settle" else upload_log()
    except Exception as exc:  # the caller goes on (or stops) either way: say why in one line
        print(f"pagating-instance: {args.cmd} to {mask_uri(os.environ.get('MLFLOW_TRACKING_URI', '?'))} "
              f"failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return 1
    if not getattr(args, "quiet", False):
        print(f"pagating-instance: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
