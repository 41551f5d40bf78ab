"""Shared fixtures: tiny checkpoints built once per test session through the same tool users have."""

import os
import tempfile

import pytest

from engine.tools.tiny_model import build_tiny_model

# The tests' tokenizer class cache (engine.tokenizer) stays out of the user's home; server subprocesses inherit it.
os.environ.setdefault("KVBOX_CACHE_DIR", tempfile.mkdtemp(prefix="kvbox-test-cache-"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, **config_overrides) -> path of a tiny HF folder, built once per distinct request."""
    built = {}

    def get(family: str = "llama", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            built[key] = str(build_tiny_model(family, tmp_path_factory.mktemp(family), **overrides))
        return built[key]

    return get
