"""Kernel entry points with one backend switch.

`torch` runs the references in `kernels.reference`, or their CPU fast paths in `kernels.cpu` where one exists (the
CPU path); `triton` runs our Triton kernels (the CUDA path).
`resolve_backend` picks one per engine process: automatic by device unless the engine config or the
`KVBOX_KERNEL_BACKEND` environment variable names one. The engine calls `set_backend` once at start-up; models call
the functions below and never import a backend themselves.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import torch

from engine.kernels import cpu, reference

BACKENDS = ("torch", "triton")
ENV_VAR = "KVBOX_KERNEL_BACKEND"

# Where each op's Triton launcher lives: kernels/<module>.py, function of the same name as the reference.
_TRITON_MODULES = {
    "paged_attention": "engine.kernels.attention",
    "store_kv": "engine.kernels.kv_store",
    "rotary_store_kv": "engine.kernels.kv_store",
    "rms_norm": "engine.kernels.norm",
    "fused_add_rms_norm": "engine.kernels.norm",
    "silu_and_mul": "engine.kernels.activation",
    "gelu_tanh_and_mul": "engine.kernels.activation",
    "add_lora": "engine.kernels.lora",
    "linear": "engine.kernels.gemv",
    "wna16_linear": "engine.kernels.wna16",
    "gguf_linear": "engine.kernels.gguf",
    "w8a8_linear": "engine.kernels.w8a8",
}


# Ops that quantize their own output for a W8A8 linear (engine.quantization.producer_quant). Triton fuses them;
# the torch backend runs its own op and then the reference quantizer, which is what the linear would have done.
_PRODUCER_QUANT = {
    "rms_norm_quant": "engine.kernels.norm",
    "fused_add_rms_norm_quant": "engine.kernels.norm",
    "silu_and_mul_quant": "engine.kernels.activation",
    "gelu_tanh_and_mul_quant": "engine.kernels.activation",
    "w8a8_gemm": "engine.kernels.w8a8",
}


def resolve_backend(requested: str, device: torch.device) -> str:
    """`requested` is "auto", "torch" or "triton"; the environment variable overrides "auto"."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto")
    if requested == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; expected one of auto, {', '.join(BACKENDS)}")
    return requested


def load_backend(name: str) -> SimpleNamespace:
    """A namespace holding every op of one backend."""
    if name == "torch":
        ops = SimpleNamespace(**{op: getattr(cpu, op, getattr(reference, op)) for op in _TRITON_MODULES})
        return _with_quantizing_producers(ops)
    if name == "triton":
        return SimpleNamespace(**{op: getattr(importlib.import_module(mod), op)
                                  for op, mod in (_TRITON_MODULES | _PRODUCER_QUANT).items()})
    raise ValueError(f"unknown kernel backend {name!r}")


def _with_quantizing_producers(ops: SimpleNamespace) -> SimpleNamespace:
    """`ops` plus each `_PRODUCER_QUANT` op as its plain op followed by the reference quantizer."""
    quantize = reference.quantize_activations
    ops.rms_norm_quant = lambda x, weight, eps, offset, dtype: quantize(ops.rms_norm(x, weight, eps, offset), dtype)

    def fused_add_rms_norm_quant(x, residual, weight, eps, offset, dtype):
        normed, summed = ops.fused_add_rms_norm(x, residual, weight, eps, offset)
        return (*quantize(normed, dtype), summed)

    ops.fused_add_rms_norm_quant = fused_add_rms_norm_quant
    ops.silu_and_mul_quant = lambda x, dtype: quantize(ops.silu_and_mul(x), dtype)
    ops.gelu_tanh_and_mul_quant = lambda x, dtype: quantize(ops.gelu_tanh_and_mul(x), dtype)
    ops.w8a8_gemm = reference.w8a8_gemm
    return ops


_active = SimpleNamespace(name="torch", ops=load_backend("torch"))


def set_backend(name: str) -> None:
    _active.name = name
    _active.ops = load_backend(name)


def backend_name() -> str:
    return _active.name


def paged_attention(*args, **kwargs):
    return _active.ops.paged_attention(*args, **kwargs)


def store_kv(*args, **kwargs):
    return _active.ops.store_kv(*args, **kwargs)


def rotary_store_kv(*args, **kwargs):
    return _active.ops.rotary_store_kv(*args, **kwargs)


def rms_norm(*args, **kwargs):
    return _active.ops.rms_norm(*args, **kwargs)


def fused_add_rms_norm(*args, **kwargs):
    return _active.ops.fused_add_rms_norm(*args, **kwargs)


def silu_and_mul(*args, **kwargs):
    return _active.ops.silu_and_mul(*args, **kwargs)


def gelu_tanh_and_mul(*args, **kwargs):
    return _active.ops.gelu_tanh_and_mul(*args, **kwargs)


def add_lora(*args, **kwargs):
    return _active.ops.add_lora(*args, **kwargs)


def linear(*args, **kwargs):
    return _active.ops.linear(*args, **kwargs)


def prepack_linear(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` in the layout the active backend's `linear` runs fastest, or None to keep it as it is (only the
    torch backend's CPU path has one: `kernels.cpu.prepack`)."""
    return cpu.prepack(weight) if _active.name == "torch" else None


def rms_norm_quant(*args, **kwargs):
    return _active.ops.rms_norm_quant(*args, **kwargs)


def fused_add_rms_norm_quant(*args, **kwargs):
    return _active.ops.fused_add_rms_norm_quant(*args, **kwargs)


def silu_and_mul_quant(*args, **kwargs):
    return _active.ops.silu_and_mul_quant(*args, **kwargs)


def gelu_tanh_and_mul_quant(*args, **kwargs):
    return _active.ops.gelu_tanh_and_mul_quant(*args, **kwargs)


def w8a8_gemm(*args, **kwargs):
    return _active.ops.w8a8_gemm(*args, **kwargs)


def wna16_linear(*args, **kwargs):
    return _active.ops.wna16_linear(*args, **kwargs)


def gguf_linear(*args, **kwargs):
    return _active.ops.gguf_linear(*args, **kwargs)


def w8a8_linear(*args, **kwargs):
    return _active.ops.w8a8_linear(*args, **kwargs)
