/*
 * Paged attention for CPUs, one query row at a time: every query (a decode token, or
 * a prompt token given its own row by the caller) attends to its context, read in
 * place from the paged KV cache through its block table. A query's result depends
 * only on its query vector and its context, never on the other rows of the call:
 * that is what lets a prompt token computed in a prefill, in a chunk, or after a
 * prefix-cache hit come out exactly as it would in a decode step.
 *
 * (The torch path gathers every context into a fresh tensor and runs SDPA, whose
 * blocking, and so rounding, depends on the query length.) Here each (run of
 * queries, KV head) reads its keys once to score the query heads that share them
 * (grouped-query attention), takes each query's softmax, then reads the values to
 * accumulate each head's output, in fp32 whatever the cache dtype, in an order
 * spelled out in the source (fixed_order.h, simd16.h). On CPUs with AVX512-BF16 a
 * bf16 cache is scored with VDPBF16PS, one query row at a time.
 *
 * Layouts (all contiguous, row-major):
 *   q, out       [batch, heads, head_dim]
 *   k/v cache    [slots, kv_heads, head_dim], slot = block * block_size + offset
 *   block_table  [batch, max_blocks]  (int64)
 *   context_len  [batch]              (int64) tokens to attend, the new one included
 * window > 0 keeps only the last `window` positions (sliding-window attention).
 *
 * Built at run time by shard/numerics/kernels/__init__.py for the host (-march=native);
 * OpenMP resolves to the runtime torch has already loaded, so the two share threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "fixed_order.h"
#include "simd16.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
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

/* --- portable path: any head_dim, bf16 or fp32, in fixed order ---------------------------------
 *
 * A run of up to RUN_MAX queries that read the same KV (consecutive prompt tokens of one
 * sequence; a decode token is a run of one) is attended together, so each key and value row
 * is loaded once for all of them. Each query's arithmetic is exactly that of a query alone:
 * a score is one fmaf chain over the dimensions of (q * scale) and the key (sixteen keys side by
 * side, one per vector lane), its softmax is over its own span, and each output dimension is
 * one fmaf chain over its keys in order. So a prompt token gets the same
 * bits prefilled in one step, in chunks, or decoded. */

#define RUN_MAX 8
/* Query heads scored together: independent fmaf chains that keep the FMA units busy. */
#define HEADS_PER_PASS 4

typedef struct {
    int b0, n;          /* rows b0 .. b0+n-1 */
    int64_t start, end; /* positions any of them reads */
} Run;

static int64_t first_position(const Problem *pr, int64_t length) {
    return (pr->window > 0 && length > pr->window) ? length - pr->window : 0;
}

static void softmax_fixed(float *s, int64_t n) {
    float top = s[0];
    for (int64_t i = 1; i < n; i++) top = s[i] > top ? s[i] : top;
    float lane[LANES] = { 0 };
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            s[i + l] = exp_nonpositive(s[i + l] - top);
            lane[l] += s[i + l];
        }
    for (int l = 0; i + l < n; l++) {
        s[i + l] = exp_nonpositive(s[i + l] - top);
        lane[l] += s[i + l];
    }
    const float inv = 1.f / add_lanes(lane);
    for (i = 0; i < n; i++) s[i] *= inv;
}

/* Sixteen key rows (NULL past the context) as fp32 [dim][16]: pure data movement, so it may
 * use whatever instructions the CPU has without changing any result. */
#if defined(__AVX2__)
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

#define DEFINE_TRANSPOSE(NAME, T, LOAD1, LOAD8)                                                          \
static void NAME(const T *const *rows, int dim, float *out) {                                            \
    int full = 1;                                                                                        \
    for (int l = 0; l < LANES; l++) full &= rows[l] != NULL;                                             \
    if (!full || dim % 8) {                                                                              \
        for (int l = 0; l < LANES; l++)                                                                  \
            for (int d = 0; d < dim; d++) out[d * LANES + l] = rows[l] ? LOAD1(rows[l][d]) : 0.f;        \
        return;                                                                                          \
    }                                                                                                    \
    for (int l0 = 0; l0 < LANES; l0 += 8)                                                                \
        for (int d0 = 0; d0 < dim; d0 += 8) {                                                            \
            __m256 r[8];                                                                                 \
            for (int k = 0; k < 8; k++) r[k] = LOAD8(rows[l0 + k] + d0);                                 \
            transpose8(r);                                                                               \
            for (int k = 0; k < 8; k++) _mm256_storeu_ps(out + (d0 + k) * LANES + l0, r[k]);             \
        }                                                                                                \
}
#else
#define DEFINE_TRANSPOSE(NAME, T, LOAD1, LOAD8)                                                          \
static void NAME(const T *const *rows, int dim, float *out) {                                            \
    for (int l = 0; l < LANES; l++)                                                                      \
        for (int d = 0; d < dim; d++) out[d * LANES + l] = rows[l] ? LOAD1(rows[l][d]) : 0.f;            \
}
#endif
#define IDENTITY(x) (x)
DEFINE_TRANSPOSE(transpose_keys_f32, float, IDENTITY, load8_f32)
DEFINE_TRANSPOSE(transpose_keys_bf16, uint16_t, bf16_to_f32, load8_bf16)

