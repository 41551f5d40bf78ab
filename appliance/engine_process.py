"""The engine process: one per model replica, started by the supervisor as `python -m appliance.engine_process FD`.

It builds an `EngineCore` from the `StartEngine` message, reports `EngineReady`, then loops: take in whatever
messages arrived, run one step when any request is unfinished, send its outputs back. A reader thread decodes
incoming frames so that the step loop never blocks on the socket while it has work; when the supervisor goes away
(the socket closes) the process exits.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import logging
import os
import pstats
import queue
import signal
import socket
import sys
import threading
import time

import psutil
import torch

from engine import kernels
from appliance import ipc
from appliance.engines import waits_for_ranks
from appliance.logs import configure_logging
from engine import contract
from engine.core import EngineCore
from engine.distributed.tp_runner import WorkerDiedError, exit_process_on_lost_rank
from engine.request import RequestStatus
from engine.sampling_params import InvalidParameterError
from engine.sleep import EngineSleep
from engine.step_trace import StepTrace

logger = logging.getLogger("kvbox.engine")
STATS_INTERVAL_S = 0.25
BLOCK_MAP_INTERVAL_S = 1.0  # the block map costs a pass over every block
_CLOSED = object()


class EngineLoop:
    def __init__(self, channel: ipc.BlockingChannel, core: EngineCore):
        self.channel = channel
        self.core = core
        self.inbox: queue.Queue = queue.Queue()
        self._last_stats = 0.0
        self._last_block_map = 0.0
        self._running = True
        self.sleep = EngineSleep(core)

    def read_forever(self) -> None:
        try:
            while (payload := self.channel.recv()) is not None:
                self.inbox.put(ipc.decode_to_engine(payload))
        finally:
            self.inbox.put(_CLOSED)

    def run(self) -> None:
        self.channel.send(self.sleep.state())  # the dashboard's memory figures from the start
        while self._running:
            idle = not self.core.has_unfinished_requests()
            self._handle_inbox(block=idle)
            if self._running and self.core.has_unfinished_requests():
                start = time.perf_counter()
                outputs = self.core.step()
                self._send_outputs(outputs, time.perf_counter() - start)

    def _handle_inbox(self, block: bool) -> None:
        try:
            message = self.inbox.get(timeout=STATS_INTERVAL_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            if block:  # idle: keep the supervisor's view of the cache fresh
                self._send_outputs([], 0.0, force_stats=True)
            return
        while True:
            self._handle(message)
            if not self._running:
                return
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message) -> None:
        if message is _CLOSED or isinstance(message, contract.Shutdown):
            self._running = False
        elif isinstance(message, contract.AddRequest):
            if self.sleep.asleep:  # the front end wakes an engine before it sends requests; this is a safety net
                self.channel.send(contract.RequestRejected(message.request_id, "model", "the model is asleep"))
                return
            try:
                self.core.add_request(message.request_id, message.prompt_token_ids, message.params,
                                      priority=message.priority, cache_salt=message.cache_salt,
                                      lora_name=message.lora_name, pooling=message.pooling,
                                      kv_parent=message.kv_parent, keep_kv=message.keep_kv)
            except InvalidParameterError as e:
                logger.warning("request %s rejected: %s", message.request_id, e)
                self.channel.send(contract.RequestRejected(message.request_id, e.param, e.message))
        elif isinstance(message, contract.AbortRequests):
            self._send_outputs(self.core.abort_requests(message.request_ids), 0.0)
        elif isinstance(message, contract.ReleaseKV):
            self.core.release_kv(message.request_ids)
        elif isinstance(message, contract.FinishSamples):
            self.core.finish_requests(message.sample_ids, RequestStatus.FINISHED_STOPPED)
        elif isinstance(message, (contract.LoadLora, contract.UnloadLora)):
            self._change_lora(message)
        elif isinstance(message, (contract.Sleep, contract.Wake)):
            self._sleep_or_wake(message)

    def _sleep_or_wake(self, message: contract.Sleep | contract.Wake) -> None:
        if isinstance(message, contract.Wake):
            self.channel.send(self.sleep.handle(sleep=False))
        elif message.level != 1:  # level 2 is the front end's: it stops the process
            self.channel.send(self.sleep.state(error=f"sleep level {message.level}: the engine sleeps at level 1"))
        else:
            # The front end aborted its requests before it sent this; a step still in flight completes first.
            while self.core.has_unfinished_requests():
                self._send_outputs(self.core.step(), 0.0)
            self.channel.send(self.sleep.handle(sleep=True))

    def _change_lora(self, message: contract.LoadLora | contract.UnloadLora) -> None:
        """A refused adapter (bad files, over a limit, unknown name) changes nothing and is reported, not raised."""
        ok, text = True, ""
        try:
            if isinstance(message, contract.LoadLora):
                self.core.add_lora(message.name, message.path)
            else:
                self.core.remove_lora(message.name)
        except ValueError as e:
            ok, text = False, str(e)
        except Exception as e:  # e.g. an OSError reading the files: still the adapter's fault, not the engine's
            logger.exception("LoRA adapter %r: unexpected error", message.name)
            ok, text = False, f"{type(e).__name__}: {e}"
        self.channel.send(contract.LoraResult(message.name, ok, text, self.core.list_loras()))

    def _send_outputs(self, outputs, step_seconds: float, force_stats: bool = False) -> None:
        now = time.monotonic()
        stats = None
        if force_stats or now - self._last_stats >= STATS_INTERVAL_S:
            with_map = now - self._last_block_map >= BLOCK_MAP_INTERVAL_S
            stats, self._last_stats = self.core.stats(with_block_states=with_map), now
            if with_map:
                self._last_block_map = now
        loras = self.core.list_loras() if stats is not None and stats.block_states is not None and \
            self.core.config.enable_lora else None
        if outputs or stats is not None:
            self.channel.send(contract.StepOutputs(outputs, stats, step_seconds, loras))


def ready_message(core: EngineCore, imports_s: float | None = None) -> contract.EngineReady:
    """What the front end learns of a built engine (for the process client and the in-process one alike);
    `imports_s`: the engine process's time from its start to its first message (interpreter, imports)."""
    phases = {"engine_imports": imports_s} if imports_s is not None else {}
    return contract.EngineReady(
        vocab_size=core.vocab_size,
        max_model_len=core.max_model_len,
        eos_token_ids=sorted(core.eos_token_ids),
        num_kv_blocks=core.kv_manager.pool.num_blocks,
        block_size=core.config.block_size,
        device=str(core.device),
        dtype=str(core.model_config.dtype).removeprefix("torch."),
        kernel_backend=kernels.backend_name(),
        pooler=core.pooler_info,
        quantization=core.runner.model.quant_scheme.describe() if core.runner.model.quant_scheme else "none",
        weight_bytes=core.weight_bytes,
        startup_seconds={**phases, **core.startup_seconds},
    )


