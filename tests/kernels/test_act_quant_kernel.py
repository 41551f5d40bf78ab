"""The one-launch activation quantizer (kernels/act_quant.py) against `kernels.reference.quantize_activations`:
per-token and static scales, float8 e4m3 and int8 (round half to even, as torch.round), rows longer than one block;
asymmetric int8 (a zero point per token or a static one) against `quantize_activations_asym`.
int8 also under the Triton interpreter without CUDA (see conftest.py); float8 on the GPU."""

import pytest
import torch
from test_kernels import DEVICE
from test_producer_quant_kernel import fp8_checked_on_gpus_only

from engine.kernels import act_quant, reference

# The interpreter's float32 -> float8 cast is not the hardware's: it rounds ties away from zero and, where rounding
# carries into the exponent, halves the value (124 -> 64). The float8 cases are compared on the GPU only
# (`fp8_checked_on_gpus_only`).


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize(("n", "k"), [(3, 40), (2, 1500)])
def test_quantized_rows_and_scales_equal_the_reference(dtype, static, n, k):
    g = torch.Generator().manual_seed(n * k)
    x = (torch.randn(n, 2 * k, generator=g) * 3)[:, ::2].to(DEVICE, torch.bfloat16)  # strided rows
    x[0, 5] = 0.5 * 3 / 127  # lands on .5 for int8 after dividing: ties round to even
    scale = torch.tensor(0.05, device=DEVICE) if static else None
    with fp8_checked_on_gpus_only(dtype):
        q, s = act_quant.quantize_activations(x, dtype, scale)
    q_ref, s_ref = reference.quantize_activations(x, dtype, scale)
    assert q.dtype == dtype and q.shape == (n, k) and s.shape == (n, 1)
    torch.testing.assert_close(s, s_ref.expand(n, 1).to(s), rtol=0, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
@pytest.mark.parametrize(("n", "k"), [(3, 40), (2, 1500)])
def test_asymmetric_int8_rows_scales_and_zero_points_equal_the_reference(static, n, k):
    g = torch.Generator().manual_seed(7 * n + k)
    x = (torch.randn(n, 2 * k, generator=g) * 3 + 1.5)[:, ::2].to(DEVICE, torch.bfloat16)  # off-centre, strided
    x[-1] = x[-1].abs() + 0.25  # a row of one sign: its range still holds 0
    if n > 2:
        x[1] = 0.0  # a constant row: the scale's floor, no division by zero
    scale = torch.tensor(2.0**-4, device=DEVICE) if static else None
    zero_point = torch.tensor(-37, dtype=torch.int32, device=DEVICE) if static else None
    if static:  # x / scale on .5 and 1.5: round half to even, then shift (-37, -35; rounding after: -36, -36)
        x[0, 5], x[0, 6] = 0.5 * 2.0**-4, 1.5 * 2.0**-4
    q, s, z = act_quant.quantize_activations_asym(x, scale, zero_point)
    q_ref, s_ref, z_ref = reference.quantize_activations_asym(x, scale, zero_point)
    assert q.dtype == torch.int8 and q.shape == (n, k) and s.shape == z.shape == (n, 1) and z.dtype == torch.int32
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    if static:
        assert q[0, 5:7].tolist() == [-37, -35]
    else:  # both ends of int8 used, zero points off 0, every value within half a step
        assert int(q.min()) == -128 and int(q.max()) == 127 and bool((z[0] != 0).all())
        assert float(((q.float() - z.float()) * s - x.float()).abs().div(s).max()) <= 0.5 + 1e-3