/* scores16[g][l] = one fmaf chain over d of q_g[d] * key_l[d] (keys: [dim][LANES], sixteen keys
 * side by side), for the h <= HEADS_PER_PASS query heads q_g = q + g * dim of one pass. */
static inline __attribute__((always_inline)) void score_pass(const int h, const float *keys, const float *q, int dim,
                                                             float scores16[HEADS_PER_PASS][LANES]) {
    v16 lane[HEADS_PER_PASS];
    for (int g = 0; g < h; g++) lane[g] = v_zero();
    for (int d = 0; d < dim; d++) {
        const v16 kd = v_load(keys + d * LANES);
        for (int g = 0; g < h; g++) lane[g] = v_fma(v_broadcast(q[g * dim + d]), kd, lane[g]);
    }
    for (int g = 0; g < h; g++) v_store(scores16[g], lane[g]);
}

/* One instance per head count, so that a group of 3 heads (SmolLM2) does 3 chains, not 4. */
static void score_heads(int h, const float *keys, const float *q, int dim, float scores16[HEADS_PER_PASS][LANES]) {
    switch (h) {
        case 1: score_pass(1, keys, q, dim, scores16); break;
        case 2: score_pass(2, keys, q, dim, scores16); break;
        case 3: score_pass(3, keys, q, dim, scores16); break;
        default: score_pass(HEADS_PER_PASS, keys, q, dim, scores16); break;
    }
}

/* acc[d] = sum over positions p in order of w[p] * value_p[d], one fmaf chain per d from 0:
 * exactly what an axpy per position computes, but 64 dimensions at a time kept in registers
 * over every position (the axpy loaded and stored its accumulators at each position, which
 * made the value pass of a decode step load/store bound). value_p = base + slots[p] * stride. */
#if defined(__AVX512F__)
static inline v16 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline v16 load16_bf16(const uint16_t *p) { v16 v = { load8_bf16(p), load8_bf16(p + 8) }; return v; }
#else
static inline v16 load16_bf16(const uint16_t *p) {
    float row[16];
    for (int l = 0; l < 16; l++) row[l] = bf16_to_f32(p[l]);
    return v_load(row);
}
#endif
static inline v16 load16_f32(const float *p) { return v_load(p); }

#define DEFINE_VALUES(NAME, T, LOAD, LOAD16)                                                             \
static void NAME(const T *base, int64_t stride, const int64_t *slots, const float *w, int64_t span,      \
                 int dim, float *acc) {                                                                  \
    int d0 = 0;                                                                                          \
    for (; d0 + 64 <= dim; d0 += 64) {                                                                   \
        v16 a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();                                  \
        for (int64_t p = 0; p < span; p++) {                                                             \
            const T *v = base + slots[p] * stride + d0;                                                  \
            const vb wp = v_broadcast(w[p]);                                                             \
            a0 = v_fma(wp, LOAD16(v), a0);                                                               \
            a1 = v_fma(wp, LOAD16(v + 16), a1);                                                          \
            a2 = v_fma(wp, LOAD16(v + 32), a2);                                                          \
            a3 = v_fma(wp, LOAD16(v + 48), a3);                                                          \
        }                                                                                                \
        v_store(acc + d0, a0); v_store(acc + d0 + 16, a1); v_store(acc + d0 + 32, a2);                   \
        v_store(acc + d0 + 48, a3);                                                                      \
    }                                                                                                    \
    for (; d0 + 16 <= dim; d0 += 16) {                                                                   \
        v16 a = v_zero();                                                                                \
        for (int64_t p = 0; p < span; p++) a = v_fma(v_broadcast(w[p]), LOAD16(base + slots[p] * stride + d0), a); \
        v_store(acc + d0, a);                                                                            \
    }                                                                                                    \
    for (; d0 < dim; d0++) {                                                                             \
        float a = 0.f;                                                                                   \
        for (int64_t p = 0; p < span; p++) a = fmaf(w[p], LOAD(base[slots[p] * stride + d0]), a);        \
        acc[d0] = a;                                                                                     \
    }                                                                                                    \
}
DEFINE_VALUES(weighted_values_f32, float, IDENTITY, load16_f32)
DEFINE_VALUES(weighted_values_bf16, uint16_t, bf16_to_f32, load16_bf16)

