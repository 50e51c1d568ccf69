"""DVC, read without importing dvc (that costs seconds): the data's md5 from data.dvc, the default remote
from .dvc/config, and which DVC plugin (a project extra) a remote's URL needs."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import yaml

# DVC remote URL scheme -> the project extra holding its DVC plugin (pyproject.toml)
DVC_EXTRAS = {"s3": "s3", "gs": "gs", "gcs": "gs", "azure": "azure", "ssh": "ssh", "http": "http", "https": "http"}


def data_md5(repo_root: str | os.PathLike = ".") -> str:
    """The md5 data.dvc records for data/raw (a DVC directory hash, "<md5>.dir"); "" if there is no
    data.dvc. Used for the `dvc.data_md5` tracking tag and the run identity."""
    path = Path(repo_root) / "data.dvc"
    if not path.is_file():
        return ""
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    return str(outs[0].get("md5", "")) if outs else ""


def dvc_default_remote(root: Path, with_local: bool = False) -> tuple[str, str] | None:
    """(name, url) of the default remote in the committed .dvc/config, or with `with_local` as this
    machine's DVC sees it (.dvc/config.local too: not part of a checkout, so not what an instance gets).
    Read directly: importing dvc costs seconds. DVC writes sections as `'remote "name"'`."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        cp.read([root / ".dvc" / "config", *([root / ".dvc" / "config.local"] if with_local else [])])
    except configparser.Error:
        return None
    name = cp.get("core", "remote", fallback=None)
    for section in cp.sections():
        m = re.fullmatch(r"""'?remote "(.+)"'?""", section.strip())
        if m and m.group(1) == name and cp.has_option(section, "url"):
            return name, cp.get(section, "url")
    return None


def dvc_extra(url: str | None) -> str:
    """'' for a local path (DVC itself reads it), else the extra: s3://... -> 's3'."""
    scheme = urlsplit(url or "").scheme.lower()
    if len(scheme) <= 1 or scheme == "file":  # a path, or a Windows drive letter
        return ""
    if scheme not in DVC_EXTRAS:
        raise ValueError(f"no DVC plugin known for a {scheme}:// remote; pagating's extras cover "
                         f"{', '.join(sorted(set(DVC_EXTRAS)))}")
    return DVC_EXTRAS[scheme]
