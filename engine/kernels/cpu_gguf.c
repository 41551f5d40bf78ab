// GGUF blocks (llama.cpp's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) dequantized on the CPU: a chunk of a
// linear's rows at a time straight into the packed linear's panels (cpu_packed_linear.c), so that the chunk is
// still in cache when the linear reads it, or, for a few float32 rows, a block at a time into registers
// (`gguf_matvec`). The model keeps its blocks (a quarter to a half of the float bytes); on SmolLM2 a float32 stream
// decodes faster than from the dequantized float weights, 16 streams at 0.6-0.7x of it (bench/RESULTS.md). Each
// value is computed as `kernels.reference.dequantize_gguf` computes it in float32 (its products and sums in the same
// order, no fused multiply-adds: -ffp-contract=off), so the weight is the reference's bit for bit, and bf16 is its
// round to nearest even.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float vec16 __attribute__((vector_size(16 * sizeof(float))));

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };
enum { LAYOUT_ROWS = 0, LAYOUT_PANELS = 1 };
#define PANEL 16

static float half_to_float(const uint8_t *p) {
    const uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    union { uint32_t u; float f; } v;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
        v.f = (float)mantissa * 5.9604644775390625e-08f;
        v.u |= sign;
    } else if (exponent == 31) {
        v.u = sign | 0x7F800000u | (mantissa << 13);
    } else {
        v.u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    return v.f;
}

static void block_q4(const uint8_t *b, float *out, int has_min) {  // Q4_0 (d * (q - 8)), Q4_1 (d * q + m)
    const float d = half_to_float(b);
    const uint8_t *qs = b + (has_min ? 4 : 2);
#if defined(__AVX512F__)
    // 16 lanes at once, where gcc kept the loops below scalar inside gguf_matvec (its Q4_1 rate on two Zen 4 cores
    // 4.5 -> 11 G weights/s with dot_rows' registers); the same products and sums, so the same values.
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
    __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0xF)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
    const __m512 vd = _mm512_set1_ps(d);
    if (has_min) {
        const __m512 vm = _mm512_set1_ps(half_to_float(b + 2));
        low = _mm512_add_ps(_mm512_mul_ps(vd, low), vm);
        high = _mm512_add_ps(_mm512_mul_ps(vd, high), vm);
    } else {
        const __m512 eight = _mm512_set1_ps(8.0f);
        low = _mm512_mul_ps(vd, _mm512_sub_ps(low, eight));
        high = _mm512_mul_ps(vd, _mm512_sub_ps(high, eight));
    }
    _mm512_storeu_ps(out, low);
    _mm512_storeu_ps(out + 16, high);
#else
    if (has_min) {
        const float m = half_to_float(b + 2);
        for (int i = 0; i < 16; ++i) {
            out[i] = d * (float)(qs[i] & 0xF) + m;
            out[i + 16] = d * (float)(qs[i] >> 4) + m;
        }
    } else {
        for (int i = 0; i < 16; ++i) {
            out[i] = d * ((float)(qs[i] & 0xF) - 8.0f);
            out[i + 16] = d * ((float)(qs[i] >> 4) - 8.0f);
        }
    }
#endif
}

static void block_q5(const uint8_t *b, float *out, int has_min) {  // Q5_0 (d * (q - 16)), Q5_1 (d * q + m)
    const float d = half_to_float(b);
    const uint8_t *qh = b + (has_min ? 4 : 2), *qs = qh + 4;
    uint32_t high;
    memcpy(&high, qh, 4);  // bit i: value i's fifth bit (little-endian)
    float q[32];
    for (int i = 0; i < 16; ++i) {
        q[i] = (float)((qs[i] & 0xF) | (((high >> i) & 1) << 4));
        q[i + 16] = (float)((qs[i] >> 4) | (((high >> (i + 16)) & 1) << 4));
    }
    if (has_min) {
        const float m = half_to_float(b + 2);
        for (int i = 0; i < 32; ++i) out[i] = d * q[i] + m;
    } else {
        for (int i = 0; i < 32; ++i) out[i] = d * (q[i] - 16.0f);
    }
}

static void block_q8_0(const uint8_t *b, float *out) {
    const float d = half_to_float(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int i = 0; i < 32; ++i) out[i] = d * (float)qs[i];
}

