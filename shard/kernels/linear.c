/*
 * Linear layers whose results do not depend on the step: y = x W^T + b where every
 * output element y[m, n] is one fused multiply-add chain over k = 0, 1, ..., K-1,
 * started from 0 and rounded once at the end, whatever M is, whichever row of the
 * step m is, and however many threads run. That is the invariant the shard's
 * reproducibility rests on: a request's logits never depend on its batch companions
 * or on how its prompt was chunked. Library GEMMs switch kernels and K-blocking with
 * M (a one-row product is a GEMV with split accumulators, a 512-row one a blocked
 * GEMM), so the same row comes out differently in a decode step and in a prefill.
 *
 * Why it is still fast: the work is split over tiles of output columns only (never
 * over K); a tile's weights are unpacked once to fp32 in a per-thread buffer that
 * stays in L1/L2, and MR rows at a time stream past it with MR x TILE accumulators in
 * registers (the classic register-blocked microkernel). Rows and threads change the
 * order in which elements are computed, never the order of the terms of one element.
 *
 * Layouts:
 *   x      [M, K] row-major, fp32 or bf16 (converted to fp32 once per call)
 *   packed [N / TILE rounded up][K][TILE] in the storage type, columns past N zero;
 *          TILE is what linear_tile_columns() returns for this build. Storage types:
 *          fp32, bf16, and the quantized ones, whose weight is (q * scale) + offset in
 *          fp32 as GGUF's de-quantization computes it (so a Q4_1 or Q8_0 checkpoint's
 *          weights come back bit for bit, and a float32 model stored this way is the
 *          float32 model). Every scale has few enough significant bits that q * scale is
 *          exact (shard/quantization.py guarantees it), so one fused multiply-add gives
 *          the bits of GGUF's multiply-then-add. scale/offset [tiles][K / 32][TILE] fp32
 *          (groups of 32 along K): INT4 q in 0..15, [tiles][K][TILE / 2] bytes, byte j
 *          holding column j (low nibble) and column j + TILE / 2 (high nibble), so that
 *          each half unpacks with contiguous vector loads and stores; INT8 q in
 *          -128..127, [tiles][K][TILE]. The weights are unpacked to fp32 before
 *          any product, so a quantized layer computes with the same values at every step
 *          size (no kernel switch by size, as library int4 kernels need).
 *   bias   [N] fp32 or NULL (added after the chain)
 *   y      [M, N] row-major, fp32 or bf16 (round to nearest even)
 *
 * Built at run time by shard/kernels/__init__.py for the host (-march=native). The
 * arithmetic is spelled with explicit FMA intrinsics (or fmaf), so no compiler flag
 * can reassociate it, and built with -ffp-contract=off, so that a written a * b + c
 * stays two roundings.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd16.h"

/* TILE = 16 * PANELS columns per tile; MR rows per microkernel call. */
#if defined(__AVX512F__)
#define PANELS 2
#define MR 12
#elif defined(__AVX2__) && defined(__FMA__)
#define PANELS 1
#define MR 6
#else
#define PANELS 1
#define MR 4
#endif
#define TILE (16 * PANELS)

int linear_tile_columns(void) { return TILE; }

/* c[r][0..TILE) = sum over k of x[r][k] * w[k][0..TILE), for rows r < ROWS; one FMA chain per element. */
static inline __attribute__((always_inline)) void microkernel(const int rows, const float *x, int64_t K,
                                                              const float *w, float *c) {
    v16 acc[MR][PANELS];
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int p = 0; p < PANELS; p++) acc[r][p] = v_zero();
    for (int64_t k = 0; k < K; k++) {
        v16 wk[PANELS];
#pragma GCC unroll 4
        for (int p = 0; p < PANELS; p++) wk[p] = v_load(w + k * TILE + p * 16);
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++) {
            const vb xr = v_broadcast(x[(int64_t)r * K + k]);
#pragma GCC unroll 4
            for (int p = 0; p < PANELS; p++) acc[r][p] = v_fma(xr, wk[p], acc[r][p]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int p = 0; p < PANELS; p++) v_store(c + r * TILE + p * 16, acc[r][p]);
}

