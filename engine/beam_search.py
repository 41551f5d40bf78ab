"""Beam search on top of the engine, as vLLM's `LLM.beam_search` does it: each step extends every live beam by one
token with an n = 1, max_tokens = 1 request that asks for the top 2 * beam_width logprobs. Each step request keeps
its K/V when it ends (`keep_kv`), and the next step's requests of the beams it spawned fork from it (`kv_parent`):
they reference its blocks, the prompt's and the common prefix's included, copy the partially filled last block only
when two beams write into it (copy-on-write in `engine.kv_cache.manager`), and compute one token each. Once the next
step's requests are queued, the previous step's kept K/V is released, so the blocks of beams that ended or were
pruned go back to the pool.

Scores (transformers' convention): the sum of the beam's token logprobs (the model's, before any temperature),
divided by its generated length (an ending EOS not counted) to the power `length_penalty` for the final ranking.
Each step keeps the `beam_width` best candidates that do not end in EOS; those that do are finished hypotheses
(unless `ignore_eos`). A prompt's search ends when its best live beam cannot beat its `beam_width` finished ones
(with `early_stopping`: once it has that many), at `max_tokens`, or at the context length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.contract import TokenLogprobs
from engine.sampling_params import MAX_LOGPROBS, InvalidParameterError, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # passed to each step's request as vLLM does; the scores use the model's logprobs
    length_penalty: float = 1.0
    early_stopping: bool = False  # stop a prompt at beam_width finished sequences, even if a live one could win

    def __post_init__(self) -> None:
        if not 1 <= self.beam_width <= MAX_LOGPROBS // 2:
            raise InvalidParameterError("beam_width", f"must be in [1, {MAX_LOGPROBS // 2}], got {self.beam_width}")
        if self.max_tokens < 1:
            raise InvalidParameterError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidParameterError("temperature", f"must be >= 0, got {self.temperature}")


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # generated token ids
    cum_logprob: float
    text: str = ""
    finished: bool = False  # ended with an EOS token
    # The step request whose kept K/V holds every token but the last (None: the prompt is still to compute).
    kv_parent: str | None = field(default=None, repr=False, compare=False)

    def score(self, length_penalty: float) -> float:
        length = len(self.tokens) - (1 if self.finished else 0)
        return self.cum_logprob / max(length, 1) ** length_penalty


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


@dataclass
class _Search:
    prompt_ids: list[int]
    beams: list[BeamSearchSequence] = field(default_factory=lambda: [BeamSearchSequence([], 0.0)])
    done: list[BeamSearchSequence] = field(default_factory=list)


class BeamSearch:
    """The search, apart from how its steps run (offline: `beam_search`; the HTTP API runs them on an engine
    client): `pending()` gives the sequences to extend, `update()` takes each one's next-token logprobs (the
    engine's `TokenLogprobs` of a max_tokens = 1 request with `step_params`), until `pending()` is empty."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: frozenset[int],
                 max_model_len: int):
        self.params, self.eos_token_ids, self.max_model_len = params, eos_token_ids, max_model_len
        self.step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width,
                                          temperature=params.temperature, ignore_eos=True)
        self._searches = [_Search(list(prompt)) for prompt in prompts]
        self._num_steps = 0
        self._live: list[tuple[_Search, BeamSearchSequence]] = []

    def pending(self) -> list[tuple[list[int], str | None]]:
        if self._num_steps == self.params.max_tokens:
            return []
        self._live = [(search, beam) for search in self._searches for beam in search.beams]
        return [(search.prompt_ids + beam.tokens, beam.kv_parent) for search, beam in self._live]

    def update(self, request_ids: list[str], next_logprobs: list[TokenLogprobs]) -> None:
        self._num_steps += 1
        candidates: dict[int, list[BeamSearchSequence]] = {id(search): [] for search in self._searches}
        for (search, beam), request_id, top in zip(self._live, request_ids, next_logprobs):
            # The sampled token comes first, then the top 2 * beam_width.
            candidates[id(search)].extend(
                BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + logprob, kv_parent=request_id)
                for token, logprob in zip(top.token_ids[1:], top.logprobs[1:]))
        for search in self._searches:
            self._advance(search, candidates[id(search)])

    def results(self, decode: Callable[[list[int]], str]) -> list[BeamSearchOutput]:
        """Per prompt the `beam_width` best sequences, best first, with their text."""
        outputs = []
        for search in self._searches:
            ranked = sorted(search.done + search.beams, key=lambda s: s.score(self.params.length_penalty),
                            reverse=True)[:self.params.beam_width]
            for sequence in ranked:
                sequence.text = decode(sequence.tokens)
            outputs.append(BeamSearchOutput(ranked))
        return outputs

    def _advance(self, search: _Search, candidates: list[BeamSearchSequence]) -> None:
        """Keeps the best `beam_width` candidates that go on; those ending in EOS join the finished ones."""
        params = self.params
        search.beams = []
        room = self.max_model_len - len(search.prompt_ids)
        for candidate in sorted(candidates, key=lambda c: c.cum_logprob, reverse=True):
            if len(search.beams) == params.beam_width:
                break
            if not params.ignore_eos and candidate.tokens[-1] in self.eos_token_ids:
                candidate.finished = True
                search.done.append(candidate)
            elif len(candidate.tokens) >= room:
                search.done.append(candidate)  # the context is full
            else:
                search.beams.append(candidate)
        if len(search.done) >= params.beam_width and search.beams:
            worst_kept = sorted(s.score(params.length_penalty) for s in search.done)[-params.beam_width]
            if params.early_stopping or search.beams[0].score(params.length_penalty) < worst_kept:
                search.beams = []  # enough finished ones, and (unless early_stopping) no live beam overtakes them

