"""The YAML configuration's schema: one tree of frozen msgspec Structs that validates, defaults and documents every key.

Each field's `msgspec.Meta` carries its description and range, so the schema documents and checks itself;
`config.example.yaml` shows every key (a test holds it to that). A struct is named after what it describes: `*Spec`
for a section of the file, `AppConfig` for the whole file.

The engine's options keep their defaults and choices in `engine.config`; the fields that map onto them take both
from there, and `ENGINE_KEYS` is the one mapping between the two (`ModelSpec.to_engine_config`). What other settings
do at run time belongs to their consumers: the HTTP layer (server, ui, metrics) and the supervisor (sources, GPUs).
"""

from __future__ import annotations

import os
from functools import cache, reduce
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field
from msgspec import inspect as mi

from appliance.config.introspect import redact
from engine.config import (BlockSize, Dtype, EngineConfig, GGUFDequantize, KernelBackend, KVCacheDtype, LoadFormat,
                           PoolingType, Quantization, SchedulingPolicy, SpeculativeMethod, Task, engine_default)

MODEL_NAME_PATTERN = r"^[A-Za-z0-9._:/-]{1,128}$"
_URL_PATH = r"^/"


def _doc(description: str, **constraints: Any) -> Meta:
    return Meta(description=description, **constraints)


