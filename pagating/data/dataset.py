"""The prepared data as training reads it: data/prepared/<profile>/{train,validation,test}.bin + meta.json +
tokenizer/, checked against the config that asks for it.

The .bin files are flat np.memmap token streams cut to a whole number of blocks; PackedDataset serves
block i as tokens [i * block_size, (i + 1) * block_size). The training step imports this module without
datasets, mlflow or dvc; torch is imported when PackedDataset is first used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pagating.config import UserError, load_config, project_root

META_FILE, TOKENIZER_DIR = "meta.json", "tokenizer"
MISSING_PREPARED_HINT = "run `pagating prepare`"
# What a prepared folder must agree with the config on (meta.json key -> data key).
META_CHECKS = ("source", "tokenizer", "vocab_size", "block_size")


def project_path(path: str | os.PathLike) -> Path:
    """A config path: relative ones are read from the project root (where params.yaml is), as for dvc
    repro, so train and prepare agree given the same config."""
    path = Path(path)
    return path if path.is_absolute() else project_root() / path


def file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def load_meta(prepared_dir: str | os.PathLike) -> dict[str, Any]:
    path = project_path(prepared_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{prepared_dir} not found: {MISSING_PREPARED_HINT}")
    return json.loads(path.read_text())


def prepare_command(cfg: dict[str, Any]) -> str:
    """The `pagating prepare` that writes what `cfg` asks: its profile and any data setting that differs
    from params.yaml (a --set the run was given)."""
    try:
        base = load_config(cfg["profile"])["data"]
    except UserError:
        base = {}
    sets = "".join(f" --set data.{k}={v}" for k, v in sorted(cfg["data"].items()) if base.get(k) != v)
    return f"pagating prepare --profile {cfg['profile']}{sets}"


def check_prepared(cfg: dict[str, Any]) -> dict[str, Any]:
    """meta.json of cfg's prepared folder, after checking it was made from this config and the raw files
    as they are now. The model is built from meta but the run logs the config: they must agree, else
    a run would train one thing and record another. Any difference is a UserError naming the fix."""
    d = cfg["data"]
    try:
        meta = load_meta(d["prepared_dir"])
    except UserError:  # the same line, with the exact command for this config
        raise UserError(f"{d['prepared_dir']} not found: run `{prepare_command(cfg)}`") from None
    made = meta.get("config") or {k: meta.get(k) for k in META_CHECKS}  # older meta: what it measured
    for key in META_CHECKS:
        if key in d and made.get(key) is not None and str(made[key]) != str(d[key]):
            raise UserError(f"{d['prepared_dir']} was prepared with data.{key}={made[key]} but the config says "
                            f"{d[key]}: run `{prepare_command(cfg)}`")
    raw_dir = project_path(d["raw_dir"])
    for name, md5 in (meta.get("source_md5") or {}).items():
        if (raw_dir / name).is_file() and file_md5(raw_dir / name) != md5:
            raise UserError(f"{d['raw_dir']}/{name} changed since {d['prepared_dir']} was prepared: "
                            f"run `{prepare_command(cfg)}`")
    return meta


def load_tokenizer(prepared_dir: str | os.PathLike):
    """The tokenizer prepare used (AutoTokenizer on <prepared_dir>/tokenizer)."""
    from transformers import AutoTokenizer  # heavy: ~2 s; only tokenizing callers need it

    meta = load_meta(prepared_dir)
    return AutoTokenizer.from_pretrained(str(project_path(prepared_dir) / meta.get("tokenizer_dir", TOKENIZER_DIR)))


def _make_packed_dataset():
    import numpy as np  # ~0.1 s: only reading the blocks needs it (sweep, report and cloud import this module)
    import torch  # heavy: ~2 s; `pagating data sample` and a check_prepared never need it

    class PackedDataset(torch.utils.data.Dataset):
        """Block i of a prepared split: {"input_ids", "labels"} as LongTensor[block_size]
        (labels == input_ids; GPT-2 shifts them itself). The memmap opens on first access, so
        DataLoader workers each open their own after the fork."""

        def __init__(self, prepared_dir: str | os.PathLike, split: str, block_size: int | None = None):
            meta = load_meta(prepared_dir)
            if split not in meta["splits"]:
                raise UserError(f"no split {split!r} in {prepared_dir}; choose one of: "
                                f"{', '.join(meta['splits'])}")
            self.path = project_path(prepared_dir) / meta["splits"][split]["file"]
            if not self.path.is_file():
                raise UserError(f"{self.path} not found: {MISSING_PREPARED_HINT}")
            self.dtype = np.dtype(meta["dtype"])
            self.block_size = int(block_size or meta["block_size"])
            self.num_tokens = self.path.stat().st_size // self.dtype.itemsize
            self.num_blocks = self.num_tokens // self.block_size
            self._tokens: np.ndarray | None = None

        def __len__(self) -> int:
            return self.num_blocks

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            if index < 0:
                index += self.num_blocks
            if not 0 <= index < self.num_blocks:
                raise IndexError(f"block {index} out of range ({self.num_blocks} blocks)")
            if self._tokens is None:
                self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
            start = index * self.block_size
            block = torch.from_numpy(self._tokens[start:start + self.block_size].astype(np.int64))
            return {"input_ids": block, "labels": block.clone()}

        def __getstate__(self) -> dict:
            return {**self.__dict__, "_tokens": None}  # a spawned worker reopens the file

    PackedDataset.__module__, PackedDataset.__qualname__ = __name__, "PackedDataset"
    return PackedDataset


def __getattr__(name: str):
    # PEP 562: PackedDataset subclasses torch's Dataset, so build it (and import torch) on first
    # use; `pagating data sample` never pays for torch. Cached in globals, so pickle finds it.
    if name == "PackedDataset":
        cls = globals()["PackedDataset"] = _make_packed_dataset()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
