"""`pagating report` against a real `mlflow server` on 127.0.0.1, on a sweep written directly with
MlflowClient (fast, and independent of training). Every figure checked here is recomputed from the
MLflow metric histories."""

import json
import math
import re
import statistics
import uuid

import pytest
import yaml
from conftest import REPO, run_cli
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pagating.cli import main
from pagating.config import load_config
from pagating.report import report

T0 = 1_700_000_000_000  # ms; fixed so run durations (cost fallback) are known
STEPS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
EVAL_STEPS = [40, 80, 120]


def _config_run(mlf, exp_id, name, mode, lr, *, evals, gpu, step_time, parent=None, sweep_id=None,
                status="FINISHED", rate=None, util=None, alpha=None, cost=False, start_s=0, hours=0.5):
    tags = {"pagating.config_hash": uuid.uuid4().hex[:16], "gpu.name": gpu}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if sweep_id:
        tags["pagating.sweep_id"] = sweep_id
    if rate is not None:
        tags["cost.usd_per_hour"] = f"{rate:g}"
    start = T0 + start_s * 1000
    run = mlf.create_run(exp_id, run_name=name, start_time=start, tags=tags)
    rid = run.info.run_id
    params = {"train.alpha_mode": mode, "train.learning_rate": f"{lr:g}", "model.unit": "paGLU",
              "train.max_steps": "120", "train.batch_size": "16", "data.block_size": "64", "model.n_params": "123456"}
    metrics = []

    def put(key, step, value):
        metrics.append(Metric(key, float(value), start + step * 1000, step))

    for i, s in enumerate(STEPS):
        st = step_time * (9.0 if i == 0 else 1.0 + 0.01 * (i % 3))  # first window: warm-up
        put("train/loss", s, 6.0 - 0.02 * s)
        put("perf/step_time_s", s, st)
        put("perf/tokens_per_s", s, 16 * 64 / st)
        if util is not None:
            put("system/gpu_0_utilization_percentage", s, util - (40 if i == 0 else i % 4))
        if alpha is not None:
            put("alpha/layer_00", s, alpha + 0.001 * s)
            put("alpha/layer_01", s, alpha - 0.0005 * s)
        if cost:
            put("cost/usd", s, rate * s * step_time * 1.2 / 3600)
    for s, v in zip(EVAL_STEPS, evals, strict=False):
        put("eval/loss", s, v)
        put("eval/ppl", s, math.exp(v))
    if len(evals) == len(EVAL_STEPS):
        put("best/eval_loss", 120, min(evals))
        put("final/eval_loss", 120, evals[-1])
        put("final/eval_ppl", 120, math.exp(evals[-1]))
    mlf.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    mlf.set_terminated(rid, status, end_time=start + int(hours * 3.6e6))
    return rid


def _parent(mlf, exp_id, sweep_id, start_s):
    run = mlf.create_run(exp_id, run_name=f"sweep {sweep_id}", start_time=T0 + start_s * 1000,
                         tags={"pagating.sweep_id": sweep_id, "pagating.role": "sweep"})
    mlf.log_batch(run.info.run_id, params=[Param("sweep.alpha_mode", "[...]"), Param("sweep.n_configs", "4")])
    mlf.set_terminated(run.info.run_id, "FINISHED", end_time=T0 + (start_s + 7200) * 1000)
    return run.info.run_id


