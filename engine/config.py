"""The engine's own options: one frozen object, validated at construction.

The appliance's YAML schema maps onto this; offline users pass the same names as keyword arguments to `LLM`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

BLOCK_SIZES = (8, 16, 32)
# Without a device to profile, the KV cache gets at most this much memory unless told otherwise.
DEFAULT_CPU_KV_BYTES = 2 << 30


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # default: the model folder
    dtype: str = "auto"  # auto (the checkpoint's), float32, float16, bfloat16
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    load_format: str = "auto"  # auto (safetensors) or dummy (random weights at the real shapes)
    block_size: int = 16
    kv_cache_memory_fraction: float = 0.9  # share of the GPU's memory the engine may use in all
    kv_cache_memory_bytes: int | None = None  # an explicit KV budget, instead of profiling
    num_kv_blocks: int | None = None  # an explicit block count (tests, benchmarks)
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    kernel_backend: str = "auto"  # auto, torch, triton
    cuda_graphs: bool = True  # capture decode steps per batch-size bucket (CUDA with the Triton backend only)
    async_scheduling: bool | None = None  # schedule the next step while one runs; default: on CUDA only
    seed: int = 0  # seeds the global RNG that unseeded requests draw from
    enable_lora: bool = False  # serve LoRA adapters (EngineCore.add_lora); off, the forward has no LoRA op
    max_loras: int = 4  # adapters on the device at once, hence distinct adapters per step
    max_lora_rank: int = 16  # the largest adapter rank accepted; the device slots are sized for it
    max_cpu_loras: int = 8  # adapters loaded in host memory, those on the device included

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size: expected one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: expected auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: expected auto or dummy, got {self.load_format!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction: must be in (0, 1], got {self.kv_cache_memory_fraction}")
        for name in ("max_model_len", "kv_cache_memory_bytes", "num_kv_blocks", "max_loras", "max_lora_rank",
                     "max_cpu_loras"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras: must be >= max_loras ({self.max_loras}), since adapters on the device "
                             f"also stay in host memory; got {self.max_cpu_loras}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