/* One call per row count, each with its loops fully unrolled and its accumulators in registers. */
#define ROWS_CASE(R) case R: microkernel(R, x, K, w, c); break;
static void rows_tile(int rows, const float *x, int64_t K, const float *w, float *c) {
    switch (rows) {
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#if MR > 4
        ROWS_CASE(5) ROWS_CASE(6)
#endif
#if MR > 6
        ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12)
#endif
        default: break;
    }
}

enum { F32 = 0, BF16 = 1, INT4 = 2, INT8 = 3 };
#define GROUP 32

typedef struct {
    const void *packed;
    const float *scales, *offsets; /* quantized types only */
    int wtype;
} Weights;

/* One k-row of TILE quantized weights to fp32: fma((float)q, scale, offset), which equals
 * GGUF's (q * scale) + offset because the product is exact (see the layouts above); one
 * instruction instead of two on the path a one-row step is bound by. The vector forms
 * compute exactly the same values. */
/* AVX-512 builds (32-column tiles) use the portable loops until a machine with AVX-512 can test
 * an explicit version bit for bit. */
#if defined(__AVX2__) && TILE == 16
static inline __attribute__((always_inline)) v16 quantized_row_with(int wtype, const void *q, v16 scale, v16 offset) {
    __m256i lo, hi;
    if (wtype == INT4) {
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)q), nibble = _mm_set1_epi8(15);
        lo = _mm256_cvtepu8_epi32(_mm_and_si128(bytes, nibble));
        hi = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
    } else {
        lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
        hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)q + 8)));
    }
    v16 w = { _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), scale.lo, offset.lo),
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), scale.hi, offset.hi) };
    return w;
}

static inline __attribute__((always_inline)) v16 quantized_row(int wtype, const void *q, const float *sk,
                                                               const float *ok) {
    return quantized_row_with(wtype, q, v_load(sk), v_load(ok));
}

static inline __attribute__((always_inline)) v16 bf16_row(const uint16_t *src) {
    const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src));
    const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 8)));
    v16 w = { _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)) };
    return w;
}

static inline void unpack_row(int wtype, const void *q, const float *sk, const float *ok, float *row) {
    v_store(row, quantized_row(wtype, q, sk, ok));
}
#else
static inline void unpack_row(int wtype, const void *q, const float *sk, const float *ok, float *row) {
    if (wtype == INT4) {
        const uint8_t *b = (const uint8_t *)q;
        for (int j = 0; j < TILE / 2; j++) row[j] = fmaf((float)(b[j] & 15), sk[j], ok[j]);
        for (int j = 0; j < TILE / 2; j++) row[j + TILE / 2] = fmaf((float)(b[j] >> 4), sk[j + TILE / 2], ok[j + TILE / 2]);
    } else {
        const int8_t *b = (const int8_t *)q;
        for (int j = 0; j < TILE; j++) row[j] = fmaf((float)b[j], sk[j], ok[j]);
    }
}
#endif

/* Where tile t's weights start: values (in the storage type) and, quantized, its groups' scales
 * and offsets. */
typedef struct {
    const void *values;
    const float *scales, *offsets;
} TileStart;

static inline TileStart tile_start(const Weights *wt, int64_t t, int64_t K) {
    TileStart s = { NULL, NULL, NULL };
    if (wt->wtype == F32) s.values = (const float *)wt->packed + t * K * TILE;
    else if (wt->wtype == BF16) s.values = (const uint16_t *)wt->packed + t * K * TILE;
    else {
        s.values = (const uint8_t *)wt->packed + t * K * (wt->wtype == INT4 ? TILE / 2 : TILE);
        s.scales = wt->scales + t * (K / GROUP) * TILE;
        s.offsets = wt->offsets + t * (K / GROUP) * TILE;
    }
    return s;
}

