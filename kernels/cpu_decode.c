/* The CPU's small per-layer operators in C: what sits between a decoder layer's matmuls.
 *
 * On a CPU a batch-1 decode step of a small model is mostly PyTorch dispatching operators on
 * vectors of a few hundred elements (an RMSNorm is ~10 operators, rotary and the K/V write ~15,
 * attention over the paged cache ~10). Each function here is one call doing the same
 * arithmetic as the reference beside it in kernels/, in fp32, rounding where the reference rounds
 * (bf16 tensors: after each operator the reference runs in bf16). Compiled and loaded by
 * kernels/cpu_native.py; single-threaded (the matmuls keep PyTorch's threads). Every tensor is
 * contiguous; dtype codes: 0 float32, 1 bfloat16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };

typedef union {
    uint32_t u;
    float f;
} bits32;

static inline float bf16_to_f32(uint16_t h) {
    bits32 v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch */
    bits32 v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* NaN stays NaN */
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

static inline float round_to(float f, int dt) { return dt == BF16 ? bf16_to_f32(f32_to_bf16(f)) : f; }

static void load(const void *src, int dt, int64_t offset, float *dst, int64_t n) {
    if (dt == F32) {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    } else {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    }
}

static void store(void *dst, int dt, int64_t offset, const float *src, int64_t n) {
    if (dt == F32) {
        memcpy((float *)dst + offset, src, (size_t)n * sizeof(float));
    } else {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    }
}

/* exp(x) in fp32 that vectorizes (libm's expf does not without -ffast-math): x = k ln2 + r,
 * |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial (about 1 ulp), times 2^k as two powers
 * of two built in the exponent bits (so that neither overflows at the ends of the range). x is
 * clamped to [-104, 89]: 0 below, inf above (exp(89) overflows, as expf does). */
static inline float exp_f32(float x) {
    x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
    float kf = x * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer */
    bits32 kb;
    kb.f = kf;
    int32_t k = (int32_t)kb.u - 0x4B400000;
    kf -= 12582912.0f;
    float r = x - kf * 0.693359375f;
    r = r + kf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t k1 = k / 2;
    bits32 s1, s2;
    s1.u = (uint32_t)(k1 + 127) << 23;
    s2.u = (uint32_t)(k - k1 + 127) << 23;
    return p * s1.f * s2.f;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* x <- rms_norm(x) * w over n elements, in place, rounded as the reference rounds in dtype dt:
 * fp32: x * rsqrt(mean(x^2) + eps) * w; bf16: w * bf16(x * rsqrt(...)), rounded again. */
static void rms_norm_row(float *x, const float *w, int64_t n, float eps, int dt) {
    float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    if (dt == BF16) {
        for (int64_t i = 0; i < n; i++) x[i] = round_to(w[i] * round_to(x[i] * r, BF16), BF16);
    } else {
        for (int64_t i = 0; i < n; i++) x[i] = x[i] * r * w[i];
    }
}

/* out = rms_norm(x [+ residual]) * w for `rows` rows of `dim`; given a residual, residual_out
 * gets x + residual (rounded to dt), which is what gets normalized. x, residual, residual_out in
 * dt; w in w_dt; out in out_dt (the model's dtype, or the next matmul's activation dtype: the
 * norm's fp32 result rounded once). */
int pg_rms_norm(const void *x, const void *residual, void *residual_out, int dt, const void *w, int w_dt,
                void *out, int out_dt, int64_t rows, int64_t dim, float eps) {
    float *buf = malloc((size_t)(3 * dim) * sizeof(float));
    if (!buf) return 1;
    float *row = buf, *wf = buf + dim, *res = buf + 2 * dim;
    load(w, w_dt, 0, wf, dim);
    for (int64_t t = 0; t < rows; t++) {
        load(x, dt, t * dim, row, dim);
        if (residual) {
            load(residual, dt, t * dim, res, dim);
            for (int64_t i = 0; i < dim; i++) row[i] = round_to(row[i] + res[i], dt);
            store(residual_out, dt, t * dim, row, dim);
        }
        rms_norm_row(row, wf, dim, eps, dt);
        store(out, out_dt, t * dim, row, dim);
    }
    free(buf);
    return 0;
}

/* silu(gate) * up for x = [gate, up] of `rows` rows of 2 * d: out [rows, d]. */
int pg_silu_and_mul(const void *x, int dt, void *out, int out_dt, int64_t rows, int64_t d) {
    float *buf = malloc((size_t)(2 * d) * sizeof(float));
    if (!buf) return 1;
    for (int64_t t = 0; t < rows; t++) {
        load(x, dt, t * 2 * d, buf, 2 * d);
        const float *up = buf + d;
        if (dt == BF16) {
            for (int64_t i = 0; i < d; i++) buf[i] = round_to(round_to(buf[i] / (1.0f + exp_f32(-buf[i])), dt) * up[i], dt);
        } else {
#pragma omp simd
            for (int64_t i = 0; i < d; i++) buf[i] = buf[i] / (1.0f + exp_f32(-buf[i])) * up[i];
        }
        store(out, out_dt, t * d, buf, d);
    }
    free(buf);
    return 0;
}

/* Neox rotary of one head in place: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
 * bf16: the reference casts cos and sin to bf16 and rounds x * cos before the addcmul. */
static void rotate(float *x, const float *cos, const float *sin, int64_t d, int dt, float *tmp) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) {
        float r = i < half ? -x[i + half] : x[i - half];
        tmp[i] = round_to(round_to(x[i] * cos[i], dt) + r * sin[i], dt);
    }
    memcpy(x, tmp, (size_t)d * sizeof(float));
}

