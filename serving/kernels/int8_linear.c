/* textmill int8 linear: W8A8 with per-token (per input row) asymmetric uint8 activations and per-output-channel
 * symmetric int8 weights, accumulated exactly in int32, rescaled to fp32.
 *
 *   y[m, n] = (x_scale[m] * w_scale[n]) * (sum_k q[m, k] * w[n, k] - x_zero[m] * w_sum[n]) + bias[n]
 *
 * q[m, :] is row m of x quantized alone onto 256 levels spanning [min(x_m, 0), max(x_m, 0)] (zero is exact, as in
 * fbgemm's and onnxruntime's dynamic quantization), so a row's output never depends on the other rows of the call:
 * integer accumulation is exact in any order and the fp32 epilogue is the same few operations for every element.
 *
 * Two builds of this one file, bitwise equal in their results (tests/test_precision.py checks it):
 *   - AVX-512 VNNI (compiled with -mavx512vnni ...): the register-blocked micro-kernel of BLIS/oneDNN-style GEMMs,
 *     4 rows x 64 output columns in 16 zmm accumulators, one vpdpbusd per 4 rows x 16 columns x 4 k; weights are
 *     packed once so the kernel reads them as one sequential stream (what a batch-1 decode step is bound by).
 *   - portable C for any other CPU, used where a test or a user asks for it (fbgemm is faster without VNNI).
 *
 * Threads: OpenMP, the same libgomp runtime torch's own parallel regions use when loaded into a torch process
 * (libgomp.so.1 is already resident), so no second pool competes for the cores.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(TM_PORTABLE)
#define TM_VNNI 1
#include <immintrin.h>
#endif

#define TM_MR 4                 /* rows per micro-tile */
#define TM_NCOL 64              /* output columns per packed block (4 zmm of 16 int32 lanes) */

int tm_isa(void) {
#ifdef TM_VNNI
    return 1;
#else
    return 0;
#endif
}

int64_t tm_packed_size(int64_t n, int64_t k) {
    return ((n + TM_NCOL - 1) / TM_NCOL) * TM_NCOL * ((k + 3) / 4 * 4);
}

/* w [n, k] int8 row-major -> out [ceil(n/64)][kp/4][64][4] (kp = k rounded up to 4), zero padded: for each group of
 * 4 consecutive k, the 4 weights of each of 64 output columns are adjacent, as vpdpbusd consumes them. */
void tm_pack_weights(const int8_t *w, int64_t n, int64_t k, int8_t *out) {
    int64_t kp = (k + 3) / 4 * 4, kq = kp / 4;
    memset(out, 0, (size_t)tm_packed_size(n, k));
    for (int64_t j = 0; j < n; j++) {
        int8_t *block = out + (j / TM_NCOL) * kq * TM_NCOL * 4 + (j % TM_NCOL) * 4;
        const int8_t *row = w + j * k;
        for (int64_t i = 0; i < k; i++) block[(i / 4) * TM_NCOL * 4 + i % 4] = row[i];
    }
}

/* Row x[k] -> q[kp] (padding = the zero point, which the w_sum term cancels), scale, zero point. */
static void quantize_row(const float *x, int64_t k, int64_t kp, uint8_t *q, float *scale_out, int32_t *zero_out) {
    float lo = 0.0f, hi = 0.0f;
    int64_t i = 0;
#ifdef TM_VNNI
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        vlo = _mm512_min_ps(vlo, v);
        vhi = _mm512_max_ps(vhi, v);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
#endif
    for (; i < k; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    float scale = (hi - lo) / 255.0f;
    if (!(scale > 0.0f) || !isfinite(scale)) scale = 1.0f;   /* all-zero (or non-finite) row */
    float inv = 1.0f / scale;
    float zero_f = nearbyintf(-lo * inv);
    int32_t zero = zero_f < 0.0f ? 0 : zero_f > 255.0f ? 255 : (int32_t)zero_f;
    i = 0;
#ifdef TM_VNNI
    __m512 vinv = _mm512_set1_ps(inv);
    __m512i vzero = _mm512_set1_epi32(zero), floor = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
    for (; i + 16 <= k; i += 16) {   /* cvtps_epi32 rounds to nearest even, as nearbyintf does */
        __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv)), vzero);
        v = _mm512_min_epi32(_mm512_max_epi32(v, floor), top);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(v));
    }
#endif
    for (; i < k; i++) {
        float v = nearbyintf(x[i] * inv);
        int32_t c = (v < -512.0f ? -512 : v > 512.0f ? 512 : (int32_t)v) + zero;
        q[i] = (uint8_t)(c < 0 ? 0 : c > 255 ? 255 : c);
    }
    for (; i < kp; i++) q[i] = (uint8_t)zero;
    *scale_out = scale;
    *zero_out = zero;
}

