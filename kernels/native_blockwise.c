/* Blockwise absmax quantization, fused: the CPU fast path behind spotrain.kernels.blockwise.
 *
 * Same format and rounding as the torch reference in blockwise.py: per block of `block`
 * values one float32 absmax, and per value round-half-even(x * qmax / absmax) as an int8
 * (8 bits) or as a nibble, two per byte, low nibble first (4 bits). The reference needs
 * about ten passes over each chunk; here each block is read once for its absmax and once
 * more, from L1, to encode it, so the codec runs at memory speed.
 *
 * Built at first use by native.py with the machine's C compiler and loaded through ctypes,
 * so it needs neither Python's nor torch's headers. Compile with -ffp-contract=off: the
 * reference rounds codes * scale before subtracting it from the residual, and so must we;
 * the one fused multiply-add it does use (round_code) is written out.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define PARALLEL_BELOW (1 << 18) /* fewer values than this: one thread, spawning costs more */
#define MAX_THREADS 64
#define HUGE_PAGE (1 << 21)

typedef struct {
    const float *x;
    float *residual; /* NULL without error feedback */
    const uint8_t *codes_in;
    uint8_t *codes;
    float *absmax;
    float *out;
    int64_t numel, block, first_block, last_block;
    int bits;
    int64_t nonfinite;
} Job;

/* The largest |value| of a block, found on the float's bits: with the sign cleared, finite
 * floats order like their unsigned integer views, and NaN and Inf lie above all of them. An
 * integer max vectorizes where a float max with NaN semantics does not. */
static float block_absmax(const float *x, const float *residual_in, float *sum_out, int64_t n, int *bad) {
    uint32_t m = 0;
    if (residual_in) {
        for (int64_t i = 0; i < n; i++) {
            float v = x[i] + residual_in[i];
            sum_out[i] = v;
            uint32_t bits;
            memcpy(&bits, &v, 4);
            bits &= 0x7fffffffu;
            m = bits > m ? bits : m;
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, &x[i], 4);
            bits &= 0x7fffffffu;
            m = bits > m ? bits : m;
        }
    }
    *bad = m >= 0x7f800000u;
    float result;
    memcpy(&result, &m, 4);
    return result;
}

/* Rare path: non-finite values count, are read as 0, and leave a residual of 0. */
static int64_t sanitize_block(const float *x, float *residual, int64_t n, float *m) {
    int64_t count = 0;
    float best = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = residual ? residual[i] : x[i];
        if (!isfinite(v)) {
            count++;
            if (residual) residual[i] = 0.0f;
            continue;
        }
        float a = fabsf(v);
        best = a > best ? a : best;
    }
    *m = best;
    return count;
}

/* round-half-even(v * inverse) from one fused multiply-add: adding 1.5 * 2^23 rounds the exact
 * product to an integer, as the reference's addcmul does (the codes then agree bit for bit). */
static inline float round_code(float v, float inverse) {
    return fmaf(v, inverse, 12582912.0f) - 12582912.0f;
}

static inline float finite_or_zero(float v) { return isfinite(v) ? v : 0.0f; }

static void encode_block8(const float *src, float *residual, int8_t *codes, int64_t n, float inverse, float scale,
                          int sanitize) {
    for (int64_t i = 0; i < n; i++) {
        float v = sanitize ? finite_or_zero(src[i]) : src[i];
        float q = round_code(v, inverse);
        codes[i] = (int8_t)(int32_t)q;
        if (residual) residual[i] = v - q * scale;
    }
}

static void encode_block4(const float *src, float *residual, uint8_t *codes, int64_t n, float inverse, float scale,
                          int sanitize) {
    int64_t pairs = n / 2;
    for (int64_t p = 0; p < pairs; p++) {
        float v0 = sanitize ? finite_or_zero(src[2 * p]) : src[2 * p];
        float v1 = sanitize ? finite_or_zero(src[2 * p + 1]) : src[2 * p + 1];
        float q0 = round_code(v0, inverse), q1 = round_code(v1, inverse);
        codes[p] = (uint8_t)(((int32_t)q0 & 15) | (((int32_t)q1 & 15) << 4));
        if (residual) {
            residual[2 * p] = v0 - q0 * scale;
            residual[2 * p + 1] = v1 - q1 * scale;
        }
    }
    if (n % 2) { /* the odd last value of the whole tensor: a low nibble alone */
        float v = sanitize ? finite_or_zero(src[n - 1]) : src[n - 1];
        float q = round_code(v, inverse);
        codes[pairs] = (uint8_t)((int32_t)q & 15);
        if (residual) residual[n - 1] = v - q * scale;
    }
}

