"""Continuous batching under a token budget, with chunked prefill, prefix caching and preemption (recompute or swap).

Each step the scheduler gives each request a number of tokens so that its computed tokens catch up with its known
tokens, within two budgets: at most `max_num_seqs` running requests and `max_num_batched_tokens` tokens per step.
Running requests are served first, decodes before unfinished prefills, then waiting ones are admitted in queue order;
while the step decodes, prefill takes at most `max_prefill_tokens_while_decoding` tokens (engine.scheduler_budget). When the KV pool runs dry, the running request that ranks last (lowest
priority, then latest arrival) is preempted: its blocks are freed (it recomputes later) or swapped to host memory
(`host_swap_bytes`), and it goes back to the waiting queue. Its token ids are kept, so it resumes where it was.

After the model runs, `update_from_output` appends the sampled tokens and applies the token-level stop rules
(engine.scheduler_stop). Stop strings need text, so the output processor finds them and calls
`finish_requests`.

A pooling request (task embed or score) samples nothing: the step that completes its prompt returns its pooled
vector, and it finishes then (reason "stop").

With async scheduling the engine schedules step N+1 before step N's tokens reach the host: a request that samples in
step N counts one pending token (`Request.num_pending_outputs`), which step N+1 computes from the device-side id.
A request that will stop by length once its pending tokens arrive is not scheduled again; one that stops on EOS
computes one extra token, which is dropped. Freed blocks may still be written by the step in flight, but every later
step runs after it on the same stream, so no reader sees that write. With pipeline stages up to one step per stage is
in flight, and a request waits for its pending token (the first stage embeds it): in-flight batches are disjoint.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time

from engine.config import EngineConfig
from engine.contract import (EngineCoreOutput, ModelRunnerOutput, NewRequestData, SchedulerOutput, SchedulerStats,
                             TokenLogprobs)
from engine.kv_cache.manager import KVCacheManager
from engine.lora.manager import adapter_name
from engine.request import Request, RequestStatus, core_output
from engine.sampling_params import InvalidParameterError
from engine.scheduler_budget import StepBudget, is_prefill
from engine.scheduler_stop import check_stop, grammar_stops, stops_by_length_with_pending
from engine.spec_decode.drafter import Drafter
from engine.structured_output.backend import GrammarBackendError
from engine.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class _Scheduled:
    """One request's share of a step, on the scheduler's side (the runner gets it as plain data)."""

    __slots__ = ("request", "num_computed_before", "num_new_tokens", "samples", "drafts", "prefill")

    def __init__(self, request: Request, num_computed_before: int, num_new_tokens: int, drafts: list[int] = (),
                 prefill: bool = True):
        self.request = request
        self.num_computed_before = num_computed_before  # K/V already cached before this step (prefix hits included)
        self.num_new_tokens = num_new_tokens  # drafts included
        self.drafts = drafts  # speculative tokens computed after the request's last one
        self.prefill = prefill  # counted against the step's prefill cap (engine.scheduler_budget)
        # The step reaches the request's last token, so its logits give the next one.
        self.samples = num_computed_before + num_new_tokens - len(drafts) == request.num_scheduled_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, kv_manager: KVCacheManager,
                 structured: StructuredOutputManager | None = None):
        """`config.max_model_len` must be resolved (the engine core sets the model's own when it was None).
        Without `structured`, requests with structured outputs are refused."""
        self.structured, self.defer_grammar_bitmask = structured, False  # True: the core fills bitmasks late
        self.fill_multiple = 0  # the runner's mixed-graph token multiple, which capped steps fill (the core sets it)
        # Requests ended while scheduling (their grammar failed to compile), for the engine to report.
        self.failed_outputs: list[EngineCoreOutput] = []
        self.config = config
        self.max_model_len = config.max_model_len
        self.max_loras = config.max_loras if config.enable_lora else None
        self.kv = kv_manager
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by _rank
        self.running: list[Request] = []  # admission order
        self._arrival_seq = itertools.count()
        self._rank_of: dict[str, tuple[int, int]] = {}
        self.num_preemptions = 0
        self.last_step_num_tokens = 0
        self.last_step_num_seqs = 0
        self._step_ids = itertools.count(1)
        self._in_flight: dict[int, list[_Scheduled]] = {}  # step id -> what it scheduled, until its output is back
        # The runner's copy of a request must be dropped; sent with the next step that runs.
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []
        self.drafter = Drafter(config.speculative_config) if config.speculative_config is not None else None

    # ---- queue management ----
    def add_request(self, request: Request) -> None:
        if request.sampling_params.structured_outputs is not None:
            if self.structured is None:
                raise InvalidParameterError("structured_outputs", "this engine has no structured-output backend")
            self.structured.register(request)
        priority = request.priority if self.config.scheduling_policy == "priority" else 0
        self._rank_of[request.request_id] = (priority, next(self._arrival_seq))
        self.requests[request.request_id] = request
        self._enqueue(request)

    def add_forked_request(self, request: Request, num_computed_tokens: int) -> None:
        """A request whose first tokens' blocks the KV manager shared: a sibling sample (n > 1) or a beam fork."""
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
    def schedule(self, max_num_reqs: int | None = None) -> SchedulerOutput:
        """`max_num_reqs`: at most that many requests in this step (pipeline stages: one batch's share)."""
        cap = self.config.max_prefill_tokens_while_decoding if self.config.enable_chunked_prefill else None
        budget = StepBudget(self.config.max_num_batched_tokens, cap, self.config.prefill_tokens_per_decode,
                            self.fill_multiple)
        room = max_num_reqs or self.config.max_num_seqs
        scheduled, preempted_now = self._schedule_running(budget, room)
        scheduled += self._schedule_waiting(budget, preempted_now, room - len(scheduled))
        for item in scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                item.request.num_pending_outputs += 1
        self.last_step_num_tokens = sum(item.num_new_tokens for item in scheduled)
        self.last_step_num_seqs = len(scheduled)
        return self._to_output(scheduled)

    def _schedule_running(self, budget: StepBudget, room: int) -> tuple[list[_Scheduled], set[str]]:
        """Running requests, decodes first, preempting the lowest ranked ones when the KV pool runs dry."""
        scheduled: dict[str, _Scheduled] = {}  # in order
        preempted_now: set[str] = set()
        decodes, prefills = [], []
        for request in self.running:
            (prefills if is_prefill(request) else decodes).append(request)
        for prefill, request in itertools.chain(zip(itertools.repeat(False), decodes),
                                                zip(itertools.repeat(True), prefills)):
            if request.status != RequestStatus.RUNNING:
                continue  # preempted by an earlier one in this loop
            tokens = budget.prefill_room() if prefill else budget.left
            if tokens <= 0 or len(scheduled) >= room:
                break  # the prefills after the decodes have no more room than the last one
            if request.num_pending_outputs and self._waits_for_pending(request):
                continue  # pipeline stages: the first stage cannot take a token the last is still sampling; otherwise
                # only a request whose pending tokens end it waits (another token would be thrown away)
            num_new = min(request.num_scheduled_tokens - request.num_computed_tokens, tokens)
            assert num_new > 0, request  # a running request always has its sampled token left to compute
            drafts = self.drafter.drafts(request, num_new, tokens, self.max_model_len) if self.drafter else []
            while not self.kv.allocate_slots(request, num_new + len(drafts)):
                if drafts:  # drafts are worth no preemption
                    drafts = []
                    continue
                victim = max(self.running, key=self._rank)
                self._preempt(victim)
                preempted_now.add(victim.request_id)
                if victim.request_id in scheduled:
                    given_back = scheduled.pop(victim.request_id)
                    budget.take(-given_back.num_new_tokens, given_back.prefill)
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = _Scheduled(request, request.num_computed_tokens,
                                                           num_new + len(drafts), drafts, prefill)
                budget.take(num_new + len(drafts), prefill)
        return list(scheduled.values()), preempted_now

    def _schedule_waiting(self, budget: StepBudget, preempted_now: set[str], room: int) -> list[_Scheduled]:
        """Admits waiting requests in queue order while budget, sequence slots, KV blocks and LoRA slots last."""
        scheduled = []
        # Running requests use at most max_loras adapters, so any step's adapters fit the device's LoRA slots.
        running_adapters = {r.adapter_id for r in self.running if r.adapter_id is not None}
        i = 0
        room = min(room, self.config.max_num_seqs - len(self.running))
        while i < len(self.waiting) and budget.left > 0 and len(scheduled) < room:
            request = self.waiting[i]
            if request.grammar is not None and not self._grammar_ready(request):
                i += 1  # compiling: the requests behind it need not wait for that
                continue
            if request.request_id in preempted_now or request.num_pending_outputs:
                break  # it just lost its blocks or (pipeline stages) still has tokens in flight; let the running go on
            if not self._adapter_fits(request, running_adapters):
                break  # first come, first served: it waits until a running adapter has no requests left
            can_reuse = request.num_computed_tokens == 0 and not request.needs_prompt_logprobs
            cached = self.kv.find_cached_prefix(request) if can_reuse else []
            num_computed = request.num_computed_tokens + len(cached) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            prefill = num_new > 1  # else a swapped-out request's last token, back in
            tokens = budget.prefill_room() if prefill else budget.left
            if tokens <= 0 or (num_new > tokens and not self.config.enable_chunked_prefill):
                break
            num_new = min(num_new, tokens)
            if not self.kv.allocate_slots(request, num_new, cached):
                if not self.running and not scheduled and self.kv.drop_held_blocks(self.waiting):
                    continue  # blocks held for forks filled the pool: without them this one may fit
                break
            self.waiting.pop(i)
            if request.num_computed_tokens == 0 and request.num_preemptions == 0:
                request.num_cached_tokens = num_computed
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.adapter_id is not None:
                running_adapters.add(request.adapter_id)
            scheduled.append(_Scheduled(request, num_computed, num_new, prefill=prefill))
            budget.take(num_new, prefill)
        return scheduled

    def _to_output(self, scheduled: list[_Scheduled]) -> SchedulerOutput:
        """The step as plain data: requests the runner holds as diffs, the others whole (see engine.contract)."""
        if not scheduled:
            return SchedulerOutput()  # nothing runs; the ids to forget wait for a step that does
        swap_out, swap_in = self.kv.take_swaps()
        out = SchedulerOutput(step_id=next(self._step_ids), finished_ids=self._finished_ids,
                              preempted_ids=self._preempted_ids, blocks_to_copy=self.kv.take_block_copies(),
                              blocks_to_swap_out=swap_out, blocks_to_swap_in=swap_in)
        self._finished_ids, self._preempted_ids = [], []
        for item in scheduled:
            request = item.request
            block_ids = self.kv.block_ids(request.request_id)
            if request.num_tokens_sent == 0:
                out.new_requests.append(_new_request_data(request, block_ids, item))
            else:
                # A request resumed after preemption sends its whole (new) block table.
                first_block = 0 if request.resumed else request.num_blocks_sent
                out.cached_requests.append(
                    request.request_id, request.all_token_ids[request.num_tokens_sent:], block_ids[first_block:],
                    item.num_computed_before, item.num_new_tokens, request.resumed)
            request.num_tokens_sent, request.num_blocks_sent = request.num_tokens, len(block_ids)
            request.resumed = False
            if item.drafts:
                out.spec_token_ids[request.request_id] = item.drafts
            if request.needs_prompt_logprobs:
                first = max(item.num_computed_before, request.num_prompt_logprobs_done)
                last = min(item.num_computed_before + item.num_new_tokens, request.num_prompt_tokens - 1)
                if last > first:
                    out.prompt_logprob_spans[request.request_id] = (first, last)
                    request.num_prompt_logprobs_done = last
        structured = [item.request for item in scheduled if item.samples and item.request.grammar is not None]
        if structured:
            out.structured_req_ids = [r.request_id for r in structured]
            out.grammar_bitmask = None if self.defer_grammar_bitmask else self.structured.bitmask(structured)
        self._in_flight[out.step_id] = scheduled
        return out

    def _grammar_ready(self, request: Request) -> bool:
        """Whether a waiting request's grammar is compiled; one that failed to compile ends with an error."""
        try:
            return request.grammar.ready()
        except (InvalidParameterError, GrammarBackendError) as e:
            logger.warning("request %s: its grammar failed to compile: %s", request.request_id, e)
            self.waiting.remove(request)
            self._finish(request, RequestStatus.FINISHED_ERROR)
            self.failed_outputs.append(core_output(request, [], None, None))
            return False

    def can_schedule_ahead_of(self, scheduler_output: SchedulerOutput) -> bool:
        """Penalties and multi-token bad words need every earlier output token on the host, a grammar's next
        bitmask needs the token before it (unless the core fills it late), and verified drafts change how many
        tokens a request has, so a batch using any of them is completed before the next step is scheduled. With
        speculation on, every sampling batch is: a request gets drafts only once its last token is on the host, so
        scheduling ahead would starve the drafter on a device that runs behind the host."""
        speculating = self.drafter is not None
        return not any(item.samples and (speculating or item.request.sampling_params.needs_output_history
                                         or (item.request.grammar is not None and not self.defer_grammar_bitmask))
                       for item in self._in_flight.get(scheduler_output.step_id, ()))

    def fail_step(self, scheduler_output: SchedulerOutput) -> list[Request]:
        """A step that could not run: its requests end with an error. Returns them."""
        failed = [item.request for item in self._in_flight.pop(scheduler_output.step_id, ())
                  if not item.request.is_finished]
        self.finish_requests([r.request_id for r in failed], RequestStatus.FINISHED_ERROR)
        return failed

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Appends sampled tokens, applies token-level stop rules and frees finished requests' blocks."""
        sampled = dict(zip(runner_output.req_ids, range(len(runner_output.req_ids))))
        outputs = []
        for item in self._in_flight.pop(scheduler_output.step_id, ()):
            request = item.request
            if item.samples:
                request.num_pending_outputs -= 1
            if request.is_finished:  # aborted while the step ran, or stopped by the step before
                continue
            if (pooled := runner_output.pooled.get(request.request_id)) is not None:
                outputs.append(self._finish_pooled(request, pooled))
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
            new_logprobs = [runner_output.logprobs[row]] if runner_output.logprobs is not None else None
            if request.sampling_params.logprobs is None:
                new_logprobs = None
            if item.drafts:
                token_ids, new_logprobs = self._append_verified(request, item.drafts, token_id, new_logprobs,
                                                                runner_output)
            else:
                token_ids = [token_id]
                self._append(request, token_id)
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            outputs.append(core_output(request, token_ids, new_logprobs, prompt_logprobs))
            if request.is_finished:
                queue.remove(request)
                self._free(request)
        return outputs

    def _append(self, request: Request, token_id: int) -> None:
        request.append_output_token(token_id)
        if request.grammar is None or not grammar_stops(request, token_id):
            check_stop(request, token_id, self.max_model_len)

    def _append_verified(self, request: Request, drafts: list[int], token_id: int,
                         logprobs: list[TokenLogprobs] | None,
                         runner_output: ModelRunnerOutput) -> tuple[list[int], list[TokenLogprobs] | None]:
        """Appends the accepted drafts and the sampled token up to the first that stops the request, and rolls
        back the K/V of the rejected drafts: their positions count as not computed (their blocks stay with the
        request, for its next steps to fill). Returns the tokens appended and their logprobs."""
        accepted = runner_output.spec_token_ids.get(request.request_id, [])
        self.drafter.record(len(drafts), len(accepted))
        token_ids = [*accepted, token_id]
        for i, token in enumerate(token_ids):
            self._append(request, token)
            if request.is_finished:
                token_ids = token_ids[:i + 1]
                break
        # The last token appended is not computed yet (a preempted request has computed nothing).
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        if logprobs is not None:
            logprobs = [*runner_output.spec_logprobs.get(request.request_id, []), *logprobs][:len(token_ids)]
        return token_ids, logprobs

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
            spec_decoding=self.drafter.snapshot() if self.drafter is not None else None,
            swap=self.kv.swap.stats() if self.kv.swap is not None else None,
        )

    # ---- internals ----
    def _finish_pooled(self, request: Request, pooled: bytes) -> EngineCoreOutput:
        self._dequeue(request)  # preempted while the step ran (async scheduling): the result stands all the same
        self._finish(request, RequestStatus.FINISHED_STOPPED)
        return core_output(request, [], None, None, pooled)

    def _adapter_names(self, requests: list[Request]) -> list[str]:
        if self.max_loras is None:
            return []
        return sorted({adapter_name(r.adapter_id) for r in requests if r.adapter_id is not None})

    def _rank(self, request: Request) -> tuple[int, int]:
        return self._rank_of[request.request_id]

    def _adapter_fits(self, request: Request, running_adapters: set[str]) -> bool:
        return (request.adapter_id is None or request.adapter_id in running_adapters
                or len(running_adapters) < self.max_loras)

    def _waits_for_pending(self, request: Request) -> bool:
        return self.config.pipeline_parallel_size > 1 or stops_by_length_with_pending(request, self.max_model_len)

    def _dequeue(self, request: Request) -> None:
        (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)

    def _enqueue(self, request: Request) -> None:
        self.waiting.insert(bisect.bisect(self.waiting, self._rank(request), key=self._rank), request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        if not self.kv.swap_out(request):  # else its K/V waits in host memory and stays computed
            self.kv.free(request)
            request.num_computed_tokens = 0
        self._preempted_ids.append(request.request_id)
        request.resumed = True
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._free(request)

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        if request.num_tokens_sent:
            self._finished_ids.append(request.request_id)
        del self.requests[request.request_id]
        del self._rank_of[request.request_id]


def _new_request_data(request: Request, block_ids: list[int], item: _Scheduled) -> NewRequestData:
    params = request.sampling_params
    return NewRequestData(
        req_id=request.request_id,
        token_ids=list(request.all_token_ids),
        num_prompt_tokens=request.num_prompt_tokens,
        sampling_params=params,
        eos_token_ids=sorted(request.eos_token_ids),
        block_ids=list(block_ids),
        num_computed_tokens=item.num_computed_before,
        num_new_tokens=item.num_new_tokens,
        seed=None if params.seed is None else params.seed + request.index,
        adapter_id=request.adapter_id,
        pooling=request.pooling,
    )
