"""GpuSampler (MLflow's system/gpu_<i>_* names) against a fake `pynvml` (no GPU here) and the real no-GPU path."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types

import pytest

from pagating import gpu


class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict], fail: dict | None = None, init_error: bool = False) -> types.ModuleType:
    """A pynvml stand-in. devices: [{"util": 37, "mem": bytes, "power": mW, "temp": C, "name": ...}].
    fail: {"power": n} makes the first n power readings raise NVMLError (n = -1: always)."""
    fail = dict(fail or {})
    calls = {"init": 0, "shutdown": 0, "power": 0}
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.NVML_TEMPERATURE_GPU = 0
    m.calls = calls

    def maybe_fail(what):
        left = fail.get(what, 0)
        if left:
            fail[what] = left - 1 if left > 0 else left
            raise NVMLError(f"{what} not supported")

    def init():
        calls["init"] += 1
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def shutdown():
        calls["shutdown"] += 1

    def power(h):
        calls["power"] += 1
        maybe_fail("power")
        return devices[h]["power"]

    def util(h):
        maybe_fail("util")
        return types.SimpleNamespace(gpu=devices[h]["util"], memory=0)

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = lambda h: devices[h].get("uuid", f"GPU-{h:08d}-aaaa")
    m.nvmlDeviceGetUtilizationRates = util
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=devices[h]["mem"], total=24 * 2**30, free=0)
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 450_000
    m.nvmlDeviceGetTemperature = lambda h, sensor: devices[h]["temp"]
    m.nvmlDeviceGetName = lambda h: devices[h].get("name", "NVIDIA GeForce RTX 4090").encode()
    return m


UTIL0 = "system/gpu_0_utilization_percentage"
GPU0 = {"util": 87, "mem": 3 * 2**30, "power": 312_500, "temp": 64, "name": "NVIDIA GeForce RTX 4090"}
GPU1 = {"util": 13, "mem": 1 * 2**30, "power": 100_000, "temp": 40, "name": "NVIDIA H200"}


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(gpu, "_said_no_gpu", False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def wait_window(sampler, keys, timeout=5.0) -> dict[str, float]:
    """Collect windows until all keys were seen (the thread samples every period_s)."""
    seen: dict[str, float] = {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen.update(sampler.window())
        if set(keys) <= set(seen):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"missing {set(keys) - set(seen)} in {seen}")


def test_single_gpu_values_and_units(monkeypatch):
    nvml = install(monkeypatch, fake_nvml([GPU0]))
    sampler = gpu.GpuSampler(period_s=0.01)
    assert sampler.start() is True
    try:
        w = wait_window(sampler, [UTIL0])
        assert w == pytest.approx({
            UTIL0: 87.0, "system/gpu_0_memory_usage_megabytes": 3 * 2**30 / 1e6,
            "system/gpu_0_memory_usage_percentage": 12.5, "system/gpu_0_power_usage_watts": 312.5,
            "system/gpu_0_power_usage_percentage": 312.5 / 450 * 100, "system/gpu_0_temperature_celsius": 64.0})
        time.sleep(0.05)
        assert sampler.window() == w  # constant fake -> every window has the same means
        assert sampler.summary() == pytest.approx(w)  # the same means, summed in another order
    finally:
        sampler.stop()
    assert not sampler.running
    assert nvml.calls["shutdown"] >= 1
    assert gpu.gpu_name() == "NVIDIA GeForce RTX 4090"


def test_window_is_mean_since_previous_call(monkeypatch):
    dev = dict(GPU0)
    install(monkeypatch, fake_nvml([dev]))
    sampler = gpu.GpuSampler(period_s=0.005)
    sampler.start()
    try:
        wait_window(sampler, [UTIL0])
        dev["util"] = 10
        time.sleep(0.05)
        sampler.window()  # drops the window that straddles the change
        time.sleep(0.05)
        assert sampler.window()[UTIL0] == 10.0
        summary = sampler.summary()[UTIL0]
        assert 10.0 < summary < 87.0  # the whole run saw both values
    finally:
        sampler.stop()


def test_multi_gpu_keys(monkeypatch):
    install(monkeypatch, fake_nvml([GPU0, GPU1]))
    sampler = gpu.GpuSampler(period_s=0.01)
    sampler.start()
    try:
        w = wait_window(sampler, [UTIL0, "system/gpu_1_utilization_percentage"])
    finally:
        sampler.stop()
    assert w[UTIL0] == 87.0 and w["system/gpu_1_utilization_percentage"] == 13.0
    assert w["system/gpu_1_memory_usage_megabytes"] == pytest.approx(2**30 / 1e6)
    assert w["system/gpu_1_power_usage_watts"] == 100.0 and w["system/gpu_1_temperature_celsius"] == 40.0
    assert len(w) == 12  # 6 per GPU, no aggregate names (MLflow's UI charts each GPU)


@pytest.mark.parametrize("visible, expected_util", [("1", 13.0), ("GPU-00000001", 13.0), ("0", 87.0)])
def test_cuda_visible_devices_picks_the_used_gpu(monkeypatch, visible, expected_util):
    install(monkeypatch, fake_nvml([GPU0, GPU1]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    sampler = gpu.GpuSampler(period_s=0.01)
    sampler.start()
    try:
        w = wait_window(sampler, [UTIL0])
    finally:
        sampler.stop()
    assert w[UTIL0] == expected_util  # the used GPU is gpu_0, as the process sees it
    assert not any(k.startswith("system/gpu_1_") for k in w)
    assert gpu.gpu_name() == ("NVIDIA H200" if expected_util == 13.0 else "NVIDIA GeForce RTX 4090")


def test_explicit_device_indices(monkeypatch):
    install(monkeypatch, fake_nvml([GPU0, GPU1]))
    sampler = gpu.GpuSampler(period_s=0.01, device_indices=[1])
    sampler.start()
    try:
        assert wait_window(sampler, ["system/gpu_0_temperature_celsius"])["system/gpu_0_temperature_celsius"] == 40.0
    finally:
        sampler.stop()


def test_failing_reading_does_not_kill_the_thread(monkeypatch):
    nvml = install(monkeypatch, fake_nvml([GPU0], fail={"power": 5}))
    sampler = gpu.GpuSampler(period_s=0.005)
    sampler.start()
    try:
        first = wait_window(sampler, [UTIL0])
        # the other readings kept coming while power failed, and power comes back once NVML recovers
        w = wait_window(sampler, ["system/gpu_0_power_usage_watts"])
        assert sampler.running
        assert nvml.calls["power"] > 5
        assert w["system/gpu_0_power_usage_watts"] == 312.5 and first[UTIL0] == 87.0
    finally:
        sampler.stop()


def test_always_failing_and_unexpected_errors(monkeypatch):
    nvml = install(monkeypatch, fake_nvml([GPU0], fail={"power": -1}))
    nvml.nvmlDeviceGetTemperature = lambda h, s: (_ for _ in ()).throw(RuntimeError("driver gone"))
    sampler = gpu.GpuSampler(period_s=0.005)
    sampler.start()
    try:
        time.sleep(0.1)
        w = sampler.window()
        assert sampler.running
        assert w == pytest.approx({UTIL0: 87.0, "system/gpu_0_memory_usage_megabytes": 3 * 2**30 / 1e6,
                                   "system/gpu_0_memory_usage_percentage": 12.5})
    finally:
        sampler.stop()


def test_no_gpu_fake_init_error(monkeypatch, caplog):
    install(monkeypatch, fake_nvml([GPU0], init_error=True))
    before = {t.name for t in threading.enumerate()}
    with caplog.at_level(logging.INFO, logger="pagating.gpu"):
        for _ in range(3):
            sampler = gpu.GpuSampler(period_s=0.01)
            assert sampler.start() is False
            assert sampler.window() == {} and sampler.summary() == {}
            sampler.stop()
    assert {t.name for t in threading.enumerate()} - before == set()
    said = [r for r in caplog.records if gpu.NO_GPU_MESSAGE in r.getMessage()]
    assert len(said) == 1  # once per process


def test_no_pynvml_installed(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with caplog.at_level(logging.INFO, logger="pagating.gpu"):
        assert gpu.GpuSampler().start() is False
    assert "not installed" in caplog.text


def test_all_gpus_hidden(monkeypatch):
    nvml = install(monkeypatch, fake_nvml([GPU0]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu.GpuSampler().start() is False
    assert nvml.calls["shutdown"] == nvml.calls["init"]


def test_real_nvml_without_gpu(caplog):
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("a real NVIDIA GPU is present")
    with caplog.at_level(logging.INFO, logger="pagating.gpu"):
        sampler = gpu.GpuSampler()
        assert sampler.start() is False
        assert sampler.window() == {}
        sampler.stop()
        assert gpu.GpuSampler().start() is False
    assert caplog.text.count(gpu.NO_GPU_MESSAGE) == 1
    assert gpu.gpu_name() == "cpu"


def test_cpu_window_mlflow_names():
    gpu.cpu_window()
    w = gpu.cpu_window()
    assert 0.0 <= w["system/cpu_utilization_percentage"] <= 100.0
    assert w["system/system_memory_usage_megabytes"] > 0 and 0 < w["system/system_memory_usage_percentage"] < 100
