"""Every struct that crosses a process boundary, as plain data (msgspec Structs, msgpack on the wire, never pickle).

Two boundaries meet here:
- scheduler -> model runner (a worker process, under tensor or pipeline parallelism): `SchedulerOutput` each step,
  `ModelRunnerOutput` back. A runner never sees a scheduler's `Request`: a request reaches it once, whole, as
  `NewRequestData` when first scheduled, and afterwards only as a diff in `CachedRequestData` (tokens the host
  learnt, blocks added, the new block table of a request resumed after preemption). Finished ids tell the runner
  what to forget.
- engine process (tensor-parallel rank 0) -> worker processes (ranks 1..): `WorkerCommand`, which carries each step's
  `SchedulerOutput`; only rank 0's results are used, since every rank samples the same tokens.
- front end (the supervisor) <-> engine process: the messages below `EngineCoreOutput` (tagged unions `ToEngine`
  and `FromEngine`); `appliance.ipc` frames them on the socket.
"""

from __future__ import annotations

import msgspec

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams


class TokenLogprobs(msgspec.Struct, array_like=True):
    """One position's logprobs: the chosen (or prompt) token first, then the top-k alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int  # rank of token_ids[0] among all tokens (1 = most likely)


class PoolingParams(msgspec.Struct, array_like=True, omit_defaults=True):
    """What a pooling request (task embed or score) asks beyond its tokens; it samples nothing and ends when its
    prompt is computed."""

    dimensions: int | None = None  # Matryoshka: keep the first `dimensions` features (then normalize)
    token_type_ids: list[int] | None = None  # a cross-encoder's text pair: 0 for the first text, 1 for the second


class PoolerInfo(msgspec.Struct):
    """An embedding or scoring engine's resolved pooling, for the front end's checks and the model list."""

    task: str  # embed | score
    pooling_type: str  # last | mean | cls
    normalize: bool
    hidden_size: int  # an embedding's length (a score has one value)
    matryoshka_dimensions: list[int] | None = None  # sizes `dimensions` may take; None: no truncation


# ---- scheduler -> runner ----
class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the runner does not hold yet: everything it needs to compute and sample it."""

    req_id: str
    token_ids: list[int]  # prompt, then the outputs the host knows (a request resumed after preemption has some)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: list[int]  # masked while fewer than min_tokens outputs exist
    block_ids: list[int]
    num_computed_tokens: int  # K/V already cached (prefix-cache hits, a sibling's shared prompt)
    num_new_tokens: int  # scheduled this step
    seed: int | None = None  # its random generator's seed (one per sample of n), None: the global RNG
    adapter_id: str | None = None  # LoRA adapter version
    pooling: PoolingParams | None = None  # a pooling engine's request


class CachedRequestData(msgspec.Struct, array_like=True):
    """Requests the runner already holds, one column entry per request, in the step's order."""

    req_ids: list[str] = []
    new_token_ids: list[list[int]] = []  # outputs the host learnt since they were last sent
    new_block_ids: list[list[int]] = []  # blocks appended to the block table
    num_computed_tokens: list[int] = []
    num_new_tokens: list[int] = []
    # Resumed after a preemption: its blocks were freed, and new_block_ids is its whole new block table.
    resumed: list[bool] = []

    def append(self, req_id: str, new_token_ids: list[int], new_block_ids: list[int], num_computed_tokens: int,
               num_new_tokens: int, resumed: bool) -> None:
        self.req_ids.append(req_id)
        self.new_token_ids.append(new_token_ids)
        self.new_block_ids.append(new_block_ids)
        self.num_computed_tokens.append(num_computed_tokens)
        self.num_new_tokens.append(num_new_tokens)
        self.resumed.append(resumed)


DRAFT_TOKEN_PLACEHOLDER = -1