/* Weights k of a tile as fp32 in registers: the very values tile_weights() writes to its buffer. */
static inline __attribute__((always_inline)) void k_row(const int wtype, const TileStart *s, int64_t k,
                                                        v16 w[PANELS]) {
    if (wtype == F32) {
#pragma GCC unroll 4
        for (int p = 0; p < PANELS; p++) w[p] = v_load((const float *)s->values + k * TILE + p * 16);
        return;
    }
#if defined(__AVX2__) && TILE == 16
    if (wtype == BF16) {
        w[0] = bf16_row((const uint16_t *)s->values + k * TILE);
    } else {
        const int64_t row_bytes = wtype == INT4 ? TILE / 2 : TILE, group = (k / GROUP) * TILE;
        w[0] = quantized_row(wtype, (const uint8_t *)s->values + k * row_bytes, s->scales + group,
                             s->offsets + group);
    }
#else
    float row[TILE];
    if (wtype == BF16) {
        for (int j = 0; j < TILE; j++) row[j] = bf16_to_f32(((const uint16_t *)s->values)[k * TILE + j]);
    } else {
        const int64_t row_bytes = wtype == INT4 ? TILE / 2 : TILE, group = (k / GROUP) * TILE;
        unpack_row(wtype, (const uint8_t *)s->values + k * row_bytes, s->scales + group, s->offsets + group, row);
    }
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; p++) w[p] = v_load(row + p * 16);
#endif
}

static void unpack_quantized(const Weights *wt, int64_t t, int64_t K, float *buf) {
    const TileStart s = tile_start(wt, t, K);
    const int64_t row_bytes = wt->wtype == INT4 ? TILE / 2 : TILE;
    for (int64_t k = 0; k < K; k++)
        unpack_row(wt->wtype, (const uint8_t *)s.values + k * row_bytes, s.scales + (k / GROUP) * TILE,
                   s.offsets + (k / GROUP) * TILE, buf + k * TILE);
}

/* Tile t of the weights as fp32 [K][TILE]: in place for fp32, unpacked into buf otherwise. */
static const float *tile_weights(const Weights *wt, int64_t t, int64_t K, float *buf) {
    const int64_t n = K * TILE;
    if (wt->wtype == F32) return (const float *)wt->packed + t * n;
    if (wt->wtype == BF16) {
        const uint16_t *src = (const uint16_t *)wt->packed + t * n;
        for (int64_t i = 0; i < n; i++) buf[i] = bf16_to_f32(src[i]);
    } else {
        unpack_quantized(wt, t, K, buf);
    }
    return buf;
}

/* Quantized weights stream from memory in three arrays per tile (values, scales, offsets), too
 * many concurrent streams for the hardware prefetcher when several tiles run at once: ask
 * for the lines a few groups ahead (called every 8 rows of k: one 64-byte line of 4-bit values). */
#define PREFETCH_ROWS 64
static inline __attribute__((always_inline)) void prefetch_ahead(const int wtype, const TileStart *s, int64_t k,
                                                                 int64_t K) {
    const int64_t ahead = k + PREFETCH_ROWS;
    if (ahead >= K) return;
    const int64_t row_bytes = wtype == INT4 ? TILE / 2 : TILE;
    const char *q = (const char *)s->values + ahead * row_bytes;
    for (int64_t b = 0; b < 8 * row_bytes; b += 64) __builtin_prefetch(q + b);
    if (ahead % GROUP == 0) {
        __builtin_prefetch(s->scales + (ahead / GROUP) * TILE);
        __builtin_prefetch(s->offsets + (ahead / GROUP) * TILE);
    }
}

/*
 * Steps of a few rows (decode of a few sequences): no buffer. Each k-row of G tiles is
 * unpacked in registers and used at once by every row, so the weights are read once from
 * memory and nothing is written back; G tiles at a time give G x PANELS x rows independent
 * FMA chains, enough to hide the FMA latency even for one row (one tile's two chains would
 * leave the core waiting on them). Every element is still one chain over k = 0, 1, ..., K-1
 * from 0 with the values tile_weights() gives, so the bits equal the buffered path's.
 * c[(j * rows + r) * TILE ...]: row r of tile t0 + j.
 */
