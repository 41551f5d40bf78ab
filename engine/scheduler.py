"""Continuous batching under a token budget, with chunked prefill, prefix caching and preemption by recompute.

Each step the scheduler gives each request a number of tokens so that its computed tokens catch up with its known
tokens, within two budgets: at most `max_num_seqs` running requests and `max_num_batched_tokens` tokens per step.
Running requests are served first (decodes cost one token each, unfinished prefills take what budget is left), then
waiting ones are admitted in queue order. When the KV pool runs dry, the running request that ranks last (lowest
priority, then latest arrival) is preempted: its blocks are freed and it goes back to the waiting queue to be
recomputed later. Its token ids are kept, so it resumes exactly where it was.

After the model runs, `update_from_output` appends the sampled tokens and applies the token-level stop rules (EOS,
stop token ids, max_tokens, context length). Stop strings need text, so the output processor finds them and calls
`finish_requests`.

With async scheduling the engine schedules step N+1 before step N's tokens reach the host: a request that samples in
step N counts one pending token (`Request.num_pending_outputs`), which step N+1 computes from the device-side id.
A request that will stop by length once its pending tokens arrive is not scheduled again; one that stops on EOS
computes one extra token, which is dropped. Freed blocks may still be written by the step in flight, but every later
step runs after it on the same stream, so no reader sees that write.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from engine.kv_cache.manager import KVCacheManager
from engine.lora.manager import adapter_name
from engine.outputs import EngineCoreOutput, SchedulerStats, TokenLogprobs
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" or "priority" (lower value first, then arrival)
    max_loras: int | None = None  # most distinct LoRA adapters among running requests; None: no adapters

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             f"({self.max_num_batched_tokens} < {self.max_model_len})")


@dataclass
class ScheduledRequest:
    request: Request
    num_computed_before: int  # K/V already cached before this step (prefix hits included)
    num_new_tokens: int  # tokens this step computes: positions num_computed_before ... + num_new_tokens - 1
    block_ids: list[int]  # the request's block table (the KV manager's live list)
    samples: bool = field(init=False)  # the step reaches the request's last token, so its logits give the next one

    def __post_init__(self) -> None:
        self.samples = self.num_computed_before + self.num_new_tokens == self.request.num_scheduled_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    """What the runner produced for the requests that sampled (in `request_ids` order)."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None  # one per sampled token, when any request asked
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        self.config = config
        self.kv = kv_manager
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by _rank
        self.running: list[Request] = []  # admission order
        self._arrival_seq = itertools.count()
        self._rank_of: dict[str, tuple[int, int]] = {}
        self.num_preemptions = 0
        self.last_step_num_tokens = 0
        self.last_step_num_seqs = 0

    # ---- queue management ----
    def add_request(self, request: Request) -> None:
        priority = request.priority if self.config.policy == "priority" else 0
        self._rank_of[request.request_id] = (priority, next(self._arrival_seq))
        self.requests[request.request_id] = request
        self._enqueue(request)

    def add_forked_request(self, request: Request, num_computed_tokens: int) -> None:
        """A sibling sample whose prompt blocks were shared by the KV manager (n > 1)."""
        request.num_computed_tokens = num_computed_tokens
        self.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Ends requests from outside the step (abort, stop string found by the output processor)."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            self._dequeue(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting)

    # ---- one step ----
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: dict[str, ScheduledRequest] = {}

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_pending_outputs and self._stops_by_length_with_pending(request):
                i += 1  # its pending tokens end it; another one would be thrown away
                continue
            num_new = min(request.num_scheduled_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, request  # a running request always has its sampled token left to compute
            while not self.kv.allocate_slots(request, num_new):
                victim = max(self.running, key=self._rank)
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim.request_id in scheduled_ids:
                    undone = scheduled_ids.pop(victim.request_id)
                    out.scheduled.remove(undone)
                    budget += undone.num_new_tokens
                    i -= 1
                if victim is request:
                    break
            else:
                item = ScheduledRequest(request, request.num_computed_tokens, num_new,
                                        self.kv.block_ids(request.request_id))
                out.scheduled.append(item)
                scheduled_ids[request.request_id] = item
                budget -= num_new
                i += 1

        preempted_now = set(out.preempted_ids)
        # Running requests use at most max_loras adapters, so any step's adapters fit the device's LoRA slots.
        running_adapters = {r.adapter_id for r in self.running if r.adapter_id is not None}
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.request_id in preempted_now:
                break  # it just lost its blocks; let the running ones progress first
            if not self._adapter_fits(request, running_adapters):
                break  # first come, first served: it waits until a running adapter has no requests left
            # Only a request preempted by this very call can have tokens in flight, and those are skipped above.
            assert request.num_pending_outputs == 0, request
            can_reuse = request.num_computed_tokens == 0 and not request.needs_prompt_logprobs
            cached = self.kv.find_cached_prefix(request) if can_reuse else []
            num_computed = request.num_computed_tokens + len(cached) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            self.waiting.pop(0)
            if request.num_computed_tokens == 0 and request.num_preemptions == 0:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.adapter_id is not None:
                running_adapters.add(request.adapter_id)
            out.scheduled.append(ScheduledRequest(request, num_computed, num_new, self.kv.block_ids(request.request_id)))
            budget -= num_new

        for item in out.scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                item.request.num_pending_outputs += 1
        self.last_step_num_tokens = out.num_tokens
        self.last_step_num_seqs = len(out.scheduled)
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Appends sampled tokens, applies token-level stop rules and frees finished requests' blocks."""
        sampled = dict(zip(runner_output.request_ids, range(len(runner_output.request_ids))))
        outputs = []
        for item in scheduler_output.scheduled:
            request = item.request
            if item.samples:
                request.num_pending_outputs -= 1
            if request.is_finished:  # aborted while the step ran, or stopped by the step before
                continue
            row = sampled.get(request.request_id)
            prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id)
            if row is None:
                if prompt_logprobs:
                    outputs.append(core_output(request, [], None, prompt_logprobs))
                continue
            token_id = runner_output.sampled_token_ids[row]
            # Preempted while this step ran (async scheduling): it waits for its recompute with this token.
            queue = self.running if request.status == RequestStatus.RUNNING else self.waiting
            request.append_output_token(token_id)
            self._check_stop(request, token_id)
            new_logprobs = [runner_output.logprobs[row]] if runner_output.logprobs is not None else None
            if request.sampling_params.logprobs is None:
                new_logprobs = None
            outputs.append(core_output(request, [token_id], new_logprobs, prompt_logprobs))
            if request.is_finished:
                queue.remove(request)
                self._free(request)
        return outputs

    def stats(self, with_block_states: bool = False) -> SchedulerStats:
        pool = self.kv.pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preempted_waiting=sum(1 for r in self.waiting if r.status == RequestStatus.PREEMPTED),
            kv_usage=pool.usage,
            num_kv_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_cached_free_blocks=pool.num_cached_free_blocks,
            prefix_cache_queries=pool.num_prefix_queries,
            prefix_cache_hits=pool.num_prefix_hits,
            num_preemptions=self.num_preemptions,
            step_num_tokens=self.last_step_num_tokens,
            step_num_seqs=self.last_step_num_seqs,
            block_states=pool.block_states() if with_block_states else None,
            running_loras=self._adapter_names(self.running),
            waiting_loras=self._adapter_names(self.waiting),
        )

    # ---- internals ----
    def _adapter_names(self, requests: list[Request]) -> list[str]:
        if self.config.max_loras is None:
            return []
        return sorted({adapter_name(r.adapter_id) for r in requests if r.adapter_id is not None})

    def _rank(self, request: Request) -> tuple[int, int]:
        return self._rank_of[request.request_id]

    def _adapter_fits(self, request: Request, running_adapters: set[str]) -> bool:
        return (request.adapter_id is None or request.adapter_id in running_adapters
                or len(running_adapters) < self.config.max_loras)

    def _stops_by_length_with_pending(self, request: Request) -> bool:
        num_outputs = request.num_output_tokens + request.num_pending_outputs
        return ((request.max_tokens is not None and num_outputs >= request.max_tokens)
                or request.num_scheduled_tokens >= self.config.max_model_len)

    def _dequeue(self, request: Request) -> None:
        (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)

    def _enqueue(self, request: Request) -> None:
        keys = [self._rank(r) for r in self.waiting]
        self.waiting.insert(bisect.bisect(keys, self._rank(request)), request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return
        if request.max_tokens is not None and request.num_output_tokens >= request.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
        elif request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._free(request)

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        del self.requests[request.request_id]
        del self._rank_of[request.request_id]


def core_output(request: Request, new_token_ids: list[int], new_logprobs: list[TokenLogprobs] | None,
                prompt_logprobs: list[TokenLogprobs] | None) -> EngineCoreOutput:
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
    )
