"""System telemetry under MLflow's system-metric names, so the run page's System metrics tab shows it.

`GpuSampler.start()` samples the GPUs this process uses about once a second in a daemon thread;
`window()` returns the means since the previous call (one MLflow logging step), `summary()` the
whole-run means. GPU i is numbered as this process sees it (cuda:<i>). Names and units are those of
MLflow's own monitor (mlflow/system_metrics/metrics/gpu_monitor.py, cpu_monitor.py), plus temperature:

    system/gpu_<i>_utilization_percentage   % of the period a kernel was running
    system/gpu_<i>_memory_usage_megabytes   device memory in use, MB (10**6 bytes, as MLflow)
    system/gpu_<i>_memory_usage_percentage  used / total
    system/gpu_<i>_power_usage_watts        board power draw, W
    system/gpu_<i>_power_usage_percentage   draw / enforced power limit
    system/gpu_<i>_temperature_celsius      GPU core temperature, °C (MLflow's monitor has none)
    system/cpu_utilization_percentage       all cores, mean over the window (`cpu_window()`)
    system/system_memory_usage_megabytes    RAM in use, MB
    system/system_memory_usage_percentage

MLflow's monitor thread is not used: it logs directly and stops at the first server error; these go
through the run's metric spool, which rides out outages. Without NVML (no driver, no GPU,
nvidia-ml-py missing) `start()` returns False, no thread runs, `window()` is {} and the process logs
once that no GPU metric will be logged. The sampling thread never raises: a failing NVML call skips
that reading only.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

logger = logging.getLogger(__name__)

METRICS = ("utilization_percentage", "memory_usage_megabytes", "memory_usage_percentage", "power_usage_watts",
           "power_usage_percentage", "temperature_celsius")
NO_GPU_MESSAGE = "no NVIDIA GPU: no system/gpu_* metrics will be logged"


def metric_name(gpu: int, metric: str) -> str:
    return f"system/gpu_{gpu}_{metric}"

_said_no_gpu = False
_said_lock = threading.Lock()


def _say_no_gpu(reason: str) -> None:
    global _said_no_gpu
    with _said_lock:
        if _said_no_gpu:
            return
        _said_no_gpu = True
    logger.warning("%s (%s)", NO_GPU_MESSAGE, reason)


def _import_nvml():
    """The pynvml module with NVML initialised, or None (and why)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / anything odd
        return None, f"NVML: {exc}"
    return pynvml, ""


def _visible_handles(nvml, device_indices: list[int] | None) -> list[Any]:
    """NVML handles of the GPUs this process uses, in CUDA order.

    CUDA_VISIBLE_DEVICES holds NVML indices or (prefixes of) GPU UUIDs; "" or "-1" hides all GPUs.
    An entry that matches no device is skipped rather than failing the run.
    """
    count = nvml.nvmlDeviceGetCount()
    if device_indices is not None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in device_indices if 0 <= i < count]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    uuids: list[str] | None = None
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            continue
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if index < 0:  # CUDA stops enumerating at the first invalid ordinal
                break
            if index < count:
                handles.append(nvml.nvmlDeviceGetHandleByIndex(index))
            continue
        if uuids is None:
            uuids = []
            for i in range(count):
                try:
                    uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
                except Exception:
                    uuid = ""
                uuids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        match = [i for i, uuid in enumerate(uuids) if uuid and uuid.startswith(entry)]
        if match:
            handles.append(nvml.nvmlDeviceGetHandleByIndex(match[0]))
    return handles


class _Means:
    """Running sum/count per (gpu, metric)."""

    def __init__(self, n_gpus: int):
        self.sums = [[0.0] * len(METRICS) for _ in range(n_gpus)]
        self.counts = [[0] * len(METRICS) for _ in range(n_gpus)]

    def add(self, gpu: int, metric: int, value: float) -> None:
        self.sums[gpu][metric] += value
        self.counts[gpu][metric] += 1

    def means(self) -> dict[str, float]:
        out = {metric_name(g, name): self.sums[g][m] / self.counts[g][m]
               for g in range(len(self.sums)) for m, name in enumerate(METRICS) if self.counts[g][m]}
        return dict(sorted(out.items()))


