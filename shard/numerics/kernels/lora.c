/*
 * LoRA deltas of one step, each row with its own adapter (shard.numerics.lora):
 *
 *     y[r, columns of p] += B_p (A_p x[r])      for each projection p of the group
 *
 * where A_p [rank, in] and B_p [cols, rank] (the scale folded in) are those of row r's
 * adapter, and nothing is added to a row without one. One call covers a group of
 * projections that share their input (q/k/v, gate/up: the columns of a fused product) for
 * every adapter of the step, so a step pays a call per group and layer, not per adapter.
 *
 * A row's delta depends on that row and its adapter only: both products are dot products
 * summed in 16 interleaved lanes added in a fixed tree (fixed_order.h), each row is one
 * thread's work, and nothing is shared between rows. So a request's result is the same bits
 * whatever adapters, if any, the rows beside it use.
 */
#include <stdint.h>

#include "bf16.h"
#include "fixed_order.h"
#include "simd16.h"

#define MAX_RANK 512

/* t[j] = sum over i < n of row[i] * A[j][i], for j < k: each in 16 lanes (element i into
 * lane i % 16, one fma chain per lane) added in a fixed tree. Four ranks at a time, so that
 * four chains run side by side; the arithmetic of each is that of one dot product alone. */
static void rank_products(const float *row, const float *A, int64_t n, int32_t k, float *t) {
    int32_t j = 0;
    for (; j + 4 <= k; j += 4) {
        const float *a0 = A + (int64_t)j * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
        v16 s0 = v_zero(), s1 = v_zero(), s2 = v_zero(), s3 = v_zero();
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) {
            const v16 x = v_load(row + i);
            s0 = v_fma_vv(x, v_load(a0 + i), s0);
            s1 = v_fma_vv(x, v_load(a1 + i), s1);
            s2 = v_fma_vv(x, v_load(a2 + i), s2);
            s3 = v_fma_vv(x, v_load(a3 + i), s3);
        }
        float lane[4][LANES];
        v_store(lane[0], s0), v_store(lane[1], s1), v_store(lane[2], s2), v_store(lane[3], s3);
        for (int q = 0; q < 4; q++) {
            const float *a = A + (int64_t)(j + q) * n;
            for (int l = 0; i + l < n; l++) lane[q][l] = fmaf(row[i + l], a[i + l], lane[q][l]);
            t[j + q] = add_lanes(lane[q]);
        }
    }
    for (; j < k; j++) {
        const float *a = A + (int64_t)j * n;
        v16 s = v_zero();
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) s = v_fma_vv(v_load(row + i), v_load(a + i), s);
        float lane[LANES];
        v_store(lane, s);
        for (int l = 0; i + l < n; l++) lane[l] = fmaf(row[i + l], a[i + l], lane[l]);
        t[j] = add_lanes(lane);
    }
}

/* delta[o - from] = sum over j < k of t[j] * Bt[j][o], for o in [from, to): one fma chain per
 * column, over j in order; 64 columns at a time in registers. */
static void column_deltas(const float *t, const float *Bt, int32_t k, int64_t width, int64_t from, int64_t to,
                          float *delta) {
    int64_t o = from;
    for (; o + 4 * LANES <= to; o += 4 * LANES) {
        v16 c0 = v_zero(), c1 = v_zero(), c2 = v_zero(), c3 = v_zero();
        for (int32_t j = 0; j < k; j++) {
            const float *line = Bt + (int64_t)j * width + o;
            const vb b = v_broadcast(t[j]);
            c0 = v_fma(b, v_load(line), c0);
            c1 = v_fma(b, v_load(line + LANES), c1);
            c2 = v_fma(b, v_load(line + 2 * LANES), c2);
            c3 = v_fma(b, v_load(line + 3 * LANES), c3);
        }
        float *d = delta + (o - from);
        v_store(d, c0), v_store(d + LANES, c1), v_store(d + 2 * LANES, c2), v_store(d + 3 * LANES, c3);
    }
    for (; o < to; o++) {
        float c = 0.f;
        for (int32_t j = 0; j < k; j++) c = fmaf(t[j], Bt[(int64_t)j * width + o], c);
        delta[o - from] = c;
    }
}

static inline float widen_f32(float v) { return v; }
static inline float narrow_f32(float v) { return v; }

