"""`GrammarBackend`: compiles grammars in a thread pool, off the engine's step loop, and caches them by key.

The vocabulary index (`vocabulary.tokenizer_info`: the tokenizer's, loaded in a child process where it would cost
the engine process a transformers import) loads in the pool as soon as the backend exists (an engine starts it once
it is built). A request whose grammar is still compiling (or whose tokenizer is still loading) waits in the
scheduler's queue.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from engine.structured_output.grammar import compile_grammar
from engine.structured_output.params import StructuredOutputsParams
from engine.structured_output.vocabulary import tokenizer_info

if TYPE_CHECKING:
    import xgrammar as xgr

MAX_CACHED_GRAMMARS = 512
_NUM_THREADS = 2


class GrammarBackendError(RuntimeError):
    """The backend cannot compile any grammar (its vocabulary index did not load)."""


class GrammarBackend:
    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]):
        self._executor = ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="grammar")
        self._compiler: Future[xgr.GrammarCompiler] = self._executor.submit(
            self._load_compiler, tokenizer_path, vocab_size, stop_token_ids)
        self._grammars: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = threading.Condition()  # notified whenever a compilation ends

    @staticmethod
    def _load_compiler(tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> xgr.GrammarCompiler:
        info = tokenizer_info(tokenizer_path, vocab_size, stop_token_ids)  # before xgrammar's import: see there
        import xgrammar as xgr

        return xgr.GrammarCompiler(info, max_threads=_NUM_THREADS)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Whether the tokenizer's index is loaded (or failed to load) within `timeout` seconds."""
        return not wait([self._compiler], timeout).not_done

    def compile(self, params: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar's future; equal keys share one compilation. Failures raise InvalidParameterError."""
        key = params.key
        with self._lock:
            future = self._grammars.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._grammars.move_to_end(key)
                return future
            future = self._grammars[key] = self._executor.submit(self._compile, params)
            while len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        future.add_done_callback(self._notify)
        return future

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        try:
            compiler = self._compiler.result()
        except Exception as e:  # the engine's fault, not the request's: its structured requests end in an error
            raise GrammarBackendError(f"the engine's grammar tokenizer failed to load: {e}") from e
        return compile_grammar(compiler, params)

    def _notify(self, _future: Future) -> None:
        with self.compiled:
            self.compiled.notify_all()
