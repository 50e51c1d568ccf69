"""Prepare throughput on the sample corpus: tokens/s of tokenize + pack (goal: >= 1M tokens/s on
2 cores with the fast tokenizer), with the BPE training time beside it.

    .venv/bin/python bench/prepare.py [--repeat 3]

Builds the sample corpus and prepares it in a temp folder (the project's data/ is not touched).
Prints one line per run, then one line holding a JSON object of the best run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagating.config import load_config  # noqa: E402
from pagating.data.corpora import build_sample  # noqa: E402
from pagating.data.prepare import prepare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs; the fastest one is reported")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "prepared"
        t0 = time.perf_counter()
        build_sample(raw)
        sample_s = time.perf_counter() - t0
        cfg = load_config("sample", {"data.raw_dir": str(raw), "data.prepared_dir": str(out)})
        for i in range(args.repeat):
            timings: dict[str, float] = {}
            c0, t0 = os.times(), time.perf_counter()
            meta = prepare(cfg, timings=timings)
            total_s = time.perf_counter() - t0
            c1 = os.times()
            # CPU seconds (this process + map workers): a figure that a busy shared machine
            # does not distort the way it distorts wall time.
            cpu_s = sum(getattr(c1, k) - getattr(c0, k)
                        for k in ("user", "system", "children_user", "children_system"))
            tokens = sum(meta["tokens"].values())
            run = {"tokens": tokens, "tokenizer_train_s": round(timings["tokenizer_s"], 3),
                   "tokenize_pack_s": round(timings["tokenize_s"], 3), "total_s": round(total_s, 3),
                   "tokens_per_s": round(tokens / timings["tokenize_s"]),
                   "tokens_per_s_total": round(tokens / total_s), "cpu_s": round(cpu_s, 3),
                   "tokens_per_cpu_s": round(tokens / cpu_s)}
            runs.append(run)
            print(f"run {i + 1}: {tokens:,d} tokens; BPE training {run['tokenizer_train_s']:.2f} s, "
                  f"tokenize+pack {run['tokenize_pack_s']:.2f} s = {run['tokens_per_s'] / 1e6:.2f}M tokens/s; "
                  f"whole prepare {run['total_s']:.2f} s ({run['cpu_s']:.2f} CPU s)", flush=True)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    figures = {"bench": "prepare", "corpus": "sample", "cpus": os.cpu_count(), "runs": len(runs),
               "sample_build_s": round(sample_s, 3), "vocab_size": meta["vocab_size"],
               "block_size": meta["block_size"], **best, "goal_tokens_per_s": 1_000_000,
               "meets_goal": best["tokens_per_s"] >= 1_000_000}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
