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
from pagating.report.build import report

T0 = 1_700_000_000_000  # ms; fixed so run durations (cost fallback) are known
STEPS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
EVAL_STEPS = [40, 80, 120]


def _config_run(mlf, exp_id, name, mode, lr, *, evals, gpu, step_time, parent=None, sweep_id=None,
                status="FINISHED", rate=None, util=None, alpha=None, cost=False, start_s=0, hours=0.5,
                unit="paGLU", seed=None, test=None, n_params=123456, mfu=None):
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
    params = {"train.alpha_mode": mode, "train.learning_rate": f"{lr:g}", "model.unit": unit,
              "train.max_steps": "120", "train.batch_size": "16", "data.block_size": "64",
              "model.n_params": str(n_params), "model.n_layer": "2", "model.n_embd": "64", "model.vocab_size": "2048",
              "model.d_ff": "256" if unit == "plain" else "170"}
    if seed is not None:
        params["train.seed"] = str(seed)
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
        if mfu is not None:
            put("perf/mfu", s, mfu * (0.2 if i == 0 else 1.0 + 0.01 * (i % 3)))
    for s, v in zip(EVAL_STEPS, evals, strict=False):
        put("eval/loss", s, v)
        put("eval/ppl", s, math.exp(v))
    if len(evals) == len(EVAL_STEPS):
        put("best/eval_loss", 120, min(evals))
        put("final/eval_loss", 120, evals[-1])
        put("final/eval_ppl", 120, math.exp(evals[-1]))
    if test is not None:
        put("test/loss", 120, test)
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
                    cost=True, start_s=10_020, mfu=0.3)
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
            "mfu": steady("perf/mfu"),
            "gpu": run.data.tags["gpu.name"], "rate": float(rate) if rate else None,
            "max_steps": int(run.data.params["train.max_steps"]), "name": run.info.run_name}


def ranking_rows(md):
    section = md.split("## Runs")[1].split("\n\n")[1]
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
    assert set(doc["runs"]) == set(by_name)
    assert doc["best_config"] == want["B"]["name"]  # one seed each: the lowest final validation loss
    for name, w in by_name.items():
        for key in ("best_eval_loss", "final_eval_loss", "final_eval_ppl", "best_eval_ppl", "first_eval_loss",
                    "s_per_step", "tokens_per_s", "gpu_util_pct", "cost_usd"):
            assert math.isclose(doc["runs"][name][key], w[key], rel_tol=1e-5), (name, key)
        assert doc["runs"][name].get("mfu") == (None if w["mfu"] is None else pytest.approx(w["mfu"], rel=1e-5))
        # Throughput agrees with s/step: 16 x 64 tokens per step.
        assert math.isclose(doc["runs"][name]["tokens_per_s"] * doc["runs"][name]["s_per_step"], 16 * 64,
                            rel_tol=1e-4), name
    # A's $ is wall time x rate (no cost/usd metric); B's is its last cost/usd.
    assert math.isclose(doc["runs"][want["A"]["name"]]["cost_usd"], 0.25 * 0.4, rel_tol=1e-5)
    assert doc["runs"][want["B"]["name"]]["cost_usd"] == pytest.approx(
        mlf.get_run(ids["B"]).data.metrics["cost/usd"])
    # No plain run: no comparison, and the verdict says why.
    assert doc["comparisons"] == [] and doc["verdict"].startswith("No verdict: no `plain` baseline")

    md = (out / "summary.md").read_text()
    rows = ranking_rows(md)
    assert [r[1] for r in rows] == [want[k]["name"] for k in ("B", "E", "A")]  # by validation loss
    for r in rows:
        w = by_name[r[1]]
        assert r[3] == "n/a"  # these runs logged no test/loss
        for cell, key in zip(r[2:3] + r[4:10], ("final_eval_loss", "best_eval_loss", "final_eval_ppl",
                                                "s_per_step", "tokens_per_s", "gpu_util_pct", "cost_usd"),
                             strict=True):
            assert close(cell, w[key]), (r[1], key, cell, w[key])
        assert r[8].endswith("%") and r[9].startswith("$")
        assert r[10] == ("n/a" if w["mfu"] is None else f"{w['mfu']:.1%}")  # B alone logged perf/mfu
        assert r[11].strip("`") in ids.values()
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
    assert final[0] == "alpha_mode,learning_rate,final_eval_loss,test_loss,seed"
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
    assert set(doc["runs"]) == {w["name"] for w in want.values()}
    md = (tmp_path / "new" / "summary.md").read_text()
    assert [r[1] for r in ranking_rows(md)] == [want[k]["name"] for k in ("B", "A", "C")]
    assert f"parent run `{sweep['parent']}`" in md
    c = ranking_rows(md)[2]
    assert c[8] == "n/a" and c[9] == "n/a"  # cpu: no GPU util, no price
    assert "gpu_util_pct" not in doc["runs"][want["C"]["name"]]
    perf = perf_table(md)
    assert [c for c in perf["time per step"] if c.endswith("(measured)") and "seed" not in c] == [
        "RTX 4090 (measured)", "cpu (measured)"]
    assert close(perf["time per step"]["cpu (measured)"], want["C"]["s_per_step"])
    assert perf["cost of the sweep (hours × $/h)"]["cpu (measured)"] == "n/a"
    assert math.isclose(doc["runs"][want["C"]["name"]]["best_eval_loss"], 4.05, rel_tol=1e-6)  # best != final
    # --sweep-id picks an older sweep, even with a sweep.json of another sweep present.
    doc = report(sweep["cfg"], sweep_json=sweep["sweep_json"], sweep_id="old", out_dir=tmp_path / "old")
    assert set(doc["runs"]) == {"paGLU static_0.5 lr=0.001"} and doc["best_config"] == "paGLU static_0.5 lr=0.001"


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


