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
 *          exact (shard/numerics/quantization.py guarantees it), so one fused multiply-add gives
 *          the bits of GGUF's multiply-then-add. scale/offset [tiles][K / 32][TILE] fp32
 *          (groups of 32 along K): INT4 q in 0..15, [tiles][K][TILE / 2] bytes, byte j
 *          holding column j (low nibble) and column j + TILE / 2 (high nibble), so that
 *          each half unpacks with contiguous vector loads and stores; INT8 q in
 *          -128..127, [tiles][K][TILE] (INT8_G16: the same in groups of 16). The k-quants
 *          K4, K5, K6 (GGUF's Q4_K, Q5_K, Q6_K as the file stores them): unsigned values of
 *          4, 5 or 6 bits, each k-row the INT4 nibble plane then the bits past 4 of every
 *          column (column c at bit h * c, little-endian), and instead of scales and offsets
 *          one block of factors per tile (kquant_start) from which each group's scale and
 *          offset are computed, exactly, as it is read. The weights are unpacked to fp32
 *          before any product, so a quantized layer computes with the same values at every
 *          step size (no kernel switch by size, as library int4 kernels need).
 *   bias   [N] fp32 or NULL (added after the chain)
 *   y      [M, N] row-major, fp32 or bf16 (round to nearest even)
 *   residual [M, N] like y, or NULL: added to the rounded result and rounded again (store_rows)
 *
 * Built at run time by shard/numerics/kernels/__init__.py for the host (-march=native). The
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

/* K4, K5, K6: GGUF's k-quants (Q4_K, Q5_K, Q6_K) as they are stored, see kquant_start(). */
enum { F32 = 0, BF16 = 1, INT4 = 2, INT8 = 3, INT8_G16 = 4, K4 = 5, K5 = 6, K6 = 7 };
#define GROUP 32
#define SUPER 256 /* weights of a k-quant super-block: one pair of float16 factors */

static inline __attribute__((always_inline)) int is_kquant(int wtype) { return wtype >= K4; }

/* Weights per scale and offset: 32, or 16 (INT8_G16, K6: GGUF's Q6_K sub-blocks). */
static inline __attribute__((always_inline)) int64_t group_of(int wtype) {
    return wtype == INT8_G16 || wtype == K6 ? 16 : GROUP;
}

/* Bits of a k-quant value past its low nibble: 0, 1 (K5) or 2 (K6). */
static inline __attribute__((always_inline)) int high_bits(int wtype) { return wtype == K5 ? 1 : wtype == K6 ? 2 : 0; }

/* Bytes of one k-row of a tile's values: a nibble plane (4-bit types), then the high bits' plane. */
static inline __attribute__((always_inline)) int64_t row_bytes_of(int wtype) {
    if (wtype == INT4 || is_kquant(wtype)) return TILE / 2 + TILE * high_bits(wtype) / 8;
    return TILE;
}

typedef struct {
    const void *packed;
    const float *scales, *offsets; /* INT4, INT8, INT8_G16; k-quants: scales is their factors' bytes */
    int wtype;
} Weights;

/* A group's scales or offsets ([TILE] fp32) as PANELS vectors. */
static inline __attribute__((always_inline)) void load_panels(const float *src, v16 v[PANELS]) {
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; p++) v[p] = v_load(src + p * 16);
}

/* One k-row of TILE quantized weights to fp32: fma((float)q, scale, offset), which equals
 * GGUF's (q * scale) + offset because the product is exact (see the layouts above); one
 * instruction instead of two on the path a one-row step is bound by. The vector forms (AVX2:
 * one panel of 16 columns; AVX-512: two) compute exactly the values of the portable loop. */
#if (defined(__AVX512F__) && TILE == 32) || (defined(__AVX2__) && TILE == 16)
#define EXPLICIT_UNPACK 1
#if defined(__AVX512F__)
/* One k-row's integer values q, one 32-bit lane a column: v[0] columns 0-15, v[1] 16-31. */
static inline __attribute__((always_inline)) void quantized_ints(int wtype, const void *q, __m512i v[2]) {
    __m512i a, b; /* columns 0-15 and 16-31 */
    if (wtype == INT4 || is_kquant(wtype)) { /* byte j: column j in the low nibble, column j + 16 in the high one */
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
        a = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
        b = _mm512_srli_epi32(bytes, 4);
        const int h = high_bits(wtype);
        if (h) { /* then h bits a column, column c of a panel at bit h * c of its 16h-bit word */
            const uint8_t *plane = (const uint8_t *)q + TILE / 2;
            uint32_t w0 = 0, w1 = 0;
            memcpy(&w0, plane, (size_t)(2 * h));
            memcpy(&w1, plane + 2 * h, (size_t)(2 * h));
            const __m512i shifts = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                      _mm512_set1_epi32(h));
            const __m512i mask = _mm512_set1_epi32((1 << h) - 1);
            a = _mm512_or_si512(a, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)w0), shifts), mask), 4));
            b = _mm512_or_si512(b, _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)w1), shifts), mask), 4));
        }
    } else {
        a = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q));
        b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)q + 16)));
    }
    v[0] = a;
    v[1] = b;
}

static inline __attribute__((always_inline)) void quantized_panels(int wtype, const void *q, const v16 *scale,
                                                                   const v16 *offset, v16 w[PANELS]) {
    __m512i v[2];
    quantized_ints(wtype, q, v);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v[0]), scale[0], offset[0]);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v[1]), scale[1], offset[1]);
}

static inline __attribute__((always_inline)) void bf16_panels(const uint16_t *src, v16 w[PANELS]) {
    for (int p = 0; p < PANELS; p++) {
        const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + p * 16)));
        w[p] = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
    }
}
#else
/* One k-row's integer values q, one 32-bit lane a column: v[0] columns 0-7, v[1] 8-15. */
static inline __attribute__((always_inline)) void quantized_ints(int wtype, const void *q, __m256i v[2]) {
    __m256i lo, hi;
    if (wtype == INT4 || is_kquant(wtype)) {
        const __m128i bytes = _mm_loadl_epi64((const __m128i *)q), nibble = _mm_set1_epi8(15);
        lo = _mm256_cvtepu8_epi32(_mm_and_si128(bytes, nibble));
        hi = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
        const int h = high_bits(wtype);
        if (h) { /* then h bits a column, column c at bit h * c of one 16h-bit word */
            uint32_t word = 0;
            memcpy(&word, (const uint8_t *)q + TILE / 2, (size_t)(2 * h));
            const __m256i all = _mm256_set1_epi32((int)word), mask = _mm256_set1_epi32((1 << h) - 1);
            const __m256i steps = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(h));
            const __m256i high_steps = _mm256_add_epi32(steps, _mm256_set1_epi32(8 * h));
            lo = _mm256_or_si256(lo, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(all, steps), mask), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(all, high_steps), mask), 4));
        }
    } else {
        lo = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
        hi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)q + 8)));
    }
    v[0] = lo;
    v[1] = hi;
}

static inline __attribute__((always_inline)) void quantized_panels(int wtype, const void *q, const v16 *scale,
                                                                   const v16 *offset, v16 w[PANELS]) {
    __m256i v[2];
    quantized_ints(wtype, q, v);
    v16 r = { _mm256_fmadd_ps(_mm256_cvtepi32_ps(v[0]), scale[0].lo, offset[0].lo),
              _mm256_fmadd_ps(_mm256_cvtepi32_ps(v[1]), scale[0].hi, offset[0].hi) };
    w[0] = r;
}

static inline __attribute__((always_inline)) void bf16_panels(const uint16_t *src, v16 w[PANELS]) {
    const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src));
    const __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 8)));
    v16 r = { _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)) };
    w[0] = r;
}
#endif

static inline void unpack_row(int wtype, const void *q, const float *sk, const float *ok, float *row) {
    v16 scale[PANELS], offset[PANELS], w[PANELS];
    load_panels(sk, scale);
    load_panels(ok, offset);
    quantized_panels(wtype, q, scale, offset, w);
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; p++) v_store(row + p * 16, w[p]);
}
#else
static inline void unpack_row(int wtype, const void *q, const float *sk, const float *ok, float *row) {
    if (wtype == INT4 || is_kquant(wtype)) {
        const uint8_t *b = (const uint8_t *)q, *plane = b + TILE / 2;
        const int h = high_bits(wtype);
        for (int j = 0; j < TILE; j++) {
            int v = j < TILE / 2 ? b[j] & 15 : b[j - TILE / 2] >> 4;
            if (h) v |= ((plane[j * h / 8] >> (j * h % 8)) & ((1 << h) - 1)) << 4;
            row[j] = fmaf((float)v, sk[j], ok[j]);
        }
    } else {
        const int8_t *b = (const int8_t *)q;
        for (int j = 0; j < TILE; j++) row[j] = fmaf((float)b[j], sk[j], ok[j]);
    }
}

