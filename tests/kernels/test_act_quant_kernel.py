"""The one-launch activation quantizer (kernels/act_quant.py) against `kernels.reference.quantize_activations`:
per-token and static scales, float8 e4m3 and int8 (round half to even, as torch.round), rows longer than one block.
int8 also under the Triton interpreter without CUDA (see conftest.py); float8 on the GPU."""

import pytest
import torch
from test_kernels import DEVICE

from engine.kernels import act_quant, reference

# The interpreter's float32 -> float8 cast is not the hardware's: it rounds ties away from zero and, where rounding
# carries into the exponent, halves the value (124 -> 64). The float8 cases run on the GPU only.
FP8_OK = DEVICE.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize(("n", "k"), [(3, 40), (2, 1500)])
def test_quantized_rows_and_scales_equal_the_reference(dtype, static, n, k):
    if dtype == torch.float8_e4m3fn and not FP8_OK:
        pytest.skip("float8 e4m3 runs on a GPU of compute capability 8.9 or newer only")
    g = torch.Generator().manual_seed(n * k)
    x = (torch.randn(n, 2 * k, generator=g) * 3)[:, ::2].to(DEVICE, torch.bfloat16)  # strided rows
    x[0, 5] = 0.5 * 3 / 127  # lands on .5 for int8 after dividing: ties round to even
    scale = torch.tensor(0.05, device=DEVICE) if static else None
    q, s = act_quant.quantize_activations(x, dtype, scale)
    q_ref, s_ref = reference.quantize_activations(x, dtype, scale)
    assert q.dtype == dtype and q.shape == (n, k) and s.shape == (n, 1)
    torch.testing.assert_close(s, s_ref.expand(n, 1).to(s), rtol=0, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)
