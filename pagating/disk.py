"""A full disk, recognised wherever it comes from, so that it can be one line saying what to do."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

_NO_SPACE = ("no space left", "os error 28", "storagefull", "enospc")
LOW_FREE = 64 * 2**20  # below this, an unexplained write error is taken for a full disk


def disk_full(exc: BaseException | None, where: str | Path) -> bool:
    """Whether an error (or one it was raised from) is a full disk: OSError ENOSPC (the spool, a json
    file), safetensors' SafetensorError (neither OSError nor RuntimeError; its message carries "os error
    28"), torch.save's RuntimeError ("iostream error", no errno: then the disk at `where` is asked)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if any(word in str(exc).lower() for word in _NO_SPACE):
            return True
        if (isinstance(exc, OSError | RuntimeError) or type(exc).__name__ == "SafetensorError") \
                and free_bytes(where) < LOW_FREE:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def free_bytes(where: str | Path) -> float:
    """Free bytes on the disk of `where` (its nearest existing parent); inf when that cannot be told."""
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return float("inf")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"
