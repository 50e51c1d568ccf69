"""Every setting declared once, and params.yaml -> one plain dict for a profile with overrides applied.

The sections below (one dataclass each) declare each setting's type, default, help and CLI flag.
From them come: the flags of every verb (`add_config_args`), the sweep's axes (`AXES`), the
MLproject parameters (pagating/mlproject.py) and the typing of load_config.
params.yaml holds the values: per-profile blocks for data/model/train/sweep (a profile's block
overrides the declared default), one block for tracking and cloud.

The returned config has the sections of params.yaml: data, model, train, sweep (the chosen
profile's block of each), tracking, cloud, plus `profile`; every declared key is present, so
stages read `cfg[section][key]` and never restate a default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, get_type_hints

import yaml

PROFILED_SECTIONS = ("data", "model", "train", "sweep")
PLAIN_SECTIONS = ("tracking", "cloud")


class UserError(ValueError):
    """A mistake the user can fix: the CLI prints it as one line and exits with status 2."""


# ---- declarations ------------------------------------------------------------------------------

TRAIN_VERBS = ("train", "sweep")  # a sweep passes these on to every child run
CLOUD_VERBS = ("cloud offers", "cloud launch")  # the shared cloud flows, whatever the provider (cloud/cli.py)
SKY_LAUNCH = ("sky launch",)  # SkyPilot places the job itself: only what to rent and spend (no Vast-only filters)


def setting(default: Any, help: str, *, flags: tuple[str, ...] | None = None, verbs: tuple[str, ...] = (),
            axis: bool = False, identity: bool = True) -> Any:
    """One setting: its default (used where params.yaml leaves it out), help, and CLI flag.

    `verbs` are the verbs with a flag of their own for it (every verb has `--set` for all of them);
    `flags` spell it (default `--key`, plus `--key-with-dashes`); `axis`: a sweep grid may vary it;
    `identity=False`: it changes where or how a run goes, not what it computes, so it stays out of the
    config hash (a run resumed on another machine or folder is still the same run).
    """
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, "verbs": verbs,
                                                        "axis": axis, "identity": identity})


@dataclasses.dataclass
class Data:
    """`data`: the corpus and its tokenised, packed form."""
    source: str = setting("sample", "sample (the bundled corpus) | wikitext-103")
    raw_dir: str = setting("data/raw", "raw text folder (WikiText-103 layout)", identity=False)
    prepared_dir: str = setting("data/prepared/sample", "packed blocks + tokenizer, one folder per profile",
                                identity=False)
    tokenizer: str = setting("bpe", "bpe (trained on the train split) | gpt2 (pretrained)")
    vocab_size: int = setting(2048, "vocabulary size of a trained BPE tokenizer")
    block_size: int = setting(64, "tokens per packed block (the context length)")


@dataclasses.dataclass
class Model:
    """`model`: GPT-2 with a paGating MLP."""
    init: str = setting("scratch", "scratch | gpt2 | a checkpoint path (pretrained c_fc -> value path)")
    unit: str = setting("paGLU", "a paGating unit of pagating/units.py (UNITS) | plain (GPT-2's own MLP)",
                        verbs=TRAIN_VERBS[:1], axis=True)
    n_layer: int = setting(2, "transformer blocks")
    n_head: int = setting(2, "attention heads")
    n_embd: int = setting(64, "model width")
    ffn_dim: int = setting(256, "MLP width d_ff")
    param_matched: bool = setting(True, "gated units get d_ff = 2/3 of ffn_dim, so parameters match the plain MLP")
    dropout: float = setting(0.0, "dropout where GPT-2 has it")


@dataclasses.dataclass
class Train:
    """`train`: one training run. The seed's flags (underscores) are the canonical spellings."""
    alpha_mode: str = setting("static_0.5", "an α mode of pagating/alpha.py (static_<a>, learnable, ...)",
                              verbs=TRAIN_VERBS[:1], axis=True)
    learning_rate: float = setting(1e-3, "peak learning rate (cosine schedule)", verbs=TRAIN_VERBS[:1], axis=True)
    batch_size: int = setting(16, "global batch size in blocks", verbs=TRAIN_VERBS)
    max_steps: int = setting(300, "optimizer steps", verbs=TRAIN_VERBS)
    warmup_steps: int = setting(20, "linear warm-up steps", verbs=TRAIN_VERBS)
    weight_decay: float = setting(0.01, "AdamW weight decay (none on α, β, biases, norms)")
    logging_steps: int = setting(10, "log train metrics every N steps", verbs=TRAIN_VERBS, identity=False)
    eval_steps: int = setting(50, "evaluate every N steps", verbs=TRAIN_VERBS)
    save_steps: int = setting(150, "checkpoint every N steps", verbs=TRAIN_VERBS, identity=False)
    max_eval_batches: int = setting(0, "intermediate evals: 0 the whole validation split, N: N batches "
                                                "spread over it (the final eval is always the whole split)")
    seed: int = setting(42, "random seed", verbs=TRAIN_VERBS[:1], axis=True)
    output_dir: str = setting("outputs", "base folder; each run gets a subfolder", verbs=TRAIN_VERBS,
                              identity=False)