#define DEFINE_ATTEND_RUN(NAME, T, LOAD, STORE, TRANSPOSE, VALUES)                                                          \
static void NAME(const Problem *pr, const Run *run, int kvh, const int64_t *slots, float *scratch) {    \
    const int group = pr->heads / pr->kv_heads, dim = pr->head_dim, n = run->n;                          \
    const int64_t width = run->end - run->start;                                                         \
    const T *q = (const T *)pr->q, *kc = (const T *)pr->k_cache, *vc = (const T *)pr->v_cache;          \
    float *qf = scratch, *acc = qf + (size_t)n * group * dim;                                          \
    float *keys = acc + (size_t)n * group * dim + dim; /* [dim][LANES]: sixteen keys, transposed */     \
    float *score = keys + (size_t)dim * (LANES + 1); /* [n * group][width], each query's span from its start */ \
    int64_t start[RUN_MAX], end[RUN_MAX];                                                                \
    for (int j = 0; j < n; j++) {                                                                        \
        end[j] = pr->context_len[run->b0 + j];                                                           \
        start[j] = first_position(pr, end[j]);                                                           \
        for (int g = 0; g < group; g++)                                                                  \
            for (int d = 0; d < dim; d++) {                                                              \
                const int64_t at = ((int64_t)(run->b0 + j) * pr->heads + kvh * group + g) * dim + d;     \
                qf[((size_t)j * group + g) * dim + d] = LOAD(q[at]) * pr->scale;                         \
                acc[((size_t)j * group + g) * dim + d] = 0.f;                                            \
            }                                                                                            \
    }                                                                                                    \
    for (int64_t i0 = run->start; i0 < run->end; i0 += LANES) {                                          \
        const int m = run->end - i0 < LANES ? (int)(run->end - i0) : LANES;                              \
        const T *rows16[LANES];                                                                          \
        for (int l = 0; l < LANES; l++)                                                                  \
            rows16[l] = l < m ? kc + (slots[i0 + l - run->start] * pr->kv_heads + kvh) * dim : NULL;     \
        TRANSPOSE(rows16, dim, keys);                                                                    \
        for (int j = 0; j < n; j++) {                                                                    \
            if (i0 + m <= start[j] || i0 >= end[j]) continue;                                            \
            for (int g0 = 0; g0 < group; g0 += HEADS_PER_PASS) {                                          \
                const int h = group - g0 < HEADS_PER_PASS ? group - g0 : HEADS_PER_PASS;                 \
                float scores16[HEADS_PER_PASS][LANES];                                                   \
                score_heads(h, keys, qf + ((size_t)j * group + g0) * dim, dim, scores16);                \
                for (int g = 0; g < h; g++) {                                                            \
                    float *sj = score + ((size_t)j * group + g0 + g) * width;                            \
                    for (int l = 0; l < m; l++)                                                          \
                        if (i0 + l >= start[j] && i0 + l < end[j]) sj[i0 + l - start[j]] = scores16[g][l];   \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
    }                                                                                                    \
    for (int j = 0; j < n; j++)                                                                          \
        for (int g = 0; g < group; g++) softmax_fixed(score + ((size_t)j * group + g) * width, end[j] - start[j]); \
    for (int j = 0; j < n; j++)                                                                          \
        for (int g = 0; g < group; g++)                                                                  \
            VALUES(vc + kvh * dim, pr->kv_heads * dim, slots + (start[j] - run->start),                  \
                   score + ((size_t)j * group + g) * width, end[j] - start[j], dim,                      \
                   acc + ((size_t)j * group + g) * dim);                                                 \
    T *out = (T *)pr->out;                                                                               \
    for (int j = 0; j < n; j++)                                                                          \
        for (int g = 0; g < group; g++)                                                                  \
            for (int d = 0; d < dim; d++)                                                                \
                out[((int64_t)(run->b0 + j) * pr->heads + kvh * group + g) * dim + d] =                  \
                    STORE(acc[((size_t)j * group + g) * dim + d]);                                       \
}

DEFINE_ATTEND_RUN(attend_run_bf16, uint16_t, bf16_to_f32, f32_to_bf16, transpose_keys_bf16, weighted_values_bf16)
DEFINE_ATTEND_RUN(attend_run_f32, float, IDENTITY, IDENTITY, transpose_keys_f32, weighted_values_f32)

typedef void (*attend_run_fn)(const Problem *, const Run *, int, const int64_t *, float *);

/* Whether row b reads the same KV as row b - 1 at one more position (the next prompt token of
 * the same sequence, or of one whose blocks it shares that far). */
static int continues(const Problem *pr, int b) {
    const int64_t length = pr->context_len[b];
    if (length != pr->context_len[b - 1] + 1) return 0;
    const int64_t blocks = (length + pr->block_size - 1) / pr->block_size;
    return memcmp(pr->block_table + (int64_t)b * pr->max_blocks, pr->block_table + (int64_t)(b - 1) * pr->max_blocks,
                  sizeof(int64_t) * blocks) == 0;
}

static int runs_of(const Problem *pr, int batch, Run *runs) {
    int count = 0;
    for (int b = 0; b < batch; b++) {
        if (b > 0 && count && runs[count - 1].n < RUN_MAX && continues(pr, b)) {
            runs[count - 1].n++;
            runs[count - 1].end = pr->context_len[b];
        } else {
            runs[count++] = (Run){ b, 1, first_position(pr, pr->context_len[b]), pr->context_len[b] };
        }
    }
    return count;
}

/* (run, KV head) pairs are the unit of parallel work. */
static int run_portable(const Problem *pr, int batch, int threads, attend_run_fn attend) {
    if (pr->kv_heads < 1 || pr->heads % pr->kv_heads) return -1;
    Run *runs = malloc(sizeof(Run) * (batch > 0 ? batch : 1));
    if (!runs) return -2;
    const int count = runs_of(pr, batch, runs), group = pr->heads / pr->kv_heads;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(|:failed)
    for (int item = 0; item < count * pr->kv_heads; item++) {
        const Run *run = runs + item / pr->kv_heads;
        const int64_t width = run->end - run->start;
        if (width <= 0) continue;
        const size_t floats = (size_t)run->n * group * (2 * pr->head_dim + width) + (size_t)pr->head_dim * (2 + LANES);
        int64_t *slots = malloc(sizeof(int64_t) * width + sizeof(float) * floats);
        if (!slots) { failed = 1; continue; }
        slots_of(pr, run->b0, run->start, width, slots);
        attend(pr, run, item % pr->kv_heads, slots, (float *)(slots + width));
        free(slots);
    }
    free(runs);
    return failed ? -2 : 0;
}

/* --- AVX512-BF16 path: bf16 cache, head_dim a multiple of 64 ---------------------------------- */

#ifdef HAVE_AVX512_BF16
/* The first KV head's pass asks for whole slots (every KV head) a few positions
 * ahead: blocks are scattered, so the hardware prefetcher loses the stream at
 * every block edge, and the later heads then find their rows in cache. */
#define AHEAD 8
static inline void prefetch_row(const uint16_t *row, int elements) {
    for (int offset = 0; offset < elements; offset += 32) __builtin_prefetch(row + offset, 0, 3);
}

/* A thread's next work item, fetched into L2 while it computes the current one. A decode
 * step reads every cached position once, and a sequence's rows come from memory; fetched
 * only as each pass reaches them, the first KV head's passes wait on memory while the later
 * heads' passes (from cache) leave it idle. Spread over the current item's passes, the next
 * item's rows stream in the whole time (docs/performance.md, "Decode attention prefetch").
 * Loads only: no result changes. */
typedef struct {
    const char *k, *v;
    const int64_t *slots; /* the next item's positions; NULL where there is none */
    int64_t span, position;
    int lines;            /* 64-byte lines of one slot's row (every KV head) */
    int64_t row_bytes;
} Lookahead;

/* Asks for the next `positions` positions' key and value rows (L2 hint: they are used
 * after this item, and would only crowd L1). */
static inline void lookahead(Lookahead *la, int positions) {
    for (; positions > 0 && la->position < la->span; positions--, la->position++) {
        const int64_t at = la->slots[la->position] * la->row_bytes;
        for (int line = 0; line < la->lines; line++) {
            __builtin_prefetch(la->k + at + line * 64, 0, 1);
            __builtin_prefetch(la->v + at + line * 64, 0, 1);
        }
    }
}
/* Positions asked for per 16 keys scored, and per 4 value rows read: the next item is in
 * flight by the end of the second of three KV heads' passes. */
#define LOOKAHEAD_PER_KEYS 4

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

/* Lane j of the result is the sum of the 16 lanes of v[j]. A transposing tree of
 * 45 instructions instead of 16 horizontal reductions of ~8 each. */
static inline __m512 sum_lanes16(const __m512 *v) {
    __m512 pair[8], quad[4];
    for (int k = 0; k < 8; k++)  /* per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] */
        pair[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                                _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++)  /* per 128-bit chunk: that chunk's sums of v[4k .. 4k+3] */
        quad[k] = _mm512_add_ps(_mm512_shuffle_ps(pair[2 * k], pair[2 * k + 1], 0x44),
                                _mm512_shuffle_ps(pair[2 * k], pair[2 * k + 1], 0xEE));
    /* Add up the four 128-bit chunks: chunk j of the result gathers quad[j]. */
    const __m512 p = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88),
                                   _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
    const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88),
                                   _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(p, q, 0x88), _mm512_shuffle_f32x4(p, q, 0xDD));
}

