"""How MLflow shows a sweep: `mlflow run` with no arguments on a fresh clone, MLflow's own run fields, the
logged model, system metrics, the parent's summary, and the UI itself in headless Chromium.

One 2-config sweep (tiny steps, set in the clone's params.yaml) serves every test here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import MLFLOW_BIN, REPO, fake_nvml_dir, run_cli
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

SECRET_REMOTE = "https://someone:s3cret-token@example.com/lab/pagating.git"


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=root, check=True,
                   capture_output=True)


def fresh_clone(dst: Path) -> None:
    """The project's files (as committed + this checkout's changes) in a new git repo whose origin URL
    carries credentials, as a clone from a private HTTPS remote would."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["train"]["sample"].update(max_steps=10, eval_steps=5, save_steps=10, logging_steps=5, batch_size=8,
                                     warmup_steps=2)
    params["sweep"]["sample"] = {"alpha_mode": ["static_0.0", "learnable"], "learning_rate": [2.0e-3]}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-q", "-m", "fresh")
    _git(dst, "remote", "add", "origin", SECRET_REMOTE)


@pytest.fixture(scope="module")
def ui_sweep(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("clone")
    fresh_clone(root)
    fake = fake_nvml_dir(tmp_path_factory.mktemp("fakenvml"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH")) if p)}
    for args in (["data", "sample"], ["prepare"]):
        run_cli(args, cwd=root, env=env, check=True)
    runs = []
    for _ in range(2):  # the README's command, bare; the second time every config is done
        proc = subprocess.run([MLFLOW_BIN, "run", ".", "-e", "sweep", "--env-manager", "local"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs.append(proc)
    summary = json.loads((root / "reports" / "sweep.json").read_text())
    return {"root": root, "env": env, "runs": runs, "summary": summary, "mlf": MlflowClient(mlflow_server.uri),
            "uri": mlflow_server.uri}


def test_mlflow_run_bare_lands_in_the_profile_experiment_and_rerun_skips(ui_sweep):
    first, second = ui_sweep["runs"]
    assert "2 ran, 0 skipped, 0 resumed, 0 failed" in first.stdout
    assert "0 ran, 2 skipped, 0 resumed, 0 failed" in second.stdout
    mlf, summary = ui_sweep["mlf"], ui_sweep["summary"]
    exp = mlf.get_experiment(summary["experiment_id"])
    assert exp.name == "pagating-sample"
    kids = mlf.search_runs([exp.experiment_id],
                           filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    # MLflow's own run went to Default (no --experiment-name): it points to the sweep, one line says why.
    launchers = mlf.search_runs(["0"], filter_string="tags.`mlflow.project.entryPoint` = 'sweep'")
    assert len(launchers) == 2 and all(r.info.status == "FINISHED" for r in launchers)
    assert all(r.data.params == {"profile": "sample", "shard": "0/1", "gpus": "auto"} for r in launchers)
    assert f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in \
        launchers[0].data.tags["mlflow.note.content"]
    hint = [ln for ln in first.stderr.splitlines() if "--experiment-name pagating-sample" in ln]
    assert len(hint) == 1


def test_runs_carry_mlflow_fields_model_and_system_metrics(ui_sweep, monkeypatch):
    import mlflow
    import torch

    from pagating.model import load_model

    mlf, summary, root = ui_sweep["mlf"], ui_sweep["summary"], ui_sweep["root"]
    exp = mlf.get_experiment(summary["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    kids = [mlf.get_run(c["run_id"]) for c in summary["configs"]]
    for run in kids:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.source.git.repoURL"] == "https://example.com/lab/pagating.git"  # no credentials
        assert tags["mlflow.source.type"] == "PROJECT" and tags["mlflow.project.entryPoint"] == "train"
        assert tags["mlflow.source.name"] == "https://example.com/lab/pagating.git"
        assert tags["mlflow.user"] and tags["pagating.config_hash"] and tags["pagating.sweep_id"] == summary["sweep_id"]
        note = tags["mlflow.note.content"]
        assert run.data.params["train.alpha_mode"] in note and f"git checkout {commit} && pagating train" in note
        assert "s3cret" not in json.dumps(tags)
        inputs = {(i.dataset.name, i.dataset.digest, tuple(t.value for t in i.tags if t.key == "mlflow.data.context"))
                  for i in run.inputs.dataset_inputs}
        assert inputs == {("sample", md5, ("training",)), ("sample/validation", md5, ("eval",))}
        m = run.data.metrics
        assert m["system/gpu_0_utilization_percentage"] == 87 and m["system/gpu_0_memory_usage_megabytes"] == 3000
        assert m["system/gpu_0_power_usage_watts"] == 215 and m["system/gpu_0_temperature_celsius"] == 61
        assert "system/cpu_utilization_percentage" in m and "system/system_memory_usage_megabytes" in m
        assert not any(k.startswith("gpu/") for k in m)
    # The final model: an MLflow model of the run, with its eval metrics, giving the trained model's logits.
    run = kids[0]
    model_ids = [o.model_id for o in run.outputs.model_outputs]
    assert len(model_ids) == 1
    logged = mlf.get_logged_model(model_ids[0])
    assert logged.name == "model" and logged.source_run_id == run.info.run_id
    assert {m.key for m in logged.metrics} >= {"final/eval_loss", "final/eval_ppl", "best/eval_loss"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ui_sweep["uri"])  # for this test only
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model").eval()
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").metadata.model_id == model_ids[0]
    (ref_dir,) = [p.parent for p in (root / "outputs").glob("*/pagating_run.json")
                  if json.loads(p.read_text())["run_id"] == run.info.run_id]
    ref = load_model(str(ref_dir / "model")).eval()
    x = torch.randint(0, 2000, (2, 16))
    assert torch.equal(loaded(x).logits, ref(x).logits)
    # The sweep row: grid as params, the best config and its figures as metrics.
    parent = mlf.get_run(summary["parent_run_id"])
    assert json.loads(parent.data.params["sweep.alpha_mode"]) == ["static_0.0", "learnable"]
    # One seed per config: the best config by mean validation loss is the run with the lowest final/eval_loss.
    best = min(kids, key=lambda r: r.data.metrics["final/eval_loss"])
    assert parent.data.metrics["final/eval_loss"] == best.data.metrics["final/eval_loss"]
    assert parent.data.metrics["final/eval_ppl"] == pytest.approx(best.data.metrics["final/eval_ppl"], rel=1e-12)
    assert parent.data.metrics["test/loss"] == best.data.metrics["test/loss"]
    assert parent.data.metrics["best/seeds"] == 1
    assert parent.data.tags["pagating.best_run_id"] == best.info.run_id
    assert parent.data.tags["pagating.best_config"] == best.info.run_name
    assert parent.data.tags["mlflow.source.git.commit"] == commit
    link = f"{ui_sweep['uri']}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert f"runs: {link}" in ui_sweep["runs"][0].stdout
    assert (f"sweep run: {ui_sweep['uri']}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
            "?workflowType=machine_learning") in ui_sweep["runs"][0].stdout


def test_report_attaches_to_the_sweep_and_registers_the_best_model(ui_sweep):
    proc = run_cli(["report", "--register", "pagating-best"], cwd=ui_sweep["root"], env=ui_sweep["env"], check=True)
    mlf, summary = ui_sweep["mlf"], ui_sweep["summary"]
    parent = summary["parent_run_id"]
    names = {a.path for a in mlf.list_artifacts(parent, "report")} | \
        {a.path for a in mlf.list_artifacts(parent, "report/plots")}
    assert {"report/summary.md", "report/metrics.json", "report/plots/eval_loss.png"} <= names
    best_run = mlf.get_run(parent).data.tags["pagating.best_run_id"]
    (version,) = mlf.search_model_versions("name = 'pagating-best'")
    assert version.run_id == best_run
    assert version.source == f"models:/{mlf.get_run(best_run).outputs.model_outputs[0].model_id}"
    assert mlf.get_model_version_by_alias("pagating-best", "champion").version == version.version
    name = mlf.get_run(best_run).info.run_name
    assert f"registered: pagating-best v1 @champion: {name}, run {best_run}" in proc.stdout


# The UI in a real browser --------------------------------------------------------------------------------

def _chromium() -> tuple[str, str]:
    """Debian's chromium + chromium-driver, installed here if missing (CI is a fresh root machine)."""
    paths = (shutil.which("chromium"), shutil.which("chromedriver"))
    if all(paths):
        return paths
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get is unavailable or not root here")
    subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], check=True,
                   capture_output=True, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    yield d
    d.quit()


def test_mlflow_ui_shows_the_sweep(ui_sweep, browser, tmp_path):
    """What a person sees after clicking the link the sweep printed (screenshots under tmp_path)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    (link,) = [ln.split("runs: ", 1)[1] for ln in ui_sweep["runs"][0].stdout.splitlines() if ln.startswith("runs: ")]
    wait = WebDriverWait(browser, 60, poll_frequency=0.5)
    browser.get(link)
    parent = wait.until(lambda d: d.find_element(By.PARTIAL_LINK_TEXT, f"sweep {ui_sweep['summary']['sweep_id']}"))
    browser.save_screenshot(str(tmp_path / "1-runs-table.png"))
    assert "Model training" in browser.find_element(By.TAG_NAME, "body").text  # not the GenAI overview
    # Expand the sweep row: both children, each with its Dataset, Source and Models cell filled.
    parent.find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]").find_element(By.TAG_NAME, "button").click()
    kids = [c["run_id"] for c in ui_sweep["summary"]["configs"]]

    def cells(d):
        out = {rid: {} for rid in kids}
        for cell in d.find_elements(By.CSS_SELECTOR, "[role='row'][row-id] [role='gridcell']"):
            rid = cell.find_element(By.XPATH, "./ancestor::*[@role='row'][1]").get_attribute("row-id")
            if rid in out:
                out[rid][cell.get_attribute("col-id")] = cell.text.strip()
        return out if all(len(v) > 3 for v in out.values()) else None

    table = wait.until(cells)
    browser.save_screenshot(str(tmp_path / "2-sweep-expanded.png"))
    for rid, row in table.items():
        for col in ("Dataset", "Source", "Models"):
            text = row.get(f"attributes.`{col}`", "")
            assert text not in ("", "-"), (rid, col, row)
        assert row["attributes.`Dataset`"].startswith("sample (4b8e") and row["attributes.`Source`"] == "pagating:train"
    # The chart view: the children's eval/loss curves.
    browser.execute_script("arguments[0].click()", browser.find_element(By.CSS_SELECTOR, "input[value='CHART']"))
    search = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))
    search.send_keys("eval/loss", Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.XPATH, "//*[normalize-space(text())='eval/loss']"))
    legends = [f"{c['name']} (eval/loss)" for c in ui_sweep["summary"]["configs"]]

    def drawn(d):  # the chart's legend comes after its title, later still on a busy machine
        body = d.find_element(By.TAG_NAME, "body").text
        return body if "No charts in this section" in body or all(x in body for x in legends) else None

    try:
        body = wait.until(drawn)
    finally:
        browser.save_screenshot(str(tmp_path / "3-charts.png"))
    assert "No charts in this section" not in body
    assert all(x in body for x in legends), body[-2000:]