/* The panels' form of unpack_row(), for the few-rows path's group loop. */
static inline void quantized_panels(int wtype, const void *q, const v16 *scale, const v16 *offset, v16 w[PANELS]) {
    float sk[TILE], ok[TILE], row[TILE];
    for (int p = 0; p < PANELS; p++) {
        v_store(sk + p * 16, scale[p]);
        v_store(ok + p * 16, offset[p]);
    }
    unpack_row(wtype, q, sk, ok, row);
    for (int p = 0; p < PANELS; p++) w[p] = v_load(row + p * 16);
}
#endif

/* Where tile t's weights start: values (in the storage type) and, quantized, its groups' scales
 * and offsets. */
typedef struct {
    const void *values;
    const float *scales, *offsets; /* INT4, INT8, INT8_G16: [K / group][TILE] */
    const uint16_t *d, *m;         /* k-quants: [K / SUPER][TILE] float16 factors of scale and offset */
    const int8_t *sc, *mc;         /* k-quants: [K / group][TILE] multipliers of d and m */
} TileStart;

/*
 * A k-quant tile's factors, in one block of bytes per tile: d and m, then sc and mc. Group g's
 * scale is d[g / (SUPER / group)] * sc[g] and its offset m[...] * mc[g], both products exact
 * in fp32 (an 11-bit float16 times an integer of at most 8 bits): GGUF's d * scale and
 * dmin * min of Q4_K and Q5_K (mc = -min), and Q6_K's d * scale with the values' -32 in the
 * offset (m = -32 d, mc = scale), so that every value is unsigned. 4.6 (Q4_K), 5.6 (Q5_K)
 * and 7.1 (Q6_K) bits a weight against the file's 4.5, 5.5 and 6.56.
 */
static inline int64_t kquant_tile_bytes(int wtype, int64_t K) {
    return (K / SUPER) * TILE * 2 * (int64_t)sizeof(uint16_t) + (K / group_of(wtype)) * TILE * 2;
}

static inline void kquant_start(const Weights *wt, int64_t t, int64_t K, TileStart *s) {
    const int64_t supers = (K / SUPER) * TILE, groups = (K / group_of(wt->wtype)) * TILE;
    const uint8_t *block = (const uint8_t *)wt->scales + t * kquant_tile_bytes(wt->wtype, K);
    s->d = (const uint16_t *)block;
    s->m = s->d + supers;
    s->sc = (const int8_t *)(s->m + supers);
    s->mc = s->sc + groups;
}

static inline TileStart tile_start(const Weights *wt, int64_t t, int64_t K) {
    TileStart s = { NULL, NULL, NULL, NULL, NULL, NULL, NULL };
    if (wt->wtype == F32) s.values = (const float *)wt->packed + t * K * TILE;
    else if (wt->wtype == BF16) s.values = (const uint16_t *)wt->packed + t * K * TILE;
    else {
        s.values = (const uint8_t *)wt->packed + t * K * row_bytes_of(wt->wtype);
        if (is_kquant(wt->wtype)) kquant_start(wt, t, K, &s);
        else {
            s.scales = wt->scales + t * (K / group_of(wt->wtype)) * TILE;
            s.offsets = wt->offsets + t * (K / group_of(wt->wtype)) * TILE;
        }
    }
    return s;
}

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023;
    float magnitude;
    if (exponent == 0) magnitude = ldexpf((float)mantissa, -24); /* zero and subnormals: exact */
    else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;
    else magnitude = ldexpf((float)(mantissa | 1024), (int)exponent - 25);
    uint32_t bits;
    memcpy(&bits, &magnitude, sizeof bits);
    bits |= sign;
    memcpy(&magnitude, &bits, sizeof bits);
    return magnitude;
}

/* Group gi of a quantized tile: its scales and offsets [TILE], stored or (k-quants) computed into
 * sk and ok from the factors. */
static inline __attribute__((always_inline)) void group_scales(const int wtype, const TileStart *s, int64_t gi,
                                                               float *sk, float *ok, const float **scales,
                                                               const float **offsets) {
    if (!is_kquant(wtype)) {
        *scales = s->scales + gi * TILE;
        *offsets = s->offsets + gi * TILE;
        return;
    }
    const uint16_t *d = s->d + (gi * group_of(wtype) / SUPER) * TILE, *m = s->m + (gi * group_of(wtype) / SUPER) * TILE;
    const int8_t *sc = s->sc + gi * TILE, *mc = s->mc + gi * TILE;
#if defined(__AVX512F__)
    for (int p = 0; p < TILE; p += 16) {
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + p)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + p)));
        const __m512 scv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sc + p))));
        const __m512 mcv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(mc + p))));
        _mm512_storeu_ps(sk + p, _mm512_mul_ps(dv, scv));
        _mm512_storeu_ps(ok + p, _mm512_mul_ps(mv, mcv));
    }
#elif defined(__AVX2__) && defined(__F16C__)
    for (int p = 0; p < TILE; p += 8) {
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + p)));
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + p)));
        const __m256 scv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + p))));
        const __m256 mcv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(mc + p))));
        _mm256_storeu_ps(sk + p, _mm256_mul_ps(dv, scv));
        _mm256_storeu_ps(ok + p, _mm256_mul_ps(mv, mcv));
    }
#else
    for (int j = 0; j < TILE; j++) {
        sk[j] = half_to_float(d[j]) * (float)sc[j];
        ok[j] = half_to_float(m[j]) * (float)mc[j];
    }
#endif
    *scales = sk;
    *offsets = ok;
}

/* Row k of a plain (fp32 or bf16) tile as fp32 in registers: the very values tile_weights() writes
 * to its buffer. Quantized tiles are read a group at a time (few_rows_tiles). */
static inline __attribute__((always_inline)) void k_row(const int wtype, const TileStart *s, int64_t k,
                                                        v16 w[PANELS]) {
    if (wtype == F32) {
#pragma GCC unroll 4
        for (int p = 0; p < PANELS; p++) w[p] = v_load((const float *)s->values + k * TILE + p * 16);
        return;
    }
#if defined(EXPLICIT_UNPACK)
    bf16_panels((const uint16_t *)s->values + k * TILE, w);
#else
    float row[TILE];
    for (int j = 0; j < TILE; j++) row[j] = bf16_to_f32(((const uint16_t *)s->values)[k * TILE + j]);
    load_panels(row, w);
#endif
}

