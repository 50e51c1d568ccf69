"""The sweep's cost projection (pagating.cost): grid size x max_steps x s/step, eval overhead."""

from __future__ import annotations

import json
import math

import pytest

from pagating import cost
from pagating.config import load_config


def test_offers_projection_uses_grid_and_max_steps():
    cfg = load_config("wikitext103")
    assert cost.grid_size(cfg) == 12  # the seed's 10 paGLU configs + plain at each lr
    s = cost.estimated_step_time(cfg, "RTX 4090")
    assert 0.03 <= s <= 0.07  # conservative vs ~0.03 measured elsewhere for GPT-2 small on a 4090
    hours = cost.instance_hours(cfg, 10, 1, 0.05)
    expected = 10 * 20000 * 0.05 * (1 + cost.eval_overhead(cfg)) / 3600 + cost.SETUP_HOURS
    assert hours == pytest.approx(expected)
    assert cost.instance_hours(cfg, 10, 2, 0.05) < hours  # two GPUs run two configs at once


def test_whole_split_eval_counts_in_the_projection(tmp_path):
    # max_eval_batches 0 = the whole validation split: its batches come from the prepared meta, or from the
    # source's known size when the launcher has not prepared the data.
    cfg = load_config("wikitext103", {"data.prepared_dir": str(tmp_path / "absent")})
    assert cfg["train"]["max_eval_batches"] == 0
    guess = cost.eval_batches(cfg)
    assert guess == math.ceil(250_000 // 128 / 16)
    assert cost.eval_overhead(cfg) == pytest.approx(guess / 1000 / 3)
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "meta.json").write_text(json.dumps({"splits": {"validation": {"blocks": 320}}}))
    assert cost.eval_batches(cfg) == 20
    capped = load_config("wikitext103", {"train.max_eval_batches": 7})
    assert cost.eval_batches(capped) == 7