/* From qkv [T, (H + 2 KV) D] (dt): q normed per head (if q_norm is given, k then too) and rotated
 * into q_out [T, H, D] (dt); k (normed, rotated) and v written to the caches [blocks, block_size,
 * KV, D] (dt) at slot_mapping[t] (negative: padding, not written). cos, sin: [T, D] fp32. */
int pg_rope_write_kv(const void *qkv, int dt, int64_t T, int64_t H, int64_t KV, int64_t D, const float *cos,
                     const float *sin, const void *q_norm, const void *k_norm, int norm_dt, float eps,
                     void *k_cache, void *v_cache, const int64_t *slot_mapping, void *q_out) {
    int64_t width = (H + 2 * KV) * D;
    float *buf = malloc((size_t)(width + 4 * D) * sizeof(float));
    if (!buf) return 1;
    float *c = buf + width, *s = c + D, *tmp = s + D, *wq = tmp + D, *wk = NULL;
    float *wbuf = NULL;
    if (q_norm) {
        wbuf = malloc((size_t)(2 * D) * sizeof(float));
        if (!wbuf) {
            free(buf);
            return 1;
        }
        wq = wbuf;
        wk = wbuf + D;
        load(q_norm, norm_dt, 0, wq, D);
        load(k_norm, norm_dt, 0, wk, D);
    }
    for (int64_t t = 0; t < T; t++) {
        float *row = buf;
        load(qkv, dt, t * width, row, width);
        for (int64_t i = 0; i < D; i++) {
            c[i] = round_to(cos[t * D + i], dt);
            s[i] = round_to(sin[t * D + i], dt);
        }
        for (int64_t h = 0; h < H + KV; h++) {
            float *x = row + h * D;
            if (q_norm) rms_norm_row(x, h < H ? wq : wk, D, eps, dt);
            rotate(x, c, s, D, dt, tmp);
        }
        store(q_out, dt, t * H * D, row, H * D);
        int64_t slot = slot_mapping[t];
        if (slot >= 0) {
            store(k_cache, dt, slot * KV * D, row + H * D, KV * D);
            store(v_cache, dt, slot * KV * D, row + (H + KV) * D, KV * D);
        }
    }
    free(wbuf);
    free(buf);
    return 0;
}

/* One query per sequence over its paged context: q [B, H, D] (dt) -> out [B, H, D] (out_dt).
 * Sequence b's positions 0 .. seq_lens[b] - 1 live at cache row block_tables[b][j / bs] * bs +
 * j % bs (caches [blocks, bs, KV, D] in cache_dt); query head h reads KV head h / (H / KV).
 * Softmax in fp32 with its maximum subtracted, as SDPA does. */
