"""Whether a draft model can propose for a target: the same vocabulary size and the same tokenizer (token ids mean
the same text in both). Torch-free and read from the checkpoint files, so that `kvbox check-config` refuses a wrong
draft before any engine starts."""

from __future__ import annotations

import json
from pathlib import Path


def draft_mismatch(target: str, tokenizer: str | None, draft: str) -> str | None:
    """What makes `draft` unfit to draft for `target` (its tokenizer folder `tokenizer`, default the model's), or
    None. A target that is not a local folder (a GGUF file, a built-in model) is checked on its vocabulary size
    only when the engine loads it."""
    target_config, draft_config = Path(target) / "config.json", Path(draft) / "config.json"
    if not target_config.is_file():
        return None
    target_vocab = json.loads(target_config.read_text()).get("vocab_size")
    draft_vocab = json.loads(draft_config.read_text()).get("vocab_size")
    if target_vocab != draft_vocab:
        return f"the draft's vocab_size is {draft_vocab}, the target's {target_vocab}; they must be equal"
    target_tokens, draft_tokens = _tokens(Path(tokenizer or target)), _tokens(Path(draft))
    if target_tokens is not None and target_tokens != draft_tokens:
        return "the draft's tokenizer differs from the target's (tokenizer.json vocabularies differ)"
    return None


def _tokens(folder: Path) -> dict | None:
    """A fast tokenizer's id of every token, added tokens included; None without a tokenizer.json."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return None
    spec = json.loads(file.read_text())
    vocab = spec.get("model", {}).get("vocab")
    tokens = dict(vocab) if isinstance(vocab, dict) else {str(i): entry for i, entry in enumerate(vocab or [])}
    tokens.update({token["content"]: token["id"] for token in spec.get("added_tokens", [])})
    return tokens
