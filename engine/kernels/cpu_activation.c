/* The gated activation of a SwiGLU MLP on the CPU: out[t] = silu(x[t, :d]) * x[t, d:], one pass per row.
 *
 * Built and called by engine/kernels/cpu_native.py; its torch reference is kernels.reference.silu_and_mul, which
 * tests/kernels/test_cpu_native.py compares it with. torch runs it as a silu over the gate's half, then a product:
 * two passes over rows of thousands of values, each a full round trip to memory at prefill sizes (5% of a float32
 * prefill step of SmolLM2-135M). bf16 rounds where torch's bf16 ops round: the silu's result, then the product.
 * exp is cpu_common.h's, within 2 ulp of torch's.
 */

#include <math.h>
#include <stdint.h>

#include "cpu_common.h"

static inline float silu(float g) { return g / (1.0f + exp_approx(-g)); }

static void row_f32(float *restrict out, const float *restrict gate, const float *restrict up, int64_t d) {
    for (int64_t i = 0; i < d; ++i) out[i] = silu(gate[i]) * up[i];
}

static void row_bf16(uint16_t *restrict out, const uint16_t *restrict gate, const uint16_t *restrict up, int64_t d) {
    for (int64_t i = 0; i < d; ++i) {
        const float s = bf16_to_float(float_to_bf16(silu(bf16_to_float(gate[i]))));
        out[i] = float_to_bf16(s * bf16_to_float(up[i]));
    }
}

void silu_and_mul(void *out, const void *x, int dtype, int64_t rows, int64_t d, int64_t x_stride, int64_t out_stride,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        if (dtype == DTYPE_FLOAT32) {
            const float *gate = (const float *)x + t * x_stride;
            row_f32((float *)out + t * out_stride, gate, gate + d, d);
        } else {
            const uint16_t *gate = (const uint16_t *)x + t * x_stride;
            row_bf16((uint16_t *)out + t * out_stride, gate, gate + d, d);
        }
    }
}
