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
 * Threads: a small pool of its own (tm_parallel below), not OpenMP. libgomp keeps one thread team per calling
 * thread, and once more teams exist than CPUs (the serving process's main thread ran one parallel torch op, a second
 * model is loaded, a hot swap is under way) its idle threads stop spinning after ~100 iterations and every parallel
 * region pays a futex wake-up: 50-70 us instead of ~10 us per small op on the 2-core bench VM, ~5 ms per GPT-2-medium
 * decode step over 97 projections and 48 attention products. The pool's helpers spin for up to 200 us after a job
 * (the gaps between a decode step's kernels are far shorter), then sleep on a condition variable; work is claimed in
 * chunks, so a thread kept off its core by another process costs nothing.
 *
 * Also here: decode attention (one query per row over that row's own cache positions), the other per-step op whose
 * dispatch cost outweighed its arithmetic.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(TM_PORTABLE)
#define TM_VNNI 1
#include <immintrin.h>
#endif


/* ------------------------------------------------------------------------------------------------ thread pool */
typedef void (*tm_task)(void *ctx, int64_t begin, int64_t end);

#define TM_MAX_THREADS 256
#define TM_SPIN_NS 200000LL        /* helpers spin this long after a job before sleeping: covers the gaps between
                                      a decode step's kernels (tens of us) but not the gap between steps, so an idle
                                      helper does not compete with torch's own ops (the two vCPUs of a cloud VM may be
                                      hyperthreads of one core) */

/* A job is [0, n) cut into `chunks` contiguous chunks that the caller and the helpers claim one at a time from a
 * 64-bit ticket (job number << 32 | next chunk). Claiming, not a fixed split: on a 2-core machine the event loop, the
 * HTTP client or another process regularly takes a core for a while, and a helper that has not started yet then
 * costs nothing (the caller runs the chunks itself) instead of stalling the whole call until it is scheduled. A
 * helper reads a job's fields, then claims by compare-and-swap on the ticket it read them under: a successful claim
 * proves the job was still current, and the caller rewrites the fields only after every chunk is claimed and done.
 * Fields each on their own cache line where threads write them. */
static struct {
    pthread_mutex_t run;           /* one job at a time; a second caller runs its job alone, inline */
    pthread_mutex_t sleep;
    pthread_cond_t wake;
    int helpers;                   /* started helper threads */
    pid_t pid;                     /* the process that started them (a fork child starts its own) */
    _Atomic(tm_task) fn;           /* the current job (relaxed: published by the ticket's release store) */
    _Atomic(void *) ctx;
    _Atomic int64_t n, chunks;
    _Atomic int usable;            /* threads the job may use: helpers 1..usable-1 claim chunks, the others skip it */
    _Alignas(64) _Atomic uint64_t ticket;       /* job << 32 | next unclaimed chunk */
    _Alignas(64) _Atomic int64_t done;          /* chunks of the current job finished */
    _Alignas(64) _Atomic int sleepers;          /* helpers blocked on `wake` */
} pool = {.run = PTHREAD_MUTEX_INITIALIZER, .sleep = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Claim and run chunks of the job the ticket holds until none is left or the job changed; returns the job number
 * seen last. */
static uint64_t run_chunks(int id) {
    uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    for (;;) {
        if (id >= atomic_load_explicit(&pool.usable, memory_order_relaxed)) {
            uint64_t again = atomic_load_explicit(&pool.ticket, memory_order_acquire);
            if (again == t) return t >> 32;   /* not one of this job's threads (read under an unchanged ticket) */
            t = again;
            continue;
        }
        tm_task fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&pool.ctx, memory_order_relaxed);
        int64_t n = atomic_load_explicit(&pool.n, memory_order_relaxed);
        int64_t chunks = atomic_load_explicit(&pool.chunks, memory_order_relaxed);
        int64_t next = (int64_t)(t & 0xffffffffu);
        if (next >= chunks) return t >> 32;
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;   /* t now holds the current ticket: re-read the fields under it */
        fn(ctx, n * next / chunks, n * (next + 1) / chunks);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    }
}

static void *helper_main(void *arg) {
    int id = (int)(intptr_t)arg;   /* 1..helpers; the caller is 0 */
    uint64_t seen = atomic_load_explicit(&pool.ticket, memory_order_acquire) >> 32;
    for (;;) {
        uint64_t job = atomic_load_explicit(&pool.ticket, memory_order_acquire) >> 32;
        if (job == seen) {
            int64_t deadline = now_ns() + TM_SPIN_NS;
            for (int i = 0; (job = atomic_load_explicit(&pool.ticket, memory_order_acquire) >> 32) == seen; i++) {
                cpu_relax();
                if ((i & 255) == 255 && now_ns() > deadline) {
                    pthread_mutex_lock(&pool.sleep);
                    atomic_fetch_add(&pool.sleepers, 1);   /* seq_cst: see tm_parallel */
                    while ((job = atomic_load(&pool.ticket) >> 32) == seen) pthread_cond_wait(&pool.wake, &pool.sleep);
                    atomic_fetch_sub(&pool.sleepers, 1);
                    pthread_mutex_unlock(&pool.sleep);
                    break;
                }
            }
        }
        seen = run_chunks(id);
    }
    return NULL;
}

/* In a fork child the parent's helpers do not exist, but the copied condvar still counts the sleeping ones as
 * waiters (a broadcast would wait for them for ever) and a mutex may have been copied locked: start afresh. */
static void reset_in_child(void) {
    pthread_mutex_t fresh_mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    pool.run = fresh_mutex;
    pool.sleep = fresh_mutex;
    pool.wake = fresh_cond;
    pool.helpers = 0;
    pool.pid = getpid();
    atomic_store(&pool.sleepers, 0);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void register_atfork(void) { pthread_atfork(NULL, NULL, reset_in_child); }

/* Start helpers up to `want` - 1 (caller holds pool.run). Returns how many threads a job can use. */
static int ensure_helpers(int want) {
    pthread_once(&atfork_once, register_atfork);
    if (pool.pid != getpid()) {   /* first use (a fork child was reset by reset_in_child) */
        pool.helpers = 0;
        pool.pid = getpid();
    }
    if (want > TM_MAX_THREADS) want = TM_MAX_THREADS;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* helpers never take signals (Python handles them on main) */
    while (pool.helpers < want - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)(pool.helpers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.helpers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pool.helpers + 1 < want ? pool.helpers + 1 : want;
}

/* fn(ctx, begin, end) over [0, n) in about 4 chunks per thread, claimed by the caller and up to `threads` - 1
 * helpers. Returns when every chunk has run. */
void tm_parallel(tm_task fn, void *ctx, int64_t n, int threads) {
    if (threads > n) threads = (int)n;
    if (threads <= 1 || pthread_mutex_trylock(&pool.run) != 0) {
        fn(ctx, 0, n);
        return;
    }
    int usable = ensure_helpers(threads);
    if (usable <= 1) {
        pthread_mutex_unlock(&pool.run);
        fn(ctx, 0, n);
        return;
    }
    int64_t chunks = n < 4 * (int64_t)usable ? n : 4 * (int64_t)usable;
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool.n, n, memory_order_relaxed);
    atomic_store_explicit(&pool.chunks, chunks, memory_order_relaxed);
    atomic_store_explicit(&pool.usable, usable, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    uint64_t job = (atomic_load_explicit(&pool.ticket, memory_order_relaxed) >> 32) + 1;
    /* seq_cst publish, then read `sleepers`; a helper going to sleep increments `sleepers`, then reads the ticket:
     * one of the two sees the other's write, so either the helper does not sleep or it is woken here. */
    atomic_store(&pool.ticket, (job & 0xffffffffu) << 32);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep);
    }
    run_chunks(0);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < chunks) cpu_relax();
    pthread_mutex_unlock(&pool.run);
}

