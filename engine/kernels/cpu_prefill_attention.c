/* Paged causal attention for prefills on the CPU: each sequence's new query rows against its cached keys (its
 * earlier context and the chunk's own rows, stored before the attention runs), read from the paged cache, for
 * float32 and bfloat16 caches.
 *
 * Built and called by engine/kernels/cpu_native.py; its torch reference is kernels.reference.paged_attention,
 * which tests/kernels/test_cpu_native.py compares it with. The torch path gathers the blocks, widens them to float32
 * and runs SDPA, whose CPU kernel ran SmolLM2-135M's 128-token prefills at 40-50 GFLOP/s: 14-23% of a bf16
 * prefill step.
 *
 * FlashAttention's loop on the CPU. A task is a block of about TASK_ROWS query rows of one sequence and one KV head
 * (the group's heads of a run of positions), so that a long prompt still gives every thread work; the heaviest
 * blocks (the last positions, which see the most keys) are handed out first. The task walks its keys in blocks of
 * KB positions, copied (widened) out of the paged cache, and keeps a running max and sum per row (online softmax),
 * so no row's scores outlive its key block and the working set stays in L2 however long the prompt is.
 *
 * Both products are small GEMMs in one register tile of 8 broadcast rows by 32 lanes, as in cpu_packed_linear.c
 * (16 accumulators, two vector loads and 8 broadcasts per 16 multiply-adds): the scores transposed, S^T[key][row]
 * = K[key] . Q^T[:, row], 8 keys' elements broadcast against 32 query rows; then O[row] += P^T[key][row] V[key],
 * 8 rows' weights broadcast against the value rows. With the query rows along the lanes of the scores, the
 * softmax's max, exp, sum and rescale run 16 rows at a time, with no horizontal sums and no transpose of the keys
 * (the queries are transposed once a task). Only the keys some row of a 32-row panel sees are computed (causal
 * tiles skipped); the rest of the panel's are masked in the softmax. 32 prompts of 128 tokens, SmolLM2's heads, 2
 * threads: 58-68 GFLOP/s with the row-at-a-time kernel this replaced, ~95 now; one 2048-token prompt 86 -> 167.
 * Sums in float32 as the torch path's SDPA on float copies; in another order, so results agree within float
 * rounding.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define LANES 16  /* floats in a vec16 */
#define TILE 8    /* broadcast rows of a register tile */
#define PANEL (2 * LANES)  /* query rows of a register tile */
#define KB 256    /* key positions a block */
#define TASK_ROWS 96  /* query rows (positions x the group's heads) a task, about */
#define QUERY_AHEAD 4  /* positions */

typedef int32_t ivec16 __attribute__((vector_size(16 * sizeof(int32_t))));

/* e^x lane by lane, vectorized by the compiler (-fno-trapping-math). */
static inline vec16 vexp(vec16 x) {
    float in[LANES], e[LANES];
    vstore(in, x);
    for (int l = 0; l < LANES; ++l) e[l] = exp_approx(in[l]);
    return vload(e);
}

static inline vec16 vmax(vec16 a, vec16 b) {
    const ivec16 greater = a > b;
    return (vec16)((greater & (ivec16)a) | (~greater & (ivec16)b));
}

/* where mask, x; else fill. */
static inline vec16 vselect(ivec16 mask, vec16 x, vec16 fill) {
    return (vec16)((mask & (ivec16)x) | (~mask & (ivec16)fill));
}

/* dst[0:n] = base[offset:offset + n] as float, n a multiple of 16: in vectors, where load_row's memcpy of a
 * float32 row was a call into libc (cpu_native.py builds this file so that gcc does not make the loop one). */
static inline void widen_row(const void *base, int dtype, int64_t offset, int64_t n, float *restrict dst) {
    if (dtype == DTYPE_BFLOAT16)
        load_row(base, dtype, offset, n, dst);
    else
        for (int64_t d = 0; d < n; d += LANES) vstore(dst + d, vload((const float *)base + offset + d));
}

/* acc[i][0:16 * panels] = sum over k < count of a[i * ai + k * ak] * b[k * bs + 0:16 * panels], i < rows: the
 * register tile both products share; constants for rows, panels and the strides at each call site. */