# Seeds: paGLU and the plain baseline, chosen on validation, judged on test -----------------------------------

# (unit, α mode, lr) -> validation and test loss per seed. static_1.0 at lr 1e-3 beats plain at 1e-3 on both
# splits by about 0.1 with almost no seed-to-seed spread in the difference; the rest differ by noise.
NOISE = {1: 0.03, 2: -0.02, 3: 0.05}
SEEDED = {("paGLU", "static_0.0", 1e-3): (0.00, 0.010), ("paGLU", "static_1.0", 1e-3): (-0.10, -0.101),
          ("paGLU", "static_0.0", 5e-4): (0.04, 0.030), ("paGLU", "static_1.0", 5e-4): (0.02, 0.035),
          ("plain", "static_0.5", 1e-3): (0.00, 0.000), ("plain", "static_0.5", 5e-4): (0.05, 0.048)}


def _seeded_sweep(mlf, exp_id, root, sweep_id, seeds, start_s):
    parent = _parent(mlf, exp_id, sweep_id, start_s)
    entries = []
    for k, ((unit, mode, lr), (dv, dt)) in enumerate(SEEDED.items()):
        for seed in seeds:
            # Paired structure: each seed shifts every config alike; a little config-specific jitter on top.
            jitter = 0.003 * seed if mode == "static_1.0" and lr == 1e-3 else 0.02 * math.sin(seed * (k + 1.7))
            val = 3.8 + NOISE[seed] + dv + jitter
            name = (f"plain lr={lr:g}" if unit == "plain" else f"paGLU {mode} lr={lr:g}") + (
                f" seed={seed}" if len(seeds) > 1 else "")
            rid = _config_run(mlf, exp_id, name, mode, lr, evals=[val + 1.0, val + 0.3, val], gpu="cpu",
                              step_time=0.2, parent=parent, sweep_id=sweep_id, unit=unit, seed=seed,
                              test=val + 0.05 + dt - dv, n_params=235264 if unit == "plain" else 235176,
                              alpha=0.5 if mode == "learnable" else None, start_s=start_s + 10 + k * 10 + seed)
            entries.append({"name": name, "config_hash": uuid.uuid4().hex[:16], "run_id": rid, "status": "ran"})
    path = root / f"sweep-{sweep_id}.json"
    path.write_text(json.dumps({"sweep_id": sweep_id, "parent_run_id": parent, "experiment_id": exp_id,
                                "profile": "sample", "configs": entries}))
    return path, parent