/* e^x, x <= 0: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by its Taylor series to
 * r^7 (error < 6e-9), scaled by 2^n. Arguments below -87 give ~0, as expf does. */
static inline __m512 exp512(__m512 x) { return exp_clamped_x16(_mm512_max_ps(x, _mm512_set1_ps(-87.f))); }

static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static void softmax512(float *s, int64_t n) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16)
        top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(n - i), s + i));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m)));
        _mm512_mask_storeu_ps(s + i, k, e);
        total = _mm512_add_ps(total, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        _mm512_mask_storeu_ps(s + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), inv));
    }
}

/* Scores of query head g for keys[0 .. n-1] (n <= 16): one dot product per key in fp32
 * lanes (VDPBF16PS, k-pairs in ascending order), then one transposing reduction for all
 * sixteen. For head_dim 64 and 128 the query's vectors stay in registers for the 16 keys
 * (written out: the generic loop reloads them); the arithmetic is the same for all. */
static inline void score16(const Problem *pr, const uint16_t *qg, const uint16_t *const *keys, int64_t n,
                           float *out) {
    const int pairs = pr->head_dim / 32;
    __m512 acc[16];
#define KEY(j, c) ((__m512bh)_mm512_loadu_si512((const void *)(keys[j] + 32 * (c))))
#define QUERY(c) ((__m512bh)_mm512_loadu_si512((const void *)(qg + 32 * (c))))
    if (pairs == 2) {
        const __m512bh q0 = QUERY(0), q1 = QUERY(1);
        for (int j = 0; j < 16; j++) {
            acc[j] = _mm512_setzero_ps();
            if (j >= n) continue;
            acc[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[j], q0, KEY(j, 0)), q1, KEY(j, 1));
        }
    } else if (pairs == 4) {
        const __m512bh q0 = QUERY(0), q1 = QUERY(1), q2 = QUERY(2), q3 = QUERY(3);
        for (int j = 0; j < 16; j++) {
            acc[j] = _mm512_setzero_ps();
            if (j >= n) continue;
            acc[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[j], q0, KEY(j, 0)), q1, KEY(j, 1));
            acc[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[j], q2, KEY(j, 2)), q3, KEY(j, 3));
        }
    } else {
        for (int j = 0; j < 16; j++) {
            acc[j] = _mm512_setzero_ps();
            if (j >= n) continue;
            for (int c = 0; c < pairs; c++) acc[j] = _mm512_dpbf16_ps(acc[j], QUERY(c), KEY(j, c));
        }
    }
