"""The CUDA 8-bit linears (kernels/w8a8.py: FP8 through torch._scaled_mm, INT8 through torch._int_mm) against
`kernels.reference.w8a8_linear`, which quantizes the activations the same way and emulates the GEMM in float32.
cuBLAS only runs on CUDA, so every case is marked `gpu`; FP8 also needs compute capability 8.9.
"""

import pytest
import torch
from test_kernels import CUDA, gpu

from engine.kernels import reference

FP8_OK = CUDA and torch.cuda.get_device_capability() >= (8, 9)


def make_layer(n, k, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    quantized, scale = reference.quantize_activations(weight, dtype)  # per output channel
    return quantized.to(device), scale[:, 0].to(device)


@gpu
@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 16, 17, 300])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_w8a8_matches_emulation(m, xdtype, wdtype, static):
    if wdtype == torch.float8_e4m3fn and not FP8_OK:
        pytest.skip("FP8 GEMMs need compute capability 8.9")
    from engine.kernels import w8a8

    n, k = 512, 1024
    weight, weight_scale = make_layer(n, k, wdtype, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to("cuda", xdtype)
    bias = torch.randn(n, device="cuda", dtype=xdtype)
    input_scale = torch.tensor(4.0 / 448 if wdtype == torch.float8_e4m3fn else 4.0 / 127, device="cuda") \
        if static else None
    out = w8a8.w8a8_linear(x, weight, weight_scale, input_scale, bias)
    expected = reference.w8a8_linear(x, weight, weight_scale, input_scale, bias)
    # Both sum the same quantized products (exactly for int8); the GPU's output passes through bfloat16 (FP8).
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@gpu
def test_weight_only_and_block_scales_dequantize():
    from engine.kernels import w8a8

    weight, _ = make_layer(256, 512, torch.float8_e4m3fn, seed=3)
    block_scale = torch.rand(2, 4, device="cuda") * 0.01 + 0.001
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    for quantize_input in (False, True):
        out = w8a8.w8a8_linear(x, weight, block_scale, None, None, quantize_input=quantize_input)
        expected = torch.nn.functional.linear(x, reference.dequantize_w8(weight, block_scale).to(x.dtype))
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)