@pytest.fixture(scope="module")
def seeded(sweep, tmp_path_factory):
    """Two sweeps of 4 paGLU configs + plain at both lrs in their own experiment: 3 seeds, and 1 seed."""
    mlf = sweep["mlf"]
    exp_id = mlf.create_experiment(f"seeded{uuid.uuid4().hex[:8]}-sample")
    three = _seeded_sweep(mlf, exp_id, sweep["root"], "three", [1, 2, 3], 20_000)
    one = _seeded_sweep(mlf, exp_id, sweep["root"], "one", [1], 30_000)
    return {**sweep, "three": three, "one": one}


GROUP_KEYS = {"config", "unit", "alpha_mode", "learning_rate", "n_params", "flops_per_token", "seeds", "val_mean",
              "val_ci95", "test_mean", "test_ci95"}
COMPARISON_KEYS = {"config", "baseline", "split", "diff_mean", "diff_ci95", "p", "p_holm", "n"}


def _losses(mlf, parent, key):
    """(config, seed) -> the metric, straight from the parent's MLflow children."""
    exp = mlf.get_run(parent).info.experiment_id
    out = {}
    for r in mlf.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
        p = r.data.params
        config = (f"plain lr={float(p['train.learning_rate']):g}" if p["model.unit"] == "plain"
                  else f"paGLU {p['train.alpha_mode']} lr={float(p['train.learning_rate']):g}")
        out[(config, int(p["train.seed"]))] = r.data.metrics[key]
    return out


