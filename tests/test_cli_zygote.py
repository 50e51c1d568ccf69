"""The tests' zygote (tests/cli_zygote.py) must fork what the end-to-end tests take for a Popen of their own:
else a kill test would kill the wrong process, or the suite would silently fall back to paying the imports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import cli_zygote
import pytest
from conftest import launch_cli


@pytest.fixture()
def silent_server():
    """A tracking URI that accepts connections and never answers: `pagating train` waits on its probe (~5 s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_children_are_real_processes_with_the_callers_pipes(sample_project, silent_server, tmp_path):
    args = ["train", "--max_steps", "2", "--output_dir", str(tmp_path / "o")]
    env = {"MLFLOW_TRACKING_URI": silent_server}
    killed = launch_cli(args, sample_project, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True)
    waited = launch_cli(args, sample_project, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Both forked (two at once), not the fresh-interpreter fallback.
    assert isinstance(killed, cli_zygote.Child) and isinstance(waited, cli_zygote.Child)
    assert killed.poll() is None and os.getpgid(killed.pid) == killed.pid != os.getpgid(waited.pid)
    with pytest.raises(subprocess.TimeoutExpired):
        killed.wait(timeout=0.2)
    # fds 1 and 2 of the child are our pipe (stderr=STDOUT), fd 0 is /dev/null.
    ours = os.fstat(waited.stdout.fileno()).st_ino
    assert [os.stat(f"/proc/{waited.pid}/fd/{fd}").st_ino for fd in (1, 2)] == [ours, ours]
    assert os.readlink(f"/proc/{waited.pid}/fd/0") == os.devnull

    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    out, err = waited.communicate(timeout=120)
    assert err is None and waited.returncode == 2
    assert out.strip().splitlines() == [f"pagating train: error: tracking server {silent_server} is unreachable: "
                                        "start it (`pagating server`) or set MLFLOW_TRACKING_URI to a running one"]