#undef KEY
#undef QUERY
    _mm512_mask_storeu_ps(out, tail_mask(n), _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(pr->scale)));
}

/* Outputs of GT query heads (g0 ..), 64 dims from c: each value row is widened to fp32
 * once and meets every head of the pass while in registers (GT x 4 accumulators). */
#define DEFINE_VALUES_PASS(GT)                                                                           \
static void values_pass_##GT(const Problem *pr, const uint16_t *vc, const int64_t *slots, int64_t span, \
                             int kvh, int c, const float *score, int g0, uint16_t *out_rows, int prefetch,        \
                             Lookahead *la) {                                                            \
    const int dim = pr->head_dim;                                                                        \
    __m512 acc[GT][4];                                                                                   \
    for (int g = 0; g < GT; g++)                                                                         \
        for (int u = 0; u < 4; u++) acc[g][u] = _mm512_setzero_ps();                                     \
    for (int64_t i = 0; i < span; i++) {                                                                 \
        if (prefetch && i + AHEAD < span)                                                                \
            prefetch_row(vc + slots[i + AHEAD] * pr->kv_heads * dim, pr->kv_heads * dim);                \
        if ((i & 3) == 0) lookahead(la, 1);                                                              \
        const uint16_t *v = vc + (slots[i] * pr->kv_heads + kvh) * dim + c;                              \
        const __m512 v0 = bf16x16_to_f32(v), v1 = bf16x16_to_f32(v + 16);                                \
        const __m512 v2 = bf16x16_to_f32(v + 32), v3 = bf16x16_to_f32(v + 48);                           \
        for (int g = 0; g < GT; g++) {                                                                   \
            const __m512 w = _mm512_set1_ps(score[(int64_t)(g0 + g) * span + i]);                        \
            acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);                                               \
            acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);                                               \
            acc[g][2] = _mm512_fmadd_ps(w, v2, acc[g][2]);                                               \
            acc[g][3] = _mm512_fmadd_ps(w, v3, acc[g][3]);                                               \
        }                                                                                                \
    }                                                                                                    \
    for (int g = 0; g < GT; g++) {                                                                       \
        float tmp[64];                                                                                   \
        for (int u = 0; u < 4; u++) _mm512_storeu_ps(tmp + 16 * u, acc[g][u]);                          \
        uint16_t *o = out_rows + (int64_t)(g0 + g) * dim + c;                                            \
        for (int d = 0; d < 64; d++) o[d] = f32_to_bf16(tmp[d]);                                         \
    }                                                                                                    \
}
DEFINE_VALUES_PASS(1)
DEFINE_VALUES_PASS(2)
DEFINE_VALUES_PASS(3)
DEFINE_VALUES_PASS(4)

