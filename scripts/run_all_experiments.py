#!/usr/bin/env python
"""The seed's "run every experiment" script: now the tracked, resumable sweep.

    python scripts/run_all_experiments.py [--profile wikitext103] [--shard i/n] [--gpus all]

is `pagating sweep` with the same flags: the α × lr grid of params.yaml, one MLflow child run per
config, finished configs skipped and interrupted ones resumed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from pagating.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
