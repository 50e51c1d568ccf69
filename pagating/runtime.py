"""How a run uses the machine: CPU threads, numeric precision, and torch.compile's bookkeeping.

Threads: torch's default (one OpenMP thread per core, busy-waiting between ops) collapses when
anything else runs on the cores: a tiny-GPT-2 step measured ~25 ms alone and ~215 ms beside two
busy processes on the 2-core dev box. A run therefore takes its share of the cores it may use
(affinity and cgroup quota, divided among the sweep's workers or torchrun's local processes), no
more than are idle when it starts, and lets idle OpenMP threads sleep instead of spin
(OMP_WAIT_POLICY=PASSIVE), unless the user says otherwise (--threads, OMP_NUM_THREADS,
OMP_WAIT_POLICY win).
"""

from __future__ import annotations

import os
import re
import sys
import threading

from pagating.config import UserError

PRECISIONS = ("auto", "bf16", "fp32")
CUDA_ENV = "PAGATING_CUDA_GPUS"  # CUDA GPUs the instance must see (set by launch)
TEST_ALLOW_CPU_ENV = "PAGATING_TEST_ALLOW_CPU"  # tests only: a CPU box passes the CUDA requirement


def passive_openmp() -> None:
    """Idle OpenMP threads sleep rather than spin; only takes effect before torch (libgomp) loads."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity call
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def thread_share(workers: int) -> int:
    """Each of `workers` processes sharing this machine gets an equal share of its cores (at least 1)."""
    return max(1, usable_cores() // max(1, workers))


SHARE_ENV = "PAGATING_THREAD_SHARE"  # set by the sweep / --nproc for their children: a share, not a user setting


def explicit_threads() -> int | None:
    """OMP_NUM_THREADS when the user set it to a number; an explicit setting wins over our share."""
    if os.environ.get(SHARE_ENV):  # our own launcher set it (torchrun would otherwise set 1)
        return None
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def idle_cores(sample_s: float = 0.25) -> float | None:
    """How many of this process's cores sat idle over `sample_s` (psutil's per-CPU times), None where unknown.

    Why: OpenMP threads that share a core with another busy process wait on each other at every
    barrier: beside two busy processes on 2 cores, 2 threads made a step ~2.4x slower, 1 thread ~1.5x.
    """
    import time

    import psutil

    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None

    def read() -> dict[int, tuple[float, float]]:
        # idle + iowait, and the total without guest time (already counted in user/nice)
        return {i: (t.idle + getattr(t, "iowait", 0.0), sum(t[:8]))
                for i, t in enumerate(psutil.cpu_times(percpu=True)) if i in cpus}

    try:
        a = read()
        time.sleep(sample_s)
        b = read()
    except (OSError, psutil.Error):
        return None
    idle = 0.0
    for name in a.keys() & b.keys():
        total = b[name][1] - a[name][1]
        idle += (b[name][0] - a[name][0]) / total if total > 0 else 1.0
    return idle if a else None


def set_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads: --threads, else OMP_NUM_THREADS, else this process's share of
    the cores (the sweep's or --nproc's share, else the usable cores over torchrun's LOCAL_WORLD_SIZE),
    lowered to the cores that are idle now (at least 1). Returns the number set."""
    import torch

    if requested is not None and requested < 1:
        raise UserError(f"--threads must be >= 1, got {requested}")
    n = requested or explicit_threads()
    if not n:
        share = os.environ.get(SHARE_ENV, "")
        n = int(share) if share.isdigit() and int(share) > 0 else \
            thread_share(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        idle = idle_cores() if n > 1 else None
        if idle is not None:
            n = max(1, min(n, int(idle + 0.5)))
    torch.set_num_threads(n)
    return n


def resolve_precision(requested: str, device: str) -> str:
    """auto: bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere. bf16 on CPU is autocast too."""
    import torch

    if requested not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
    if requested == "bf16" and device == "mps":
        raise UserError("--precision bf16 is not supported on mps; use --precision fp32")
    return requested


class CompileWatch:
    """Counts torch.compile's work in this process: compilations, recompilations (a frame compiled
    again, e.g. after a guard on a changed value failed) and seconds spent compiling.

    Read at each logging step; the step timer subtracts the compile seconds of its window, so
    perf/step_time_s is the steady step and the compile cost shows apart (perf/compile_time_s).
    """

    _ID = re.compile(r"(\d+)/(\d+)")

    def __init__(self):
        self.compiles = 0
        self.recompiles = 0
        self._lock = threading.Lock()
        self._registered = False
        try:
            from torch._dynamo.callback import callback_handler

            callback_handler.register_end_callback(self._on_compile_end)
            self._registered = True
        except (ImportError, AttributeError):  # an older torch: compile time only
            pass

    def _on_compile_end(self, args=None) -> None:
        trigger = getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO")
        if trigger != "DYNAMO":  # lazy backward compile, autotuning, cudagraph recording: not a frame
            return
        compile_id = getattr(args, "compile_id", None)
        if compile_id is None:  # torch versions whose callbacks take no argument
            from torch._guards import CompileContext

            compile_id = str(CompileContext.current_compile_id())
        m = self._ID.search(str(compile_id))
        with self._lock:
            self.compiles += 1
            if m and int(m.group(2)) > 0:  # [frame/n]: the n-th compile of that frame
                self.recompiles += 1

    @staticmethod
    def seconds() -> float:
        """Cumulative seconds in Dynamo frame compiles and (lazy) backward compiles, this process."""
        try:
            from torch._dynamo.utils import calculate_time_spent

            return float(calculate_time_spent().get("total_wall_time", 0.0))
        except (ImportError, AttributeError):
            return 0.0

    def close(self) -> None:
        if self._registered:
            from torch._dynamo.callback import callback_handler

            try:
                callback_handler.remove_end_callback(self._on_compile_end)
            except ValueError:
                pass
            self._registered = False


# ---- CUDA -------------------------------------------------------------------------------------

def cuda_required() -> int:
    """CUDA GPUs this machine must use (0: no requirement, e.g. a laptop)."""
    try:
        return max(0, int(os.environ.get(CUDA_ENV) or 0))
    except ValueError:
        return 0


def cuda_problem() -> str | None:
    """None when the required CUDA GPUs are usable, else one line: what was found, what was expected."""
    need = cuda_required()
    if not need:
        return None
    try:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        detail = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
    except Exception as exc:  # torch missing or broken: as unusable as no GPU
        found, detail = 0, f"torch not importable ({type(exc).__name__})"
    if found >= need:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"CUDA required: found {found} usable CUDA GPU(s) ({detail}"
            + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
            + f"), expected {need}; refusing to train on CPU")


def check_cuda() -> tuple[bool, str]:
    problem = cuda_problem()
    if problem is None:
        need = cuda_required()
        return True, f"CUDA: {need} GPU(s) usable" if need else "CUDA: not required here"
    if os.environ.get(TEST_ALLOW_CPU_ENV) == "1":
        return True, f"{problem} -- but {TEST_ALLOW_CPU_ENV}=1 (tests only): continuing on CPU"
    return False, problem
