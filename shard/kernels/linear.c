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
 *          fp32 with two roundings, exactly as GGUF's de-quantization computes it (so a
 *          Q4_1 or Q8_0 checkpoint's weights come back bit for bit, and a float32 model
 *          stored this way is the float32 model), scale/offset [tiles][K / 32][TILE] fp32
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

/* One k-row of TILE quantized weights to fp32: (float)q * scale + offset, the multiply and
 * the add rounded separately (as GGUF's de-quantization; -ffp-contract=off keeps the plain
 * C form from being fused). The vector forms compute exactly the same values. */
/* AVX-512 builds (32-column tiles) use the portable loops until a machine with AVX-512 can test
 * an explicit version bit for bit. */
#if defined(__AVX2__) && TILE == 16
static inline void unpack_row(int wtype, const void *q, const float *sk, const float *ok, float *row) {
    __m256i lo, hi;
    if (wtype == INT4) {
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)q), nibble = _mm_set1_epi8(15);
        lo = _mm256_cvtepu8_epi32(_mm_and_si128(bytes, nibble));
        hi = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
    } else {
        lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
        hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)q + 8)));
    }
    _mm256_storeu_ps(row, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), _mm256_loadu_ps(sk)), _mm256_loadu_ps(ok)));
    _mm256_storeu_ps(row + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), _mm256_loadu_ps(sk + 8)),
                                            _mm256_loadu_ps(ok + 8)));
}
#else
static inline void unpack_row(int wtype, const void *q, const float *sk, const float *ok, float *row) {
    if (wtype == INT4) {
        const uint8_t *b = (const uint8_t *)q;
        for (int j = 0; j < TILE / 2; j++) row[j] = (float)(b[j] & 15) * sk[j] + ok[j];
        for (int j = 0; j < TILE / 2; j++) row[j + TILE / 2] = (float)(b[j] >> 4) * sk[j + TILE / 2] + ok[j + TILE / 2];
    } else {
        const int8_t *b = (const int8_t *)q;
        for (int j = 0; j < TILE; j++) row[j] = (float)b[j] * sk[j] + ok[j];
    }
}
#endif

static void unpack_quantized(const Weights *wt, int64_t t, int64_t K, float *buf) {
    const float *scale = wt->scales + t * (K / GROUP) * TILE, *offset = wt->offsets + t * (K / GROUP) * TILE;
    const int64_t row_bytes = wt->wtype == INT4 ? TILE / 2 : TILE;
    const uint8_t *q = (const uint8_t *)wt->packed + t * K * row_bytes;
    for (int64_t k = 0; k < K; k++)
        unpack_row(wt->wtype, q + k * row_bytes, scale + (k / GROUP) * TILE, offset + (k / GROUP) * TILE, buf + k * TILE);
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
            const float *w = tile_weights(&wt, t, K, buf);
            const int64_t col0 = t * TILE, cols = N - col0 < TILE ? N - col0 : TILE;
            for (int64_t m = 0; m < M; m += MR) {
                const int rows = (int)(M - m < MR ? M - m : MR);
                rows_tile(rows, xf + m * K, K, w, c);
                store_rows(rows, c, bias, col0, cols, N, ytype, y, m);
            }
        }
        free(buf);
    }
    free(owned);
    return failed ? -2 : 0;
}