/*
 * x: [rows, in] (row stride x_stride), y: [rows, *] (row stride y_stride), both of the type
 * T; slot[r]: row r's adapter among the step's `slots` (-1: none). For adapter s and
 * projection p of the group, table entry s * projections + p holds A [rank, in] (NULL: that
 * projection is not adapted), Bt [rank, cols] (B transposed, times the scale) and the rank;
 * columns[2p], columns[2p + 1]: where p's output starts in y and how wide it is.
 *
 * Work: one job per (adapter, projection, share), so an adapter's weights are read once per
 * step whatever its number of rows, and no job waits for another. With at least as many of
 * the adapter's rows as shares, a share is every shares-th of those rows; with fewer (one
 * stream), a share is a range of the output columns and each computes t itself. Either way
 * a row's t is A x (a dot product in lanes per rank), each output column one fma chain over t
 * in order, added to y once: the same arithmetic whoever computes it. Returns 0, or 1 for a
 * rank above MAX_RANK or a width above MAX_WIDTH (nothing written for that one).
 */
#define MAX_WIDTH 65536
#define LORA_ADD(NAME, T, WIDEN, NARROW)                                                                         \
    int NAME(const T *x, int64_t x_stride, T *y, int64_t y_stride, int64_t rows, int64_t in,                     \
             const int32_t *slot, int32_t slots, int32_t projections, const int64_t *columns,                    \
             const float *const *a, const float *const *bt, const int32_t *rank, int threads) {                 \
        if (in > MAX_WIDTH || rows <= 0 || slots <= 0) return in > MAX_WIDTH;                                    \
        int bad = 0;                                                                                             \
        const int64_t shares = threads > 0 ? threads : 1, jobs = (int64_t)slots * projections * shares;          \
        int64_t count[slots];                                                                                    \
        for (int32_t s = 0; s < slots; s++) count[s] = 0;                                                        \
        for (int64_t r = 0; r < rows; r++) if (slot[r] >= 0 && slot[r] < slots) count[slot[r]]++;               \
        _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(|:bad)")                       \
        for (int64_t job = 0; job < jobs; job++) {                                                               \
            const int32_t s = (int32_t)(job / (projections * shares));                                          \
            const int32_t p = (int32_t)(job / shares % projections);                                             \
            const int64_t share = job % shares, entry = (int64_t)s * projections + p;                            \
            const float *A = a[entry], *Bt = bt[entry];                                                          \
            const int32_t k = rank[entry];                                                                       \
            const int64_t width = columns[2 * p + 1];                                                            \
            if (A == 0 || count[s] == 0) continue;                                                               \
            if (k > MAX_RANK || width > MAX_WIDTH) { bad = 1; continue; }                                        \
            const int by_rows = count[s] >= shares;                                                              \
            const int64_t from = by_rows ? 0 : width * share / shares;                                           \
            const int64_t to = by_rows ? width : width * (share + 1) / shares;                                   \
            float row[in], t[MAX_RANK], delta[to - from + 1];                                                    \
            int64_t seen = 0;                                                                                    \
            for (int64_t r = 0; r < rows; r++) {                                                                 \
                if (slot[r] != s) continue;                                                                      \
                if (by_rows && seen++ % shares != share) continue;                                               \
                for (int64_t i = 0; i < in; i++) row[i] = WIDEN(x[r * x_stride + i]);                            \
                rank_products(row, A, in, k, t);                                                                 \
                column_deltas(t, Bt, k, width, from, to, delta);                                                 \
                T *out = y + r * y_stride + columns[2 * p];                                                      \
                for (int64_t o = from; o < to; o++) out[o] = NARROW(WIDEN(out[o]) + delta[o - from]);           \
            }                                                                                                    \
        }                                                                                                        \
        return bad;                                                                                              \
    }

LORA_ADD(lora_add_f32, float, widen_f32, narrow_f32)
LORA_ADD(lora_add_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* Either of the two by activation type (0 fp32, 1 bf16), for the decoder layer driver. */
int lora_add(int type, const void *x, int64_t x_stride, void *y, int64_t y_stride, int64_t rows, int64_t in,
             const int32_t *slot, int32_t slots, int32_t projections, const int64_t *columns, const float *const *a,
             const float *const *bt, const int32_t *rank, int threads) {
    if (type == 0)
        return lora_add_f32(x, x_stride, y, y_stride, rows, in, slot, slots, projections, columns, a, bt, rank, threads);
    return lora_add_bf16(x, x_stride, y, y_stride, rows, in, slot, slots, projections, columns, a, bt, rank, threads);
}
