/* bf16 <-> fp32: widening is exact; narrowing rounds to nearest even (NaN stays NaN). */
#ifndef SWITCHYARD_BF16_H
#define SWITCHYARD_BF16_H

#include <stdint.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v = { (uint32_t)x << 16 };
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);             /* round to nearest even */
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define BF16X16 1

/* Sixteen of each, lane for lane the scalar functions above (not VCVTNEPS2BF16, which flushes
 * subnormals). Lanes off in mask m read as 0 and are not written. */
static inline __m512 load_bf16x16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* The bf16 bits of each lane in the low half of its 32-bit lane. */
static inline __m512i bf16_bits_x16(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i nearest = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), nearest, quiet);
}

static inline void store_bf16x16(uint16_t *p, __mmask16 m, __m512i bits) { _mm512_mask_cvtepi32_storeu_epi16(p, m, bits); }

/* The value a lane holds once stored as bf16. */
static inline __m512 round_bf16x16(__m512 f) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits_x16(f), 16)); }
#endif

#endif