static void quantize_blocks(Job *job) {
    const float qmax = job->bits == 8 ? 127.0f : 7.0f;
    for (int64_t b = job->first_block; b < job->last_block; b++) {
        int64_t lo = b * job->block;
        int64_t n = job->numel - lo < job->block ? job->numel - lo : job->block;
        float *residual = job->residual ? job->residual + lo : 0;
        int bad;
        /* with error feedback the residual slot first takes x + residual, then what is dropped */
        float m = block_absmax(job->x + lo, residual, residual, n, &bad);
        if (bad) job->nonfinite += sanitize_block(job->x + lo, residual, n, &m);
        const float *src = residual ? residual : job->x + lo;
        float inverse = m > 0.0f ? (1.0f / m) * qmax : 0.0f; /* as torch computes qmax / m */
        float scale = m / qmax;
        job->absmax[b] = m;
        if (job->bits == 8) encode_block8(src, residual, (int8_t *)job->codes + lo, n, inverse, scale, bad);
        else encode_block4(src, residual, job->codes + lo / 2, n, inverse, scale, bad);
    }
}

static void dequantize_blocks(Job *job) {
    const float qmax = job->bits == 8 ? 127.0f : 7.0f;
    for (int64_t b = job->first_block; b < job->last_block; b++) {
        int64_t lo = b * job->block;
        int64_t n = job->numel - lo < job->block ? job->numel - lo : job->block;
        float scale = job->absmax[b] / qmax;
        float *out = job->out + lo;
        if (job->bits == 8) {
            const int8_t *codes = (const int8_t *)job->codes_in + lo;
            for (int64_t i = 0; i < n; i++) out[i] = (float)codes[i] * scale;
        } else {
            const int8_t *codes = (const int8_t *)job->codes_in + lo / 2;
            int64_t pairs = n / 2;
            for (int64_t p = 0; p < pairs; p++) {
                int8_t byte = codes[p];
                out[2 * p] = (float)((int8_t)(byte << 4) >> 4) * scale; /* arithmetic shifts sign-extend */
                out[2 * p + 1] = (float)(byte >> 4) * scale;
            }
            if (n % 2) out[n - 1] = (float)((int8_t)(codes[pairs] << 4) >> 4) * scale;
        }
    }
}

static void *run_quantize(void *job) { quantize_blocks((Job *)job); return 0; }
static void *run_dequantize(void *job) { dequantize_blocks((Job *)job); return 0; }

/* Cut the blocks into `threads` contiguous ranges; the calling thread takes the last one. */
static int64_t run_parallel(Job *base, int threads, void *(*work)(void *)) {
    int64_t blocks = (base->numel + base->block - 1) / base->block;
    if (base->numel < PARALLEL_BELOW || threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks > 0 ? (int)blocks : 1;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = *base;
        jobs[t].first_block = blocks * t / threads;
        jobs[t].last_block = blocks * (t + 1) / threads;
        jobs[t].nonfinite = 0;
    }
    for (int t = 0; t < threads - 1; t++)
        started[t] = pthread_create(&ids[t], 0, work, &jobs[t]) == 0;
    for (int t = 0; t < threads - 1; t++)
        if (!started[t]) work(&jobs[t]); /* no thread to be had: do its share here */
    work(&jobs[threads - 1]);
    int64_t nonfinite = jobs[threads - 1].nonfinite;
    for (int t = 0; t < threads - 1; t++) {
        if (started[t]) pthread_join(ids[t], 0);
        nonfinite += jobs[t].nonfinite;
    }
    return nonfinite;
}

/* Returns the count of non-finite inputs, which were encoded as 0. */
int64_t spotrain_quantize(const float *x, float *residual, int64_t numel, int bits, int64_t block, uint8_t *codes,
                          float *absmax, int threads) {
    Job job = {.x = x, .residual = residual, .codes = codes, .absmax = absmax, .numel = numel, .block = block,
               .bits = bits};
    return run_parallel(&job, threads, run_quantize);
}

void spotrain_dequantize(const uint8_t *codes, const float *absmax, int64_t numel, int bits, int64_t block, float *out,
                         int threads) {
    Job job = {.codes_in = codes, .absmax = absmax, .out = out, .numel = numel, .block = block, .bits = bits};
    run_parallel(&job, threads, run_dequantize);
}

/* Ask for huge pages on a fresh, untouched buffer: a 64 MiB output otherwise costs 16,384 page
 * faults, which take longer than writing it. Only whole 2 MiB pages inside the buffer qualify. */
void spotrain_advise_huge_pages(void *buffer, int64_t bytes) {
    uintptr_t start = ((uintptr_t)buffer + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    uintptr_t stop = ((uintptr_t)buffer + (uintptr_t)bytes) & ~(uintptr_t)(HUGE_PAGE - 1);
    if (stop > start) madvise((void *)start, stop - start, MADV_HUGEPAGE);
}
