/* Fused selective scan for CPU tensors, forward and backward: state in registers, nothing of size (L, dim, N) stored.
 *
 * Built on first use by vim/kernels/scan_native.py with the machine's C compiler (plain C, no
 * Python or PyTorch headers) and called through ctypes; see that module for the contract.
 *
 * A job is a block of up to LANES adjacent channels of one batch element, in one group of B and C,
 * scanned in every direction. Its state is held as h[n][lane], so every operation is a vertical
 * SIMD operation across channels (whose B_t and C_t are the same scalars), and the
 * decays exp2(delta * A * log2 e) are formed in registers by an inline polynomial (a call into
 * libm would force the state out of the registers at every step). Softplus and the silu gate run
 * in a pass before and after the scan over the job's (L, LANES) slice of delta and out.
 *
 * The backward pass walks the chunks of `chunk` steps in reverse: it recomputes the chunk's states
 * from the forward's checkpoint into a small buffer, then runs the adjoint recurrence
 * g_s = C_s dy_s + exp(delta_{s+1} A) g_{s+1} back through them. Gradients of B and C, sums over
 * the channels of a group, are summed per thread and then by the caller; those of A, D and
 * delta_bias are written per batch element and summed by the caller. A job runs every direction
 * of its block, so the gradient of the shared gate z is summed without a race.
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
    int64_t length, batch, dim, groups, n_state, directions, chunk, threads;
    int64_t reverse, delta_softplus; /* reverse: whether direction 0 runs from the last token to the first */
    const float *u, *delta, *z, *B, *C;
    const float *A, *D, *bias; /* A (K, dim, N); D and bias (K, dim) or NULL: dense */
    float *out;                /* forward: (K, batch, L, dim) dense, the gated output */
    float *checkpoints;        /* (K, batch, chunks, dim, N) dense: written by the forward, read by the backward */
    const float *dout;         /* backward: (K, batch, dim, L), strided */
    float *du, *ddelta;        /* backward: (K, batch, L, dim) dense */
    float *dz;                 /* backward: (batch, L, dim) dense, or NULL */
    float *dB, *dC;            /* backward: (threads, K, batch, G, N, L) dense, one sum per thread */
    float *dA;                 /* backward: (K, batch, dim, N) dense, per batch element */
    float *dD, *dbias;         /* backward: (K, batch, dim) dense, per batch element, or NULL */
    int64_t u_stride[4], delta_stride[4], dout_stride[4]; /* (K, batch, dim, L) */
    int64_t z_stride[3];                                  /* (batch, dim, L) */
    int64_t B_stride[5], C_stride[5];                     /* (K, batch, G, N, L) */
} ScanArgs;

#define INLINE static inline __attribute__((always_inline))
#define LOG2E 1.44269504f
#define LN2 0.69314718f

/* 2^x for x <= 126 (0 below -127): 2^round(x) times a degree-6 fit of 2^f on [-1/2, 1/2] with 2^0 = 1 exact.
 * Relative error under 1e-7; a decay close to 1 (f = x small) keeps all of its precision. */
