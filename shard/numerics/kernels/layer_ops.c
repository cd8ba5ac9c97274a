/*
 * The small per-token operations of a Llama-family decoder layer, one call each instead of
 * the six to ten torch operations (and their dispatch) transformers spells them with. A decode
 * step of one sequence does little arithmetic; at 30 layers the dispatch was a third of it.
 *
 * Each row's result depends only on that row (the one-numerical-path rule of the shard):
 *   rms_norm   out = weight * (x * rsqrt(mean(x^2) + eps)), the mean summed in the fixed lane
 *              order of fixed_order.h, so a token's norm is the same bits in any step;
 *   rotary     x = (x * cos) + (rotate_half(x) * sin) in place, every product and the sum
 *              rounded separately exactly as transformers' apply_rotary_pos_emb computes them
 *              (in bf16 each operation rounds to bf16, as torch's bf16 tensors do).
 *   silu_mul   out = silu(gate) * up over the two halves of a fused gate/up product: silu in
 *              fp32 as x / (1 + e^-x) with the exponential of fixed_order.h (within an ulp or
 *              two of torch's), rounded to the type, then the product rounded, as torch's
 *              act_fn(gate) * up on tensors of that type.
 * Types: 0 fp32, 1 bf16 (x, weight, cos, sin and out share the model's dtype).
 * Built with -ffp-contract=off: a written a * b + c stays two roundings.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "fixed_order.h"

enum { F32 = 0, BF16 = 1 };

static inline float load(const void *p, int type, int64_t i) {
    return type == F32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

/* The value as the tensor of this type holds it: bf16 rounds (nearest even), fp32 stays. */
static inline float rounded(float v, int type) { return type == F32 ? v : bf16_to_f32(f32_to_bf16(v)); }

static inline void store(void *p, int type, int64_t i, float v) {
    if (type == F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = f32_to_bf16(v);
}

static float mean_square(const void *x, int type, int64_t width) {
    float lane[LANES] = { 0 };
    int64_t i = 0;
    for (; i + LANES <= width; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float v = load(x, type, i + j);
            lane[j] += v * v;
        }
    for (int j = 0; i + j < width; j++) {
        const float v = load(x, type, i + j);
        lane[j] += v * v;
    }
    return add_lanes(lane) / (float)width;
}

/* x, out [rows, width] with rows stride_in / stride_out elements apart; weight [width]. */
void rms_norm(const void *x, int64_t stride_in, const void *weight, float eps, void *out, int64_t stride_out,
              int64_t rows, int64_t width, int type, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * stride_in * (type == F32 ? 4 : 2);
        char *dst = (char *)out + r * stride_out * (type == F32 ? 4 : 2);
        const float inv = 1.f / sqrtf(mean_square(row, type, width) + eps);
        for (int64_t i = 0; i < width; i++) {
            const float normed = rounded(load(row, type, i) * inv, type);
            store(dst, type, i, load(weight, type, i) * normed);
        }
    }
}

/* x [tokens, heads, dim] in place, tokens stride elements apart, heads dim apart; cos, sin
 * [tokens, dim] contiguous. rotate_half(x) = cat(-x[dim/2:], x[:dim/2]). */
void rotary(void *x, int64_t stride, int64_t tokens, int heads, int dim, const void *cos, const void *sin,
            int type, int threads) {
    const int half = dim / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (tokens > 16)
    for (int64_t t = 0; t < tokens; t++) {
        const char *c = (const char *)cos + t * dim * (type == F32 ? 4 : 2);
        const char *s = (const char *)sin + t * dim * (type == F32 ? 4 : 2);
        for (int h = 0; h < heads; h++) {
            char *v = (char *)x + (t * stride + (int64_t)h * dim) * (type == F32 ? 4 : 2);
            float first[512], second[512]; /* head_dim <= 1024 (checked by the caller) */
            for (int i = 0; i < half; i++) {
                const float a = load(v, type, i), b = load(v, type, i + half);
                first[i] = rounded(rounded(a * load(c, type, i), type) + rounded(-b * load(s, type, i), type), type);
                second[i] = rounded(rounded(b * load(c, type, i + half), type) +
                                        rounded(a * load(s, type, i + half), type), type);
            }
            for (int i = 0; i < half; i++) {
                store(v, type, i, first[i]);
                store(v, type, i + half, second[i]);
            }
        }
    }
}

