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

/* Sixteen weights widened to float: float as stored, or bf16 (exact). */
static inline v16 load_w_f32(const float *p) { return v_load(p); }
static inline v16 load_w_bf16(const uint16_t *p) {
#if defined(BF16X16) && defined(__AVX512F__)
    return load_bf16x16(p, 0xffff);
#else
    float wide[LANES];
    for (int l = 0; l < LANES; l++) wide[l] = bf16_to_f32(p[l]);
    return v_load(wide);
#endif
}
static inline float weight_f32(float w) { return w; }

#define MAX_RANK 512
#define MAX_WIDTH 65536
/* Output columns computed at once, per row block (a stack buffer of 4 x CHUNK floats). */
#define CHUNK 1024

/*
 * NR rows at once (NR = 4, 2 or 1): the weights are read once for the NR, and each row's
 * arithmetic is the same whatever NR. rows: [NR][n] in float.
 *
 * rank_products: t[q][j] = sum over i < n of rows[q][i] * A[j][i], for j < k: in 16 lanes
 * (element i into lane i % 16, one fma chain per lane), the tail in the lanes as scalars, the
 * lanes added in a fixed tree (fixed_order.h).
 *
 * column_deltas: d[q][o - o0] = sum over j < k of t[q][j] * Bt[j][o], for o in [o0, o1): one
 * fma chain over j in order from 0.
 */
#define ROW_BLOCK(NR, W, SUFFIX, LOAD_W, WEIGHT)                                                                  \
    static void rank_products_##NR##SUFFIX(const float *rows, const W *A, int64_t n, int32_t k,                 \
                                   float t[][MAX_RANK]) {                                                        \
        for (int32_t j = 0; j < k; j++) {                                                                        \
            const W *a = A + (int64_t)j * n;                                                                     \
            v16 s[NR];                                                                                           \
            for (int q = 0; q < NR; q++) s[q] = v_zero();                                                        \
            int64_t i = 0;                                                                                       \
            for (; i + LANES <= n; i += LANES) {                                                                 \
                const v16 w = LOAD_W(a + i);                                                                     \
                for (int q = 0; q < NR; q++) s[q] = v_fma_vv(v_load(rows + q * n + i), w, s[q]);                \
            }                                                                                                    \
            for (int q = 0; q < NR; q++) {                                                                       \
                float lane[LANES];                                                                               \
                v_store(lane, s[q]);                                                                             \
                for (int l = 0; i + l < n; l++) lane[l] = fmaf(rows[q * n + i + l], WEIGHT(a[i + l]), lane[l]);  \
                t[q][j] = add_lanes(lane);                                                                       \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    static void column_deltas_##NR##SUFFIX(float t[][MAX_RANK], const W *Bt, int32_t k, int64_t width, int64_t o0, \
                                   int64_t o1, float d[][CHUNK]) {                                               \
        int64_t o = o0;                                                                                          \
        for (; o + LANES <= o1; o += LANES) {                                                                    \
            v16 c[NR];                                                                                           \
            for (int q = 0; q < NR; q++) c[q] = v_zero();                                                        \
            for (int32_t j = 0; j < k; j++) {                                                                    \
                const v16 b = LOAD_W(Bt + (int64_t)j * width + o);                                               \
                for (int q = 0; q < NR; q++) c[q] = v_fma(v_broadcast(t[q][j]), b, c[q]);                        \
            }                                                                                                    \
            for (int q = 0; q < NR; q++) v_store(d[q] + (o - o0), c[q]);                                         \
        }                                                                                                        \
        for (; o < o1; o++)                                                                                      \
            for (int q = 0; q < NR; q++) {                                                                       \
                float c = 0.f;                                                                                   \
                for (int32_t j = 0; j < k; j++) c = fmaf(t[q][j], WEIGHT(Bt[(int64_t)j * width + o]), c);        \
                d[q][o - o0] = c;                                                                                \
            }                                                                                                    \
    }

ROW_BLOCK(4, float, _f32, load_w_f32, weight_f32)
ROW_BLOCK(2, float, _f32, load_w_f32, weight_f32)
ROW_BLOCK(1, float, _f32, load_w_f32, weight_f32)
ROW_BLOCK(4, uint16_t, _bf16, load_w_bf16, bf16_to_f32)
ROW_BLOCK(2, uint16_t, _bf16, load_w_bf16, bf16_to_f32)
ROW_BLOCK(1, uint16_t, _bf16, load_w_bf16, bf16_to_f32)

#define DISPATCH(SUFFIX, W)                                                                                      \
    static void rank_products##SUFFIX(int nr, const float *rows, const W *A, int64_t n, int32_t k,              \
                                      float t[][MAX_RANK]) {                                                     \
        if (nr == 4) rank_products_4##SUFFIX(rows, A, n, k, t);                                                  \
        else if (nr == 2) rank_products_2##SUFFIX(rows, A, n, k, t);                                             \
        else rank_products_1##SUFFIX(rows, A, n, k, t);                                                          \
    }                                                                                                            \
    static void column_deltas##SUFFIX(int nr, float t[][MAX_RANK], const W *Bt, int32_t k, int64_t width,       \
                                      int64_t o0, int64_t o1, float d[][CHUNK]) {                                \
        if (nr == 4) column_deltas_4##SUFFIX(t, Bt, k, width, o0, o1, d);                                        \
        else if (nr == 2) column_deltas_2##SUFFIX(t, Bt, k, width, o0, o1, d);                                   \
        else column_deltas_1##SUFFIX(t, Bt, k, width, o0, o1, d);                                                \
    }