class GpuSampler:
    """Background NVML sampler; see the module docstring for metric names and units."""

    def __init__(self, period_s: float = 1.0, device_indices: list[int] | None = None):
        if period_s <= 0:
            raise ValueError("period_s must be > 0")
        self.period_s = float(period_s)
        self.device_indices = device_indices
        self._nvml = None
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._window = _Means(0)
        self._total = _Means(0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Start sampling; False (and no thread) when no usable NVIDIA GPU is there."""
        if self._thread is not None:
            return True
        nvml, reason = _import_nvml()
        if nvml is None:
            _say_no_gpu(reason)
            return False
        try:
            handles = _visible_handles(nvml, self.device_indices)
        except Exception as exc:
            handles, reason = [], f"NVML: {exc}"
        else:
            reason = "no visible GPU (CUDA_VISIBLE_DEVICES)"
        if not handles:
            _shutdown(nvml)
            _say_no_gpu(reason)
            return False
        self._nvml, self._handles = nvml, handles
        self._window, self._total = _Means(len(handles)), _Means(len(handles))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pagating-gpu-sampler", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        # Sample first, then wait: a window shorter than one period still gets a reading.
        while True:
            try:
                self._sample()
            except Exception:  # never let telemetry end the thread (MLflow's own one stops on errors)
                logger.debug("gpu sample failed", exc_info=True)
            if self._stop.wait(self.period_s):
                return

    def _read(self, handle) -> list[float | None]:
        nvml = self._nvml
        readers = (  # in METRICS order
            lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 1e6,
            lambda: (lambda mem: 100.0 * mem.used / mem.total)(nvml.nvmlDeviceGetMemoryInfo(handle)),
            lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            lambda: 100.0 * nvml.nvmlDeviceGetPowerUsage(handle) / nvml.nvmlDeviceGetEnforcedPowerLimit(handle),
            lambda: nvml.nvmlDeviceGetTemperature(handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)),
        )
        values: list[float | None] = []
        for read in readers:
            try:
                values.append(float(read()))
            except Exception:  # e.g. NVMLError_NotSupported for power on some boards: skip that reading
                values.append(None)
        return values

    def _sample(self) -> None:
        readings = [self._read(h) for h in self._handles]
        with self._lock:
            for g, values in enumerate(readings):
                for m, value in enumerate(values):
                    if value is not None:
                        self._window.add(g, m, value)
                        self._total.add(g, m, value)

    def window(self) -> dict[str, float]:
        """Means since the previous window() call; {} when there is no sample (or no GPU)."""
        with self._lock:
            out = self._window.means()
            self._window = _Means(len(self._handles))
        return out

    def summary(self) -> dict[str, float]:
        """Means over the whole run so far (same keys as window())."""
        with self._lock:
            return self._total.means()

    def stop(self) -> None:
        """Stop the thread and release NVML; safe to call twice or without start()."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=max(5.0, 2 * self.period_s))
        if self._nvml is not None:
            _shutdown(self._nvml)
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _shutdown(nvml) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass


def cpu_window() -> dict[str, float]:
    """CPU utilisation since the previous call (psutil's own bookkeeping: the first call primes it and
    returns nothing) and RAM in use now, under MLflow's names."""
    import psutil  # a dependency of the package (pyproject.toml)

    global _cpu_primed
    util = psutil.cpu_percent(interval=None)
    mem = psutil.virtual_memory()
    out = {"system/system_memory_usage_megabytes": mem.used / 1e6, "system/system_memory_usage_percentage": mem.percent}
    if _cpu_primed:
        out["system/cpu_utilization_percentage"] = util
    _cpu_primed = True
    return out


_cpu_primed = False


def gpu_name() -> str:
    """Name of the first GPU this process uses (NVML, else torch.cuda), else "cpu"."""
    nvml, _ = _import_nvml()
    if nvml is not None:
        try:
            handles = _visible_handles(nvml, None)
            if handles:
                name = nvml.nvmlDeviceGetName(handles[0])
                return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            pass
        finally:
            _shutdown(nvml)
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "cpu"