/* ------------------------------------------------------------------------------------------------ int8 linear */
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
        vlo = _mm512_min_ps(v, vlo);   /* NaN in v: the second operand, as the scalar loop skips NaN */
        vhi = _mm512_max_ps(v, vhi);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
#endif
    for (; i < k; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    float scale = hi / 255.0f - lo / 255.0f;   /* no overflow for finite rows near FLT_MAX */
    if (!(scale >= 1.1754944e-38f) || !isfinite(scale)) scale = 1.0f;   /* all-zero, subnormal or non-finite row */
    float inv = 1.0f / scale;
    float zero_f = nearbyintf(-lo * inv);
    int32_t zero = zero_f >= 0.0f ? (zero_f <= 255.0f ? (int32_t)zero_f : 255) : 0;   /* NaN -> 0 */
    i = 0;
#ifdef TM_VNNI
    __m512 vinv = _mm512_set1_ps(inv);
    __m512i vzero = _mm512_set1_epi32(zero), floor = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
    __m512 low_f = _mm512_set1_ps(-512.0f), high_f = _mm512_set1_ps(512.0f);
    for (; i + 16 <= k; i += 16) {   /* cvtps_epi32 rounds to nearest even, as nearbyintf does */
        __m512 f = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
        f = _mm512_min_ps(_mm512_max_ps(f, low_f), high_f);   /* NaN -> -512, as the scalar loop */
        __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(f), vzero);
        v = _mm512_min_epi32(_mm512_max_epi32(v, floor), top);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(v));
    }
