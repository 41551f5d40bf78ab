"""EngineCore: the engine's inner loop on token ids — add, abort, step.

It owns the scheduler, the KV cache manager and the model runner, and knows nothing of text: tokenizing,
detokenizing and stop strings belong to the output processor in the front end. One `step` schedules a batch, runs
it and returns what each request produced.

n > 1 samples of one prompt are separate requests. Only the first is scheduled at once; its siblings wait until its
prompt has been scheduled, then take references to its full prompt blocks (`KVCacheManager.share_prefix`), so the
prompt's K/V is computed and stored once. Beam search's step requests fork the same way from the K/V that a finished
step request kept (`keep_kv`, `kv_parent`, `release_kv`; copy-on-write in the KV cache manager).

With `enable_lora`, adapters are added, replaced and removed by name (`add_lora`, `remove_lora`); a request names
one with `lora_name` and keeps the version it got for its whole life, even if the name is replaced meanwhile.

With `task` embed or score, every request carries `PoolingParams` and ends with its pooled vector once its prompt
is computed. An encoder (BERT, RoBERTa) keeps no KV across steps, so each prompt is computed whole in one step:
chunked prefill and prefix caching are off for it, and its KV blocks are mere bookkeeping (no memory behind them).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time

import torch

from engine.config import EngineConfig, check_encoder_on_one_rank, check_tensor_parallel_split, pipeline_stage_layers
from engine.device import torch_device
from engine.kv_cache.manager import KVCacheManager
from engine.contract import LoraInfo
from engine.lora.manager import LoraManager
from engine.models.config import ModelConfig
from engine.models.loader import weight_bytes
from engine.contract import EngineCoreOutput, PoolingParams, SchedulerOutput, SchedulerStats
from engine.models.registry import is_encoder
from engine.pooling.config import max_seq_length, resolve_pooler
from engine.request import Request, RequestStatus, core_output
from engine.distributed.tp_runner import TensorParallelRunner, WorkerDiedError
from engine.runner import ModelRunner, PendingRunnerOutput
from engine.sampling_params import InvalidParameterError, SamplingParams
from engine.scheduler import Scheduler
from engine.step_trace import StepRecord, StepTrace
from engine.structured_output.backend import GrammarBackend
from engine.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)
# Longest wait for a grammar's compilation when nothing else can run: short, so new messages are seen promptly.
_IDLE_WAIT_S = 0.01


@contextlib.contextmanager
def _timed(what: str, phase: str, phases: dict[str, float]):
    """Logs a long start-up step when it starts and how long it took, so that a slow start shows where it is, and
    keeps its seconds as `phases[phase]`."""
    logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    phases[phase] = seconds
    logger.info("%s: done in %.1f s", what, seconds)


def _check_parallel(model_config: ModelConfig, config: EngineConfig) -> None:
    """The rules of tensor and pipeline parallelism that need the model's config."""
    check_tensor_parallel_split(config.tensor_parallel_size, model_config.num_heads, model_config.num_kv_heads,
                                model_config.intermediate_size)
    check_encoder_on_one_rank(model_config.architecture, config.tensor_parallel_size, config.pipeline_parallel_size)


def _describe(stages: list[range]) -> str:
    return ", ".join(f"{r.start}-{r.stop - 1}" for r in stages)


