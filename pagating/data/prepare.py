"""`pagating prepare`'s work: raw text -> one tokenizer -> fixed-size token blocks.

    data/raw/wiki.{train,valid,test}.raw
      -> prepare                            one tokenizer, EOS between articles, no padding
    data/prepared/<profile>/{train,validation,test}.bin + meta.json + tokenizer/   (pagating.data.dataset)

datasets, tokenizers and transformers are imported by the functions that use them (seconds each).
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pagating.config import UserError
from pagating.data.corpora import RAW_FILES, hub_unreachable, is_article_heading
from pagating.data.dataset import META_CHECKS, META_FILE, TOKENIZER_DIR, file_md5, project_path
from pagating.disk import disk_full, free_bytes, mib

EOS_TOKEN = "<|endoftext|>"  # GPT-2's, so a trained BPE and the pretrained tokenizer agree
MISSING_RAW_HINT = "run `dvc pull data.dvc` or `pagating data sample`"
# Splits with fewer lines per core stay in this process: the Rust tokenizer already uses every
# core there, and a worker pool costs about half a second to start.
MIN_ROWS_PER_PROCESS = 10_000


# --------------------------------------------------------------------------------------------
# Tokenizer

def train_bpe(files: list[str | os.PathLike], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenizer and decoder) trained on `files`, wrapped as a
    transformers fast tokenizer with EOS (= BOS = UNK, as GPT-2) set. Deterministic: two processes
    train byte-identical tokenizers (tests/test_data.py checks it through prepare's outputs)."""
    # heavy: ~2 s together; only the bpe tokenizer needs them
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
    from transformers import AutoTokenizer  # heavy: ~2 s; only a pretrained tokenizer needs it

    local_only = not Path(name).exists() and hub_unreachable() is not None
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
# Tokenize + pack

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
    raw_dir, prepared_dir = project_path(d["raw_dir"]), project_path(d["prepared_dir"])
    spec, block_size = str(d["tokenizer"]), _positive_int(d, "block_size")
    _check_inputs(d, spec, raw_dir, prepared_dir)
    timings = timings if timings is not None else {}
    files = {split: raw_dir / name for split, name in RAW_FILES.items()}
    t0 = time.perf_counter()
    if spec == "bpe":
        tokenizer = train_bpe([files["train"]], _positive_int(d, "vocab_size"))
    else:
        tokenizer = load_pretrained_tokenizer(spec)
    timings["tokenizer_s"] = time.perf_counter() - t0

    # Build next to the target and swap at the end: an interrupted prepare leaves the old
    # output whole, and files DVC may have linked into its cache are replaced, not rewritten.
    prepared_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=prepared_dir.parent, prefix=f".{prepared_dir.name}."))
    os.chmod(work, 0o755)  # mkdtemp's 0700 would become the output folder's mode
    try:
        splits = _pack(files, tokenizer, block_size, work, timings)
        tokenizer.save_pretrained(str(work / TOKENIZER_DIR))
        meta = _meta(d, tokenizer, block_size, splits, files)
        (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(work / "cache")
        if prepared_dir.exists():
            shutil.rmtree(prepared_dir)
        os.replace(work, prepared_dir)
    except Exception as exc:
        if not disk_full(exc, work):
            raise
        raise _disk_full_error(exc, work, files, prepared_dir) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _check_inputs(d: dict[str, Any], spec: str, raw_dir: Path, prepared_dir: Path) -> None:
    """Everything checkable before any work: the settings, the raw files, and where the output goes."""
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


def _token_dtype(tokenizer) -> type:
    return np.uint16 if len(tokenizer) < 1 << 16 else np.uint32


def _pack(files: dict[str, Path], tokenizer, block_size: int, work: Path, timings: dict[str, float]) -> dict:
    """Tokenize each split and write its whole blocks to work/<split>.bin; returns meta.json's `splits`."""
    import datasets  # heavy: ~2 s; only prepare needs it

    t0 = time.perf_counter()
    eos_id, dtype = int(tokenizer.eos_token_id), _token_dtype(tokenizer)
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
    return splits


def _meta(d: dict[str, Any], tokenizer, block_size: int, splits: dict, files: dict[str, Path]) -> dict[str, Any]:
    return {
        "tokenizer": str(d["tokenizer"]),
        "tokenizer_dir": TOKENIZER_DIR,
        "vocab_size": len(tokenizer),
        "eos_id": int(tokenizer.eos_token_id),
        "block_size": block_size,
        "dtype": np.dtype(_token_dtype(tokenizer)).name,
        "splits": splits,
        "tokens": {s: v["tokens"] for s, v in splits.items()},
        "blocks": {s: v["blocks"] for s, v in splits.items()},
        "source_md5": {p.name: file_md5(p) for p in files.values()},
        "config": {k: d.get(k) for k in META_CHECKS},  # the settings it was made with (check_prepared)
    }


def _disk_full_error(exc: Exception, work: Path, files: dict[str, Path], prepared_dir: Path) -> UserError:
    # Tokens (2-4 bytes each, about one per 4 raw bytes) plus the Arrow cache (about the raw size):
    # twice the raw size is a safe figure.
    need = 2 * sum(p.stat().st_size for p in files.values())
    shutil.rmtree(work, ignore_errors=True)  # first, so that the free space shown is the real one
    return UserError(f"disk full writing {getattr(exc, 'filename', None) or work} (removed; the old output is "
                     f"kept): prepare needs about {mib(need)} free in {prepared_dir.parent}, "
                     f"{mib(free_bytes(work))} are free; free space there or set data.prepared_dir "
                     f"elsewhere")
