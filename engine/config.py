"""The engine's own options: one frozen object, validated at construction, and the one home of their defaults.

Offline users pass the same names as keyword arguments to `LLM` (vLLM's names where vLLM has the option). The
appliance's YAML schema takes its defaults and choices from here and maps onto this in one function
(`ModelSpec.to_engine_config`). This module imports no torch, so that `kvbox check-config` stays light; turning
`device` into a torch device is `engine.device.torch_device`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, get_args

import msgspec

from engine.spec_decode.draft_check import draft_mismatch

BlockSize = Literal[8, 16, 32]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]  # auto: the checkpoint's
LoadFormat = Literal["auto", "dummy"]  # dummy: random weights at the real shapes
KernelBackend = Literal["auto", "torch", "triton"]
SchedulingPolicy = Literal["fcfs", "priority"]
Task = Literal["generate", "embed", "score"]  # score: a cross-encoder (*ForSequenceClassification)
PoolingType = Literal["last", "mean", "cls"]
# vLLM's names. fp8 / int8: quantize a float checkpoint at load (fp8 on an fp8 checkpoint: run it as it is); the
# others name a checkpoint's own method (the marlin ones its kernel), which must be the one its config.json declares
# (engine.quantization.spec); None or "none": the checkpoint as it is.
Quantization = Literal["none", "fp8", "int8", "gptq", "gptq_marlin", "awq", "awq_marlin", "compressed-tensors",
                       "auto-round", "gguf"]
# The KV cache's storage type (vLLM's names): auto is the model dtype; fp8 means fp8_e4m3.
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
GGUFDequantize = Literal["auto", "matmul", "load"]
SmoothQuantAlpha = Literal["auto"] | float
# Without a device to profile, the KV cache gets at most this much memory unless told otherwise.
DEFAULT_CPU_KV_BYTES = 2 << 30


class EngineConfigError(ValueError):
    """An option out of range; `field` names the option, so that the YAML loader can name its key instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


