/*
 * Paged decode attention for CPUs: one query token per sequence, keys and values
 * read in place from the paged KV cache through each sequence's block table.
 *
 * The portable path gathers every context into a fresh tensor and runs SDPA:
 * two copies of the context per layer and a kernel built for long queries.
 * Here each (sequence, KV head) reads its keys once to score the query heads
 * that share them (grouped-query attention), takes the softmax, then reads its
 * values to accumulate each head's output. Accumulation is fp32 whatever the
 * cache dtype. On CPUs with AVX512-BF16 a bf16 cache is scored with
 * VDPBF16PS (bf16 pairs multiplied and summed into fp32, no conversion pass).
 *
 * Layouts (all contiguous, row-major):
 *   q, out       [batch, heads, head_dim]
 *   k/v cache    [slots, kv_heads, head_dim], slot = block * block_size + offset
 *   block_table  [batch, max_blocks]  (int64)
 *   context_len  [batch]              (int64) tokens to attend, the new one included
 * window > 0 keeps only the last `window` positions (sliding-window attention).
 *
 * Built at run time by shard/kernels/__init__.py for the host (-march=native);
 * OpenMP resolves to the runtime torch has already loaded, so the two share threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1
#endif

/* What one call needs to know; positions of sequence b are read through table + b * max_blocks. */
typedef struct {
    const void *q, *k_cache, *v_cache;
    const int64_t *block_table, *context_len;
    void *out;
    int heads, kv_heads, head_dim, max_blocks, block_size, window;
    float scale;
} Problem;

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v = { (uint32_t)x << 16 };
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);             /* round to nearest even */
}

/* Slots of positions start..start+span-1: one division per block, not per position
 * (a 64-bit division costs tens of cycles, as much as scoring a key). */
static void slots_of(const Problem *pr, int b, int64_t start, int64_t span, int64_t *slots) {
    const int64_t *table = pr->block_table + (int64_t)b * pr->max_blocks;
    const int size = pr->block_size;
    int64_t block = start / size, offset = start % size;
    for (int64_t i = 0; i < span; i++) {
        slots[i] = table[block] * size + offset;
        if (++offset == size) { offset = 0; block++; }
    }
}

static void softmax(float *s, int64_t n) {
    float top = s[0], total = 0.f;
    for (int64_t i = 1; i < n; i++) top = s[i] > top ? s[i] : top;
    for (int64_t i = 0; i < n; i++) { s[i] = expf(s[i] - top); total += s[i]; }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < n; i++) s[i] *= inv;
}

/* --- portable path: any head_dim, bf16 or fp32 ------------------------------------------------ */

#define DEFINE_ATTEND_PORTABLE(NAME, T, LOAD, STORE)                                                     \
static void NAME(const Problem *pr, int b, int kvh, const int64_t *slots, int64_t span, float *score,   \
                 float *qf, float *acc, float *row) {                                                    \
    const int group = pr->heads / pr->kv_heads, dim = pr->head_dim;                                      \
    const T *q = (const T *)pr->q, *kc = (const T *)pr->k_cache, *vc = (const T *)pr->v_cache;          \
    for (int g = 0; g < group; g++)                                                                      \
        for (int d = 0; d < dim; d++) {                                                                  \
            qf[g * dim + d] = LOAD(q[((int64_t)b * pr->heads + kvh * group + g) * dim + d]) * pr->scale; \
            acc[g * dim + d] = 0.f;                                                                      \
        }                                                                                                \
    for (int64_t i = 0; i < span; i++) {                                                                 \
        const T *key = kc + (slots[i] * pr->kv_heads + kvh) * dim;                  \
        for (int d = 0; d < dim; d++) row[d] = LOAD(key[d]);                                             \
        for (int g = 0; g < group; g++) {                                                                \
            float dot = 0.f;                                                                             \
            for (int d = 0; d < dim; d++) dot += qf[g * dim + d] * row[d];                               \
            score[g * span + i] = dot;                                                                   \
        }                                                                                                \
    }                                                                                                    \
    for (int g = 0; g < group; g++) softmax(score + g * span, span);                                     \
    for (int64_t i = 0; i < span; i++) {                                                                 \
        const T *value = vc + (slots[i] * pr->kv_heads + kvh) * dim;                \
        for (int d = 0; d < dim; d++) row[d] = LOAD(value[d]);                                           \
        for (int g = 0; g < group; g++) {                                                                \
            const float w = score[g * span + i];                                                         \
            for (int d = 0; d < dim; d++) acc[g * dim + d] += w * row[d];                                \
        }                                                                                                \
    }                                                                                                    \
    T *out = (T *)pr->out;                                                                               \
    for (int g = 0; g < group; g++)                                                                      \
        for (int d = 0; d < dim; d++)                                                                    \
            out[((int64_t)b * pr->heads + kvh * group + g) * dim + d] = STORE(acc[g * dim + d]);         \
}

