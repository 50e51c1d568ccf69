"""Checkpoints that are whole or ignored: a marker with every file's size and sha256 (written last), the
background uploader into two slots + a pointer in MLflow, and the verified download to resume from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from pagating.config import UserError
from pagating.disk import LOW_FREE, disk_full, free_bytes, mib
from pagating.tracking.claim import ClaimLost
from pagating.tracking.spool import MetricSpool
from pagating.tracking.store import Backoff, client

CKPT_ROOT = "checkpoints"  # slot-0/, slot-1/ and the pointer latest.json
CKPT_POINTER = "latest.json"
CKPT_MARKER = "pagating_checkpoint.json"  # files' sizes + sha256, written last: without it a checkpoint is incomplete


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
        backoff = Backoff()
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
