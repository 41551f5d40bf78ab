"""The KV cache's storage type: the `kv_cache_dtype` option -> a torch dtype, and whether the device can run it.

auto stores K/V in the model dtype; fp8 (vLLM's name for fp8_e4m3) and fp8_e5m2 store them in 8 bits, divided by
per-layer scales (`engine.models.attention.Attention.k_scale` / `v_scale`), and the kernels dequantize as they read.
"""

from __future__ import annotations

import torch

from engine.config import EngineConfigError

_FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype."""
    return model_dtype if kv_cache_dtype == "auto" else _FP8_DTYPES[kv_cache_dtype]


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device, kernel_backend: str) -> None:
    """Refuses an fp8 type the device's kernels cannot convert, naming the option. The model runner asks before it
    loads any weight, so that a refusal does not come after minutes of loading."""
    # Triton converts to and from e4m3 ("fp8e4nv") only on compute capability 8.9 and newer; e5m2 runs from 8.0.
    if _FP8_DTYPES.get(kv_cache_dtype) == torch.float8_e4m3fn and device.type == "cuda" and kernel_backend == "triton":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise EngineConfigError("kv_cache_dtype", f"{kv_cache_dtype!r} (e4m3) needs CUDA compute capability 8.9 "
                                    "or newer (Ada, Hopper) in the Triton kernels; "
                                    f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use "
                                    "fp8_e5m2 or auto (YAML: kv_cache.dtype)")
