"""The CUDA 8-bit linears (kernels/w8a8.py: FP8 through torch._scaled_mm, INT8 through torch._int_mm, a Triton
kernel for decode-sized batches) against `kernels.reference.w8a8_linear`, which quantizes the activations the same way
and emulates the GEMM in float32. cuBLAS only runs on CUDA, so those cases are marked `gpu`; FP8 also needs compute
capability 8.9. The Triton kernel also runs under the interpreter, on activations the reference quantized.
"""

import pytest
import torch
from test_kernels import CUDA, DEVICE, gpu

from kernels import reference

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
    from kernels import w8a8

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
    from kernels import w8a8

    weight, _ = make_layer(256, 512, torch.float8_e4m3fn, seed=3)
    block_scale = torch.rand(2, 4, device="cuda") * 0.01 + 0.001
    x = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    for quantize_input in (False, True):
        out = w8a8.w8a8_linear(x, weight, block_scale, None, None, quantize_input=quantize_input)
        expected = torch.nn.functional.linear(x, reference.dequantize_w8(weight, block_scale).to(x.dtype))
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize(("m", "bias", "config"), [(1, False, (32, 64, 2)), (3, True, (16, 32, 3)),
                                                   (2, True, None)])
def test_small_batch_kernel_sums_the_quantized_products(m, bias, config, wdtype):
    """Forced (BLOCK_N, BLOCK_K, K splits), float32 output: the split partials and the scales are applied as the
    reference applies them."""
    if wdtype == torch.float8_e4m3fn and CUDA and not FP8_OK:
        pytest.skip("float8 e4m3 needs compute capability 8.9")
    from kernels import w8a8

    n, k = 40, 160
    weight, weight_scale = make_layer(n, k, wdtype, seed=m, device=DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    b = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(DEVICE) if bias else None
    q, scale = reference.quantize_activations(x, wdtype)
    out = w8a8._small_gemm(q, scale, weight, weight_scale, b, torch.float32, config)
    expected = reference.w8a8_linear(x, weight, weight_scale, None, b)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
