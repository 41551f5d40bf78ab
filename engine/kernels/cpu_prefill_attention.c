/* Paged causal attention for prefills on the CPU: each sequence's new query rows against its cached keys (its
 * earlier context and the chunk's own rows, stored before the attention runs), read from the paged cache, for
 * float32 and bfloat16 caches.
 *
 * Built and called by engine/kernels/cpu_native.py; its torch reference is kernels.reference.paged_attention,
 * which tests/kernels/test_cpu_native.py compares it with. The torch path gathers the blocks, widens them to float32
 * and runs SDPA, whose CPU kernel ran SmolLM2-135M's 128-token prefills at 40-50 GFLOP/s: 14-23% of a bf16
 * prefill step.
 *
 * One task per (sequence, KV head): its keys are copied once, transposed, into [head_size, keys] floats and its
 * values into rows of floats; then for each query row of each head of the group, the scores of 64 keys at a time
 * are 4 vector accumulators over head_size broadcast multiply-adds (no horizontal sums), only over the keys the row
 * sees (causal, and the sliding window), a softmax, and the weighted sum of value rows four at a time. Sums in
 * float32 as the torch path's SDPA on float copies; in another order, so results agree within float rounding.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

#define LANES 16 /* floats in a vec16 */
#define CHUNK (4 * LANES) /* keys scored at once: four vector accumulators */


/* scores[h][0:n] = q[h] . keys_t[:, 0:n] for the HEADS query rows q[h] (head_size apart) and score rows scores[h]
 * (score_stride apart); keys_t rows key_stride apart. Every key vector loaded serves HEADS rows. Whole chunks are
 * scored, so up to n rounded up to CHUNK must be readable; the scores past n are left for the caller to ignore. */
static inline __attribute__((always_inline)) void score_rows(int heads, const float *restrict q,
                                                              const float *restrict keys_t, int64_t key_stride,
                                                              int64_t head_size, int64_t n, float *restrict scores,
                                                              int64_t score_stride) {
    for (int64_t t = 0; t < n; t += CHUNK) {
        vec16 acc[4][4];
#pragma GCC unroll 4
        for (int h = 0; h < heads; ++h) acc[h][0] = acc[h][1] = acc[h][2] = acc[h][3] = (vec16){0};
        for (int64_t d = 0; d < head_size; ++d) {
            const float *k = keys_t + d * key_stride + t;
            const vec16 k0 = vload(k), k1 = vload(k + LANES), k2 = vload(k + 2 * LANES), k3 = vload(k + 3 * LANES);
#pragma GCC unroll 4
            for (int h = 0; h < heads; ++h) {
                const vec16 qd = (vec16){0} + q[h * head_size + d];
                acc[h][0] += qd * k0;
                acc[h][1] += qd * k1;
                acc[h][2] += qd * k2;
                acc[h][3] += qd * k3;
            }
        }
#pragma GCC unroll 4
        for (int h = 0; h < heads; ++h)
            for (int c = 0; c < 4; ++c) vstore(scores + h * score_stride + t + c * LANES, acc[h][c]);
    }
}

static void score_heads(int heads, const float *q, const float *keys_t, int64_t key_stride, int64_t head_size,
                        int64_t n, float *scores, int64_t score_stride) {
    switch (heads) {
        case 1: score_rows(1, q, keys_t, key_stride, head_size, n, scores, score_stride); break;
        case 2: score_rows(2, q, keys_t, key_stride, head_size, n, scores, score_stride); break;
        case 3: score_rows(3, q, keys_t, key_stride, head_size, n, scores, score_stride); break;
        default: score_rows(4, q, keys_t, key_stride, head_size, n, scores, score_stride); break;
    }
}

/* p[0:n] = exp(p[0:n] - max(p[0:n])); returns their sum, by which the weighted sum is divided once (softmax's
 * normalization, without a pass over p). p is written up to n rounded up to LANES (whole vectors: remainder loops
 * of scalar exps cost more than the vectors did), its tail set to -inf first, whose exp (clamped, ~1e-38) adds
 * nothing the sum can hold. */
static inline float softmax_numerators(float *p, int64_t n) {
    const int64_t padded = (n + LANES - 1) / LANES * LANES;
    for (int64_t t = n; t < padded; ++t) p[t] = -INFINITY;
    float top[LANES];
    vec16 total = {0};
    for (int l = 0; l < LANES; ++l) top[l] = -INFINITY;
    for (int64_t t = 0; t < padded; t += LANES)
        for (int l = 0; l < LANES; ++l) top[l] = p[t + l] > top[l] ? p[t + l] : top[l];
    float most = top[0];
    for (int l = 1; l < LANES; ++l) most = top[l] > most ? top[l] : most;
    for (int64_t t = 0; t < padded; t += LANES) {
        float e[LANES];
        for (int l = 0; l < LANES; ++l) e[l] = exp_approx(p[t + l] - most);
        const vec16 v = vload(e);
        vstore(p + t, v);
        total += v;
    }
    float sum = 0.0f;
    for (int l = 0; l < LANES; ++l) sum += total[l];
    return sum;
}

/* acc[0:head_size] = sum over t < n of p[t] * values[t] (rows head_size apart, a multiple of LANES): 64 values of
 * the row at a time in registers, even and odd rows in two sets of accumulators (two chains, not one, wait on the
 * multiply-adds' latency). */