def test_three_seeds_choose_on_validation_and_conclude_on_test(seeded, monkeypatch, tmp_path):
    from scipy import stats

    _use_server(monkeypatch, seeded)
    mlf, (sweep_json, parent) = seeded["mlf"], seeded["three"]
    doc = report(seeded["cfg"], sweep_json=sweep_json, out_dir=tmp_path / "r")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == doc
    # The schema of docs/report.md.
    assert {"groups", "best_config", "comparisons", "verdict"} <= set(doc)
    assert len(doc["groups"]) == 6 and all(GROUP_KEYS <= set(g) for g in doc["groups"])
    assert all(COMPARISON_KEYS <= set(c) for c in doc["comparisons"])
    assert all(g["seeds"] == g["test_seeds"] == [1, 2, 3] for g in doc["groups"])
    # Best config: the lowest mean validation loss.
    best = min(doc["groups"], key=lambda g: g["val_mean"])
    assert doc["best_config"] == best["config"] == "paGLU static_1.0 lr=0.001"
    # Recomputed from MLflow: one group's test mean and CI, one comparison's paired p on test.
    test, val = _losses(mlf, parent, "test/loss"), _losses(mlf, parent, "final/eval_loss")
    g = next(g for g in doc["groups"] if g["config"] == "paGLU static_0.0 lr=0.0005")
    xs = [test[("paGLU static_0.0 lr=0.0005", s)] for s in (1, 2, 3)]
    assert g["test_mean"] == pytest.approx(statistics.fmean(xs), rel=1e-5)
    assert g["test_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * statistics.stdev(xs) / math.sqrt(3), rel=1e-5)
    assert g["val_mean"] == pytest.approx(statistics.fmean(val[("paGLU static_0.0 lr=0.0005", s)] for s in (1, 2, 3)),
                                          rel=1e-5)
    c = next(c for c in doc["comparisons"] if c["config"] == "paGLU static_0.0 lr=0.001" and c["split"] == "test"
             and c["baseline"] == "plain lr=0.001")
    a, b = ([test[(name, s)] for s in (1, 2, 3)] for name in ("paGLU static_0.0 lr=0.001", "plain lr=0.001"))
    assert c["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-5) and c["n"] == 3
    assert c["diff_mean"] == pytest.approx(statistics.fmean(x - y for x, y in zip(a, b, strict=True)), abs=1e-6)
    # Each gated config meets plain at its lr and plain at plain's best lr (1e-3, on validation): 4 + 2 pairs.
    pairs = {(c["config"], c["baseline"]) for c in doc["comparisons"]}
    assert len(pairs) == 6 and ("paGLU static_1.0 lr=0.0005", "plain lr=0.001") in pairs
    assert {c["split"] for c in doc["comparisons"]} == {"test", "val"}
    # Holm: never below the raw p; over the 6 test comparisons the smallest raw p is multiplied by 6.
    assert all(c["p"] is not None and c["p_holm"] >= c["p"] for c in doc["comparisons"])
    tests = sorted((c for c in doc["comparisons"] if c["split"] == "test"), key=lambda c: c["p"])
    assert tests[0]["p_holm"] == pytest.approx(min(1.0, 6 * tests[0]["p"]), rel=1e-4)
    # The verdict: the winner on test, its difference and CI, the corrected p and the seeds, in test numbers.
    win = next(c for c in tests if c["config"] == "paGLU static_1.0 lr=0.001" and c["baseline"] == "plain lr=0.001")
    v = doc["verdict"]
    assert v.startswith("paGLU with α static_1.0 at lr 0.001 has a lower test loss than plain lr=0.001"), v
    assert f"by {abs(win['diff_mean']):.4f} ± {win['diff_ci95']:.4f}" in v and f"test loss {best['test_mean']:.4f}" in v
    assert f"p = {win['p_holm']:.3g}" in v and "3 seeds" in v
    md = (tmp_path / "r" / "summary.md").read_text()
    assert md.splitlines()[2] == f"**Verdict:** {v}"
    assert "unmatched" not in md.lower().replace("**unmatched**", "")  # equal arms: within 0.04%
    # Plots: one per figure; the eval curves are per run with the seed in the name.
    lines = (tmp_path / "r" / "plots" / "eval_loss.csv").read_text().splitlines()
    assert len(lines) == 1 + 18 * 3 and all(" seed=" in x.split(",")[0] for x in lines[1:])


def test_one_seed_gives_no_p_value_and_says_why(seeded, monkeypatch, tmp_path):
    _use_server(monkeypatch, seeded)
    sweep_json, _ = seeded["one"]
    doc = report(seeded["cfg"], sweep_json=sweep_json, out_dir=tmp_path / "r")
    assert len(doc["groups"]) == 6 and all(g["seeds"] == [1] and g["val_ci95"] is None for g in doc["groups"])
    assert doc["comparisons"] and all(c["p"] is None and c["p_holm"] is None and c["n"] == 1
                                      and c["p_note"] == "1 seed < 3" for c in doc["comparisons"])
    assert doc["best_config"] == min(doc["groups"], key=lambda g: g["val_mean"])["config"]
    v = doc["verdict"]
    assert v.startswith("No p-value: 1 seed per config, and a paired test needs at least 3"), v
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "p=" not in md and "Holm " not in md.split("### Against the baseline")[1].split("\n\n")[2]
    assert "no p: 1 seed < 3" in md


def test_holm_and_paired_statistics():
    from scipy import stats as sps

    from pagating.report import stats

    assert stats.holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])  # monotone step-down
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]
    d = stats.paired({1: 3.0, 2: 3.2, 3: 3.1}, {1: 3.1, 2: 3.25, 3: 3.2, 4: 9.0})  # seed 4 is unpaired: left out
    assert d["n"] == 3 and d["diff_mean"] == pytest.approx(-0.0833333)
    assert d["p"] == pytest.approx(sps.ttest_rel([3.0, 3.2, 3.1], [3.1, 3.25, 3.2]).pvalue)
    assert stats.paired({1: 3.0, 2: 3.1}, {1: 3.2, 2: 3.2})["p"] is None  # 2 seeds: no p-value
    mean, half = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3)  # Student's t table


def _rows(unit, mode, lr, vals, tests, n_params):
    from pagating.identity import config_label

    return [{"config": config_label(unit, mode, lr), "unit": unit, "alpha_mode": mode, "learning_rate": lr,
             "n_params": n_params, "flops_per_token": None, "d_ff": None, "seed": s, "val_loss": v, "test_loss": t,
             "run_id": f"{unit}{mode}{lr}{s}"} for s, v, t in zip((1, 2, 3), vals, tests, strict=True)]


