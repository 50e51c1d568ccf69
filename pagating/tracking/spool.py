"""A metric spool that survives server outages: every metric goes first to an append-only file in the
run's output dir and a flusher thread sends it with `log_batch`, retrying with backoff until the server
answers; training only ever appends to a local file.

Why not MLflow's own pieces: its async logging drops a batch whose request fails, and its system-metrics
thread stops at the first error.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

from pagating.tracking.claim import ClaimLost
from pagating.tracking.store import Backoff, client

SPOOL_GLOB = "mlflow_spool.*.jsonl"  # one spool per run id: a run dir reused by a new run never mixes them


def spool_path(run_dir: str | Path, run_id: str) -> Path:
    return Path(run_dir) / f"mlflow_spool.{run_id}.jsonl"


class MetricSpool:
    """Append-only local metric log + a background flusher that sends it to MLflow with log_batch.

    The file holds one JSON object per line; `<spool>.sent` holds how many lines reached the
    server, so a later process (or `pagating sync`) continues exactly where this one stopped.
    """

    BATCH = 500  # MLflow accepts up to 1000 metrics per log_batch
    INTERVAL_S = 1.0  # the flusher's wait between sends

    def __init__(self, path: str | Path, run_id: str, uri: str, skip_until: dict[str, int] | None = None,
                 fence=None):
        self.fence = fence  # Claim.check: called before every send; ClaimLost ends the sending for good
        self.path = Path(path)
        self.sent_path = self.path.with_suffix(".sent")
        self.run_id, self.uri = run_id, uri
        self.skip_until = dict(skip_until or {})
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
        backoff = Backoff()
        while not self._stop.is_set():
            self._wake.wait(self.INTERVAL_S)
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
        from mlflow.entities import Metric  # heavy: ~2 s, only sending needs it (training only appends)

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
