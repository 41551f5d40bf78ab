/* Linear layers on the CPU, y = x w^T (+ bias), from a weight packed once at load into panels of 16 output channels
 * (cpu_native.pack_linear_weight): float32 as [N / 16, K, 16], packed[p][i][c] = w[16 p + c][i]; bf16, on CPUs with
 * AVX512_BF16, as [N / 16, K / 2, 16, 2], the pairs of inputs that one vdpbf16ps multiplies and sums.
 *
 * Built and called by engine/kernels/cpu_native.py; its torch reference is F.linear (kernels.reference.linear) on
 * the unpacked weight, which tests/kernels/test_cpu_native.py compares it with. MKL's sgemm on the plain weight ran
 * SmolLM2-135M's shapes at 145-160 GFLOP/s for a 128-token prefill and read the weights at 11-15 GB/s for one row
 * (a decode step); oneDNN's bf16 GEMM read them at 10-75 GB/s for one row (its head: 10). These loops run at the
 * machine's FMA rate and at its memory's bandwidth, and a plain copy beside a packed one would double the weights'
 * memory: this one layout serves every row count.
 *
 * Each tile is up to 8 rows of x by 2 panels (32 channels): 16 vector accumulators, and every k step (a pair of k
 * in bf16) loads two panel vectors and broadcasts 8 inputs for 16 fused multiply-adds, with no horizontal sums.
 * Threads share the tiles' columns; rows go in chunks whose inputs stay in the core's L2 while the panels stream
 * past them. The sums run over k in order in float32: another order than MKL's or oneDNN's, so results agree
 * within float rounding (bf16: before the output's one rounding, to nearest even), not to the bit.
 */

#include <stdint.h>
#include <string.h>

#include "cpu_common.h"

#define PANEL 16
#define TILE_ROWS 8
#define CHUNK_ROWS 192


/* rows (<= TILE_ROWS) rows of x against panels (1 or 2) panels from `w`; constant arguments at each call site let
 * the compiler unroll both loops and keep the accumulators in registers. */
static inline __attribute__((always_inline)) void tile(int rows, int panels, const float *restrict x, int64_t x_stride,
                                                        const float *restrict w, int64_t k, float *restrict y,
                                                        int64_t y_stride, const float *restrict bias,
                                                        const float *ahead, int64_t ahead_from, int64_t ahead_step) {
    vec16 acc[TILE_ROWS][2];
    const float *w1 = w + k * PANEL;
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = (vec16){0};
    int64_t next = ahead_from;
    for (int64_t i = 0; i < k; ++i) {
        const vec16 b0 = vload(w + i * PANEL);
        const vec16 b1 = panels == 2 ? vload(w1 + i * PANEL) : b0;
        if (ahead != 0 && i == next) {
            __builtin_prefetch(ahead + i * PANEL);
            __builtin_prefetch(ahead + (k + i) * PANEL);
            next += ahead_step;
        }
#pragma GCC unroll 8
        for (int r = 0; r < rows; ++r) {
            const vec16 a = vsplat(x[r * x_stride + i]);
            acc[r][0] += a * b0;
            if (panels == 2) acc[r][1] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < panels; ++p) {
            vec16 out = acc[r][p];
            if (bias != 0) out += vload(bias + p * PANEL);
            vstore(y + r * y_stride + p * PANEL, out);
        }
}

/* case R of a switch on the row count: `tile_fn` with R rows and 1 or 2 panels, both constants. */
#define TILE_CASE(tile_fn, R)                                                                                        \
    case R:                                                                                                          \
        if (panels == 2)                                                                                             \
            tile_fn(R, 2, x, x_stride, w, k, y, y_stride, bias, ahead, ahead_from, ahead_step);                      \
        else                                                                                                         \
            tile_fn(R, 1, x, x_stride, w, k, y, y_stride, bias, ahead, ahead_from, ahead_step);                      \
        break;

static void any_tile(int rows, int panels, const float *x, int64_t x_stride, const float *w, int64_t k, float *y,
                     int64_t y_stride, const float *bias, const float *ahead, int64_t ahead_from, int64_t ahead_step) {
    switch (rows) {
        TILE_CASE(tile, 1)
        TILE_CASE(tile, 2)
        TILE_CASE(tile, 3)
        TILE_CASE(tile, 4)
        TILE_CASE(tile, 5)
        TILE_CASE(tile, 6)
        TILE_CASE(tile, 7)
        TILE_CASE(tile, 8)
    }
}

#ifdef __AVX512BF16__
#include <immintrin.h>

/* bf16: the weight packed as [N / 16, K / 2, 16, 2] (pairs of inputs side by side), so that one vdpbf16ps takes 16
 * channels' products with two inputs at once, summed in float32; the output rounded to bf16 once, to nearest even
 * as torch rounds. */
static inline __attribute__((always_inline)) void tile_bf16(int rows, int panels, const uint16_t *restrict x,
                                                             int64_t x_stride, const uint16_t *restrict w, int64_t k,
                                                             uint16_t *restrict y, int64_t y_stride,
                                                             const uint16_t *restrict bias, const uint16_t *ahead,
                                                             int64_t ahead_from, int64_t ahead_step) {
    __m512 acc[TILE_ROWS][2];
    const uint16_t *w1 = w + k * PANEL;
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t next = ahead_from;
    for (int64_t i = 0; i < k / 2; ++i) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w + i * 2 * PANEL);
        const __m512bh b1 = panels == 2 ? (__m512bh)_mm512_loadu_si512(w1 + i * 2 * PANEL) : b0;
        if (ahead != 0 && i == next) {
            __builtin_prefetch(ahead + i * 2 * PANEL);
            __builtin_prefetch(ahead + (k + 2 * i) * PANEL);
            next += ahead_step;
        }
#pragma GCC unroll 8
        for (int r = 0; r < rows; ++r) {
            uint32_t pair;
            memcpy(&pair, x + r * x_stride + 2 * i, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            if (panels == 2) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < panels; ++p) {
            __m512 out = acc[r][p];
            if (bias != 0)
                out = _mm512_add_ps(out, _mm512_castsi512_ps(_mm512_slli_epi32(
                                             _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(bias + p * PANEL))),
                                             16)));
            _mm256_storeu_si256((void *)(y + r * y_stride + p * PANEL), (__m256i)_mm512_cvtneps_pbh(out));
        }
}

