"""What onstart.sh asks of pagating.cloud.instance: CUDA or nothing, and the DVC plugin of each remote kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagating.config import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_no_cuda_where_cuda_is_required_is_one_line_and_no_cpu_fallback(monkeypatch):
    from pagating import runtime, sweep

    monkeypatch.delenv(runtime.TEST_ALLOW_CPU_ENV, raising=False)
    monkeypatch.delenv(runtime.CUDA_ENV, raising=False)
    assert runtime.check_cuda() == (True, "CUDA: not required here")
    assert sweep.parse_gpus("auto") == [None]  # a laptop: the CPU slot
    monkeypatch.setenv(runtime.CUDA_ENV, "2")
    ok, line = runtime.check_cuda()
    assert not ok and "\n" not in line
    assert line.startswith("CUDA required: found 0 usable CUDA GPU(s)") and "expected 2" in line
    with pytest.raises(UserError, match="CUDA required"):
        sweep.parse_gpus("auto")
    monkeypatch.setenv(runtime.TEST_ALLOW_CPU_ENV, "1")
    assert runtime.check_cuda()[0] and sweep.parse_gpus("auto") == [None]


def test_the_dvc_plugin_extra_of_each_remote_kind_is_a_project_extra():
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from pagating.data.dvc import dvc_extra

    for url, extra, plugin in [("s3://b/p", "s3", "dvc-s3"), ("gs://b/p", "gs", "dvc-gs"),
                               ("azure://c/p", "azure", "dvc-azure"), ("ssh://u@h/srv/dvc", "ssh", "dvc-ssh"),
                               ("https://h/dvc", "http", "dvc-http"), ("/srv/dvc", "", None)]:
        assert dvc_extra(url) == extra
        if plugin:
            assert any(dep.startswith(plugin) for dep in extras[extra])
            for doc in ("README.md", "docs/vast.md"):  # the docs name each extra for its remote
                assert f"pagating[{extra}]" in (REPO_ROOT / doc).read_text(), (doc, extra)
    with pytest.raises(ValueError, match="no DVC plugin"):
        dvc_extra("webdav://h/p")


@pytest.mark.parametrize("cmd", [["report", "running: sweep"], ["upload-log"], ["settle"]])
def test_instance_refuses_credentials_in_the_tracking_uri(monkeypatch, tmp_path, capsys, cmd):
    import time

    from pagating.cloud import instance

    log = tmp_path / "onstart.log"
    log.write_text("hello\n")
    for k, v in {"MLFLOW_TRACKING_URI": "http://gpu-runner:pw-in-uri-77e1@127.0.0.1:9", "PAGATING_LOG": str(log),
                 "PAGATING_PARENT_RUN_ID": "0" * 32, "PAGATING_SWEEP_ID": "s1", "CONTAINER_ID": "4242"}.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    assert instance.main(cmd) == 1
    err = capsys.readouterr().err
    assert "carries credentials" in err and "pw-in-uri-77e1" not in err and err.count("\n") == 1
    assert time.time() - t0 < 5  # refused, not retried