@dataclasses.dataclass
class Tracking:
    """`tracking`: MLflow. MLFLOW_TRACKING_URI wins over tracking_uri."""
    tracking_uri: str = setting("sqlite:///mlflow.db", "the embedded default tracking store")
    experiment_prefix: str = setting("pagating", "experiments are named <prefix>-<profile>")
    drain_timeout_s: float = setting(1800, "end of a run: how long the final uploads wait for an absent server")
    retry_max_s: float = setting(30, "longest wait between two tries of a final upload")
    heartbeat_s: float = setting(30, "a training process refreshes its claim on its config this often")
    claim_timeout_s: float = setting(300, "a claim without a heartbeat for this long is taken over "
                                          "(its holder stops writing after half of it)")
    claim_settle_s: float = setting(2, "claiming: base wait before retrying when two processes "
                                       "claimed a config at once")


@dataclasses.dataclass
class Cloud:
    """`cloud`: renting a GPU (`pagating vast`). Its flags keep vast's dashed spellings."""
    gpu_name: str = setting("RTX 4090", "GPU model, Vast spelling ('any' for all)", flags=("--gpu-name",),
                            verbs=CLOUD_VERBS + SKY_LAUNCH)
    min_reliability: float = setting(0.95, "lowest host reliability", flags=("--min-reliability",),
                                     verbs=CLOUD_VERBS)
    min_disk_gb: float = setting(50, "least disk an offer must have (GB)", flags=("--min-disk-gb",),
                                 verbs=CLOUD_VERBS + SKY_LAUNCH)
    min_inet_down_mbps: float = setting(100, "least download bandwidth (Mbit/s)", flags=("--min-inet-down",),
                                        verbs=CLOUD_VERBS)
    budget_usd: float = setting(50, "most the sweep may cost (USD)", flags=("--budget",),
                                  verbs=CLOUD_VERBS + SKY_LAUNCH)
    image: str = setting("pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime", "docker image",
                         verbs=CLOUD_VERBS + SKY_LAUNCH)
    image_cuda: float = setting(12.4, "CUDA of an image whose tag does not say; offers need cuda_max_good >= it",
                                flags=("--image-cuda",), verbs=CLOUD_VERBS)
    start_timeout_min: float = setting(15, "destroy an instance that has not started its onstart by then (min)",
                                       flags=("--start-timeout",), verbs=CLOUD_VERBS[1:])
    max_relaunches: int = setting(2, "`vast watch` re-runs a shard whose instance died before its configs "
                                  "finished at most this often")
    sky_bin: str = setting("", "SkyPilot's `sky` command, installed in its own environment (default: `sky` on PATH)",
                           flags=("--sky-bin",), verbs=("sky launch", "sky status", "sky logs", "sky cancel"))


SECTIONS: dict[str, type] = {"data": Data, "model": Model, "train": Train, "tracking": Tracking, "cloud": Cloud}


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str                 # "train.learning_rate"
    type: type
    default: Any
    help: str
    flags: tuple[str, ...]   # CLI spellings, first one canonical
    verbs: tuple[str, ...]
    axis: bool
    identity: bool           # in the config hash


def _settings() -> dict[str, Setting]:
    out = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = f.name
            flags = f.metadata["flags"] or tuple(dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}")))
            out[f"{section}.{name}"] = Setting(f"{section}.{name}", hints[name], f.default, f.metadata["help"],
                                               flags, f.metadata["verbs"], f.metadata["axis"], f.metadata["identity"])
    return out


SETTINGS: dict[str, Setting] = _settings()
# Grid axis (params.yaml `sweep` key) -> the setting it varies.
AXES: dict[str, str] = {s.key.partition(".")[2]: s.key for s in SETTINGS.values() if s.axis}


@dataclasses.dataclass(frozen=True)
class Config:
    """A loaded config read through its declarations: `view(cfg).train.max_steps` is the declared int,
    so no reader casts. The dict stays what is passed on, logged and hashed."""
    profile: str
    data: Data
    model: Model
    train: Train
    tracking: Tracking
    cloud: Cloud
    sweep: dict[str, Any]


def view(cfg: dict[str, Any]) -> Config:
    """The typed view of a load_config dict (load_config has typed every declared key)."""
    sections = {name: cls(**{f.name: cfg[name][f.name] for f in dataclasses.fields(cls)})
                for name, cls in SECTIONS.items()}
    return Config(profile=cfg["profile"], sweep=cfg.get("sweep") or {}, **sections)