static void any_tile_bf16(int rows, int panels, const uint16_t *x, int64_t x_stride, const uint16_t *w, int64_t k,
                          uint16_t *y, int64_t y_stride, const uint16_t *bias, const uint16_t *ahead,
                          int64_t ahead_from, int64_t ahead_step) {
    switch (rows) {
        TILE_CASE(tile_bf16, 1)
        TILE_CASE(tile_bf16, 2)
        TILE_CASE(tile_bf16, 3)
        TILE_CASE(tile_bf16, 4)
        TILE_CASE(tile_bf16, 5)
        TILE_CASE(tile_bf16, 6)
        TILE_CASE(tile_bf16, 7)
        TILE_CASE(tile_bf16, 8)
    }
}
#endif

/* Whether this build has the bf16 kernel (the CPU has AVX512_BF16). */
int packed_linear_has_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* y [m, n] (rows y_stride apart) = x [m, k] (rows x_stride apart) w^T + bias, with w packed as above, all of one
 * dtype (DTYPE_FLOAT32, or DTYPE_BFLOAT16 where packed_linear_has_bf16(); then k is even); n is a multiple of PANEL.
 * A panel holds k * PANEL values in either layout. */
void packed_linear(void *y, const void *x, const void *packed, const void *bias, int dtype, int64_t m, int64_t n,
                   int64_t k, int64_t x_stride, int64_t y_stride, int num_threads) {
    const int64_t num_panels = n / PANEL, num_pairs = (num_panels + 1) / 2;
#pragma omp parallel num_threads(num_threads)
    for (int64_t row0 = 0; row0 < m; row0 += CHUNK_ROWS) {
        const int64_t chunk_end = row0 + CHUNK_ROWS < m ? row0 + CHUNK_ROWS : m;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < num_pairs; ++pair) {
            const int64_t panel = 2 * pair;
            const int panels = panel + 1 < num_panels ? 2 : 1;
            const int64_t tiles = (chunk_end - row0 + TILE_ROWS - 1) / TILE_ROWS;
            for (int64_t r = row0; r < chunk_end; r += TILE_ROWS) {
                const int rows = chunk_end - r < TILE_ROWS ? (int)(chunk_end - r) : TILE_ROWS;
                const int64_t w_at = panel * k * PANEL, x_at = r * x_stride, y_at = r * y_stride + panel * PANEL;
                /* The pair's tiles fetch the next pair's panels (they follow in memory) into the cache while they
                 * compute, each every tiles-th step of K from its own: memory streams the whole time at the rate
                 * the compute takes it. The first tile alone fetching the whole pair asked for it four times as fast
                 * at 32 rows (two threads: past the box's bandwidth), then let memory idle for the other three. */
                const int64_t ahead_at = pair + 1 < num_pairs ? w_at + 2 * k * PANEL : -1;
                const int64_t ahead_from = (r - row0) / TILE_ROWS;
                if (dtype == DTYPE_FLOAT32) {
                    const float *w = (const float *)packed;
                    any_tile(rows, panels, (const float *)x + x_at, x_stride, w + w_at, k, (float *)y + y_at,
                             y_stride, bias != 0 ? (const float *)bias + panel * PANEL : 0,
                             ahead_at >= 0 ? w + ahead_at : 0, ahead_from, tiles);
                }
#ifdef __AVX512BF16__
                else {
                    const uint16_t *w = (const uint16_t *)packed;
                    any_tile_bf16(rows, panels, (const uint16_t *)x + x_at, x_stride, w + w_at, k,
                                  (uint16_t *)y + y_at, y_stride, bias != 0 ? (const uint16_t *)bias + panel * PANEL : 0,
                                  ahead_at >= 0 ? w + ahead_at : 0, ahead_from, tiles);
                }
#endif
            }
        }
    }
}
