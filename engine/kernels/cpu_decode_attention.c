/* Paged decode attention on the CPU: one query row per sequence against its cached keys, read in place from the
 * paged cache (no gather, no float copy of the cache), for float32 and bfloat16 caches.
 *
 * Built and called by engine/kernels/cpu_native.py (plain C through ctypes, no torch headers: it compiles in about
 * a second). Its torch reference is kernels.reference.paged_attention; tests/kernels/test_cpu_native.py compares
 * them.
 *
 * A task takes one sequence's KV heads (one, or all of them: decode_attention's notes), and for each the query heads
 * that share it (GQA) score each key row while it is in cache, then a softmax over the scores, then the value rows
 * weighted. Head sizes 64 and 128 keep those query heads' vectors and sums in registers (score_keys, weigh_values:
 * 32 sequences of 160 cached tokens, SmolLM2's heads, one layer's cache warm, 2 threads: bf16 7.5-9.1 -> 4.9 ms a
 * 30-layer step, float32 8.2-11.3 -> 4.1 ms; caches cold 9.9-10.1 -> 7.3 ms and 13.3-14.2 -> 10.4 ms); other sizes go
 * four rows at a time through a float tile. Every sum runs in float32, as the torch path's SDPA on float copies
 * does; the order of the sums differs, so results agree within float rounding.
 *
 * OpenMP: the library links libgomp.so.1 by its soname, and torch has loaded its own libgomp.so.1 first, so both
 * share one runtime and one thread pool (two pools would spin against each other on the same cores). The thread
 * count is torch's, passed in: OpenMP's own default is per calling thread, and an engine may step on another
 * thread than the one that set it.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_common.h"

/* Prefetches go a TILE of positions at a time. The tile path widens TILE rows into floats at once, so that its dot
 * products (dot4) and weighted sums run four independent chains instead of one whose every step waits on the last;
 * rows past `count` are zero. */
enum { TILE = 4, AHEAD = 4 };

/* The rows of heads [first_head, first_head + heads) at the positions AHEAD tiles after pos are requested now
 * (one contiguous run a position): rows sit in scattered blocks and a task reads only its heads' part of each slot,
 * so the hardware prefetcher does not see them coming, and each load waited on memory. Into L2, not L1
 * (prefetcht1): 32 sequences' caches of 30 layers, cold as in a decode step, took 12.7 ms against 14.9 ms with 8
 * tiles ahead into L1, and 26.8 ms with no prefetch (a /tmp script, bf16, 2 threads, a task a head). Inlined
 * before gcc's interprocedural passes look at it: a function that only prefetches counts as pure to them, and its
 * calls were deleted (no prefetch left in the library, 2.5x slower). */
static inline __attribute__((always_inline)) void prefetch_ahead(const void *cache, int dtype, const int32_t *table,
                                                                  int64_t pos, int64_t block_size,
                                                                  int64_t num_kv_heads, int64_t first_head,
                                                                  int64_t heads, int64_t head_size, int64_t end) {
    const int64_t element = dtype == DTYPE_BFLOAT16 ? 2 : 4, run_bytes = heads * head_size * element;
    for (int64_t r = pos + AHEAD * TILE; r < pos + (AHEAD + 1) * TILE && r < end; ++r) {
        const char *run = (const char *)cache + row_offset(table, r, block_size, num_kv_heads, first_head, head_size)
                                                    * element;
        for (int64_t byte = 0; byte < run_bytes; byte += 64) __builtin_prefetch(run + byte, 0, 2);
    }
}

static inline void load_tile(const void *cache, int dtype, const int32_t *table, int64_t pos, int64_t count,
                             int64_t block_size, int64_t num_kv_heads, int64_t kv_head, int64_t head_size,
                             float *restrict tile) {
    for (int64_t r = 0; r < TILE; ++r) {
        if (r < count)
            load_row(cache, dtype, row_offset(table, pos + r, block_size, num_kv_heads, kv_head, head_size),
                     head_size, tile + r * head_size);
        else
            memset(tile + r * head_size, 0, (size_t)head_size * sizeof(float));
    }
}

