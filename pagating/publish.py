"""The final model as the run's MLflow model, and `pagating sync`: what a run could not send in an outage
(metric spool, last checkpoint, model/, status), pushed later.

Above pagating.tracking on purpose: logging the model loads it (pagating.model), and tracking/ imports
nothing above itself; pagating.run hands `log_model` to tracking.finish.finish_run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pagating import names
from pagating.config import UserError
from pagating.tracking import store
from pagating.tracking.checkpoints import CheckpointUploader, checkpoint_step
from pagating.tracking.finish import PENDING_FILE, STAGING_DIR, staged_checkpoints
from pagating.tracking.provenance import read_run_file
from pagating.tracking.spool import SPOOL_GLOB, MetricSpool, spool_path


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
    # heavy: torch, transformers and mlflow take ~8 s; `pagating sync` without a model/ to log never needs them
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pagating.model import load_model  # imports torch at its top: lazy for the same reason

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
    with store.fluent_scope(uri, store.client(uri).get_run(run_id).info.experiment_id):
        info = mlflow.pytorch.log_model(model, name=names.MODEL_ARTIFACT, run_id=run_id, step=step, signature=signature,
                                        code_paths=[str(Path(__file__).resolve().parent)], extra_files=extra,
                                        pip_requirements=reqs, serialization_format="pickle")
    return info.model_id


# `pagating sync` ------------------------------------------------------------------------------

def sync(output_dir: str | Path, timeout_s: float = 120.0) -> int:
    """Push what runs under output_dir could not send (metric spools, the last checkpoint, model/) and
    finish them; returns how many runs still have something local."""
    left = 0
    for run_id, run_dir in _runs_under(output_dir).items():
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (read_run_file(run_dir) or {}).get("tracking_uri")
        if not uri:
            raise UserError("set MLFLOW_TRACKING_URI to the server the run logged to")
        store.check_no_credentials(uri)  # log_model's own "View run ... at:" line would print it
        store.check_server(uri)
        spool = MetricSpool(spool_path(run_dir, run_id), run_id, uri)
        remaining = spool.drain(timeout_s)
        done = []
        pending_path = run_dir / PENDING_FILE
        if pending_path.exists() and not remaining:
            pending = json.loads(pending_path.read_text())
            mlf = store.client(uri)
            try:
                _finish_pending(mlf, uri, run_id, run_dir, pending, done)
            except Exception as exc:
                spool.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        spool.close()
        unfinished = remaining or pending_path.exists()
        print(f"{run_dir}: run {run_id}: {spool.sent()} sent, {remaining} left"
              + (f"; {', '.join(done)}" if done else "")
              + (f" ({spool.last_error})" if unfinished and spool.last_error else ""))
        left += bool(unfinished)
    return left


def _runs_under(output_dir: str | Path) -> dict[str, Path]:
    """run id -> run dir of every run under output_dir with a metric spool or a PENDING_FILE."""
    spools = sorted(Path(output_dir).rglob(SPOOL_GLOB))
    pendings = sorted(Path(output_dir).rglob(PENDING_FILE))
    if not spools and not pendings:
        raise UserError(f"no metric spool ({SPOOL_GLOB}) under {output_dir}: give the run's output directory")
    runs: dict[str, Path] = {}
    for path in spools:
        runs.setdefault(path.name.split(".")[1], path.parent)
    for path in pendings:
        runs.setdefault(json.loads(path.read_text())["run_id"], path.parent)
    return runs


def _finish_pending(mlf, uri: str, run_id: str, run_dir: Path, pending: dict, done: list[str]) -> None:
    """What finish_run left in PENDING_FILE (`pending`) once the metrics are in: the last staged checkpoint,
    model/, the status; each step done is appended to `done` (said even when a later one fails)."""
    for staged in staged_checkpoints(run_dir)[-1:]:
        uploader = CheckpointUploader(run_id, uri, run_dir / STAGING_DIR)
        uploader.upload_now(staged)
        uploader.close()
        shutil.rmtree(staged, ignore_errors=True)
        done.append(f"checkpoint step {checkpoint_step(staged)}")
    if pending.get("model"):
        log_model(uri, run_id, run_dir / pending["model"], int(pending.get("step", 0)))
        done.append("model")
    mlf.set_terminated(run_id, pending["status"])
    (run_dir / PENDING_FILE).unlink()
    done.append(f"run {pending['status']}")


def register_cli(sub) -> None:
    p = sub.add_parser("sync", help="push what a run could not send in an outage (metrics, last checkpoint, "
                                    "model/) and finish it")
    p.add_argument("output_dir", help="the run's output directory (or a parent of several)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to keep trying per run")
    p.set_defaults(func=lambda a: 1 if sync(a.output_dir, a.timeout) else 0)