#define SMALL_ROWS 4
static inline __attribute__((always_inline)) void few_rows_tiles(const int rows, const int g, const int wtype,
                                                                 const Weights *wt, int64_t t0, const float *x,
                                                                 int64_t K, float *c) {
    v16 acc[SMALL_ROWS][8][PANELS];
    TileStart start[8];
#pragma GCC unroll 8
    for (int j = 0; j < g; j++) start[j] = tile_start(wt, t0 + j, K);
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
        for (int j = 0; j < g; j++)
#pragma GCC unroll 8
            for (int p = 0; p < PANELS; p++) acc[r][j][p] = v_zero();
#if defined(__AVX2__) && TILE == 16
    if (wtype >= INT4) {
        /* A group's scales and offsets stay in registers for its 32 rows of k. */
        const int64_t row_bytes = wtype == INT4 ? TILE / 2 : TILE;
        for (int64_t k0 = 0; k0 < K; k0 += GROUP) {
            v16 scale[8], offset[8];
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) {
                scale[j] = v_load(start[j].scales + (k0 / GROUP) * TILE);
                offset[j] = v_load(start[j].offsets + (k0 / GROUP) * TILE);
            }
            for (int64_t k = k0; k < k0 + GROUP; k++) {
                if (k % 8 == 0) {
#pragma GCC unroll 8
                    for (int j = 0; j < g; j++) prefetch_ahead(wtype, &start[j], k, K);
                }
                vb xr[SMALL_ROWS];
#pragma GCC unroll 8
                for (int r = 0; r < rows; r++) xr[r] = v_broadcast(x[(int64_t)r * K + k]);
#pragma GCC unroll 8
                for (int j = 0; j < g; j++) {
                    const v16 w = quantized_row_with(wtype, (const uint8_t *)start[j].values + k * row_bytes, scale[j],
                                                     offset[j]);
#pragma GCC unroll 8
                    for (int r = 0; r < rows; r++) acc[r][j][0] = v_fma(xr[r], w, acc[r][j][0]);
                }
            }
        }
    } else
#endif
    for (int64_t k = 0; k < K; k++) {
        if (wtype >= INT4 && k % 8 == 0) {
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) prefetch_ahead(wtype, &start[j], k, K);
        }
        vb xr[SMALL_ROWS];
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) xr[r] = v_broadcast(x[(int64_t)r * K + k]);
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) {
            v16 w[PANELS];
            k_row(wtype, &start[j], k, w);
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
                for (int p = 0; p < PANELS; p++) acc[r][j][p] = v_fma(xr[r], w[p], acc[r][j][p]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < g; j++)
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
            for (int p = 0; p < PANELS; p++) v_store(c + (j * rows + r) * TILE + p * 16, acc[r][j][p]);
}

/* Tiles grouped per row count: 2 x PANELS chains for one row (of 2, 3, 4 and 8 tiles, 2 and 3
 * were fastest on a 2-core AVX2 EPYC: 30 layers of SmolLM2 at one row, cold weights), fewer
 * tiles as rows grow. */
#define ONE_ROW_TILES 2
static inline int tiles_per_group(int rows) { return rows == 1 ? ONE_ROW_TILES : rows == 2 ? 2 : 1; }

#define FEW_CASE(R, G, T) case (R) * 64 + (G) * 8 + (T): few_rows_tiles(R, G, T, wt, t0, x, K, c); break;
#define FEW_TYPES(R, G) FEW_CASE(R, G, F32) FEW_CASE(R, G, BF16) FEW_CASE(R, G, INT4) FEW_CASE(R, G, INT8)
static void few_rows(int rows, int g, const Weights *wt, int64_t t0, const float *x, int64_t K, float *c) {
    switch (rows * 64 + g * 8 + wt->wtype) {
        FEW_TYPES(1, ONE_ROW_TILES) FEW_TYPES(1, 1) FEW_TYPES(2, 2) FEW_TYPES(2, 1) FEW_TYPES(3, 1) FEW_TYPES(4, 1)
        default: break;
    }
}

static void store_rows(int rows, const float *c, const float *bias, int64_t col0, int64_t cols, int64_t N,
                       int ytype, void *y, int64_t row0) {
    for (int r = 0; r < rows; r++) {
        const float *cr = c + r * TILE;
        if (ytype == F32) {
            float *yr = (float *)y + (row0 + r) * N + col0;
            for (int64_t j = 0; j < cols; j++) yr[j] = bias ? cr[j] + bias[col0 + j] : cr[j];
        } else {
            uint16_t *yr = (uint16_t *)y + (row0 + r) * N + col0;
            for (int64_t j = 0; j < cols; j++) yr[j] = f32_to_bf16(bias ? cr[j] + bias[col0 + j] : cr[j]);
        }
    }
}