static void unpack_quantized(const Weights *wt, int64_t t, int64_t K, float *buf) {
    const TileStart s = tile_start(wt, t, K);
    const int64_t row_bytes = row_bytes_of(wt->wtype), group = group_of(wt->wtype);
    for (int64_t k0 = 0; k0 < K; k0 += group) {
        float sk[TILE], ok[TILE];
        const float *scales, *offsets;
        group_scales(wt->wtype, &s, k0 / group, sk, ok, &scales, &offsets);
        for (int64_t k = k0; k < k0 + group; k++)
            unpack_row(wt->wtype, (const uint8_t *)s.values + k * row_bytes, scales, offsets, buf + k * TILE);
    }
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
    const int64_t row_bytes = row_bytes_of(wtype);
    const char *q = (const char *)s->values + ahead * row_bytes;
    for (int64_t b = 0; b < 8 * row_bytes; b += 64) __builtin_prefetch(q + b);
    const int64_t group = group_of(wtype);
    if (ahead % group != 0) return;
    if (is_kquant(wtype)) { /* a group's multipliers: TILE bytes each */
        __builtin_prefetch(s->sc + (ahead / group) * TILE);
        __builtin_prefetch(s->mc + (ahead / group) * TILE);
        if (ahead % SUPER == 0) {
            __builtin_prefetch(s->d + (ahead / SUPER) * TILE);
            __builtin_prefetch(s->m + (ahead / SUPER) * TILE);
        }
    } else {
        __builtin_prefetch(s->scales + (ahead / group) * TILE);
        __builtin_prefetch(s->offsets + (ahead / group) * TILE);
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
    if (wtype >= INT4) {
        /* A group's scales and offsets stay in registers for its rows of k. */
        const int64_t row_bytes = row_bytes_of(wtype), group = group_of(wtype);
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            v16 scale[8][PANELS], offset[8][PANELS];
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) {
                float sk[TILE], ok[TILE];
                const float *scales, *offsets;
                group_scales(wtype, &start[j], k0 / group, sk, ok, &scales, &offsets);
                load_panels(scales, scale[j]);
                load_panels(offsets, offset[j]);
            }
            for (int64_t k = k0; k < k0 + group; k++) {
                if (k % 8 == 0) {
#pragma GCC unroll 8
                    for (int j = 0; j < g; j++) prefetch_ahead(wtype, &start[j], k, K);
                }
                vb xr[SMALL_ROWS];
#pragma GCC unroll 8
                for (int r = 0; r < rows; r++) xr[r] = v_broadcast(x[(int64_t)r * K + k]);
#pragma GCC unroll 8
                for (int j = 0; j < g; j++) {
                    v16 w[PANELS];
                    quantized_panels(wtype, (const uint8_t *)start[j].values + k * row_bytes, scale[j], offset[j], w);
#pragma GCC unroll 8
                    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
                        for (int p = 0; p < PANELS; p++) acc[r][j][p] = v_fma(xr[r], w[p], acc[r][j][p]);
                }
            }
        }
    } else
    for (int64_t k = 0; k < K; k++) {
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

/* Tiles grouped per row count: 2 x PANELS chains for one row, fewer tiles as rows grow
 * (docs/performance.md, "Linear kernel work split"). */
#define ONE_ROW_TILES 2
static inline int tiles_per_group(int rows) { return rows == 1 ? ONE_ROW_TILES : rows == 2 ? 2 : 1; }

#define FEW_CASE(R, G, T) case (R) * 64 + (G) * 8 + (T): few_rows_tiles(R, G, T, wt, t0, x, K, c); break;
#define FEW_TYPES(R, G)                                                                                   \
    FEW_CASE(R, G, F32) FEW_CASE(R, G, BF16) FEW_CASE(R, G, INT4) FEW_CASE(R, G, INT8) FEW_CASE(R, G, INT8_G16) \
    FEW_CASE(R, G, K4) FEW_CASE(R, G, K5) FEW_CASE(R, G, K6)
static void few_rows(int rows, int g, const Weights *wt, int64_t t0, const float *x, int64_t K, float *c) {
    switch (rows * 64 + g * 8 + wt->wtype) {
        FEW_TYPES(1, ONE_ROW_TILES) FEW_TYPES(1, 1) FEW_TYPES(2, 2) FEW_TYPES(2, 1) FEW_TYPES(3, 1) FEW_TYPES(4, 1)
        default: break;
    }
}

/* Where a call's results go: y [M, N] in ytype, plus bias [N] (fp32) and residual [M, N] (ytype)
 * where given. */
typedef struct {
    void *y;
    const float *bias;
    const void *residual;
    int ytype;
    int64_t N;
} Output;

/* y = (c + bias) rounded to ytype, then residual + y rounded again: the very bits of adding the
 * residual to the layer's output tensor afterwards (as x + layer(h) does), in one pass. */
static void store_rows(const Output *o, int rows, const float *c, int64_t col0, int64_t cols, int64_t row0) {
    const float *bias = o->bias;
    for (int r = 0; r < rows; r++) {
        const float *cr = c + r * TILE;
        const int64_t at = (row0 + r) * o->N + col0;
        if (o->ytype == F32) {
            float *yr = (float *)o->y + at;
            const float *res = o->residual ? (const float *)o->residual + at : NULL;
            for (int64_t j = 0; j < cols; j++) {
                const float v = bias ? cr[j] + bias[col0 + j] : cr[j];
                yr[j] = res ? res[j] + v : v;
            }
        } else {
            uint16_t *yr = (uint16_t *)o->y + at;
            const uint16_t *res = o->residual ? (const uint16_t *)o->residual + at : NULL;
#if defined(BF16X16)
            for (int64_t j = 0; j < cols; j += 16) {
                const __mmask16 m = cols - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - j)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(m, cr + j);
                if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + col0 + j));
                __m512i bits = bf16_bits_x16(v);
                if (res) {
                    const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
                    bits = bf16_bits_x16(_mm512_add_ps(load_bf16x16(res + j, m), y));
                }
                store_bf16x16(yr + j, m, bits);
            }
            continue;
#endif
            for (int64_t j = 0; j < cols; j++) {
                const uint16_t v = f32_to_bf16(bias ? cr[j] + bias[col0 + j] : cr[j]);
                yr[j] = res ? f32_to_bf16(bf16_to_f32(res[j]) + bf16_to_f32(v)) : v;
            }
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

/* Steps of more rows: each tile unpacked once into a per-thread buffer, MR rows at a time past it.
 *
 * Tiles are handed out guided (large contiguous runs first, single tiles at the end) rather than
 * in two fixed halves: a thread preempted by the router or the facade, which share these cores,
 * no longer holds up the other one at the end of the layer, and each thread still streams long
 * contiguous runs of weights. Which thread computes a tile never changes its bits
 * (docs/performance.md, "Linear kernel work split"). */
static int buffered_tiles(const Weights *wt, const float *xf, const Output *o, int64_t M, int64_t K, int threads) {
    const int64_t N = o->N;
    const int64_t tiles = (N + TILE - 1) / TILE;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = malloc(sizeof(float) * (K * TILE + MR * TILE));
        if (!buf) failed = 1;
        float *c = buf ? buf + K * TILE : NULL;
#pragma omp for schedule(guided)
        for (int64_t t = 0; t < tiles; t++) {
            if (!buf) continue;
            const float *w = tile_weights(wt, t, K, buf);
            const int64_t col0 = t * TILE, cols = N - col0 < TILE ? N - col0 : TILE;
            for (int64_t m = 0; m < M; m += MR) {
                const int rows = (int)(M - m < MR ? M - m : MR);
                rows_tile(rows, xf + m * K, K, w, c);
                store_rows(o, rows, c, col0, cols, m);
            }
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/*
 * bf16 activations on CPUs with AVX512-BF16: the products by VDPBF16PS, which adds two exact
 * bf16 products to each fp32 lane (in the order the CPU defines) per
 * instruction: twice the multiply-adds of an fp32 FMA, and half the bytes in a tile buffer.
 * The order is as fixed as the fp32 path's, the same at every step size, row and thread count:
 *   bf16 weights: each element is one VDPBF16PS chain over the pairs (k, k + 1), k = 0, 2, ...,
 *     K - 2, started from 0;
 *   4-/8-bit weights: per group of 32 k, G = such a chain over its 16 pairs with the integer
 *     q values (exact in bf16), then acc = fma(scale, G, acc) and acc = fma(offset, S, acc),
 *     group after group from acc = 0, S the group's sum of x (fp32, k ascending): the sum of
 *     x (q scale + offset) regrouped; the weights are still exactly GGUF's.
 * Only for bf16 activations (exact in bf16: nothing is rounded on the way in) and even K; the
 * packed layouts are the ones above, paired up as they are read.
 */
#if defined(__AVX512BF16__) && TILE == 32
#define BF16_DOT 1

static inline __attribute__((always_inline)) __m512 dot_pairs(__m512 acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
}

/* Word indices: pairs (row k, row k + 1) of one panel from two 32-column rows (bf16), or from the
 * 32 words of two 16-byte rows (4-bit: word i of row k, word 16 + i of row k + 1). */
static const uint16_t BF16_PANEL_PAIRS[2][32] = {
    { 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47 },
    { 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63 },
};
static const uint16_t BYTE_PAIRS[32] = { 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                         8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31 };
/* bf16 bits of 0, 1, ..., 15: a 4-bit value to bf16 is one word permutation. */
static const uint16_t NIBBLE_BF16[32] = { 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                          0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170 };

/* Two int8 rows of 16 columns to (row k, row k + 1) bf16 pairs: ints of 8 bits are exact in
 * fp32 and in its upper half. */
static inline __attribute__((always_inline)) __m512i int8_pairs(const int8_t *even, const int8_t *odd) {
    const __m512i a = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)even))));
    const __m512i b = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)odd))));
    return _mm512_or_si512(_mm512_srli_epi32(a, 16), _mm512_and_si512(b, _mm512_set1_epi32((int)0xffff0000u)));
}

