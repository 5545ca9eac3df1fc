/* Fused selective-scan forward for CPU tensors: one pass over the sequence, state in registers.
 *
 * Built on first use by vim/kernels/scan_native.py with the machine's C compiler (plain C, no
 * Python or PyTorch headers) and called through ctypes; see that module for the contract.
 *
 * A job is a block of up to LANES adjacent channels of one (direction, batch element). Its state
 * is held as h[n][lane], so every operation is a vertical SIMD operation across channels, and the
 * decays exp2(delta * A * log2 e) are formed in registers by an inline polynomial (a call into
 * libm would force the state out of the registers at every step). Softplus and the silu gate run
 * in a pass before and after the scan over the job's (L, LANES) slice of delta and out.
 *
 * Inputs are read with their own strides (in elements), so the caller copies nothing: channels-
 * last u, delta and z (channel stride 1) take the vector path, any other strides a gather path.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define MAX_STATE 64
#define MAX_THREADS 256

/* The canonical form of scan_layout.py, float32; strides in elements. Keep in step with ScanArgs in scan_native.py. */
typedef struct {
    int64_t length, batch, dim, groups, n_state, directions, chunk;
    int64_t reverse, delta_softplus; /* reverse: whether direction 0 runs from the last token to the first */
    const float *u, *delta, *z, *B, *C;
    const float *A, *D, *bias;      /* A (K, dim, N), D and bias (K, dim) or NULL: dense */
    float *out;                     /* (K, batch, L, dim) dense: gated output */
    float *checkpoints;             /* (K, batch, chunks, dim, N) dense: the state after each chunk */
    int64_t u_stride[4], delta_stride[4]; /* (K, batch, dim, L) */
    int64_t z_stride[3];                  /* (batch, dim, L) */
    int64_t B_stride[5], C_stride[5];     /* (K, batch, G, N, L) */
} ScanArgs;

