"""kvbox's version, as installed (`kvbox --version`, `GET /version`, the start-up line)."""

from __future__ import annotations

import importlib.metadata


def kvbox_version() -> str:
    try:
        return importlib.metadata.version("kvbox")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"
