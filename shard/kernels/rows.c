/*
 * Per-row reductions of a [rows, width] fp32 matrix whose result for a row depends only
 * on that row: the maximum, the log-sum-exp, and the plain sum. torch reduces a single
 * row by splitting it across threads and several rows one per thread, so a request's
 * logprob came out a bit different when it was sampled alone than when it shared the
 * step with others. Here each row is one thread's work, summed in 16 interleaved lanes
 * (element i into lane i % 16) that are then added in a fixed tree: the order depends
 * on the width only.
 *
 * exp is our own (fixed_order.h), spelled with explicit fmaf, so its vectorised and
 * scalar forms compute the same bits.
 */
#include <math.h>
#include <stdint.h>

#include "fixed_order.h"

static float row_max(const float *row, int64_t width) {
    float lane[LANES];
    for (int j = 0; j < LANES; j++) lane[j] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= width; i += LANES)
        for (int j = 0; j < LANES; j++) lane[j] = row[i + j] > lane[j] ? row[i + j] : lane[j];
    for (int j = 0; i + j < width; j++) lane[j] = row[i + j] > lane[j] ? row[i + j] : lane[j];
    float best = lane[0];
    for (int j = 1; j < LANES; j++) best = lane[j] > best ? lane[j] : best;
    return best;
}

/* sum over i of exp(row[i] - shift) (exp_shifted) or of row[i] (plain). */
static float row_sum(const float *row, int64_t width, float shift, int exp_shifted) {
    float lane[LANES] = { 0 };
    int64_t i = 0;
    if (exp_shifted) {
        for (; i + LANES <= width; i += LANES)
            for (int j = 0; j < LANES; j++) lane[j] += exp_nonpositive(row[i + j] - shift);
        for (int j = 0; i + j < width; j++) lane[j] += exp_nonpositive(row[i + j] - shift);
    } else {
        for (; i + LANES <= width; i += LANES)
            for (int j = 0; j < LANES; j++) lane[j] += row[i + j];
        for (int j = 0; i + j < width; j++) lane[j] += row[i + j];
    }
    return add_lanes(lane);
}

/* best[r] = max of row r; lse[r] = best[r] + log(sum of exp(row - best[r])). A row of -inf gives -inf. */
void rows_max_logsumexp(const float *x, int64_t rows, int64_t width, float *best, float *lse, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * width;
        const float top = row_max(row, width);
        best[r] = top;
        lse[r] = isinf(top) ? top : top + logf(row_sum(row, width, top, 1));
    }
}

/* out[r] = sum of row r. */
void rows_sum(const float *x, int64_t rows, int64_t width, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) out[r] = row_sum(x + r * width, width, 0.f, 0);
}

/* out[r][i] = exp(x[r][i] - shift[r]) (arguments clamped at -80): a row's unnormalised probabilities. */
void rows_exp_shifted(const float *x, int64_t rows, int64_t width, const float *shift, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < width; i++) out[r * width + i] = exp_nonpositive(x[r * width + i] - shift[r]);
}