#endif
    for (; i < k; i++) {
        float f = x[i] * inv;
        f = f >= -512.0f ? (f <= 512.0f ? f : 512.0f) : -512.0f;   /* NaN -> -512, as the VNNI loop */
        int32_t c = (int32_t)nearbyintf(f) + zero;
        q[i] = (uint8_t)(c < 0 ? 0 : c > 255 ? 255 : c);
    }
    for (; i < kp; i++) q[i] = (uint8_t)zero;
    *scale_out = scale;
    *zero_out = zero;
}

#ifdef TM_VNNI
__m512 _ZGVeN16v_expf(__m512 x);   /* glibc's libmvec: expf on 16 lanes, the same < 4 ulp as scalar expf */

/* GELU, tanh approximation (GPT-2's gelu_new): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with
 * tanh(z) = 1 - 2 / (exp(2z) + 1) (exact at both ends: exp overflows to inf -> 1, underflows to 0 -> -1). */
static inline __m512 gelu16(__m512 x) {
    __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                             _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
    __m512 e = _ZGVeN16v_expf(_mm512_add_ps(z, z));
    __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                             _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
}
#endif

static inline float gelu1(float x) {
    float z = 0.7978845608028654f * fmaf(0.044715f * x, x * x, x);
    float t = 1.0f - 2.0f / (expf(z + z) + 1.0f);
    return 0.5f * x * (1.0f + t);
}

/* rows (<= TM_MR) x one 64-column block. The epilogue: y = scale * dot + bias, then + residual[row, col] (when
 * given) and GELU (act 1). */
static inline void tile(int rows, int64_t row0, const uint8_t *q, int64_t kp, const int8_t *wb, int64_t col0,
                        int64_t n, const float *w_scale, const int32_t *w_sum, const float *bias, float *y,
                        const float *x_scale, const int32_t *x_zero, const float *residual, int act) {
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
            if (residual) out = _mm512_add_ps(_mm512_maskz_loadu_ps(m, residual + row * n + col), out);
            if (act == 1) out = gelu16(out);
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
            float out = fmaf((float)dot, x_scale[row] * w_scale[col], bias[col]);
            if (residual) out = residual[row * n + col] + out;
            y[row * n + col] = act == 1 ? gelu1(out) : out;
        }
    }
#endif
}

typedef struct {
    const float *x;
    int64_t m, k, kp, n;
    const int8_t *wp;
    const float *w_scale, *bias;
    const int32_t *w_sum;
    float *y, *x_scale;
    uint8_t *q;
    int32_t *x_zero;
    const float *residual;   /* [m, n] added to the output, or NULL */
    int act;                 /* 0: none, 1: GELU (tanh) */
} linear_job;

static void quantize_rows(void *ctx, int64_t begin, int64_t end) {
    linear_job *j = ctx;
    for (int64_t r = begin; r < end; r++)
        quantize_row(j->x + r * j->k, j->k, j->kp, j->q + r * j->kp, j->x_scale + r, j->x_zero + r);
}

