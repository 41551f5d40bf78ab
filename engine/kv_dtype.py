"""The KV cache's storage type: the `kv_cache_dtype` option -> a torch dtype, and whether the device can run it.

auto stores K/V in the model dtype; fp8 (vLLM's name for fp8_e4m3) and fp8_e5m2 store them in 8 bits, divided by
per-layer scales (`engine.models.attention.Attention.k_scale` / `v_scale`), and the kernels dequantize as they read.
"""

from __future__ import annotations

import torch

from engine.config import EngineConfigError

_FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device,
                         kernel_backend: str) -> torch.dtype:
    """The cache tensors' dtype; an fp8 type the device's kernels cannot convert is refused, naming the option."""
    if kv_cache_dtype == "auto":
        return model_dtype
    dtype = _FP8_DTYPES[kv_cache_dtype]
    # Triton converts to and from e4m3 ("fp8e4nv") only on compute capability 8.9 and newer; e5m2 runs from 8.0.
    if dtype == torch.float8_e4m3fn and device.type == "cuda" and kernel_backend == "triton":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise EngineConfigError("kv_cache_dtype", f"{kv_cache_dtype!r} (e4m3) needs CUDA compute capability 8.9 "
                                    f"or newer (Ada, Hopper) in the Triton kernels; {torch.cuda.get_device_name(device)}"
                                    f" has {capability[0]}.{capability[1]}: use fp8_e5m2 or auto (YAML: "
                                    f"kv_cache.dtype)")
    return dtype
