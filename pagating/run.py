"""The life of one tracked training run, in one place: claim the config, find what to resume, open or
resume its MLflow run, keep the metric spool, checkpoint uploader, GPU sampler and claim heartbeat going
while the Trainer trains, then drain the final uploads and close.

train.py does the training inside `with TrainingRun(...) as run:`; this module does the bookkeeping
around it (the MLflow parts themselves are in pagating.tracking's modules, the final model's in
pagating.publish). Only rank 0 tracks: on a DDP worker every step here is a no-op, and the worker follows
the checkpoint its launcher resolved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pagating import names, publish
from pagating.config import UserError
from pagating.data.dvc import data_md5
from pagating.disk import disk_full, free_bytes, mib
from pagating.gpu import GpuSampler
from pagating.tracking import callback, checkpoints, claim, finish, provenance, spool, store

RESUME_WORDS = ("none", "", None, "auto", "if-any")  # every other --resume value is a checkpoint path


# Set by the sweep's worker (pagating.sweep_worker.Ends, `submit(key, end)`): a FINISHED run's end (final
# uploads, MLflow model, status, claim release) drains there in a thread while the next config starts. None:
# every run ends in the foreground, as `pagating train` on its own must (the process exits right after).
BACKGROUND = None


@dataclass
class Job:
    """One config's checked settings: where its run goes and what it trains on (train.check makes it)."""

    cfg: dict
    rank: int
    world: int
    meta: dict
    uri: str
    h: str  # pagating.config_hash
    run_dir: Path
    device: str
    precision: str
    n_threads: int
    mlf: Any
    exp_id: str
    parent_run_id: str | None