/* fetched: the item's rows were asked for while the previous item computed. */
static void attend_bf16_avx512(const Problem *pr, int b, int kvh, const int64_t *slots, int64_t span,
                               float *score, int fetched, Lookahead *la) {
    const int group = pr->heads / pr->kv_heads, dim = pr->head_dim;
    const uint16_t *q = (const uint16_t *)pr->q, *kc = (const uint16_t *)pr->k_cache;
    const uint16_t *vc = (const uint16_t *)pr->v_cache;
    const int64_t q_row = (int64_t)b * pr->heads + kvh * group;
    for (int64_t i0 = 0; i0 < span; i0 += 16) {
        const int64_t n = span - i0 < 16 ? span - i0 : 16;
        /* The block's key rows, found once for every query head that shares them. */
        const uint16_t *keys[16];
        for (int j = 0; j < n; j++) keys[j] = kc + (slots[i0 + j] * pr->kv_heads + kvh) * dim;
        lookahead(la, LOOKAHEAD_PER_KEYS);
        if (!fetched && kvh == 0 && i0 + 16 + AHEAD <= span)
            for (int j = 0; j < n; j++) prefetch_row(kc + slots[i0 + j + AHEAD] * pr->kv_heads * dim, pr->kv_heads * dim);
        for (int g = 0; g < group; g++) score16(pr, q + (q_row + g) * dim, keys, n, score + g * span + i0);
    }
    for (int g = 0; g < group; g++) softmax512(score + g * span, span);
    uint16_t *out_rows = (uint16_t *)pr->out + q_row * dim;
    for (int c = 0; c < dim; c += 64)
        for (int g0 = 0; g0 < group; g0 += 4) {
            const int prefetch = !fetched && kvh == 0 && c == 0 && g0 == 0;
            switch (group - g0 < 4 ? group - g0 : 4) {
                case 1: values_pass_1(pr, vc, slots, span, kvh, c, score, g0, out_rows, prefetch, la); break;
                case 2: values_pass_2(pr, vc, slots, span, kvh, c, score, g0, out_rows, prefetch, la); break;
                case 3: values_pass_3(pr, vc, slots, span, kvh, c, score, g0, out_rows, prefetch, la); break;
                default: values_pass_4(pr, vc, slots, span, kvh, c, score, g0, out_rows, prefetch, la); break;
            }
        }
}