/* Rows k and k + 1 (k even) of a tile as bf16 pairs, one vector per panel of 16 columns. */
static inline __attribute__((always_inline)) void pair_rows(const int wtype, const TileStart *s, int64_t k,
                                                            __m512i w[2]) {
    if (wtype == BF16) {
        const uint16_t *v = (const uint16_t *)s->values + k * TILE;
        const __m512i a = _mm512_loadu_si512(v), b = _mm512_loadu_si512(v + TILE);
        w[0] = _mm512_permutex2var_epi16(a, _mm512_loadu_si512(BF16_PANEL_PAIRS[0]), b);
        w[1] = _mm512_permutex2var_epi16(a, _mm512_loadu_si512(BF16_PANEL_PAIRS[1]), b);
    } else if (wtype == INT4) {
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)((const uint8_t *)s->values + k * (TILE / 2)));
        const __m512i paired = _mm512_permutexvar_epi16(_mm512_loadu_si512(BYTE_PAIRS), _mm512_cvtepu8_epi16(bytes));
        const __m512i table = _mm512_loadu_si512(NIBBLE_BF16);
        w[0] = _mm512_permutexvar_epi16(_mm512_and_si512(paired, _mm512_set1_epi16(15)), table);
        w[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(paired, 4), table);
    } else {
        const int8_t *v = (const int8_t *)s->values + k * TILE;
        w[0] = int8_pairs(v, v + TILE);
        w[1] = int8_pairs(v + 16, v + TILE + 16);
    }
}

/* S: each row's sum over each group of 32 x (fp32, k ascending), [rows][K / GROUP].
 * Sixteen groups at a time, one per lane: lane j adds the x of its group in k order, from 0, so
 * every sum is the same chain of additions as one group alone (a group's sum in one lane would
 * wait on each addition in turn; across groups they are independent). */
static void group_sums(const uint16_t *x, int64_t rows, int64_t K, float *sums, int threads) {
    const int64_t groups = K / GROUP;
    /* Byte offsets of the 32-bit word holding x[k], x[k + 1] of groups g0 .. g0 + 15. */
    const __m512i words = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(GROUP * 2));
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * K;
        int64_t g0 = 0;
        for (; g0 + 16 <= groups; g0 += 16) {
            __m512 s = _mm512_setzero_ps();
            for (int k = 0; k < GROUP; k += 2) {
                const __m512i pair = _mm512_i32gather_epi32(words, xr + g0 * GROUP + k, 1);
                s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)));
                s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_and_si512(pair, high)));
            }
            _mm512_storeu_ps(sums + r * groups + g0, s);
        }
        for (; g0 < groups; g0++) {
            float s = 0.f;
            for (int k = 0; k < GROUP; k++) s += bf16_to_f32(xr[g0 * GROUP + k]);
            sums[r * groups + g0] = s;
        }
    }
}

static inline __attribute__((always_inline)) __m512i x_pair(const uint16_t *x, int64_t r, int64_t K, int64_t k) {
    uint32_t pair;
    memcpy(&pair, x + r * K + k, sizeof pair);
    return _mm512_set1_epi32((int)pair);
}

/* acc = fma(scale, G, acc), then fma(offset, S, acc): the end of one group of a quantized layer. */
static inline __attribute__((always_inline)) __m512 group_end(__m512 acc, __m512 g, const float *scale,
                                                              const float *offset, float sum) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(scale), g, acc);
    return _mm512_fmadd_ps(_mm512_loadu_ps(offset), _mm512_set1_ps(sum), acc);
}

/* few_rows_tiles() on bf16 pairs: the k-rows of G tiles paired in registers, no buffer. */
static inline __attribute__((always_inline)) void few_rows_dot_tiles(const int rows, const int g, const int wtype,
                                                                     const Weights *wt, int64_t t0, const uint16_t *x,
                                                                     const float *sums, int64_t K, float *c) {
    __m512 acc[SMALL_ROWS][8][2], part[SMALL_ROWS][8][2];
    TileStart start[8];
#pragma GCC unroll 8
    for (int j = 0; j < g; j++) start[j] = tile_start(wt, t0 + j, K);
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_ps();
    const int64_t span = wtype == BF16 ? K : GROUP; /* k-rows per chain */
    for (int64_t k0 = 0; k0 < K; k0 += span) {
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) part[r][j][0] = part[r][j][1] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k0 + span; k += 2) {
            if (wtype != BF16 && k % 8 == 0) {
#pragma GCC unroll 8
                for (int j = 0; j < g; j++) prefetch_ahead(wtype, &start[j], k, K);
            }
            __m512i xr[SMALL_ROWS];
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++) xr[r] = x_pair(x, r, K, k);
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) {
                __m512i w[2];
                pair_rows(wtype, &start[j], k, w);
#pragma GCC unroll 8
                for (int r = 0; r < rows; r++) {
                    part[r][j][0] = dot_pairs(part[r][j][0], xr[r], w[0]);
                    part[r][j][1] = dot_pairs(part[r][j][1], xr[r], w[1]);
                }
            }
        }
        if (wtype == BF16) {
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++)
#pragma GCC unroll 8
                for (int j = 0; j < g; j++) acc[r][j][0] = part[r][j][0], acc[r][j][1] = part[r][j][1];
            break;
        }
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) {
            const int64_t at = (k0 / GROUP) * TILE;
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
                for (int p = 0; p < 2; p++)
                    acc[r][j][p] = group_end(acc[r][j][p], part[r][j][p], start[j].scales + at + p * 16,
                                             start[j].offsets + at + p * 16, sums[r * (K / GROUP) + k0 / GROUP]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < g; j++)
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
            for (int p = 0; p < 2; p++) _mm512_storeu_ps(c + (j * rows + r) * TILE + p * 16, acc[r][j][p]);
}

#define FEW_DOT_CASE(R, G, T) case (R) * 64 + (G) * 8 + (T): few_rows_dot_tiles(R, G, T, wt, t0, x, sums, K, c); break;
#define FEW_DOT_TYPES(R, G) FEW_DOT_CASE(R, G, BF16) FEW_DOT_CASE(R, G, INT4) FEW_DOT_CASE(R, G, INT8)
static void few_rows_dot(int rows, int g, const Weights *wt, int64_t t0, const uint16_t *x, const float *sums,
                         int64_t K, float *c) {
    switch (rows * 64 + g * 8 + wt->wtype) {
        FEW_DOT_TYPES(1, ONE_ROW_TILES) FEW_DOT_TYPES(1, 1) FEW_DOT_TYPES(2, 2) FEW_DOT_TYPES(2, 1)
        FEW_DOT_TYPES(3, 1) FEW_DOT_TYPES(4, 1)
        default: break;
    }
}

/* Tile t as bf16 pairs [K / 2][TILE] (32-bit lanes, panel 0 then panel 1 of each pair of k-rows). */
static void tile_pairs(const Weights *wt, int64_t t, int64_t K, __m512i *buf) {
    const TileStart s = tile_start(wt, t, K);
    for (int64_t k = 0; k < K; k += 2) pair_rows(wt->wtype, &s, k, buf + k);
}

/* MR rows past one tile's pairs: bf16 weights one chain over all pairs; quantized ones a chain per
 * group, ended into acc (both in registers, so quantized steps take at most QUANTIZED_ROWS rows). */
#define QUANTIZED_ROWS 6
static inline __attribute__((always_inline)) void dot_microkernel(const int rows, const int wtype, const uint16_t *x,
                                                                  int64_t K, const __m512i *w, const TileStart *s,
                                                                  const float *sums, float *c) {
    const int64_t span = wtype == BF16 ? K : GROUP;
    __m512 acc[MR][2];
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += span) {
        __m512 part[MR][2];
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++) part[r][0] = part[r][1] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k0 + span; k += 2) {
            const __m512i w0 = w[k], w1 = w[k + 1];
#pragma GCC unroll 16
            for (int r = 0; r < rows; r++) {
                const __m512i xr = x_pair(x, r, K, k);
                part[r][0] = dot_pairs(part[r][0], xr, w0);
                part[r][1] = dot_pairs(part[r][1], xr, w1);
            }
        }
        if (wtype == BF16) {
#pragma GCC unroll 16
            for (int r = 0; r < rows; r++) acc[r][0] = part[r][0], acc[r][1] = part[r][1];
            break;
        }
        const int64_t at = (k0 / GROUP) * TILE;
#pragma GCC unroll 16
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
            for (int p = 0; p < 2; p++)
                acc[r][p] = group_end(acc[r][p], part[r][p], s->scales + at + p * 16, s->offsets + at + p * 16,
                                      sums[r * (K / GROUP) + k0 / GROUP]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
        for (int p = 0; p < 2; p++) _mm512_storeu_ps(c + r * TILE + p * 16, acc[r][p]);
}