class TrainingRun:
    """`with TrainingRun(job, ...) as run:` claims the config (rank 0) and finds what to resume; when
    `run.outcome` is set there is nothing to train (FINISHED already, claimed by a live process, or only
    the final uploads were left and are done). Else the caller builds the model, calls `open`, trains,
    and on leaving the block the run is finished: FINISHED when the block ended normally, KILLED on
    Ctrl-C, FAILED on any other error; a full disk becomes one line saying what to do."""

    def __init__(self, job: Job, *, name: str, resume: str = "none", if_claimed: str = "exit",
                 sweep_id: str | None = None, extra_tags: dict[str, str] | None = None):
        self.job, self.name, self.resume, self.if_claimed = job, name, resume, if_claimed
        self.sweep_id, self.extra_tags = sweep_id, extra_tags
        self.tracks = job.rank == 0
        self.mlf, self.run_dir, self.tracking_cfg = job.mlf, job.run_dir, job.cfg["tracking"]
        self.claim: claim.Claim | None = None
        self._runs: list = []  # this config's MLflow runs, read once the claim is held
        self.outcome: dict[str, Any] | None = None
        self.ckpt: Path | None = None
        self.run_id: str | None = None
        self.spool: spool.MetricSpool | None = None
        self.uploader: checkpoints.CheckpointUploader | None = None
        self.sampler = None
        self.compile_watch = None  # pagating.runtime.CompileWatch when torch.compile is on: closed first
        self.model_dir: Path | None = None  # set by the caller once model/ is saved
        self.model_step = 0
        self.info: dict[str, Any] = {}  # the run file's content: run id, experiment, config hash, server
        self.opened = False
        self.made_run = False  # this process created or reopened the MLflow run: it must end it
        self.n_params = 0
        self.result: dict[str, Any] = {}
        self.status = "FAILED"
        self._term: tuple | None = None  # the SIGTERM handler to put back (term_as_interrupt)

    # Entering: the claim, then what to resume ----------------------------------------------------

    def __enter__(self) -> TrainingRun:
        self._term = term_as_interrupt()
        try:  # the claim too: an error right after acquire must not leave it held and beating
            if self.tracks:
                self.outcome = self._claim()
            if self.outcome is None:
                self._find_resume()
        except BaseException:
            self._release()
            raise
        return self

    def _claim(self) -> dict[str, Any] | None:
        """One process per config: claimed in MLflow before anything is trained or written."""
        job, run_dir = self.job, str(self.run_dir)
        runs = store.runs_with_hash(self.mlf, job.exp_id, job.h)
        done = finished_run(runs, job.h)
        if done is not None:
            return done | {"run_dir": run_dir}
        if self.resume == "auto" and not unfinished_runs(runs) and not any(self.run_dir.glob("checkpoint-*")):
            raise UserError(f"nothing to resume: no checkpoint in {run_dir} and no unfinished MLflow run of this "
                            f"config (hash {job.h}); run without --resume to start fresh")
        mine = claim.Claim.for_config(self.mlf, job.exp_id, job.h, self.tracking_cfg)
        held = mine.acquire()
        if held is not None:  # not ours: nothing to release
            if self.if_claimed == "skip":
                return {"status": "claimed", "config_hash": job.h, "run_id": held.get("run_id"), "run_dir": run_dir}
            raise UserError(f"this config (hash {job.h}) is already being trained by "
                            f"{claim.describe_claim(held, mine.timeout_s)}: wait for it, or stop that process")
        self.claim = mine  # set before anything else can fail: __enter__ releases it then
        mine.start_heartbeat()
        # Read again now that the claim is ours (one may have finished meanwhile); nothing changes them after.
        self._runs = store.runs_with_hash(self.mlf, job.exp_id, job.h)
        done = finished_run(self._runs, job.h)
        return done | {"run_dir": run_dir} if done is not None else None

    def _find_resume(self) -> None:
        job = self.job
        if self.tracks:
            self.ckpt, self.run_id = find_resume(job.cfg, self.resume, self.run_dir, self.mlf, job.h, self._runs)
        else:  # a DDP worker follows what the launcher resolved (rank 0 may be creating the run right now)
            self.ckpt = Path(self.resume) if self.resume not in RESUME_WORDS else None
        if self.tracks and self.run_id and not self.ckpt:
            print(f"pagating: continuing interrupted run {self.run_id} from step 0 (no whole checkpoint of it)",
                  file=sys.stderr)
        if self.tracks and self.run_id and (self.run_dir / finish.PENDING_FILE).exists():
            # Trained to the end, but the server was away for the final uploads: finish those only.
            left = publish.sync(self.run_dir, timeout_s=self.drain_budget)
            self.outcome = {"run_id": self.run_id, "run_dir": str(self.run_dir), "config_hash": job.h,
                            "status": "FINISHED" if not left else "KILLED", "synced": True}

    @property
    def drain_budget(self) -> float:
        return float(self.tracking_cfg["drain_timeout_s"])

    # Opening: the MLflow run and the threads that feed it ----------------------------------------

    def open(self, *, params: dict[str, Any], n_params: int, gpu: str, usd_per_hour: float | None) -> None:
        """Create the MLflow run (tags, params, dataset inputs), or continue the interrupted one under
        its id; then the run file, the claim's heartbeat, spool, uploader and GPU sampler."""
        job = self.job
        self.result = {"run_id": self.run_id, "run_dir": str(self.run_dir), "config_hash": job.h}
        self.opened = True
        if not self.tracks:
            return
        self.n_params = n_params
        self.claim.renew()
        skip = self._continue() if self.run_id else self._create(params, n_params, gpu, usd_per_hour)
        self.result["run_id"] = self.run_id
        self.info = {"run_id": self.run_id, "experiment_id": job.exp_id, "config_hash": job.h,
                     "tracking_uri": store.mask_uri(job.uri)}
        provenance.write_run_file(self.run_dir, self.info)
        self.claim.attach(self.run_id)
        self.spool = spool.MetricSpool(spool.spool_path(self.run_dir, self.run_id), self.run_id, job.uri,
                                       skip_until=skip, fence=self.claim.check).start()
        self.uploader = checkpoints.CheckpointUploader(self.run_id, job.uri, self.run_dir / finish.STAGING_DIR,
                                                       self.spool, fence=self.claim.check)
        # NVML sees the GPUs of CUDA_VISIBLE_DEVICES; without any it says so once and logs no system/gpu_* metric.
        self.sampler = GpuSampler()
        self.sampler.start()

    def _continue(self) -> dict[str, int]:
        """The interrupted run, RUNNING again; returns the last step logged per metric."""
        self.mlf.update_run(self.run_id, status="RUNNING")
        self.made_run = True
        # Lines the interrupted process spooled but never sent go first; only then is "already
        # logged" known, and the resumed run skips exactly those steps.
        leftover = spool.MetricSpool(spool.spool_path(self.run_dir, self.run_id), self.run_id, self.job.uri,
                                     fence=self.claim.check)  # fenced like every other write into the run
        leftover.drain(120.0)  # returns at once when nothing is pending
        leftover.close()
        self.claim.check()  # drain stops quietly when the claim is lost: that ends the run here
        return store.last_steps(self.mlf, self.run_id)

    def _create(self, params: dict[str, Any], n_params: int, gpu: str, usd_per_hour: float | None) -> dict:
        from mlflow.entities import Param  # heavy: ~2 s; a DDP worker or a finished config never gets here

        job, cfg = self.job, self.job.cfg
        md5 = data_md5()
        run = self.mlf.create_run(job.exp_id, run_name=self.name, tags=self._tags(n_params, gpu, usd_per_hour, md5))
        self.run_id, self.made_run = run.info.run_id, True
        self.claim.check()  # creating took long enough for the lease to lapse: no more writes then
        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.mlf.log_batch(self.run_id, params=items[i:i + 100])
        self.mlf.log_text(self.run_id, yaml.safe_dump({k: v for k, v in cfg.items()}, sort_keys=False),
                          "params.yaml")
        provenance.log_datasets(self.mlf, self.run_id, cfg["profile"], md5 or meta_digest(job.meta),
                                provenance.dvc_data_source(path=cfg["data"]["raw_dir"]))
        return {}

    def _tags(self, n_params: int, gpu: str, usd_per_hour: float | None, md5: str) -> dict[str, str]:
        cfg, commit = self.job.cfg, provenance.git_commit()
        tags = {names.CONFIG_HASH: self.job.h, "git.commit": commit,
                "dvc.data_md5": md5, names.GPU_NAME: gpu, "host": claim.host_tag(),
                "pagating.lock_sha256": provenance.lock_sha256(),
                names.RUN_NAME: self.name, **provenance.source_tags("train", commit),
                names.NOTE: provenance.run_note(cfg, provenance.reproduce_command(cfg, commit), n_params),
                **(self.extra_tags or {})}
        if self.sweep_id:
            tags[names.SWEEP_ID] = self.sweep_id
        if self.job.parent_run_id:
            tags[names.PARENT_RUN_ID] = self.job.parent_run_id
        if usd_per_hour:
            tags[names.USD_PER_HOUR] = f"{usd_per_hour:g}"
        if os.environ.get("CUDA_VISIBLE_DEVICES"):  # which GPU(s) of the box: the sweep's slot
            tags["gpu.visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        return tags

    def callbacks(self, **measures) -> list:
        """The Trainer callback that feeds this run (rank 0; none on a DDP worker). `measures`: the
        rest of TrackingCallback's arguments (tokens per step, FLOPs, peak, model, α logging, ...)."""
        if not self.tracks:
            return []
        return [callback.TrackingCallback(self.spool, self.uploader, self.info, sampler=self.sampler,
                                          compile_watch=self.compile_watch, claim=self.claim, **measures)]

    def log_text(self, text: str, name: str) -> None:
        """A small artifact, uploaded now (retried while the server is away; never once the claim is lost)."""
        def send():
            if self.claim is not None:
                self.claim.check()
            self.mlf.log_text(self.run_id, text, name)

        store.retry(send, f"upload {name}", transient=lambda exc: not isinstance(exc, claim.ClaimLost))

    # Leaving: drain, finish, close --------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            self.status = "KILLED"
        lost = isinstance(exc, claim.ClaimLost) or bool(self.claim is not None and self.claim.lost)
        full = None
        if exc is not None and not lost and self.tracks and disk_full(exc, self.run_dir):
            full = UserError(self._disk_full_line(exc, remove_partial_checkpoints(self.run_dir)))
        if BACKGROUND is not None and exc is None and not lost and self.spool is not None:
            # A FINISHED run in a process with more to train (the sweep's worker): the same end, in its
            # thread, the claim released there once the end is done; the result says "finishing".
            self._restore_term()
            self.result.update(status="FINISHED", finishing=True)
            BACKGROUND.submit(self.run_id, lambda: self._end(None, None, lost=False))
            return False
        self._end(exc, full, lost=lost)
        if lost and not isinstance(exc, claim.ClaimLost):
            raise claim.ClaimLost(self.claim.lost) from None
        if full is not None:
            raise full from None
        return False

    def _end(self, exc: BaseException | None, full: UserError | None, *, lost: bool) -> None:
        """Drain and close the run (or, its claim lost, stop feeding it), then release the claim."""
        try:
            if lost:
                self._stop_quietly()
            else:
                self._close(exc, full)
        except claim.ClaimLost:  # found out while finishing: nothing more is written
            self._stop_quietly()
            raise
        finally:
            self._release()

    def _disk_full_line(self, exc: BaseException, removed: list[Path]) -> str:
        where = Path(getattr(exc, "filename", None) or (removed[-1] if removed else self.run_dir)).absolute()
        need = CHECKPOINT_BYTES_PER_PARAM * self.n_params
        cut = " (cut off: removed)" if removed else ""
        return (f"disk full writing {where}{cut}: one checkpoint of this model needs about {mib(need)} in "
                f"{Path(self.run_dir).absolute()}, {mib(free_bytes(self.run_dir))} free; free space there (or set "
                f"train.output_dir elsewhere) and resume with --resume auto")

    def _stop_quietly(self) -> None:
        """The claim is lost: stop every thread that feeds the run, send nothing, end nothing."""
        for part in (self.compile_watch, self.sampler):
            if part is not None:
                (part.close if hasattr(part, "close") else part.stop)()
        if self.spool is not None:
            self.spool.close()
        if self.uploader is not None:
            self.uploader.close()
        self.result["status"] = "lost"

    def _close(self, exc: BaseException | None = None, full: UserError | None = None) -> None:
        if self.compile_watch is not None:
            self.compile_watch.close()
        if self.sampler is not None:
            self.sampler.stop()
        if self.status == "FAILED" and self.made_run:
            self._tag_error(exc, full)
        if self.spool is None:  # not opened (nothing to train, a DDP worker), or opening failed midway
            if self.made_run:  # never left RUNNING without a live process
                with contextlib.suppress(Exception):
                    self.mlf.set_terminated(self.run_id, self.status)
            self.result["status"] = self.status
            return
        # Last metrics, last checkpoint, model/, status: waiting for the server as long as the drain
        # budget allows; past it everything stays in run_dir for `pagating sync`.
        finished = self.status == "FINISHED"
        budget = self.drain_budget if finished else 5.0
        local, model_id = finish.finish_run(
            self.mlf, self.run_id, self.run_dir, self.status, self.spool, self.uploader,
            self.model_dir if finished else None, self.model_step if finished else 0, budget,
            float(self.tracking_cfg["retry_max_s"]), fence=self.claim.check if self.claim else None,
            log_model=publish.log_model)
        if model_id:
            self.result["model_id"] = model_id
        self.spool.close()
        self.uploader.close()
        if local:
            self.result["pending_sync"] = local
            print(f"pagating: MLflow did not answer within {budget:.0f}s: {', '.join(local)} of run {self.run_id} "
                  f"still only in {self.run_dir}; `pagating sync {self.run_dir}` will push them and finish the run",
                  file=sys.stderr)
        self.result["status"] = self.status

    def _tag_error(self, exc: BaseException | None, full: UserError | None = None) -> None:
        """`pagating.error`: why the run FAILED, in one line (a secret-free exception summary)."""
        text = f"{type(exc).__name__}: {exc}" if exc is not None else "failed"
        if full is not None:
            text = f"{full} ({text})"
        text = " ".join(text.split())[:500]
        with contextlib.suppress(Exception):
            if self.claim is not None:
                self.claim.check()
            self.mlf.set_tag(self.run_id, names.ERROR, text)

    def _release(self) -> None:
        try:
            if self.claim is not None:
                self.claim.release()
        finally:
            self._restore_term()

    def _restore_term(self) -> None:
        if self._term is not None:
            signal.signal(signal.SIGTERM, self._term[0])
            self._term = None


def term_as_interrupt() -> tuple | None:
    """SIGTERM (`kill`, the Vast watchdog, torchrun stopping its workers) takes Ctrl-C's path while a run
    is open: KeyboardInterrupt, so the run ends KILLED and its claim is released instead of the process
    vanishing with the run RUNNING. Returns (the previous handler,) to put back; None off the main thread,
    where no handler can be set."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    return (signal.SIG_DFL if previous is None else previous,)


def meta_digest(meta: dict) -> str:
    """Without data.dvc: a digest of the raw files' md5s that prepare recorded."""
    return hashlib.md5(json.dumps(meta.get("source_md5", {}), sort_keys=True).encode()).hexdigest()


def newest_checkpoint(run_dir: Path, run_id: str | None = None) -> Path | None:
    """The newest whole local checkpoint (its marker's sizes and hashes match) of run_id, if given;
    a cut-off or corrupt one is named in one line and skipped."""
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()),
                   key=checkpoints.checkpoint_step, reverse=True)
    for ckpt in ckpts:
        info = provenance.read_run_file(ckpt) or {}
        if run_id and info.get("run_id") not in (None, run_id):
            continue  # another run's leftovers in a reused folder
        problem = checkpoints.verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        print(f"pagating: skipping checkpoint {ckpt}: {problem}", file=sys.stderr)
    return None


