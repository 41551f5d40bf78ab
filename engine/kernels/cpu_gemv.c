/* float32 linear layers of up to a few dozen rows (decode steps) on the CPU: y = x w^T (+ bias).
 *
 * Built and called by engine/kernels/cpu_native.py; its torch reference is F.linear (kernels.reference.linear),
 * which tests/kernels/test_cpu_native.py compares it with. A float32 F.linear of one row goes to MKL's sgemm, which
 * read the weights at 11-15 GB/s on the 2-core machine where this loop reads 28-37 GB/s: a decode step reads every
 * weight once, so that is the step's time. Up to a few dozen rows the weights, read once from memory, still bound
 * it (cpu_native.GEMV_MAX_ROWS). (bf16 linears keep oneDNN on weights reordered for it at load.)
 *
 * Output channels are shared out among the threads four at a time: four weight rows streamed side by side against
 * each input row, four independent sums. The sums run in another order than MKL's, so results agree within float
 * rounding, not to the bit.
 */

#include <stdint.h>

#include "cpu_common.h"

void gemv_f32(float *y, const float *x, const float *w, const float *bias, int64_t rows, int64_t n, int64_t k,
              int64_t x_row_stride, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t j = 0; j < n; j += 4) {
        const int64_t count = n - j < 4 ? n - j : 4;
        for (int64_t m = 0; m < rows; ++m) {
            const float *xm = x + m * x_row_stride;
            float *ym = y + m * n + j;
            if (count == 4) {
                dot4(xm, w + j * k, k, ym);
            } else {
                for (int64_t r = 0; r < count; ++r) {
                    const float *wr = w + (j + r) * k;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t i = 0; i < k; ++i) s += wr[i] * xm[i];
                    ym[r] = s;
                }
            }
            if (bias != 0)
                for (int64_t r = 0; r < count; ++r) ym[r] += bias[j + r];
        }
    }
}