class SchedulerOutput(msgspec.Struct, array_like=True):
    """One step. The batch runs the cached requests in their order, then the new ones."""

    step_id: int = 0
    cached_requests: CachedRequestData = msgspec.field(default_factory=CachedRequestData)
    new_requests: list[NewRequestData] = []
    # Requests the runner must forget before this step's: finished (or aborted) since the last step. Preempted ones
    # lose their blocks but keep the rest (their random generator, tokens) until they resume.
    finished_ids: list[str] = []
    preempted_ids: list[str] = []
    # req id -> [first, last): prompt positions whose next-token logprobs this step computes.
    prompt_logprob_spans: dict[str, tuple[int, int]] = {}
    # Structured outputs: the allowed next tokens of the sampling rows that follow a grammar, as xgrammar's packed
    # int32 bitmask (row i: structured_req_ids[i], ceil(vocab / 32) words, native byte order). None: no such row.
    structured_req_ids: list[str] = []
    grammar_bitmask: bytes | None = None
    # Speculative decoding: req id -> draft token ids that follow its last known token. Its row's num_new_tokens
    # counts them: the runner computes 1 + k positions and samples at each to verify them. With a draft model the
    # ids are DRAFT_TOKEN_PLACEHOLDER: the runner's draft model draws them in the step.
    spec_token_ids: dict[str, list[int]] = {}
    # Copy-on-write of shared KV blocks (beam forks): (source, destination) block ids, copied on every layer's K/V
    # before the step's forward.
    blocks_to_copy: list[tuple[int, int]] = []
    # KV swap (`host_swap_bytes`): (device, host) blocks of requests preempted to host memory, and (host, device)
    # blocks of requests resumed from it. The runner moves them out, then copies blocks_to_copy, then moves them in,
    # all before the forward: a block freed by a swap-out may be this step's copy or swap-in destination.
    blocks_to_swap_out: list[tuple[int, int]] = []
    blocks_to_swap_in: list[tuple[int, int]] = []

    @property
    def num_reqs(self) -> int:
        return len(self.cached_requests.req_ids) + len(self.new_requests)

    @property
    def num_tokens(self) -> int:
        return sum(self.cached_requests.num_new_tokens) + sum(r.num_new_tokens for r in self.new_requests)

    @property
    def is_empty(self) -> bool:
        return self.num_reqs == 0

    def req_ids(self) -> list[str]:
        return [*self.cached_requests.req_ids, *(r.req_id for r in self.new_requests)]


# ---- runner -> scheduler ----
class ModelRunnerOutput(msgspec.Struct, array_like=True):
    """What the runner produced for the requests that sampled, in `req_ids` order."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None  # one per sampled token, when any request asked
    prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
    # A pooling engine's requests whose prompt this step finished: req id -> float32 vector (little-endian bytes).
    pooled: dict[str, bytes] = {}
    # Speculative decoding: req id -> its accepted drafts, emitted before its sampled token (which is the correction
    # of the first rejected draft, or the bonus token when all were accepted); and their logprobs, when asked.
    spec_token_ids: dict[str, list[int]] = {}
    spec_logprobs: dict[str, list[TokenLogprobs]] = {}


# ---- engine -> front end ----
class RequestTiming(msgspec.Struct, array_like=True):
    """Where a finished request's time went in the engine (vLLM's phases): queued from arrival to its first
    scheduling, prefill from then to its first token, decode from the first token to the last."""

    queued_s: float
    prefill_s: float
    decode_s: float


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
    timing: RequestTiming | None = None  # on a request's last output only, when it produced a token
    pooled: bytes | None = None  # a pooling request's result: float32 little-endian (an embedding, or one score)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SpecDecodingStats(msgspec.Struct):
    """Cumulative speculative decoding counters (vLLM's spec_decode metrics)."""

    num_drafts: int = 0  # verifications: one per request and step that had drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = []  # [i]: drafts accepted at position i (of num_speculative_tokens)


class SwapStats(msgspec.Struct):
    """The host swap pool (`host_swap_bytes`): its size and use now, and cumulative block moves."""

    num_host_blocks: int
    num_used_host_blocks: int
    num_swapped_requests: int  # preempted requests whose K/V waits in host memory
    num_swapped_out_blocks: int
    num_swapped_in_blocks: int


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
    device_memory_bytes: int = 0  # what the engine's device allocator holds (rank 0's GPU); 0 on a CPU
    spec_decoding: SpecDecodingStats | None = None  # with speculative decoding
    swap: SwapStats | None = None  # with a host swap pool


class LoraInfo(msgspec.Struct):
    """One served adapter (its current version) and its name's usage since the engine started."""

    name: str
    adapter_id: str
    path: str
    rank: int
    slot: int | None  # its GPU slot, or None while it is in host memory only
    num_requests: int  # requests that used the name
    num_tokens: int  # tokens computed with it: prompts, recomputes and generated tokens
    num_slot_loads: int  # how often it was copied into a GPU slot


# ---- engine process (rank 0) -> tensor-parallel workers, sent to each of them ----
class StartWorker(msgspec.Struct, tag=True):
    engine_config: EngineConfig  # max_model_len resolved
    pooler_info: PoolerInfo | None = None  # a pooling engine's, resolved by rank 0


class DetermineNumKVBlocks(msgspec.Struct, tag=True):
    """Every rank sizes its cache (the GPU profile runs collectives); the smallest count wins."""


class AllocateKVCache(msgspec.Struct, tag=True):
    num_blocks: int


class CaptureCudaGraphs(msgspec.Struct, tag=True):
    pass


class ExecuteStep(msgspec.Struct, tag=True):
    scheduler_output: SchedulerOutput


class StopWorker(msgspec.Struct, tag=True):
    pass


class SleepLevel1(msgspec.Struct, tag=True):
    """Level-1 sleep or wake of every rank (engine.sleep): the KV cache freed, the weights to host memory and back."""
    asleep: bool
    num_blocks: int = 0  # waking: the KV cache's blocks, as before the sleep


class LoadLoraShard(msgspec.Struct, tag=True):
    """Every rank loads its shard of an adapter version that rank 0 has loaded and checked, under the same id."""
    name: str
    adapter_id: str
    path: str  # the adapter's folder, read by every rank


class FreeLoraVersions(msgspec.Struct, tag=True):
    """Adapter versions that rank 0 freed (replaced or removed, and no request holds them any more)."""
    adapter_ids: list[str]


WorkerCommand = (StartWorker | DetermineNumKVBlocks | AllocateKVCache | CaptureCudaGraphs | ExecuteStep | StopWorker
                 | LoadLoraShard | FreeLoraVersions | SleepLevel1)


# ---- front end (the supervisor) -> engine process ----
class StartEngine(msgspec.Struct, tag=True):
    engine_config: EngineConfig


class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    lora_name: str | None = None  # a loaded LoRA adapter's name (None: the base model)
    pooling: PoolingParams | None = None  # required by (and only by) an embed or score engine
    # Beam search's steps: fork from the K/V that this finished request kept (its tokens must start this prompt),
    # and keep this request's K/V when it finishes, until a ReleaseKV names it.
    kv_parent: str | None = None
    keep_kv: bool = False


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]  # parent request ids