def test_noise_only_gives_the_smallest_detectable_difference_and_unequal_arms_are_called_unmatched():
    from scipy import stats as sps

    from pagating.report import stats

    # Differences that swing across zero from seed to seed: nothing significant.
    gated = _rows("paGLU", "static_0.5", 1e-3, [3.80, 3.90, 3.70], [3.81, 3.92, 3.69], 268544)
    plain = _rows("plain", "plain", 1e-3, [3.85, 3.80, 3.80], [3.86, 3.83, 3.76], 235264)
    groups = stats.group(gated + plain)
    cmps = stats.compare(groups)
    assert [(c["config"], c["kind"], c["split"]) for c in cmps] == [
        ("paGLU static_0.5 lr=0.001", "same lr = baseline's best lr", "test"),
        ("paGLU static_0.5 lr=0.001", "same lr = baseline's best lr", "val")]
    assert all(c["matched"] is False and c["param_gap"] == pytest.approx(268544 / 235264 - 1) for c in cmps)
    v = stats.verdict(groups, cmps)
    diffs = [a - b for a, b in zip([3.81, 3.92, 3.69], [3.86, 3.83, 3.76], strict=True)]
    x = (sps.t.ppf(1 - 0.05 / 2, 2) + sps.t.ppf(0.8, 2)) * statistics.stdev(diffs) / math.sqrt(3)
    assert v.startswith(f"No difference detectable with 3 seeds on test; the smallest detectable difference is about "
                        f"{x:.4f} in test loss"), v
    assert v.endswith("(unmatched: the arms differ by more than 2% in parameters).")


# Audit follow-ups: one run per seed, whole-split losses only, test seeds, honest "no p", figures -------------

def _run_row(unit, mode, lr, seed, val, test=None, *, start=0, curve=None, alpha=None, util=None):
    from pagating.identity import config_label

    return {"config": config_label(unit, mode, lr), "unit": unit, "alpha_mode": mode, "learning_rate": lr,
            "n_params": 1000, "flops_per_token": None, "d_ff": None, "seed": seed, "val_loss": val,
            "test_loss": test, "run_id": f"{unit}-{mode}-{lr}-{seed}-{start}", "start_time": start,
            "name": f"{config_label(unit, mode, lr)} seed={seed}", "eval_curve": curve or [],
            "alpha_curve": alpha or [], "s_per_step": 0.1, "gpu_util_pct": util}


def test_median_run_and_duplicate_seeds_use_one_run_per_seed():
    from pagating.report import stats

    vals = {1: 3.9, 2: 3.7, 3: 3.8, 4: 3.6, 5: 4.0}
    rows = [_run_row("paGLU", "static_0.5", 1e-3, s, v, v + 0.1) for s, v in vals.items()]
    g = stats.group(rows)[0]
    assert stats.median_run(g)["seed"] == 3  # 3.6 3.7 [3.8] 3.9 4.0
    g4 = stats.group(rows[:4])[0]
    assert stats.median_run(g4)["seed"] == 2  # 3.6 [3.7] 3.8 3.9: the lower middle of an even count
    # Seed 3 again, newer, at 3.95: it replaces the older seed-3 run in the values, the runs and the median.
    again = _run_row("paGLU", "static_0.5", 1e-3, 3, 3.95, 4.05, start=10)
    g = stats.group([*rows, again])[0]
    assert g["seeds"] == [1, 2, 3, 4, 5] and len(g["runs"]) == 5 and again in g["runs"]
    assert g["val"][3] == 3.95 and g["val_mean"] == pytest.approx(statistics.fmean([3.9, 3.7, 3.95, 3.6, 4.0]))
    assert [(r["run_id"], why) for r, why in g["dropped"]] == [
        (rows[2]["run_id"], f"seed 3 of paGLU static_0.5 lr=0.001 ran again; the newer run {again['run_id']} counts")]
    assert stats.median_run(g)["seed"] == 1  # 3.6 3.7 [3.9] 3.95 4.0: among the runs used
    # The same, whatever order the rows come in.
    assert stats.group([again, *rows])[0]["val"] == g["val"]


