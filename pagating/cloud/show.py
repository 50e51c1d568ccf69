"""Terminal output the cloud verbs share: aligned tables, red for what must be acted on."""

from __future__ import annotations

import sys
from typing import Any


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def red(text: str) -> str:
    """Red on a terminal (what must be acted on); plain text elsewhere (logs, tests)."""
    return f"\033[31m{text}\033[0m" if sys.stdout.isatty() else text
