"""Shared helpers of the bench/ scripts: device set-up, interleaved timing, the model configs, and
the last-line JSON.

Also a small CLI used by bench/gpu_check.sh (no torch needed for `merge`):

    python bench/_common.py [env]               # versions, device, GPU name as JSON
    python bench/_common.py nvml --seconds 3    # GpuSampler readings around a matmul load
    python bench/_common.py merge DIR OUT.json  # parts' JSON files -> one JSON
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere, without pip install
    sys.path.insert(0, str(ROOT))

# Model dims of the two configs every bench uses. "tiny" is the sample profile's model,
# "gpt2-small" the seed's (GPT-2 small, vocabulary padded to a multiple of 64 as pagating.train does).
CONFIGS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, ffn_dim=256, vocab_size=2048, block_size=64, batch_size=16,
                 dropout=0.0),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, ffn_dim=3072, vocab_size=50304, block_size=128,
                       batch_size=16, dropout=0.1),
}


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked but no CUDA GPU is visible; use --device cpu")
    return requested


def setup_device(device: str, threads: int | None = None) -> None:
    """TF32 matmuls on CUDA, as pagating.train's TrainingArguments(tf32=True) sets them; CPU threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def base_parser(doc: str, quick_help: str):
    """The flags every bench shares: --device, --quick, --threads."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); "
                        "1 is far steadier on a busy machine")
    return parser


def load_note() -> str:
    """'load 3.1 on 2 CPUs, 2 torch threads' (+ a warning when OpenMP threads will fight for cores)."""
    import torch

    load, cpus, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    note = f"load {load:.1f} on {cpus} CPUs, {threads} torch threads"
    if threads > 1 and load > 0.5 * cpus:
        # Measured here: a tiny-GPT-2 step took ~1 s with 2 threads on a busy 2-core box, ~40 ms with 1.
        note += " (busy machine: CPU timings with several threads are unreliable; try --threads 1)"
    return note


def autocast(device: str):
    """bf16 autocast on CUDA (the training path); fp32 elsewhere."""
    import torch

    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int,
                inner: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of each fn, round-robin: warm-up rounds first, then `repeats` rounds in which
    every fn runs `inner` times back to back, so drift and other processes' load hit all alike.

    Returns (wall seconds, CPU seconds of this process) per call. On a shared CPU the CPU seconds
    are the steadier figure (time lost waiting for a core is not counted); on CUDA they mean little.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            sync(device)
            wall[name].append((time.perf_counter() - t0) / inner)
            cpu[name].append((time.process_time() - c0) / inner)
    return wall, cpu


def max_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rnd(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def env_info(device: str | None = None) -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformers", "tokenizers", "nvidia-ml-py", "mlflow"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    if device:
        info["device"] = device
    return info


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def print_table(rows: list[list[object]], header: list[str]) -> None:
    cells = [header] + [[("-" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c)) for c in r]
                        for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def emit(figures: dict) -> None:
    """The last stdout line: one JSON object of every figure."""
    sys.stdout.flush()
    print(json.dumps(figures, default=str), flush=True)


# gpu_check.sh helpers -----------------------------------------------------------------------------

def _nvml(seconds: float) -> dict:
    """GpuSampler readings while a bf16 matmul loop keeps the GPU busy for `seconds`."""
    import torch

    from pagating.gpu import GpuSampler

    sampler = GpuSampler(period_s=0.5)
    started = sampler.start()
    out: dict = {"sampler_started": started}
    if not started:
        out["note"] = "no NVML GPU visible: GpuSampler logs no system/gpu_* metric"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # CUDA context and cuBLAS set-up, outside the timed load
    sync(device)
    time.sleep(0.2 if started else 0)  # let the first (idle) reading land, then drop it
    sampler.window()
    t0 = time.perf_counter()
    matmuls = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        sync(device)
        matmuls += 10
    elapsed = time.perf_counter() - t0
    out["load_tflops"] = rnd(2 * n**3 * matmuls / elapsed / 1e12)
    out["load_s"] = rnd(elapsed)
    out["window"] = sampler.window()
    out["summary"] = sampler.summary()
    sampler.stop()
    return out


def _merge(parts_dir: Path, out_path: Path) -> dict:
    """Every part's JSON (or its error) under its name, plus the headline figures."""
    parts: dict[str, dict] = {}
    for status in sorted(parts_dir.glob("*.status")):
        name = status.stem
        rc = int(status.read_text().split()[0])
        seconds = float(status.read_text().split()[1])
        last = ""
        out_file = parts_dir / f"{name}.out"
        if out_file.exists():
            lines = [ln for ln in out_file.read_text(errors="replace").splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
        try:
            figures = json.loads(last)
            if not isinstance(figures, dict):
                raise ValueError
        except ValueError:
            figures = None
        if rc == 0 and figures is not None:
            parts[name] = {**figures, "part_s": seconds}
            continue
        err_file = parts_dir / f"{name}.err"
        tail = err_file.read_text(errors="replace").strip().splitlines()[-5:] if err_file.exists() else []
        why = "timed out" if rc in (124, 137) else f"exit {rc}" if rc else "no JSON on the last line"
        if figures is not None and figures.get("failed"):  # an acceptance part: its figures say what failed
            tail = [f"failed checks: {', '.join(figures['failed'])}", *tail]
        parts[name] = {**(figures or {}), "error": f"{why}: {' | '.join(tail)[-600:]}", "part_s": seconds}
    result = {"bench": "gpu_check", "cpu_mode": os.environ.get("GPU_CHECK_CPU") == "1",
              "summary": _summary(parts), "errors": sorted(n for n, p in parts.items() if "error" in p),
              "parts": parts}
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _summary(parts: dict) -> dict:
    """The goals' figures pulled out of the parts (None where a part failed)."""
    s: dict = {}
    for part in ("seed", "seed_compile", "throughput"):
        c = parts.get(part, {}).get("configs", {})
        name = next(iter(c), None)
        a = c.get(name, {}).get("pagating", {}) if name else {}
        s[f"{part}_s_per_step"] = a.get("s_per_step")
        s[f"{part}_ms_per_step"] = None if a.get("s_per_step") is None else rnd(a["s_per_step"] * 1e3)
        s[f"{part}_mfu"] = a.get("mfu")
        s[f"{part}_tokens_per_s"] = a.get("tokens_per_s")
    s["step_time_ratio_vs_plain"] = parts.get("seed", {}).get("step_time_ratio_vs_plain")
    s["speedup_vs_upstream"] = parts.get("seed", {}).get("speedup_vs_upstream")
    units = parts.get("units", {}).get("units", {})
    s["units_ratio_vs_naive"] = {k: v.get("ratio_vs_naive") for k, v in units.items()} or None
    s["units_fused_vs_unfused"] = {k: v.get("fused_vs_unfused") for k, v in units.items()} or None
    s["gpu"] = parts.get("env", {}).get("gpu")
    acc = parts.get("accept_train", {})
    s["accept_ms_per_step"] = acc.get("ms_per_step")
    s["accept_mfu"] = acc.get("mfu")
    s["accept_compile_time_s"] = acc.get("compile_time_s")
    s["accept_nvml_max"] = acc.get("nvml_max")
    accept = [n for n in ("accept_install", "accept_train", "accept_nproc", "accept_sweep") if n in parts]
    s["accept_ok"] = all("error" not in parts[n] for n in accept) if accept else None
    return s


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="bench helpers for gpu_check.sh")
    # No subcommand means `env`: `make bench` runs every bench/*.py bare, this one included.
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("env")
    n = sub.add_parser("nvml")
    n.add_argument("--seconds", type=float, default=3.0)
    m = sub.add_parser("merge")
    m.add_argument("parts_dir")
    m.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd in (None, "env"):
        info = env_info()
        for k, v in info.items():
            print(f"{k:>14}: {v}")
        emit(info)
    elif args.cmd == "nvml":
        res = _nvml(args.seconds)
        for k, v in res.items():
            print(f"{k:>16}: {v}")
        emit(res)
    else:
        emit(_merge(Path(args.parts_dir), Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