def test_test_seeds_are_counted_apart_from_validation_seeds():
    from pagating.report import markdown, stats

    rows = [_run_row("paGLU", "static_0.5", 1e-3, s, 3.8 + s / 100, None if s == 3 else 3.9 + s / 100)
            for s in (1, 2, 3)]
    g = stats.group(rows)[0]
    assert g["seeds"] == [1, 2, 3] and g["test_seeds"] == [1, 2]
    assert g["test_mean"] == pytest.approx(3.915)
    md = markdown.gating_md({"groups": [g], "comparisons": []})
    row = [c.strip() for c in next(x for x in md.splitlines() if x.startswith("| 1 |")).strip("|").split("|")]
    assert row[7] == "3 (test 2)", row
    assert "(seeds 3.9100–3.9200)" in row[9]  # 2 test seeds: their spread, not a CI alone


def test_no_p_value_says_the_arms_share_too_few_seeds():
    from pagating.report import stats

    gated = [_run_row("paGLU", "static_0.5", 1e-3, s, 3.8 + s / 50, 3.9 + s / 50) for s in (1, 2, 3)]
    plain = [_run_row("plain", "plain", 1e-3, s, 3.85 + s / 40, 3.95 + s / 40) for s in (3, 4, 5)]
    groups = stats.group(gated + plain)
    cmps = stats.compare(groups)
    assert all(c["n"] == 1 and c["p"] is None and c["p_note"] == "1 seed < 3" for c in cmps)
    v = stats.verdict(groups, cmps)
    assert v.startswith("No p-value: a gated config and its baseline share at most 1 seed (3 per config at most)"), v
    assert "run both arms on the same seeds" in v and "3 seeds per config" not in v


def test_constant_differences_have_no_p_and_the_verdict_says_zero_spread():
    from pagating.report import markdown, stats

    d = stats.paired({1: 3.0, 2: 3.1, 3: 3.2}, {1: 2.9, 2: 3.0, 3: 3.1})  # 0.1 each, up to float rounding
    assert d["p"] is None and d["p_note"].startswith("zero spread") and d["diff_mean"] == pytest.approx(0.1)
    d = stats.paired({1: 3.5, 2: 3.25, 3: 3.75}, {1: 3.0, 2: 2.75, 3: 3.25})  # exactly 0.5 each
    assert d["p"] is None and d["p_note"].startswith("zero spread")
    # Every comparison constant (here: gated = plain on every seed): no "about 0.0000", the reason instead.
    gated = [_run_row("paGLU", "static_0.5", 1e-3, s, 3.8 + s / 50, 3.9 + s / 50) for s in (1, 2, 3)]
    plain = [_run_row("plain", "plain", 1e-3, s, 3.8 + s / 50, 3.9 + s / 50) for s in (1, 2, 3)]
    groups = stats.group(gated + plain)
    cmps = stats.compare(groups)
    assert all(c["p"] is None and c["p_holm"] is None for c in cmps)
    v = stats.verdict(groups, cmps)
    assert v.startswith("No p-value: the per-seed test differences have zero spread") and "0.0000" not in v[:120], v
    assert stats.smallest_detectable(cmps) is None
    assert "no p: zero spread" in markdown.gating_md({"groups": groups, "comparisons": cmps})


def test_verdict_with_an_unknown_learning_rate():
    from pagating.report import stats

    diffs = {1: -0.10, 2: -0.11, 3: -0.09}
    gated = [_run_row("paGLU", "static_0.5", None, s, 3.7 + s / 50 + d, 3.8 + s / 50 + d) for s, d in diffs.items()]
    plain = [_run_row("plain", "plain", None, s, 3.7 + s / 50, 3.8 + s / 50) for s in (1, 2, 3)]
    groups = stats.group(gated + plain)
    v = stats.verdict(groups, stats.compare(groups))
    assert v.startswith("paGLU with α static_0.5 at lr ? has a lower test loss than plain lr=? (same lr"), v


def _two_modes_two_lrs(seeds=(1, 2)):
    rows = []
    for mode in ("static_0.0", "learnable"):
        for lr in (1e-3, 5e-4):
            for s in seeds:
                base = 4.0 + s / 10 + (lr == 5e-4) * 0.05 + (mode == "learnable") * 0.02
                rows.append(_run_row("paGLU", mode, lr, s, base, base + 0.1 * s,
                                     curve=[(40, base + 1.0), (80, base + 0.3), (120, base)],
                                     alpha=[(40, 0.5 + s / 100), (80, 0.6)] if mode == "learnable" else None))
    return rows


