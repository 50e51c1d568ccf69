"""Bad input the user can cause: one line, exit 2, no MLflow run, nothing half-written."""

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from mlflow.tracking import MlflowClient


def one_line_exit_2(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def n_runs(uri):
    mlf = MlflowClient(uri)
    return len(mlf.search_runs([e.experiment_id for e in mlf.search_experiments()]))


def test_yaml_syntax_error_names_line_and_column(tmp_path, mlflow_server):
    text = (REPO / "params.yaml").read_text().replace("  max_steps: 300\n", "  max_steps: [300\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    line = text[:text.index("max_steps: [300")].count("\n") + 1
    before = n_runs(mlflow_server.uri)
    proc = run_cli(["train", "--output_dir", str(tmp_path / "o")], cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    msg = one_line_exit_2(proc, "params.yaml: YAML syntax error at line", "column")
    assert int(msg.split("at line ")[1].split(",")[0]) in (line, line + 1)  # where the parser noticed
    assert n_runs(mlflow_server.uri) == before and not (tmp_path / "o").exists()


def test_non_utf8_raw_file_named(sample_project, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(sample_project / "data" / "raw", raw)
    data = (raw / "wiki.valid.raw").read_bytes()
    (raw / "wiki.valid.raw").write_bytes(data[:500] + b"caf\xe9 " + data[500:])  # Latin-1, not UTF-8
    proc = run_cli(["prepare", "--set", f"data.raw_dir={raw}", "--set", f"data.prepared_dir={tmp_path / 'prep'}"],
                   cwd=sample_project)
    one_line_exit_2(proc, "wiki.valid.raw is not UTF-8", "byte 0xe9 at offset 503")
    assert not (tmp_path / "prep").exists() and list(tmp_path.iterdir()) == [raw]


class _Answer(BaseHTTPRequestHandler):
    code, body, ctype = 502, b"<html>Bad Gateway</html>", "text/html"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.code)
        self.send_header("Content-Type", self.ctype)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("code, body, needle", [
    (502, b"<html>Bad Gateway</html>", "answers HTTP 502"),
    (200, b"<html>welcome to nginx</html>", "is not an MLflow tracking server"),
])
def test_broken_proxy_or_other_server_at_tracking_uri(sample_project, tmp_path, code, body, needle):
    handler = type("H", (_Answer,), {"code": code, "body": body})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_address[1]}"
        for verb in (["train", "--output_dir", str(tmp_path / "o")],
                     ["sweep", "--set", f"train.output_dir={tmp_path / 'o'}", "--summary", str(tmp_path / "s.json")]):
            one_line_exit_2(run_cli(verb, cwd=sample_project, env={"MLFLOW_TRACKING_URI": uri}), needle)
        assert list(tmp_path.iterdir()) == []
    finally:
        httpd.shutdown()


def test_full_disk_names_the_folder(sample_project, mlflow_server, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        before = n_runs(mlflow_server.uri)
        proc = run_cli(["train", "--output_dir", str(small / "out"), "--max_steps", "5"], cwd=sample_project,
                       env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
        one_line_exit_2(proc, f"not enough disk space in {small}", "MiB are free")
        assert n_runs(mlflow_server.uri) == before and list(Path(small).iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_output_dir_that_is_a_file_refused_before_any_run(sample_project, mlflow_server, tmp_path):
    (tmp_path / "o").write_text("not a folder")
    before = n_runs(mlflow_server.uri)
    proc = run_cli(["train", "--output_dir", str(tmp_path / "o"), "--max_steps", "2"], cwd=sample_project,
                   env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    one_line_exit_2(proc, f"{tmp_path / 'o'} is a file, not a folder")
    assert n_runs(mlflow_server.uri) == before


def _sample_params(sample_project, sets: dict) -> int:
    """The parameter count `pagating train` builds for the sample profile with `sets` (as train.build)."""
    from pagating import flops
    from pagating.config import load_config
    from pagating.data.dataset import load_meta
    from pagating.model import build_config, build_model, count_parameters

    with contextlib.chdir(sample_project):
        cfg = load_config("sample", sets)
        meta = load_meta(cfg["data"]["prepared_dir"])
    config = build_config(cfg["model"], vocab_size=flops.padded_vocab(meta["vocab_size"]),
                          block_size=meta["block_size"], alpha_mode=cfg["train"]["alpha_mode"], max_steps=4)
    return count_parameters(build_model(config))


def in_small_tmpfs(folder: Path, size: int, cmd: list[str], after: str = "", **kw) -> subprocess.CompletedProcess:
    """`cmd` with a `size`-byte tmpfs on `folder`, in a mount namespace of its own (gone when it exits);
    `after`: shell run there before it goes. Skips the test where no such namespace can be made."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("unshare -m (a private mount namespace for the small tmpfs) is not available here")
    script = (f"mount -t tmpfs -o size={size} tmpfs {folder} || exit 99; {shlex.join(cmd)}; rc=$?; "
              f"{after or ':'}; exit $rc")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600, **kw)
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {proc.stderr.strip()}")
    return proc


@pytest.mark.slow
def test_disk_full_in_prepare(sample_project, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    proc = in_small_tmpfs(small, 512 * 1024, [sys.executable, "-m", "pagating.cli", "prepare", "--set",
                                              f"data.prepared_dir={small / 'prep'}"],
                          after=f"ls -A {small} > {tmp_path / 'listing.txt'}", cwd=sample_project)
    said = [ln for ln in proc.stderr.strip().splitlines() if "examples/s]" not in ln]  # datasets' progress bars
    assert proc.returncode == 2 and len(said) == 1, proc.stderr[-3000:]
    for needle in ("disk full writing", "prepare needs about", "MiB free in", str(small), "data.prepared_dir"):
        assert needle in said[0], said[0]
    assert (tmp_path / "listing.txt").read_text().split() == []  # the half-made output is gone


@pytest.mark.slow
def test_disk_full_at_the_safetensors_write(sample_project, mlflow_server, tmp_path):
    """A tmpfs (own mount namespace) that holds one checkpoint and a half: the pre-check passes, the first
    checkpoint fits, the second fails in safetensors' write of its weights: one line, exit 2, run FAILED."""
    sets = {"model.n_embd": 256, "model.n_head": 4}
    n = _sample_params(sample_project, sets)
    small, listing = tmp_path / "small", tmp_path / "listing.txt"
    small.mkdir()
    train = [sys.executable, "-m", "pagating.cli", "train", "--output_dir", str(small / "out"), "--max_steps", "4",
             "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--batch_size", "4",
             "--set", "tracking.experiment_prefix=diskfull"]
    train += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = in_small_tmpfs(small, int(13.5 * n), train, cwd=sample_project,
                          after=f"find {small} -name 'checkpoint-*' -o -name pagating_checkpoint.json > {listing}",
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "disk full writing" in last and "MiB" in last and str(small / "out") in last, last
    mlf = MlflowClient(mlflow_server.uri)
    runs = mlf.search_runs([mlf.get_experiment_by_name("diskfull-sample").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], [r.info for r in runs]
    error = runs[0].data.tags["pagating.error"]
    assert error.startswith("disk full writing") and "SafetensorError" in error, error
    # The whole first checkpoint stays (marker and all); the cut-off second one is gone.
    found = sorted(Path(p).name for p in listing.read_text().split())
    assert found == ["checkpoint-2", "pagating_checkpoint.json"], found
