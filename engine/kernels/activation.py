"""Gated activations for MLPs: [num_tokens, 2 * d] (gate | up) -> [num_tokens, d] = act(gate) * up.

Computed in float32, cast once. GELU's tanh form is written through exp (0.5 * (1 + tanh(y)) = sigmoid(2y)) since the
interpreter has no libdevice. The references are `kernels.reference.silu_and_mul` and `gelu_tanh_and_mul`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    if GELU_TANH:
        # gelu_tanh(g) = g * sigmoid(2 * sqrt(2 / pi) * (g + 0.044715 * g^3))
        inner = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-inner))
    else:
        act = gate / (1.0 + tl.exp(-gate))  # silu
    tl.store(out_ptr + token * d + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"last dimension must be 2 * d (gate | up), got {x.shape[-1]}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {x.dtype}; expected float16, bfloat16 or float32")
    d = x.shape[-1] // 2
    x2 = x if x.dim() == 2 else x.reshape(-1, 2 * d)  # [num_tokens, 2 * d]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
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