/* One unit of parallel work: KV heads first .. last - 1 of row b. */
typedef struct {
    int b, first, last;
    int64_t span;
    int64_t *slots; /* span slots, then room for the scores; NULL when span is 0 */
} Item;

static int item_at(const Problem *pr, int index, int by_head, Item *it) {
    const int group = pr->heads / pr->kv_heads;
    it->b = by_head ? index / pr->kv_heads : index;
    it->first = by_head ? index % pr->kv_heads : 0;
    it->last = by_head ? it->first + 1 : pr->kv_heads;
    const int64_t length = pr->context_len[it->b], start = first_position(pr, length);
    it->span = length - start;
    it->slots = NULL;
    if (it->span <= 0) return 0;
    it->slots = malloc(sizeof(int64_t) * it->span + sizeof(float) * (size_t)group * it->span);
    if (!it->slots) return -1;
    slots_of(pr, it->b, start, it->span, it->slots);
    return 0;
}

static void attend_item(const Problem *pr, const Item *it, int fetched, Lookahead *la) {
    for (int kvh = it->first; kvh < it->last; kvh++)
        attend_bf16_avx512(pr, it->b, kvh, it->slots, it->span, (float *)(it->slots + it->span), fetched, la);
}

/* Sequences are the unit of parallel work: a slot holds every KV head of a position,
 * so one thread walking a sequence reads each cache line once. With fewer sequences
 * than twice the threads, (sequence, KV head) pairs are, so that no thread idles.
 * Items go out one at a time, in order, to whichever thread asks (dynamic scheduling);
 * a thread takes its next item before computing the current one, to fetch it meanwhile
 * (Lookahead), except near the end, where holding one back could leave a thread idle. */
static int run(const Problem *pr, int batch, int threads) {
    if (pr->kv_heads < 1 || pr->heads % pr->kv_heads) return -1;
    const int by_head = batch < 2 * threads;
    const int items = by_head ? batch * pr->kv_heads : batch;
    const int line_count = pr->kv_heads * pr->head_dim * 2 / 64;
    int taken = 0, failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        Item current = { 0 }, next = { 0 };
        int fetched = 0, index = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED);
        if (index < items && item_at(pr, index, by_head, &current)) failed = 1;
        while (index < items && !failed) {
            Lookahead la = { pr->k_cache, pr->v_cache, NULL, 0, 0, line_count, (int64_t)line_count * 64 };
            int after = items;
            if (__atomic_load_n(&taken, __ATOMIC_RELAXED) + threads < items) {
                after = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED);
                if (after < items && item_at(pr, after, by_head, &next)) failed = 1;
                la.slots = after < items ? next.slots : NULL;
                la.span = la.slots ? next.span : 0;
            }
            if (current.slots) attend_item(pr, &current, fetched, &la);
            free(current.slots);
            current.slots = NULL;
            if (after < items) {
                /* an item only partly fetched (longer than the one it rode on) keeps the
                 * first head's own prefetch */
                current = next, fetched = la.position >= la.span;
            } else {
                after = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED), fetched = 0;
                if (after < items && item_at(pr, after, by_head, &current)) failed = 1;
            }
            index = after;
        }
        free(current.slots);
    }
    return failed ? -2 : 0;
}
#endif

#define PROBLEM_ARGS                                                                                     \
    const void *q, const void *k_cache, const void *v_cache, const int64_t *block_table,                \
    const int64_t *context_len, void *out, int batch, int heads, int kv_heads, int head_dim,             \
    int max_blocks, int block_size, float scale, int window, int threads
#define PROBLEM { q, k_cache, v_cache, block_table, context_len, out, heads, kv_heads, head_dim,        \
                  max_blocks, block_size, window, scale }

int paged_decode_bf16(PROBLEM_ARGS) {
    const Problem pr = PROBLEM;
#ifdef HAVE_AVX512_BF16
    if (head_dim % 64 == 0) return run(&pr, batch, threads);
#endif
    return run_portable(&pr, batch, threads, attend_run_bf16);
}

int paged_decode_f32(PROBLEM_ARGS) {
    const Problem pr = PROBLEM;
    return run_portable(&pr, batch, threads, attend_run_f32);
}