#define DOT_ROWS_CASE(R, T) case (R) * 8 + (T): dot_microkernel(R, T, x, K, w, s, sums, c); break;
#define DOT_ROWS_QUANTIZED(R) DOT_ROWS_CASE(R, INT4) DOT_ROWS_CASE(R, INT8)
static void dot_rows_block(int rows, int wtype, const uint16_t *x, int64_t K, const __m512i *w, const TileStart *s,
                           const float *sums, float *c) {
    switch (rows * 8 + wtype) {
        DOT_ROWS_CASE(1, BF16) DOT_ROWS_CASE(2, BF16) DOT_ROWS_CASE(3, BF16) DOT_ROWS_CASE(4, BF16)
        DOT_ROWS_CASE(5, BF16) DOT_ROWS_CASE(6, BF16) DOT_ROWS_CASE(7, BF16) DOT_ROWS_CASE(8, BF16)
        DOT_ROWS_CASE(9, BF16) DOT_ROWS_CASE(10, BF16) DOT_ROWS_CASE(11, BF16) DOT_ROWS_CASE(12, BF16)
        DOT_ROWS_QUANTIZED(1) DOT_ROWS_QUANTIZED(2) DOT_ROWS_QUANTIZED(3) DOT_ROWS_QUANTIZED(4)
        DOT_ROWS_QUANTIZED(5) DOT_ROWS_QUANTIZED(6)
        default: break;
    }
}

/* Up to MR rows: at once for bf16 weights, QUANTIZED_ROWS at a time for quantized ones. */
static void dot_rows_tile(int rows, int wtype, const uint16_t *x, int64_t K, const __m512i *w, const TileStart *s,
                          const float *sums, float *c) {
    const int step = wtype == BF16 ? MR : QUANTIZED_ROWS;
    for (int r = 0; r < rows; r += step)
        dot_rows_block(rows - r < step ? rows - r : step, wtype, x + r * K, K, w, s,
                       sums ? sums + r * (K / GROUP) : NULL, c + r * TILE);
}

static int buffered_dot_tiles(const Weights *wt, const uint16_t *x, const float *sums, const Output *o, int64_t M,
                              int64_t K, int threads) {
    const int64_t N = o->N;
    const int64_t tiles = (N + TILE - 1) / TILE;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        __m512i *buf = aligned_alloc(64, sizeof(__m512i) * K);
        float *c = aligned_alloc(64, sizeof(float) * MR * TILE);
        if (!buf || !c) failed = 1;
#pragma omp for schedule(guided) /* as buffered_tiles() */
        for (int64_t t = 0; t < tiles; t++) {
            if (!buf || !c) continue;
            tile_pairs(wt, t, K, buf);
            const TileStart s = tile_start(wt, t, K);
            const int64_t col0 = t * TILE, cols = N - col0 < TILE ? N - col0 : TILE;
            for (int64_t m = 0; m < M; m += MR) {
                const int rows = (int)(M - m < MR ? M - m : MR);
                dot_rows_tile(rows, wt->wtype, x + m * K, K, buf, &s, sums ? sums + m * (K / GROUP) : NULL, c);
                store_rows(o, rows, c, col0, cols, m);
            }
        }
        free(buf);
        free(c);
    }
    return failed ? -2 : 0;
}

#endif

/* A step's input rows: fp32 ones for the fp32 path, or bf16 ones and their groups' sums (for
 * quantized weights) for the bf16-pair path. */
typedef struct {
    const float *f32;
    const uint16_t *bf16;
    const float *sums;
} StepRows;

/* few_rows() or few_rows_dot(), by the path the rows are for. */
static void few_rows_of(const StepRows *x, int rows, int g, const Weights *wt, int64_t t0, int64_t K, float *c) {
#if defined(BF16_DOT)
    if (x->bf16) {
        few_rows_dot(rows, g, wt, t0, x->bf16, x->sums, K, c);
        return;
    }
#endif
    few_rows(rows, g, wt, t0, x->f32, K, c);
}

/* M <= SMALL_ROWS: groups of tiles_per_group(M) tiles split over the threads, no buffer. Static
 * halves here: each thread streams one contiguous half of the weights from memory, which the
 * prefetchers follow (handed out dynamically, a one-sequence decode step took 1.10x the time). */
static void unbuffered_tiles(const Weights *wt, const StepRows *x, const Output *o, int M, int64_t K, int threads) {
    const int64_t N = o->N;
    const int64_t tiles = (N + TILE - 1) / TILE, per_group = tiles_per_group(M);
    const int64_t groups = (tiles + per_group - 1) / per_group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t group = 0; group < groups; group++) {
        float c[SMALL_ROWS * 8 * TILE];
        const int64_t t0 = group * per_group;
        const int g = (int)(tiles - t0 < per_group ? tiles - t0 : per_group);
        if (g == per_group) few_rows_of(x, M, g, wt, t0, K, c);
        else
            for (int j = 0; j < g; j++) few_rows_of(x, M, 1, wt, t0 + j, K, c + j * M * TILE);
        for (int j = 0; j < g; j++) {
            const int64_t col0 = (t0 + j) * TILE, cols = N - col0 < TILE ? N - col0 : TILE;
            store_rows(o, M, c + j * M * TILE, col0, cols, 0);
        }
    }
}

#if defined(BF16_DOT)
/* The same output from row m on. */
static Output rows_from(const Output *o, int64_t m) {
    const int64_t bytes = m * o->N * (o->ytype == F32 ? 4 : 2);
    Output shifted = *o;
    shifted.y = (char *)o->y + bytes;
    shifted.residual = o->residual ? (const char *)o->residual + bytes : NULL;
    return shifted;
}

/* The bf16-pair path; sums only for quantized weights. */
static int dot_linear(const Weights *wt, const uint16_t *x, const Output *o, int64_t M, int64_t K, int threads) {
    float *sums = NULL;
    if (wt->wtype != BF16) {
        sums = malloc(sizeof(float) * M * (K / GROUP));
        if (!sums) return -2;
        group_sums(x, M, K, sums, threads);
    }
    int status = 0;
    if (M <= 2 * SMALL_ROWS) {
        for (int64_t m = 0; m < M; m += SMALL_ROWS) {
            const int rows = (int)(M - m < SMALL_ROWS ? M - m : SMALL_ROWS);
            const Output part = rows_from(o, m);
            const StepRows chunk = { NULL, x + m * K, sums ? sums + m * (K / GROUP) : NULL };
            unbuffered_tiles(wt, &chunk, &part, rows, K, threads);
        }
    } else status = buffered_dot_tiles(wt, x, sums, o, M, K, threads);
    free(sums);
    return status;
}
#endif

/* Whether bf16 activations take the bf16-pair path in this build (1) or the fp32 one (0). */
int linear_bf16_dot(void) {
#if defined(BF16_DOT)
    return 1;
#else
    return 0;
#endif
}

/* One column's value in a quantized k-row of a tile (its integer q). */
static inline int column_value(int wtype, const uint8_t *row, int c) {
    if (wtype == INT8 || wtype == INT8_G16) return ((const int8_t *)row)[c];
    int v = c < TILE / 2 ? row[c] & 15 : row[c - TILE / 2] >> 4;
    const int h = high_bits(wtype);
    if (h) v |= ((row[TILE / 2 + c * h / 8] >> (c * h % 8)) & ((1 << h) - 1)) << 4;
    return v;
}

/*
 * int8 activations (QUANTIZED_ACTIVATIONS; llama.cpp's way with quantized weights), for the 4-,
 * 5- and 6-bit types. Each row of x is quantized on its own, in blocks of 32 along K:
 *     d = amax / 127,  q8 = rint(x * (127 / amax))  in -127..127
 * (amax: the block's largest |x|; a block of zeros has d = 0 and q8 = 0). A weight group's products
 * are then exact integers, P = the sum over its k of q * q8, and with S = the sum of its q8 the
 * group adds to the element, in this order, each operation rounded once:
 *     t = P * scale;  u = S * offset;  t = t + u;  t = d * t;  acc = acc + t
 * group after group from acc = 0 (the sum of x (q scale + offset) with x ~ d q8, regrouped).
 * Integer sums have no order and the rest is one fixed chain per element; each row's q8 depend on
 * that row alone: a row's result is the same at every step size, place and thread count. Plain
 * multiplies and adds, no fused ones: a numpy reference reproduces them to the bit. Weights are
 * unsigned and below 64 (the types allowed), so the AVX2 form's 16-bit pair sums never saturate.
 *
 * The products: four k of one column in each 32-bit lane, u8 weights by s8 activations into an
 * int32 (VPDPBUSD where the CPU has AVX512-VNNI or AVX-VNNI; else VPMADDUBSW then VPMADDWD).
 * The layer's values are kept in the quad layout below (rewritten once, when the layer switches),
 * which gives those lanes with a few instructions a quad.
 */