#define IDENTITY(x) (x)
DEFINE_ATTEND_PORTABLE(attend_bf16_portable, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_ATTEND_PORTABLE(attend_f32, float, IDENTITY, IDENTITY)

/* --- AVX512-BF16 path: bf16 cache, head_dim a multiple of 64 ---------------------------------- */

#ifdef HAVE_AVX512_BF16
/* The first KV head's pass asks for whole slots (every KV head) a few positions
 * ahead: blocks are scattered, so the hardware prefetcher loses the stream at
 * every block edge, and the later heads then find their rows in cache. */
#define AHEAD 8
static inline void prefetch_row(const uint16_t *row, int elements) {
    for (int offset = 0; offset < elements; offset += 32) __builtin_prefetch(row + offset, 0, 3);
}

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

static void attend_bf16_avx512(const Problem *pr, int b, int kvh, const int64_t *slots, int64_t span,
                               float *score, float *qf, float *acc, float *row) {
    (void)qf; (void)acc; (void)row;
    const int group = pr->heads / pr->kv_heads, dim = pr->head_dim, pairs = dim / 32;
    const uint16_t *q = (const uint16_t *)pr->q, *kc = (const uint16_t *)pr->k_cache;
    const uint16_t *vc = (const uint16_t *)pr->v_cache;
    const int64_t q_row = (int64_t)b * pr->heads + kvh * group;
    /* Scores: each key row meets every query head of its group while it is in registers. */
    for (int64_t i = 0; i < span; i++) {
        if (kvh == 0 && i + AHEAD < span) prefetch_row(kc + slots[i + AHEAD] * pr->kv_heads * dim, pr->kv_heads * dim);
        const uint16_t *key = kc + (slots[i] * pr->kv_heads + kvh) * dim;
        for (int g = 0; g < group; g++) {
            const uint16_t *qg = q + (q_row + g) * dim;
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < pairs; c++)
                sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512((const void *)(qg + 32 * c)),
                                       (__m512bh)_mm512_loadu_si512((const void *)(key + 32 * c)));
            score[g * span + i] = _mm512_reduce_add_ps(sum) * pr->scale;
        }
    }
    for (int g = 0; g < group; g++) softmax(score + g * span, span);
    /* Values: 64 output dims of one head stay in four registers across the whole context. */
    uint16_t *out = (uint16_t *)pr->out;
    for (int g = 0; g < group; g++)
        for (int c = 0; c < dim; c += 64) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const float *w = score + g * span;
            for (int64_t i = 0; i < span; i++) {
                if (kvh == 0 && g == 0 && c == 0 && i + AHEAD < span)
                    prefetch_row(vc + slots[i + AHEAD] * pr->kv_heads * dim, pr->kv_heads * dim);
                const uint16_t *v = vc + (slots[i] * pr->kv_heads + kvh) * dim + c;
                const __m512 wi = _mm512_set1_ps(w[i]);
                a0 = _mm512_fmadd_ps(wi, bf16x16_to_f32(v), a0);
                a1 = _mm512_fmadd_ps(wi, bf16x16_to_f32(v + 16), a1);
                a2 = _mm512_fmadd_ps(wi, bf16x16_to_f32(v + 32), a2);
                a3 = _mm512_fmadd_ps(wi, bf16x16_to_f32(v + 48), a3);
            }
            float tmp[64];
            _mm512_storeu_ps(tmp, a0); _mm512_storeu_ps(tmp + 16, a1);
            _mm512_storeu_ps(tmp + 32, a2); _mm512_storeu_ps(tmp + 48, a3);
            uint16_t *o = out + (q_row + g) * dim + c;
            for (int d = 0; d < 64; d++) o[d] = f32_to_bf16(tmp[d]);
        }
}
#endif

typedef void (*attend_fn)(const Problem *, int, int, const int64_t *, int64_t, float *, float *, float *,
                          float *);

/* Sequences are the unit of parallel work: a slot holds every KV head of a position,
 * so one thread walking a sequence reads each cache line once. With fewer sequences
 * than twice the threads, (sequence, KV head) pairs are, so that no thread idles. */
static int run(const Problem *pr, int batch, int threads, attend_fn attend) {
    if (pr->kv_heads < 1 || pr->heads % pr->kv_heads) return -1;
    const int group = pr->heads / pr->kv_heads, by_head = batch < 2 * threads;
    const int items = by_head ? batch * pr->kv_heads : batch;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(|:failed)
    for (int item = 0; item < items; item++) {
        const int b = by_head ? item / pr->kv_heads : item;
        const int first = by_head ? item % pr->kv_heads : 0, last = by_head ? first + 1 : pr->kv_heads;
        const int64_t length = pr->context_len[b];
        const int64_t start = (pr->window > 0 && length > pr->window) ? length - pr->window : 0;
        const int64_t span = length - start;
        if (span <= 0) continue;
        const size_t floats = (size_t)group * span + (size_t)group * pr->head_dim * 2 + pr->head_dim;
        int64_t *slots = malloc(sizeof(int64_t) * span + sizeof(float) * floats);
        if (!slots) { failed = 1; continue; }
        float *score = (float *)(slots + span), *qf = score + group * span, *acc = qf + group * pr->head_dim;
        float *row = acc + group * pr->head_dim;
        slots_of(pr, b, start, span, slots);
        for (int kvh = first; kvh < last; kvh++) attend(pr, b, kvh, slots, span, score, qf, acc, row);
        free(slots);
    }
    return failed ? -2 : 0;
}

#define PROBLEM_ARGS                                                                                     \
    const void *q, const void *k_cache, const void *v_cache, const int64_t *block_table,                \
    const int64_t *context_len, void *out, int batch, int heads, int kv_heads, int head_dim,             \
    int max_blocks, int block_size, float scale, int window, int threads
#define PROBLEM { q, k_cache, v_cache, block_table, context_len, out, heads, kv_heads, head_dim,        \
                  max_blocks, block_size, window, scale }

int paged_decode_bf16(PROBLEM_ARGS) {
    const Problem pr = PROBLEM;
#ifdef HAVE_AVX512_BF16
    if (head_dim % 64 == 0) return run(&pr, batch, threads, attend_bf16_avx512);
#endif
    return run(&pr, batch, threads, attend_bf16_portable);
}

int paged_decode_f32(PROBLEM_ARGS) {
    const Problem pr = PROBLEM;
    return run(&pr, batch, threads, attend_f32);
}