static inline void axpy_tile(const float *restrict weights, const float *restrict tile, int64_t head_size,
                             float *restrict acc) {
    const float *v0 = tile, *v1 = v0 + head_size, *v2 = v1 + head_size, *v3 = v2 + head_size;
    const float p0 = weights[0], p1 = weights[1], p2 = weights[2], p3 = weights[3];
#pragma omp simd
    for (int64_t d = 0; d < head_size; ++d) acc[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
}

/* Sixteen values of a row as float: bf16 widened in registers. */
static inline __attribute__((always_inline)) vec16 vload_any(const void *base, int dtype, int64_t offset) {
    if (dtype == DTYPE_BFLOAT16) {
        typedef uint16_t half16 __attribute__((vector_size(16 * sizeof(uint16_t))));
        typedef uint32_t word16 __attribute__((vector_size(16 * sizeof(uint32_t))));
        half16 h;
        memcpy(&h, (const uint16_t *)base + offset, sizeof h);
        const word16 w = __builtin_convertvector(h, word16) << 16;
        vec16 f;
        memcpy(&f, &w, sizeof f);
        return f;
    }
    return vload((const float *)base + offset);
}

/* Position pos's row of kv_head as head_size / 16 float vectors (bf16 widened in registers); at each tile's first
 * position (t a multiple of TILE) the rows AHEAD tiles on are requested. */
static inline __attribute__((always_inline)) void row_vectors(const int64_t head_size, const int dtype,
                                                              const void *cache, const int32_t *table, int64_t pos,
                                                              int64_t t, int64_t block_size, int64_t num_kv_heads,
                                                              int64_t kv_head, int64_t end, vec16 *restrict row) {
    if ((t & (TILE - 1)) == 0)
        prefetch_ahead(cache, dtype, table, pos, block_size, num_kv_heads, kv_head, 1, head_size, end);
    const int64_t offset = row_offset(table, pos, block_size, num_kv_heads, kv_head, head_size);
    for (int64_t v = 0; v < head_size / 16; ++v) row[v] = vload_any(cache, dtype, offset + 16 * v);
}

/* The register paths, head_size and dtype constants at each call site (head_size 64 or 128): up to GROUP_CHUNK of
 * the query heads that share one KV head keep their vectors in registers over all n visible rows of it, and each
 * row is widened once for them. The tile path loaded, added and stored every accumulator for each tile of four
 * rows, and widened each tile into memory first. */
enum { GROUP_CHUNK = 4 };

/* scores[g][t] = q_g . k_t for g < group. */
static inline __attribute__((always_inline)) void score_keys(
        const int64_t head_size, const int dtype, const void *cache, const int32_t *table, int64_t first, int64_t n,
        int64_t block_size, int64_t num_kv_heads, int64_t kv_head, int64_t group, const float *q, float *scores,
        int64_t score_stride, int64_t end) {
    const int64_t width = head_size / 16;
    for (int64_t g0 = 0; g0 < group; g0 += GROUP_CHUNK) {
        const int64_t heads = group - g0 < GROUP_CHUNK ? group - g0 : GROUP_CHUNK;
        vec16 qv[GROUP_CHUNK][8], row[8];
        for (int64_t g = 0; g < heads; ++g)
            for (int64_t v = 0; v < width; ++v) qv[g][v] = vload(q + (g0 + g) * head_size + 16 * v);
        for (int64_t t = 0; t < n; ++t) {
            row_vectors(head_size, dtype, cache, table, first + t, t, block_size, num_kv_heads, kv_head, end, row);
            for (int g = 0; g < GROUP_CHUNK && g < heads; ++g) {
                vec16 dot = qv[g][0] * row[0];
                for (int64_t v = 1; v < width; ++v) dot += qv[g][v] * row[v];
                float sum = 0.0f;
                for (int j = 0; j < 16; ++j) sum += dot[j];
                scores[(g0 + g) * score_stride + t] = sum;
            }
        }
    }
}

/* acc[g][0:head_size] = sum over t of scores[g][t] * v_t, for g < group. */
static inline __attribute__((always_inline)) void weigh_values(
        const int64_t head_size, const int dtype, const void *cache, const int32_t *table, int64_t first, int64_t n,
        int64_t block_size, int64_t num_kv_heads, int64_t kv_head, int64_t group, const float *scores,
        int64_t score_stride, int64_t end, float *restrict acc) {
    const int64_t width = head_size / 16;
    for (int64_t g0 = 0; g0 < group; g0 += GROUP_CHUNK) {
        const int64_t heads = group - g0 < GROUP_CHUNK ? group - g0 : GROUP_CHUNK;
        vec16 sums[GROUP_CHUNK][8], row[8];
        for (int g = 0; g < GROUP_CHUNK; ++g)
            for (int64_t v = 0; v < width; ++v) sums[g][v] = (vec16){0};
        for (int64_t t = 0; t < n; ++t) {
            row_vectors(head_size, dtype, cache, table, first + t, t, block_size, num_kv_heads, kv_head, end, row);
            for (int g = 0; g < GROUP_CHUNK && g < heads; ++g) {
                const float p = scores[(g0 + g) * score_stride + t];
                for (int64_t v = 0; v < width; ++v) sums[g][v] += p * row[v];
            }
        }
        for (int64_t g = 0; g < heads; ++g)
            for (int64_t v = 0; v < width; ++v) vstore(acc + (g0 + g) * head_size + 16 * v, sums[g][v]);
    }
}

#define SCORE_CASE(D, DTYPE) score_keys(D, DTYPE, key_cache, table, first, n, block_size, num_kv_heads, \
                                        first_head + h, group, q + h * group * head_size, scores + h * head_scores, \
                                        score_stride, len)

