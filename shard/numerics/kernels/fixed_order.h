/*
 * Arithmetic in an order fixed by the source, shared by the kernels whose results must
 * not depend on the step: sums run in 16 interleaved lanes (element i into lane i % 16,
 * each lane one chain of fmaf or additions, which the compiler vectorises lane for lane)
 * and the lanes are added in a fixed tree. The order depends on the length only, so the
 * same data gives the same bits in any batch, on any thread, with any vector width.
 * (These files get no -fassociative-math: it would license the compiler to reorder.)
 */
#ifndef SWITCHYARD_FIXED_ORDER_H
#define SWITCHYARD_FIXED_ORDER_H

#include <math.h>
#include <stdint.h>

#define LANES 16
#define EXP_FLOOR -80.f

/* e^x for x <= 0: Cody-Waite reduction, degree-7 polynomial (relative error < 1e-7),
 * arguments clamped at -80 (the CPU's exp slows down on underflowing inputs). */
static inline float exp_nonpositive(float x) {
    x = x < EXP_FLOOR ? EXP_FLOOR : x;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(-n, 0.693145751953125f, x);
    r = fmaf(-n, 1.428606765330187e-06f, r);
    float p = 1.f / 5040;
    p = fmaf(p, r, 1.f / 720);
    p = fmaf(p, r, 1.f / 120);
    p = fmaf(p, r, 1.f / 24);
    p = fmaf(p, r, 1.f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.f);
    p = fmaf(p, r, 1.f);
    union { uint32_t u; float f; } scale = { (uint32_t)((int32_t)n + 127) << 23 }; /* n >= -116 */
    return p * scale.f;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* exp_nonpositive() after its clamp, sixteen lanes, step for step (fnmadd(n, c, x) is
 * fmaf(-n, c, x); scalef rounds p * 2^n once, as the scalar product by the power does while
 * 2^n is normal: callers clamp x at -87 or above). The clamp is the caller's: its NaN rule
 * differs between kernels. */
static inline __m512 exp_clamped_x16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

static inline float add_lanes(const float *lane) {
    float pair[LANES / 2], quad[LANES / 4];
    for (int j = 0; j < LANES / 2; j++) pair[j] = lane[j] + lane[j + LANES / 2];
    for (int j = 0; j < LANES / 4; j++) quad[j] = pair[j] + pair[j + LANES / 4];
    return (quad[0] + quad[2]) + (quad[1] + quad[3]);
}

#endif