@pytest.fixture(scope="module")
def sweep(mlflow_server, tmp_path_factory):
    """An older sweep `old` (one child E) and the newest sweep `new` (children A, B, C, and D which FAILED).
    Project folder with a params.yaml whose experiment prefix is unique to this module."""
    root = tmp_path_factory.mktemp("report-project")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["experiment_prefix"] = f"rpt{uuid.uuid4().hex[:8]}"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config("sample", path=root / "params.yaml")
    mlf = MlflowClient(mlflow_server.uri)
    exp_id = mlf.create_experiment(f"{params['tracking']['experiment_prefix']}-sample")
    old = _parent(mlf, exp_id, "old", 0)
    e = _config_run(mlf, exp_id, "paGLU static_0.5 lr=0.001", "static_0.5", 1e-3, evals=[5.2, 4.4, 3.8],
                    gpu="RTX 4090", step_time=0.12, parent=old, sweep_id="old", rate=0.4, util=88, start_s=10)
    new = _parent(mlf, exp_id, "new", 10_000)
    a = _config_run(mlf, exp_id, "paGLU static_0.0 lr=0.001", "static_0.0", 1e-3, evals=[5.0, 4.2, 3.9],
                    gpu="RTX 4090", step_time=0.1, parent=new, sweep_id="new", rate=0.4, util=92, start_s=10_010,
                    hours=0.25)
    b = _config_run(mlf, exp_id, "paGLU learnable lr=0.0005", "learnable", 5e-4, evals=[4.9, 4.0, 3.7],
                    gpu="RTX 4090", step_time=0.11, parent=new, sweep_id="new", rate=0.4, util=90, alpha=0.5,
                    cost=True, start_s=10_020)
    c = _config_run(mlf, exp_id, "paGLU static_1.0 lr=0.0005", "static_1.0", 5e-4, evals=[5.1, 4.05, 4.1],
                    gpu="cpu", step_time=0.8, parent=new, sweep_id="new", start_s=10_030)
    d = _config_run(mlf, exp_id, "paGLU scheduler_cosine lr=0.001", "scheduler_cosine", 1e-3, evals=[1.0],
                    gpu="RTX 4090", step_time=0.1, parent=new, sweep_id="new", status="FAILED", start_s=10_040)
    sweep_json = root / "reports" / "sweep.json"
    sweep_json.parent.mkdir()
    sweep_json.write_text(json.dumps({"sweep_id": "new", "parent_run_id": new, "experiment_id": exp_id,
                                      "profile": "sample", "configs": [
                                          {"name": "paGLU static_0.0 lr=0.001", "config_hash": "h1", "run_id": a,
                                           "status": "ran"},
                                          {"name": "paGLU learnable lr=0.0005", "config_hash": "h2", "run_id": b,
                                           "status": "resumed"},
                                          {"name": "paGLU static_0.5 lr=0.001", "config_hash": "h3", "run_id": e,
                                           "status": "skipped"},
                                          {"name": "paGLU scheduler_cosine lr=0.001", "config_hash": "h4",
                                           "run_id": d, "status": "failed"}]}))
    return {"root": root, "cfg": cfg, "uri": mlflow_server.uri, "mlf": mlf, "sweep_json": sweep_json,
            "ids": {"A": a, "B": b, "C": c, "D": d, "E": e}, "parent": new}


# Independent recomputation from MLflow ---------------------------------------------------------

def _hist(mlf, rid, key):
    return [m.value for m in sorted(mlf.get_metric_history(rid, key), key=lambda m: m.step)]


def expected(mlf, rid):
    run = mlf.get_run(rid)
    m = run.data.metrics

    def steady(key, mean=statistics.fmean):
        h = _hist(mlf, rid, key)
        return mean(h[1:]) if h else None

    rate = run.data.tags.get("cost.usd_per_hour")
    cost = m.get("cost/usd")
    if cost is None and rate:
        cost = float(rate) * (run.info.end_time - run.info.start_time) / 3.6e6
    return {"best_eval_loss": m["best/eval_loss"], "final_eval_loss": m["final/eval_loss"],
            "final_eval_ppl": m["final/eval_ppl"], "best_eval_ppl": min(_hist(mlf, rid, "eval/ppl")),
            "first_eval_loss": _hist(mlf, rid, "eval/loss")[0],
            "s_per_step": steady("perf/step_time_s"),
            "tokens_per_s": steady("perf/tokens_per_s", statistics.harmonic_mean),
            "gpu_util_pct": steady("system/gpu_0_utilization_percentage"), "cost_usd": cost,
            "gpu": run.data.tags["gpu.name"], "rate": float(rate) if rate else None,
            "max_steps": int(run.data.params["train.max_steps"]), "name": run.info.run_name}


def ranking_rows(md):
    section = md.split("## Ranking")[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]
    return rows


def perf_table(md):
    section = md.split("## Expected Performance Improvement")[1].split("\n\n")[1]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()]
    gpus = lines[0][1:]
    return {line[0]: dict(zip(gpus, line[1:], strict=True)) for line in lines[2:]}


def close(cell, want):
    """The number printed in a table cell is `want` correctly rounded to the digits shown."""
    num = re.search(r"\d[\d,]*(\.\d+)?", cell)
    scale = {"min": 60.0, "h": 3600.0}.get(cell[num.end():].split()[0] if cell[num.end():].split() else "", 1.0)
    decimals = len(num.group(1)) - 1 if num.group(1) else 0
    return abs(float(num.group().replace(",", "")) - want / scale) <= 0.5 * 10 ** -decimals + 1e-12


def _use_server(monkeypatch, sweep):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sweep["uri"])
    monkeypatch.chdir(sweep["root"])


# Tests -------------------------------------------------------------------------------------------

