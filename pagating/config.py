"""params.yaml -> one plain dict for a profile, with CLI / MLproject overrides applied.

The returned config has the sections of DESIGN.md: data, model, train, sweep (the chosen
profile's block of each), tracking, cloud, plus `profile`. Every stage reads only this dict.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

PROFILED_SECTIONS = ("data", "model", "train", "sweep")
PLAIN_SECTIONS = ("tracking", "cloud")


class UserError(ValueError):
    """A mistake the user can fix: the CLI prints it as one line and exits with status 2."""


def project_root() -> Path:
    """The directory holding params.yaml: the current one if it has it (mlflow run / dvc repro
    run from the project), else the checkout this package was installed from."""
    here = Path.cwd()
    if (here / "params.yaml").exists():
        return here
    return Path(__file__).resolve().parent.parent


def params_path() -> Path:
    return Path(os.environ.get("PAGATING_PARAMS", project_root() / "params.yaml"))


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _numbers(value: Any) -> Any:
    # PyYAML follows YAML 1.1, where `5e-4` (no dot) is a string; researchers write it that way.
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _coerce(value: Any) -> Any:
    # Overrides arrive as strings from argparse / MLproject; YAML gives them their natural type.
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return _numbers(value)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte offset {exc.start}): re-save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        raise UserError(f"{path}: YAML syntax error{where}: {what}; fix it and run again") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML error: {str(exc).splitlines()[0]}; fix it and run again") from None


def load_config(profile: str | None = None, overrides: dict[str, Any] | None = None,
                path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load params.yaml for `profile` and apply `overrides` ({"train.learning_rate": "1e-3"}).

    Unknown profiles, sections or keys are user errors: a typo must not silently do nothing.
    """
    path = Path(path) if path else params_path()
    if not path.exists():
        raise UserError(f"{path} not found: run from the project root (the folder with params.yaml)")
    raw = _numbers(_read_yaml(path) or {})
    profile = profile or raw.get("profile", "sample")
    profiles = sorted(raw.get("data", {}))
    if profile not in profiles:
        raise UserError(f"unknown profile {profile!r}; choose one of: {', '.join(profiles)}")
    cfg: dict[str, Any] = {"profile": profile}
    for section in PROFILED_SECTIONS:
        cfg[section] = copy.deepcopy((raw.get(section) or {}).get(profile) or {})
    for section in PLAIN_SECTIONS:
        cfg[section] = copy.deepcopy(raw.get(section) or {})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in cfg or not key or not isinstance(cfg[section], dict):
            raise UserError(f"unknown setting {dotted!r}; use <section>.<key> with section one of "
                            f"{', '.join(PROFILED_SECTIONS + PLAIN_SECTIONS)}")
        if key not in cfg[section] and section != "sweep":  # new sweep axes are checked by the sweep
            raise UserError(f"unknown setting {dotted!r}; {section} has: {', '.join(sorted(cfg[section]))}")
        cfg[section][key] = _coerce(value)
    return cfg


def parse_sets(items: list[str]) -> dict[str, str]:
    """`--set SECTION.KEY=VALUE` flags (every verb that takes them) -> load_config overrides."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def experiment_name(cfg: dict[str, Any]) -> str:
    """The MLflow experiment of a profile: `pagating-<profile>`."""
    return f"{cfg['tracking'].get('experiment_prefix', 'pagating')}-{cfg['profile']}"


def flatten(cfg: dict[str, Any], sections=("data", "model", "train")) -> dict[str, Any]:
    """{"train.learning_rate": 0.001, ...}: the one spelling used for MLflow params."""
    flat = {"profile": cfg["profile"]}
    for section in sections:
        for key, value in cfg.get(section, {}).items():
            flat[f"{section}.{key}"] = value
    return flat


# Settings that change where or how fast a run goes but not what it computes; they stay out of
# the identity hash so a resumed run on another machine or folder is still the same run.
NON_IDENTITY_KEYS = {"train.output_dir", "train.logging_steps", "train.save_steps", "train.device",
                     "train.compile", "train.resume", "data.raw_dir", "data.prepared_dir"}


def config_hash(cfg: dict[str, Any], data_md5: str = "") -> str:
    """Identity of a run's config (tag pagating.config_hash): same hash = same experiment."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in NON_IDENTITY_KEYS}
    flat["data.md5"] = data_md5
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
