/* What the CPU C kernels (cpu_*.c) share: the dtypes they take, bfloat16 conversions, a 16-float vector type, a dot
 * product of one vector with four rows at once, exp, and where the paged cache keeps a position's row. cpu_native.py digests this file with
 * each source, so a change here rebuilds them. */

#ifndef KVBOX_CPU_COMMON_H
#define KVBOX_CPU_COMMON_H

#include <math.h>
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

/* Sixteen floats, one AVX-512 vector (two AVX2 ones elsewhere), loaded and stored at any alignment. */
typedef float vec16 __attribute__((vector_size(16 * sizeof(float))));

static inline vec16 vload(const float *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vec16 v) { memcpy(p, &v, sizeof v); }

/* x in every lane: one broadcast. `(vec16){0} + x` is not x for x = -0, so the compiler kept a scalar add before
 * the broadcast, an extra floating-point op beside every multiply-add pair of the linears' inner loop. */
static inline vec16 vsplat(float x) { return (vec16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* dst[0:n] = base[offset:offset + n] as float. */
static inline void load_row(const void *base, int dtype, int64_t offset, int64_t n, float *restrict dst) {
    if (dtype == DTYPE_BFLOAT16) {
        const uint16_t *src = (const uint16_t *)base + offset;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
    } else {
        memcpy(dst, (const float *)base + offset, (size_t)n * sizeof(float));
    }
}

/* Where position pos of a sequence keeps its kv_head's row in a paged cache [num_blocks, block_size, num_kv_heads,
 * head_size]. Block sizes are powers of two (the engine's config requires it), so the division and remainder are a
 * shift and a mask, not the 40-cycle 64-bit division that cost more than a key's arithmetic. */
static inline int64_t row_offset(const int32_t *table, int64_t pos, int64_t block_size, int64_t num_kv_heads,
                                 int64_t kv_head, int64_t head_size) {
    const int shift = __builtin_ctzll((unsigned long long)block_size);
    const int64_t slot = ((int64_t)table[pos >> shift] << shift) | (pos & (block_size - 1));
    return (slot * num_kv_heads + kv_head) * head_size;
}

/* e^x, branch-free so that loops over it vectorize (with -fno-trapping-math): Cephes' expf, x = n ln2 + r, a
 * degree-6 polynomial in r, times 2^n built in the exponent bits; within 2 ulp. x is clamped to where e^x is a
 * finite normal float. Computed here because glibc's vector expf is declared to the compiler only under
 * -ffast-math, which gcc 12 also links a flush-denormals-to-zero start-up object into shared libraries with, for
 * the whole process. */
static inline float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r -= n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const union { int32_t bits; float value; } scale = {.bits = ((int32_t)n + 127) << 23};  /* 2^n */
    return y * scale.value;
}

#endif