def unfinished_runs(runs: list) -> list:
    """Of a config's runs (store.runs_with_hash), those not FINISHED."""
    return [r for r in runs if r.info.status != "FINISHED"]


def find_resume(cfg: dict, resume: str, run_dir: Path, mlf, h: str, runs: list) -> tuple[Path | None, str | None]:
    """(checkpoint dir, MLflow run id) to continue, or (None, None) for a fresh run; `runs`: the config's
    runs (store.runs_with_hash).

    An unfinished run of this config (its claim is ours by now) is always continued, whatever
    `resume` says: one run per config. `auto` insists on a checkpoint; `if-any`/`none` start over
    under the same run id when there is none (steps already logged are skipped)."""
    unfinished = unfinished_runs(runs)
    if resume not in RESUME_WORDS:
        ckpt = Path(resume)
        if not (ckpt / "trainer_state.json").exists():
            raise UserError(f"{ckpt} is not a Trainer checkpoint (no trainer_state.json)")
        if (ckpt / checkpoints.CKPT_MARKER).exists() and (problem := checkpoints.verify_checkpoint(ckpt)):
            raise UserError(f"checkpoint {ckpt} is corrupt ({problem}): pick another one")
        info = provenance.read_run_file(ckpt) or provenance.read_run_file(run_dir) or {}
        return ckpt, info.get("run_id")
    if resume in ("none", "", None) and not unfinished:
        return None, None
    for run in unfinished:  # newest first: local copy, else the MLflow one
        rid = run.info.run_id
        ckpt = newest_checkpoint(run_dir, rid) or checkpoints.download_checkpoint(mlf, rid, run_dir)
        if ckpt is not None:
            return ckpt, rid
    if resume == "auto":
        ckpt = newest_checkpoint(run_dir)
        if ckpt is not None:  # a local checkpoint whose run is not in this experiment / server
            return ckpt, (provenance.read_run_file(ckpt) or {}).get("run_id")
        raise UserError(f"nothing to resume: no checkpoint in {run_dir} and no unfinished MLflow run of this "
                        f"config (hash {h}) uploaded one; run without --resume to start fresh")
    return None, (unfinished[0].info.run_id if unfinished else None)


def finished_run(runs: list, h: str) -> dict | None:
    """A FINISHED one of a config's runs (store.runs_with_hash): the result to report instead of training
    it again."""
    done = [r for r in runs if r.info.status == "FINISHED"]
    if not done:
        return None
    run = done[0]
    print(f"pagating: this config (hash {h}) already FINISHED as run {run.info.run_id}: nothing to do",
          file=sys.stderr)
    return {"run_id": run.info.run_id, "config_hash": h, "status": "FINISHED", "already_finished": True,
            "final_eval_loss": run.data.metrics.get(names.FINAL_EVAL_LOSS)}


# Bytes per parameter of one checkpoint: fp32 weights (4) + Adam's two moments (8).
CHECKPOINT_BYTES_PER_PARAM = 12


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders cut off by a full disk (no marker: never resumed from) go, freeing the space."""
    gone = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and not (p / checkpoints.CKPT_MARKER).exists()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
