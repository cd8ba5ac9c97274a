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

#endif
