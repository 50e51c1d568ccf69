"""One process per config: a claim in MLflow that is a lock even when the server is slow, and the
lease that fences a holder out once it may have lost it.

Why this protocol. MLflow has no compare-and-swap: a tag write is last-writer-wins, so "write one
shared tag, wait, read it back" elects two winners as soon as a write takes longer than the wait.
Here every contender writes its *own* experiment tag, `pagating.claim.<config hash>.<owner>`, which
nobody else ever writes, waits for the server to acknowledge it, and only then reads all records of
the config. It wins only when no other live record is there. Two winners are impossible without any
timing assumption: whichever record the server committed second was committed before its owner's
read, which then sees the other one. When both see each other both withdraw and retry after a
random wait scaled by the measured write round trip (the lower owner id first), so one gets through.

A record is live while its heartbeat (`t`, written by its owner) is younger than the longer of the
reader's and the holder's `timeout_s` (a launcher set to a shorter timeout cannot cut a valid lease) and,
in the same boot and pid namespace of the same host, its pid runs with the start time it recorded (a pid
reused after a reboot or seen from another container with the same hostname proves nothing).
The holder's lease is its own clock's view of that: it writes nothing
into the run once its last acknowledged heartbeat was sent more than `timeout_s / 2` ago (a server
outage), until a fresh heartbeat, read back like a new claim, shows nobody claimed meanwhile; a
taker waits a full `timeout_s` by the record's clock, so clocks may differ by up to `timeout_s / 2`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path

from pagating import names
from pagating.config import UserError

PREFIX = "pagating.claim."
HELD, CONTENDING, WITHDRAWN = "held", "contending", "withdrawn"
_RANDOM = random.SystemRandom()  # not the seeded module generator: set_seed gives every trainer the same draws


class ClaimLost(UserError):
    """This process no longer holds its config's claim: it stopped and writes nothing more to the run."""


class LeaseLapsed(ConnectionError):
    """No heartbeat of ours reached MLflow for timeout_s / 2: hold writes until one does (transient)."""


def host_tag() -> str:
    return socket.gethostname()


def process_identity() -> dict:
    """What tells this process apart from a later one with the same pid: the kernel's boot id, the pid
    namespace and the process's start time (psutil create_time). Off Linux: psutil's boot time, no namespace."""
    import psutil  # ~40 ms: only a run taking a claim pays it, not every importer of tracking (report, cli)

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"boot": boot or f"{psutil.boot_time():.0f}", "pidns": pidns,
            "start": round(psutil.Process().create_time(), 2)}