def test_figures_colour_per_alpha_mode_style_per_lr_seed_bands_and_ci_bars():
    from pagating.report import plots, stats

    groups = stats.group(_two_modes_two_lrs())
    fig = plots.eval_loss_figure(groups)
    (ax,) = fig.axes
    lines = {ln.get_label().split(" (")[0]: ln for ln in ax.get_lines()}
    assert len(lines) == 4 and all(ln.get_label().endswith("(mean of 2 seeds)") for ln in ax.get_lines())
    colour = {k: ln.get_color() for k, ln in lines.items()}
    look = {k: (ln.get_linestyle(), ln.get_marker()) for k, ln in lines.items()}
    for mode in ("static_0.0", "learnable"):  # one colour per α mode, whatever the lr
        assert colour[f"paGLU {mode} lr=0.001"] == colour[f"paGLU {mode} lr=0.0005"]
    assert colour["paGLU static_0.0 lr=0.001"] != colour["paGLU learnable lr=0.001"]
    for lr in ("0.001", "0.0005"):  # one line style and marker per lr, whatever the mode
        assert look[f"paGLU static_0.0 lr={lr}"] == look[f"paGLU learnable lr={lr}"]
    assert look["paGLU static_0.0 lr=0.001"][0] != look["paGLU static_0.0 lr=0.0005"][0]
    # Seeds: the line is their mean; the band spans the lowest to the highest seed.
    g = next(g for g in groups if g["config"] == "paGLU learnable lr=0.001")
    ends = [r["val_loss"] for r in g["runs"]]
    assert lines[g["config"]].get_ydata()[-1] == pytest.approx(statistics.fmean(ends))
    assert len(ax.collections) == 4  # a band per config, drawn right after its line
    band = dict(zip(lines, ax.collections, strict=True))[g["config"]]
    assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(colour[g["config"]][:3])
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(min(ends)) and ys.max() == pytest.approx(max(ends) + 1.0)

    # Final losses: a point per config with its 95% CI bar, on both splits; the axis says where it starts.
    fig = plots.final_loss_figure(groups)
    assert len(fig.axes) == 2
    for ax, split in zip(fig.axes, ("val", "test"), strict=True):
        bars = {c.get_label(): c for c in ax.containers}
        assert set(bars) == {g["config"] for g in groups}
        for g in groups:
            data, _, (barcol,) = bars[g["config"]].lines
            assert data.get_ydata()[0] == pytest.approx(g[f"{split}_mean"])
            (seg,) = barcol.get_segments()
            assert (seg[0][1], seg[1][1]) == pytest.approx((g[f"{split}_mean"] - g[f"{split}_ci95"],
                                                             g[f"{split}_mean"] + g[f"{split}_ci95"]))
            assert data.get_color() == colour[g["config"]]
        start = ax.get_ylim()[0]
        assert 0 < start < min(g[f"{split}_mean"] - g[f"{split}_ci95"] for g in groups)
        assert f"axis starts at {start:.4g}, not 0" in ax.get_ylabel()


def test_figures_without_data_are_left_out():
    from pagating.report import plots, stats

    static = [r for r in _two_modes_two_lrs() if r["alpha_mode"] == "static_0.0"]
    for r in static:
        r["test_loss"] = None
    groups = stats.group(static)
    assert plots.alpha_figure(groups) is None  # static α only: no α figure, not a text panel
    assert len(plots.final_loss_figure(groups).axes) == 1  # no test/loss: no test panel
    assert len(plots.perf_figure(static).axes) == 1  # CPU: no GPU util panel
    files = plots.plot_files(groups, static)
    assert "alpha.png" not in files and {"eval_loss.png", "final_eval_loss.png", "perf.png"} <= set(files)
    static[0]["gpu_util_pct"] = 90.0
    assert [ax.get_title() for ax in plots.perf_figure(static).axes] == ["s/step", "GPU util (%)"]
    for r in static:
        r["eval_curve"], r["s_per_step"], r["gpu_util_pct"] = [], None, None
    assert plots.eval_loss_figure(groups) is None and plots.perf_figure(static) is None
    assert set(plots.plot_files(groups, static)) == {"eval_loss.csv", "final_eval_loss.png",
                                                            "final_eval_loss.csv"}


