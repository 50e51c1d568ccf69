#!/usr/bin/env python
"""The seed's entry point, kept verbatim-compatible:

    python scripts/train_pagating.py --alpha_mode static_0.0 --learning_rate 5e-4 --batch_size 16 \
        --max_steps 20000 --output_dir logs/phase2_sweeps

It is `pagating train` with the same flags (plus --unit --profile --seed --eval_steps --save_steps).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from pagating.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
