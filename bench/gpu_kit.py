"""The kit bench/gpu_check.sh's acceptance part carries to an offline GPU machine (no package index there).

    .venv/bin/python bench/gpu_kit.py make [gpu-kit]          # = `make gpu-kit`; needs PyPI, not a GPU
    python bench/gpu_kit.py install KIT VENV [--emulate]      # gpu_check.sh: venv + offline install of the wheels
    python bench/gpu_kit.py box-env DIR                        # (CPU dry run) a venv that looks like the GPU box

`make` writes, into a folder kept out of git (.gitignore):
  wheels/ + requirements.txt   what `pagating train` / `sweep` need that the GPU machine lacks, for Linux
                               x86_64 CPython 3.11: the dependency closure of NEEDED minus that of BOX (what the
                               machine has: torch, transformers, tokenizers, nvidia-ml-py), at the versions
                               installed here, downloaded with `pip download --no-deps` one by one;
  data/seed/                   the sample corpus prepared at the seed's shape (vocab_size 50257 asked, block 128);
  data/tiny/                   the sample profile's own prepared data (the --nproc and sweep checks).
The data is prepared here because `prepare` needs `datasets` (pyarrow, pandas: ~60 MB of wheels), which
the training path never imports.

`box-env DIR` makes DIR a fresh venv whose only packages are BOX's closure, linked from this
interpreter's environment: the wheels then install into it exactly as on the GPU machine.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the offline GPU machine has (bench/gpu_check.sh's header), and what the acceptance part imports.
BOX = ["torch", "transformers", "tokenizers", "nvidia-ml-py"]
# mlflow-skinny, not mlflow: the full package adds pyarrow, scipy, scikit-learn, matplotlib, flask, ... (~150 MB)
# for the server and UI, which a local sqlite store does not use; sqlalchemy + alembic are that store;
# pandas is imported by mlflow.pytorch (the final model).
NEEDED = ["mlflow-skinny", "sqlalchemy", "alembic", "pandas", "accelerate", "psutil", "pyyaml", "numpy", "requests"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64",
             "linux_x86_64"]
TARGET = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> dict[str, str]:
    """{normalized name: installed version} of names and everything they require (markers evaluated for
    Linux x86_64 CPython 3.11, no extras), from this environment's installed metadata."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_kit: {name} is not installed here; install the project first (make setup)") from None
        seen[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**TARGET, "extra": ""}):
                continue
            todo.append(req.name)
    return seen


def missing() -> dict[str, str]:
    box = closure(BOX)
    return {n: v for n, v in sorted(closure(NEEDED).items()) if n not in box}


def make(out: Path) -> dict:
    wheels = out / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    need = missing()
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.11", "--implementation", "cp", "--dest", str(wheels)]
    for p in PLATFORMS:
        base += ["--platform", p]
    subprocess.run([*base, *(f"{n}=={v}" for n, v in need.items())], check=True)
    # Top-level pins only: pip resolves the rest from the folder (and finds BOX's packages installed).
    (out / "requirements.txt").write_text("".join(f"{n}=={closure([n])[norm(n)]}\n" for n in NEEDED))
    (out / "missing.json").write_text(json.dumps(need, indent=1) + "\n")
    prepare_data(out / "data")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"dir": str(out), "wheels": len(list(wheels.glob("*.whl"))), "mb": round(size / 1e6, 1)}


def prepare_data(out: Path) -> None:
    """Sample corpus -> data/tiny (the sample profile) and data/seed (vocab 50257 asked, block 128)."""
    sys.path.insert(0, str(ROOT))
    from pagating.config import load_config
    from pagating.data.corpora import build_sample
    from pagating.data.prepare import prepare

    out = out.resolve()  # prepare runs in a temp project: a relative folder would land (and vanish) there
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        shutil.copy(ROOT / "params.yaml", "params.yaml")
        build_sample(Path(tmp) / "data" / "raw")
        for name, sets in (("tiny", {}), ("seed", {"data.vocab_size": "50257", "data.block_size": "128"})):
            prepare(load_config("sample", {**sets, "data.prepared_dir": str(out / name)}))


def box_env(venv: Path) -> None:
    """A venv seeing only BOX's closure (symlinked from this environment) via a .pth: the GPU machine's view."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # venv's bundled setuptools would shadow the one torch requires (>= 77): the box has torch's.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    farm = venv / "box-site"
    farm.mkdir()
    for name in closure(BOX):
        dist = metadata.distribution(name)
        for f in dist.files or []:
            top = Path(f).parts[0]
            if top == ".." or (farm / top).exists() or (farm / top).is_symlink():
                continue
            src = Path(dist.locate_file(top))
            if src.exists():
                (farm / top).symlink_to(src)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "gpu_box.pth").write_text(str(farm) + "\n")


def install(kit: Path, venv: Path, emulate: bool) -> dict:
    """A venv for the acceptance part: the machine's packages (--system-site-packages; emulated: BOX's closure
    from here) + the kit's wheels installed offline. Prints where its python is."""
    import time

    t0 = time.perf_counter()
    if emulate:
        box_env(venv)
    else:
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(kit / "wheels"),
                    "-r", str(kit / "requirements.txt")], check=True)
    probe = "import mlflow, accelerate, sqlalchemy, alembic, psutil, torch, transformers; print(mlflow.__version__)"
    version = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return {"python": py, "mlflow": version, "emulated_box": emulate, "install_s": round(time.perf_counter() - t0, 1),
            "wheels": len(list((kit / "wheels").glob("*.whl")))}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")  # none: `missing` (what `make bench` runs)
    m = sub.add_parser("make")
    m.add_argument("out", nargs="?", default=str(ROOT / "gpu-kit"))
    b = sub.add_parser("box-env")
    b.add_argument("venv")
    sub.add_parser("missing")
    i = sub.add_parser("install")
    i.add_argument("kit")
    i.add_argument("venv")
    i.add_argument("--emulate", action="store_true", help="no GPU machine: a venv with only BOX's packages")
    a = p.parse_args(argv)
    if a.cmd == "make":
        print(json.dumps(make(Path(a.out))))
    elif a.cmd == "box-env":
        box_env(Path(a.venv))
    elif a.cmd == "install":
        kit = Path(a.kit)
        if not (kit / "requirements.txt").is_file():
            raise SystemExit(f"gpu_kit: no kit in {kit}: run `make gpu-kit` on a machine with PyPI and carry gpu-kit/")
        print(json.dumps(install(kit, Path(a.venv), a.emulate)))
    else:
        print(json.dumps(missing(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
