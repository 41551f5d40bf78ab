"""8-bit linears on CUDA: FP8 W8A8 by `torch._scaled_mm` (Hopper / Ada) and INT8 W8A8 by `torch._int_mm` through
cuBLAS(Lt), both with per-token (or static per-tensor) activation scales times per-output-channel weight scales
applied after the integer / fp8 GEMM; asymmetric int8 activations (a zero point per token, or a static one) take the
zero point's share off the int32 accumulator first (q @ W.T - z * colsum(W), vLLM's azp_adj). Same signature and
quantization as `kernels.reference.w8a8_linear`, which emulates it in float32.

The activations are quantized by one Triton launch (`kernels.act_quant`): in torch ops it took as long as the GEMM.

What cuBLAS does not take goes the dequantizing way, on any GPU: weight-only 8-bit (`quantize_input=False`) and
block-scaled weights (fp8 checkpoints with `weight_block_size`) get the weight dequantized to x's dtype for the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels.act_quant import quantize_activations, quantize_activations_asym
from engine.kernels.reference import dequantize_w8

_INT_MM_MIN_ROWS = 17  # torch._int_mm wants more than 16 rows


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                bias: torch.Tensor | None = None, quantize_input: bool = True, azp_adj: torch.Tensor | None = None,
                input_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] x 8-bit [N, K] -> [..., N] in x's dtype; `azp_adj` given: asymmetric int8 activations."""
    if not quantize_input or weight_scale.dim() != 1:
        return F.linear(x, dequantize_w8(weight, weight_scale).to(x.dtype), bias)
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if azp_adj is not None:
        q, scale, zero_point = quantize_activations_asym(x2, input_scale, input_zero_point)
    else:
        q, scale = quantize_activations(x2, weight.dtype, input_scale)
    if weight.dtype == torch.float8_e4m3fn:
        # Row-wise scaling writes bfloat16 only.
        out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, n),
                               out_dtype=torch.bfloat16)
    else:
        padded = F.pad(q, (0, 0, 0, _INT_MM_MIN_ROWS - m)) if m < _INT_MM_MIN_ROWS else q
        acc = torch._int_mm(padded, weight.t())[:m]
        if azp_adj is not None:  # exact in int32: |z| <= 128 and |azp_adj| <= 127 K
            acc = acc - zero_point * azp_adj.view(1, n)
        out = acc.float() * scale * weight_scale.view(1, n)
    out = out.to(x.dtype)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)
