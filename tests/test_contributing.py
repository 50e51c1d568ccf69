"""CONTRIBUTING.md lists, per extension, exactly the files the code says that extension touches.

Each list is derived from the code, not restated: for a unit, the files that name a unit with nothing special
(paMishU) plus the package files that name one with its own parameter (paSwishU's β); for an α mode, the files
that name a registered mode's class plus the tests that register a mode of their own; for a setting, the
project files that name settings (declaration, values, stages, MLproject) plus the test of the declarations.
A unit or α mode that a sweep may vary (an axis) also touches params.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

from pagating.config import AXES, SETTINGS

CODE = [p for top in ("pagating", "tests", "bench") for p in (REPO / top).rglob("*.py")
        if p != Path(__file__).resolve()]  # this file names everything it looks for
PROJECT = [REPO / name for name in ("params.yaml", "dvc.yaml", "MLproject")]
LISTED = re.compile(r"`((?:pagating|tests|bench)/[\w/]+\.py|params\.yaml|dvc\.yaml|MLproject)`")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def naming(word: str, files=CODE) -> set[str]:
    """The files among `files` that spell `word` as a whole word."""
    pattern = re.compile(rf"\b{re.escape(word)}\b")
    return {_rel(p) for p in files if pattern.search(p.read_text(encoding="utf-8"))}


def listed(title: str) -> set[str]:
    """The file paths (in backticks) of one `## <title>` section of CONTRIBUTING.md."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return set(LISTED.findall(section))


def _swept(axis: str) -> set[str]:
    return {"params.yaml"} if axis in AXES else set()


def test_a_unit_touches_the_files_contributing_lists():
    package = [p for p in CODE if _rel(p).startswith("pagating/")]
    touched = naming("paMishU") | naming("paSwishU", package) | _swept("unit")
    assert "pagating/config.py" not in touched, "the --unit help comes from UNITS, not a list in config.py"
    assert listed("Add a unit") == touched


def test_an_alpha_mode_touches_the_files_contributing_lists():
    registering = {_rel(p) for p in CODE if _rel(p).startswith("tests/")
                   and re.search(r"from pagating\.alpha import[^\n]*\bregister\b", p.read_text(encoding="utf-8"))}
    touched = naming("CosineSchedulerAlpha") | registering | _swept("alpha_mode")
    assert listed("Add an α mode") == touched


def test_a_setting_touches_the_files_contributing_lists():
    tests = {p for p in naming("SETTINGS") if p.startswith("tests/")}  # the test of the declarations
    # Files that spell settings by key: the declaration, params.yaml, dvc.yaml, MLproject and its generator.
    project = PROJECT + [REPO / "pagating/config.py", REPO / "pagating/mlproject.py"]
    spelled = set().union(*(naming(key.partition(".")[2], project) for key in SETTINGS))
    assert listed("Add a setting") == spelled | tests
