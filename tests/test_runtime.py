"""pagating.runtime: thread shares and their precedence, precision choice, the compile counter."""

from __future__ import annotations

import os

import pytest
import torch

from pagating import runtime
from pagating.config import UserError


@pytest.fixture
def threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_thread_share_divides_the_usable_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(runtime, "open", lambda *a, **k: (_ for _ in ()).throw(OSError()), raising=False)
    assert runtime.usable_cores() == 8
    assert [runtime.thread_share(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_cgroup_quota_caps_the_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("350000 100000\n")  # a container limited to 3.5 CPUs on a 64-core host
    real_open = open
    monkeypatch.setattr(runtime, "open", lambda path, *a, **k: real_open(cpu_max if path == "/sys/fs/cgroup/cpu.max"
                                                                          else path, *a, **k), raising=False)
    assert runtime.usable_cores() == 4
    cpu_max.write_text("max 100000\n")
    assert runtime.usable_cores() == 64


def test_set_threads_precedence(monkeypatch, threads_back):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 6)
    monkeypatch.setattr(runtime, "idle_cores", lambda: 6.0)
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", runtime.SHARE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert runtime.set_threads() == 6 and torch.get_num_threads() == 6
    monkeypatch.setattr(runtime, "idle_cores", lambda: 1.2)  # other work holds most cores: take what is idle
    assert runtime.set_threads() == 1
    monkeypatch.setattr(runtime, "idle_cores", lambda: 6.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun --nproc 3: each process a third
    assert runtime.set_threads() == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv(runtime.SHARE_ENV, "4")  # the sweep's / --nproc's share, with their OMP_NUM_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert runtime.set_threads() == 4
    monkeypatch.setattr(runtime, "idle_cores", lambda: 2.0)
    assert runtime.set_threads() == 2  # a share is still capped by the idle cores; a user's setting is not:
    monkeypatch.delenv(runtime.SHARE_ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's setting wins over the share
    assert runtime.set_threads() == 5
    assert runtime.set_threads(3) == 3 and torch.get_num_threads() == 3  # --threads wins over both


def test_idle_cores_reads_this_machine():
    idle = runtime.idle_cores(0.05)
    assert idle is not None and 0.0 <= idle <= len(os.sched_getaffinity(0)) + 1e-6
    with pytest.raises(UserError, match="--threads"):
        runtime.set_threads(0)


def test_precision_choice():
    assert runtime.resolve_precision("auto", "cpu") == "fp32"
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"
    assert runtime.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(UserError, match="bf16"):
        runtime.resolve_precision("bf16", "mps")
    with pytest.raises(UserError, match="--precision"):
        runtime.resolve_precision("fp16", "cpu")


def test_compile_watch_counts_recompiles_not_first_compiles():
    torch._dynamo.reset()  # (reset also drops compile callbacks: the watch registers after it)
    watch = runtime.CompileWatch()
    try:
        buf = torch.zeros(())

        @torch.compile(backend="eager", dynamic=False)
        def f(x, scale):
            return x * scale + buf

        f(torch.ones(3), 2.0)
        assert (watch.compiles, watch.recompiles) == (1, 0)
        buf.fill_(5.0)  # a tensor changed in place: same graph, no recompile
        assert f(torch.ones(3), 2.0)[0].item() == 7.0
        assert watch.recompiles == 0
        f(torch.ones(3), 3.0)  # a Python float is baked into the graph: a guard fails, the frame recompiles
        assert (watch.compiles, watch.recompiles) == (2, 1)
        assert watch.seconds() > 0
    finally:
        watch.close()
        torch._dynamo.reset()
