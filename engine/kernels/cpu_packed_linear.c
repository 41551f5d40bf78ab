/* float32 linear layers on the CPU, y = x w^T (+ bias), from a weight packed once at load into panels of 16 output
 * channels: packed[p][i][c] = w[16 p + c][i], [N / 16, K, 16] (cpu_native.pack_linear_weight).
 *
 * Built and called by engine/kernels/cpu_native.py; its torch reference is F.linear (kernels.reference.linear) on
 * the unpacked weight, which tests/kernels/test_cpu_native.py compares it with. MKL's sgemm on the plain weight ran
 * SmolLM2-135M's shapes at 145-160 GFLOP/s for a 128-token prefill and read the weights at 11-15 GB/s for one row
 * (a decode step), where these loops run at the machine's FMA rate and at its memory's bandwidth. oneDNN, on its own
 * packed copy, is as fast from four rows on but slower for one, and a plain copy beside a packed one would double
 * the weights' memory: this one layout serves every row count.
 *
 * Each tile is up to 8 rows of x by 2 panels (32 channels): 16 vector accumulators, and every k step loads two
 * panel vectors and broadcasts 8 inputs for 16 fused multiply-adds, with no horizontal sums. Threads share the
 * tiles' columns; rows go in chunks whose inputs stay in the core's L2 while the panels stream past them. The sums
 * run over k in order, one fused multiply-add at a time: another order than MKL's, so results agree within float
 * rounding, not to the bit.
 */

#include <stdint.h>
#include <string.h>

#define PANEL 16
#define TILE_ROWS 8
#define CHUNK_ROWS 192

typedef float vec __attribute__((vector_size(PANEL * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* rows (<= TILE_ROWS) rows of x against panels (1 or 2) panels from `w`; constant arguments at each call site let
 * the compiler unroll both loops and keep the accumulators in registers. */
static inline __attribute__((always_inline)) void tile(int rows, int panels, const float *restrict x, int64_t x_stride,
                                                        const float *restrict w, int64_t k, float *restrict y,
                                                        int64_t y_stride, const float *restrict bias) {
    vec acc[TILE_ROWS][2];
    const float *w1 = w + k * PANEL;
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = (vec){0};
    for (int64_t i = 0; i < k; ++i) {
        const vec b0 = load(w + i * PANEL);
        const vec b1 = panels == 2 ? load(w1 + i * PANEL) : b0;
#pragma GCC unroll 8
        for (int r = 0; r < rows; ++r) {
            const vec a = (vec){0} + x[r * x_stride + i];
            acc[r][0] += a * b0;
            if (panels == 2) acc[r][1] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < panels; ++p) {
            vec out = acc[r][p];
            if (bias != 0) out += load(bias + p * PANEL);
            store(y + r * y_stride + p * PANEL, out);
        }
}

#define TILE_CASE(R)                                                                                                 \
    case R:                                                                                                          \
        if (panels == 2)                                                                                             \
            tile(R, 2, x, x_stride, w, k, y, y_stride, bias);                                                        \
        else                                                                                                         \
            tile(R, 1, x, x_stride, w, k, y, y_stride, bias);                                                        \
        break;

static void any_tile(int rows, int panels, const float *x, int64_t x_stride, const float *w, int64_t k, float *y,
                     int64_t y_stride, const float *bias) {
    switch (rows) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
        TILE_CASE(7)
        TILE_CASE(8)
    }
}

/* y [m, n] (rows y_stride apart) = x [m, k] (rows x_stride apart) w^T + bias, with w packed as above; n is a
 * multiple of PANEL. */
void packed_linear_f32(float *y, const float *x, const float *packed, const float *bias, int64_t m, int64_t n,
                       int64_t k, int64_t x_stride, int64_t y_stride, int num_threads) {
    const int64_t num_panels = n / PANEL, num_pairs = (num_panels + 1) / 2;
#pragma omp parallel num_threads(num_threads)
    for (int64_t row0 = 0; row0 < m; row0 += CHUNK_ROWS) {
        const int64_t chunk_end = row0 + CHUNK_ROWS < m ? row0 + CHUNK_ROWS : m;
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < num_pairs; ++pair) {
            const int64_t panel = 2 * pair;
            const int panels = panel + 1 < num_panels ? 2 : 1;
            const float *w = packed + panel * k * PANEL;
            const float *b = bias != 0 ? bias + panel * PANEL : 0;
            for (int64_t r = row0; r < chunk_end; r += TILE_ROWS) {
                const int rows = chunk_end - r < TILE_ROWS ? (int)(chunk_end - r) : TILE_ROWS;
                any_tile(rows, panels, x + r * x_stride, x_stride, w, k, y + r * y_stride + panel * PANEL, y_stride,
                         b);
            }
        }
    }
}
