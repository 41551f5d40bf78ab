"""Incremental detokenization of one request's output tokens, and stop strings.

Text comes from `tokenizers.decoders.DecodeStream` on the fast tokenizer's backend: it holds tokens back while their
bytes are an incomplete UTF-8 character (byte-level BPE splits characters like "日" or "🙂" across tokens), so
`output_text` never shows U+FFFD for a valid completion. Bytes still incomplete when the request ends are dropped.

The stream is primed with a short suffix of the prompt, so that decoders whose output depends on the previous token
(SentencePiece's leading "▁" becomes a space only after another token) render the first output token as it reads
after the prompt.

Special tokens: `skip_special_tokens` is passed to the stream. `spaces_between_special_tokens` has no effect: the
tokenizer's decoder decides the spacing, as in Hugging Face's fast tokenizers.

Stop strings follow vLLM: the first `min_tokens` output tokens cannot complete a stop string; the matched stop string
is cut from `output_text` with everything after it, unless `include_stop_str_in_output`, which keeps it and cuts
only what follows. Stop token ids (EOS, `stop_token_ids`) are the scheduler's business; their text is dropped when
the caller says the request ended on one (`stop_terminated`), unless `include_stop_str_in_output`.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.sampling_params import SamplingParams

# Enough prompt tokens to end on a whole character (a byte-fallback character takes up to 4 tokens).
_MAX_CONTEXT_TOKENS = 8
_INVALID_PREFIX = "Invalid prefix"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        # An HF fast tokenizer wraps a `tokenizers.Tokenizer`; a bare one works too.
        self._tokenizer: Tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        self._stream = DecodeStream(ids=self._context(prompt_token_ids), skip_special_tokens=params.skip_special_tokens)
        self._stop = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # While unfinished, this many trailing characters could still be the start of a stop string that gets cut.
        self._num_held_back = 0 if self._include_stop else max(params.max_stop_string_len - 1, 0)
        self._num_sent_chars = 0
        self.output_text = ""
        self.stop_string_hit: str | None = None
        # Of the tokens of the update that hit a stop string, how many it took to complete it: an update of several
        # tokens (speculative decoding) may carry some past it, which are not part of the output.
        self.num_tokens_to_stop = 0

    def update(self, new_token_ids: list[int], num_output_tokens_before: int,
               stop_terminated: bool = False) -> str | None:
        """Appends the text of `new_token_ids`; returns the stop string that matched, else None.

        `num_output_tokens_before` counts the request's output tokens before these. `stop_terminated`: the last
        new token is a stop token (EOS or one of `stop_token_ids`) that ended the request.
        """
        assert self.stop_string_hit is None, "update() after a stop string ended the request"
        if stop_terminated and not self._include_stop:
            new_token_ids = new_token_ids[:-1]
        # A stop string must end after this offset: in text from tokens past the first min_tokens.
        check_from = len(self.output_text)
        text_ends = []  # the text's length after each token
        for i, token_id in enumerate(new_token_ids):
            self.output_text += self._step(token_id) or ""
            text_ends.append(len(self.output_text))
            if num_output_tokens_before + i + 1 <= self._min_tokens:
                check_from = len(self.output_text)
        if self._stop and len(self.output_text) > check_from:
            found = self._find_stop(check_from)
            if found is not None:
                self.stop_string_hit, stop_end = found
                self.num_tokens_to_stop = next(i + 1 for i, end in enumerate(text_ends) if end >= stop_end)
        return self.stop_string_hit

    def take_delta(self, finished: bool) -> str:
        """The text not returned yet. While unfinished, the tail that might begin a stop string stays back, so that a
        streaming client never sees text that a later stop cuts off."""
        end = len(self.output_text) if finished else len(self.output_text) - self._num_held_back
        if end <= self._num_sent_chars:
            return ""
        delta = self.output_text[self._num_sent_chars:end]
        self._num_sent_chars = end
        return delta

    def _find_stop(self, check_from: int) -> tuple[str, int] | None:
        """Finds the earliest stop string ending after `check_from` and truncates `output_text` around it; returns
        it and where it ended in the text before the cut."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            # Start early enough to catch a stop string that straddles the old text and the new.
            index = self.output_text.find(stop, max(check_from - len(stop) + 1, 0))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.output_text = self.output_text[:index + len(stop) if self._include_stop else index]
        assert len(self.output_text) >= self._num_sent_chars, "the stop cut text that was already sent"
        return stop, index + len(stop)

    def _context(self, prompt_token_ids: list[int]) -> list[int]:
        """The shortest prompt suffix that decodes to whole characters; the stream cannot start after a split one."""
        for n in range(1, min(len(prompt_token_ids), _MAX_CONTEXT_TOKENS) + 1):
            suffix = prompt_token_ids[-n:]
            if not self._tokenizer.decode(suffix, skip_special_tokens=self._skip_special_tokens).endswith("\ufffd"):
                return suffix
        return []

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._tokenizer, token_id)
        except Exception as error:
            if not str(error).startswith(_INVALID_PREFIX):
                raise
            # Some decoders rewrite earlier text once more tokens arrive (decode(a + b) does not start with
            # decode(a)), which the stream cannot express; start a fresh stream rather than fail the request.
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._tokenizer, token_id)
