"""The end of a run: last metrics, last checkpoint, the final model, then the run's status, waiting for the
server within a drain budget; what does not arrive in time stays in the run dir (PENDING_FILE, staged
checkpoints) for `pagating sync` (pagating.publish)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pagating.tracking.checkpoints import CKPT_MARKER, CheckpointUploader, checkpoint_step
from pagating.tracking.claim import ClaimLost
from pagating.tracking.spool import MetricSpool
from pagating.tracking.store import Backoff

PENDING_FILE = "pagating_pending.json"  # what a run could not upload before its drain budget ran out
STAGING_DIR = ".upload-staging"


def finish_run(mlf, run_id: str, run_dir: str | Path, status: str, spool: MetricSpool | None,
               uploader: CheckpointUploader | None, model_dir: str | Path | None, model_step: int,
               budget_s: float, backoff_cap_s: float = 30.0, fence=None, *,
               log_model: Callable[[str, str, Path | str, int], str]) -> tuple[list[str], str | None]:
    """The end of a run: last metrics, last checkpoint, the model (log_model: the metrics at model_step
    are in MLflow first, so they link to it), then the run's status, in that order, retried while the
    server is away for up to budget_s. Returns (what is still only local, empty when everything arrived;
    the model id); PENDING_FILE in run_dir then tells `pagating sync` what to finish. `fence` (Claim.check)
    runs before each step: ClaimLost stops it at once, with nothing more written into the run.
    `log_model(uri, run_id, model_dir, step) -> model id` is the caller's (pagating.publish.log_model):
    logging the model loads it, and the model lives above this package."""
    fence = fence or (lambda: None)
    deadline = time.time() + budget_s
    backoff = Backoff(first=1.0, cap=backoff_cap_s)
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
    model_left = None if model_done else model_dir
    return _leave_pending(run_id, run_dir, status, spool, model_left, model_step), model_id


def _leave_pending(run_id: str, run_dir: str | Path, status: str, spool: MetricSpool | None,
                   model_dir: str | Path | None, model_step: int) -> list[str]:
    """The drain budget ran out: PENDING_FILE says what `pagating sync` still has to do; returns what is
    still only local, in words (model_dir: the model not logged yet, else None)."""
    local = []
    staged = staged_checkpoints(run_dir)
    if staged:
        local.append(f"checkpoint step {checkpoint_step(staged[-1])}")
    if model_dir is not None:
        local.append("model/")
    if spool is not None and spool.pending():
        local.append(f"{spool.pending()} metric lines")
    (Path(run_dir) / PENDING_FILE).write_text(json.dumps(
        {"run_id": run_id, "status": status, "model": None if model_dir is None else str(Path(model_dir).name),
         "step": model_step}))
    return local or ["the run's final status"]


def staged_checkpoints(run_dir: str | Path) -> list[Path]:
    """Whole checkpoints in run_dir's staging folder that were not uploaded yet, oldest first."""
    return sorted((p for p in (Path(run_dir) / STAGING_DIR).glob("step-*") if (p / CKPT_MARKER).exists()),
                  key=checkpoint_step)