int pg_decode_attention(const void *q, int dt, const void *k_cache, const void *v_cache, int cache_dt,
                        const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens, int64_t B,
                        int64_t H, int64_t KV, int64_t D, int64_t block_size, float scale, void *out,
                        int out_dt) {
    int64_t group = H / KV, max_len = 0, total = 0;
    for (int64_t b = 0; b < B; b++) {
        max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
        total += seq_lens[b];
    }
    /* per thread, for one (sequence, KV head): its group's queries, scores [group, max_len],
     * outputs, one K/V row */
    size_t n = (size_t)(group * D + group * max_len + group * D + D);
    int failed = 0;
    /* (sequence, KV head) pairs over the threads, once there is enough to share */
#pragma omp parallel if (total * H * D >= 65536)
    {
        float *buf = malloc(n * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t g = 0; g < KV; g++) {
                if (!buf) continue;
                float *qs = buf, *p = qs + group * D, *acc = p + group * max_len, *kv = acc + group * D;
                int64_t len = seq_lens[b];
                const int32_t *table = block_tables + b * table_stride;
                load(q, dt, (b * H + g * group) * D, qs, group * D);
                for (int64_t j = 0; j < len; j++) {
                    int64_t row = ((int64_t)table[j / block_size] * block_size + j % block_size) * KV + g;
                    load(k_cache, cache_dt, row * D, kv, D);
                    for (int64_t i = 0; i < group; i++) p[i * max_len + j] = dot(qs + i * D, kv, D) * scale;
                }
                for (int64_t i = 0; i < group; i++) {
                    float *pi = p + i * max_len, m = -INFINITY, sum = 0.0f;
                    for (int64_t j = 0; j < len; j++) m = pi[j] > m ? pi[j] : m;
#pragma omp simd reduction(+ : sum)
                    for (int64_t j = 0; j < len; j++) {
                        pi[j] = exp_f32(pi[j] - m);
                        sum += pi[j];
                    }
                    float inv = 1.0f / sum;
                    for (int64_t j = 0; j < len; j++) pi[j] *= inv;
                }
                memset(acc, 0, (size_t)(group * D) * sizeof(float));
                for (int64_t j = 0; j < len; j++) {
                    int64_t row = ((int64_t)table[j / block_size] * block_size + j % block_size) * KV + g;
                    load(v_cache, cache_dt, row * D, kv, D);
                    for (int64_t i = 0; i < group; i++) {
                        float pj = p[i * max_len + j], *a = acc + i * D;
#pragma omp simd
                        for (int64_t e = 0; e < D; e++) a[e] += pj * kv[e];
                    }
                }
                store(out, out_dt, (b * H + g * group) * D, acc, group * D);
            }
        }
        free(buf);
    }
    return failed;
}

/* ---- Quantized matmuls: 4-bit weights (GGUF's formats as kernels/quant_linear.py's parts) and
 * the LM head's int8 rows, against activations quantized to int8 in the call ----
 *
 * Integer dot products as llama.cpp's CPU kernels do them (AVX512-VNNI's vpdpbusd: 64 unsigned
 * x signed byte products a µop), so a weight costs a nibble of memory and a fraction of an
 * instruction, and the matmul runs at the memory's speed. x is quantized per group of 32 inputs
 * (4-bit) or 64 (int8) with scale max|x| / 127; the 4-bit weights' zeros multiply the sum of
 * the quantized x (llama.cpp's Q8_1). Rows are shared among OpenMP threads (PyTorch's own runtime: this library's libgomp
 * is the one PyTorch loaded). Only built where the CPU has AVX512-VNNI; elsewhere PyTorch's
 * kernels run. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define PG_VNNI 1
#else
#define PG_VNNI 0
#endif

int pg_int8_dot_supported(void) { return PG_VNNI; }

#if PG_VNNI
#define XQ_PARTS 2 /* int8 parts of x: see quantize_groups */
#define XQ_QUAD (XQ_PARTS * 128) /* bytes of quantized x a quad of groups takes */
/* The 4-bit layout: a row's groups of 32 inputs in quads of 4 groups (G padded with zero groups
 * to 4Q), a quad in 64 bytes read as 16 lanes of 4 bytes, lane l holding group l % 4's inputs
 * 4 (l / 4) .. + 3 in its low nibbles and 16 + 4 (l / 4) .. + 3 in its high ones. So vpdpbusd
 * leaves lane l with a partial dot product of group l % 4 alone, and one 4-float broadcast of the
 * quad's scales (A B C D A B C D ...) scales all 16 lanes. The activations are quantized into
 * the same lane order: xq [M, Q, 2, 64] (the low-nibble inputs, then the high ones). */
/* xq [M, Q, XQ_PARTS, 2, 64]: per quad, x's int8 part in the lane order above (low-nibble
 * inputs, then high), then the int8 part of what it leaves at a 256th of its scale: x = (256 x1 +
 * x2) dx, dx = s / 256, s = max|x| / 127, within dx / 2 (the group's largest input to ~15 bits).
 * A third part changed nothing measurable at the embedded model (logits within 1.124 against
 * 1.130 of transformers', the top-2 gap within 0.163 against 0.162) and cost ~25% of a step;
 * one part alone (llama.cpp's Q8_1) doubled the gap error. dx [M, G16]: each group's dx; sx
 * [M, G16]: each group's sum of the quantized x (G16: G rounded up to 16, zeros past G). */