DISPATCH(_f32, float)
DISPATCH(_bf16, uint16_t)

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
 * step whatever its number of rows, and no job waits for another. With at least four of the
 * adapter's rows per share, a share is every shares-th of those rows; with fewer, a share is
 * a range of the output columns, and each computes t itself. Either way each row's t and each
 * of its output columns are computed as above, added to y once: the same arithmetic whoever
 * computes it, in a block of any size. Returns 0, or 1 for a rank above MAX_RANK or a width
 * above MAX_WIDTH (nothing written for that one).
 */
#define LORA_ADD(NAME, T, WIDEN, NARROW, SUFFIX)                                                                 \
    int NAME(const T *x, int64_t x_stride, T *y, int64_t y_stride, int64_t rows, int64_t in,                     \
             const int32_t *slot, int32_t slots, int32_t projections, const int64_t *columns,                    \
             const T *const *a, const T *const *bt, const int32_t *rank, int threads) {                         \
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
            const T *A = a[entry], *Bt = bt[entry];                                                              \
            const int32_t k = rank[entry];                                                                       \
            const int64_t width = columns[2 * p + 1];                                                            \
            if (A == 0 || count[s] == 0) continue;                                                               \
            if (k > MAX_RANK || width > MAX_WIDTH) { bad = 1; continue; }                                        \
            const int by_rows = count[s] >= 4 * shares;                                                          \
            const int64_t from = by_rows ? 0 : width * share / shares;                                           \
            const int64_t to = by_rows ? width : width * (share + 1) / shares;                                   \
            int64_t mine[count[s]], found = 0, seen = 0;                                                         \
            for (int64_t r = 0; r < rows; r++)                                                                   \
                if (slot[r] == s && (!by_rows || seen++ % shares == share)) mine[found++] = r;                    \
            float block[4 * in], t[4][MAX_RANK], d[4][CHUNK];                                                    \
            for (int64_t g = 0; g < found;) {                                                                    \
                const int nr = found - g >= 4 ? 4 : found - g >= 2 ? 2 : 1;                                      \
                for (int q = 0; q < nr; q++)                                                                     \
                    for (int64_t i = 0; i < in; i++) block[q * in + i] = WIDEN(x[mine[g + q] * x_stride + i]);   \
                rank_products##SUFFIX(nr, block, A, in, k, t);                                                   \
                for (int64_t o0 = from; o0 < to; o0 += CHUNK) {                                                  \
                    const int64_t o1 = o0 + CHUNK < to ? o0 + CHUNK : to;                                        \
                    column_deltas##SUFFIX(nr, t, Bt, k, width, o0, o1, d);                                       \
                    for (int q = 0; q < nr; q++) {                                                               \
                        T *out = y + mine[g + q] * y_stride + columns[2 * p];                                    \
                        for (int64_t o = o0; o < o1; o++) out[o] = NARROW(WIDEN(out[o]) + d[q][o - o0]);        \
                    }                                                                                            \
                }                                                                                                \
                g += nr;                                                                                         \
            }                                                                                                    \
        }                                                                                                        \
        return bad;                                                                                              \
    }

LORA_ADD(lora_add_f32, float, widen_f32, narrow_f32, _f32)
LORA_ADD(lora_add_bf16, uint16_t, bf16_to_f32, f32_to_bf16, _bf16)

/* Either of the two by activation type (0 fp32, 1 bf16), for the decoder layer driver. */
int lora_add(int type, const void *x, int64_t x_stride, void *y, int64_t y_stride, int64_t rows, int64_t in,
             const int32_t *slot, int32_t slots, int32_t projections, const int64_t *columns, const void *const *a,
             const void *const *bt, const int32_t *rank, int threads) {
    if (type == 0)
        return lora_add_f32(x, x_stride, y, y_stride, rows, in, slot, slots, projections, columns,
                            (const float *const *)a, (const float *const *)bt, rank, threads);
    return lora_add_bf16(x, x_stride, y, y_stride, rows, in, slot, slots, projections, columns,
                         (const uint16_t *const *)a, (const uint16_t *const *)bt, rank, threads);
}
