"""Turns the engine core's token outputs into text outputs: detokenizes, finds stop strings, gathers n samples.

It runs in the front end (the offline `LLM`, or the supervisor process of the appliance), off the engine's step
loop. A stop string ends a sample here; the caller then tells the core to stop it (`samples_to_stop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.contract import EngineCoreOutput, TokenLogprobs
from engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What this update added, for streaming.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def snapshot(self) -> CompletionOutput:
        """A copy that later updates leave alone; the cumulative lists stay shared, since they only ever grow."""
        return CompletionOutput(self.index, self.text, self.token_ids, self.logprobs, self.finish_reason,
                                self.stop_reason, self.delta_text, self.delta_token_ids, self.delta_logprobs)

    def add(self, newer: CompletionOutput) -> None:
        """Folds a later update of this completion into this snapshot, as if one update had brought both."""
        self.text, self.finish_reason, self.stop_reason = newer.text, newer.finish_reason, newer.stop_reason
        self.delta_text += newer.delta_text
        self.delta_token_ids = self.delta_token_ids + newer.delta_token_ids
        if newer.delta_logprobs:
            self.delta_logprobs = (self.delta_logprobs or []) + newer.delta_logprobs


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # One entry per prompt token; the first is None (nothing predicts it). None when not asked for.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    pooled: bytes | None = None  # a pooling request's float32 vector, once finished

    @property
    def finished(self) -> bool:
        # Asked for every update of every request: a plain loop is several times cheaper than `all()` over a
        # generator.
        for completion in self.outputs:
            if completion.finish_reason is None:
                return False
        return True

    def snapshot(self) -> RequestOutput:
        """A copy that the processor's later steps leave alone (it updates its own objects in place)."""
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [c.snapshot() for c in self.outputs], self.prompt_logprobs, self.num_cached_tokens,
                             self.pooled)

    def add(self, newer: RequestOutput) -> None:
        """Folds a later snapshot of this request into this one: deltas concatenate, the rest is the newer's."""
        self.num_cached_tokens, self.pooled = newer.num_cached_tokens, newer.pooled
        for completion, update in zip(self.outputs, newer.outputs):
            completion.add(update)


class _RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer):
        self.params = params
        self.output = RequestOutput(request_id, prompt, list(prompt_token_ids),
                                    [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None)
                                     for i in range(params.n)],
                                    prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.detokenizers = [IncrementalDetokenizer(tokenizer, params, prompt_token_ids) for _ in range(params.n)]


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        self._states[request_id] = _RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer)

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the request outputs that changed (deltas filled in) and the sample ids to stop in the core."""
        changed: dict[str, RequestOutput] = {}
        samples_to_stop: list[str] = []
        for out in core_outputs:
            state = self._states.get(out.parent_id)
            if state is None:
                continue
            if out.parent_id not in changed:  # first news of this request in this batch: clear last deltas
                for c in state.output.outputs:
                    c.delta_text, c.delta_token_ids, c.delta_logprobs = "", [], None
            completion = state.output.outputs[out.index]
            if completion.finished:  # stopped by a stop string; the core may still report one more step
                continue
            request_output = state.output
            request_output.num_cached_tokens = out.num_cached_tokens
            if out.pooled is not None:
                request_output.pooled = out.pooled
            if out.prompt_logprobs:
                request_output.prompt_logprobs.extend(out.prompt_logprobs)
            detokenizer = state.detokenizers[out.index]
            num_before = len(completion.token_ids)
            # A stop token (EOS or stop_token_ids) ends the request but its text is not part of the output.
            stop_string = (detokenizer.update(out.new_token_ids, num_before, stop_terminated=out.finish_reason == "stop")
                           if out.new_token_ids else None)
            num_new = detokenizer.num_tokens_to_stop if stop_string is not None else len(out.new_token_ids)
            completion.token_ids.extend(out.new_token_ids[:num_new])
            completion.delta_token_ids = out.new_token_ids[:num_new]
            if out.new_logprobs is not None and completion.logprobs is not None:
                completion.logprobs.extend(out.new_logprobs[:num_new])
                completion.delta_logprobs = out.new_logprobs[:num_new]
            if stop_string is not None:
                completion.finish_reason, completion.stop_reason = "stop", stop_string
                if not out.finished:
                    samples_to_stop.append(out.request_id)
            elif out.finished:
                completion.finish_reason, completion.stop_reason = out.finish_reason, out.stop_reason
            completion.delta_text = detokenizer.take_delta(completion.finished)
            completion.text = detokenizer.output_text
            changed[out.parent_id] = request_output
        for request_id, request_output in changed.items():
            if request_output.finished:
                del self._states[request_id]
        return list(changed.values()), samples_to_stop

    def abort(self, request_id: str) -> None:
        self._states.pop(request_id, None)