static void quantize_groups(const void *x, int dt, int64_t M, int64_t rows, int64_t K, int64_t Q, int64_t G16,
                            int8_t *xq, float *dx, float *sx) {
    int64_t G = K / 32;
    memset(dx, 0, (size_t)(rows * G16) * sizeof(float)); /* rows >= M: the rest stay zero */
    memset(sx, 0, (size_t)(rows * G16) * sizeof(float));
    memset(xq, 0, (size_t)(rows * Q * XQ_QUAD));
#pragma omp parallel for schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; m++) {
        float v[32];
        int8_t qp[XQ_PARTS][32];
        for (int64_t g = 0; g < G; g++) {
            load(x, dt, m * K + g * 32, v, 32);
            /* AVX-512, 32 inputs in two vectors: the scalar steps exactly (round to nearest even as
             * lrintf, the rest by one fused multiply-add as fmaf); ~0.9 ms of a step when scalar */
            __m512 r0 = _mm512_loadu_ps(v), r1 = _mm512_loadu_ps(v + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(r0), _mm512_abs_ps(r1)));
            float step = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            float unit = step; /* each part's step: the last one's / 256 */
            const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f), vinv = _mm512_set1_ps(inv);
            __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
            for (int k = 0; k < XQ_PARTS; k++) {
                const __m512 mul = _mm512_set1_ps((float)(1 << (8 * k))), sk = _mm512_set1_ps(step / (float)(1 << (8 * k)));
                __m512 t0 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_mul_ps(r0, vinv), mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512 t1 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_mul_ps(r1, vinv), mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                t0 = _mm512_max_ps(_mm512_min_ps(t0, lim), nlim);
                t1 = _mm512_max_ps(_mm512_min_ps(t1, lim), nlim);
                r0 = _mm512_fnmadd_ps(t0, sk, r0);
                r1 = _mm512_fnmadd_ps(t1, sk, r1);
                __m512i i0 = _mm512_cvtps_epi32(t0), i1 = _mm512_cvtps_epi32(t1);
                q0 = _mm512_add_epi32(_mm512_slli_epi32(q0, 8), i0);
                q1 = _mm512_add_epi32(_mm512_slli_epi32(q1, 8), i1);
                _mm_storeu_si128((__m128i *)qp[k], _mm512_cvtsepi32_epi8(i0));
                _mm_storeu_si128((__m128i *)(qp[k] + 16), _mm512_cvtsepi32_epi8(i1));
            }
            int64_t qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            for (int k = 1; k < XQ_PARTS; k++) unit /= 256.0f;
            dx[m * G16 + g] = unit;
            /* the sum of the quantized x, not of x: w = q d + (zp - 8 d) then sums exactly over x^,
             * so a zero point that offsets q (Q4_0's -8 d) cancels instead of adding its own error */
            sx[m * G16 + g] = (float)((double)unit * (double)qsum);
            /* byte 16 r + 4 slot + e of each 64-byte half: lane 4 r + slot, input 4 r + e */
            int8_t *part = xq + (m * Q + g / 4) * XQ_QUAD + 4 * (g % 4);
            for (int k = 0; k < XQ_PARTS; k++) {
                for (int r = 0; r < 4; r++) {
                    memcpy(part + 128 * k + 16 * r, qp[k] + 4 * r, 4);
                    memcpy(part + 128 * k + 64 + 16 * r, qp[k] + 16 + 4 * r, 4);
                }
            }
        }
    }
}
#endif

#if PG_VNNI
static inline __m512 bf16x16(const uint16_t *p) { /* 16 bf16 values widened to fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* A weight row's group scales (dr, zr: bf16 d and z, G16 of them) against `rows` rows of x (dx,
 * sx: theirs, G16 apart): ds[i G16 + g] = d dx, the quads' scales; zacc[i] += (z - 8 d) sx, the
 * zero points' share (w = q d + (z - 8 d)). The same operations whatever `rows`. */
static inline void row_scales(const uint16_t *dr, const uint16_t *zr, int64_t G16, const float *dx, const float *sx,
                              int rows, float *ds, __m512 *zacc) {
    for (int64_t g = 0; g < G16; g += 16) {
        __m512 dv = bf16x16(dr + g);
        __m512 mv = _mm512_fmadd_ps(dv, _mm512_set1_ps(-8.0f), bf16x16(zr + g));
        for (int i = 0; i < rows; i++) {
            _mm512_storeu_ps(ds + i * G16 + g, _mm512_mul_ps(dv, _mm512_loadu_ps(dx + i * G16 + g)));
            zacc[i] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(sx + i * G16 + g), zacc[i]);
        }
    }
}

