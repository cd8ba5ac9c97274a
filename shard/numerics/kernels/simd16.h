/*
 * v16: sixteen fp32 lanes and the few operations the kernels need, with explicit fused
 * multiply-adds (and plain multiplies and adds, each rounded once): one AVX-512 register, two AVX2 ones, or a scalar loop of fmaf. Every lane
 * computes the same correctly rounded fused multiply-add whichever form the build takes.
 */
#ifndef SWITCHYARD_SIMD16_H
#define SWITCHYARD_SIMD16_H

#include <math.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
typedef __m512 v16;
typedef __m512 vb; /* a broadcast row value */
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, v16 v) { _mm512_storeu_ps(p, v); }
static inline vb v_broadcast(float x) { return _mm512_set1_ps(x); }
static inline v16 v_fma(vb x, v16 w, v16 acc) { return _mm512_fmadd_ps(x, w, acc); }
static inline v16 v_fma_vv(v16 a, v16 b, v16 acc) { return _mm512_fmadd_ps(a, b, acc); }
static inline v16 v_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
static inline v16 v_mul_b(vb x, v16 w) { return _mm512_mul_ps(x, w); }
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef struct { __m256 lo, hi; } v16;
typedef __m256 vb;
static inline v16 v_zero(void) { v16 v = { _mm256_setzero_ps(), _mm256_setzero_ps() }; return v; }
static inline v16 v_load(const float *p) { v16 v = { _mm256_loadu_ps(p), _mm256_loadu_ps(p + 8) }; return v; }
static inline void v_store(float *p, v16 v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
static inline vb v_broadcast(float x) { return _mm256_set1_ps(x); }
static inline v16 v_fma(vb x, v16 w, v16 acc) {
    v16 r = { _mm256_fmadd_ps(x, w.lo, acc.lo), _mm256_fmadd_ps(x, w.hi, acc.hi) };
    return r;
}
static inline v16 v_fma_vv(v16 a, v16 b, v16 acc) {
    v16 r = { _mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi) };
    return r;
}
static inline v16 v_mul(v16 a, v16 b) { v16 r = { _mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi) }; return r; }
static inline v16 v_mul_b(vb x, v16 w) { v16 r = { _mm256_mul_ps(x, w.lo), _mm256_mul_ps(x, w.hi) }; return r; }
static inline v16 v_add(v16 a, v16 b) { v16 r = { _mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi) }; return r; }
#else
typedef struct { float v[16]; } v16;
typedef float vb;
static inline v16 v_zero(void) { v16 v; memset(&v, 0, sizeof v); return v; }
static inline v16 v_load(const float *p) { v16 v; memcpy(v.v, p, sizeof v.v); return v; }
static inline void v_store(float *p, v16 v) { memcpy(p, v.v, sizeof v.v); }
static inline vb v_broadcast(float x) { return x; }
static inline v16 v_fma(vb x, v16 w, v16 acc) {
    for (int i = 0; i < 16; i++) acc.v[i] = fmaf(x, w.v[i], acc.v[i]);
    return acc;
}
static inline v16 v_fma_vv(v16 a, v16 b, v16 acc) {
    for (int i = 0; i < 16; i++) acc.v[i] = fmaf(a.v[i], b.v[i], acc.v[i]);
    return acc;
}
static inline v16 v_mul(v16 a, v16 b) { for (int i = 0; i < 16; i++) a.v[i] *= b.v[i]; return a; }
static inline v16 v_mul_b(vb x, v16 w) { for (int i = 0; i < 16; i++) w.v[i] *= x; return w; }
static inline v16 v_add(v16 a, v16 b) { for (int i = 0; i < 16; i++) a.v[i] += b.v[i]; return a; }
#endif

#endif