// Q4_K / Q5_K: 8 sub-blocks of 32, each with a six-bit scale and min packed into 12 bytes.
static void k_scales(const uint8_t *s, float d, float dmin, float *scale, float *min) {
    for (int j = 0; j < 8; ++j) {
        const int sc = j < 4 ? s[j] & 0x3F : (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        const int mn = j < 4 ? s[j + 4] & 0x3F : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
        scale[j] = d * (float)sc;
        min[j] = dmin * (float)mn;
    }
}

static void block_qk(const uint8_t *b, float *out, int five_bits) {  // Q4_K, Q5_K: d sc q - dmin m
    float scale[8], min[8];
    k_scales(b + 4, half_to_float(b), half_to_float(b + 2), scale, min);
    const uint8_t *qh = b + 16, *qs = b + (five_bits ? 48 : 16);
    for (int j = 0; j < 8; ++j) {  // sub-block j: the low (even j) or high nibbles of bytes 32 (j / 2) ..
        const uint8_t *chunk = qs + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        float *o = out + 32 * j;
        if (five_bits) {
            for (int t = 0; t < 32; ++t)
                o[t] = scale[j] * (float)(((chunk[t] >> shift) & 0xF) | (((qh[t] >> j) & 1) << 4)) - min[j];
        } else {
            for (int t = 0; t < 32; ++t) o[t] = scale[j] * (float)((chunk[t] >> shift) & 0xF) - min[j];
        }
    }
}

static void block_q6_k(const uint8_t *b, float *out) {
    const float d = half_to_float(b + 208);
    const int8_t *scales = (const int8_t *)(b + 192);
    for (int half = 0; half < 2; ++half) {
        const uint8_t *low = b + 64 * half, *high = b + 128 + 32 * half;
        for (int s = 0; s < 4; ++s) {  // values 32 s .. 32 s + 31 of the half: low nibbles of bytes 32 (s % 2) ..
            const uint8_t *nibbles = low + 32 * (s % 2);
            const int shift = 4 * (s / 2);
            for (int g = 0; g < 2; ++g) {  // 16 values a scale
                const float scale = d * (float)scales[8 * half + 2 * s + g];
                float *o = out + 128 * half + 32 * s + 16 * g;
                for (int t = 16 * g; t < 16 * g + 16; ++t) {
                    const uint32_t q = ((nibbles[t] >> shift) & 0xF) | (((high[t] >> (2 * s)) & 3) << 4);
                    o[t - 16 * g] = scale * ((float)q - 32.0f);
                }
            }
        }
    }
}

static int block_values(int qtype) { return qtype >= Q4_K ? 256 : 32; }

static int block_bytes(int qtype) {
    switch (qtype) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q5_0: return 22;
        case Q5_1: return 24;
        case Q8_0: return 34;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case Q6_K: return 210;
        default: return 0;
    }
}

static void dequantize_block(const uint8_t *b, int qtype, float *o) {
    switch (qtype) {
        case Q4_0: block_q4(b, o, 0); break;
        case Q4_1: block_q4(b, o, 1); break;
        case Q5_0: block_q5(b, o, 0); break;
        case Q5_1: block_q5(b, o, 1); break;
        case Q8_0: block_q8_0(b, o); break;
        case Q4_K: block_qk(b, o, 0); break;
        case Q5_K: block_qk(b, o, 1); break;
        case Q6_K: block_q6_k(b, o); break;
    }
}

static void dequantize_row(const uint8_t *row, int qtype, int64_t k, float *out) {
    const int values = block_values(qtype), bytes = block_bytes(qtype);
    for (int64_t i = 0; i < k / values; ++i) dequantize_block(row + i * bytes, qtype, out + i * values);
}

static uint16_t to_bf16(float f) {  // round to nearest even, as torch's cast (no NaN in a weight)
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1)) >> 16);
}


int gguf_supported(int qtype) { return block_bytes(qtype) != 0; }

