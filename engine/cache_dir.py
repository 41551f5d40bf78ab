"""kvbox's per-user cache folder: `KVBOX_CACHE_DIR`, else `$XDG_CACHE_HOME/kvbox`, else `~/.cache/kvbox`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path | None:
    """None where no folder can be named: a container's user id without a home, say."""
    root = os.environ.get("KVBOX_CACHE_DIR")
    if root:
        return Path(root)
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvbox"
    except RuntimeError:  # Path.home(): no HOME and no passwd entry
        return None
