"""What the engine core hands back each step: per-request token outputs and engine statistics.

These are msgspec Structs because they cross the process boundary between an engine process and the supervisor
(msgpack on the wire, never pickle).
"""

from __future__ import annotations

import msgspec


class TokenLogprobs(msgspec.Struct, array_like=True):
    """One position's logprobs: the chosen (or prompt) token first, then the top-k alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int  # rank of token_ids[0] among all tokens (1 = most likely)


class EngineCoreOutput(msgspec.Struct):
    request_id: str
    parent_id: str
    index: int  # which of the parent's n samples
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # Logprobs of prompt tokens 1.. computed this step (token 0 has none); None when not asked for.
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # FinishReason value
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct):
    num_running: int
    num_waiting: int
    num_preempted_waiting: int  # waiting requests that were preempted and wait to resume
    kv_usage: float  # share of KV blocks in use
    num_kv_blocks: int
    num_free_blocks: int
    num_cached_free_blocks: int
    prefix_cache_queries: int  # cumulative, in blocks
    prefix_cache_hits: int
    num_preemptions: int  # cumulative
    step_num_tokens: int  # tokens in the last step
    step_num_seqs: int
    # One byte per block: 0 free, 1 in use, 2 free but holding a reusable prefix (the dashboard's block map);
    # attached at most once a second.
    block_states: bytes | None = None
    # With LoRA: the adapters (by name) of running requests, and of waiting ones.
    running_loras: list[str] = []
    waiting_loras: list[str] = []
    # Cumulative: seconds in engine steps, and of those, seconds the host waited for the device to finish one. Their
    # ratio tells a device-bound engine (close to 1) from one whose host work leaves the device idle.
    step_seconds: float = 0.0
    device_wait_seconds: float = 0.0
