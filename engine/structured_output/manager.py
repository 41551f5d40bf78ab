"""The scheduler's side of structured outputs: each request's grammar matcher and each step's token bitmask.

A structured request gets its own matcher (n > 1: one per sample) once its grammar is compiled; until then it waits
in the queue. Each step, the rows that sample get their allowed tokens as one packed int32 bitmask (32 tokens per
word, xgrammar's layout), which crosses to the runner as plain bytes with the rows' request ids; the sampler applies
it on the device. The matcher advances with each token the scheduler accepts, and a terminated matcher (the grammar
is complete and its end token was taken) ends the request with "stop". Nothing here runs for a batch without
structured requests.
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


class RequestGrammar:
    """One request's grammar: its (shared) compilation, then its own matcher."""

    __slots__ = ("future", "matcher")

    def __init__(self, future: Future[xgr.CompiledGrammar]):
        self.future = future
        self.matcher: xgr.GrammarMatcher | None = None

    def ready(self) -> bool:
        """True once the matcher exists; raises the compilation's error (InvalidParameterError)."""
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
        self._batch: xgr.BatchGrammarMatcher | None = None

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    def register(self, request: Request) -> None:
        """Starts (or joins) the compilation of the request's grammar."""
        request.grammar = RequestGrammar(self.backend.compile(request.sampling_params.structured_outputs))

    def bitmask(self, requests: list[Request]) -> bytes:
        """The packed allowed-token bitmask of each request's next token, one row per request, in order."""
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
        bitmask = xgr.allocate_token_bitmask(len(requests), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([r.grammar.matcher for r in requests], bitmask)
        return bitmask.numpy().tobytes()

    def wait_for_compilation(self, timeout_s: float) -> None:
        """Blocks until some compilation ends, or the timeout: an engine with nothing to run but requests waiting
        for their grammars idles here instead of spinning."""
        if self._backend is not None:
            with self._backend.compiled:
                self._backend.compiled.wait(timeout_s)
