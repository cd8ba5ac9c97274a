/*
 * A whole Llama-family decoder layer in one call: the same kernels FastDecoderLayer calls one
 * by one from Python (shard/numerics/decoder_layers.py), called here in the same order on the same
 * buffers, so the result is the very same bits with none of the per-call Python, ctypes and
 * tensor bookkeeping in between (docs/performance.md, "Fewer calls per layer and per step").
 *
 *   h    = rms_norm(x)
 *   qkv  = h @ Wqkv (+ bias)                 one fused product, rows [q | k | v]
 *   rotary on the q and k heads of qkv, in place
 *   k, v -> the layer's KV cache at the step's slots
 *   attn = paged attention of q over each query's context (its own block table row)
 *   out  = x + attn @ Wo                     (the residual added as the product is stored)
 *   h    = rms_norm(out)
 *   gu   = h @ Wgate_up;  a = silu(gate) * up
 *   out  = out + a @ Wdown                   (in place: each element reads its residual once)
 *
 * With LoRA adapters in the step (shard/numerics/lora.py), each product gets its rows' adapter
 * deltas right after it (lora.c), as FastDecoderLayer adds them on its Python path.
 *
 * decoder_layers runs a model's whole stack of layers in one call, each layer reading the
 * previous one's output: the same per-layer calls without the Python between the layers.
 *
 * The kernels live in their own shared objects (linear.c, layer_ops.c, paged_decode.c) and
 * are reached through the function pointers the caller passes in Kernels: one build of each,
 * so there is one copy of the arithmetic. Types: 0 fp32, 1 bf16; activations, norm weights,
 * cos/sin and the KV cache share one type (the caller checks).
 */
#include <stdint.h>
#include <string.h>

typedef int (*linear_fn)(const void *x, int xtype, const void *packed, int wtype, const float *scales,
                         const float *offsets, const float *bias, const void *residual, void *y, int ytype,
                         int64_t M, int64_t K, int64_t N, int threads);
typedef void (*norm_fn)(const void *x, int64_t stride_in, const void *weight, float eps, void *out,
                        int64_t stride_out, int64_t rows, int64_t width, int type, int threads);
typedef void (*rotary_fn)(void *x, int64_t stride, int64_t tokens, int heads, int dim, const void *cos,
                          const void *sin, int type, int threads);
typedef void (*silu_mul_fn)(const void *product, int64_t stride, int64_t rows, int64_t width, void *out,
                            int type, int threads);
typedef int (*attention_fn)(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_table,
                            const int64_t *context_len, void *out, int batch, int heads, int kv_heads,
                            int head_dim, int max_blocks, int block_size, float scale, int window, int threads);

typedef int (*lora_fn)(int type, const void *x, int64_t x_stride, void *y, int64_t y_stride, int64_t rows,
                       int64_t in, const int32_t *slot, int32_t slots, int32_t projections, const int64_t *columns,
                       const void *const *a, const void *const *bt, const int32_t *rank, int threads);

typedef struct {
    linear_fn linear;
    norm_fn rms_norm;
    rotary_fn rotary;
    silu_mul_fn silu_mul;
    attention_fn attention;
    lora_fn lora;
} Kernels;

/* One group of projections sharing an input (lora.c's tables); a == NULL: no adapter of the
 * step adapts any of them in this layer. */
typedef struct {
    const void *const *a, *const *bt;           /* weights in the activation type */
    const int32_t *rank;
    const int64_t *columns;
    int32_t projections;
} LoraGroup;

/* One packed weight of linear.c: values, per-group scales and offsets (4-/8-bit), bias (fp32). */
typedef struct {
    const void *packed;
    const float *scales, *offsets, *bias;
    int wtype;
    int64_t in, out;
} Linear;

/* What stays from step to step: the layer's weights and shapes. */
typedef struct {
    const void *input_norm, *post_norm;
    float input_eps, post_eps, scale;
    Linear qkv, o, gate_up, down;
    int layer, heads, kv_heads, head_dim, window;
    int64_t hidden, intermediate;
} Layer;

/* What one step shares across its layers: the tokens, where their KV goes and what each query
 * reads, and scratch buffers sized for the step. */
typedef struct {
    const Kernels *kernels;
    int64_t tokens;
    int type, threads;
    const int64_t *slots;                    /* [tokens] KV slot of each new token */
    const int64_t *tables, *context_len;     /* [tokens, max_blocks], [tokens]: per query */
    int max_blocks, block_size;
    const int64_t *keys, *values;            /* [layers] addresses of each layer's K and V cache */
    const void *cos, *sin;                   /* [tokens, head_dim] */
    void *normed, *qkv, *q, *attention, *gate_up, *activated;
    const int32_t *lora_slot;                /* [tokens] each row's adapter among the step's, -1: none */
    int32_t lora_slots, lora_layers;         /* adapters of the step; layers lora covers */
    const LoraGroup *lora;                   /* [lora_layers * 4]: qkv, o, gate_up, down; NULL: none */
} Step;

enum { LORA_QKV, LORA_O, LORA_GATE_UP, LORA_DOWN };