/* 2^x for x <= 126 (0 below -127): 2^floor(x) times a degree-6 fit of 2^f on [0, 1), relative error under 1e-7. */
static inline float exp2_poly(float x) {
    x = fmaxf(fminf(x, 126.0f), -127.0f);
    const float whole = floorf(x), f = x - whole;
    float p = 2.1702239e-4f;
    p = p * f + 1.2439693e-3f;
    p = p * f + 9.6788406e-3f;
    p = p * f + 5.5483341e-2f;
    p = p * f + 2.4022983e-1f;
    p = p * f + 6.9314700e-1f;
    p = p * f + 1.0f;
    const int32_t bits = ((int32_t)whole + 127) << 23; /* 2^whole; whole = -127 gives 0 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float exp_poly(float x) { return exp2_poly(x * 1.44269504f); }

/* log(1 + e^x), linear above 20 as in PyTorch's softplus. */
static inline float softplus(float x) { return x > 20.0f ? x : logf(1.0f + exp_poly(x)); }

/* Scan one job of `width` channels starting at channel d0. The flags are compile-time constants at
 * each call site, so the common case (unit channel stride, N = 16, one group per block, full width)
 * is compiled with the state held in registers. `dt` is scratch of L * LANES floats. */
static inline __attribute__((always_inline)) void scan_job(
    const ScanArgs *restrict a, int64_t k, int64_t b, int64_t d0, const int width, const int64_t n_state,
    const int unit, const int shared, float *restrict dt)
{
    const int64_t length = a->length, dim = a->dim, group_size = dim / a->groups;
    const int reverse = (int)a->reverse != (k == 1);
    const float *u = a->u + k * a->u_stride[0] + b * a->u_stride[1] + d0 * a->u_stride[2];
    const float *delta = a->delta + k * a->delta_stride[0] + b * a->delta_stride[1] + d0 * a->delta_stride[2];
    const int64_t su = unit ? 1 : a->u_stride[2], sd = unit ? 1 : a->delta_stride[2];
    const int64_t tu = a->u_stride[3], td = a->delta_stride[3];
    const float *Bk = a->B + k * a->B_stride[0] + b * a->B_stride[1], *Ck = a->C + k * a->C_stride[0] + b * a->C_stride[1];
    const int64_t Bn = a->B_stride[3], Bt = a->B_stride[4], Cn = a->C_stride[3], Ct = a->C_stride[4];
    float *out = a->out + (k * a->batch + b) * length * dim + d0;
    float *saved = a->checkpoints + (k * a->batch + b) * ((length + a->chunk - 1) / a->chunk) * dim * n_state + d0 * n_state;

    float h[n_state <= 16 ? 16 : MAX_STATE][LANES], a2[n_state <= 16 ? 16 : MAX_STATE][LANES];
    float D[LANES], bias[LANES];
    int64_t B_at[LANES], C_at[LANES]; /* offset of each lane's group in B and C */
    for (int j = 0; j < LANES; j++) {
        const int64_t d = d0 + (j < width ? j : 0), g = d / group_size;
        D[j] = a->D ? a->D[k * dim + d] : 0.0f;
        bias[j] = a->bias ? a->bias[k * dim + d] : 0.0f;
        B_at[j] = g * a->B_stride[2];
        C_at[j] = g * a->C_stride[2];
        for (int64_t n = 0; n < n_state; n++) {
            h[n][j] = 0.0f;
            a2[n][j] = a->A[(k * dim + d) * n_state + n] * 1.44269504f;
        }
    }

    /* delta + bias, softplus'd, for every step (a separate pass keeps libm calls out of the scan loop) */
    for (int64_t t = 0; t < length; t++) {
        float *row = dt + t * LANES;
        for (int j = 0; j < LANES; j++) row[j] = (j < width ? delta[t * td + j * sd] : 0.0f) + bias[j];
        if (a->delta_softplus)
            for (int j = 0; j < LANES; j++) row[j] = softplus(row[j]);
    }

    for (int64_t step = 0; step < length; step++) {
        const int64_t t = reverse ? length - 1 - step : step;
        const float *dt_t = dt + t * LANES;
        float x[LANES], drive[LANES], acc[LANES];
        for (int j = 0; j < LANES; j++) {
            x[j] = j < width ? u[t * tu + j * su] : 0.0f;
            drive[j] = dt_t[j] * x[j];
            acc[j] = D[j] * x[j];
        }
        for (int64_t n = 0; n < n_state; n++) {
            if (shared) { /* every channel of the block reads the same B and C */
                const float bn = Bk[B_at[0] + n * Bn + t * Bt], cn = Ck[C_at[0] + n * Cn + t * Ct];
                for (int j = 0; j < LANES; j++) {
                    h[n][j] = exp2_poly(dt_t[j] * a2[n][j]) * h[n][j] + drive[j] * bn;
                    acc[j] += h[n][j] * cn;
                }
            } else {
                for (int j = 0; j < LANES; j++) {
                    h[n][j] = exp2_poly(dt_t[j] * a2[n][j]) * h[n][j] + drive[j] * Bk[B_at[j] + n * Bn + t * Bt];
                    acc[j] += h[n][j] * Ck[C_at[j] + n * Cn + t * Ct];
                }
            }
        }
        float *out_t = out + t * dim;
        for (int j = 0; j < width; j++) out_t[j] = acc[j];
        if ((step + 1) % a->chunk == 0 || step == length - 1) {
            float *state = saved + (step / a->chunk) * dim * n_state;
            for (int j = 0; j < width; j++)
                for (int64_t n = 0; n < n_state; n++) state[j * n_state + n] = h[n][j];
        }
    }

    if (a->z) { /* out *= silu(z) */
        const float *z = a->z + b * a->z_stride[0] + d0 * a->z_stride[1];
        const int64_t sz = unit ? 1 : a->z_stride[1], tz = a->z_stride[2];
        for (int64_t t = 0; t < length; t++) {
            float *out_t = out + t * dim;
            for (int j = 0; j < width; j++) {
                const float gate = z[t * tz + j * sz];
                out_t[j] *= gate / (1.0f + exp_poly(-gate));
            }
        }
    }
}

static void run_job(const ScanArgs *a, int64_t job, float *dt) {
    const int64_t blocks = (a->dim + LANES - 1) / LANES;
    const int64_t k = job / (a->batch * blocks), b = job / blocks % a->batch, d0 = job % blocks * LANES;
    const int width = (int)(a->dim - d0 < LANES ? a->dim - d0 : LANES);
    const int64_t group_size = a->dim / a->groups;
    const int unit = a->u_stride[2] == 1 && a->delta_stride[2] == 1 && (!a->z || a->z_stride[1] == 1);
    const int shared = d0 / group_size == (d0 + width - 1) / group_size;
    if (unit && shared && width == LANES && a->n_state == 16)
        scan_job(a, k, b, d0, LANES, 16, 1, 1, dt);
    else
        scan_job(a, k, b, d0, width, a->n_state, 0, 0, dt);
}

typedef struct {
    const ScanArgs *args;
    int64_t first, last; /* jobs [first, last) */
    int status;
} Worker;

static void *work(void *arg) {
    Worker *w = arg;
    float *dt = malloc(sizeof(float) * LANES * w->args->length);
    if (!dt) {
        w->status = -2;
        return NULL;
    }
    for (int64_t job = w->first; job < w->last; job++) run_job(w->args, job, dt);
    free(dt);
    return NULL;
}

/* Scan every job on `threads` threads (the caller's thread is one of them). Returns 0; -1 if N is
 * over MAX_STATE; -2 if memory ran out. A thread that cannot be started has its share done by the caller. */
int vim_scan_forward(const ScanArgs *args, int threads) {
    if (args->n_state > MAX_STATE) return -1;
    const int64_t jobs = args->directions * args->batch * ((args->dim + LANES - 1) / LANES);
    if (threads > jobs) threads = (int)jobs;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    Worker workers[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++)
        workers[i] = (Worker){args, jobs * i / threads, jobs * (i + 1) / threads, 0};
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, work, &workers[i]) == 0;
    work(&workers[0]);
    int status = workers[0].status;
    for (int i = 1; i < threads; i++) {
        if (!started[i]) {
            work(&workers[i]); /* could not start a thread: do its share here */
            status = status ? status : workers[i].status;
            continue;
        }
        pthread_join(ids[i], NULL);
        status = status ? status : workers[i].status;
    }
    return status;
}