SpeculativeMethod = Literal["ngram", "draft_model"]


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config` keys). ngram: prompt lookup, drafts are the tokens that
    followed the latest earlier occurrence of the sequence's last n tokens, n from prompt_lookup_max down to
    prompt_lookup_min (vLLM's rule: one bound unset takes the other's value, both unset are 5). draft_model: a
    smaller model folder (`model`) with the target's tokenizer proposes the drafts; as in vLLM, giving `model`
    without `method` means draft_model."""

    num_speculative_tokens: int
    method: SpeculativeMethod | None = None  # None: draft_model when `model` is given, else ngram
    model: str | None = None
    draft_tensor_parallel_size: int | None = None  # the draft is not sharded (each rank runs it): only 1 or None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "draft_model" if self.model is not None else "ngram")
        if self.method not in get_args(SpeculativeMethod):
            raise EngineConfigError("speculative_config.method", f"expected one of "
                                    f"{', '.join(get_args(SpeculativeMethod))}, got {self.method!r}")
        lookup_min = self.prompt_lookup_min if self.prompt_lookup_min is not None else self.prompt_lookup_max
        lookup_max = self.prompt_lookup_max if self.prompt_lookup_max is not None else self.prompt_lookup_min
        object.__setattr__(self, "prompt_lookup_min", 5 if lookup_min is None else lookup_min)
        object.__setattr__(self, "prompt_lookup_max", 5 if lookup_max is None else lookup_max)
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EngineConfigError(f"speculative_config.{name}", f"must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise EngineConfigError("speculative_config.prompt_lookup_min", f"must be <= prompt_lookup_max "
                                    f"({self.prompt_lookup_max}), got {self.prompt_lookup_min}")
        if self.draft_tensor_parallel_size not in (None, 1):
            raise EngineConfigError("speculative_config.draft_tensor_parallel_size",
                                    f"only 1 is supported (the draft runs unsharded), got "
                                    f"{self.draft_tensor_parallel_size!r}")
        if (self.method == "draft_model") != (self.model is not None):
            raise EngineConfigError("speculative_config.model", "is required by method draft_model"
                                    if self.model is None else f"is for method draft_model, not {self.method}")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise EngineConfigError("speculative_config.model", f"no model folder (with a config.json) at "
                                                                f"{self.model!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SpeculativeConfig:
        """From vLLM's dict (offline `LLM(speculative_config={...})`); unknown keys are refused by name."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise EngineConfigError("speculative_config", f"unknown key(s) {', '.join(unknown)}")
        if "num_speculative_tokens" not in options:
            raise EngineConfigError("speculative_config.num_speculative_tokens", "is required")
        return cls(**options)


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # default: the model folder
    dtype: Dtype = "auto"
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    load_format: LoadFormat = "auto"
    block_size: BlockSize = 16
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine may use in all
    kv_cache_memory_bytes: int | None = None  # an explicit KV budget, instead of profiling
    num_kv_blocks: int | None = None  # an explicit block count (tests, benchmarks)
    # Host memory (per rank) for preempted requests' KV blocks, instead of recomputing them; 0 / None: recompute.
    host_swap_bytes: int | None = None
    kv_cache_dtype: KVCacheDtype = "auto"  # fp8*: blocks stored in 8 bits with per-layer scales
    # fp8 cache: layers without checkpoint scales get amax / fp8 max from a fixed calibration prompt at start-up.
    calculate_kv_scales: bool = False
    # GGUF quantized blocks: kept packed and dequantized inside each matmul (a quarter of the memory at 4 bits), or
    # dequantized once at load; auto: packed on CUDA (a fused Triton kernel), at load on the CPU (torch pays a whole
    # layer's dequantization at every matmul there: the built-in SmolLM2 decodes 3.7x slower packed).
    gguf_dequantize: GGUFDequantize = "auto"
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    # While a step decodes, its prompt chunks take at most this many tokens (None: the whole max_num_batched_tokens),
    # so that a long prefill does not stall the running streams; with many streams it grows to
    # prefill_tokens_per_decode per decoding stream (engine.scheduler_budget says why). Served, the appliance caps
    # at 512 (appliance.config.schema): on an H200 (8B, bench/serve.py --compare-prefill-cap) ITL p99 32 ms against
    # 205 uncapped at 64 streams, same throughput. Offline nobody waits for a next token, and all 200 prompts at
    # once the cap kept 0.92 of the uncapped throughput (bench/throughput.py: 27.0 against 29.2 req/s), so none here,
    # as vLLM's offline defaults favour throughput over latency.
    max_prefill_tokens_while_decoding: int | None = None
    prefill_tokens_per_decode: int = 8
    scheduling_policy: SchedulingPolicy = "fcfs"  # priority: lower value first, then arrival
    kernel_backend: KernelBackend = "auto"
    cuda_graphs: bool = True  # capture decode (and verify) steps per batch-size bucket (CUDA, Triton backend)
    async_scheduling: bool | None = None  # schedule the next step while one runs; default: on CUDA or with stages
    seed: int = 0  # seeds the global RNG that unseeded requests draw from
    enable_lora: bool = False  # serve LoRA adapters (EngineCore.add_lora); off, the forward has no LoRA op
    max_loras: int = 4  # adapters on the device at once, hence distinct adapters per step
    max_lora_rank: int = 16  # the largest adapter rank accepted; the device slots are sized for it
    max_cpu_loras: int = 8  # adapters loaded in host memory, those on the device included
    tensor_parallel_size: int = 1  # ranks each layer is split over, one process (and device) each
    pipeline_parallel_size: int = 1  # stages the layers are split into, each of tensor_parallel_size ranks
    # Layers per pipeline stage, in order (None: as even as can be, the later stages but the last taking the rest).
    pipeline_layer_split: tuple[int, ...] | None = None
    # Offline (`LLM`): replicas of the whole engine in this process, one device each (engine.data_parallel); served,
    # the appliance's `parallelism.data` runs a process per replica instead.
    data_parallel_size: int = 1
    # Machines the ranks are spread over (engine.distributed.nodes); with more than one, every rank rendezvouses at
    # master_addr:master_port (this model replica's own port), node 0 holding rank 0.
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # Seconds a rank waits for the others in a collective (a pipeline stage for the stages before it) before the
    # engine fails as hung; served, the server's engine_hang_timeout_s. Dead or stopped ranks fail it at once.
    collective_timeout_s: float = 120.0
    # Seconds a rank's heartbeat may stay silent before that rank is lost (engine.distributed.heartbeat): a machine
    # gone from the network or frozen whole fails the model in this time rather than the collective timeout; so does
    # a tensor-parallel rank stuck in a step that its group has waited for as long (engine.distributed.progress).
    rank_heartbeat_timeout_s: float = 10.0
    task: Task = "generate"
    # Embedding models: None takes the checkpoint's sentence-transformers files, else the family's convention.
    pooling_type: PoolingType | None = None
    pooling_normalize: bool | None = None
    # Output sizes a Matryoshka model may be truncated to (a request's `dimensions`); None: the checkpoint's
    # config.json `matryoshka_dimensions`, else truncation is refused.
    matryoshka_dimensions: tuple[int, ...] | None = None
    quantization: Quantization | None = None  # a quantized checkpoint's own method is read from its config.json
    # Online quantization (int8 / fp8) folds SmoothQuant scales of this migration strength (0 to 1; auto: 0.5 for
    # int8, off for fp8, as measured) into the float weights first, from a calibration forward at load
    # (engine.quantization.smoothing); None: not. Skipped with LoRA (adapters were trained on the unsmoothed
    # inputs) and across several ranks or stages.
    smoothquant_alpha: SmoothQuantAlpha | None = "auto"
    # Online quantization keeps this fraction of each linear's input channels (0 to 1), the largest over the same
    # calibration forward, in float beside the 8-bit GEMM (engine.quantization.outliers); None or 0: none (the
    # default, as measured). Skipped across several ranks or stages.
    outlier_fraction: float | None = None
    # None: no speculation; a dict of vLLM's keys is turned into a SpeculativeConfig.
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            options = self.speculative_config  # vLLM's dict, or the YAML schema's struct of the same keys
            if not isinstance(options, Mapping):
                options = {k: v for k, v in msgspec.structs.asdict(options).items() if v is not None}
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_options(options))
        if self.speculative_config is not None and self.task != "generate":
            raise EngineConfigError("speculative_config", f"speculative decoding serves generation only, not task "
                                                          f"{self.task!r}")
        if self.speculative_config is not None and self.speculative_config.model is not None:
            self._check_draft_model()
        for name, choices in (("block_size", BlockSize), ("dtype", Dtype), ("load_format", LoadFormat),
                              ("kernel_backend", KernelBackend), ("scheduling_policy", SchedulingPolicy),
                              ("task", Task), ("kv_cache_dtype", KVCacheDtype),
                              ("gguf_dequantize", GGUFDequantize)):
            if getattr(self, name) not in get_args(choices):
                raise EngineConfigError(name, f"expected one of {', '.join(map(str, get_args(choices)))}, "
                                              f"got {getattr(self, name)!r}")
        if self.quantization is not None and self.quantization not in get_args(Quantization):
            raise EngineConfigError("quantization", f"expected null or one of {', '.join(get_args(Quantization))}, "
                                                    f"got {self.quantization!r}")
        alpha = self.smoothquant_alpha
        if alpha is not None and alpha != "auto" and (isinstance(alpha, (str, bool)) or not 0 <= alpha <= 1):
            raise EngineConfigError("smoothquant_alpha", f"must be auto, null or in [0, 1], got {alpha!r}")
        fraction = self.outlier_fraction
        if fraction is not None and (isinstance(fraction, (str, bool)) or not 0 <= fraction <= 1):
            raise EngineConfigError("outlier_fraction", f"must be null or in [0, 1], got {fraction!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise EngineConfigError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_model_len", "kv_cache_memory_bytes", "num_kv_blocks", "max_num_seqs",
                     "max_num_batched_tokens", "max_prefill_tokens_while_decoding", "max_loras", "max_lora_rank",
                     "max_cpu_loras", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                     "nnodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EngineConfigError(name, f"must be >= 1, got {value}")
        if self.prefill_tokens_per_decode < 0:
            raise EngineConfigError("prefill_tokens_per_decode", f"must be >= 0, got {self.prefill_tokens_per_decode}")
        if self.host_swap_bytes is not None and self.host_swap_bytes < 0:
            raise EngineConfigError("host_swap_bytes", f"must be >= 0, got {self.host_swap_bytes}")
        # Without chunking a prompt is computed in one step, so the step budget must hold the longest one. With
        # max_model_len None the model's length is known only once it is loaded; the engine checks it then.
        if (not self.enable_chunked_prefill and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len):
            raise EngineConfigError("max_num_batched_tokens", f"must be >= max_model_len ({self.max_model_len}) "
                                    f"without chunked prefill, got {self.max_num_batched_tokens}")
        self._check_distributed()
        if self.pooling_type is not None and self.pooling_type not in get_args(PoolingType):
            raise EngineConfigError("pooling_type", f"expected one of {', '.join(get_args(PoolingType))}, "
                                                    f"got {self.pooling_type!r}")
        if self.matryoshka_dimensions is not None and (not self.matryoshka_dimensions
                                                       or min(self.matryoshka_dimensions) < 1):
            raise EngineConfigError("matryoshka_dimensions", "must be a non-empty list of sizes >= 1")
        if self.task != "generate" and self.enable_lora:
            raise EngineConfigError("enable_lora", f"LoRA adapters serve generation only, not task {self.task!r}")
        if self.max_cpu_loras < self.max_loras:
            raise EngineConfigError("max_cpu_loras", f"must be >= max_loras ({self.max_loras}), since adapters on the "
                                                     f"device also stay in host memory; got {self.max_cpu_loras}")

    def _check_distributed(self) -> None:
        for name in ("collective_timeout_s", "rank_heartbeat_timeout_s"):
            if not getattr(self, name) > 0:
                raise EngineConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 < self.master_port < 65536:
            raise EngineConfigError("master_port", f"must be a TCP port (1 to 65535), got {self.master_port}")
        self._check_pipeline()
        self._check_data_parallel()

    def _check_pipeline(self) -> None:
        """The split's form; against the layer count it is checked by `pipeline_stage_layers` once the model's
        config is read."""
        size = self.pipeline_parallel_size
        if self.pipeline_layer_split is not None:
            split = tuple(self.pipeline_layer_split)
            object.__setattr__(self, "pipeline_layer_split", split)
            if len(split) != size or min(split) < 1:
                raise EngineConfigError("pipeline_layer_split", f"must give {size} layer count(s) >= 1, one per "
                                                                f"pipeline stage, got {list(split)}")

    def _check_data_parallel(self) -> None:
        if self.data_parallel_size > 1 and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise EngineConfigError("data_parallel_size", f"offline replicas are of one rank each; with "
                                    f"tensor_parallel_size {self.tensor_parallel_size} and pipeline_parallel_size "
                                    f"{self.pipeline_parallel_size}, serve the model with parallelism.data instead")
        if self.data_parallel_size > 1 and self.device.startswith("cuda:"):
            raise EngineConfigError("data_parallel_size", f"{self.data_parallel_size} replicas need as many devices; "
                                    f"device {self.device!r} names one (use device cuda, or CUDA_VISIBLE_DEVICES)")

    def _check_draft_model(self) -> None:
        # With tensor_parallel_size > 1 every rank runs the whole draft (see engine.spec_decode.draft_model); with
        # pipeline stages the first stage's ranks do (engine.spec_decode.stage_drafts).
        problem = draft_mismatch(self.model, self.tokenizer, self.speculative_config.model)
        if problem is not None:
            raise EngineConfigError("speculative_config.model", problem)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)


def pipeline_stage_layers(num_layers: int, pipeline_parallel_size: int,
                          pipeline_layer_split: tuple[int, ...] | None = None) -> list[range]:
    """Each pipeline stage's layers. Without a split, vLLM's rule: an equal share each, the stages before the last
    taking one more while layers remain (the last stage also computes the logits and samples)."""
    size = pipeline_parallel_size
    if pipeline_layer_split is not None:
        if sum(pipeline_layer_split) != num_layers:
            raise EngineConfigError("pipeline_layer_split", f"{list(pipeline_layer_split)} adds up to "
                                    f"{sum(pipeline_layer_split)} layers; the model has {num_layers}")
        counts = list(pipeline_layer_split)
    elif size > num_layers:
        raise EngineConfigError("pipeline_parallel_size", f"{size} stages for a model of {num_layers} layers; every "
                                                          f"stage needs a layer, so at most {num_layers}")
    else:
        counts = [num_layers // size] * size
        for stage in range(size - 1 - num_layers % size, size - 1):
            counts[stage] += 1
    starts = [sum(counts[:i]) for i in range(size)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def engine_default(name: str) -> Any:
    """The default of the option `name`; a KeyError for an option without one, so that a typo fails at import."""
    default = {f.name: f.default for f in fields(EngineConfig)}[name]
    if default is MISSING:
        raise KeyError(f"{name} has no default")
    return default


# The encoder checkpoints engine.models.registry runs (embedding models and cross-encoders), named here so that the
# config check, which imports no model code, knows them too.
ENCODER_ARCHITECTURES = frozenset({
    "BertModel", "RobertaModel", "XLMRobertaModel",
    "BertForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
})


def check_encoder_on_one_rank(architecture: str, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Encoders (BERT-style embedding and reranking models, a few hundred MB) run whole on one rank; decoder
    embedding models shard and split into stages as the generating families do."""
    sizes = {"tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size}
    for key, size in sizes.items():
        if architecture in ENCODER_ARCHITECTURES and size > 1:
            raise EngineConfigError(key, f"must be 1 for an encoder model (BERT-style embedding and reranking models "
                                         f"run on one rank), got {size}")


def check_tensor_parallel_split(size: int, num_heads: int, num_kv_heads: int, intermediate_size: int | None) -> None:
    """Every rank holds an equal share of the heads and of the MLP (the vocabulary may split unevenly); KV heads are
    divided among the ranks, or each replicated over several. Checked by the engine on the model it loads and, before
    anything starts, by the config loader on a local checkpoint's config.json."""
    for what, count in (("attention heads", num_heads), ("MLP features (intermediate_size)", intermediate_size)):
        if count is not None and count % size:
            raise EngineConfigError("tensor_parallel_size", f"{size} does not divide the model's {count} {what}")
    if size % num_kv_heads if size > num_kv_heads else num_kv_heads % size:
        raise EngineConfigError("tensor_parallel_size", f"{size} neither divides nor is a multiple of the model's "
                                                        f"{num_kv_heads} KV heads")
