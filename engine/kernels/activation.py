"""Gated activations for MLPs: [num_tokens, 2 * d] (gate | up) -> [num_tokens, d] = act(gate) * up.

Computed in float32, cast once. GELU's tanh form is written through exp (0.5 * (1 + tanh(y)) = sigmoid(2y)) since the
interpreter has no libdevice. The references are `kernels.reference.silu_and_mul` and `gelu_tanh_and_mul`.

The `_quant` forms feed a W8A8 down projection with dynamic per-token activations: one program takes a whole row
(up to `_MAX_QUANT_WIDTH`, its values in registers), rounds act * up to the input dtype as the plain op writes it,
finds its largest magnitude and writes it quantized with its scale, where the separate quantizer walked the row twice
in one program (7-9 us for Llama-3.1-8B's 14336 at a decode step on an H200, bench/RESULTS.md). Their reference is
the plain op's followed by `kernels.reference.quantize_activations`, as the torch backend composes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.act_quant import quantize_activations, quantize_in_registers, type_max

_MAX_QUANT_WIDTH = 32768  # a row of gate and up in one program's registers (16 warps: 64 float32 values a thread)


@triton.jit
def _act_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * d]
    out_ptr,  # [num_tokens, d] contiguous
    d,
    stride_x,
    BLOCK: tl.constexpr,
    GELU_TANH: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + token * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * d + cols, (_act(gate, GELU_TANH) * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act(gate, GELU_TANH: tl.constexpr):
    if GELU_TANH:
        # gelu_tanh(g) = g * sigmoid(2 * sqrt(2 / pi) * (g + 0.044715 * g^3))
        inner = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)
        return gate / (1.0 + tl.exp(-inner))
    return gate / (1.0 + tl.exp(-gate))  # silu


@triton.jit
def _act_and_mul_quant_kernel(
    x_ptr,  # [num_tokens, 2 * d]
    q_ptr,  # [num_tokens, d] contiguous, float8 e4m3 or int8
    scale_ptr,  # [num_tokens] float32
    d,
    stride_x,
    BLOCK: tl.constexpr,  # >= d: the whole row
    GELU_TANH: tl.constexpr,
    INT: tl.constexpr,
    TOP: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + token * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + token * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = (_act(gate.to(tl.float32), GELU_TANH) * up).to(gate.dtype).to(tl.float32)  # the plain op's rounding
    scale = tl.maximum(tl.max(tl.abs(out), 0) / TOP, 1e-12)  # masked columns hold 0
    tl.store(scale_ptr + token, scale)
    tl.store(q_ptr + token * d + cols, quantize_in_registers(out, scale, q_ptr, INT, TOP), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] as rows [num_tokens, 2 * d] with a unit column stride."""
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"last dimension must be 2 * d (gate | up), got {x.shape[-1]}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {x.dtype}; expected float16, bfloat16 or float32")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    x2 = _rows(x)
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0 or d == 0:
        return out
    block = min(2048, triton.next_power_of_2(d))
    _act_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
        x2, out, d, x2.stride(0), BLOCK=block, GELU_TANH=gelu_tanh, num_warps=max(1, min(8, block // 256)),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
    return _launch(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
    return _launch(x, gelu_tanh=True)


def _launch_quant(x: torch.Tensor, gelu_tanh: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    n, d = x2.shape[0], x2.shape[1] // 2
    if d > _MAX_QUANT_WIDTH:  # wider than a program's registers: the plain op, then the quantizer
        return quantize_activations(_launch(x2, gelu_tanh), dtype)
    q = torch.empty(n, d, dtype=dtype, device=x.device)
    scale = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    if n and d:
        block = triton.next_power_of_2(d)
        _act_and_mul_quant_kernel[(n,)](x2, q, scale, d, x2.stride(0), BLOCK=block, GELU_TANH=gelu_tanh,
                                        INT=dtype == torch.int8, TOP=type_max(dtype),
                                        num_warps=max(1, min(16, block // 1024)))
    return q, scale


def silu_and_mul_quant(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_tokens, 2 * d] -> (q [num_tokens, d] in `dtype`, float32 scale [num_tokens, 1])."""
    return _launch_quant(x, False, dtype)


def gelu_tanh_and_mul_quant(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_quant(x, True, dtype)