// `rows` rows of `k` values from `packed` (row r at packed + r * row_bytes) into `out`: dtype 0 float32, 1 bf16.
// LAYOUT_ROWS: out[r][i]. LAYOUT_PANELS (rows a multiple of PANEL): the packed linear's panels, float32
// out[r / 16][i][r % 16], bf16 out[r / 16][i / 2][r % 16][i % 2]; a panel's rows are dequantized side by side
// first, then interleaved (writing each value to its panel slot as it came was a scatter at a third of the speed).
// Returns 0, or 1 where a thread had no scratch memory (its rows are not written).
int gguf_dequantize(void *out, const uint8_t *packed, int qtype, int64_t rows, int64_t k, int64_t row_bytes,
                    int dtype, int layout, int threads) {
    const int64_t group = layout == LAYOUT_PANELS ? PANEL : 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *values = malloc(sizeof(float) * k * group);
        if (values == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t first = 0; first < rows; first += group) {
            if (values == NULL) continue;  // every thread still takes part in the loop's work sharing
            for (int64_t r = 0; r < group; ++r)
                dequantize_row(packed + (first + r) * row_bytes, qtype, k, values + r * k);
            if (layout == LAYOUT_ROWS && dtype == 0) {
                memcpy((float *)out + first * k, values, sizeof(float) * k);
            } else if (layout == LAYOUT_ROWS) {
                uint16_t *o = (uint16_t *)out + first * k;
                for (int64_t i = 0; i < k; ++i) o[i] = to_bf16(values[i]);
            } else if (dtype == 0) {
                float *o = (float *)out + first * k;
                for (int64_t i = 0; i < k; ++i)
                    for (int lane = 0; lane < PANEL; ++lane) o[i * PANEL + lane] = values[lane * k + i];
            } else {
                uint16_t *o = (uint16_t *)out + first * k;
                for (int64_t i = 0; i < k; i += 2)
                    for (int lane = 0; lane < PANEL; ++lane) {
                        o[i * PANEL + 2 * lane] = to_bf16(values[lane * k + i]);
                        o[i * PANEL + 2 * lane + 1] = to_bf16(values[lane * k + i + 1]);
                    }
            }
        }
        free(values);
    }
    return failed;
}

// float32, a few rows (decode): y[r][o] = sum_i x[r][i] w[o][i] for r < rows <= MATVEC_ROWS, each block of w
// dequantized into registers and used at once, never written out (the panels cost a write and a read of every
// weight a step). The weights are the reference's values; the sums run in float32 in another order than F.linear's.
// bf16 rows come here too, as float32 (`kernels.cpu.gguf_linear`), with the weight unrounded: rounding each weight
// to bf16 here cost more than the panels' bf16 dot products, and the panels dequantize every weight every step.
#define MATVEC_ROWS 8
int gguf_matvec_rows(void) { return MATVEC_ROWS; }

// One output's dot products with `rows` input rows; inlined with `rows` a constant (gguf_matvec's switch), so that
// the accumulators stay in registers (indexed by a run-time row count they lived in memory: every block's sums then
// waited on a store and a load, about 48 cycles a block of 32 weights).
static inline __attribute__((always_inline)) void dot_rows(float *y, const float *x, const uint8_t *row, int qtype,
                                                           int64_t k, int64_t x_stride, int64_t y_stride, int rows) {
    const int values = block_values(qtype), bytes = block_bytes(qtype);
    vec16 acc[MATVEC_ROWS];
    for (int r = 0; r < rows; ++r) acc[r] = (vec16){0};
    float w[256] __attribute__((aligned(64)));
    for (int64_t b = 0; b < k / values; ++b) {
        dequantize_block(row + b * bytes, qtype, w);
        for (int j = 0; j < values; j += 16) {
            vec16 wv;
            memcpy(&wv, w + j, sizeof wv);
            for (int r = 0; r < rows; ++r) {
                vec16 xv;
                memcpy(&xv, x + r * x_stride + b * values + j, sizeof xv);
                acc[r] += wv * xv;
            }
        }
    }
    for (int r = 0; r < rows; ++r) {
        float sum = 0.0f;
        for (int j = 0; j < 16; ++j) sum += acc[r][j];
        y[r * y_stride] = sum;
    }
}

void gguf_matvec(float *y, const float *x, const uint8_t *packed, int qtype, int64_t rows, int64_t n, int64_t k,
                 int64_t row_bytes, int64_t x_stride, int64_t y_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n; ++o) {
        const uint8_t *row = packed + o * row_bytes;
        switch (qtype * 16 + (int)rows) {
#define ROWS(T, R) case T * 16 + R: dot_rows(y + o, x, row, T, k, x_stride, y_stride, R); break;
#define TYPE(T) ROWS(T, 1) ROWS(T, 2) ROWS(T, 3) ROWS(T, 4) ROWS(T, 5) ROWS(T, 6) ROWS(T, 7) ROWS(T, 8)
            TYPE(Q4_0) TYPE(Q4_1) TYPE(Q5_0) TYPE(Q5_1) TYPE(Q8_0) TYPE(Q4_K) TYPE(Q5_K) TYPE(Q6_K)
#undef TYPE
#undef ROWS
        }
    }
}