#define INT8_ACTIVATIONS 16 /* added to a weight's type code: its products take this path, its values
                               are in the quad layout */
#define Q8_BLOCK 32

static inline int q8_weights(int wtype) { return wtype == INT4 || is_kquant(wtype); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512i vi16;
static inline vi16 vi_zero(void) { return _mm512_setzero_si512(); }
static inline vi16 vi_broadcast(int32_t x) { return _mm512_set1_epi32(x); }
static inline vi16 vi_dot4(vi16 acc, vi16 w, vi16 x) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
}
static inline v16 vi_float(vi16 v) { return _mm512_cvtepi32_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef struct { __m256i lo, hi; } vi16;
static inline vi16 vi_zero(void) { vi16 v = { _mm256_setzero_si256(), _mm256_setzero_si256() }; return v; }
static inline vi16 vi_broadcast(int32_t x) { vi16 v = { _mm256_set1_epi32(x), _mm256_set1_epi32(x) }; return v; }
static inline __m256i dot4_half(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}
static inline vi16 vi_dot4(vi16 acc, vi16 w, vi16 x) {
    vi16 r = { dot4_half(acc.lo, w.lo, x.lo), dot4_half(acc.hi, w.hi, x.hi) };
    return r;
}
static inline v16 vi_float(vi16 v) { v16 r = { _mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi) }; return r; }
#else
typedef struct { int32_t v[16]; } vi16;
static inline vi16 vi_zero(void) { vi16 v; memset(&v, 0, sizeof v); return v; }
static inline vi16 vi_broadcast(int32_t x) { vi16 v; for (int i = 0; i < 16; i++) v.v[i] = x; return v; }
static inline vi16 vi_dot4(vi16 acc, vi16 w, vi16 x) {
    for (int i = 0; i < 16; i++) {
        uint8_t wb[4];
        int8_t xb[4];
        memcpy(wb, &w.v[i], 4);
        memcpy(xb, &x.v[i], 4);
        for (int j = 0; j < 4; j++) acc.v[i] += (int32_t)wb[j] * xb[j];
    }
    return acc;
}
static inline v16 vi_float(vi16 v) {
    float f[16];
    for (int i = 0; i < 16; i++) f[i] = (float)v.v[i];
    return v_load(f);
}
#endif

/* Four k-rows from k of a tile (values below 64), one 32-bit lane a column: byte i row k + i. */
static inline __attribute__((always_inline)) void quad_panels(const int wtype, const TileStart *s, int64_t k, vi16 out[PANELS]) {
    const int64_t row_bytes = row_bytes_of(wtype);
    const uint8_t *rows = (const uint8_t *)s->values + k * row_bytes;
#if defined(EXPLICIT_UNPACK) && defined(__AVX512F__) && defined(__AVX512BW__)
    __m512i acc[2] = { _mm512_setzero_si512(), _mm512_setzero_si512() };
    for (int i = 0; i < 4; i++) {
        __m512i v[2];
        quantized_ints(wtype, rows + i * row_bytes, v);
        acc[0] = _mm512_or_si512(acc[0], _mm512_slli_epi32(v[0], 8 * i));
        acc[1] = _mm512_or_si512(acc[1], _mm512_slli_epi32(v[1], 8 * i));
    }
    out[0] = acc[0];
    out[1] = acc[1];
#elif defined(EXPLICIT_UNPACK) && !defined(__AVX512F__)
    __m256i acc[2] = { _mm256_setzero_si256(), _mm256_setzero_si256() };
    for (int i = 0; i < 4; i++) {
        __m256i v[2];
        quantized_ints(wtype, rows + i * row_bytes, v);
        acc[0] = _mm256_or_si256(acc[0], _mm256_slli_epi32(v[0], 8 * i));
        acc[1] = _mm256_or_si256(acc[1], _mm256_slli_epi32(v[1], 8 * i));
    }
    vi16 r = { acc[0], acc[1] };
    out[0] = r;
#else
    uint32_t lanes[TILE];
    for (int c = 0; c < TILE; c++) {
        lanes[c] = 0;
        for (int i = 0; i < 4; i++) lanes[c] |= (uint32_t)column_value(wtype, rows + i * row_bytes, c) << (8 * i);
    }
    for (int p = 0; p < PANELS; p++) memcpy(&out[p], lanes + 16 * p, sizeof(vi16));
#endif
}

/* x quantized: q [M][K], d [M][K / Q8_BLOCK], and each weight group's sum of q as fp32 (exact)
 * [M][K / group]. */
typedef struct {
    int8_t *q;
    float *d, *sums;
    int64_t K, group;
} Q8Rows;

/* One block of 32: q8, d, and the sums of its groups (one, or two of 16). The vector form computes
 * the scalar one's values: max and integer sums are exact in any order, x * inv is one rounding and
 * VCVTPS2DQ rounds to nearest even as rintf does. */
static void q8_block(const float *x, int8_t *q, float *d, float *sums, int64_t group) {
#if defined(__AVX512F__)
    const __m512 sign = _mm512_set1_ps(-0.f);
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    *d = amax / 127.f;
    const __m512 high = _mm512_set1_ps(127.f), low = _mm512_set1_ps(-127.f), vinv = _mm512_set1_ps(inv);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x0, vinv), low), high));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x1, vinv), low), high));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
    const int32_t s0 = _mm512_reduce_add_epi32(q0), s1 = _mm512_reduce_add_epi32(q1);
    if (group == Q8_BLOCK) sums[0] = (float)(s0 + s1);
    else sums[0] = (float)s0, sums[1] = (float)s1;
#else
    float amax = 0.f;
    for (int i = 0; i < Q8_BLOCK; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    *d = amax / 127.f;
    int32_t sum[2] = { 0, 0 };
    for (int i = 0; i < Q8_BLOCK; i++) {
        float r = rintf(x[i] * inv);
        r = r > 127.f ? 127.f : r < -127.f ? -127.f : r;
        q[i] = (int8_t)r;
        sum[i / 16] += q[i];
    }
    if (group == Q8_BLOCK) sums[0] = (float)(sum[0] + sum[1]);
    else sums[0] = (float)sum[0], sums[1] = (float)sum[1];
#endif
}

/* x fp32 [M, K] (rows_as_f32) quantized into out. */
static int q8_rows(const float *x, int64_t M, int64_t K, int64_t group, Q8Rows *out, int threads) {
    out->K = K;
    out->group = group;
    out->q = malloc((size_t)(M * K));
    out->d = malloc(sizeof(float) * (size_t)(M * (K / Q8_BLOCK)));
    out->sums = malloc(sizeof(float) * (size_t)(M * (K / group)));
    if (!out->q || !out->d || !out->sums) return -2;
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 4)
    for (int64_t r = 0; r < M; r++)
        for (int64_t b = 0; b < K / Q8_BLOCK; b++) {
            const int64_t at = r * K + b * Q8_BLOCK;
            q8_block(x + at, out->q + at, out->d + r * (K / Q8_BLOCK) + b,
                     out->sums + r * (K / group) + b * (Q8_BLOCK / group), group);
        }
    return 0;
}

static void q8_free(Q8Rows *x) {
    free(x->q);
    free(x->d);
    free(x->sums);
}

/*
 * The quad layout: a layer that multiplies in int8 keeps its values as the products read them, in
 * the bytes the row layout takes (so its memory is the same). Per tile and per quad of k-rows
 * (k, k + 1, k + 2, k + 3), 4 * row_bytes_of(wtype) bytes: the tile's columns in two halves, A
 * (columns 0 .. TILE / 2 - 1) and B (the rest); within a half, column c's row k + i is byte
 * b = 4 c + i, which is its place in the products' 32-bit lanes. Then:
 *   nibbles [2 TILE]: byte b holds A's b in its low nibble and B's b in its high one;
 *   high bits [TILE h / 2] (K5: h = 1, K6: h = 2): A's b at bit h L of byte b % n, B's at bit
 *     4 + h L, where n = TILE h / 2 and L = b / n;
 * so one load, a mask and a shift give both halves' low nibbles, and the high bits of each 32-bit
 * lane are one variable shift of the plane repeated across the vector.
 */
static inline int64_t plane_bytes(int wtype) { return TILE * high_bits(wtype) / 2; }