static inline __attribute__((always_inline)) void tile_product(int rows, int panels, const float *restrict a,
                                                                int64_t ai, int64_t ak, const float *restrict b,
                                                                int64_t bs, int64_t count, vec16 acc[TILE][2]) {
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = (vec16){0};
    for (int64_t k = 0; k < count; ++k) {
        const vec16 b0 = vload(b + k * bs);
        const vec16 b1 = panels == 2 ? vload(b + k * bs + LANES) : b0;
#pragma GCC unroll 8
        for (int r = 0; r < rows; ++r) {
            const vec16 x = vsplat(a[r * ai + k * ak]);
            acc[r][0] += x * b0;
            if (panels == 2) acc[r][1] += x * b1;
        }
    }
}

/* S^T[t][0:32] = keys[t] . Q^T[:, 0:32] for `rows` keys t from keys (rows head_size apart). */
static inline __attribute__((always_inline)) void score_tile(int rows, int panels, const float *keys,
                                                              const float *q_t, int64_t head_size, int64_t m_pad,
                                                              float *s_t) {
    vec16 acc[TILE][2];
    tile_product(rows, panels, keys, head_size, 1, q_t, m_pad, head_size, acc);
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < panels; ++p) vstore(s_t + r * m_pad + p * LANES, acc[r][p]);
}

/* O[r][0:16 * panels] = O[r][0:16 * panels] * alpha[r] + sum over count keys t of P^T[t][r] V[t][0:16 * panels],
 * for `rows` query rows r: the weights broadcast from their transposed rows (8 rows' weights of a key side by
 * side), the values' rows the vectors; O in rows (head_size apart), as the output is. */
static inline __attribute__((always_inline)) void weigh_tile(int rows, int panels, const float *p_t, int64_t m_pad,
                                                              const float *values, int64_t head_size, int64_t count,
                                                              const float *alpha, float *o) {
    vec16 acc[TILE][2];
    tile_product(rows, panels, p_t, 1, m_pad, values, head_size, count, acc);
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < panels; ++p) {
            float *row = o + r * head_size + p * LANES;
            vstore(row, vload(row) * vsplat(alpha[r]) + acc[r][p]);
        }
}

/* case R of a switch on a tile's rows: `call` with R rows and 1 or 2 panels, both constants. */
#define TILE_CASE(R, call)                                                                                           \
    case R:                                                                                                          \
        if (panels == 2)                                                                                             \
            call(R, 2);                                                                                              \
        else                                                                                                         \
            call(R, 1);                                                                                              \
        break;
#define BY_ROWS(call)                                                                                                \
    switch (rows) {                                                                                                  \
        TILE_CASE(1, call) TILE_CASE(2, call) TILE_CASE(3, call) TILE_CASE(4, call)                                  \
        TILE_CASE(5, call) TILE_CASE(6, call) TILE_CASE(7, call) TILE_CASE(8, call)                                  \
    }

/* score_tile and weigh_tile for any rows <= TILE and panels <= 2. */
static void scores(int rows, int panels, const float *keys, const float *q_t, int64_t head_size, int64_t m_pad,
                   float *s_t) {
#define SCORE(R, P) score_tile(R, P, keys, q_t, head_size, m_pad, s_t)
    BY_ROWS(SCORE)
#undef SCORE
}

static void weigh(int rows, int panels, const float *p_t, int64_t m_pad, const float *values, int64_t head_size,
                  int64_t count, const float *alpha, float *o) {
#define WEIGH(R, P) weigh_tile(R, P, p_t, m_pad, values, head_size, count, alpha, o)
    BY_ROWS(WEIGH)
#undef WEIGH
}

/* One key block's online-softmax step for the lanes of one vector (16 query rows): the scores s_t[lo:hi][0:16]
 * (rows m_pad apart) of key positions pos0 + t, where a row sees positions [first, visible); the rows' running max
 * and sum move to this block, the scores become the weights exp(s - max) (0 where unseen), and alpha is what the
 * rows' earlier sums are scaled by. */