PositiveInt = Annotated[int, Meta(ge=1)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
# The marker lets `AppConfig.redacted` and error messages find secrets from the schema alone.
Secret = Annotated[str, Meta(min_length=1, extra={"secret": True})]


class _Schema(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Subclasses pass kw_only=True themselves: msgspec does not inherit it."""


class CorsSpec(_Schema, kw_only=True):
    allow_origins: Annotated[tuple[Annotated[str, Meta(pattern=r"^(\*|https?://[^/\s]+)$")], ...], _doc(
        "Origins allowed to call the API from a browser ('*' or 'https://host[:port]'). Empty: CORS is off.")] = ()


class ServerSpec(_Schema, kw_only=True):
    host: Annotated[str, _doc("Address to listen on. 127.0.0.1 serves this machine only; use 0.0.0.0 in a "
                              "container or to serve the network.", min_length=1)] = "127.0.0.1"
    port: Annotated[int, _doc("TCP port to listen on (0: any free port).", ge=0, le=65535)] = 8000
    api_keys: Annotated[tuple[Secret, ...], _doc(
        "Keys accepted as 'Authorization: Bearer KEY' on the API. Empty: no authentication.")] = ()
    admin_keys: Annotated[tuple[Secret, ...], _doc(
        "Keys for the admin routes (adapters, reload); an admin key also works wherever an API key does. Empty: "
        "the admin routes are open when api_keys is empty too (no authentication at all), else they refuse "
        "every request.")] = ()
    public_paths: Annotated[tuple[Annotated[str, Meta(pattern=_URL_PATH)], ...], _doc(
        "Routes reachable without a key.")] = ("/health", "/ready")
    max_body_bytes: Annotated[int, _doc("Largest request body accepted, in bytes (larger: 413).", ge=1)] = 1 << 20
    max_n: Annotated[int, _doc("Largest `n` (completions per request).", ge=1)] = 16
    max_tokens: Annotated[int, _doc("Largest `max_tokens` a request may ask for.", ge=1)] = 16384
    max_logprobs: Annotated[int, _doc("Largest `logprobs` / `top_logprobs` (OpenAI's cap is 20).", ge=0, le=20)] = 20
    max_stop_strings: Annotated[int, _doc("Most stop strings per request.", ge=0)] = 16
    max_stop_string_length: Annotated[int, _doc("Longest stop string, in characters.", ge=1)] = 256
    max_prompt_chars: Annotated[int, _doc(
        "Longest prompt (all chat messages together), in characters, checked before tokenizing.", ge=1)] = 262144
    ignore_unknown_fields: Annotated[bool, _doc(
        "Accept API requests with fields kvbox does not know, logging a warning and ignoring them (false: such a "
        "request gets 400 naming the field). Fields kvbox knows but cannot honour are refused either way.")] = False
    cors: Annotated[CorsSpec, _doc("Cross-origin requests from browsers.")] = field(default_factory=CorsSpec)
    drain_timeout_s: Annotated[float, _doc(
        "On shutdown or reload, seconds to let running requests finish before aborting them.", ge=0)] = 30.0
    max_grammar_compile_s: Annotated[float, _doc(
        "Longest a structured-output request's schema, regex or grammar may take to compile; a slower one gets a "
        "400 before it reaches an engine.", gt=0)] = 10.0
    responses_store_max: Annotated[int, _doc(
        "Responses API: how many responses (with their conversations) are kept in memory for previous_response_id "
        "and GET /v1/responses/{id}, least recently used dropped first; 0 keeps none.", ge=0)] = 1024
    engine_hang_timeout_s: Annotated[float, _doc(
        "Seconds an engine may stay silent (a running engine reports several times a second) before it is "
        "considered hung, killed and restarted; also how long a tensor- or pipeline-parallel rank waits for the "
        "others in a collective (a stage for the stages before it). Raise it for a model whose single step takes "
        "longer (a large model's long prefill on the CPU); a dead or stopped rank fails its model within seconds "
        "either way.", ge=1)] = 120.0
    rank_heartbeat_timeout_s: Annotated[float, _doc(
        "Seconds a tensor- or pipeline-parallel rank (a process here or on another node) may miss its heartbeat, "
        "sent twice a second beside its work, before it counts as lost: its model's requests fail, its ranks "
        "restart, and on several nodes the model answers 503 until the node's ranks rejoin. It finds what closes "
        "no connection, a node that lost power or its network or is frozen whole, within this time rather than "
        "engine_hang_timeout_s. With tensor parallelism a rank busy in one step while another of its group has "
        "waited for it this long is lost too, as stuck (a deadlocked main thread beside a running heartbeat).",
        ge=1)] = 10.0
    max_active_models: Annotated[PositiveInt | None, _doc(
        "Most models awake at once (one asleep at level 1 keeps its engine process but frees its device memory); "
        "waking another first puts the least recently used idle one to sleep (null: no limit).")] = None
    wake_timeout_s: Annotated[float, _doc(
        "Seconds a request waits for its sleeping model to wake before it gets 503 with Retry-After.", gt=0)] = 300.0
    request_read_timeout_s: Annotated[float, _doc(
        "Seconds a client has to send a whole request (head and body) once it connects or starts one; a slower "
        "connection is closed (slowloris). Responses, long streams included, are not limited by it.", gt=0)] = 30.0
    write_stall_timeout_s: Annotated[float, _doc(
        "Seconds a client may leave its response unread (the server's send buffer full) before the connection is "
        "dropped and its request aborted.", gt=0)] = 60.0
    keep_alive_timeout_s: Annotated[float, _doc(
        "Seconds an idle keep-alive connection stays open between requests.", gt=0)] = 5.0


class KVCacheSpec(_Schema, kw_only=True):
    block_size: Annotated[BlockSize, _doc("Tokens per KV cache block.")] = engine_default("block_size")
    memory_fraction: Annotated[float, _doc(
        "Share of the GPU's memory the engine may use in all (weights, activations, KV cache).",
        gt=0, le=1)] = engine_default("gpu_memory_utilization")
    memory_bytes: Annotated[PositiveInt | None, _doc(
        "An explicit KV cache budget in bytes, instead of profiling (null: profile).",
    )] = engine_default("kv_cache_memory_bytes")
    num_blocks: Annotated[PositiveInt | None, _doc(
        "An explicit number of KV blocks (null: from the budget).")] = engine_default("num_kv_blocks")
    host_swap_bytes: Annotated[Annotated[int, Meta(ge=0)] | None, _doc(
        "Host memory in bytes (pinned on a GPU; per rank under tensor parallelism, shared by the pipeline stages in "
        "proportion to their layers) that a preempted request's KV "
        "blocks move to and back from, instead of being recomputed (null or 0: recompute). A request whose blocks "
        "are shared (prefix cache, n > 1 samples, beams) or do not fit what is left recomputes.",
    )] = engine_default("host_swap_bytes")
    prefix_caching: Annotated[bool, _doc(
        "Reuse the KV blocks of prompts' shared prefixes.")] = engine_default("enable_prefix_caching")
    dtype: Annotated[KVCacheDtype, _doc(
        "How KV blocks are stored: auto (the model dtype) or 8-bit floats, fp8 (= fp8_e4m3) or fp8_e5m2, which hold "
        "twice the blocks in the same memory. Values are stored divided by a per-layer scale, the checkpoint's "
        "k_scale / v_scale where it has them, else 1.0. On CUDA, fp8_e4m3 needs compute capability 8.9 (Ada, "
        "Hopper); fp8_e5m2 runs on older cards.")] = engine_default("kv_cache_dtype")
    calculate_scales: Annotated[bool, _doc(
        "With an fp8 dtype: layers whose checkpoint has no k_scale / v_scale get calibrated ones instead of 1.0, "
        "their largest |K| and |V| over a fixed built-in text (one prompt forward at start-up) divided by the "
        "type's largest value; the same on every start. Ignored with dtype auto.")] = engine_default(
        "calculate_kv_scales")


# Where serving's defaults differ from the offline engine's, on purpose (as vLLM's server and LLM class differ):
# served streams wait for each step, so prompt chunks beside them are capped; offline, throughput comes first.
SERVED_PREFILL_CAP = 512
SERVED_DEFAULTS = {"max_prefill_tokens_while_decoding": SERVED_PREFILL_CAP}


class SchedulerSpec(_Schema, kw_only=True):
    max_num_seqs: Annotated[int, _doc("Most requests running at once.", ge=1)] = engine_default("max_num_seqs")
    max_num_batched_tokens: Annotated[int, _doc(
        "Most tokens computed in one step; without chunked_prefill at least max_model_len.",
        ge=1)] = engine_default("max_num_batched_tokens")
    chunked_prefill: Annotated[bool, _doc(
        "Split long prompts over several steps, between decodes.")] = engine_default("enable_chunked_prefill")
    max_prefill_tokens_while_decoding: Annotated[Annotated[int, Meta(ge=1)] | None, _doc(
        "With chunked_prefill, most prompt tokens in a step that also decodes: a smaller cap keeps the running "
        "streams' inter-token latency low while new prompts arrive, a larger one prefills them in fewer steps "
        "(null: up to max_num_batched_tokens, the offline LLM's default). A step without decodes always takes the "
        "whole budget.",
    )] = SERVED_DEFAULTS["max_prefill_tokens_while_decoding"]
    prefill_tokens_per_decode: Annotated[int, _doc(
        "With many streams decoding, the prefill cap grows to this many prompt tokens per decoding stream, so that "
        "each step's prompt share stays in proportion to its decode work: a burst of prompts beside hundreds of "
        "streams is not admitted a few hundred tokens at a time (0: the cap stays flat).",
        ge=0)] = engine_default("prefill_tokens_per_decode")
    policy: Annotated[SchedulingPolicy, _doc(
        "Order of admission: first come first served, or by each request's priority (lower first).",
    )] = engine_default("scheduling_policy")


class ParallelismSpec(_Schema, kw_only=True):
    tensor: Annotated[int, _doc("Tensor-parallel GPUs (each layer split across them).", ge=1)] = 1
    pipeline: Annotated[int, _doc(
        "Pipeline stages (layers split into consecutive groups, each on tensor GPUs of its own; at most the model's "
        "layer count).", ge=1)] = engine_default("pipeline_parallel_size")
    pipeline_layer_split: Annotated[tuple[PositiveInt, ...] | None, _doc(
        "Layers of each pipeline stage, in order, adding up to the model's layer count (null: as even as can be, "
        "the stages before the last taking the extra layers).")] = engine_default("pipeline_layer_split")
    data: Annotated[int, _doc("Replicas of the whole model, each serving its share of requests.", ge=1)] = 1
    routing: Annotated[Literal["prefix", "load"], _doc(
        "How a request picks its replica when data > 1: prefix (the replica that already holds the longest cached "
        "prefix of its prompt, unless it is a quarter of max_num_seqs busier than the least loaded one; SGLang's "
        "cache-aware routing) or load (the least loaded, as vLLM routes).")] = "prefix"
    expert: Annotated[int, _doc("Expert-parallel size for mixture-of-experts models.", ge=1)] = 1

    @property
    def num_gpus(self) -> int:
        # Expert parallelism shards experts over the GPUs the other dimensions already use; it adds none.
        return self.tensor * self.pipeline * self.data


class LoraAdapterSpec(_Schema, kw_only=True):
    name: Annotated[str, _doc("What clients send as `model` to use this adapter.", pattern=MODEL_NAME_PATTERN)]
    path: Annotated[str, _doc("The adapter's folder; must lie inside one of allowed_dirs.", min_length=1)]


class LoraSpec(_Schema, kw_only=True):
    enabled: Annotated[bool, _doc("Serve LoRA adapters on this model.")] = engine_default("enable_lora")
    max_loras: Annotated[int, _doc(
        "Most adapters used in one batch (held on the GPU).", ge=1)] = engine_default("max_loras")
    max_lora_rank: Annotated[int, _doc("Largest adapter rank accepted.", ge=1)] = engine_default("max_lora_rank")
    max_cpu_loras: Annotated[int, _doc(
        "Most adapters kept loaded in CPU memory, those on the GPU included; at least max_loras.",
        ge=1)] = engine_default("max_cpu_loras")
    allowed_dirs: Annotated[tuple[NonEmptyStr, ...], _doc(
        "Folders adapters may be loaded from, here or at run time; symlinks are resolved before the check.")] = ()
    adapters: Annotated[tuple[LoraAdapterSpec, ...], _doc("Adapters loaded at start.")] = ()

    def is_allowed_path(self, path: str) -> bool:
        """Whether `path`, with symlinks resolved, lies inside one of `allowed_dirs`."""
        real = os.path.realpath(path)
        for allowed in self.allowed_dirs:
            allowed_real = os.path.realpath(allowed)
            if os.path.commonpath([real, allowed_real]) == allowed_real:
                return True
        return False


class SamplingDefaults(_Schema, kw_only=True):
    temperature: Annotated[Annotated[float, Meta(ge=0)] | None, _doc(
        "Default temperature (null: the model's generation_config, else 1.0).")] = None
    top_p: Annotated[Annotated[float, Meta(gt=0, le=1)] | None, _doc("Default nucleus sampling mass.")] = None
    top_k: Annotated[Annotated[int, Meta(ge=-1)] | None, _doc("Default top-k (0 or -1: off).")] = None
    min_p: Annotated[Annotated[float, Meta(ge=0, le=1)] | None, _doc("Default min-p.")] = None
    max_tokens: Annotated[PositiveInt | None, _doc("Default max_tokens when a request sets none.")] = None
    presence_penalty: Annotated[Penalty | None, _doc("Default presence penalty.")] = None
    frequency_penalty: Annotated[Penalty | None, _doc("Default frequency penalty.")] = None
    repetition_penalty: Annotated[Annotated[float, Meta(gt=0)] | None, _doc(
        "Default repetition penalty (1: off).")] = None


class PoolingSpec(_Schema, kw_only=True):
    type: Annotated[PoolingType | None, _doc(
        "How an embed model pools its token states: last token, mean or CLS (null: the checkpoint's "
        "sentence-transformers files, else last for decoders and cls for encoders).")] = engine_default("pooling_type")
    normalize: Annotated[bool | None, _doc(
        "L2-normalize embeddings (null: the checkpoint's sentence-transformers files, else true).",
    )] = engine_default("pooling_normalize")


class SpeculativeSpec(_Schema, kw_only=True):
    method: Annotated[SpeculativeMethod | None, _doc(
        "ngram: prompt lookup (drafts copied from earlier in the sequence; no draft model). draft_model: a smaller "
        "model with the same tokenizer drafts (null: draft_model when `model` is set, else ngram).")] = None
    num_speculative_tokens: Annotated[PositiveInt, _doc("Draft tokens verified per step (k).")]
    model: Annotated[str | None, _doc(
        "The draft model's folder (method draft_model): same vocabulary and tokenizer as the served model.")] = None
    draft_tensor_parallel_size: Annotated[PositiveInt | None, _doc(
        "Ranks the draft is split over; only 1 (the draft runs unsharded beside an unsharded target).")] = None
    prompt_lookup_min: Annotated[PositiveInt | None, _doc(
        "Shortest suffix n-gram looked up (null: prompt_lookup_max, or 5 when both are null).")] = None
    prompt_lookup_max: Annotated[PositiveInt | None, _doc(
        "Longest suffix n-gram looked up (null: prompt_lookup_min, or 5 when both are null).")] = None


# EngineConfig option -> its key path within a model. The one mapping between the YAML and the engine: it builds
# the engine's options (`ModelSpec.to_engine_config`) and names the key of an option the engine refuses.
ENGINE_KEYS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("tokenizer",),
    "dtype": ("dtype",),
    "device": ("device",),
    "max_model_len": ("max_model_len",),
    "load_format": ("load_format",),
    "block_size": ("kv_cache", "block_size"),
    "gpu_memory_utilization": ("kv_cache", "memory_fraction"),
    "kv_cache_memory_bytes": ("kv_cache", "memory_bytes"),
    "num_kv_blocks": ("kv_cache", "num_blocks"),
    "host_swap_bytes": ("kv_cache", "host_swap_bytes"),
    "enable_prefix_caching": ("kv_cache", "prefix_caching"),
    "kv_cache_dtype": ("kv_cache", "dtype"),
    "calculate_kv_scales": ("kv_cache", "calculate_scales"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "enable_chunked_prefill": ("scheduler", "chunked_prefill"),
    "max_prefill_tokens_while_decoding": ("scheduler", "max_prefill_tokens_while_decoding"),
    "prefill_tokens_per_decode": ("scheduler", "prefill_tokens_per_decode"),
    "scheduling_policy": ("scheduler", "policy"),
    "kernel_backend": ("kernel_backend",),
    "cuda_graphs": ("cuda_graphs",),
    "async_scheduling": ("async_scheduling",),
    "seed": ("seed",),
    "enable_lora": ("lora", "enabled"),
    "max_loras": ("lora", "max_loras"),
    "max_lora_rank": ("lora", "max_lora_rank"),
    "max_cpu_loras": ("lora", "max_cpu_loras"),
    "tensor_parallel_size": ("parallelism", "tensor"),
    "pipeline_parallel_size": ("parallelism", "pipeline"),
    "pipeline_layer_split": ("parallelism", "pipeline_layer_split"),
    "task": ("task",),
    "pooling_type": ("pooling", "type"),
    "pooling_normalize": ("pooling", "normalize"),
    "matryoshka_dimensions": ("matryoshka_dimensions",),
    "quantization": ("quantization",),
    "smoothquant_alpha": ("smoothquant_alpha",),
    "outlier_fraction": ("outlier_fraction",),
    "gguf_dequantize": ("gguf_dequantize",),
    "speculative_config": ("speculative",),
}


class ModelSpec(_Schema, kw_only=True):
    name: Annotated[str, _doc("What clients send as `model`.", pattern=MODEL_NAME_PATTERN)]
    source: Annotated[str, _doc(
        "The weights: a local folder (Hugging Face layout), a .gguf file, a Hugging Face repo id (org/name) or "
        "builtin:NAME. Relative paths are relative to the config file's folder.", min_length=1)]
    tokenizer: Annotated[NonEmptyStr | None, _doc(
        "A tokenizer folder or Hugging Face repo id (null: the model's own).")] = engine_default("tokenizer")
    dtype: Annotated[Dtype, _doc("Weight and activation type (auto: the checkpoint's).")] = engine_default("dtype")
    device: Annotated[str, _doc("auto (cuda if available), cpu, cuda or cuda:N.",
                                pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$")] = engine_default("device")
    gpu_ids: Annotated[tuple[Annotated[int, Meta(ge=0)], ...] | None, _doc(
        "GPUs this model may use (null: the engine picks); as many as parallelism needs.")] = None
    max_model_len: Annotated[PositiveInt | None, _doc(
        "Longest sequence, prompt plus output (null: the model's maximum).")] = engine_default("max_model_len")
    task: Annotated[Task, _doc(
        "generate (completions, chat), embed (/v1/embeddings: decoder embedders, BERT, RoBERTa) or score (a "
        "cross-encoder for /v1/score and /v1/rerank).")] = engine_default("task")
    pooling: Annotated[PoolingSpec, _doc("An embed model's pooling.")] = field(default_factory=PoolingSpec)
    matryoshka_dimensions: Annotated[Annotated[tuple[PositiveInt, ...], Meta(min_length=1)] | None, _doc(
        "Sizes an embed model's embeddings may be truncated to with `dimensions` (null: the checkpoint's "
        "config.json matryoshka_dimensions, else `dimensions` is refused).")] = engine_default("matryoshka_dimensions")
    load_format: Annotated[LoadFormat, _doc(
        "auto: load the weights; dummy: random weights at the real shapes (tests, benchmarks).",
    )] = engine_default("load_format")
    kv_cache: Annotated[KVCacheSpec, _doc("The paged KV cache.")] = field(default_factory=KVCacheSpec)
    scheduler: Annotated[SchedulerSpec, _doc("Continuous batching.")] = field(default_factory=SchedulerSpec)
    queue_cap: Annotated[int, _doc(
        "Most requests waiting for this model; beyond it requests get 429.", ge=1)] = 256
    parallelism: Annotated[ParallelismSpec, _doc(
        "How the model is spread over GPUs.")] = field(default_factory=ParallelismSpec)
    quantization: Annotated[Quantization | None, _doc(
        "Quantize a float checkpoint at load: fp8 (e4m3 weights per output channel, dynamic per-token activations) "
        "or int8 (W8A8, the same weight scales; asymmetric per-token activations, a zero point each); either leaves "
        "the last decoder layer's down projection in the model's dtype, whose error reaches the logits with no later "
        "layer to dilute it (fp8 on SmolLM2-135M: +2.39% -> +1.65% perplexity over float). null or none: "
        "run the checkpoint as it is, quantized (GPTQ, AWQ, compressed-tensors, fp8, auto-round, gguf: read from its "
        "config.json) or not. Naming a quantized checkpoint's own method, as vLLM takes it (gptq, gptq_marlin, awq, "
        "awq_marlin, compressed-tensors, fp8, auto-round, gguf), runs it the same way, and is refused when the "
        "checkpoint declares another.")] = engine_default("quantization")
    smoothquant_alpha: Annotated[Literal["auto"] | Annotated[float, Meta(ge=0, le=1)] | None, _doc(
        "With quantization int8 or fp8: SmoothQuant's migration strength, 0 to 1 (auto: 0.5 for int8, off for "
        "fp8). Before quantizing, one forward over a built-in text measures the down projection's input channels, "
        "and scales that move their outliers into its weights are folded into the float model (exact in float). "
        "null: off. Not applied with LoRA or tensor / pipeline parallelism, nor to pre-quantized checkpoints.")] = \
        engine_default("smoothquant_alpha")
    outlier_fraction: Annotated[Annotated[float, Meta(ge=0, le=1)] | None, _doc(
        "With quantization int8 or fp8: the fraction of each linear's input channels kept in float beside the "
        "8-bit GEMM (LLM.int8()'s decomposition), those with the largest |activation| over a forward of a built-in "
        "text at load. An 8-bit activation's error is largest on its largest values; 0.01 took fp8 on SmolLM2-135M "
        "from +1.65% to +0.81% perplexity over float on the GPL-3 text and cost 22% of an "
        "8B model's batch-1 decode speed. null or 0: none. Not applied with tensor / pipeline parallelism, nor to "
        "pre-quantized checkpoints.")] = engine_default("outlier_fraction")
    gguf_dequantize: Annotated[GGUFDequantize, _doc(
        "A GGUF file's quantized blocks: matmul keeps them packed in memory and dequantizes inside each matmul "
        "(fused in a Triton kernel on CUDA; on the CPU in C: a float32 stream decodes faster than dequantized, "
        "batches and bf16 at about half to three quarters of its speed); load dequantizes them once at load (the "
        "float model's memory and speed); auto: matmul, except on a CPU without the C kernels (no C compiler, as "
        "in the container image), where the torch fallback is far slower: load.")] = engine_default("gguf_dequantize")
    lora: Annotated[LoraSpec, _doc("LoRA adapters.")] = field(default_factory=LoraSpec)
    speculative: Annotated[SpeculativeSpec | None, _doc(
        "Speculative decoding, vLLM's speculative_config keys (null: off). Greedy outputs are unchanged and sampled "
        "ones keep their distribution (rejection sampling); structured-output requests are refused.",
    )] = engine_default("speculative_config")
    chat_template: Annotated[NonEmptyStr | None, _doc(
        "A chat template: a path ending in .jinja, or the Jinja template itself (null: the model's own).")] = None
    tool_parser: Annotated[Literal["hermes", "llama3_json", "mistral", "qwen3_coder", "auto"] | None, _doc(
        "How tool calls are read from this model's text for tool_choice auto: hermes (Hermes, Qwen: <tool_call> "
        "JSON), llama3_json (Llama 3.x JSON), mistral ([TOOL_CALLS]), qwen3_coder (Qwen3-Coder: <tool_call> "
        "<function=name><parameter=x>), auto (chosen from the chat template); null: "
        "tool_choice auto is refused (required and named choices work on any model).")] = None
    reasoning_parser: Annotated[Literal["deepseek_r1", "qwen3"] | None, _doc(
        "Moves the model's <think>...</think> text to message.reasoning_content (null: it stays in content).",
    )] = None
    kernel_backend: Annotated[KernelBackend, _doc(
        "Kernels: auto (Triton on CUDA, torch elsewhere), torch or triton.")] = engine_default("kernel_backend")
    cuda_graphs: Annotated[bool, _doc(
        "Replay decode steps, speculative verification steps and a draft model's steps as CUDA graphs captured at "
        "start-up (CUDA with Triton kernels only).",
    )] = engine_default("cuda_graphs")
    async_scheduling: Annotated[bool | None, _doc(
        "Schedule the next step while the current one runs on the device, or with pipeline stages, keep a batch "
        "in flight per stage (null: on with CUDA or pipeline stages, off on one CPU).",
    )] = engine_default("async_scheduling")
    default_sampling: Annotated[SamplingDefaults | None, _doc(
        "Sampling defaults for requests that leave a parameter unset (null: none); a key left null comes from the "
        "checkpoint's generation_config.json, if it sets one.")] = None
    seed: Annotated[int, _doc("Seeds the random draws of requests that give no seed.", ge=0)] = engine_default("seed")
    load: Annotated[Literal["eager", "on_demand"], _doc(
        "eager: start the engines with the server; on_demand: at the first request for the model.")] = "eager"
    idle_sleep_s: Annotated[Annotated[float, Meta(gt=0)] | None, _doc(
        "Put the model to sleep (at sleep_level) after this many seconds without a request; the next request wakes "
        "it (null: never).")] = None
    sleep_level: Annotated[Literal[1, 2], _doc(
        "How the model sleeps when idle or to make room: 1 frees the KV cache and moves the weights to host memory "
        "(the engines stay, a wake is a copy back); 2 stops the engines (a wake loads the weights again).")] = 2

    def to_engine_config(self, model_path: str) -> EngineConfig:
        """The engine's options for this model; `model_path` is `source` resolved to a local path. Raises
        `engine.config.EngineConfigError` for options the engine refuses (`load_config` has checked them)."""
        return EngineConfig(model=model_path, **{option: reduce(getattr, path, self)
                                                  for option, path in ENGINE_KEYS.items()})


class UiSpec(_Schema, kw_only=True):
    enabled: Annotated[bool, _doc("Serve the dashboard.")] = True
    path: Annotated[str, _doc("URL path of the dashboard.", pattern=_URL_PATH)] = "/ui"
    show_prompts: Annotated[bool, _doc("Show each request's prompt (its first 300 characters) in the dashboard's "
                                       "request table. Off by default: prompts may hold users' data.")] = False


class MetricsSpec(_Schema, kw_only=True):
    enabled: Annotated[bool, _doc("Serve Prometheus metrics.")] = True
    path: Annotated[str, _doc("URL path of the metrics.", pattern=_URL_PATH)] = "/metrics"


class AppConfig(_Schema, kw_only=True):
    server: Annotated[ServerSpec, _doc("The HTTP server.")] = field(default_factory=ServerSpec)
    models: Annotated[tuple[ModelSpec, ...], _doc("The models served, one engine each.", min_length=1)]
    ui: Annotated[UiSpec, _doc("The web dashboard.")] = field(default_factory=UiSpec)
    metrics: Annotated[MetricsSpec, _doc("The metrics endpoint.")] = field(default_factory=MetricsSpec)

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with every secret replaced by '***', safe for logs and the dashboard."""
        return redact(msgspec.to_builtins(self), schema_type())


@cache
def schema_type() -> mi.Type:
    """The schema as msgspec describes it, for walking (error messages, redaction)."""
    return mi.type_info(AppConfig)
