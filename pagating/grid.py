"""The sweep's grid: its configs, their shards and the sweep's identity (pure arithmetic over settings).

Below the sweep, the report's cost projection and the cloud flows, which all need the same slices.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from typing import Any

from pagating.config import AXES, UserError, is_plain, typed


def grid(cfg: dict) -> list[dict[str, Any]]:
    """The configs as override dicts ({"train.alpha_mode": ..., ...}), in params.yaml order."""
    axes = cfg.get("sweep") or {}
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise UserError(f"unknown grid key {', '.join(unknown)} in sweep; valid keys: {', '.join(AXES)}")
    values = []
    for key, vals in axes.items():
        vals = vals if isinstance(vals, list) else [vals]
        if not vals:
            raise UserError(f"empty grid: sweep.{key} has no values; give at least one")
        values.append([(AXES[key], typed(AXES[key], v)) for v in vals])
    if not values:
        raise UserError("empty grid: params.yaml `sweep` has no axes; give alpha_mode and learning_rate lists")
    configs, seen = [], set()
    for combo in itertools.product(*values):
        config = dict(combo)
        if is_plain(config.get("model.unit", cfg["model"]["unit"])):
            config.pop("train.alpha_mode", None)  # GPT-2's own MLP has no α: one run per remaining cell
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            configs.append(config)
    return configs


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UserError(f"--shard wants i/n (e.g. 0/2), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n (shards are numbered 0/{max(n, 1)} ..)")
    return i, n


def take_shard(configs: list, i: int, n: int) -> list:
    """Round-robin slice: shards are disjoint, cover the grid, and differ in size by at most one."""
    return configs[i::n]


def config_for(base: dict, overrides: dict[str, Any]) -> dict:
    cfg = copy.deepcopy(base)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        cfg[section][key] = value
    return cfg


def sweep_identity(base: dict, configs: list[dict]) -> str:
    """Same grid on the same settings = same sweep id, so a re-run continues the same parent."""
    blob = json.dumps({"profile": base["profile"], "train": base["train"], "model": base["model"],
                       "data": {k: v for k, v in base["data"].items() if not k.endswith("_dir")},
                       "grid": configs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