@pytest.mark.slow  # one `pagating report` subprocess: imports mlflow, torch (via tracking) and matplotlib
def test_report_from_sweep_json_matches_mlflow(sweep, monkeypatch, tmp_path):
    _use_server(monkeypatch, sweep)
    mlf, ids, out = sweep["mlf"], sweep["ids"], tmp_path / "reports"
    doc = report(sweep["cfg"], sweep_json=sweep["sweep_json"], out_dir=out)

    # Configs: from sweep.json, the skipped one (E, outside this parent) in, the failed one (D) out.
    want = {k: expected(mlf, ids[k]) for k in ("A", "B", "E")}
    by_name = {w["name"]: w for w in want.values()}
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == doc
    assert set(doc) == set(by_name) | {"best_config"}
    assert doc["best_config"] == want["B"]["name"]
    for name, w in by_name.items():
        for key in ("best_eval_loss", "final_eval_loss", "final_eval_ppl", "best_eval_ppl", "first_eval_loss",
                    "s_per_step", "tokens_per_s", "gpu_util_pct", "cost_usd"):
            assert math.isclose(doc[name][key], w[key], rel_tol=1e-5), (name, key)
        # Throughput agrees with s/step: 16 x 64 tokens per step.
        assert math.isclose(doc[name]["tokens_per_s"] * doc[name]["s_per_step"], 16 * 64, rel_tol=1e-4), name
    # A's $ is wall time x rate (no cost/usd metric); B's is its last cost/usd.
    assert math.isclose(doc[want["A"]["name"]]["cost_usd"], 0.25 * 0.4, rel_tol=1e-5)
    assert doc[want["B"]["name"]]["cost_usd"] == pytest.approx(mlf.get_run(ids["B"]).data.metrics["cost/usd"])

    md = (out / "summary.md").read_text()
    rows = ranking_rows(md)
    assert [r[1] for r in rows] == [want[k]["name"] for k in ("B", "E", "A")]  # by best eval loss
    for r in rows:
        w = by_name[r[1]]
        for cell, key in zip(r[2:10], ("best_eval_loss", "best_eval_ppl", "final_eval_loss", "final_eval_ppl",
                                       "s_per_step", "tokens_per_s", "gpu_util_pct", "cost_usd"), strict=True):
            assert close(cell, w[key]), (r[1], key, cell, w[key])
        assert r[8].endswith("%") and r[9].startswith("$")
        assert r[10].strip("`") in ids.values()
    assert "paGLU scheduler_cosine lr=0.001 (failed)" in md

    # Expected Performance Improvement: all three on RTX 4090; time/step, one run, sweep, cost.
    perf = perf_table(md)
    ws = list(want.values())
    sps = statistics.fmean(w["s_per_step"] for w in ws)
    run_s = [w["max_steps"] * w["s_per_step"] for w in ws]
    col = {k: v["RTX 4090 (measured)"] for k, v in perf.items()}
    assert list(perf["configs measured"]) == ["M4 (seed, measured)", "RTX 4090 (seed, projected)",
                                              "RTX 4090 (estimate: pagating.flops)", "RTX 4090 (measured)"]
    assert col["configs measured"] == "3"
    assert close(col["time per step"], sps)
    assert close(col["one run (train.max_steps × s/step)"], statistics.fmean(run_s))
    assert "(120 steps)" in col["one run (train.max_steps × s/step)"]
    assert close(col["whole sweep"], sum(run_s))
    # The seed plan's figures beside them.
    assert perf["time per step"]["M4 (seed, measured)"] == "3.04 s"
    plan = {k: v["RTX 4090 (seed, projected)"] for k, v in perf.items()}
    assert (plan["time per step"], plan["whole sweep"], plan["cost of the sweep (hours × $/h)"]) == (
        "0.25 s", "~14 h", "~$12")
    assert close(col["cost of the sweep (hours × $/h)"], sum(run_s) / 3600 * 0.4)

    # Plots: valid PNGs; CSVs for dvc plots hold the MLflow values.
    for name in ("eval_loss", "final_eval_loss", "alpha", "perf"):
        data = (out / "plots" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    lines = (out / "plots" / "eval_loss.csv").read_text().splitlines()
    assert lines[0] == "config,step,eval_loss" and len(lines) == 1 + 3 * 3
    for line in lines[1:]:
        name, step, value = line.rsplit(",", 2)
        rid = next(ids[k] for k, w in want.items() if w["name"] == name)
        hist = {m.step: m.value for m in mlf.get_metric_history(rid, "eval/loss")}
        assert math.isclose(float(value), hist[int(step)], rel_tol=1e-5)
    final = (out / "plots" / "final_eval_loss.csv").read_text().splitlines()
    assert final[0] == "alpha_mode,learning_rate,final_eval_loss"
    assert [tuple(x.split(",")[:2]) for x in final[1:]] == [("static_0.0", "0.001"), ("static_0.5", "0.001"),
                                                             ("learnable", "0.0005")]
    assert [float(x.split(",")[2]) for x in final[1:]] == pytest.approx([want[k]["final_eval_loss"] for k in "AEB"])

    # A second run over the same runs, as a user runs it: byte-identical text files.
    before = {p.name: p.read_bytes() for p in [out / "summary.md", out / "metrics.json",
                                               *sorted((out / "plots").glob("*.csv"))]}
    proc = run_cli(["report", "--sweep-json", str(sweep["sweep_json"]), "--out", str(out)], cwd=sweep["root"],
                   env={"MLFLOW_TRACKING_URI": sweep["uri"]}, timeout=120, check=True)
    assert f"best: {want['B']['name']}" in proc.stdout
    after = {p.name: p.read_bytes() for p in [out / "summary.md", out / "metrics.json",
                                              *sorted((out / "plots").glob("*.csv"))]}
    assert after == before


def test_report_finds_sweeps_in_mlflow(sweep, monkeypatch, tmp_path):
    _use_server(monkeypatch, sweep)
    mlf, ids = sweep["mlf"], sweep["ids"]
    # No sweep.json: the newest parent's FINISHED children (A, B, C; D failed).
    doc = report(sweep["cfg"], sweep_json=tmp_path / "absent.json", out_dir=tmp_path / "new")
    want = {k: expected(mlf, ids[k]) for k in ("A", "B", "C")}
    assert set(doc) == {w["name"] for w in want.values()} | {"best_config"}
    md = (tmp_path / "new" / "summary.md").read_text()
    assert [r[1] for r in ranking_rows(md)] == [want[k]["name"] for k in ("B", "A", "C")]
    assert f"parent run `{sweep['parent']}`" in md
    c = ranking_rows(md)[2]
    assert c[8] == "n/a" and c[9] == "n/a"  # cpu: no GPU util, no price
    assert "gpu_util_pct" not in doc[want["C"]["name"]]
    perf = perf_table(md)
    assert [c for c in perf["time per step"] if c.endswith("(measured)") and "seed" not in c] == [
        "RTX 4090 (measured)", "cpu (measured)"]
    assert close(perf["time per step"]["cpu (measured)"], want["C"]["s_per_step"])
    assert perf["cost of the sweep (hours × $/h)"]["cpu (measured)"] == "n/a"
    assert math.isclose(doc[want["C"]["name"]]["best_eval_loss"], 4.05, rel_tol=1e-6)  # best != final
    # --sweep-id picks an older sweep, even with a sweep.json of another sweep present.
    doc = report(sweep["cfg"], sweep_json=sweep["sweep_json"], sweep_id="old", out_dir=tmp_path / "old")
    assert set(doc) == {"paGLU static_0.5 lr=0.001", "best_config"}


def test_missing_sweep_or_server_is_one_line_exit_2(sweep, monkeypatch, tmp_path, capsys):
    _use_server(monkeypatch, sweep)
    cases = [(["report", "--sweep-id", "nope", "--out", str(tmp_path / "r")], "no sweep 'nope'"),
             (["report", "--sweep-json", str(tmp_path / "none.json"), "--out", str(tmp_path / "r")], "not found")]
    for argv, text in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err and err.startswith("pagating report: error:"), err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert main(["report", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreachable" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nothing.db'}")
    assert main(["report", "--out", str(tmp_path / "r")]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not (tmp_path / "nothing.db").exists()
    assert not (tmp_path / "r").exists()  # nothing written on an error


def test_t_distribution_without_scipy():
    """The report's t quantiles and paired p-values match the printed Student t table."""
    from pagating.report import mean_ci, paired, t_quantile_975, t_two_sided_p

    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (10, 2.228), (30, 2.042)):
        assert t_quantile_975(df) == pytest.approx(t, abs=1e-3)
        assert t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert t_two_sided_p(0.0, 5) == 1.0 and t_two_sided_p(1.0, 1) == pytest.approx(0.5)
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3)
    d = paired({1: 3.0, 2: 3.2, 3: 3.1}, {1: 3.1, 2: 3.25, 3: 3.2, 4: 9.0})  # seed 4 is unpaired: left out
    assert d["seeds"] == 3 and d["diff"] == pytest.approx(-0.0833333)
    assert d["p"] == pytest.approx(0.0377, abs=1e-3)  # t = -5, df = 2
