"""The instance's watchdog (pagating.cloud.watchdog): destroys at the budget or on a stall, once, through
the fake Vast API; counts file changes as progress; its budget clock starts at Vast's start_date."""

from __future__ import annotations

import subprocess
import time

import pytest

from pagating.cloud import watchdog


def test_watchdog_destroys_at_the_budget_once(fake, env, tmp_path):
    env.setenv("CONTAINER_ID", "5555")
    env.setenv("CONTAINER_API_KEY", "container-key")
    state = tmp_path / "state"
    reason = watchdog.watch([tmp_path], budget_usd=1.0, usd_per_hour=3600.0, started_at=time.time() - 2,
                                 stall_s=1000, poll_s=0.05, lock_dir=state)
    assert "reached the budget" in reason
    (req,) = fake.destroys(5555)
    assert req.auth == "Bearer container-key"
    assert watchdog.destroy_self(state) is True  # onstart.sh's trap after it: no second call
    assert len(fake.destroys(5555)) == 1


def test_watchdog_destroys_when_training_stalls(fake, env, tmp_path):
    env.setenv("CONTAINER_ID", "5556")
    env.setenv("CONTAINER_API_KEY", "container-key")
    t0 = time.time()
    reason = watchdog.watch([tmp_path / "outputs"], budget_usd=0, usd_per_hour=1.0, started_at=t0,
                                 stall_s=0.3, poll_s=0.05, lock_dir=tmp_path / "state")
    assert reason.startswith("no progress") and time.time() - t0 >= 0.3
    assert len(fake.destroys(5556)) == 1


def test_watchdog_counts_file_changes_as_progress(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "spool.jsonl").write_text("x")
    newest = watchdog.newest_mtime([out])
    assert newest >= time.time() - 5
    assert watchdog.check(newest + 10, newest, 0.0, 0.0, newest, stall_s=60) is None
    assert "no progress" in watchdog.check(newest + 61, newest, 0.0, 0.0, newest, stall_s=60)


def test_watchdog_stops_when_onstart_is_gone(fake, env, tmp_path):
    env.setenv("CONTAINER_ID", "5557")
    env.setenv("CONTAINER_API_KEY", "k")
    proc = subprocess.Popen(["true"])
    proc.wait()
    reason = watchdog.watch([tmp_path], 1.0, 1.0, time.time(), 1000, poll_s=0.05, pid=proc.pid)
    assert reason == "parent exited" and fake.destroys() == []


def test_watchdog_budget_clock_counts_from_vasts_start_across_reboots(fake, env):
    fake.add_instance(5560, start_date=time.time() - 7200)  # started two hours ago; onstart reran just now
    env.setenv("CONTAINER_ID", "5560")
    env.setenv("CONTAINER_API_KEY", "container-key")
    env.setenv("PAGATING_STARTED_AT", str(time.time()))
    started = watchdog.vast_start_date()
    assert started == pytest.approx(time.time() - 7200, abs=5)
    assert "reached the budget" in watchdog.check(time.time(), started, 1.0, 1.5, time.time(), 1e9)


def test_watchdog_destroy_keeps_trying_until_vast_says_the_instance_is_gone(fake, env):
    fake.add_instance(5570)
    env.setenv("CONTAINER_ID", "5570")
    env.setenv("CONTAINER_API_KEY", "revoked-key")
    fake.refused_keys.add("revoked-key")
    assert watchdog.destroy_self(None, attempts=3, backoff_s=0.01) is False
    assert [r.status for r in fake.destroys(5570)] == [401, 401, 401]
    fake.refused_keys.clear()  # the key works again, but `vast watch` destroyed the instance meanwhile
    fake.instances[5570]["_destroyed"] = True
    assert watchdog.destroy_self(None, backoff_s=0.01) is True  # tried for good, ends on Vast's 404
    assert [r.status for r in fake.destroys(5570)][-1] == 404
