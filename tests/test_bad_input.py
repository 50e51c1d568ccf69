"""Bad input the user can cause: one line, exit 2, no MLflow run, nothing half-written."""

import shutil
import subprocess
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