def sample_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}/{index}"


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.device = torch_device(config.device)
        torch.manual_seed(config.seed)
        dtype = None if config.dtype == "auto" else config.dtype
        max_model_len = config.max_model_len
        if config.task != "generate" and max_model_len is None:
            max_model_len = max_seq_length(config.model)  # what the checkpoint's sentence-transformers results assume
        self.model_config = ModelConfig.from_pretrained(config.model, dtype=dtype, max_model_len=max_model_len)
        self.max_model_len = self.model_config.max_model_len
        self.pooler_info = resolve_pooler(config, self.model_config)
        # Resolved, so that the config's checks that involve the context length run (again) on the real one.
        self.config = config = dataclasses.replace(config, max_model_len=self.max_model_len,
                                                   **self._encoder_options(config))
        _check_parallel(self.model_config, config)
        stages = pipeline_stage_layers(self.model_config.num_layers, config.pipeline_parallel_size,
                                       config.pipeline_layer_split)
        self.startup_seconds: dict[str, float] = {}  # start-up phase -> seconds (EngineReady.startup_seconds)
        self.structured = self._structured_outputs()
        with _timed(f"loading {self.model_config.architecture} weights ({config.load_format}) on {self.device}"
                    + (f", {config.tensor_parallel_size} tensor-parallel ranks" if config.tensor_parallel_size > 1
                       else "")
                    + (f", pipeline stages of layers {_describe(stages)}" if len(stages) > 1 else ""),
                    "weights", self.startup_seconds):
            self.runner = (ModelRunner(config, self.model_config, self.device, self.pooler_info)
                           if config.tensor_parallel_size == config.pipeline_parallel_size == 1
                           else TensorParallelRunner(config, self.model_config, self.device, self.pooler_info))
        self.weight_bytes = weight_bytes(self.runner.model)
        logger.info("model weights: %.2f GB (%s)", self.weight_bytes / 1e9,
                    self.runner.model.quant_scheme.describe() if self.runner.model.quant_scheme else "not quantized")
        try:
            num_blocks = self._set_up_kv_cache_and_graphs()
        except BaseException:
            self.shutdown()  # parallel workers must not outlive a failed start
            raise
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                         self.runner.kv_memory.num_host_blocks)
        self.scheduler = Scheduler(config, self.kv_manager, self.structured)
        if self.pooler_info is None:
            self.structured.start()
        self.scheduler.fill_multiple = self.runner.mixed_graph_tokens
        self._waiting_siblings: dict[str, list[Request]] = {}  # first sample's id -> siblings not yet forked
        self._samples_of: dict[str, list[str]] = {}  # parent id -> ids of its unfinished samples
        self.num_steps = 0
        self.step_seconds = 0.0  # in `step`, cumulative
        self.device_wait_seconds = 0.0  # of it, waiting for the device's results
        self.step_trace: StepTrace | None = None  # set one to record every step (a diagnostic)
        # Schedule step N+1 while step N runs on the device (CUDA by default; one CPU gains nothing from it), or with
        # pipeline stages, while steps N-P+1..N run in later stages (on by default: the stages are separate devices).
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda" or config.pipeline_parallel_size > 1)
        # Steps launched and not completed, oldest first: at most one per stage (vLLM's virtual engines), two on one
        # device (the one running and the one being launched).
        self.max_in_flight = (1 if not self.async_scheduling else
                              2 if config.pipeline_parallel_size == 1 else config.pipeline_parallel_size)
        self._in_flight: collections.deque[tuple[SchedulerOutput, PendingRunnerOutput]] = collections.deque()
        self.max_in_flight_seen = 0  # the most steps in flight at once so far (after a launch)
        # A grammar's bitmask needs the token before it: scheduled ahead, a step gets its bitmask late, after its
        # forward is queued, while the device runs it (a single-process runner only: workers take the step whole).
        self.scheduler.defer_grammar_bitmask = self.async_scheduling and isinstance(self.runner, ModelRunner)
        self._launched_last = SchedulerOutput()  # what the latest step scheduled, for the step trace

    def _structured_outputs(self) -> StructuredOutputManager:
        """The structured-output manager; a generating engine's grammar tokenizer begins loading once the engine
        is built (`start`). The engine is ready without it: structured requests that come before it is loaded wait
        in the queue. It used to load beside the start-up, but its import of transformers' tokenizer classes pulls
        in torch._dynamo: seconds of Python competing for the interpreter lock with the main thread's forward
        profile and graph captures (an H200 start-up profile, bench/RESULTS.md)."""
        config = self.config
        return StructuredOutputManager(self.vocab_size, lambda: GrammarBackend(
            config.tokenizer or config.model, self.vocab_size, sorted(self.eos_token_ids)))

    def _set_up_kv_cache_and_graphs(self) -> int:
        config = self.config
        phases = self.startup_seconds
        with _timed("sizing the KV cache" + (" (profiling a forward pass)" if self.device.type == "cuda" else ""),
                    "kv_cache", phases):
            num_blocks = self.runner.determine_num_kv_blocks()
        blocks_per_seq = -(-self.max_model_len // config.block_size)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache has {num_blocks} blocks of {config.block_size} tokens, fewer than one sequence of "
                f"max_model_len={self.max_model_len} needs ({blocks_per_seq}); give it more memory or lower "
                f"max_model_len")
        started = time.perf_counter()
        self.runner.allocate_kv_cache(num_blocks)
        phases["kv_cache"] += time.perf_counter() - started
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, config.block_size,
                    num_blocks * self.runner.kv_memory.bytes_per_block / 2**30)
        if self.runner.use_cuda_graphs:
            with _timed(f"capturing CUDA graphs for {len(self.runner.graph_batch_sizes())} batch sizes and "
                        f"{len(self.runner.cuda_graphs.mixed)} mixed-step sizes",
                        "cuda_graphs", phases):
                self.runner.capture_cuda_graphs()
        return num_blocks

    def _encoder_options(self, config: EngineConfig) -> dict:
        """An encoder computes each prompt whole in one step and caches nothing; mean and CLS pooling need every
        prompt token's state, so no cached prefix may stand in for them."""
        if is_encoder(self.model_config.architecture):
            blocks_per_seq = -(-self.max_model_len // config.block_size)
            return {"enable_chunked_prefill": False, "enable_prefix_caching": False,
                    "num_kv_blocks": config.max_num_seqs * blocks_per_seq}
        if self.pooler_info is not None and self.pooler_info.pooling_type != "last":
            return {"enable_prefix_caching": False}
        return {}

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.model_config.eos_token_ids

    @property
    def kv_usage(self) -> float:
        return self.kv_manager.usage

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, cache_salt: str | None = None, arrival_time: float | None = None,
                    lora_name: str | None = None, pooling: PoolingParams | None = None,
                    kv_parent: str | None = None, keep_kv: bool = False) -> list[str]:
        """Queues a request that `engine.validation` accepted; returns the ids of its samples (one per n). Beam
        search's steps pass `keep_kv` (this request's K/V outlives it, until `release_kv`) and `kv_parent` (a kept
        request whose computed tokens start this prompt: its blocks are shared, not computed again)."""
        if keep_kv and params.n != 1:
            raise InvalidParameterError("n", "keep_kv needs n = 1")
        if request_id in self._samples_of:
            raise InvalidParameterError("request_id", f"a request with id {request_id!r} is already running")
        if (pooling is None) != (self.pooler_info is None):
            raise InvalidParameterError("model", f"this model's task is {self.config.task}; "
                                                 + ("it needs pooling requests" if pooling is None else
                                                    "it does not pool"))
        if params.structured_outputs is not None and self.config.speculative_config is not None:
            raise InvalidParameterError("structured_outputs", "structured outputs are not supported on a model served "
                                                              "with speculative decoding")
        adapter_id = None
        if lora_name is not None:
            if self.lora is None:
                raise InvalidParameterError("model", f"LoRA adapter {lora_name!r} asked for, but LoRA is not enabled")
            adapter_id = self.lora.resolve(lora_name)
        max_tokens = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        samples = [
            Request(sample_request_id(request_id, i, params.n), prompt_token_ids, params, self.eos_token_ids,
                    max_tokens=max_tokens, arrival_time=arrival_time, priority=priority, cache_salt=cache_salt,
                    adapter_id=adapter_id, parent_id=request_id, index=i, pooling=pooling)
            for i in range(params.n)
        ]
        self._samples_of[request_id] = [r.request_id for r in samples]
        if self.step_trace is not None:
            self.step_trace.arrivals.append(time.monotonic())
        self._queue_first(samples[0], kv_parent, keep_kv)
        if len(samples) > 1:
            self._waiting_siblings[samples[0].request_id] = samples[1:]
        return self._samples_of[request_id]

    def _queue_first(self, request: Request, kv_parent: str | None, keep_kv: bool) -> None:
        num_forked = self.kv_manager.fork(kv_parent, request) if kv_parent is not None else 0
        if num_forked:
            self.scheduler.add_forked_request(request, num_forked)
        else:
            self.scheduler.add_request(request)
        if keep_kv:
            self.kv_manager.keep_when_finished(request.request_id)

    def release_kv(self, request_ids: list[str]) -> None:
        """Frees the K/V that requests added with `keep_kv` kept (or will keep) for forks."""
        self.kv_manager.release_kept(request_ids)

    def abort_requests(self, parent_ids: list[str]) -> list[EngineCoreOutput]:
        outputs = []
        for parent_id in parent_ids:
            for sample_id in self._samples_of.pop(parent_id, []):
                siblings = self._waiting_siblings.pop(sample_id, [])
                finished = self.scheduler.finish_requests([sample_id], RequestStatus.FINISHED_ABORTED)
                for request in finished + siblings:
                    request.status = RequestStatus.FINISHED_ABORTED
                    outputs.append(core_output(request, [], None, None))
        return outputs

    def finish_requests(self, sample_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_STOPPED) -> None:
        """Ends samples that the front end found finished (a stop string); emits no output for them."""
        for request in self.scheduler.finish_requests(sample_ids, status):
            self._forget(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._waiting_siblings) or bool(self._in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """Schedules and launches one step and returns what the requests produced. With async scheduling the
        outputs returned are those of the step launched by the previous call, which ran on the device while this
        call scheduled and launched the next one."""
        start, started_at, wait_before = time.perf_counter(), time.monotonic(), self.device_wait_seconds
        try:
            return self._step()
        finally:
            seconds = time.perf_counter() - start
            self.step_seconds += seconds
            if self.step_trace is not None:
                launched = self._launched_last
                self.step_trace.steps.append(StepRecord(
                    started_at, seconds, self.device_wait_seconds - wait_before, launched.num_tokens,
                    launched.num_reqs))

    def _step(self) -> list[EngineCoreOutput]:
        outputs = []
        while self._in_flight and not self._may_schedule_ahead():
            outputs += self._complete(*self._in_flight.popleft())
        scheduler_output = self._launched_last = self.scheduler.schedule(self._batch_share())
        if self.scheduler.failed_outputs:
            outputs += self.scheduler.failed_outputs
            self.scheduler.failed_outputs = []
        elif scheduler_output.is_empty and not self._in_flight and self.scheduler.waiting:
            self.structured.wait_for_compilation(_IDLE_WAIT_S)  # only grammars being compiled can hold them
        self._fork_ready_siblings()
        launched = self._launch(scheduler_output, outputs) if not scheduler_output.is_empty else None
        if launched is not None:
            self._in_flight.append(launched)
            self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._in_flight))
        # The oldest step completes when the pipe is full, or when nothing new could go in (its requests are
        # what the next schedule waits for).
        if self._in_flight and (launched is None or len(self._in_flight) >= self.max_in_flight):
            outputs += self._complete(*self._in_flight.popleft())
        if self._in_flight and getattr(self._in_flight[0][1], "awaits_bitmask", None) is not None:
            self._sample_under_grammar(outputs)  # the oldest step: the ones before it have advanced the matchers
        for output in outputs:
            if output.finished:
                self._forget_id(output.parent_id, output.request_id)
        if self.lora is not None and self.lora.has_retired:
            self._drop_unused_loras()
        return outputs

    def _batch_share(self) -> int | None:
        """With pipeline stages, the most requests one batch takes: an equal share of those the engine can run, so
        that each stage has a batch (vLLM's virtual engines each hold their share). A batch taking every request
        would leave nothing to run beside it, and the stages would take turns."""
        if self.config.pipeline_parallel_size == 1 or self.max_in_flight == 1:
            return None
        return -(-min(self.config.max_num_seqs, self.scheduler.num_unfinished) // self.max_in_flight)

    def _may_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled before the steps in flight complete. Pipeline stages never
        schedule a request that is in flight, so what it needs from its last step (see
        `Scheduler.can_schedule_ahead_of`) is always on the host."""
        return self.config.pipeline_parallel_size > 1 or all(
            self.scheduler.can_schedule_ahead_of(in_flight) for in_flight, _ in self._in_flight)

    def _launch(self, scheduler_output: SchedulerOutput,
                outputs: list[EngineCoreOutput]) -> tuple[SchedulerOutput, PendingRunnerOutput] | None:
        self.num_steps += 1
        try:
            return scheduler_output, self.runner.execute(scheduler_output)
        except (torch.AcceleratorError, WorkerDiedError):
            raise  # see _fail
        except Exception:
            outputs += self._fail(scheduler_output)
            return None

    def _sample_under_grammar(self, outputs: list[EngineCoreOutput]) -> None:
        """Fills the oldest step's grammar bitmask, now that the steps before it have advanced the matchers, and
        queues its sampling behind its forward."""
        scheduler_output, pending = self._in_flight[0]
        try:
            pending.awaits_bitmask(self.structured.bitmask(
                [self.scheduler.requests.get(req_id) for req_id in scheduler_output.structured_req_ids]))
        except (torch.AcceleratorError, WorkerDiedError):
            raise  # see _fail
        except Exception:
            self._in_flight.popleft()
            outputs += self._fail(scheduler_output)

    def _complete(self, scheduler_output: SchedulerOutput, pending: PendingRunnerOutput) -> list[EngineCoreOutput]:
        waiting_since = time.perf_counter()
        try:
            runner_output = pending.get()
        except (torch.AcceleratorError, WorkerDiedError):
            raise  # see _fail
        except Exception:
            return self._fail(scheduler_output)
        finally:
            self.device_wait_seconds += time.perf_counter() - waiting_since
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _fail(self, scheduler_output: SchedulerOutput) -> list[EngineCoreOutput]:
        # A failing batch must not take the engine down: its requests end with an error, the rest go on. A device
        # fault (torch.AcceleratorError: an illegal address, an ECC error) or a dead parallel worker is not
        # caught: every later step would fail too; the engine process ends instead and its supervisor fails its
        # requests and restarts it. Running out of memory is an ordinary failure of the batch.
        logger.exception("model step failed; finishing its %d requests with an error: %s", scheduler_output.num_reqs,
                         ", ".join(scheduler_output.req_ids()))
        return [core_output(r, [], None, None) for r in self.scheduler.fail_step(scheduler_output)]

    def shutdown(self) -> None:
        """Stops the tensor- and pipeline-parallel workers, if any (a single-rank engine holds nothing to release)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.shutdown()

    def stats(self, with_block_states: bool = False) -> SchedulerStats:
        stats = self.scheduler.stats(with_block_states)
        stats.step_seconds, stats.device_wait_seconds = self.step_seconds, self.device_wait_seconds
        if self.device.type == "cuda":  # the caching allocator's count: no device sync
            stats.device_memory_bytes = torch.cuda.memory_reserved(self.device)
        return stats

    # ---- LoRA adapters ----
    @property
    def lora(self) -> LoraManager | None:
        return self.runner.lora

    def add_lora(self, name: str, path: str) -> None:
        """Loads the PEFT adapter folder at `path` as `name`, replacing an adapter of that name for new requests
        (running ones keep theirs). A bad adapter raises ValueError and changes nothing."""
        self._require_lora().add(name, path)
        self._drop_unused_loras()

    def remove_lora(self, name: str) -> None:
        """Stops serving `name`; requests already using it finish with it."""
        self._require_lora().remove(name)
        self._drop_unused_loras()

    def list_loras(self) -> list[LoraInfo]:
        return self.lora.list() if self.lora is not None else []

    def _require_lora(self) -> LoraManager:
        if self.lora is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True")
        return self.lora

    def _drop_unused_loras(self) -> None:
        """Frees replaced or removed adapter versions that no unfinished request holds any more."""
        waiting = [r for siblings in self._waiting_siblings.values() for r in siblings]
        self.lora.drop_unused({r.adapter_id for r in [*self.scheduler.requests.values(), *waiting]
                               if r.adapter_id is not None})

    def _fork_ready_siblings(self) -> None:
        for first_id in list(self._waiting_siblings):
            first = self.scheduler.requests.get(first_id)
            if first is None or first.num_computed_tokens < first.num_prompt_tokens:
                continue  # still computing its prompt (or preempted before finishing it)
            for sibling in self._waiting_siblings.pop(first_id):
                num_shared = self.kv_manager.share_prefix(first, sibling)
                self.scheduler.add_forked_request(sibling, num_shared)

    def _forget(self, request: Request) -> None:
        self._forget_id(request.parent_id, request.request_id)

    def _forget_id(self, parent_id: str, sample_id: str) -> None:
        remaining = self._samples_of.get(parent_id)
        if remaining is None:
            return
        if sample_id in remaining:
            remaining.remove(sample_id)
        if not remaining:
            del self._samples_of[parent_id]
