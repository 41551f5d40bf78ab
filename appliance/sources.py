"""Where a configured model's files come from: a local folder or .gguf file, a built-in model, or a Hugging Face
repo id (downloaded through `huggingface_hub` when the network allows, else served from its local cache)."""

from __future__ import annotations

import os
import re

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what the engine reads: never pickled weights, never remote code.
_ALLOWED_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


def resolve_source(source: str) -> str:
    if source.startswith("builtin:"):
        from engine.models.builtin import resolve_builtin

        return resolve_builtin(source)
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return os.path.realpath(path)
    if _REPO_ID.match(source):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(source, allow_patterns=_ALLOWED_FILES)
        except Exception as online_error:
            try:
                return snapshot_download(source, allow_patterns=_ALLOWED_FILES, local_files_only=True)
            except Exception:
                raise ValueError(f"cannot fetch {source!r} from the Hugging Face hub and it is not in the local "
                                 f"cache: {online_error}") from None
    raise ValueError(f"{source!r} is neither an existing path, a builtin: model nor a Hugging Face repo id")