def defaults(section: str) -> dict[str, Any]:
    """A section's declared defaults: {"dropout": 0.0, ...}."""
    return {s.key.partition(".")[2]: s.default for s in SETTINGS.values() if s.key.startswith(section + ".")}


def typed(key: str, value: Any) -> Any:
    """`value` as the declared type of `key`, or a UserError naming the setting."""
    kind = SETTINGS[key].type
    if kind is str:
        return value if isinstance(value, str) else str(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{key} must be a number, got {value!r}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{key} must be a whole number, got {value!r}")
        return int(value)  # MLproject has no int type: `-P batch_size=16` may arrive as 16.0
    return value


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
    for section in SECTIONS:  # every declared key present: readers never restate a default
        cfg[section] = {**defaults(section), **cfg[section]}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if section not in cfg or not key or not isinstance(cfg[section], dict):
            raise UserError(f"unknown setting {dotted!r}; use <section>.<key> with section one of "
                            f"{', '.join(PROFILED_SECTIONS + PLAIN_SECTIONS)}")
        if key not in cfg[section] and section != "sweep":  # new sweep axes are checked by the sweep
            raise UserError(f"unknown setting {dotted!r}; {section} has: {', '.join(sorted(cfg[section]))}")
        declared = SETTINGS.get(dotted)
        # A string setting keeps the text as given (YAML would turn `yes` into True, `2024` into 2024).
        cfg[section][key] = value if declared and declared.type is str and isinstance(value, str) else _coerce(value)
    for key in SETTINGS:
        section, _, name = key.partition(".")
        cfg[section][name] = typed(key, cfg[section][name])
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


def _flag_value(text: str) -> str | None:
    # "" means "not given" (an empty MLproject parameter); load_config types the rest.
    return None if text == "" else text


def add_config_args(p: argparse.ArgumentParser, verb: str, default_profile: str | None = None,
                    helps: dict[str, str] | None = None) -> None:
    """`--profile`, `--set` and the declared flags of `verb` ("train", "vast launch", ...).

    A flag's dest is its setting's key, so `config_from_args` needs no table of its own. `helps`:
    help known only to the verb's module (the α modes' registry), by setting key.
    """
    p.add_argument("--profile", default=default_profile,
                   help=f"params.yaml profile (default: {default_profile or 'the `profile` of params.yaml'})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any params.yaml value, e.g. --set model.ffn_dim=512 (repeatable)")
    for s in SETTINGS.values():
        if verb in s.verbs:
            p.add_argument(*s.flags, dest=s.key, type=_flag_value, default=None, metavar=s.type.__name__.upper(),
                           help=f"{(helps or {}).get(s.key, s.help)} (params {s.key})")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The declared flags given on the command line, then `--set`s: load_config overrides."""
    out = {key: getattr(args, key) for key in SETTINGS if getattr(args, key, None) is not None}
    out.update(parse_sets(args.sets))
    return out


def sets_from_args(args: argparse.Namespace) -> list[str]:
    """The same overrides as `--set` items, for a command that starts another (sweep -> train)."""
    return [f"{key}={value}" for key, value in overrides_from_args(args).items()]


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return load_config(args.profile or None, overrides_from_args(args))


# Not a paGating unit: GPT-2's own GELU MLP (c_fc, gelu, c_proj), the baseline a sweep can include. Here, not
# in units.py, so the torch-free modules (sweep, report, flops) ask the same question as the model.
PLAIN = "plain"


def is_plain(unit: str) -> bool:
    return unit.lower() == PLAIN


def mlp_width(ffn_dim: int, param_matched: bool, unit: str) -> int:
    """The MLP's hidden width as the model builds it (and MFU and cost projections count it): a gated unit
    has three d_model x d_ff matrices instead of two, so param_matched takes 2/3 of ffn_dim."""
    return ffn_dim * 2 // 3 if param_matched and not is_plain(unit) else ffn_dim


def experiment_name(cfg: dict[str, Any]) -> str:
    """The MLflow experiment of a profile: `pagating-<profile>`."""
    return f"{cfg['tracking']['experiment_prefix']}-{cfg['profile']}"


def flatten(cfg: dict[str, Any], sections=("data", "model", "train")) -> dict[str, Any]:
    """{"train.learning_rate": 0.001, ...}: the one spelling used for MLflow params."""
    flat = {"profile": cfg["profile"]}
    for section in sections:
        for key, value in cfg.get(section, {}).items():
            flat[f"{section}.{key}"] = value
    return flat


def config_hash(cfg: dict[str, Any], data_md5: str = "") -> str:
    """Identity of a run's config (tag pagating.config_hash): same hash = same experiment. Settings
    declared `identity=False` stay out of it."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in SETTINGS or SETTINGS[k].identity}
    flat["data.md5"] = data_md5
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