/* CASE(head size, dtype) with both as constants: the four shapes the register paths are built for. */
#define BY_SHAPE(CASE)                                                                                                \
    (dtype == DTYPE_BFLOAT16 ? (head_size == 64 ? CASE(64, DTYPE_BFLOAT16) : CASE(128, DTYPE_BFLOAT16))              \
                             : (head_size == 64 ? CASE(64, DTYPE_FLOAT32) : CASE(128, DTYPE_FLOAT32)))

#define WEIGH_CASE(D, DTYPE) weigh_values(D, DTYPE, value_cache, table, first, n, block_size, num_kv_heads, \
                                          first_head + h, group, scores + h * head_scores, score_stride, len, \
                                          acc + h * group * head_size)

/* s[0:n] = softmax(s[0:n]); s[n:n + TILE] = 0 (the weights of a last tile's padding rows). */
static inline void softmax(float *s, int64_t n) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t t = 0; t < n; ++t) top = s[t] > top ? s[t] : top;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n; ++t) {
        s[t] = exp_approx(s[t] - top);
        total += s[t];
    }
    const float inverse = 1.0f / total;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) s[t] *= inverse;
    for (int64_t t = n; t < n + TILE; ++t) s[t] = 0.0f;
}

/* Head sizes other than 64 and 128: four key / value rows at a time widened into `tile`, the scores by dot4 and
 * the sums by axpy_tile into `acc` in memory. */
static void score_tiles(const void *cache, int dtype, const int32_t *table, int64_t first, int64_t n, int64_t end,
                        int64_t block_size, int64_t num_kv_heads, int64_t first_head, int64_t heads, int64_t group,
                        int64_t head_size, const float *q, float *tile, float *scores, int64_t score_stride) {
    for (int64_t t = 0; t < n; t += TILE) {
        const int64_t count = n - t < TILE ? n - t : TILE;
        prefetch_ahead(cache, dtype, table, first + t, block_size, num_kv_heads, first_head, heads, head_size, end);
        for (int64_t h = 0; h < heads; ++h) {
            load_tile(cache, dtype, table, first + t, count, block_size, num_kv_heads, first_head + h, head_size,
                      tile);
            for (int64_t g = 0; g < group; ++g)
                dot4(q + (h * group + g) * head_size, tile, head_size, scores + (h * group + g) * score_stride + t);
        }
    }
}

static void weigh_tiles(const void *cache, int dtype, const int32_t *table, int64_t first, int64_t n, int64_t end,
                        int64_t block_size, int64_t num_kv_heads, int64_t first_head, int64_t heads, int64_t group,
                        int64_t head_size, const float *scores, int64_t score_stride, float *tile, float *acc) {
    memset(acc, 0, (size_t)(heads * group * head_size) * sizeof(float));
    for (int64_t t = 0; t < n; t += TILE) {
        const int64_t count = n - t < TILE ? n - t : TILE;
        prefetch_ahead(cache, dtype, table, first + t, block_size, num_kv_heads, first_head, heads, head_size, end);
        for (int64_t h = 0; h < heads; ++h) {
            load_tile(cache, dtype, table, first + t, count, block_size, num_kv_heads, first_head + h, head_size,
                      tile);
            for (int64_t g = 0; g < group; ++g)
                axpy_tile(scores + (h * group + g) * score_stride + t, tile, head_size,
                          acc + (h * group + g) * head_size);
        }
    }
}