/* acc + one quad's dot products (weights' nibbles lo, hi; x's two int8 parts at xr) x the quad's
 * 4 group scales (ds, broadcast): the one sequence of operations every row goes through. */
static inline __m512 quad_fma(__m512i lo, __m512i hi, const int8_t *xr, const float *ds, __m512 acc) {
    /* |a part's sum| <= 8 * 15 * 127 a lane: 256^(parts - 1) times it fits in 31 bits up to 3 parts */
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < XQ_PARTS; k++) {
        __m512i part = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(xr + 128 * k)));
        part = _mm512_dpbusd_epi32(part, hi, _mm512_loadu_si512((const void *)(xr + 128 * k + 64)));
        sum = _mm512_add_epi32(_mm512_slli_epi32(sum, 8), part);
    }
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_broadcast_f32x4(_mm_loadu_ps(ds)), acc);
}
#endif

/* y [M, N] (y_dt) = x [M, K] (x_dt) W^T, W the sum of P parts of N rows: nib [P N, Q, 64] (the
 * lane layout above), d and zp [P N, G16] bf16 (zeros past G): w = (q - 8) d + zp, PyTorch's int4
 * form, whose zero is near the group's centre and so rounds to bf16 with a small error (storing
 * q d + mn instead, mn ~ -8 d, moved the embedded model's logits by ~0.3). */
int pg_int4_matmul(const void *x, int x_dt, int64_t M, int64_t K, const uint8_t *nib, const uint16_t *d,
                   const uint16_t *zp, int64_t P, int64_t N, int64_t Q, int64_t G16, void *y, int y_dt) {
#if PG_VNNI
    int64_t M4 = (M + 3) / 4 * 4; /* the 4-row loop reads zero rows past M */
    int8_t *xq = malloc((size_t)(M4 * Q * XQ_QUAD));
    float *dx = malloc((size_t)(M4 * G16) * sizeof(float)), *sx = malloc((size_t)(M4 * G16) * sizeof(float));
    if (!xq || !dx || !sx) {
        free(xq);
        free(dx);
        free(sx);
        return 1;
    }
    quantize_groups(x, x_dt, M, M4, K, Q, G16, xq, dx, sx);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    int failed = 0;
#pragma omp parallel
    {
        float *ds = malloc((size_t)(4 * G16) * sizeof(float)); /* d * dx for a row and 4 rows of x */
        if (!ds) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < N; nb += 8) { /* blocks of 8 weight rows */
          int64_t nend = nb + 8 < N ? nb + 8 : N;
          if (!ds) continue;
          /* With many rows of x, a block's weight rows each meet a chunk of x while it is in L1. */
          for (int64_t m0 = 0; m0 < (M == 1 ? 1 : M); m0 += 4) {
          for (int64_t n = nb; n < nend; n++) {
            if (M == 1) { /* a decode row: everything in registers */
                __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), zacc = _mm512_setzero_ps();
                for (int64_t p = 0; p < P; p++) {
                    int64_t r = p * N + n;
                    const uint8_t *wr = nib + r * Q * 64;
                    row_scales(d + r * G16, zp + r * G16, G16, dx, sx, 1, ds, &zacc);
                    for (int64_t q = 0; q < Q; q++) {
                        __m512i v = _mm512_loadu_si512((const void *)(wr + q * 64));
                        __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                        if (q & 1) acc1 = quad_fma(lo, hi, xq + q * XQ_QUAD, ds + 4 * q, acc1);
                        else acc0 = quad_fma(lo, hi, xq + q * XQ_QUAD, ds + 4 * q, acc0);
                    }
                }
                float out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), zacc));
                store(y, y_dt, n, &out, 1);
                continue;
            }
            /* Rows of x 4 at a time (xq has zero rows up to a multiple of 4), each row's sums in the
             * same order as the single-row path above: a row's result does not depend on M. */
            {
                __m512 a0[4], a1[4], z[4];
                for (int i = 0; i < 4; i++) a0[i] = a1[i] = z[i] = _mm512_setzero_ps();
                for (int64_t p = 0; p < P; p++) {
                    int64_t r = p * N + n;
                    const uint8_t *wr = nib + r * Q * 64;
                    row_scales(d + r * G16, zp + r * G16, G16, dx + m0 * G16, sx + m0 * G16, 4, ds, z);
                    for (int64_t q = 0; q < Q; q += 2) { /* even quads into a0, odd into a1 */
                        int two = q + 1 < Q;
                        __m512i v0 = _mm512_loadu_si512((const void *)(wr + q * 64));
                        __m512i v1 = two ? _mm512_loadu_si512((const void *)(wr + q * 64 + 64)) : _mm512_setzero_si512();
                        __m512i lo0 = _mm512_and_si512(v0, mask), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), mask);
                        __m512i lo1 = _mm512_and_si512(v1, mask), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), mask);