static inline void softmax_block(float *s_t, int64_t m_pad, int64_t lo, int64_t hi, int64_t pos0,
                                 const float *first, const float *visible, float *max, float *sum, float *alpha) {
    const vec16 from = vload(first), to = vload(visible), old = vload(max), none = (vec16){0} - INFINITY;
    vec16 top = none;
    for (int64_t t = lo; t < hi; ++t) {
        const vec16 pos = vsplat((float)(pos0 + t));
        top = vmax(top, vselect((pos >= from) & (pos < to), vload(s_t + t * m_pad), none));
    }
    const vec16 now = vmax(old, top), scale = vexp(old - now);
    vec16 total = {0};
    for (int64_t t = lo; t < hi; ++t) {
        const vec16 pos = vsplat((float)(pos0 + t));
        const vec16 p = vselect((pos >= from) & (pos < to), vexp(vload(s_t + t * m_pad) - now), (vec16){0});
        vstore(s_t + t * m_pad, p);
        total += p;
    }
    vstore(max, now);
    vstore(sum, vload(sum) * scale + total);
    vstore(alpha, scale);
}

/* For i < num_seqs: the query rows query_starts[i] .. + query_lens[i] of sequence seqs[i], the last query_lens[i]
 * of its seq_lens[i] positions, attend causally over its cached keys (within sliding_window when > 0).
 * query, out: [num_tokens, num_heads, head_size], heads contiguous, rows query_row_stride / out_row_stride
 * elements apart; head_size a multiple of 16; caches [num_blocks, block_size, num_kv_heads, head_size] contiguous;
 * block_tables: int32 rows of block_table_stride. Returns 0, or -1 when scratch memory ran out. */