/* out[rows[i]] = softmax(q k^T * scale) v over sequence seqs[i]'s visible keys, for i < num_seqs.
 * query, out: [num_tokens, num_heads, head_size], heads contiguous, rows query_row_stride / out_row_stride
 * elements apart (a query may be a view into the fused qkv projection's output); caches: [num_blocks, block_size,
 * num_kv_heads, head_size] contiguous; block_tables: int32 rows of block_table_stride; seq_lens: int32 per sequence
 * (the length including the query's own token); sliding_window 0 for none. A task takes heads_per_task KV heads
 * (a divisor of num_kv_heads) of one sequence: with all of them, the tile path walks the keys once for all heads, a
 * tile of positions one contiguous run of each block, where a task a head read a row in every num_kv_heads
 * (SmolLM2: 128 bytes of every 384), which the hardware prefetcher does not follow; one head a task leaves more tasks
 * when the sequences are few. Returns 0, or -1 when scratch memory ran out. */
int decode_attention(void *out, const void *query, const void *key_cache, const void *value_cache, int dtype,
                     const int32_t *block_tables, int64_t block_table_stride, const int32_t *seq_lens,
                     const int64_t *seqs, const int64_t *rows, int64_t num_seqs, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_size, int64_t block_size, int64_t max_len, float scale,
                     int64_t sliding_window, int64_t query_row_stride, int64_t out_row_stride, int64_t heads_per_task,
                     int num_threads) {
    const int64_t group = num_heads / num_kv_heads, span = heads_per_task * group * head_size;
    const int64_t tasks_per_seq = num_kv_heads / heads_per_task, num_tasks = num_seqs * tasks_per_seq;
    const int64_t score_stride = max_len + TILE, head_scores = group * score_stride;
    const int in_registers = head_size == 64 || head_size == 128;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        /* Per thread: the task's queries and output accumulators, a tile of K/V rows in float, the scores of each
         * query head (each row padded by a tile: the last tile's unused scores are written, as zero weights). */
        float *scratch = malloc((size_t)(span * 2 + TILE * head_size + heads_per_task * head_scores)
                                * sizeof(float));
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < num_tasks; ++task) {
            if (scratch == NULL) continue;
            const int64_t i = task / tasks_per_seq, first_head = task % tasks_per_seq * heads_per_task;
            const int64_t seq = seqs[i], len = seq_lens[seq];
            const int64_t first = sliding_window > 0 && len > sliding_window ? len - sliding_window : 0;
            const int64_t n = len - first;
            const int32_t *table = block_tables + seq * block_table_stride;
            float *q = scratch, *acc = q + span, *tile = acc + span, *scores = tile + TILE * head_size;
            const int64_t head_offset = first_head * group * head_size;
            load_row(query, dtype, rows[i] * query_row_stride + head_offset, span, q);
            for (int64_t j = 0; j < span; ++j) q[j] *= scale;

            if (in_registers)
                for (int64_t h = 0; h < heads_per_task; ++h) BY_SHAPE(SCORE_CASE);
            else
                score_tiles(key_cache, dtype, table, first, n, len, block_size, num_kv_heads, first_head,
                            heads_per_task, group, head_size, q, tile, scores, score_stride);
            for (int64_t r = 0; r < heads_per_task * group; ++r) softmax(scores + r * score_stride, n);
            if (in_registers)
                for (int64_t h = 0; h < heads_per_task; ++h) BY_SHAPE(WEIGH_CASE);
            else
                weigh_tiles(value_cache, dtype, table, first, n, len, block_size, num_kv_heads, first_head,
                            heads_per_task, group, head_size, scores, score_stride, tile, acc);
            if (dtype == DTYPE_BFLOAT16) {
                uint16_t *dst = (uint16_t *)out + rows[i] * out_row_stride + head_offset;
                for (int64_t j = 0; j < span; ++j) dst[j] = float_to_bf16(acc[j]);
            } else {
                memcpy((float *)out + rows[i] * out_row_stride + head_offset, acc, (size_t)span * sizeof(float));
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