static void linear_blocks(void *ctx, int64_t begin, int64_t end) {
    linear_job *j = ctx;
    for (int64_t b = begin; b < end; b++) {
        const int8_t *wb = j->wp + b * (j->kp / 4) * TM_NCOL * 4;
        for (int64_t r0 = 0; r0 < j->m; r0 += TM_MR) {
            if (j->m - r0 >= TM_MR)   /* constant trip count: the compiler keeps the 16 accumulators in registers */
                tile(TM_MR, r0, j->q, j->kp, wb, b * TM_NCOL, j->n, j->w_scale, j->w_sum, j->bias, j->y,
                     j->x_scale, j->x_zero, j->residual, j->act);
            else
                tile((int)(j->m - r0), r0, j->q, j->kp, wb, b * TM_NCOL, j->n, j->w_scale, j->w_sum, j->bias, j->y,
                     j->x_scale, j->x_zero, j->residual, j->act);
        }
    }
}

/* Per calling thread, grown as needed: the quantized rows and their scales (a few MB at most: rows x k bytes). */
static __thread uint8_t *scratch;
static __thread size_t scratch_size;
static pthread_key_t scratch_key;   /* its destructor frees a thread's scratch when the thread exits */
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free); }

/* x [m, k] fp32 row-major, wp from tm_pack_weights, w_scale/bias [n] fp32, w_sum [n] int32 (sum over k of w);
 * y [m, n] fp32 out (it may be `residual` itself); residual [m, n] fp32 added to the output, or NULL; act 1 applies
 * GELU (tanh approximation) to the output. Returns 0, or -1 when scratch memory could not be allocated. */
int tm_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *wp, int64_t n, const float *w_scale,
                   const int32_t *w_sum, const float *bias, float *y, const float *residual, int act, int threads) {
    int64_t kp = (k + 3) / 4 * 4;
    size_t need = (size_t)(m * kp) + (size_t)m * (sizeof(float) + sizeof(int32_t)) + 64;
    if (need > scratch_size) {
        pthread_once(&scratch_once, make_scratch_key);
        void *grown = realloc(scratch, need);
        if (grown == NULL) return -1;
        scratch = grown;
        scratch_size = need;
        pthread_setspecific(scratch_key, scratch);
    }
    float *x_scale = (float *)scratch;
    int32_t *x_zero = (int32_t *)(scratch + (size_t)m * sizeof(float));
    uint8_t *q = scratch + (size_t)m * (sizeof(float) + sizeof(int32_t));
    linear_job j = {x, m, k, kp, n, wp, w_scale, bias, w_sum, y, x_scale, q, x_zero, residual, act};
    if (m >= 32) tm_parallel(quantize_rows, &j, m, threads);
    else quantize_rows(&j, 0, m);
    tm_parallel(linear_blocks, &j, (n + TM_NCOL - 1) / TM_NCOL, threads);
    return 0;
}

/* ---------------------------------------------------------------------------------------- causal attention */
typedef struct {
    const float *q, *k, *v;
    int64_t q_row, q_head, q_tok;          /* strides of q [B, H, T, D] (d contiguous) */
    int64_t kv_row, kv_head, kv_pos;       /* strides of the K and V caches [rows, H, positions, D] */
    const int64_t *starts;                 /* [B]: a row's first real position (NULL: 0) */
    int64_t end, heads, new, d;            /* the T = `new` queries sit at cache positions end - new .. end - 1 */
    float scale;
    float *out;                            /* [B, H, T, D] contiguous */
} attention_job;

static inline float dot(const float *a, const float *b, int64_t d) {
#ifdef TM_VNNI
    if ((d & 15) == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++) s += a[i] * b[i];
    return s;
}

#define TM_MAX_POSITIONS 8192   /* scores live on the stack (32 KiB); longer caches use torch's attention */

