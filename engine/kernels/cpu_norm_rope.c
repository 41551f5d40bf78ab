/* RMSNorm (with the residual add before it) and rotary embedding + K/V store on the CPU, one pass over each row.
 *
 * Built and called by engine/kernels/cpu_native.py like cpu_decode_attention.c; their torch references are
 * kernels.reference.fused_add_rms_norm / rms_norm and rotary_store_kv, which tests/kernels/test_cpu_native.py
 * compares them with. In torch each is five to ten small ops (casts, powers, means, products, gathers) over rows of
 * a few hundred values: at batch 1 a decode step of a 30-layer model spent more time in their dispatch and in waking
 * threads than in arithmetic. Rows run on one thread unless there are many of them.
 *
 * Rounding follows the references: sums and products in float32, rounded to the tensor's dtype once where the
 * reference rounds (the residual sum; the normalized, weighted output; each rotated value). Built without fused
 * multiply-adds (cpu_native.py's flags), so that RoPE's x1 cos - x2 sin rounds exactly as torch's two products and
 * a difference do.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"

enum { PARALLEL_ROWS = 16 };  /* fewer rows than this: one thread (waking the others cost more than the rows) */

static inline float load(const void *base, int dtype, int64_t i) {
    return dtype == DTYPE_BFLOAT16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* The value as the tensor's dtype holds it: rounded to bf16 and back, or as is. */
static inline float rounded(float v, int dtype) {
    return dtype == DTYPE_BFLOAT16 ? bf16_to_float(float_to_bf16(v)) : v;
}

static inline void store(void *base, int dtype, int64_t i, float v) {
    if (dtype == DTYPE_BFLOAT16)
        ((uint16_t *)base)[i] = float_to_bf16(v);
    else
        ((float *)base)[i] = v;
}

/* One row of rms_norm below; `dtype` and whether there is a residual are constants at each call, so that the loads
 * and stores need no branch and the loops vectorize (the sum of squares in vector lanes, then across them: another order than torch's, which
 * also sums in lanes). */
static inline __attribute__((always_inline)) void rms_norm_row(void *out, void *summed, const void *x,
                                                                const void *residual, const void *weight, int dtype,
                                                                int64_t hidden, int64_t xi, int64_t ri, int64_t oi,
                                                                float eps, float weight_offset) {
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) {
        float v = load(x, dtype, xi + i);
        if (residual != NULL) {
            v = rounded(v + load(residual, dtype, ri + i), dtype);
            store(summed, dtype, oi + i, v);
        }
        squares += v * v;
    }
    const float inverse_rms = 1.0f / sqrtf(squares / (float)hidden + eps);
    const void *source = residual != NULL ? summed : x;
    const int64_t si = residual != NULL ? oi : xi;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) {
        const float normed = load(source, dtype, si + i) * inverse_rms;
        store(out, dtype, oi + i, normed * (load(weight, dtype, i) + weight_offset));
    }
}

/* out[t] = rms_norm(x[t] (+ residual[t])) * (weight + weight_offset); where residual is given, summed[t] receives
 * x[t] + residual[t] in the dtype (the next layer's residual) and is what gets normalized. Rows are row_stride
 * elements apart in x and residual; out and summed are contiguous [rows, hidden]. weight has the dtype. */
void rms_norm(void *out, void *summed, const void *x, const void *residual, const void *weight, int dtype,
              int64_t rows, int64_t hidden, int64_t x_row_stride, int64_t residual_row_stride, float eps,
              float weight_offset, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t t = 0; t < rows; ++t) {
        const int64_t xi = t * x_row_stride, ri = t * residual_row_stride, oi = t * hidden;
        if (dtype == DTYPE_BFLOAT16 && residual != NULL)
            rms_norm_row(out, summed, x, residual, weight, DTYPE_BFLOAT16, hidden, xi, ri, oi, eps, weight_offset);
        else if (dtype == DTYPE_BFLOAT16)
            rms_norm_row(out, NULL, x, NULL, weight, DTYPE_BFLOAT16, hidden, xi, ri, oi, eps, weight_offset);
        else if (residual != NULL)
            rms_norm_row(out, summed, x, residual, weight, DTYPE_FLOAT32, hidden, xi, ri, oi, eps, weight_offset);
        else
            rms_norm_row(out, NULL, x, NULL, weight, DTYPE_FLOAT32, hidden, xi, ri, oi, eps, weight_offset);
    }
}

/* Rotates each head of q and k at its token's position (neox: the first rotary_dim / 2 values against the next
 * rotary_dim / 2), in place, then writes k and v into the caches at their slots (a negative slot: a padding token,
 * rotated but not stored). q, k, v rows are row_stride elements apart, heads head_size apart; cos_sin_cache is
 * float32 [max_position, rotary_dim], cos then sin; caches [num_slots, num_kv_heads, head_size] contiguous. */
void rotary_store_kv(void *query, void *key, const void *value, void *key_cache, void *value_cache, int dtype,
                     const int64_t *positions, const int64_t *slots, const float *cos_sin_cache, int64_t tokens,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_size, int64_t rotary_dim,
                     int64_t q_row_stride, int64_t kv_row_stride, int num_threads) {
    const int64_t half = rotary_dim / 2, element = dtype == DTYPE_BFLOAT16 ? 2 : 4;
#pragma omp parallel for num_threads(num_threads) if (tokens >= PARALLEL_ROWS)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *cos = cos_sin_cache + positions[t] * rotary_dim, *sin = cos + half;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
            void *base = h < num_heads ? query : key;
            const int64_t row = h < num_heads ? t * q_row_stride + h * head_size
                                              : t * kv_row_stride + (h - num_heads) * head_size;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = load(base, dtype, row + i), x2 = load(base, dtype, row + half + i);
                store(base, dtype, row + i, x1 * cos[i] - x2 * sin[i]);
                store(base, dtype, row + half + i, x2 * cos[i] + x1 * sin[i]);
            }
        }
        if (slots[t] < 0) continue;
        const int64_t width = num_kv_heads * head_size, dst = slots[t] * width * element;
        memcpy((char *)key_cache + dst, (const char *)key + t * kv_row_stride * element, (size_t)(width * element));
        memcpy((char *)value_cache + dst, (const char *)value + t * kv_row_stride * element,
               (size_t)(width * element));
    }
}