class Claim:
    """Who trains a config right now (see the module's doc for why it is safe)."""

    def __init__(self, mlf, exp_id: str, config_hash: str, settle_s: float = 2.0, timeout_s: float = 300.0,
                 heartbeat_s: float = 30.0):
        self.mlf, self.exp_id, self.config_hash = mlf, exp_id, config_hash
        self.base = PREFIX + config_hash
        self.settle_s, self.timeout_s, self.heartbeat_s = settle_s, timeout_s, heartbeat_s
        self.me = {"owner": uuid.uuid4().hex, "host": host_tag(), "pid": os.getpid(), "timeout_s": timeout_s,
                   **process_identity()}
        self.key = f"{self.base}.{self.me['owner'][:16]}"
        self.run_id: str | None = None
        self.lost: str | None = None  # why the claim is no longer ours, once found
        self.rtt = 0.0  # the slowest acknowledged write of our record, seconds
        self._wrote = False  # a record of ours may be on the server
        self._lease_sent: float | None = None  # monotonic send time of our last acknowledged heartbeat
        self._lock = threading.Lock()  # our record's writes go one at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_config(cls, mlf, exp_id: str, config_hash: str, tracking_cfg: dict) -> Claim:
        return cls(mlf, exp_id, config_hash, settle_s=float(tracking_cfg["claim_settle_s"]),
                   timeout_s=float(tracking_cfg["claim_timeout_s"]),
                   heartbeat_s=float(tracking_cfg["heartbeat_s"]))

    # Reading -----------------------------------------------------------------------------------

    def records(self) -> dict[str, dict]:
        """Every claim record of this config (the one-tag format of older versions included)."""
        out = {}
        for key, value in self.mlf.get_experiment(self.exp_id).tags.items():
            if key == self.base or key.startswith(self.base + "."):
                try:
                    rec = json.loads(value)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out[key] = rec
        return out

    def is_live(self, claim: dict | None) -> bool:
        if not claim or claim.get("released") or claim.get("state") == WITHDRAWN:
            return False
        if claim.get("host") == host_tag() and claim.get("pid") and not self._pid_may_run(claim):
            return False
        return time.time() - float(claim.get("t", 0)) < record_timeout(claim, self.timeout_s)

    def _pid_may_run(self, claim: dict) -> bool:
        """False only when the record's process is surely gone; a pid of another boot or pid namespace
        (same hostname: a rebooted box, a container) cannot be looked up here, so only the heartbeat counts."""
        if any(claim.get(k) and claim[k] != self.me[k] for k in ("boot", "pidns")):
            return True
        import psutil  # ~40 ms, see process_identity

        try:
            started = psutil.Process(int(claim["pid"])).create_time()
        except (psutil.NoSuchProcess, ValueError):
            return False
        except psutil.Error:  # exists but cannot be inspected (another user's): take it as running
            return True
        return claim.get("start") is None or abs(started - float(claim["start"])) < 1.0  # else the pid was reused

    def others(self, records: dict[str, dict]) -> list[dict]:
        """Live records of other processes, holders first."""
        live = [r for k, r in records.items() if k != self.key and self.is_live(r)]
        return sorted(live, key=lambda r: r.get("state", HELD) != HELD)

    def current(self) -> dict | None:
        """The live claim of another process on this config (a holder before a contender), or None."""
        live = self.others(self.records())
        return live[0] if live else None

    def mine(self, claim: dict | None) -> bool:
        return bool(claim) and claim.get("owner") == self.me["owner"]

    # Writing our own record ----------------------------------------------------------------------

    def _write(self, state: str) -> float:
        """Write our record; returns the monotonic time it was sent, once the server acknowledged it."""
        sent, self._wrote = time.monotonic(), True
        value = {**self.me, "t": time.time(), "run_id": self.run_id, "state": state}
        self.mlf.set_experiment_tag(self.exp_id, self.key, json.dumps(value, sort_keys=True))
        self.rtt = max(self.rtt, time.monotonic() - sent)
        return sent

    def _drop(self) -> None:
        try:
            self.mlf.delete_experiment_tag(self.exp_id, self.key)
        except Exception:
            try:
                self._write(WITHDRAWN)
            except Exception:
                pass  # server down: the record's heartbeat ages out

    def acquire(self) -> dict | None:
        """None when the config is ours now, else the live claim that holds (or is claiming) it.

        Gives up after timeout_s / 2 of contention (a contender that died mid-claim blocks until its
        record ages out)."""
        try:
            return self._acquire()
        except BaseException:
            if self._wrote:
                self._drop()  # a record left "contending" would block the config for timeout_s
            raise

    def _acquire(self) -> dict | None:
        deadline = time.monotonic() + self.timeout_s / 2
        for attempt in range(1000):
            live = self.others(self.records())
            if live and live[0].get("state", HELD) == HELD:
                break
            if not live:
                sent = self._write(CONTENDING)
                live = self.others(self.records())  # read only after the server acknowledged our write
                if not live:
                    self._write(HELD)
                    self._lease_sent = sent  # the lease runs from the older write: the shorter one
                    return None
                self._write(WITHDRAWN)
                if live[0].get("state", HELD) == HELD:
                    break
            if time.monotonic() > deadline:
                break
            # Both claimed at once: the lowest owner id retries first, the others after it.
            first = all(self.me["owner"] < r.get("owner", "") for r in live)
            unit = 2 * self.rtt + self.settle_s * 0.25
            time.sleep(unit * (_RANDOM.random() + (0 if first else 1)) * min(1 + attempt // 3, 4))
        if self._wrote:
            self._drop()
        return live[0] if live else None

    # Holding: heartbeat, lease, fence -------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Heartbeats from the moment the claim is ours: building the model and reading the data before
        the run exists can take longer than the lease on a loaded machine."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pagating-heartbeat", daemon=True)
            self._thread.start()

    def attach(self, run_id: str) -> None:
        """The run exists now: our record names it and each heartbeat also marks the run."""
        self.run_id = run_id
        self._beat()
        self.start_heartbeat()

    def renew(self) -> None:
        """Before creating the run: a lapsed lease is renewed now (read back like a new claim), not waited out."""
        if not self.lost and not self.lease_ok():
            self._beat()
        self.check()

    def lease_ok(self) -> bool:
        return self._lease_sent is not None and time.monotonic() - self._lease_sent < self.timeout_s / 2

    def check(self) -> None:
        """Before every write into the run: ClaimLost once the claim is gone, LeaseLapsed while the
        server has not heard our heartbeat for timeout_s / 2 (the write waits, like in an outage)."""
        if self.lost:
            raise ClaimLost(self.lost)
        if not self.lease_ok():
            raise LeaseLapsed(f"no heartbeat of ours reached MLflow for over {self.timeout_s / 2:.0f}s")

    def _lose(self, why: str) -> None:
        if not self.lost:
            # Said once, by whoever raises ClaimLost with it (the CLI prints it as its one line).
            wrote = (f"writes nothing more into run {self.run_id}" if self.run_id
                     else "creates no run for it (it had made none yet)")
            self.lost = (f"stopped training: the claim on config {self.config_hash} is no longer ours ({why}); "
                         f"this process {wrote}")

    def _beat(self) -> None:
        with self._lock:
            if self.lost:
                return
            lapsed = not self.lease_ok()
            records = self.records()
            holders = [r for r in self.others(records) if r.get("state", HELD) == HELD]
            if holders:
                self._lose(f"{describe_claim(holders[0], self.timeout_s)} holds it"
                           + (f"; no heartbeat of ours reached MLflow for over {self.timeout_s / 2:.0f}s"
                              if lapsed else ", while ours was fresh too (clocks far apart?)"))
                return
            if not self.mine(records.get(self.key)):
                self._lose("our claim record was removed from the experiment")
                return
            sent = self._write(HELD)
            if lapsed:  # as after a new claim: only a read after the write says nobody claimed meanwhile
                live = self.others(self.records())
                if live:
                    self._lose(f"our heartbeat lapsed for over {self.timeout_s / 2:.0f}s and "
                               f"{describe_claim(live[0], self.timeout_s)} claimed it meanwhile")
                    return
            self._lease_sent = sent
        if self.run_id and self.lease_ok():  # a heartbeat acknowledged too late is no lease to write on
            self.mlf.set_tag(self.run_id, names.HEARTBEAT, str(int(time.time())))

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s if self.lease_ok() else min(self.heartbeat_s, 5.0)):
            try:
                self._beat()
            except Exception:  # server down: the heartbeat resumes when it answers
                pass

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 3 * self.rtt))
        with self._lock:
            if self._lease_sent is not None or self.lost:
                self._drop()  # only ever our own record


def record_timeout(claim: dict, timeout_s: float) -> float:
    """How long a record stays live without a heartbeat: the longer of ours and the one its holder runs
    its lease on (records of older versions carry none)."""
    try:
        return max(timeout_s, float(claim.get("timeout_s") or 0))
    except (TypeError, ValueError):
        return timeout_s


def describe_claim(claim: dict, timeout_s: float) -> str:
    age = time.time() - float(claim.get("t", 0))
    doing = "claiming it now" if claim.get("state") == CONTENDING else f"run {claim.get('run_id') or 'starting'}"
    return (f"{claim.get('host')} pid {claim.get('pid')} ({doing}, heartbeat {age:.0f}s ago; taken over after "
            f"{record_timeout(claim, timeout_s):.0f}s without one)")
