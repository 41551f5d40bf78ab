"""Logprobs in OpenAI's two formats: completions' legacy parallel lists, and chat's per-token objects with bytes;
and vLLM's `prompt_logprobs` (per prompt token, token id -> logprob, rank, decoded token).

A token's text is its own bytes decoded on their own, so a token holding part of a UTF-8 character reads as U+FFFD;
chat's `bytes` field carries the exact bytes, which clients join to rebuild such characters. Byte-level BPE
tokenizers (GPT-2 style) give exact bytes; other tokenizers give the bytes of the token's decoded text.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from appliance.openai.protocol import (ChatLogprobs, CompletionLogprobs, PromptLogprob, PromptLogprobs,
                                       TokenLogprob, TopLogprob)
from engine.contract import TokenLogprobs

# JSON has no -inf; vLLM reports this instead.
_MIN_LOGPROB = -9999.0
_byte_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer, token_id: int) -> bytes:
    if tokenizer not in _byte_decoders:
        _byte_decoders[tokenizer] = _byte_decoder(tokenizer)
    decoder = _byte_decoders[tokenizer]
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if decoder is not None and piece is not None and all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode()


def token_text(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


def completion_logprobs(tokenizer, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None],
                        text_offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """The legacy format for `token_ids` (an entry may be None: the first prompt token has no logprob); returns it
    with the text offset after the last token, where a stream's next chunk continues."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        text = token_text(tokenizer, token_id)
        result.tokens.append(text)
        result.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(max(entry.logprobs[0], _MIN_LOGPROB))
            # The sampled token and the top k, as vLLM reports them (so up to k + 1 entries).
            result.top_logprobs.append({token_text(tokenizer, t): max(lp, _MIN_LOGPROB)
                                        for t, lp in zip(entry.token_ids, entry.logprobs)})
    return result, text_offset


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprobs], num_top: int) -> ChatLogprobs:
    return ChatLogprobs([
        TokenLogprob(**_top(tokenizer, e.token_ids[0], e.logprobs[0]),
                     top_logprobs=[TopLogprob(**_top(tokenizer, t, lp))
                                   for t, lp in zip(e.token_ids[1:num_top + 1], e.logprobs[1:num_top + 1])])
        for e in entries
    ])


def prompt_logprobs(tokenizer, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None] | None
                    ) -> PromptLogprobs:
    """vLLM's format: for each prompt token (None for the first, which nothing predicts) the token itself with its
    rank, and the top k with ranks 1 ... k."""
    result: PromptLogprobs = []
    for token_id, entry in zip(token_ids, entries or []):
        if entry is None:
            result.append(None)
            continue
        ranks = [entry.rank, *range(1, len(entry.token_ids))]
        position: dict[str, PromptLogprob] = {}
        for t, lp, rank in zip(entry.token_ids, entry.logprobs, ranks):  # the prompt token first: its rank stays
            position.setdefault(str(t), PromptLogprob(max(lp, _MIN_LOGPROB), rank, token_text(tokenizer, t)))
        result.append(position)
    return result


def _top(tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, _MIN_LOGPROB),
            "bytes": list(raw)}


def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """Byte-level BPE's map from the printable stand-in characters back to bytes, or None for other tokenizers."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None or b'"ByteLevel"' not in decoder.__getstate__():  # also finds it inside a Sequence
        return None
    # GPT-2's table: printable Latin-1 bytes stand for themselves, the other bytes for 256 + i in order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}