/* rows (<= TM_MR) x one 64-column block. */
static inline void tile(int rows, int64_t row0, const uint8_t *q, int64_t kp, const int8_t *wb, int64_t col0,
                        int64_t n, const float *w_scale, const int32_t *w_sum, const float *bias, float *y,
                        const float *x_scale, const int32_t *x_zero) {
    int64_t kq = kp / 4;
#ifdef TM_VNNI
    __m512i acc[TM_MR][4];
    for (int i = 0; i < TM_MR; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_si512();
    for (int64_t c = 0; c < kq; c++) {
        const int8_t *wc = wb + c * TM_NCOL * 4;
        __m512i w0 = _mm512_loadu_si512(wc), w1 = _mm512_loadu_si512(wc + 64);
        __m512i w2 = _mm512_loadu_si512(wc + 128), w3 = _mm512_loadu_si512(wc + 192);
        for (int i = 0; i < rows; i++) {
            int32_t quad;
            memcpy(&quad, q + (row0 + i) * kp + c * 4, 4);
            __m512i a = _mm512_set1_epi32(quad);
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], a, w0);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], a, w1);
            acc[i][2] = _mm512_dpbusd_epi32(acc[i][2], a, w2);
            acc[i][3] = _mm512_dpbusd_epi32(acc[i][3], a, w3);
        }
    }
    for (int i = 0; i < rows; i++) {
        int64_t row = row0 + i;
        __m512i zero = _mm512_set1_epi32(x_zero[row]);
        __m512 sx = _mm512_set1_ps(x_scale[row]);
        for (int j = 0; j < 4; j++) {
            int64_t col = col0 + j * 16;
            if (col >= n) break;
            __mmask16 m = n - col >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - col)) - 1);
            __m512i dot = _mm512_sub_epi32(acc[i][j], _mm512_mullo_epi32(zero, _mm512_maskz_loadu_epi32(m, w_sum + col)));
            __m512 s = _mm512_mul_ps(sx, _mm512_maskz_loadu_ps(m, w_scale + col));
            __m512 out = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, _mm512_maskz_loadu_ps(m, bias + col));
            _mm512_mask_storeu_ps(y + row * n + col, m, out);
        }
    }
#else
    int32_t acc[TM_MR][TM_NCOL];
    memset(acc, 0, sizeof acc);
    for (int64_t c = 0; c < kq; c++) {
        const int8_t *wc = wb + c * TM_NCOL * 4;
        for (int i = 0; i < rows; i++) {
            const uint8_t *qa = q + (row0 + i) * kp + c * 4;
            for (int j = 0; j < TM_NCOL; j++)
                acc[i][j] += qa[0] * wc[j * 4] + qa[1] * wc[j * 4 + 1] + qa[2] * wc[j * 4 + 2] + qa[3] * wc[j * 4 + 3];
        }
    }
    for (int i = 0; i < rows; i++) {
        int64_t row = row0 + i;
        for (int j = 0; j < TM_NCOL && col0 + j < n; j++) {
            int64_t col = col0 + j;
            int32_t dot = acc[i][j] - x_zero[row] * w_sum[col];
            y[row * n + col] = fmaf((float)dot, x_scale[row] * w_scale[col], bias[col]);
        }
    }
#endif
}

/* x [m, k] fp32 row-major, wp from tm_pack_weights, w_scale/bias [n] fp32, w_sum [n] int32 (sum over k of w);
 * y [m, n] fp32 out; scratch: q [m, kp] uint8, x_scale [m] fp32, x_zero [m] int32. */
void tm_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *wp, int64_t n, const float *w_scale,
                    const int32_t *w_sum, const float *bias, float *y, uint8_t *q, float *x_scale, int32_t *x_zero,
                    int threads) {
    int64_t kp = (k + 3) / 4 * 4, blocks = (n + TM_NCOL - 1) / TM_NCOL;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++) quantize_row(x + r * k, k, kp, q + r * kp, x_scale + r, x_zero + r);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int8_t *wb = wp + b * (kp / 4) * TM_NCOL * 4;
            for (int64_t r0 = 0; r0 < m; r0 += TM_MR) {
                if (m - r0 >= TM_MR)   /* constant trip count: the compiler keeps the 16 accumulators in registers */
                    tile(TM_MR, r0, q, kp, wb, b * TM_NCOL, n, w_scale, w_sum, bias, y, x_scale, x_zero);
                else
                    tile((int)(m - r0), r0, q, kp, wb, b * TM_NCOL, n, w_scale, w_sum, bias, y, x_scale, x_zero);
            }
        }
    }
}