@contextlib.contextmanager
def _profiled(path_prefix: str | None):
    """With KVBOX_ENGINE_PROFILE=PREFIX, the step loop runs under cProfile and PREFIX.PID.txt gets its functions by
    own time when the engine stops: where the engine's host time goes while it serves."""
    if not path_prefix:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        with open(f"{path_prefix}.{os.getpid()}.txt", "w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C in the terminal reaches the whole process group; the supervisor ends engines through the socket
    # after draining, so an engine must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging()  # the server's level and format, from the environment it passed on
    channel = ipc.BlockingChannel(socket.socket(fileno=int(argv[0])))
    payload = channel.recv()
    if payload is None:
        return 1
    start = ipc.decode_to_engine(payload)
    assert isinstance(start, contract.StartEngine), start
    imports_s = time.time() - psutil.Process().create_time()  # the supervisor sent StartEngine as it spawned us
    logger.info("engine process %d: building the engine", os.getpid())  # its time since the spawn is imports
    exit_process_on_lost_rank(lambda reason: channel.send(contract.EngineFailed(reason)))
    try:
        core = EngineCore(start.engine_config)
    except Exception as e:  # a model that cannot load is reported, not silently retried
        waiting = waits_for_ranks(e, start.engine_config)
        if waiting:
            logger.warning("engine not started: %s; it starts again to wait for them", e)
        else:
            logger.exception("engine failed to start")
        channel.send(contract.EngineFailed(f"{type(e).__name__}: {e}", waiting))
        return 1
    channel.send(ready_message(core, imports_s))
    # The model, tokenizer and torch leave ~200k long-lived objects; a full collection over them took ~90 ms, a stall
    # of the step loop every so often. Frozen, the collector leaves them alone.
    gc.freeze()
    loop = EngineLoop(channel, core)
    threading.Thread(target=loop.read_forever, name="ipc-reader", daemon=True).start()
    trace_prefix = os.environ.get("KVBOX_STEP_TRACE")  # see engine.step_trace
    if trace_prefix:
        core.step_trace = StepTrace()
    try:
        with _profiled(os.environ.get("KVBOX_ENGINE_PROFILE")):
            loop.run()
    except (torch.AcceleratorError, WorkerDiedError) as e:
        # The CUDA context is unusable after a device fault, and a model missing a tensor-parallel shard cannot run;
        # the supervisor fails this engine's requests and starts a fresh process, noting why.
        logger.exception("device fault or lost tensor-parallel worker: the engine exits to be restarted")
        with contextlib.suppress(OSError):
            channel.send(contract.EngineFailed(f"{type(e).__name__}: {e}"))
        return 3
    finally:
        core.shutdown()
        if core.step_trace is not None:
            core.step_trace.write(f"{trace_prefix}.{os.getpid()}.json")
    return 0


if __name__ == "__main__":
    # os._exit: skip interpreter teardown (CUDA contexts, daemon threads) once the loop has ended.
    os._exit(main())
