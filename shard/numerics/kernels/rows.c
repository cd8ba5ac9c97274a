/*
 * Per-row reductions of a [rows, width] fp32 matrix whose result for a row depends only
 * on that row: the maximum and where it is, the log-sum-exp, and the plain sum. torch
 * reduces a single row by splitting it across threads and several rows one per thread, so a request's
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

/* The row's maximum, NaNs aside, and where it first is (*at; 0 for a row of -inf): each
 * lane keeps its first maximum (strictly greater replaces), and of the lanes holding the
 * row's maximum the smallest position wins. Positions fit in int32: a vocabulary is < 2^31. */
static float row_max_at(const float *row, int64_t width, int64_t *at) {
    float lane[LANES];
    int32_t where[LANES] = { 0 };
    for (int j = 0; j < LANES; j++) lane[j] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= width; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const int greater = row[i + j] > lane[j];
            lane[j] = greater ? row[i + j] : lane[j];
            where[j] = greater ? (int32_t)(i + j) : where[j];
        }
    for (int j = 0; i + j < width; j++)
        if (row[i + j] > lane[j]) {
            lane[j] = row[i + j];
            where[j] = (int32_t)(i + j);
        }
    float best = lane[0];
    for (int j = 1; j < LANES; j++) best = lane[j] > best ? lane[j] : best;
    int64_t first = width;
    for (int j = 0; j < LANES; j++)
        if (lane[j] == best && where[j] < first) first = where[j];
    *at = first < width ? first : 0;
    return best;
}

/* torch.max counts a NaN as the maximum: moves *at to the row's first NaN, if it has one. */
static void take_first_nan(const float *row, int64_t width, int64_t *at) {
    for (int64_t i = 0; i < width; i++)
        if (isnan(row[i])) {
            *at = i;
            return;
        }
}

/* Whether the row holds a NaN or an infinity (x - x is NaN for both, 0 otherwise). */
static int row_has_nan_or_inf(const float *row, int64_t width) {
    float lane[LANES] = { 0 };
    int64_t i = 0;
    for (; i + LANES <= width; i += LANES)
        for (int j = 0; j < LANES; j++) lane[j] += row[i + j] - row[i + j];
    for (int j = 0; i + j < width; j++) lane[j] += row[i + j] - row[i + j];
    return isnan(add_lanes(lane));
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

/* best[r] = max of row r; lse[r] = best[r] + log(sum of exp(row - best[r])); index[r] = where
 * row r first holds its maximum (greedy decoding's token, found while the row is in cache).
 * A row of -inf gives -inf (index 0). A NaN makes lse NaN and index the first NaN's. */
void rows_max_logsumexp(const float *x, int64_t rows, int64_t width, float *best, float *lse, int64_t *index,
                        int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * width;
        const float top = row_max_at(row, width, &index[r]);
        best[r] = top;
        lse[r] = isinf(top) ? top : top + logf(row_sum(row, width, top, 1));
        /* A NaN poisons the sum (exp of NaN is NaN), so only such rows, and those whose
         * infinite maximum skipped the sum, pay the scan for a first NaN. */
        if (isnan(lse[r]) || isinf(top)) take_first_nan(row, width, &index[r]);
    }
}

/* index[r] = where row r first holds its maximum (a NaN counting as the maximum). */
void rows_argmax(const float *x, int64_t rows, int64_t width, int64_t *index, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * width;
        row_max_at(row, width, &index[r]);
        if (row_has_nan_or_inf(row, width)) take_first_nan(row, width, &index[r]);
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