/* silu(x) = x / (1 + e^-x); for x < 0 as x e^x / (1 + e^x), so that the exponential's argument
 * is never positive (no overflow, the accurate side of exp_nonpositive). Branch-free, so that
 * the compiler vectorizes it (a branch on the sign mispredicts every other element). */
static inline float silu(float x) {
    const float e = exp_nonpositive(-fabsf(x));
    return (x >= 0.f ? x : x * e) / (1.f + e);
}

/* One row: sixteen elements at a time through local arrays, which the compiler vectorizes
 * without aliasing checks (type is a constant in each caller's copy). */
static inline __attribute__((always_inline)) void silu_mul_row(const char *row, char *dst, int64_t width,
                                                               const int type) {
    for (int64_t i0 = 0; i0 < width; i0 += LANES) {
        const int n = width - i0 < LANES ? (int)(width - i0) : LANES;
        float gate[LANES] = { 0 }, up[LANES] = { 0 }, result[LANES];
        for (int j = 0; j < n; j++) gate[j] = load(row, type, i0 + j), up[j] = load(row, type, width + i0 + j);
        for (int j = 0; j < LANES; j++) result[j] = rounded(silu(gate[j]), type) * up[j];
        for (int j = 0; j < n; j++) store(dst, type, i0 + j, result[j]);
    }
}

#if defined(BF16X16)
/* e^x for x <= 0, sixteen lanes: exp_nonpositive() (max(floor, x) keeps a NaN x, as the
 * scalar comparison does). */
static inline __m512 exp_nonpositive16(__m512 x) { return exp_clamped_x16(_mm512_max_ps(_mm512_set1_ps(EXP_FLOOR), x)); }

/* silu() of sixteen lanes. */
static inline __m512 silu16(__m512 x) {
    const __m512 e = exp_nonpositive16(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
    const __m512 top = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), _mm512_mul_ps(x, e), x);
    return _mm512_div_ps(top, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

static inline __m512 load16(const char *p, int type, int64_t i, __mmask16 m) {
    return type == F32 ? _mm512_maskz_loadu_ps(m, (const float *)p + i) : load_bf16x16((const uint16_t *)p + i, m);
}

/* silu_mul_row() sixteen lanes at a time: the same operations on each element. */
static inline __attribute__((always_inline)) void silu_mul_row16(const char *row, char *dst, int64_t width,
                                                                 const int type) {
    for (int64_t i = 0; i < width; i += 16) {
        const __mmask16 m = width - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (width - i)) - 1);
        __m512 act = silu16(load16(row, type, i, m));
        if (type == BF16) act = round_bf16x16(act);
        const __m512 result = _mm512_mul_ps(act, load16(row, type, width + i, m));
        if (type == F32) _mm512_mask_storeu_ps((float *)dst + i, m, result);
        else store_bf16x16((uint16_t *)dst + i, m, bf16_bits_x16(result));
    }
}
#define SILU_MUL_ROW silu_mul_row16
#else
#define SILU_MUL_ROW silu_mul_row
#endif

/* product [rows, 2 * width] with rows stride elements apart: gate = columns [0, width), up =
 * [width, 2 * width); out [rows, width] contiguous. */
void silu_mul(const void *product, int64_t stride, int64_t rows, int64_t width, void *out, int type, int threads) {
    const int64_t size = type == F32 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)product + r * stride * size;
        char *dst = (char *)out + r * width * size;
        if (type == F32) SILU_MUL_ROW(row, dst, width, F32);
        else SILU_MUL_ROW(row, dst, width, BF16);
    }
}
