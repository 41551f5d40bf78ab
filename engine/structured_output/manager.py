"""The scheduler's side of structured outputs: each request's grammar matcher and each step's token bitmask.

A structured request gets its own matcher (n > 1: one per sample) once its grammar is compiled; until then it waits
in the queue. Each step, the rows that sample get their allowed tokens as one packed int32 bitmask (32 tokens per
word, xgrammar's layout), which crosses to the runner as plain bytes with the rows' request ids; the sampler applies
it on the device. The matcher advances with each token the scheduler accepts, and a terminated matcher (the grammar
is complete and its end token was taken) ends the request with "stop". Nothing here runs for a batch without
structured requests.

A step scheduled ahead of the one still on the device (async scheduling) gets its bitmask late, from the engine core,
once the earlier step's tokens have advanced the matchers; a request that ended meanwhile (its token will be
discarded) gets a row that allows every token.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from engine.structured_output.backend import GrammarBackend

if TYPE_CHECKING:
    import xgrammar as xgr

    from engine.request import Request


# Below this many rows one thread fills the bitmask faster: on a 16-core host, 8 threads took 4.3 ms for 64 JSON
# rows that one thread fills in 0.5 ms (vLLM's threshold for its parallel fill is 128 too).
_PARALLEL_ROWS = 128
_PARALLEL_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) // 2))


class RequestGrammar:
    """One request's grammar: its (shared) compilation, then its own matcher."""

    __slots__ = ("future", "matcher")

    def __init__(self, future: Future[xgr.CompiledGrammar]):
        self.future = future
        self.matcher: xgr.GrammarMatcher | None = None

    def ready(self) -> bool:
        """True once the matcher exists; raises the compilation's error (InvalidParameterError for the request's
        grammar, GrammarBackendError for the engine's)."""
        if self.matcher is None and self.future.done():
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.future.result())
        return self.matcher is not None

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


class StructuredOutputManager:
    def __init__(self, vocab_size: int, backend_factory: Callable[[], GrammarBackend]):
        self.vocab_size = vocab_size
        self._backend_factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._batch: dict[bool, xgr.BatchGrammarMatcher] = {}  # by whether it fills rows in parallel
        self._buffer = None  # reused across steps: a fresh bitmask per step cost more than filling it

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    def start(self) -> None:
        """Begins loading the tokenizer xgrammar indexes, in the backend's threads: it takes seconds (transformers'
        import, a vocabulary of 150k tokens: 12.7 s for Qwen's on the H200 host), which the first structured request
        would otherwise wait for."""
        _ = self.backend

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Whether the grammar tokenizer that `start` began loading is loaded within `timeout` seconds (True when
        none was started). A benchmark waits here: the load is seconds of Python in the backend's threads, whose
        turns at the interpreter lock delay every step of the main thread while it lasts."""
        return self._backend is None or self._backend.wait_loaded(timeout)

    def register(self, request: Request) -> None:
        """Starts (or joins) the compilation of the request's grammar."""
        request.grammar = RequestGrammar(self.backend.compile(request.sampling_params.structured_outputs))

    def bitmask(self, requests: list[Request | None]) -> bytes:
        """The packed allowed-token bitmask of each request's next token, one row per request, in order (None, or
        a request that ended: every token allowed)."""
        import xgrammar as xgr

        if self._buffer is None or self._buffer.shape[0] < len(requests):
            self._buffer = xgr.allocate_token_bitmask(max(len(requests), 64), self.vocab_size)
        bitmask = self._buffer[:len(requests)]
        live = [i for i, r in enumerate(requests) if r is not None and not r.is_finished and not r.grammar.terminated]
        if len(live) < len(requests):
            bitmask.numpy().fill(-1)  # numpy's: torch's parallel fill wakes the host's OpenMP pool
        parallel = len(live) >= _PARALLEL_ROWS
        if parallel not in self._batch:
            self._batch[parallel] = xgr.BatchGrammarMatcher(max_threads=_PARALLEL_THREADS if parallel else 1)
        self._batch[parallel].batch_fill_next_token_bitmask([requests[i].grammar.matcher for i in live], bitmask,
                                                             indices=live)
        return bitmask.numpy().tobytes()

    def wait_for_compilation(self, timeout_s: float) -> None:
        """Blocks until some compilation ends, or the timeout: an engine with nothing to run but requests waiting
        for their grammars idles here instead of spinning."""
        if self._backend is not None:
            with self._backend.compiled:
                self._backend.compiled.wait(timeout_s)
