"""The MLproject file, generated from the settings' declarations, the verbs' parsers and params.yaml.

`python -m pagating.mlproject > MLproject` writes it; tests/test_config.py checks the committed file is
current. A top-floor module: it reads the parsers of the verbs (pagating.cli's map), so nothing below it has
to know the CLI.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

import yaml

from pagating.cli import VERBS
from pagating.config import SETTINGS, load_config

_SEED_PARAMS = ("train.alpha_mode", "train.learning_rate", "train.batch_size", "train.max_steps", "model.unit",
                "train.seed", "train.output_dir", "resume")
# Entry point -> (verb, its fixed profile or None for a `profile` parameter, parameters). A parameter is a
# declared setting (typed, default = the profile's value) or an option of the verb (default = its default).
ENTRY_POINTS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "main": ("sweep", None, ("shard", "gpus")),
    "sweep": ("sweep", None, ("shard", "gpus")),
    "train": ("train", "sample", _SEED_PARAMS),
    "train_wikitext103": ("train", "wikitext103", _SEED_PARAMS),
    "report": ("report", None, ()),
}

_MLPROJECT_HEADER = """\
# Generated from pagating/mlproject.py (`python -m pagating.mlproject > MLproject`); tests/test_config.py
# checks it is current. `mlflow run . -e <entry> --env-manager local` (plain `mlflow run . -e <entry>` builds
# conda.yaml's env where conda is installed). Each entry calls the same function as its `pagating` verb and its
# dvc.yaml stage. Every default is the value the run itself resolves from params.yaml (`train` has the sample
# profile's, `train_wikitext103` the wikitext103 profile's), so `mlflow run` logs what the run uses; MLflow has
# no integer type, so whole numbers are `float` parameters. Runs land in `pagating-<profile>`: the run
# `mlflow run` opens becomes the sweep's parent when it is in that experiment (`--experiment-name
# pagating-sample`); otherwise the sweep keeps its parent there and the launcher run only points to it.
"""


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(VERBS[verb]).register_cli(sub)
    return sub.choices[verb]


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).replace("\n...\n", "").strip()


def _parameter(name: str, parser: argparse.ArgumentParser, cfg: dict) -> tuple[str, str, Any]:
    """(flag, MLflow type, default) of one entry-point parameter."""
    if name in SETTINGS:
        s = SETTINGS[name]
        section, _, key = name.partition(".")
        return s.flags[0], "string" if s.type is str else "float", cfg[section][key]
    action = next(a for a in parser._actions if a.dest == name)
    return action.option_strings[0], "string", action.default


def mlproject_text(path: str | os.PathLike | None = None) -> str:
    """The MLproject file, generated from the declarations and params.yaml's values."""
    out = [_MLPROJECT_HEADER, "name: pagating", "", "conda_env: conda.yaml", "", "entry_points:"]
    for entry, (verb, profile, names) in ENTRY_POINTS.items():
        parser, cfg = _verb_parser(verb), load_config(profile, path=path)
        params = [] if profile else [("profile", "string", cfg["profile"])]  # params.yaml's default profile
        command = f"pagating {verb} --profile {profile or '{profile}'}"
        for name in names:
            flag, kind, default = _parameter(name, parser, cfg)
            params.append((flag.lstrip("-"), kind, default))
            command += f" {flag} {{{flag.lstrip('-')}}}"
        out += ["", f"  {entry}:", "    parameters:"]
        out += [f"      {n}: {{type: {k}, default: {_scalar(d)}}}" for n, k, d in params]
        out.append(f"    command: {_scalar(command)}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python -m pagating.mlproject > MLproject")
    sys.stdout.write(mlproject_text())