class FinishSamples(msgspec.Struct, tag=True):
    sample_ids: list[str]  # samples the front end found finished (a stop string)


class LoadLora(msgspec.Struct, tag=True):
    """Loads (or atomically replaces) the adapter `name`; answered by one `LoraResult`."""
    name: str
    path: str


class UnloadLora(msgspec.Struct, tag=True):
    """Removes the adapter `name` (running requests keep it until they finish); answered by one `LoraResult`."""
    name: str


class Shutdown(msgspec.Struct, tag=True):
    pass


class ReleaseKV(msgspec.Struct, tag=True):
    request_ids: list[str]  # requests added with keep_kv whose kept K/V no fork needs any more


# ---- engine process -> front end ----
class EngineReady(msgspec.Struct, tag=True):
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    block_size: int
    device: str
    dtype: str
    kernel_backend: str
    pooler: PoolerInfo | None = None  # an embed or score engine's pooling
    quantization: str = "none"  # the scheme the model runs, as QuantScheme.describe() says it
    weight_bytes: int = 0  # what the model's weights hold in memory (this rank's shard), packed as they run
    # Where the start took its time, in order: the engine process's imports, weights, KV cache, CUDA graphs.
    startup_seconds: dict[str, float] = {}


class StepOutputs(msgspec.Struct, tag=True):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None = None  # attached at most a few times a second
    step_seconds: float = 0.0
    loras: list[LoraInfo] | None = None  # with LoRA enabled, attached with the block map (about once a second)


class RequestRejected(msgspec.Struct, tag=True):
    request_id: str
    param: str
    message: str


class EngineFailed(msgspec.Struct, tag=True):
    message: str
    # The ranks on other machines did not come (their node is not up yet): nothing is wrong with the model, and a
    # start later may succeed, so it is retried for as long as it takes, not counted as a crash.
    waiting_for_ranks: bool = False


class LoraResult(msgspec.Struct, tag=True):
    """The answer to a LoadLora or UnloadLora, in the order they were sent; `loras`: the adapters served after it."""
    name: str
    ok: bool
    message: str = ""
    loras: list[LoraInfo] = []


ToEngine = (StartEngine | AddRequest | AbortRequests | FinishSamples | LoadLora | UnloadLora | Shutdown
            | ReleaseKV)
FromEngine = EngineReady | StepOutputs | RequestRejected | EngineFailed | LoraResult


# ---- sleep level 1 (appended: front end -> engine process, answered by one EngineSleepState) ----
class Sleep(msgspec.Struct, tag=True):
    """Level 1: the KV cache freed and the weights moved to host memory; the process stays. The front end fails or
    aborts the engine's requests first."""
    level: int = 1


class Wake(msgspec.Struct, tag=True):
    pass


class EngineSleepState(msgspec.Struct, tag=True):
    """The engine's memory as a sleep or wake left it (also sent once after EngineReady)."""
    asleep: bool
    level: int  # 0 awake, 1 asleep at level 1
    weight_bytes: int  # on the device (on a CPU engine: in host memory, where they stay)
    kv_cache_bytes: int
    host_copy_bytes: int  # the weights' pinned host copy while asleep on a GPU, every parallel rank's together
    seconds: float = 0.0  # what the sleep or wake took
    error: str = ""  # set when the sleep was refused; nothing changed
    device_memory_bytes: int = 0  # what the device allocator holds after it (0 on a CPU)


ToEngine = ToEngine | Sleep | Wake
FromEngine = FromEngine | EngineSleepState