/* Value (row k + i, column c) of a quad. */
static inline int quad_value(int wtype, const uint8_t *quad, int i, int c) {
    const int half = c >= TILE / 2, b = 4 * (c % (TILE / 2)) + i, h = high_bits(wtype);
    int v = (quad[b] >> (4 * half)) & 15;
    if (h) {
        const int64_t n = plane_bytes(wtype);
        v |= ((quad[2 * TILE + b % n] >> (4 * half + h * (b / n))) & ((1 << h) - 1)) << 4;
    }
    return v;
}

/* A quad's values as the products' lanes (vi16 out[PANELS]: A's lanes, then B's). */
static inline __attribute__((always_inline)) void stored_quad(const int wtype, const uint8_t *quad,
                                                              vi16 out[PANELS]) {
    const int h = high_bits(wtype);
#if defined(EXPLICIT_UNPACK) && defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i nibbles = _mm512_loadu_si512(quad), low = _mm512_set1_epi8(15);
    __m512i a = _mm512_and_si512(nibbles, low), b = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low);
    if (h) { /* 32-bit lane e holds bytes 4e .. 4e + 3: L = 4e / n */
        const uint8_t *plane = quad + 2 * TILE;
        const __m512i bits = h == 1 ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)plane))
                                    : _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)plane));
        const __m512i steps = h == 1 ? _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0)
                                     : _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i mask = _mm512_set1_epi8((char)(((1 << h) - 1) << 4));
        a = _mm512_or_si512(a, _mm512_and_si512(_mm512_sllv_epi32(bits, _mm512_sub_epi32(_mm512_set1_epi32(4), steps)), mask));
        b = _mm512_or_si512(b, _mm512_and_si512(_mm512_srlv_epi32(bits, steps), mask));
    }
    out[0] = a;
    out[1] = b;
#elif defined(EXPLICIT_UNPACK) && !defined(__AVX512F__)
    const __m256i nibbles = _mm256_loadu_si256((const __m256i *)quad), low = _mm256_set1_epi8(15);
    __m256i a = _mm256_and_si256(nibbles, low), b = _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), low);
    if (h) {
        const uint8_t *plane = quad + 2 * TILE;
        int64_t eight;
        memcpy(&eight, plane, sizeof eight);
        const __m256i bits = h == 1 ? _mm256_set1_epi64x(eight)
                                    : _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)plane));
        const __m256i steps = h == 1 ? _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0) : _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0);
        const __m256i mask = _mm256_set1_epi8((char)(((1 << h) - 1) << 4));
        a = _mm256_or_si256(a, _mm256_and_si256(_mm256_sllv_epi32(bits, _mm256_sub_epi32(_mm256_set1_epi32(4), steps)), mask));
        b = _mm256_or_si256(b, _mm256_and_si256(_mm256_srlv_epi32(bits, steps), mask));
    }
    vi16 r = { a, b };
    out[0] = r;
#else
    uint8_t lanes[4 * TILE];
    for (int c = 0; c < TILE; c++)
        for (int i = 0; i < 4; i++) lanes[(c >= TILE / 2) * 2 * TILE + 4 * (c % (TILE / 2)) + i] = (uint8_t)quad_value(wtype, quad, i, c);
    memcpy(out, lanes, sizeof lanes);
    (void)h;
#endif
}

/* Tile t of a row-layout weight [K][row bytes] rewritten in the quad layout. */
static inline __attribute__((always_inline)) void quad_layout_tile(const int wtype, const Weights *wt, int64_t t,
                                                                   int64_t K, uint8_t *out) {
    const TileStart s = tile_start(wt, t, K);
    const int h = high_bits(wtype);
    const int64_t n = plane_bytes(wtype), quad_bytes = 4 * row_bytes_of(wtype);
    for (int64_t k = 0; k < K; k += 4) {
        vi16 lanes[PANELS];
        uint8_t v[4 * TILE]; /* A's bytes, then B's */
        quad_panels(wtype, &s, k, lanes);
        memcpy(v, lanes, sizeof v);
        uint8_t *quad = out + (k / 4) * quad_bytes;
        memset(quad, 0, (size_t)quad_bytes);
        for (int b = 0; b < 2 * TILE; b++) {
            const int va = v[b], vb = v[2 * TILE + b];
            quad[b] = (uint8_t)((va & 15) | (vb & 15) << 4);
            if (h) quad[2 * TILE + b % n] |= (uint8_t)((va >> 4) << (h * (b / n)) | (vb >> 4) << (4 + h * (b / n)));
        }
    }
}

/* A 4-/5-/6-bit weight's values (row layout, as packed) rewritten in the quad layout, into `out` of
 * the same size. Returns 0, or -1 for a type without int8 products or K not a multiple of 32. */
int linear_quad_layout(const void *packed, int wtype, const float *scales, int64_t K, int64_t N, void *out,
                       int threads) {
    if (!q8_weights(wtype) || K % Q8_BLOCK || K < 1 || N < 1) return -1;
    const Weights wt = { packed, scales, NULL, wtype };
    const int64_t tiles = (N + TILE - 1) / TILE, tile_bytes = K * row_bytes_of(wtype);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; t++) {
        uint8_t *dst = (uint8_t *)out + t * tile_bytes;
        switch (wtype) {
            case INT4: quad_layout_tile(INT4, &wt, t, K, dst); break;
            case K4: quad_layout_tile(K4, &wt, t, K, dst); break;
            case K5: quad_layout_tile(K5, &wt, t, K, dst); break;
            case K6: quad_layout_tile(K6, &wt, t, K, dst); break;
            default: break;
        }
    }
    return 0;
}

/* The group end of the header above: t = P scale, u = S offset, t + u, d (t + u), acc + that. */
static inline __attribute__((always_inline)) v16 q8_group_end(v16 acc, vi16 part, const float *scale,
                                                              const float *offset, float sum, float d) {
    v16 t = v_mul(vi_float(part), v_load(scale));
    const v16 u = v_mul_b(v_broadcast(sum), v_load(offset));
    t = v_add(t, u);
    return v_add(acc, v_mul_b(v_broadcast(d), t));
}

#if defined(__AVX512F__)
#define Q8_MR 6
#else
#define Q8_MR 2
#endif

/* Up to Q8_MR rows (from row0 of x) past tile s's quads: c[r][TILE]. The quads are read from the
 * stored layout, or (lanes != NULL) from the tile's lanes decoded once for all rows of a larger step:
 * the same integers either way. */
static inline __attribute__((always_inline)) void q8_microkernel(const int rows, const int wtype, const Q8Rows *x,
                                                                 int64_t row0, const TileStart *s,
                                                                 const vi16 *lanes, float *c) {
    const int64_t K = x->K, group = group_of(wtype), blocks = K / Q8_BLOCK, groups = K / group;
    const int64_t quad_bytes = 4 * row_bytes_of(wtype);
    const int8_t *xq = x->q + row0 * K;
    v16 acc[Q8_MR][PANELS];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int p = 0; p < PANELS; p++) acc[r][p] = v_zero();
    for (int64_t g = 0; g < groups; g++) {
        vi16 part[Q8_MR][PANELS];
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
            for (int p = 0; p < PANELS; p++) part[r][p] = vi_zero();
        for (int64_t k = g * group; k < (g + 1) * group; k += 4) {
            vi16 wk[PANELS];
            if (lanes) {
#pragma GCC unroll 4
                for (int p = 0; p < PANELS; p++) wk[p] = lanes[(k / 4) * PANELS + p];
            } else {
                if (k % 8 == 0) prefetch_ahead(wtype, s, k, K);
                stored_quad(wtype, (const uint8_t *)s->values + (k / 4) * quad_bytes, wk);
            }
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++) {
                int32_t four;
                memcpy(&four, xq + r * K + k, sizeof four);
                const vi16 xb = vi_broadcast(four);
#pragma GCC unroll 4
                for (int p = 0; p < PANELS; p++) part[r][p] = vi_dot4(part[r][p], wk[p], xb);
            }
        }
        float sk[TILE], ok[TILE];
        const float *scales, *offsets;
        group_scales(wtype, s, g, sk, ok, &scales, &offsets);
        const int64_t block = g * group / Q8_BLOCK;
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
            for (int p = 0; p < PANELS; p++)
                acc[r][p] = q8_group_end(acc[r][p], part[r][p], scales + p * 16, offsets + p * 16,
                                         x->sums[(row0 + r) * groups + g], x->d[(row0 + r) * blocks + block]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int p = 0; p < PANELS; p++) v_store(c + r * TILE + p * 16, acc[r][p]);
}