/* x fp32 [M, K] for the microkernel: the input itself, or a converted copy in *owned. */
static const float *rows_as_f32(const void *x, int xtype, int64_t M, int64_t K, float **owned) {
    *owned = NULL;
    if (xtype == F32) return (const float *)x;
    float *f = malloc(sizeof(float) * M * K);
    if (!f) return NULL;
    const uint16_t *src = (const uint16_t *)x;
    for (int64_t i = 0; i < M * K; i++) f[i] = bf16_to_f32(src[i]);
    *owned = f;
    return f;
}

/* Steps of more rows: each tile unpacked once into a per-thread buffer, MR rows at a time past it. */
static int buffered_tiles(const Weights *wt, const float *xf, const float *bias, void *y, int ytype, int64_t M,
                          int64_t K, int64_t N, int threads) {
    const int64_t tiles = (N + TILE - 1) / TILE;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = malloc(sizeof(float) * (K * TILE + MR * TILE));
        if (!buf) failed = 1;
        float *c = buf ? buf + K * TILE : NULL;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (!buf) continue;
            const float *w = tile_weights(wt, t, K, buf);
            const int64_t col0 = t * TILE, cols = N - col0 < TILE ? N - col0 : TILE;
            for (int64_t m = 0; m < M; m += MR) {
                const int rows = (int)(M - m < MR ? M - m : MR);
                rows_tile(rows, xf + m * K, K, w, c);
                store_rows(rows, c, bias, col0, cols, N, ytype, y, m);
            }
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/* M <= SMALL_ROWS: groups of tiles_per_group(M) tiles split over the threads, no buffer. */
static void unbuffered_tiles(const Weights *wt, const float *xf, const float *bias, void *y, int ytype, int M,
                             int64_t K, int64_t N, int threads) {
    const int64_t tiles = (N + TILE - 1) / TILE, per_group = tiles_per_group(M);
    const int64_t groups = (tiles + per_group - 1) / per_group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t group = 0; group < groups; group++) {
        float c[SMALL_ROWS * 8 * TILE];
        const int64_t t0 = group * per_group;
        const int g = (int)(tiles - t0 < per_group ? tiles - t0 : per_group);
        if (g == per_group) few_rows(M, g, wt, t0, xf, K, c);
        else
            for (int j = 0; j < g; j++) few_rows(M, 1, wt, t0 + j, xf, K, c + j * M * TILE);
        for (int j = 0; j < g; j++) {
            const int64_t col0 = (t0 + j) * TILE, cols = N - col0 < TILE ? N - col0 : TILE;
            store_rows(M, c + j * M * TILE, bias, col0, cols, N, ytype, y, 0);
        }
    }
}

/* Returns 0, or a negative status (-1 bad arguments, -2 out of memory). */
int invariant_linear(const void *x, int xtype, const void *packed, int wtype, const float *scales,
                     const float *offsets, const float *bias, void *y, int ytype, int64_t M, int64_t K, int64_t N,
                     int threads) {
    if (M < 0 || K < 1 || N < 1 || xtype < F32 || xtype > BF16 || ytype < F32 || ytype > BF16) return -1;
    if (wtype < F32 || wtype > INT8 || (wtype >= INT4 && (K % GROUP || !scales || !offsets))) return -1;
    const Weights wt = { packed, scales, offsets, wtype };
    if (M == 0) return 0;
    float *owned;
    const float *xf = rows_as_f32(x, xtype, M, K, &owned);
    if (!xf) return -2;
    int status = 0;
    if (M <= SMALL_ROWS) unbuffered_tiles(&wt, xf, bias, y, ytype, (int)M, K, N, threads);
    else status = buffered_tiles(&wt, xf, bias, y, ytype, M, K, N, threads);
    free(owned);
    return status;
}
