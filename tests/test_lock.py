"""The install lock (requirements/lock-cpu.txt) holds every direct dependency of pyproject.toml at a version
its range allows, and nothing the CPU default must not download (CUDA wheels)."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / "lock-cpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = Version(version.split(";")[0].strip())
    return pins


def test_lock_in_sync_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = locked()
    for req in direct:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in the lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: run `make lock`"
    assert pins[canonicalize_name("torch")].local == "cpu"  # the CPU build, never PyPI's CUDA one
    cuda = [n for n in pins if n.startswith("nvidia-") and n != "nvidia-ml-py"]
    assert not cuda, f"the CPU lock pulls CUDA wheels: {cuda}"
