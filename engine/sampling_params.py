"""Per-request sampling and stopping parameters, and their validation.

Validation happens in two stages: `SamplingParams.__post_init__` checks what can be checked alone (ranges, types);
`SamplingParams.verify_for_model` checks what needs the model (token ids inside the vocabulary). Both raise
`InvalidParameterError`, which names the offending parameter so that an HTTP layer can report it as OpenAI's
`param` field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# OpenAI caps top_logprobs at 20; we allow more offline but keep a hard ceiling so that one request cannot make the
# sampler materialize a [batch, vocab] top-k.
MAX_LOGPROBS = 20


class InvalidParameterError(ValueError):
    """A request parameter is out of range or inconsistent. `param` names it (dotted for nested fields)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] = field(default_factory=list)  # never generated; tokenized by `update_from_tokenizer`
    bad_words_token_ids: list[list[int]] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the top k
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # the output must match a schema, regex or grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self) -> None:
        def require(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise InvalidParameterError(param, message)

        require(_is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        require(_is_number(self.temperature) and self.temperature >= 0, "temperature",
                f"must be >= 0, got {self.temperature!r}")
        require(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        require(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be -1, 0 or a positive integer, got {self.top_k!r}")
        require(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        require(_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
                f"must be in [-2, 2], got {self.presence_penalty!r}")
        require(_is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
                f"must be in [-2, 2], got {self.frequency_penalty!r}")
        require(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                f"must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None:
            require(_is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        if self.max_tokens is not None:
            require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                    f"must be an integer >= 1, got {self.max_tokens!r}")
        require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
                f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            require(self.min_tokens <= self.max_tokens, "min_tokens",
                    f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for i, s in enumerate(self.stop):
            require(isinstance(s, str) and s != "", f"stop[{i}]", "must be a non-empty string")
        for i, t in enumerate(self.stop_token_ids):
            require(_is_int(t) and t >= 0, f"stop_token_ids[{i}]", f"must be a token id >= 0, got {t!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                require(_is_int(value) and 0 <= value <= MAX_LOGPROBS, name,
                        f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for i, word in enumerate(self.bad_words):
            require(isinstance(word, str) and word.strip() != "", f"bad_words[{i}]", "must be a non-empty word")
        if self.allowed_token_ids is not None:
            require(len(self.allowed_token_ids) > 0, "allowed_token_ids", "must name at least one token")
            for i, t in enumerate(self.allowed_token_ids):
                require(_is_int(t) and t >= 0, f"allowed_token_ids[{i}]", f"must be a token id >= 0, got {t!r}")
        if self.structured_outputs is not None:
            require(isinstance(self.structured_outputs, StructuredOutputsParams), "structured_outputs",
                    "must be a StructuredOutputsParams")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                require(_is_int(token_id) and token_id >= 0, "logit_bias", f"key {token_id!r} is not a token id")
                require(_is_number(bias) and -100 <= bias <= 100, "logit_bias",
                        f"bias for token {token_id} must be in [-100, 100], got {bias!r}")

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenizes `bad_words` as vLLM does: each word alone and after a space, as the model would write it
        mid-text. A front end calls this before the request reaches the engine."""
        sequences = []
        for word in self.bad_words:
            for variant in (word, " " + word.lstrip()):
                token_ids = tokenizer.encode(variant, add_special_tokens=False)
                if token_ids and token_ids not in sequences:
                    sequences.append(token_ids)
        self.bad_words_token_ids = sequences

    def verify_for_model(self, vocab_size: int) -> None:
        """Checks the parameters that depend on the model: token ids must exist in its vocabulary, and bad words
        must have been tokenized."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            for i, t in enumerate(getattr(self, name) or []):
                if t >= vocab_size:
                    raise InvalidParameterError(f"{name}[{i}]", f"token id {t} is outside the vocabulary "
                                                                f"(size {vocab_size})")
        if self.bad_words and self.bad_words_token_ids is None:
            raise InvalidParameterError("bad_words", "bad words need the tokenizer: call update_from_tokenizer")
        for token_id in self.logit_bias or {}:
            if token_id >= vocab_size:
                raise InvalidParameterError("logit_bias", f"token id {token_id} is outside the vocabulary "
                                                          f"(size {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_output_history(self) -> bool:
        """Sampling reads the earlier output tokens: penalties, and bad words of several tokens (their last token
        is banned only after the others)."""
        return self.needs_penalties or any(len(s) > 1 for s in self.bad_words_token_ids or ())

    @property
    def max_stop_string_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Imported last: the params module raises this module's InvalidParameterError.
from engine.structured_output.params import StructuredOutputsParams  # noqa: E402