static void attention_heads(void *ctx, int64_t begin, int64_t end) {
    attention_job *j = ctx;
    float p[TM_MAX_POSITIONS] __attribute__((aligned(64)));
    for (int64_t t = begin; t < end; t++) {   /* t = (row * heads + head) * new + token */
        int64_t token = t % j->new, row = t / j->new / j->heads, head = t / j->new % j->heads;
        int64_t start = j->starts ? j->starts[row] : 0, stop = j->end - j->new + token + 1;   /* causal */
        const float *q = j->q + row * j->q_row + head * j->q_head + token * j->q_tok;
        const float *k = j->k + row * j->kv_row + head * j->kv_head;
        const float *v = j->v + row * j->kv_row + head * j->kv_head;
        float *out = j->out + t * j->d;
        if (stop <= start) {   /* a left-padding query: its output is never used */
            for (int64_t i = 0; i < j->d; i++) out[i] = 0.0f;
            continue;
        }
        float top = -INFINITY, total = 0.0f;
        for (int64_t l = start; l < stop; l++) {
            p[l] = dot(q, k + l * j->kv_pos, j->d) * j->scale;
            top = p[l] > top ? p[l] : top;
        }
        int64_t l = start;
#ifdef TM_VNNI
        __m512 vtop = _mm512_set1_ps(top), vtotal = _mm512_setzero_ps();
        for (; l + 16 <= stop; l += 16) {
            __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(p + l), vtop));
            _mm512_storeu_ps(p + l, e);
            vtotal = _mm512_add_ps(vtotal, e);
        }
        total = _mm512_reduce_add_ps(vtotal);
#endif
        for (; l < stop; l++) {
            p[l] = expf(p[l] - top);
            total += p[l];
        }
        float inv = 1.0f / total;
#ifdef TM_VNNI
        if ((j->d & 15) == 0 && j->d <= 128) {   /* GPT-2: 64; the output row stays in registers */
            __m512 acc[8];
            int chunks = (int)(j->d / 16);
            for (int c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
            for (l = start; l < stop; l++) {
                const float *vl = v + l * j->kv_pos;
                __m512 w = _mm512_set1_ps(p[l]);
                for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vl + 16 * c), acc[c]);
            }
            __m512 vinv = _mm512_set1_ps(inv);
            for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], vinv));
            continue;
        }
#endif
        for (int64_t i = 0; i < j->d; i++) out[i] = 0.0f;
        for (l = start; l < stop; l++) {
            const float *vl = v + l * j->kv_pos;
            for (int64_t i = 0; i < j->d; i++) out[i] = fmaf(p[l], vl[i], out[i]);
        }
        for (int64_t i = 0; i < j->d; i++) out[i] *= inv;
    }
}

/* Causal softmax(q k^T * scale) v for the `new` newest positions of each row: the query at cache position p of row b
 * attends to the row's positions [starts[b], p] (its own left padding excluded); a decode step is new = 1.
 * q [B, H, new, D], K/V [rows >= B, H, positions >= end, D] (strided, d contiguous), out [B, H, new, D] contiguous
 * fp32 (zeros for padding queries). Every (row, head, query) is computed the same way whatever the batch, so a row's
 * result never depends on the others. Returns 0, -1 when end > TM_MAX_POSITIONS, -2 when a start is outside
 * [0, end) or new is outside [1, end] (nothing computed then). */
int tm_attention(const float *q, int64_t q_row, int64_t q_head, int64_t q_tok, const float *k, const float *v,
                 int64_t kv_row, int64_t kv_head, int64_t kv_pos, const int64_t *starts, int64_t batch, int64_t heads,
                 int64_t new, int64_t end, int64_t d, float scale, float *out, int threads) {
    if (end > TM_MAX_POSITIONS) return -1;
    if (new < 1 || new > end) return -2;
    for (int64_t row = 0; starts != NULL && row < batch; row++)
        if (starts[row] < 0 || starts[row] >= end) return -2;
    attention_job j = {q, k, v, q_row, q_head, q_tok, kv_row, kv_head, kv_pos, starts, end, heads, new, d, scale,
                       out};
    tm_parallel(attention_heads, &j, batch * heads * new, threads);
    return 0;
}

int64_t tm_max_positions(void) { return TM_MAX_POSITIONS; }