#define Q8_CASE(R, T) case (R) * 8 + (T): q8_microkernel(R, T, x, row0, s, lanes, c); break;
#define Q8_TYPES(R) Q8_CASE(R, INT4) Q8_CASE(R, K4) Q8_CASE(R, K5) Q8_CASE(R, K6)
static void q8_rows_tile(int rows, int wtype, const Q8Rows *x, int64_t row0, const TileStart *s, const vi16 *lanes,
                         float *c) {
    switch (rows * 8 + wtype) {
        Q8_TYPES(1) Q8_TYPES(2)
#if Q8_MR > 2
        Q8_TYPES(3) Q8_TYPES(4) Q8_TYPES(5) Q8_TYPES(6)
#endif
        default: break;
    }
}

static inline __attribute__((always_inline)) void decode_tile_of(const int wtype, const TileStart *s, int64_t K,
                                                                 vi16 *lanes) {
    const int64_t quad_bytes = 4 * row_bytes_of(wtype);
    for (int64_t k = 0; k < K; k += 4) stored_quad(wtype, (const uint8_t *)s->values + (k / 4) * quad_bytes, lanes + (k / 4) * PANELS);
}

/* A tile's quads as lanes [K / 4][PANELS]. */
static void decode_tile(int wtype, const TileStart *s, int64_t K, vi16 *lanes) {
    switch (wtype) {
        case INT4: decode_tile_of(INT4, s, K, lanes); break;
        case K4: decode_tile_of(K4, s, K, lanes); break;
        case K5: decode_tile_of(K5, s, K, lanes); break;
        case K6: decode_tile_of(K6, s, K, lanes); break;
        default: break;
    }
}

/* Tile t for every row, Q8_MR rows at a time; with `lanes` (a buffer of K / 4 * PANELS), decoded once. */
static void q8_tile_rows(const Weights *wt, const Q8Rows *x, const Output *o, int64_t M, int64_t t, vi16 *lanes,
                         float *c) {
    const TileStart s = tile_start(wt, t, x->K);
    const int64_t col0 = t * TILE, cols = o->N - col0 < TILE ? o->N - col0 : TILE;
    if (lanes) decode_tile(wt->wtype, &s, x->K, lanes);
    for (int64_t m = 0; m < M; m += Q8_MR) {
        const int rows = (int)(M - m < Q8_MR ? M - m : Q8_MR);
        q8_rows_tile(rows, wt->wtype, x, m, &s, lanes, c);
        store_rows(o, rows, c, col0, cols, m);
    }
}

/* The int8 products (weights in the quad layout): a few rows split the tiles in static halves (each
 * thread streams its half, as unbuffered_tiles()), more rows guided (as buffered_tiles()); where a
 * tile is computed never changes its bits. */
static int q8_linear(const Weights *wt, const void *x, int xtype, const Output *o, int64_t M, int64_t K,
                     int threads) {
    const int64_t tiles = (o->N + TILE - 1) / TILE;
    float *owned;
    const float *xf = rows_as_f32(x, xtype, M, K, &owned);
    Q8Rows q = { NULL, NULL, NULL, 0, 0 };
    const int failed_rows = !xf || q8_rows(xf, M, K, group_of(wt->wtype), &q, threads);
    free(owned);
    if (failed_rows) {
        q8_free(&q);
        return -2;
    }
    int failed = 0;
    if (M <= SMALL_ROWS) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < tiles; t++) {
            float c[Q8_MR * TILE];
            q8_tile_rows(wt, &q, o, M, t, NULL, c);
        }
    } else {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            vi16 *lanes = aligned_alloc(64, sizeof(vi16) * (size_t)(K / 4 * PANELS));
            if (!lanes) failed = 1;
            float c[Q8_MR * TILE];
#pragma omp for schedule(guided)
            for (int64_t t = 0; t < tiles; t++)
                if (lanes) q8_tile_rows(wt, &q, o, M, t, lanes, c);
            free(lanes);
        }
    }
    q8_free(&q);
    return failed ? -2 : 0;
}

/* Returns 0, or a negative status (-1 bad arguments, -2 out of memory). */
int invariant_linear(const void *x, int xtype, const void *packed, int wtype, const float *scales,
                     const float *offsets, const float *bias, const void *residual, void *y, int ytype, int64_t M,
                     int64_t K, int64_t N, int threads) {
    const int int8_activations = wtype >= INT8_ACTIVATIONS;
    if (int8_activations) wtype -= INT8_ACTIVATIONS;
    if (M < 0 || K < 1 || N < 1 || xtype < F32 || xtype > BF16 || ytype < F32 || ytype > BF16) return -1;
    if (int8_activations && (!q8_weights(wtype) || K % Q8_BLOCK)) return -1;
    if (wtype < F32 || wtype > K6 || (wtype >= INT4 && (K % group_of(wtype) || !scales))) return -1;
    if ((wtype >= INT4 && !is_kquant(wtype) && !offsets) || (is_kquant(wtype) && K % SUPER)) return -1;
    const Weights wt = { packed, scales, offsets, wtype };
    const Output o = { y, bias, residual, ytype, N };
    if (M == 0) return 0;
    if (int8_activations) return q8_linear(&wt, x, xtype, &o, M, K, threads);
#if defined(BF16_DOT)
    /* INT8_G16 and the k-quants keep the fp32 path (bf16 rows are exact in fp32): the pair path
     * reads stored scales in groups of 32 only. */
    if (xtype == BF16 && (wtype == BF16 || wtype == INT4 || wtype == INT8) && K % 2 == 0)
        return dot_linear(&wt, (const uint16_t *)x, &o, M, K, threads);
#endif
    float *owned;
    const float *xf = rows_as_f32(x, xtype, M, K, &owned);
    if (!xf) return -2;
    int status = 0;
    const StepRows rows = { xf, NULL, NULL };
    if (M <= SMALL_ROWS) unbuffered_tiles(&wt, &rows, &o, (int)M, K, threads);
    else status = buffered_tiles(&wt, xf, &o, M, K, threads);
    free(owned);
    return status;
}

/* Row `id` of a packed weight [N, K] as fp32 [K]: column id % TILE of tile id / TILE, with the very
 * values the products use. */
static void gather_row(const Weights *wt, int quads, int64_t K, int64_t id, float *out) {
    const int64_t t = id / TILE;
    const int c = (int)(id % TILE);
    const TileStart s = tile_start(wt, t, K);
    if (wt->wtype == F32 || wt->wtype == BF16) {
        for (int64_t k = 0; k < K; k++)
            out[k] = wt->wtype == F32 ? ((const float *)s.values)[k * TILE + c]
                                      : bf16_to_f32(((const uint16_t *)s.values)[k * TILE + c]);
        return;
    }
    const int64_t group = group_of(wt->wtype), row_bytes = row_bytes_of(wt->wtype);
    for (int64_t k0 = 0; k0 < K; k0 += group) {
        float sk[TILE], ok[TILE];
        const float *scales, *offsets;
        group_scales(wt->wtype, &s, k0 / group, sk, ok, &scales, &offsets);
        for (int64_t k = k0; k < k0 + group; k++) {
            const uint8_t *values = (const uint8_t *)s.values;
            const int q = quads ? quad_value(wt->wtype, values + (k / 4) * 4 * row_bytes, (int)(k % 4), c)
                                : column_value(wt->wtype, values + k * row_bytes, c);
            out[k] = fmaf((float)q, scales[c], offsets[c]);
        }
    }
}

/* Rows ids[0..n) of a packed weight [N, K] (an embedding table kept as an output head's tiles) as
 * fp32 out [n, K]. Returns 0, or -1 for bad arguments (an id outside 0..N-1). */
int linear_gather_rows(const void *packed, int wtype, const float *scales, const float *offsets, int64_t K,
                       int64_t N, const int64_t *ids, int64_t n, float *out, int threads) {
    const int quads = wtype >= INT8_ACTIVATIONS; /* the same values, in the quad layout */
    if (quads) wtype -= INT8_ACTIVATIONS;
    if (K < 1 || N < 1 || n < 0 || wtype < F32 || wtype > K6 || (wtype >= INT4 && !scales)) return -1;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= N) return -1;
    const Weights wt = { packed, scales, offsets, wtype };
#pragma omp parallel for schedule(static) num_threads(threads) if (n > 16)
    for (int64_t i = 0; i < n; i++) gather_row(&wt, quads, K, ids[i], out + i * K);
    return 0;
}