#pragma GCC unroll 4
                        for (int i = 0; i < 4; i++) {
                            a0[i] = quad_fma(lo0, hi0, xq + ((m0 + i) * Q + q) * XQ_QUAD, ds + i * G16 + 4 * q, a0[i]);
                            if (two) a1[i] = quad_fma(lo1, hi1, xq + ((m0 + i) * Q + q + 1) * XQ_QUAD, ds + i * G16 + 4 * q + 4, a1[i]);
                        }
                    }
                }
                for (int64_t i = 0; i < 4 && m0 + i < M; i++) {
                    float out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[i], a1[i]), z[i]));
                    store(y, y_dt, (m0 + i) * N + n, &out, 1);
                }
            }
          }
          }
        }
        free(ds);
    }
    free(xq);
    free(dx);
    free(sx);
    return failed;
#else
    (void)x, (void)x_dt, (void)M, (void)K, (void)nib, (void)d, (void)zp, (void)P, (void)N, (void)Q, (void)G16;
    (void)y, (void)y_dt;
    return 2;
#endif
}

/* y [M, N] (y_dt) = x [M, K] (x_dt) W^T for int8 rows stored as w + 128: wu [N, Kp] uint8 (Kp = 64
 * G, zero-padded: byte 128), scale [N] fp32. x quantized per group of 64 inputs in two int8 parts
 * as the 4-bit kernel's (x = (256 x1 + x2) dx, each input within dx / 2): one part measured tail
 * logits up to ~0.4 further from fp32's at the embedded model (its best 32 are rescored exactly
 * anyway). */
int pg_int8_matmul(const void *x, int x_dt, int64_t M, int64_t K, const uint8_t *wu, const float *scale, int64_t N,
                   int64_t G, void *y, int y_dt) {
#if PG_VNNI
    int64_t Kp = 64 * G;
    int8_t *xq = calloc((size_t)(M * 2 * Kp), 1); /* [M, 2 parts, Kp] */
    /* [M, 2 parts, G, 16 lanes]: 128 x the lane's 4 inputs, the stored weights' +128 taken off each
     * lane's integer sum (exact; subtracting it in fp32 after the sums cancelled digits) */
    int32_t *off = malloc((size_t)(M * 2 * Kp / 4) * sizeof(int32_t));
    float *dx = malloc((size_t)(M * G) * sizeof(float));
    float *v = malloc((size_t)K * sizeof(float));
    if (!xq || !off || !dx || !v) {
        free(xq);
        free(off);
        free(dx);
        free(v);
        return 1;
    }
    for (int64_t m = 0; m < M; m++) {
        load(x, x_dt, m * K, v, K);
        int8_t *x1 = xq + m * 2 * Kp, *x2 = x1 + Kp;
        for (int64_t g = 0; g < G; g++) {
            int64_t end = (g + 1) * 64 < K ? (g + 1) * 64 : K;
            float amax = 0.0f;
            for (int64_t k = g * 64; k < end; k++) amax = fabsf(v[k]) > amax ? fabsf(v[k]) : amax;
            float step = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int64_t k = g * 64; k < end; k++) {
                float t1 = lrintf(v[k] * inv);
                float t2 = lrintf(fmaf(-t1, step, v[k]) * inv * 256.0f);
                x1[k] = (int8_t)t1;
                x2[k] = (int8_t)(t2 > 127.0f ? 127.0f : (t2 < -127.0f ? -127.0f : t2));
            }
            dx[m * G + g] = step / 256.0f;
        }
        for (int p = 0; p < 2; p++) {
            for (int64_t lane = 0; lane < Kp / 4; lane++) {
                const int8_t *xp = xq + m * 2 * Kp + p * Kp + 4 * lane;
                off[(m * 2 + p) * (Kp / 4) + lane] = 128 * ((int32_t)xp[0] + xp[1] + xp[2] + xp[3]);
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = wu + n * Kp;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xr = xq + m * 2 * Kp;
            const int32_t *o1 = off + m * 2 * (Kp / 4), *o2 = o1 + Kp / 4;
            const float *dr = dx + m * G;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                __m512i w = _mm512_loadu_si512((const void *)(wr + g * 64));
                __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512((const void *)(xr + g * 64)));
                __m512i s2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                 _mm512_loadu_si512((const void *)(xr + Kp + g * 64)));
                s1 = _mm512_sub_epi32(s1, _mm512_loadu_si512((const void *)(o1 + 16 * g)));
                s2 = _mm512_sub_epi32(s2, _mm512_loadu_si512((const void *)(o2 + 16 * g)));
                /* each part's sum (|.| <= 4 * 127 * 127) converted alone: exact in fp32 */
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2), _mm512_set1_ps(dr[g]), acc);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(256.0f * dr[g]), acc);
            }
            float out = scale[n] * _mm512_reduce_add_ps(acc);
            store(y, y_dt, m * N + n, &out, 1);
        }
    }
    free(xq);
    free(off);
    free(dx);
    free(v);
    return 0;
