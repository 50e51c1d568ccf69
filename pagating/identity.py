"""A run's identity, computed in one place: its config hash, its experiment and its run name.

`pagating train` (train.check), its `--nproc` launcher, the sweep's plan and the report/cloud views of a
grid all ask RunIdentity, so they agree on which MLflow run a config is and which folder it trains in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagating.config import config_hash, experiment_name, is_plain, view


def config_label(unit: str, alpha_mode: str, lr: float | None) -> str:
    """A config's name, the run name without the seed (the report groups seeds under it)."""
    lr_text = "?" if lr is None else f"{lr:g}"
    return f"plain lr={lr_text}" if is_plain(unit) else f"{unit} {alpha_mode} lr={lr_text}"  # plain: no α


def run_name(cfg: dict[str, Any]) -> str:
    """`<unit> <alpha_mode> lr=<lr>`, plus ` seed=<seed>` when the sweep grid repeats configs over seeds (so
    one parent never holds two runs of the same name)."""
    c = view(cfg)
    t = c.train
    name = config_label(c.model.unit, t.alpha_mode, t.learning_rate)
    seeds = c.sweep.get("seed")
    return f"{name} seed={t.seed}" if isinstance(seeds, list) and len(seeds) > 1 else name


@dataclass(frozen=True)
class RunIdentity:
    """Which run a config is: same config hash = same run (skip, resume, claim)."""

    config_hash: str  # tag pagating.config_hash
    experiment: str   # pagating-<profile>
    run_name: str
    output_dir: str   # train.output_dir: where run_dir lies (not part of the identity hash)

    @classmethod
    def of(cls, cfg: dict[str, Any], meta: dict[str, Any]) -> RunIdentity:
        """The identity of `cfg` trained on the prepared data described by `meta` (its raw files' md5s)."""
        return cls(config_hash=config_hash(cfg, meta.get("source_md5", "")), experiment=experiment_name(cfg),
                   run_name=run_name(cfg), output_dir=view(cfg).train.output_dir)

    @property
    def run_dir(self) -> Path:
        return run_dir(self.output_dir, self.run_name, self.config_hash)


def run_dir(output_dir: str, name: str, config_hash: str) -> Path:
    """A run's local folder: `<output_dir>/<run name as a slug>_<hash[:8]>`."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name.replace(" ", "_"))
    return Path(output_dir) / f"{slug}_{config_hash[:8]}"