int prefill_attention(void *out, const void *query, const void *key_cache, const void *value_cache, int dtype,
                      const int32_t *block_tables, int64_t block_table_stride, const int64_t *seqs,
                      const int64_t *query_starts, const int64_t *query_lens, const int64_t *seq_lens,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                      int64_t block_size, float scale, int64_t sliding_window,
                      int64_t query_row_stride, int64_t out_row_stride, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t positions = (TASK_ROWS + group - 1) / group;  /* query positions a task */
    const int64_t m_pad = (positions * group + PANEL - 1) / PANEL * PANEL;  /* its rows, in whole panels */
    int64_t most_blocks = 0;
    for (int64_t i = 0; i < num_seqs; ++i) {
        const int64_t blocks = (query_lens[i] + positions - 1) / positions;
        most_blocks = blocks > most_blocks ? blocks : most_blocks;
    }
    const int64_t num_tasks = most_blocks * num_seqs * num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* Per thread: a key block's keys and values as float rows, the task's queries transposed, the block's
         * scores, the output transposed, per row its max, sum, rescale and visible range, and one position's
         * query rows. */
        const size_t floats = (size_t)(2 * KB * head_size + (KB + 2 * head_size + 5) * m_pad + group * head_size);
        float *scratch = malloc(floats * sizeof(float));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            if (scratch == NULL) continue;
            /* The last query blocks of every sequence first: they see the most keys. */
            const int64_t from_end = task / (num_seqs * num_kv_heads), rest = task % (num_seqs * num_kv_heads);
            const int64_t i = rest / num_kv_heads, kv_head = rest % num_kv_heads;
            const int64_t q_len = query_lens[i], blocks = (q_len + positions - 1) / positions;
            if (from_end >= blocks) continue;
            const int64_t j0 = (blocks - 1 - from_end) * positions;
            const int64_t count = q_len - j0 < positions ? q_len - j0 : positions, rows = count * group;
            const int64_t len = seq_lens[i], context = len - q_len;
            const int32_t *table = block_tables + seqs[i] * block_table_stride;
            float *keys = scratch, *values = keys + KB * head_size, *q_t = values + KB * head_size;
            float *s_t = q_t + head_size * m_pad, *o = s_t + KB * m_pad, *max = o + head_size * m_pad;
            float *sum = max + m_pad, *alpha = sum + m_pad, *first = alpha + m_pad, *visible = first + m_pad;
            float *row = visible + m_pad;  /* one position's query rows of the group */

            /* Row r is position j0 + r / group, head kv_head * group + r % group; padding rows see nothing. */
            for (int64_t r = 0; r < m_pad; ++r) {
                const int64_t seen = r < rows ? context + j0 + r / group + 1 : 0;
                visible[r] = (float)seen;
                first[r] = (float)(sliding_window > 0 && seen > sliding_window ? seen - sliding_window : 0);
                max[r] = -1e30f;  /* finite: a row with nothing seen yet rescales by e^0, not e^nan */
                sum[r] = 0.0f;
            }
            memset(q_t, 0, (size_t)(head_size * m_pad) * sizeof(float));
            memset(o, 0, (size_t)(head_size * m_pad) * sizeof(float));
            const int64_t element = dtype == DTYPE_BFLOAT16 ? 2 : 4, group_bytes = group * head_size * element;
            for (int64_t j = 0; j < count; ++j) {
                const int64_t at = (query_starts[i] + j0 + j) * query_row_stride + kv_head * group * head_size;
                /* The rows QUERY_AHEAD positions on: each position's are a stride apart, which the hardware
                 * prefetcher did not follow (the queries' loads were a fifth of the kernel's time). */
                if (j + QUERY_AHEAD < count)
                    for (int64_t byte = 0; byte < group_bytes; byte += 64)
                        __builtin_prefetch((const char *)query + (at + QUERY_AHEAD * query_row_stride) * element
                                           + byte);
                widen_row(query, dtype, at, group * head_size, row);
                for (int64_t g = 0; g < group; ++g)
                    for (int64_t d = 0; d < head_size; ++d)
                        q_t[d * m_pad + j * group + g] = row[g * head_size + d] * scale;
            }
            const int64_t key_first = (int64_t)first[0], key_end = (int64_t)visible[rows - 1];
            for (int64_t pos0 = key_first; pos0 < key_end; pos0 += KB) {
                const int64_t n = key_end - pos0 < KB ? key_end - pos0 : KB;
                for (int64_t t = 0; t < n; ++t) {
                    const int64_t at = row_offset(table, pos0 + t, block_size, num_kv_heads, kv_head, head_size);
                    widen_row(key_cache, dtype, at, head_size, keys + t * head_size);
                    widen_row(value_cache, dtype, at, head_size, values + t * head_size);
                }
                for (int64_t p0 = 0; p0 < rows; p0 += PANEL) {
                    const int panels = rows - p0 > LANES ? 2 : 1;
                    /* The keys some row of the panel sees: rows are in position order. */
                    const int64_t last = p0 + PANEL < rows ? p0 + PANEL - 1 : rows - 1;
                    int64_t lo = (int64_t)first[p0] - pos0, hi = (int64_t)visible[last] - pos0;
                    lo = lo < 0 ? 0 : lo;
                    hi = hi > n ? n : hi;
                    if (lo >= hi) continue;
                    for (int64_t t = lo; t < hi; t += TILE)
                        scores(hi - t < TILE ? (int)(hi - t) : TILE, panels, keys + t * head_size, q_t + p0, head_size,
                               m_pad, s_t + t * m_pad + p0);
                    for (int p = 0; p < panels; ++p)
                        softmax_block(s_t + p0 + p * LANES, m_pad, lo, hi, pos0, first + p0 + p * LANES,
                                      visible + p0 + p * LANES, max + p0 + p * LANES, sum + p0 + p * LANES,
                                      alpha + p0 + p * LANES);
                    const int64_t panel_rows = rows - p0 < PANEL ? rows - p0 : PANEL;
                    for (int64_t r = p0; r < p0 + panel_rows; r += TILE)
                        for (int64_t d = 0; d < head_size; d += PANEL)
                            weigh(p0 + panel_rows - r < TILE ? (int)(p0 + panel_rows - r) : TILE,
                                  head_size - d > LANES ? 2 : 1, s_t + lo * m_pad + r, m_pad,
                                  values + lo * head_size + d, head_size, hi - lo, alpha + r, o + r * head_size + d);
                }
            }
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t j = r / group, head = kv_head * group + r % group;
                const int64_t at = (query_starts[i] + j0 + j) * out_row_stride + head * head_size;
                const float inverse = 1.0f / sum[r];
                if (dtype == DTYPE_BFLOAT16) {
                    uint16_t *dst = (uint16_t *)out + at;
                    for (int64_t d = 0; d < head_size; ++d) dst[d] = float_to_bf16(o[r * head_size + d] * inverse);
                } else {
                    float *dst = (float *)out + at;
                    for (int64_t d = 0; d < head_size; ++d) dst[d] = o[r * head_size + d] * inverse;
                }
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