#else
    (void)x, (void)x_dt, (void)M, (void)K, (void)wu, (void)scale, (void)N, (void)G, (void)y, (void)y_dt;
    return 2;
#endif
}

/* ---- Selection over a row of logits ---- */

static inline float selectable(float v) { return v != v ? INFINITY : v; } /* NaN: the largest */

/* idx [rows, k] int64: for each row of x [rows, V], the indices of its k largest values (in no
 * particular order; NaN counts as the largest). A min-heap of k: one comparison for most of the
 * V values. */
int pg_topk(const void *x, int dt, int64_t rows, int64_t V, int64_t k, int64_t *idx) {
    if (k <= 0 || k > V) return 3;
    float *row = malloc((size_t)V * sizeof(float)), *hv = malloc((size_t)k * sizeof(float));
    int64_t *hi = malloc((size_t)k * sizeof(int64_t));
    if (!row || !hv || !hi) {
        free(row);
        free(hv);
        free(hi);
        return 1;
    }
    for (int64_t r = 0; r < rows; r++) {
        load(x, dt, r * V, row, V);
        int64_t n = 0;
        for (int64_t j = 0; j < V; j++) {
            float v = selectable(row[j]);
            if (n == k && !(v > hv[0])) continue;
            int64_t at;
            if (n < k) { /* push: sift up */
                at = n++;
                while (at > 0 && hv[(at - 1) / 2] > v) {
                    hv[at] = hv[(at - 1) / 2];
                    hi[at] = hi[(at - 1) / 2];
                    at = (at - 1) / 2;
                }
            } else { /* replace the root: sift down */
                at = 0;
                for (;;) {
                    int64_t c = 2 * at + 1;
                    if (c >= k) break;
                    if (c + 1 < k && hv[c + 1] < hv[c]) c++;
                    if (!(hv[c] < v)) break;
                    hv[at] = hv[c];
                    hi[at] = hi[c];
                    at = c;
                }
            }
            hv[at] = v;
            hi[at] = j;
        }
        memcpy(idx + r * k, hi, (size_t)k * sizeof(int64_t));
    }
    free(row);
    free(hv);
    free(hi);
    return 0;
}

/* out [rows] int64: each row's first index of its maximum, a NaN being the largest (torch's
 * argmax). */
int pg_argmax(const void *x, int dt, int64_t rows, int64_t V, int64_t *out) {
    float *row = malloc((size_t)V * sizeof(float));
    if (!row) return 1;
    for (int64_t r = 0; r < rows; r++) {
        load(x, dt, r * V, row, V);
        int64_t best = 0;
        float m = row[0];
        for (int64_t j = 0; j < V && m == m; j++) {
            float v = row[j];
            if (v > m || v != v) {
                m = v;
                best = j;
            }
        }
        out[r] = best;
    }
    free(row);
    return 0;
}

