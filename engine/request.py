"""The request: the one object that flows through the engine, from `EngineCore.add_request` to its last output.

A request knows its tokens (prompt + outputs so far), how many of them already have K/V in the cache
(`num_computed_tokens`), its status and its sampling parameters. It does not know its blocks: the KV cache manager
owns those. The scheduler has no prefill or decode phase: each step it gives a request up to
`num_tokens - num_computed_tokens` tokens, which covers chunked prefill, prefix-cache hits, recompute after
preemption and plain decoding with one rule.

`core_output` turns a request's progress in one step into the plain-data `EngineCoreOutput` the front end gets.
"""

from __future__ import annotations

import enum
import time

from typing import TYPE_CHECKING

from engine.contract import EngineCoreOutput, PoolingParams, RequestTiming, TokenLogprobs
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.structured_output.manager import RequestGrammar


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        # A plain int comparison: looking the member up on the class costs microseconds, and this runs for every
        # request of every step.
        return self._value_ >= _FIRST_FINISHED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FIRST_FINISHED = RequestStatus.FINISHED_STOPPED.value


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        max_tokens: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        adapter_id: str | None = None,
        parent_id: str | None = None,
        index: int = 0,
        pooling: PoolingParams | None = None,
    ):
        self.request_id = request_id
        # n > 1 fans out into one request per sample; they share `parent_id` and differ in `index`.
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        # The engine resolves max_tokens against the context length before building the request.
        self.max_tokens = max_tokens if max_tokens is not None else sampling_params.max_tokens
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.priority = priority
        # Both become part of every block hash, so that cached prefixes never cross tenants or adapters.
        self.cache_salt = cache_salt
        self.adapter_id = adapter_id
        self.pooling = pooling  # a pooling engine's request: it ends with its prompt computed

        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt tokens already cached when the request was first scheduled (prefix-cache hits), for stats.
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Prompt logprobs are produced once, for the prompt positions; after a preemption the recompute skips them.
        self.num_prompt_logprobs_done = 0
        # Tokens sampled (or being sampled) on the device whose ids the host has not seen yet. With async scheduling
        # the next step is scheduled before the current one's tokens arrive; each pending token is one more position
        # to compute, and its id reaches the next step's input on the device.
        self.num_pending_outputs = 0
        # What the model runner holds of it (see engine.contract): later steps send only what it lacks.
        self.num_tokens_sent = 0
        self.num_blocks_sent = 0
        self.resumed = False  # preempted since it was last scheduled
        # For the phase timings of its finished output (monotonic clock, as arrival_time).
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        # Structured outputs: the grammar's compilation, then this request's own matcher (the scheduler's).
        self.grammar: RequestGrammar | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Known tokens plus pending ones: the positions the scheduler may compute."""
        return len(self.all_token_ids) + self.num_pending_outputs

    @property
    def num_prior_outputs(self) -> int:
        """Outputs drawn before the one being sampled now, pending ones included (the current sample is itself
        counted as pending once it is scheduled)."""
        return self.num_output_tokens + max(self.num_pending_outputs - 1, 0)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None and self.index == 0

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are still owed, so every prompt position must be computed (no prefix-cache reuse)."""
        return self.wants_prompt_logprobs and self.num_prompt_logprobs_done < self.num_prompt_tokens - 1

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")


def core_output(request: Request, new_token_ids: list[int], new_logprobs: list[TokenLogprobs] | None,
                prompt_logprobs: list[TokenLogprobs] | None, pooled: bytes | None = None) -> EngineCoreOutput:
    # Only a finished request has a reason; looking one up (an enum hash) for every token of every step is not free.
    reason = request.status.finish_reason if request.is_finished else None
    return EngineCoreOutput(
        request_id=request.request_id,
        parent_id=request.parent_id,
        index=request.index,
        new_token_ids=new_token_ids,
        new_logprobs=new_logprobs,
        prompt_logprobs=prompt_logprobs,
        finish_reason=reason.value if reason else None,
        stop_reason=request.stop_reason,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
        timing=_timing(request) if reason else None,
        pooled=pooled,
    )


def _timing(request: Request) -> RequestTiming | None:
    scheduled, first_token = request.first_scheduled_time, request.first_token_time
    if scheduled is None or first_token is None:
        return None
    return RequestTiming(queued_s=scheduled - request.arrival_time, prefill_s=first_token - scheduled,
                         decode_s=time.monotonic() - first_token)