INLINE float exp2_poly(float x) {
    x = fmaxf(fminf(x, 126.0f), -127.0f);
    const float whole = rintf(x), f = x - whole;
    float p = 1.5353350e-4f;
    p = p * f + 1.3398875e-3f;
    p = p * f + 9.6184378e-3f;
    p = p * f + 5.5503324e-2f;
    p = p * f + 2.4022648e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    const int32_t bits = ((int32_t)whole + 127) << 23; /* 2^whole; whole = -127 gives 0 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp2_poly(-x * LOG2E)); }

/* log(1 + e^x), linear above 20 as in PyTorch's softplus. */
INLINE float softplus(float x) { return x > 20.0f ? x : logf(1.0f + exp2_poly(x * LOG2E)); }

/* One direction of one job: a block of `width` (<= LANES) channels from d0 within group g of batch element b. */
typedef struct {
    const float *u, *delta, *z, *B, *C, *dout;
    int64_t u_lane, delta_lane, z_lane, dout_lane; /* strides between channels (1 on the vector path) */
    int64_t u_step, delta_step, z_step, dout_step, B_state, B_step, C_state, C_step;
    int64_t d0, b, k, g;
    int reverse, width;
} Block;

INLINE Block block_of(const ScanArgs *a, int64_t k, int64_t b, int64_t g, int64_t d0, int width, const int unit) {
    const int64_t *us = a->u_stride, *ds = a->delta_stride, *os = a->dout_stride, *zs = a->z_stride;
    return (Block){
        .u = a->u + k * us[0] + b * us[1] + d0 * us[2],
        .delta = a->delta + k * ds[0] + b * ds[1] + d0 * ds[2],
        .z = a->z ? a->z + b * zs[0] + d0 * zs[1] : NULL,
        .B = a->B + k * a->B_stride[0] + b * a->B_stride[1] + g * a->B_stride[2],
        .C = a->C + k * a->C_stride[0] + b * a->C_stride[1] + g * a->C_stride[2],
        .dout = a->dout ? a->dout + k * os[0] + b * os[1] + d0 * os[2] : NULL,
        .u_lane = unit ? 1 : us[2], .delta_lane = unit ? 1 : ds[2], .z_lane = unit ? 1 : zs[1], .dout_lane = unit ? 1 : os[2],
        .u_step = us[3], .delta_step = ds[3], .z_step = zs[2], .dout_step = os[3],
        .B_state = a->B_stride[3], .B_step = a->B_stride[4], .C_state = a->C_stride[3], .C_step = a->C_stride[4],
        .d0 = d0, .b = b, .k = k, .g = g, .reverse = (int)a->reverse != (k == 1), .width = width,
    };
}

/* The block's parameters, lane by lane (idle lanes of a partial block copy channel d0): A * log2(e), D and
 * delta_bias; and dt (L, LANES) = delta + delta_bias, softplus'd if asked, 0 on idle lanes. */
INLINE void load_parameters(const ScanArgs *a, const Block *v, const int width, const int64_t n_state,
                            float (*restrict a2)[LANES], float *restrict D, float *restrict bias, float *restrict dt) {
    for (int j = 0; j < LANES; j++) {
        const int64_t d = v->k * a->dim + v->d0 + (j < width ? j : 0);
        D[j] = a->D ? a->D[d] : 0.0f;
        bias[j] = a->bias ? a->bias[d] : 0.0f;
        for (int64_t n = 0; n < n_state; n++) a2[n][j] = a->A[d * n_state + n] * LOG2E;
    }
    for (int64_t t = 0; t < a->length; t++) {
        float *row = dt + t * LANES;
        for (int j = 0; j < LANES; j++) row[j] = j < width ? v->delta[t * v->delta_step + j * v->delta_lane] + bias[j] : 0.0f;
        if (a->delta_softplus)
            for (int j = 0; j < LANES; j++) row[j] = j < width ? softplus(row[j]) : 0.0f;
    }
}

/* Channel j of the block at time t, 0 on idle lanes. */
INLINE float lane(const float *x, int64_t t, int64_t step, int j, int64_t lane_stride, int width) {
    return j < width ? x[t * step + j * lane_stride] : 0.0f;
}

INLINE int64_t time_of(const Block *v, int64_t length, int64_t step) { return v->reverse ? length - 1 - step : step; }

#define STATE_ROWS(n_state) ((n_state) <= 16 ? 16 : MAX_STATE)

/* Forward of one direction of a block: out (gated) and the checkpoints. `dt` is scratch of L * LANES floats. */
INLINE void forward_block(const ScanArgs *restrict a, const Block *restrict v, const int width, const int64_t n_state,
                          float *restrict dt) {
    const int64_t length = a->length, dim = a->dim;
    float h[STATE_ROWS(n_state)][LANES], a2[STATE_ROWS(n_state)][LANES], D[LANES], bias[LANES];
    load_parameters(a, v, width, n_state, a2, D, bias, dt);
    for (int64_t n = 0; n < n_state; n++)
        for (int j = 0; j < LANES; j++) h[n][j] = 0.0f;
    float *out = a->out + (v->k * a->batch + v->b) * length * dim + v->d0;
    float *saved = a->checkpoints + (v->k * a->batch + v->b) * ((length + a->chunk - 1) / a->chunk) * dim * n_state + v->d0 * n_state;

    for (int64_t step = 0; step < length; step++) {
        const int64_t t = time_of(v, length, step);
        const float *dt_t = dt + t * LANES;
        float drive[LANES], acc[LANES];
        for (int j = 0; j < LANES; j++) {
            const float x = lane(v->u, t, v->u_step, j, v->u_lane, width);
            drive[j] = dt_t[j] * x;
            acc[j] = D[j] * x;
        }
        for (int64_t n = 0; n < n_state; n++) {
            const float bn = v->B[n * v->B_state + t * v->B_step], cn = v->C[n * v->C_state + t * v->C_step];
            for (int j = 0; j < LANES; j++) {
                h[n][j] = exp2_poly(dt_t[j] * a2[n][j]) * h[n][j] + drive[j] * bn;
                acc[j] += h[n][j] * cn;
            }
        }
        for (int j = 0; j < width; j++) out[t * dim + j] = acc[j];
        if ((step + 1) % a->chunk == 0 || step == length - 1) {
            float *state = saved + (step / a->chunk) * dim * n_state;
            for (int j = 0; j < width; j++)
                for (int64_t n = 0; n < n_state; n++) state[j * n_state + n] = h[n][j];
        }
    }
    if (v->z) /* out *= silu(z) */
        for (int64_t t = 0; t < length; t++)
            for (int j = 0; j < width; j++) {
                const float gate = v->z[t * v->z_step + j * v->z_lane];
                out[t * dim + j] *= gate * sigmoid(gate);
            }
}

/* Backward of one direction of a block. Scratch: dt and ddt of L * LANES floats; a chunk's states, (chunk + 1) * N * LANES,
 * and its decays, chunk * N * LANES. */
INLINE void backward_block(const ScanArgs *restrict a, const Block *restrict v, int64_t worker, const int width,
                           const int64_t n_state, float *restrict dt, float *restrict ddt, float *restrict states,
                           float *restrict decays) {
    const int64_t length = a->length, dim = a->dim, chunks = (length + a->chunk - 1) / a->chunk;
    const int64_t row = v->k * a->batch + v->b; /* (direction, batch element) */
    float a2[STATE_ROWS(n_state)][LANES], g[STATE_ROWS(n_state)][LANES], dA[STATE_ROWS(n_state)][LANES];
    float D[LANES], bias[LANES], dD[LANES];
    load_parameters(a, v, width, n_state, a2, D, bias, dt);
    for (int64_t n = 0; n < n_state; n++)
        for (int j = 0; j < LANES; j++) g[n][j] = dA[n][j] = 0.0f;
    for (int j = 0; j < LANES; j++) dD[j] = 0.0f;
    const float *saved = a->checkpoints + row * chunks * dim * n_state + v->d0 * n_state;
    float *du = a->du + row * length * dim + v->d0, *dz = a->dz ? a->dz + v->b * length * dim + v->d0 : NULL;
    const int64_t partial = ((worker * a->directions + v->k) * a->batch + v->b) * a->groups + v->g; /* this thread's sum */
    float *dB = a->dB + partial * n_state * length, *dC = a->dC + partial * n_state * length;
#define STATE(i, n, j) states[((i) * n_state + (n)) * LANES + (j)]
#define DECAY(i, n, j) decays[((i) * n_state + (n)) * LANES + (j)]

    for (int64_t c = chunks - 1; c >= 0; c--) {
        const int64_t first = c * a->chunk, steps = length - first < a->chunk ? length - first : a->chunk;
        for (int64_t n = 0; n < n_state; n++) /* the state before the chunk: the previous chunk's checkpoint */
            for (int j = 0; j < LANES; j++) STATE(0, n, j) = c && j < width ? saved[(c - 1) * dim * n_state + j * n_state + n] : 0.0f;
        for (int64_t i = 0; i < steps; i++) { /* recompute the chunk's states */
            const int64_t t = time_of(v, length, first + i);
            const float *dt_t = dt + t * LANES;
            float drive[LANES];
            for (int j = 0; j < LANES; j++) drive[j] = dt_t[j] * lane(v->u, t, v->u_step, j, v->u_lane, width);
            for (int64_t n = 0; n < n_state; n++) {
                const float bn = v->B[n * v->B_state + t * v->B_step];
                for (int j = 0; j < LANES; j++) {
                    DECAY(i, n, j) = exp2_poly(dt_t[j] * a2[n][j]);
                    STATE(i + 1, n, j) = DECAY(i, n, j) * STATE(i, n, j) + drive[j] * bn;
                }
            }
        }
        for (int64_t i = steps - 1; i >= 0; i--) { /* and walk back through them */
            const int64_t t = time_of(v, length, first + i);
            const float *dt_t = dt + t * LANES;
            float x[LANES], dy[LANES], du_t[LANES], ddt_t[LANES];
            for (int j = 0; j < LANES; j++) {
                x[j] = lane(v->u, t, v->u_step, j, v->u_lane, width);
                dy[j] = lane(v->dout, t, v->dout_step, j, v->dout_lane, width);
            }
            if (v->z) { /* through the gate: dz += dout * y * silu'(z), dy = dout * silu(z) */
                float y[LANES];
                for (int j = 0; j < LANES; j++) y[j] = D[j] * x[j];
                for (int64_t n = 0; n < n_state; n++) {
                    const float cn = v->C[n * v->C_state + t * v->C_step];
                    for (int j = 0; j < LANES; j++) y[j] += STATE(i + 1, n, j) * cn;
                }
                for (int j = 0; j < width; j++) {
                    const float zj = v->z[t * v->z_step + j * v->z_lane], s = sigmoid(zj);
                    const float dz_j = dy[j] * y[j] * s * (1.0f + zj * (1.0f - s));
                    dz[t * dim + j] = v->k == 0 ? dz_j : dz[t * dim + j] + dz_j;
                    dy[j] *= zj * s;
                }
            }
            for (int j = 0; j < LANES; j++) {
                dD[j] += dy[j] * x[j];
                du_t[j] = dy[j] * D[j];
                ddt_t[j] = 0.0f;
            }
            for (int64_t n = 0; n < n_state; n++) {
                const float bn = v->B[n * v->B_state + t * v->B_step], cn = v->C[n * v->C_state + t * v->C_step];
                float grad_B = 0.0f, grad_C = 0.0f;
                for (int j = 0; j < LANES; j++) {
                    const float decay = DECAY(i, n, j), before = STATE(i, n, j);
                    const float gn = g[n][j] + dy[j] * cn; /* dL/dh at this step */
                    grad_C += dy[j] * STATE(i + 1, n, j);
                    grad_B += gn * dt_t[j] * x[j];
                    du_t[j] += gn * dt_t[j] * bn;
                    ddt_t[j] += gn * (bn * x[j] + a2[n][j] * LN2 * decay * before);
                    dA[n][j] += gn * decay * before * dt_t[j];
                    g[n][j] = decay * gn;
                }
                dB[n * length + t] += grad_B;
                dC[n * length + t] += grad_C;
            }
            for (int j = 0; j < width; j++) du[t * dim + j] = du_t[j];
            for (int j = 0; j < LANES; j++) ddt[t * LANES + j] = ddt_t[j];
        }
    }
#undef STATE
#undef DECAY

    float dbias[LANES] = {0.0f}; /* through softplus: d delta = d dt * sigmoid(delta + delta_bias) */
    float *ddelta = a->ddelta + row * length * dim + v->d0;
    for (int64_t t = 0; t < length; t++)
        for (int j = 0; j < width; j++) {
            const float raw = v->delta[t * v->delta_step + j * v->delta_lane] + bias[j];
            const float grad = a->delta_softplus ? ddt[t * LANES + j] * sigmoid(raw) : ddt[t * LANES + j];
            ddelta[t * dim + j] = grad;
            dbias[j] += grad;
        }
    for (int j = 0; j < width; j++) {
        const int64_t d = row * dim + v->d0 + j;
        if (a->dD) a->dD[d] = dD[j];
        if (a->dbias) a->dbias[d] = dbias[j];
        for (int64_t n = 0; n < n_state; n++) a->dA[d * n_state + n] = dA[n][j];
    }
}

/* Jobs: blocks of up to LANES channels that never straddle a group, (batch element, group, block) in order. */
INLINE int64_t blocks_per_group(const ScanArgs *a) { return (a->dim / a->groups + LANES - 1) / LANES; }

/* Run job `job` over every direction. `scratch` holds (2 * L + (2 * chunk + 1) * N) * LANES floats. */
static void run_job(const ScanArgs *a, int64_t job, int64_t worker, int backward, float *scratch) {
    const int64_t per_group = blocks_per_group(a), group_size = a->dim / a->groups;
    const int64_t b = job / (a->groups * per_group), g = job / per_group % a->groups, block = job % per_group;
    const int64_t d0 = g * group_size + block * LANES;
    const int width = (int)(group_size - block * LANES < LANES ? group_size - block * LANES : LANES);
    const int unit = a->u_stride[2] == 1 && a->delta_stride[2] == 1 && (!a->z || a->z_stride[1] == 1)
                     && (!backward || a->dout_stride[2] == 1);
    const int fast = unit && width == LANES && a->n_state == 16; /* compiled with N and the strides known */
    float *dt = scratch, *ddt = dt + a->length * LANES, *states = ddt + a->length * LANES;
    float *decays = states + (a->chunk + 1) * a->n_state * LANES;
    for (int64_t k = 0; k < a->directions; k++) {
        if (fast) {
            const Block v = block_of(a, k, b, g, d0, LANES, 1);
            if (backward) backward_block(a, &v, worker, LANES, 16, dt, ddt, states, decays);
            else forward_block(a, &v, LANES, 16, dt);
        } else {
            const Block v = block_of(a, k, b, g, d0, width, 0);
            if (backward) backward_block(a, &v, worker, width, a->n_state, dt, ddt, states, decays);
            else forward_block(a, &v, width, a->n_state, dt);
        }
    }
}

typedef struct {
    const ScanArgs *args;
    int64_t index, first, last; /* jobs [first, last) */
    int backward, status;
} Worker;

static void *work(void *arg) {
    Worker *w = arg;
    const ScanArgs *a = w->args;
    float *scratch = malloc(sizeof(float) * LANES * (2 * a->length + (2 * a->chunk + 1) * a->n_state));
    if (!scratch) {
        w->status = -2;
        return NULL;
    }
    for (int64_t job = w->first; job < w->last; job++) run_job(a, job, w->index, w->backward, scratch);
    free(scratch);
    return NULL;
}

#ifdef _OPENMP
/* Built with -fopenmp against the libgomp torch has loaded: the jobs run on torch's own thread pool. */
static void start_workers(Worker *workers, int64_t threads) {
#pragma omp parallel for num_threads((int)threads) schedule(static, 1)
    for (int64_t i = 0; i < threads; i++) work(&workers[i]);
}
#else
/* Threads of our own, the caller's among them; a thread that cannot be started has its share done by the caller. */
static void start_workers(Worker *workers, int64_t threads) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, work, &workers[i]) == 0;
    work(&workers[0]);
    for (int64_t i = 1; i < threads; i++) {
        if (started[i]) pthread_join(ids[i], NULL);
        else work(&workers[i]);
    }
}
#endif