/* ---- A decode step's decoder layers in one call (Llama's layer: Llama, Mistral, Qwen2/3 without
 * biases) ----
 *
 * The per-operator calls above, in the order and with the dtypes of gpu_worker/models/llama.py's
 * Python path, for a step of decodes only (one token a sequence), all four projections 4-bit:
 * what a layer costs in Python (~25 dispatches and wrapper calls, ~0.1 ms at batch 1) is gone,
 * and the numbers are the same, bit for bit (tests/kernels/test_cpu_native.py). */
typedef struct {
    const uint8_t *nib;
    const uint16_t *d, *z;
    int64_t parts, rows, quads, groups16, in_features;
} pg_int4_weight;

typedef struct {
    const void *input_norm, *post_norm; /* [hidden] in norm_dt */
    const void *q_norm, *k_norm;        /* [head_dim] in qk_norm_dt, or NULL (Qwen3 has them) */
    pg_int4_weight qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [blocks, block_size, kv_heads, head_dim] in dt */
} pg_layer;

typedef struct {
    int64_t num_layers, tokens, hidden, heads, kv_heads, head_dim, intermediate, block_size, table_stride;
    int dt, norm_dt, qk_norm_dt;
    float eps, qk_eps, scale;
    const float *cos, *sin;      /* [tokens, head_dim] */
    const int64_t *slot_mapping; /* [tokens] */
    const int32_t *block_tables, *seq_lens;
} pg_step;

static int int4_apply(const void *x, const pg_int4_weight *w, int64_t M, void *y, int dt) {
    return pg_int4_matmul(x, dt, M, w->in_features, w->nib, w->d, w->z, w->parts, w->rows, w->quads, w->groups16, y,
                          dt);
}

/* h [tokens, hidden] (dt): in, the embeddings; out, the last layer's MLP output. residual: out,
 * the residual stream before it (the final norm adds the two, as LlamaModel.forward does). */
int pg_decoder_layers(const pg_layer *layers, const pg_step *s, void *h, void *residual) {
    int64_t T = s->tokens, width = (s->heads + 2 * s->kv_heads) * s->head_dim, qd = s->heads * s->head_dim;
    size_t el = s->dt == BF16 ? 2 : 4;
    size_t sizes[6] = {(size_t)(T * s->hidden), (size_t)(T * width), (size_t)(T * qd), (size_t)(T * qd),
                       (size_t)(T * 2 * s->intermediate), (size_t)(T * s->intermediate)};
    size_t total = 0;
    for (int i = 0; i < 6; i++) total += sizes[i];
    char *buf = malloc(total * el);
    if (!buf) return 1;
    char *normed = buf, *qkv = normed + sizes[0] * el, *q = qkv + sizes[1] * el, *att = q + sizes[2] * el;
    char *gu = att + sizes[3] * el, *act = gu + sizes[4] * el;
    int st = 0;
    for (int64_t l = 0; l < s->num_layers && !st; l++) {
        const pg_layer *L = layers + l;
        if (l == 0) { /* the residual stream starts as the embeddings themselves */
            memcpy(residual, h, sizes[0] * el);
            st = pg_rms_norm(h, NULL, NULL, s->dt, L->input_norm, s->norm_dt, normed, s->dt, T, s->hidden, s->eps);
        } else {
            st = pg_rms_norm(h, residual, residual, s->dt, L->input_norm, s->norm_dt, normed, s->dt, T, s->hidden,
                             s->eps);
        }
        st = st ? st : int4_apply(normed, &L->qkv, T, qkv, s->dt);
        st = st ? st
                : pg_rope_write_kv(qkv, s->dt, T, s->heads, s->kv_heads, s->head_dim, s->cos, s->sin, L->q_norm,
                                   L->k_norm, s->qk_norm_dt, s->qk_eps, L->k_cache, L->v_cache, s->slot_mapping, q);
        st = st ? st
                : pg_decode_attention(q, s->dt, L->k_cache, L->v_cache, s->dt, s->block_tables, s->table_stride,
                                      s->seq_lens, T, s->heads, s->kv_heads, s->head_dim, s->block_size, s->scale,
                                      att, s->dt);
        st = st ? st : int4_apply(att, &L->o, T, h, s->dt);
        st = st ? st
                : pg_rms_norm(h, residual, residual, s->dt, L->post_norm, s->norm_dt, normed, s->dt, T, s->hidden,
                              s->eps);
        st = st ? st : int4_apply(normed, &L->gate_up, T, gu, s->dt);
        st = st ? st : pg_silu_and_mul(gu, s->dt, act, s->dt, T, s->intermediate);
        st = st ? st : int4_apply(act, &L->down, T, h, s->dt);
    }
    free(buf);
    return st;
}