static inline void weighted_sum(const float *restrict p, const float *restrict values, int64_t n, int64_t head_size,
                                float *restrict acc) {
    for (int64_t d0 = 0; d0 < head_size; d0 += CHUNK) {
        const int parts = head_size - d0 < CHUNK ? (int)((head_size - d0) / LANES) : 4;
        vec16 even[4] = {{0}, {0}, {0}, {0}}, odd[4] = {{0}, {0}, {0}, {0}};
        int64_t t = 0;
        for (; t + 2 <= n; t += 2) {
            const vec16 p0 = (vec16){0} + p[t], p1 = (vec16){0} + p[t + 1];
            const float *v0 = values + t * head_size + d0, *v1 = v0 + head_size;
            for (int c = 0; c < parts; ++c) {
                even[c] += p0 * vload(v0 + c * LANES);
                odd[c] += p1 * vload(v1 + c * LANES);
            }
        }
        if (t < n) {
            const vec16 p0 = (vec16){0} + p[t];
            for (int c = 0; c < parts; ++c) even[c] += p0 * vload(values + t * head_size + d0 + c * LANES);
        }
        for (int c = 0; c < parts; ++c) vstore(acc + d0 + c * LANES, even[c] + odd[c]);
    }
}

/* For i < num_seqs: the query rows query_starts[i] .. + query_lens[i] of sequence seqs[i], the last query_lens[i]
 * of its seq_lens[i] positions, attend causally over its cached keys (within sliding_window when > 0).
 * query, out: [num_tokens, num_heads, head_size], heads contiguous, rows query_row_stride / out_row_stride
 * elements apart; caches [num_blocks, block_size, num_kv_heads, head_size] contiguous; block_tables: int32 rows of
 * block_table_stride; max_len: the most positions any of the sequences has. Returns 0, or -1 when scratch memory ran
 * out. */
int prefill_attention(void *out, const void *query, const void *key_cache, const void *value_cache, int dtype,
                      const int32_t *block_tables, int64_t block_table_stride, const int64_t *seqs,
                      const int64_t *query_starts, const int64_t *query_lens, const int64_t *seq_lens,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                      int64_t block_size, int64_t max_len, float scale, int64_t sliding_window,
                      int64_t query_row_stride, int64_t out_row_stride, int num_threads) {
    const int64_t group = num_heads / num_kv_heads, num_tasks = num_seqs * num_kv_heads;
    /* A row's keys start up to its window's offset into the task's: a chunk past them still lies within the row. */
    const int64_t key_stride = (max_len + CHUNK - 1) / CHUNK * CHUNK + CHUNK;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* Per thread: the task's keys transposed, its values, one row's scores and query of each head of the
         * group, an output row. */
        const size_t floats = (size_t)(head_size * key_stride + max_len * head_size + group * key_stride
                                       + (group + 1) * head_size);
        float *scratch = malloc(floats * sizeof(float));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            if (scratch == NULL) continue;
            float *keys_t = scratch, *values = keys_t + head_size * key_stride, *scores = values + max_len * head_size;
            float *q = scores + group * key_stride, *acc = q + group * head_size;
            const int64_t i = task / num_kv_heads, kv_head = task % num_kv_heads;
            const int64_t len = seq_lens[i], q_len = query_lens[i], context = len - q_len;
            const int32_t *table = block_tables + seqs[i] * block_table_stride;
            /* The first key any row of the chunk sees: its first row's window start. */
            const int64_t first = sliding_window > 0 && context + 1 > sliding_window ? context + 1 - sliding_window : 0;
            const int64_t num_keys = len - first;
            /* The keys as rows first (in the values' place), then transposed a dimension at a time: each store
             * then follows the last, where a key at a time scattered its values over head_size cache lines. */
            for (int64_t t = 0; t < num_keys; ++t)
                load_row(key_cache, dtype, row_offset(table, first + t, block_size, num_kv_heads, kv_head, head_size),
                         head_size, values + t * head_size);
            for (int64_t d = 0; d < head_size; ++d)
                for (int64_t t = 0; t < num_keys; ++t) keys_t[d * key_stride + t] = values[t * head_size + d];
            for (int64_t t = 0; t < num_keys; ++t)
                load_row(value_cache, dtype, row_offset(table, first + t, block_size, num_kv_heads, kv_head, head_size),
                         head_size, values + t * head_size);
            for (int64_t j = 0; j < q_len; ++j) {
                const int64_t visible = context + j + 1;  /* positions 0 .. context + j */
                const int64_t row_first = sliding_window > 0 && visible > sliding_window ? visible - sliding_window
                                                                                        : 0;
                const int64_t skip = row_first - first, n = visible - row_first;
                load_row(query, dtype, (query_starts[i] + j) * query_row_stride + kv_head * group * head_size,
                         group * head_size, q);
                for (int64_t d = 0; d < group * head_size; ++d) q[d] *= scale;
                for (int64_t g = 0; g < group; g += 4) {
                    const int heads = group - g < 4 ? (int)(group - g) : 4;
                    score_heads(heads, q + g * head_size, keys_t + skip, key_stride, head_size, n,
                                scores + g * key_stride, key_stride);
                }
                for (int64_t g = 0; g < group; ++g) {
                    const int64_t head = kv_head * group + g;
                    const float inverse = 1.0f / softmax_numerators(scores + g * key_stride, n);
                    weighted_sum(scores + g * key_stride, values + skip * head_size, n, head_size, acc);
                    for (int64_t d = 0; d < head_size; ++d) acc[d] *= inverse;
                    const int64_t at = (query_starts[i] + j) * out_row_stride + head * head_size;
                    if (dtype == DTYPE_BFLOAT16) {
                        uint16_t *dst = (uint16_t *)out + at;
                        for (int64_t d = 0; d < head_size; ++d) dst[d] = float_to_bf16(acc[d]);
                    } else {
                        memcpy((float *)out + at, acc, (size_t)head_size * sizeof(float));
                    }
                }
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
