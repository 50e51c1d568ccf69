"""Smoke tests of bench/: every script runs with --quick on CPU and ends with one JSON line of its figures.

The benches are timed elsewhere; here they only have to run and say something consistent. All of
them start at once (one torch thread each, so 2 cores stay busy without OpenMP threads fighting),
then each test checks one. train_step, units and gpu_check run with mlflow, datasets and dvc made
unimportable (as on the offline GPU machine); overhead runs once with mlflow (the tracked case) and
once without (the tracked case skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagating.units import UNITS

REPO = Path(__file__).resolve().parent.parent
BLOCKER = 'import sys\nfor _name in ("mlflow", "datasets", "dvc"):\n    sys.modules[_name] = None\n'

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    blocked = tmp / "no_mlflow"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(BLOCKER)  # imported at start-up: `import mlflow` fails
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    base.pop("GPU_CHECK_CPU", None)
    no_mlflow = {**base, "PYTHONPATH": str(blocked)}
    py = sys.executable
    check = {**no_mlflow, "PYTHON": py}
    specs = {
        "units": ([py, "bench/units.py", "--quick", "--device", "cpu"], no_mlflow),
        "train_step": ([py, "bench/train_step.py", "--quick", "--device", "cpu"], no_mlflow),
        "overhead": ([py, "bench/overhead.py", "--quick", "--device", "cpu"], base),
        "overhead_no_mlflow": ([py, "bench/overhead.py", "--quick", "--device", "cpu", "--steps", "10",
                                "--repeats", "1"], no_mlflow),
        # No kit (`make gpu-kit` needs PyPI and ~1 min; the acceptance dry run is run by hand, docs/bench.md):
        # the install part says what to do and the other acceptance parts are skipped, not run.
        "gpu_check": (["bash", "bench/gpu_check.sh"], {**check, "GPU_CHECK_CPU": "1", "OUT": str(tmp / "out"),
                                                       "GPU_KIT": str(tmp / "no-kit")}),
        # No GPU here and no CPU switch: the CUDA parts fail; the script records that and goes on.
        "gpu_check_no_gpu": (["bash", "bench/gpu_check.sh"], {**check, "GPU_CHECK_PARTS": "seed units",
                                                              "OUT": str(tmp / "out_no_gpu")}),
        "gpu_check_timeout": (["bash", "bench/gpu_check.sh"], {**check, "GPU_CHECK_CPU": "1",
                                                               "GPU_CHECK_PARTS": "units", "GPU_CHECK_TIMEOUT_S": "1",
                                                               "OUT": str(tmp / "out_to")}),
    }
    procs = {}
    for name, (cmd, env) in specs.items():
        out, err = open(tmp / f"{name}.out", "w"), open(tmp / f"{name}.err", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True), out, err)
    results = {}
    for name, (proc, out, err) in procs.items():
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out.close()
        err.close()
        results[name] = (rc, (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text())
    return results, tmp


def figures(runs, name: str) -> tuple[dict, str]:
    rc, out, err = runs[0][name]
    assert rc == 0, f"{name} exited {rc}:\n{out[-2000:]}\n{err[-3000:]}"
    lines = [ln for ln in out.splitlines() if ln.strip()]
    fig = json.loads(lines[-1])
    assert isinstance(fig, dict)
    return fig, out


def close(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_units_quick(runs):
    fig, out = figures(runs, "units")
    assert fig["bench"] == "units" and fig["device"] == "cpu"
    assert (fig["dim"], fig["ffn"]) == (768, 3072)
    assert sorted(fig["units"]) == sorted(UNITS)
    for name, u in fig["units"].items():
        assert u["ms"] > 0 and u["naive_ms"] > 0 and u["unfused_ms"] > 0
        assert close(u["ratio_vs_naive"], u["ms"] / u["naive_ms"]), name
        assert close(u["fused_vs_unfused"], u["ms"] / u["unfused_ms"]), name
        assert u["max_abs_diff"] < 1e-4, name  # fused, unfused and naive compute the same thing
        assert name in out  # the table


def test_train_step_quick_without_mlflow(runs):
    fig, out = figures(runs, "train_step")
    assert fig["bench"] == "train_step" and fig["headline_config"] == "gpt2-small"
    assert set(fig["configs"]) == {"tiny", "gpt2-small"}
    for cfg in fig["configs"].values():
        for kind in ("pagating", "plain", "upstream"):
            m = cfg[kind]
            assert m["s_per_step"] > 0 and m["mfu"] is None  # no GPU peak known on CPU
            assert close(m["tokens_per_s"] * m["s_per_step"], cfg["tokens_per_step"])
        # (c) adds two d_ff x d_ff projections per layer; (a) is param-matched: three d_model x g matrices
        # (value, gate, out) with g = 2/3 d_ff against plain's two d_model x d_ff, so within 1% of (b)
        d, f, L = cfg["n_embd"], cfg["ffn_dim"], cfg["n_layer"]
        g = cfg["pagating"]["d_ff"]
        assert g == f * 2 // 3 and cfg["plain"]["d_ff"] == f
        assert cfg["pagating"]["n_params"] - cfg["plain"]["n_params"] == L * (3 * d * g + 2 * g - 2 * d * f - f)
        assert abs(cfg["pagating"]["n_params"] / cfg["plain"]["n_params"] - 1) < 0.01
        assert cfg["upstream"]["n_params"] - cfg["plain"]["n_params"] == L * 2 * (f * f + f)
        assert close(cfg["step_time_ratio_vs_plain"], cfg["pagating"]["s_per_step"] / cfg["plain"]["s_per_step"])
        assert close(cfg["speedup_vs_upstream"], cfg["upstream"]["s_per_step"] / cfg["pagating"]["s_per_step"])
    small = fig["configs"]["gpt2-small"]
    assert (small["n_embd"], small["ffn_dim"], small["vocab_size"]) == (768, 3072, 50304)
    assert fig["step_time_ratio_vs_plain"] == small["step_time_ratio_vs_plain"]
    assert fig["speedup_vs_upstream"] == small["speedup_vs_upstream"]
    assert "tokens/s" in out


def test_overhead_quick_tracked(runs):
    fig, out = figures(runs, "overhead")
    assert fig["skipped"] is None
    assert fig["ratio"] > 0 and close(fig["ratio"], fig["on_train_s"] / fig["off_train_s"])
    # the tracked runs really tracked: metrics sent, last checkpoint uploaded, nothing left behind
    assert fig["metric_lines"] > 0 and fig["spool_left"] == 0
    assert fig["uploaded_step"] == fig["steps"] and fig["upload_error"] is None
    assert "tracking on/off" in out


def test_overhead_without_mlflow_skips_tracked_case(runs):
    fig, out = figures(runs, "overhead_no_mlflow")
    assert "mlflow is not installed" in fig["skipped"] and "skipped" in out
    assert fig["ratio"] is None and fig["off_train_s"] > 0


def test_gpu_check_cpu_mode(runs):
    fig, out = figures(runs, "gpu_check")
    tmp = runs[1]
    assert fig["bench"] == "gpu_check" and fig["cpu_mode"] is True
    accept = ["accept_install", "accept_nproc", "accept_sweep", "accept_train"]
    assert fig["errors"] == accept, fig["parts"]
    assert "make gpu-kit" in fig["parts"]["accept_install"]["error"]
    assert all("accept_install failed" in fig["parts"][n]["error"] for n in accept[1:])
    assert fig["summary"]["accept_ok"] is False
    assert set(fig["parts"]) == {"env", "nvml", "seed", "units", "seed_compile", "throughput", *accept}
    assert json.loads((tmp / "out" / "gpu_check.json").read_text()) == fig
    assert (tmp / "out" / "gpu_check_logs" / "seed.out").exists()
    assert fig["parts"]["nvml"]["sampler_started"] is False  # no GPU: the sampler says so, no thread
    s = fig["summary"]
    for key in ("seed_s_per_step", "seed_compile_s_per_step", "throughput_s_per_step", "step_time_ratio_vs_plain",
                "speedup_vs_upstream"):
        assert s[key] > 0, key
    assert sorted(s["units_ratio_vs_naive"]) == sorted(UNITS)
    assert fig["parts"]["throughput"]["configs"]["tiny"]["tokens_per_step"] == 4 * 128
    assert "== seed" in out and "== throughput" in out


def test_gpu_check_keeps_going_when_parts_fail(runs):
    fig, _ = figures(runs, "gpu_check_no_gpu")
    assert fig["errors"] == ["seed", "units"]
    assert "CUDA" in fig["parts"]["seed"]["error"] and "CUDA" in fig["parts"]["units"]["error"]
    assert fig["summary"]["seed_s_per_step"] is None


def test_gpu_check_records_a_timeout(runs):
    fig, _ = figures(runs, "gpu_check_timeout")
    assert fig["errors"] == ["units"] and fig["parts"]["units"]["error"].startswith("timed out")


def test_gpu_kit_data_lands_in_the_kit_given_a_relative_folder(tmp_path, monkeypatch):
    """`make gpu-kit` passes a relative folder; prepare runs in a temp project, and the data must still
    end up in the kit (it once vanished with the temp folder, and every acceptance part failed)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_kit

    monkeypatch.chdir(tmp_path)
    gpu_kit.prepare_data(Path("kit") / "data")
    tiny = json.loads((tmp_path / "kit" / "data" / "tiny" / "meta.json").read_text())
    seed = json.loads((tmp_path / "kit" / "data" / "seed" / "meta.json").read_text())
    assert seed["block_size"] == 128 and tiny["block_size"] != 128
    assert all((tmp_path / "kit" / "data" / n / "train.bin").is_file() for n in ("tiny", "seed"))