/* y [tokens, y_width] += the step's adapter deltas of the layer's group from x [tokens, in]. */
static int adapt(const Step *s, const Layer *l, int group, const void *x, int64_t in, void *y, int64_t y_width) {
    if (s->lora == NULL || l->layer >= s->lora_layers) return 0;
    const LoraGroup *g = &s->lora[(int64_t)l->layer * 4 + group];
    if (g->a == NULL) return 0;
    return s->kernels->lora(s->type, x, in, y, y_width, s->tokens, in, s->lora_slot, s->lora_slots, g->projections,
                            g->columns, g->a, g->bt, g->rank, s->threads);
}

static int project(const Step *s, const Linear *w, const void *x, const void *residual, void *y) {
    return s->kernels->linear(x, s->type, w->packed, w->wtype, w->scales, w->offsets, w->bias, residual, y, s->type,
                              s->tokens, w->in, w->out, s->threads);
}

/* Each token's new K and V (columns of qkv past the q heads) into its slot of the layer's cache,
 * and its q heads into a contiguous [tokens, heads, head_dim] for the attention kernel. */
static void scatter_qkv(const Layer *l, const Step *s) {
    const size_t element = s->type == 0 ? 4 : 2;
    const size_t q_bytes = (size_t)l->heads * l->head_dim * element;
    const size_t kv_bytes = (size_t)l->kv_heads * l->head_dim * element;
    const size_t row_bytes = (size_t)l->qkv.out * element;
    char *k_cache = (char *)(intptr_t)s->keys[l->layer], *v_cache = (char *)(intptr_t)s->values[l->layer];
    for (int64_t t = 0; t < s->tokens; t++) {
        const char *row = (const char *)s->qkv + t * row_bytes;
        memcpy((char *)s->q + t * q_bytes, row, q_bytes);
        memcpy(k_cache + s->slots[t] * kv_bytes, row + q_bytes, kv_bytes);
        memcpy(v_cache + s->slots[t] * kv_bytes, row + q_bytes + kv_bytes, kv_bytes);
    }
}

/* x, out [tokens, hidden] (out may not be x). Returns 0, or the first failing kernel's status. */
int decoder_layer(const Layer *l, const Step *s, const void *x, void *out) {
    const Kernels *k = s->kernels;
    const int64_t T = s->tokens, qkv_width = l->qkv.out;
    int status;
    k->rms_norm(x, l->hidden, l->input_norm, l->input_eps, s->normed, l->hidden, T, l->hidden, s->type, s->threads);
    if ((status = project(s, &l->qkv, s->normed, NULL, s->qkv))) return status;
    if ((status = adapt(s, l, LORA_QKV, s->normed, l->hidden, s->qkv, qkv_width))) return status;
    const size_t element = s->type == 0 ? 4 : 2;
    char *k_heads = (char *)s->qkv + (size_t)l->heads * l->head_dim * element;
    k->rotary(s->qkv, qkv_width, T, l->heads, l->head_dim, s->cos, s->sin, s->type, s->threads);
    k->rotary(k_heads, qkv_width, T, l->kv_heads, l->head_dim, s->cos, s->sin, s->type, s->threads);
    scatter_qkv(l, s);
    status = k->attention(s->q, (const void *)(intptr_t)s->keys[l->layer], (const void *)(intptr_t)s->values[l->layer],
                          s->tables, s->context_len, s->attention, (int)T, l->heads, l->kv_heads, l->head_dim,
                          s->max_blocks, s->block_size, l->scale, l->window, s->threads);
    if (status) return status;
    if ((status = project(s, &l->o, s->attention, x, out))) return status;
    if ((status = adapt(s, l, LORA_O, s->attention, l->o.in, out, l->hidden))) return status;
    k->rms_norm(out, l->hidden, l->post_norm, l->post_eps, s->normed, l->hidden, T, l->hidden, s->type, s->threads);
    if ((status = project(s, &l->gate_up, s->normed, NULL, s->gate_up))) return status;
    if ((status = adapt(s, l, LORA_GATE_UP, s->normed, l->hidden, s->gate_up, 2 * l->intermediate))) return status;
    k->silu_mul(s->gate_up, 2 * l->intermediate, T, l->intermediate, s->activated, s->type, s->threads);
    if ((status = project(s, &l->down, s->activated, out, out))) return status;
    return adapt(s, l, LORA_DOWN, s->activated, l->intermediate, out, l->hidden);
}

/* layers[0..count) in order, x the first one's input (only read). The outputs alternate between
 * out and spare (a layer may not write its input) so that the last layer's lands in out.
 * Returns 0, or the first failing kernel's status. */
int decoder_layers(const Layer *const *layers, int count, const Step *s, const void *x, void *out, void *spare) {
    const void *in = x;
    for (int i = 0; i < count; i++) {
        void *dst = (count - 1 - i) % 2 == 0 ? out : spare;
        int status = decoder_layer(layers[i], s, in, dst);
        if (status) return status;
        in = dst;
    }
    return 0;
}