/* Every job on up to args->threads threads. Returns 0; -1 if N is over MAX_STATE; -2 if memory ran out. */
static int run(const ScanArgs *args, int backward) {
    if (args->n_state > MAX_STATE) return -1;
    const int64_t jobs = args->batch * args->groups * blocks_per_group(args);
    if (backward) { /* the per-thread sums of dB and dC start at zero, also those of threads not needed */
        const size_t size = sizeof(float) * args->threads * args->directions * args->batch * args->groups * args->n_state * args->length;
        memset(args->dB, 0, size);
        memset(args->dC, 0, size);
    }
    int64_t threads = args->threads < jobs ? args->threads : jobs;
    threads = threads > MAX_THREADS ? MAX_THREADS : threads < 1 ? 1 : threads;
    Worker workers[MAX_THREADS];
    for (int64_t i = 0; i < threads; i++) workers[i] = (Worker){args, i, jobs * i / threads, jobs * (i + 1) / threads, backward, 0};
    start_workers(workers, threads);
    int status = 0;
    for (int64_t i = 0; i < threads; i++) status = status ? status : workers[i].status;
    return status;
}

int vim_scan_forward(const ScanArgs *args) { return run(args, 0); }

int vim_scan_backward(const ScanArgs *args) { return run(args, 1); }