def test_duplicate_seed_and_subset_only_runs_stay_out_of_the_statistics(sweep, monkeypatch, tmp_path):
    """A seed run twice in one config (the newer counts) and a FINISHED run without final/eval_loss (its
    last eval/loss is a subset on the sample profile) are listed under Not ranked, not averaged in."""
    from pagating.cost import MFU_GUESS, STEP_OVERHEAD_S, peak_tflops
    from pagating.flops import flops_per_token

    _use_server(monkeypatch, sweep)
    mlf = sweep["mlf"]
    exp_id = mlf.create_experiment(f"edge{uuid.uuid4().hex[:8]}-sample")
    parent = _parent(mlf, exp_id, "edge", 40_000)
    kw = {"gpu": "cpu", "step_time": 0.2, "parent": parent, "sweep_id": "edge"}
    runs = {"old": _config_run(mlf, exp_id, "s1 old", "static_0.0", 1e-3, evals=[5.0, 4.2, 3.9], seed=1,
                               test=4.0, start_s=40_010, **kw),
            "new": _config_run(mlf, exp_id, "s1 new", "static_0.0", 1e-3, evals=[5.0, 4.2, 3.7], seed=1,
                               test=3.8, start_s=40_020, **kw),
            "two": _config_run(mlf, exp_id, "s2", "static_0.0", 1e-3, evals=[5.0, 4.2, 3.8], seed=2, test=3.9,
                               start_s=40_030, **kw),
            "subset": _config_run(mlf, exp_id, "s3 subset", "static_0.0", 1e-3, evals=[5.0, 3.0], seed=3,
                                  start_s=40_040, **kw)}
    path = tmp_path / "edge.json"
    path.write_text(json.dumps({"sweep_id": "edge", "parent_run_id": parent, "experiment_id": exp_id,
                                "profile": "sample", "configs": [{"name": n, "run_id": rid, "status": "ran"}
                                                                 for n, rid in runs.items()]}))
    (tmp_path / "r" / "plots").mkdir(parents=True)
    (tmp_path / "r" / "plots" / "alpha.png").write_bytes(b"stale")  # from an earlier report
    doc = report(sweep["cfg"], sweep_json=path, out_dir=tmp_path / "r")
    (g,) = doc["groups"]
    assert g["seeds"] == [1, 2] and g["run_ids"] == [runs["new"], runs["two"]]
    assert g["val_mean"] == pytest.approx(3.75) and g["test_mean"] == pytest.approx(3.85)
    assert set(doc["runs"]) == {"new", "two"}  # named as in the run list
    md = (tmp_path / "r" / "summary.md").read_text()
    assert ("Not ranked: old (seed 1 of paGLU static_0.0 lr=0.001 ran again; the newer run "
            f"{runs['new']} counts); subset (no final/eval_loss, the whole-split validation loss).") in md
    # Figures: no α logged, CPU only: no alpha.png (the stale one removed, no link), perf.png without GPU panel.
    plots = tmp_path / "r" / "plots"
    assert not (plots / "alpha.png").exists() and "alpha.png" not in md and "(plots/perf.png)" in md
    # The plan-vs-measured estimate, recomputed from the runs that ran: their shape and max_steps, 4 runs.
    p = mlf.get_run(runs["two"]).data.params
    fpt = flops_per_token(n_layer=int(p["model.n_layer"]), n_embd=int(p["model.n_embd"]), d_ff=int(p["model.d_ff"]),
                          vocab_size=int(p["model.vocab_size"]), block_size=int(p["data.block_size"]), gated=True)
    step = fpt * int(p["train.batch_size"]) * int(p["data.block_size"]) / (peak_tflops("RTX 4090") * 1e12 * MFU_GUESS)
    col = {k: v["RTX 4090 (estimate: pagating.flops)"] for k, v in perf_table(md).items()}
    assert close(col["time per step"], step + STEP_OVERHEAD_S)
    assert close(col["whole sweep"], 4 * int(p["train.max_steps"]) * (step + STEP_OVERHEAD_S))
    assert col["whole sweep"].endswith("(4 runs)"), col
