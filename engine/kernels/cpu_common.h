/* What the CPU C kernels (cpu_*.c) share: the dtypes they take, bfloat16 conversions, and a dot product of one
 * vector with four rows at once. cpu_native.py digests this file with each source, so a change here rebuilds them. */

#ifndef KVBOX_CPU_COMMON_H
#define KVBOX_CPU_COMMON_H

#include <stdint.h>
#include <string.h>

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };

static inline float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion does (NaN stays NaN). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* sums[r] = x . rows[r * n : (r + 1) * n] for r < 4: four independent sums, so that each step need not wait on the
 * last (one sum at a time is bound by the add's latency). Sources built with reassociation reduce each as a tree. */
static inline void dot4(const float *restrict x, const float *restrict rows, int64_t n, float *restrict sums) {
    const float *r0 = rows, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < n; ++i) {
        s0 += x[i] * r0[i];
        s1 += x[i] * r1[i];
        s2 += x[i] * r2[i];
        s3 += x[i] * r3[i];
    }
    sums[0] = s0, sums[1] = s1, sums[2] = s2, sums[3] = s3;
}

#endif
