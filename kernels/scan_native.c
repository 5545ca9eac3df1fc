/* Fused selective scan for CPU tensors, forward and backward: state in registers, nothing of size (L, dim, N) stored.
 *
 * Built on first use by vim/kernels/scan_native.py with the machine's C compiler (plain C, no
 * Python or PyTorch headers) and called through ctypes; see that module for the contract.
 *
 * A job is a block of up to LANES adjacent channels of one batch element, in one group of B and C,
 * scanned in every direction. Its state is held as h[n], one Lanes vector (a GCC / clang vector
 * extension) per state, so every operation is a vertical SIMD operation across channels (whose B_t
 * and C_t are the same scalars), and the decays exp2(delta * A * log2 e) are formed in registers by
 * an inline polynomial (with AVX-512 its scale is one vscalefps; a call into libm would force the
 * state out of the registers at every step). Softplus, also without libm, and the silu gate run in
 * a pass before and after the scan over the job's (L, LANES) slice of delta and out.
 *
 * The backward pass walks the chunks of `chunk` steps in reverse: it recomputes the chunk's states
 * from the forward's checkpoint into a small buffer, then runs the adjoint recurrence
 * g_s = C_s dy_s + exp(delta_{s+1} A) g_{s+1} back through them. Gradients of B and C, sums over
 * the channels of a group, are folded across lanes LANES states at a time (lane_sums), summed per
 * slice of the work (parallel_slices) and then by the caller; those of A, D and
 * delta_bias are written per batch element and summed by the caller. A job runs every direction
 * of its block, so the gradient of the shared gate z is summed without a race.
 *
 * Inputs are read with their own strides (in elements), so the caller copies nothing: channels-
 * last u, delta and z (channel stride 1) take the vector path, any other strides a gather path.
 *
 * Directions of a 2-D grid (scan_layout.py's order codes): every tensor stays in grid order, and
 * step s of a direction reads token time_of(s). A column-major direction looks its token up in a
 * table of the grid's column-major order that each worker fills once (no division per step);
 * a row-major one needs none, so the scans of one sequence run exactly as before.
 */
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Channels per job: one SIMD register of floats (GCC's code for vector types wider than the hardware's is poor). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define MAX_STATE 64
#define MAX_THREADS 256
#define MAX_DIRECTIONS 4

/* The canonical form of scan_layout.py, float32; strides in elements. Keep in step with ScanArgs in scan_native.py. */
typedef struct {
    int64_t length, batch, dim, groups, n_state, directions, chunk, threads, slices; /* slices: see parallel_slices */
    int64_t reverse, delta_softplus; /* reverse: swaps forward and reversed in every direction's order */
    int64_t height, width;           /* the grid, height * width == length ((1, length) for a sequence) */
    int64_t orders[MAX_DIRECTIONS];  /* order code of each direction: 0 row, 1 column, 2 and 3 reversed */
    const float *u, *delta, *z, *B, *C;
    const float *A, *D, *bias; /* A (K, dim, N); D and bias (K, dim) or NULL: dense */
    float *out;                /* forward: (K, batch, L, dim) dense, the gated output */
    float *checkpoints;        /* (K, batch, chunks, dim, N) dense: written by the forward, read by the backward */
    const float *dout;         /* backward: (K, batch, dim, L), strided */
    float *du, *ddelta;        /* backward: (K, batch, L, dim) dense */
    float *dz;                 /* backward: (batch, L, dim) dense, or NULL */
    float *dB, *dC;            /* backward: (slices, K, batch, G, N, L) dense, one sum per slice */
    float *dA;                 /* backward: (K, batch, dim, N) dense, per batch element */
    float *dD, *dbias;         /* backward: (K, batch, dim) dense, per batch element, or NULL */
    int64_t u_stride[4], delta_stride[4], dout_stride[4]; /* (K, batch, dim, L) */
    int64_t z_stride[3];                                  /* (batch, dim, L) */
    int64_t B_stride[5], C_stride[5];                     /* (K, batch, G, N, L) */
} ScanArgs;

#define INLINE static inline __attribute__((always_inline))
#define LOG2E 1.44269504f
#define LN2 0.69314718f

/* 2^f for f in [-1/2, 1/2], on a float or on Lanes: a degree-6 fit with 2^0 = 1 exact, relative error under 1e-7;
 * a decay close to 1 (f small) keeps all of its precision. */
#define EXP2_FRACTION(f)                                                                                              \
    ((((((1.5353350e-4f * (f) + 1.3398875e-3f) * (f) + 9.6184378e-3f) * (f) + 5.5503324e-2f) * (f) + 2.4022648e-1f) \
          * (f)                                                                                                     \
      + 6.9314718e-1f)                                                                                              \
         * (f)                                                                                                      \
     + 1.0f)

/* 2^x for x <= 126 (0 below -127): 2^round(x) times EXP2_FRACTION of the rest. */
INLINE float exp2_poly(float x) {
    x = fmaxf(fminf(x, 126.0f), -127.0f);
    const float whole = rintf(x), f = x - whole, p = EXP2_FRACTION(f);
    const int32_t bits = ((int32_t)whole + 127) << 23; /* 2^whole; whole = -127 gives 0 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp2_poly(-x * LOG2E)); }

/* log(1 + e^x) = max(x, 0) + log1p(e) with e = e^-|x| in (0, 1], and log1p(e) = 2 atanh(s) = s P(s^2) for
 * s = e / (2 + e) in (0, 1/3]: P is a degree-4 fit of 2 atanh(s) / s, relative error under 4e-9. No call into libm
 * (the loop over lanes stays vectorised) and no cancellation for small e. Above 20 this is x to within float32,
 * as PyTorch's threshold gives. */
INLINE float softplus(float x) {
    const float e = exp2_poly(-fabsf(x) * LOG2E), s = e / (2.0f + e), u = s * s;
    const float p = (((2.817862665e-1f * u + 2.796054683e-1f) * u + 4.002491355e-1f) * u + 6.666631462e-1f) * u + 2.000000008f;
    return fmaxf(x, 0.0f) + s * p;
}

/* The LANES channels of a job as one SIMD value (a GCC and clang vector extension): the conv is written on
 * whole rows, so it vectorises whatever the compiler's loop vectoriser makes of the short loops. */
typedef float Lanes __attribute__((vector_size(sizeof(float) * LANES)));

/* `width` channels `lane_stride` apart from x, 0 on idle lanes. */
INLINE Lanes load_lanes(const float *x, const int64_t lane_stride, const int width) {
    Lanes v;
    if (lane_stride == 1 && width == LANES) { /* one unaligned load, not a copy through a row (a stalled forward) */
        memcpy(&v, x, sizeof v);
        return v;
    }
    float row[LANES];
    for (int j = 0; j < LANES; j++) row[j] = j < width ? x[j * lane_stride] : 0.0f;
    memcpy(&v, row, sizeof v);
    return v;
}

INLINE void store_lanes(float *out, const Lanes v, const int width) {
    if (width == LANES) {
        memcpy(out, &v, sizeof v);
        return;
    }
    float row[LANES];
    memcpy(row, &v, sizeof row);
    for (int j = 0; j < width; j++) out[j] = row[j];
}

typedef int32_t LaneInts __attribute__((vector_size(sizeof(int32_t) * LANES)));

/* a where `take_b` is 0, b where it is all ones (a lane comparison's result). */
INLINE Lanes select_lanes(Lanes a, Lanes b, LaneInts take_b) { return (Lanes)(((LaneInts)a & ~take_b) | ((LaneInts)b & take_b)); }

/* exp2_poly on every lane, in whole-vector operations (reading single lanes of a vector would leave the code scalar).
 * With AVX-512 the scale 2^round(x) is one vscalefps, which also gives 0 far below -127 and inf above 128; with AVX2
 * it is exp2_poly's exponent bits; elsewhere x is clamped to [-127, 126] by lane comparisons and round(x) is
 * floor(x + 1/2), the truncation of the positive x + 127.5, less 127. */
INLINE Lanes exp2_lanes(Lanes x) {
#if defined(__AVX512F__) && LANES == 16
    const __m512 whole = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Lanes f = x - (Lanes)whole, p = EXP2_FRACTION(f);
    return (Lanes)_mm512_scalef_ps((__m512)p, whole);
#elif defined(__AVX2__) && LANES == 8
    x = (Lanes)_mm256_max_ps(_mm256_min_ps((__m256)x, _mm256_set1_ps(126.0f)), _mm256_set1_ps(-127.0f));
    const __m256 whole = _mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Lanes f = x - (Lanes)whole, p = EXP2_FRACTION(f);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127)), 23);
    return p * (Lanes)_mm256_castsi256_ps(bits); /* 2^whole; whole = -127 gives 0 */
#else
    const Lanes low = (Lanes){0} - 127.0f, high = (Lanes){0} + 126.0f;
    x = select_lanes(select_lanes(x, low, x < low), high, x > high);
    const LaneInts whole = __builtin_convertvector(x + 127.5f, LaneInts) - 127;
    const Lanes f = x - __builtin_convertvector(whole, Lanes), p = EXP2_FRACTION(f);
    return p * (Lanes)((whole + 127) << 23); /* 2^whole; whole = -127 gives 0 */
#endif
}

/* One direction of one job: a block of `width` (<= LANES) channels from d0 within group g of batch element b. */
typedef struct {
    const float *u, *delta, *z, *B, *C, *dout;
    int64_t u_lane, delta_lane, z_lane, dout_lane; /* strides between channels (1 on the vector path) */
    int64_t u_step, delta_step, z_step, dout_step, B_state, B_step, C_state, C_step;
    const int64_t *columns; /* column-major directions: the token of each forward step; NULL for row-major */
    int64_t d0, b, k, g;
    int reverse, width;
} Block;

INLINE Block block_of(const ScanArgs *a, int64_t k, int64_t b, int64_t g, int64_t d0, int width, const int unit,
                      const int64_t *columns) {
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
        .columns = a->orders[k] & 1 ? columns : NULL,
        .d0 = d0, .b = b, .k = k, .g = g, .reverse = (int)a->reverse != (a->orders[k] >= 2), .width = width,
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

/* The token that logical step `step` of the block's direction reads. */
INLINE int64_t time_of(const Block *v, int64_t length, int64_t step) {
    const int64_t s = v->reverse ? length - 1 - step : step;
    return v->columns ? v->columns[s] : s;
}

/* The grid's tokens in column-major order: step s = w * height + h holds token h * width + w. */
static void fill_columns(const ScanArgs *a, int64_t *columns) {
    int64_t s = 0;
    for (int64_t w = 0; w < a->width; w++)
        for (int64_t h = 0; h < a->height; h++) columns[s++] = h * a->width + w;
}

/* Whether a direction of the launch reads the grid column by column. */
INLINE int any_columns(const ScanArgs *a) {
    int found = 0;
    for (int64_t k = 0; k < a->directions; k++) found |= (int)(a->orders[k] & 1);
    return found;
}

#define STATE_ROWS(n_state) ((n_state) <= 16 ? 16 : MAX_STATE)

/* Forward of one direction of a block: out (gated) and the checkpoints. `dt` is scratch of L * LANES floats. */
INLINE void forward_block(const ScanArgs *restrict a, const Block *restrict v, const int width, const int64_t n_state,
                          float *restrict dt) {
    const int64_t length = a->length, dim = a->dim;
    Lanes h[STATE_ROWS(n_state)], a2[STATE_ROWS(n_state)];
    float D[LANES], bias[LANES];
    load_parameters(a, v, width, n_state, (float (*)[LANES])a2, D, bias, dt);
    const Lanes D_lanes = load_lanes(D, 1, LANES);
    for (int64_t n = 0; n < n_state; n++) h[n] = (Lanes){0};
    float *out = a->out + (v->k * a->batch + v->b) * length * dim + v->d0;
    float *saved = a->checkpoints + (v->k * a->batch + v->b) * ((length + a->chunk - 1) / a->chunk) * dim * n_state + v->d0 * n_state;

    int64_t in_chunk = 0; /* steps since the last checkpoint */
    for (int64_t step = 0; step < length; step++) {
        const int64_t t = time_of(v, length, step);
        if (step + 4 < length) /* a token's row is beyond the hardware prefetcher's reach: see prefetch_rows */
            __builtin_prefetch(v->u + time_of(v, length, step + 4) * v->u_step);
        const Lanes dt_t = load_lanes(dt + t * LANES, 1, LANES);
        const Lanes x = load_lanes(v->u + t * v->u_step, v->u_lane, width);
        const Lanes drive = dt_t * x;
        Lanes acc = D_lanes * x;
        for (int64_t n = 0; n < n_state; n++) {
            const float bn = v->B[n * v->B_state + t * v->B_step], cn = v->C[n * v->C_state + t * v->C_step];
            h[n] = exp2_lanes(dt_t * a2[n]) * h[n] + drive * bn;
            acc += h[n] * cn;
        }
        store_lanes(out + t * dim, acc, width);
        if (++in_chunk == a->chunk || step == length - 1) { /* no division per step */
            in_chunk = 0;
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

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t LaneIndex __attribute__((vector_size(sizeof(int32_t) * LANES)));
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (LaneIndex){__VA_ARGS__})
#endif
#define LANE_LIST(...) __VA_ARGS__
#define FOLD(a, b, first_halves, second_halves) (SHUFFLE(a, b, LANE_LIST first_halves) + SHUFFLE(a, b, LANE_LIST second_halves))

/* Lane n of the result is the sum of the lanes of v[n], for LANES vectors (v is overwritten). Each round folds pairs
 * of vectors: the first halves of every segment of a and of b, plus the second halves, so that after log2(LANES)
 * rounds the segments are single lanes, in order: LANES - 1 folds of 3 operations instead of LANES reductions. */
INLINE Lanes lane_sums(Lanes *restrict v) {
#if LANES == 16
    for (int i = 0; i < 8; i++)
        v[i] = FOLD(v[2 * i], v[2 * i + 1], (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                    (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    for (int i = 0; i < 4; i++)
        v[i] = FOLD(v[2 * i], v[2 * i + 1], (0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                    (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    for (int i = 0; i < 2; i++)
        v[i] = FOLD(v[2 * i], v[2 * i + 1], (0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
                    (2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
    return FOLD(v[0], v[1], (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
#elif LANES == 8
    for (int i = 0; i < 4; i++) v[i] = FOLD(v[2 * i], v[2 * i + 1], (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15));
    for (int i = 0; i < 2; i++) v[i] = FOLD(v[2 * i], v[2 * i + 1], (0, 1, 4, 5, 8, 9, 12, 13), (2, 3, 6, 7, 10, 11, 14, 15));
    return FOLD(v[0], v[1], (0, 2, 4, 6, 8, 10, 12, 14), (1, 3, 5, 7, 9, 11, 13, 15));
#else
    v[0] = FOLD(v[0], v[1], (0, 1, 4, 5), (2, 3, 6, 7));
    v[1] = FOLD(v[2], v[3], (0, 1, 4, 5), (2, 3, 6, 7));
    return FOLD(v[0], v[1], (0, 2, 4, 6), (1, 3, 5, 7));
#endif
}

/* out[n * stride] += the sum of the lanes of v[n], n < n_state: whole runs of LANES by lane_sums, the rest one by one. */
INLINE void add_lane_sums(float *restrict out, int64_t stride, Lanes *restrict v, const int64_t n_state) {
    int64_t n = 0;
    for (; n + LANES <= n_state; n += LANES) {
        const Lanes sums = lane_sums(v + n);
        for (int j = 0; j < LANES; j++) out[(n + j) * stride] += sums[j];
    }
    for (; n < n_state; n++) {
        float sum = 0.0f;
        for (int j = 0; j < LANES; j++) sum += v[n][j];
        out[n * stride] += sum;
    }
}

/* Ask for the rows the backward reads next, whose channels lie a whole token apart (beyond the hardware prefetcher's
 * reach across pages): dout and z at token t, read by the adjoint walk of this chunk, and u at `earlier`, read by the
 * recompute of the chunk before (-1: none). */
INLINE void prefetch_rows(const Block *v, int64_t t, int64_t earlier) {
    __builtin_prefetch(v->dout + t * v->dout_step);
    if (v->z) __builtin_prefetch(v->z + t * v->z_step);
    if (earlier >= 0) __builtin_prefetch(v->u + earlier * v->u_step);
}

/* Backward of one direction of a block. Scratch, 64-byte aligned: dt and ddt of L * LANES floats; a chunk's states,
 * (chunk + 1) * N Lanes, and its decays, chunk * N Lanes.
 *
 * Per step and state n, with gn = dL/dh_n = g_n + dy C_n and q_n = gn decay_n h_{n, before}:
 * du = dy D + dt sum_n gn B_n; d dt = x sum_n gn B_n + ln 2 sum_n q_n A_n log2 e; dA_n += q_n dt; and the lane sums
 * of dy h_n (dC) and gn dt x (dB), over the block's channels. */
INLINE void backward_block(const ScanArgs *restrict a, const Block *restrict v, int64_t slice, const int width,
                           const int64_t n_state, float *restrict dt, float *restrict ddt, Lanes *restrict states,
                           Lanes *restrict decays) {
    const int64_t length = a->length, dim = a->dim, chunks = (length + a->chunk - 1) / a->chunk;
    const int64_t row = v->k * a->batch + v->b; /* (direction, batch element) */
    Lanes a2[STATE_ROWS(n_state)], g[STATE_ROWS(n_state)], dA[STATE_ROWS(n_state)];
    Lanes grad_B[STATE_ROWS(n_state)], grad_C[STATE_ROWS(n_state)]; /* this step's, before the lane sums */
    float D[LANES], bias[LANES];
    load_parameters(a, v, width, n_state, (float (*)[LANES])a2, D, bias, dt);
    const Lanes D_lanes = load_lanes(D, 1, LANES);
    Lanes dD = {0};
    for (int64_t n = 0; n < n_state; n++) g[n] = dA[n] = (Lanes){0};
    const float *saved = a->checkpoints + row * chunks * dim * n_state + v->d0 * n_state;
    float *du = a->du + row * length * dim + v->d0, *dz = a->dz ? a->dz + v->b * length * dim + v->d0 : NULL;
    const int64_t partial = ((slice * a->directions + v->k) * a->batch + v->b) * a->groups + v->g; /* this slice's sum */
    float *dB = a->dB + partial * n_state * length, *dC = a->dC + partial * n_state * length;
#define STATE(i, n) states[(i) * n_state + (n)]
#define DECAY(i, n) decays[(i) * n_state + (n)]

    for (int64_t c = chunks - 1; c >= 0; c--) {
        const int64_t first = c * a->chunk, steps = length - first < a->chunk ? length - first : a->chunk;
        for (int64_t n = 0; n < n_state; n++) /* the state before the chunk: the previous chunk's checkpoint */
            STATE(0, n) = c ? load_lanes(saved + (c - 1) * dim * n_state + n, n_state, width) : (Lanes){0};
        for (int64_t i = 0; i < steps; i++) { /* recompute the chunk's states */
            const int64_t t = time_of(v, length, first + i);
            prefetch_rows(v, t, c ? time_of(v, length, first + i - a->chunk) : -1);
            const Lanes dt_t = load_lanes(dt + t * LANES, 1, LANES);
            const Lanes drive = dt_t * load_lanes(v->u + t * v->u_step, v->u_lane, width);
            for (int64_t n = 0; n < n_state; n++) {
                DECAY(i, n) = exp2_lanes(dt_t * a2[n]);
                STATE(i + 1, n) = DECAY(i, n) * STATE(i, n) + drive * v->B[n * v->B_state + t * v->B_step];
            }
        }
        for (int64_t i = steps - 1; i >= 0; i--) { /* and walk back through them */
            const int64_t t = time_of(v, length, first + i);
            const Lanes dt_t = load_lanes(dt + t * LANES, 1, LANES);
            const Lanes x = load_lanes(v->u + t * v->u_step, v->u_lane, width);
            Lanes dy = load_lanes(v->dout + t * v->dout_step, v->dout_lane, width);
            if (v->z) { /* through the gate: dz += dout * y * silu'(z), dy = dout * silu(z) */
                Lanes y = D_lanes * x;
                for (int64_t n = 0; n < n_state; n++) y += STATE(i + 1, n) * v->C[n * v->C_state + t * v->C_step];
                for (int j = 0; j < width; j++) {
                    const float zj = v->z[t * v->z_step + j * v->z_lane], s = sigmoid(zj);
                    const float dz_j = dy[j] * y[j] * s * (1.0f + zj * (1.0f - s));
                    dz[t * dim + j] = v->k == 0 ? dz_j : dz[t * dim + j] + dz_j;
                    dy[j] *= zj * s;
                }
            }
            dD += dy * x;
            const Lanes dt_x = dt_t * x;
            Lanes through_B = {0}, through_A = {0}; /* sum_n gn B_n and sum_n q_n A_n log2 e */
            for (int64_t n = 0; n < n_state; n++) {
                const float bn = v->B[n * v->B_state + t * v->B_step], cn = v->C[n * v->C_state + t * v->C_step];
                const Lanes decay = DECAY(i, n), gn = g[n] + dy * cn, q = gn * decay * STATE(i, n);
                grad_C[n] = dy * STATE(i + 1, n);
                grad_B[n] = gn * dt_x;
                through_B += gn * bn;
                through_A += q * a2[n];
                dA[n] += q * dt_t;
                g[n] = decay * gn;
            }
            add_lane_sums(dB + t, length, grad_B, n_state);
            add_lane_sums(dC + t, length, grad_C, n_state);
            store_lanes(du + t * dim, dy * D_lanes + dt_t * through_B, width);
            const Lanes ddt_t = x * through_B + LN2 * through_A;
            memcpy(ddt + t * LANES, &ddt_t, sizeof ddt_t);
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

/* One direction of a full block of channel-contiguous tensors, inlined with the state size `n_state` a constant. */
INLINE void vector_block(const ScanArgs *a, const Block *v, int64_t slice, int backward, const int64_t n_state, float *dt,
                         float *ddt, Lanes *states, Lanes *decays) {
    if (backward) backward_block(a, v, slice, LANES, n_state, dt, ddt, states, decays);
    else forward_block(a, v, LANES, n_state, dt);
}

/* Run job `job` over every direction. `scratch` holds 2 * L + (2 * chunk + 1) * N Lanes; `columns` the
 * column-major tokens (or NULL where no direction needs them). */
static void run_job(const ScanArgs *a, int64_t job, int64_t slice, int backward, Lanes *scratch, const int64_t *columns) {
    const int64_t per_group = blocks_per_group(a), group_size = a->dim / a->groups;
    const int64_t b = job / (a->groups * per_group), g = job / per_group % a->groups, block = job % per_group;
    const int64_t d0 = g * group_size + block * LANES;
    const int width = (int)(group_size - block * LANES < LANES ? group_size - block * LANES : LANES);
    const int unit = a->u_stride[2] == 1 && a->delta_stride[2] == 1 && (!a->z || a->z_stride[1] == 1)
                     && (!backward || a->dout_stride[2] == 1);
    /* compiled with N and the strides known: N = 16 (Vim's) and N = 1 (VMamba's) */
    const int fast = unit && width == LANES && (a->n_state == 16 || a->n_state == 1);
    float *dt = (float *)scratch, *ddt = (float *)(scratch + a->length);
    Lanes *states = scratch + 2 * a->length, *decays = states + (a->chunk + 1) * a->n_state;
    for (int64_t k = 0; k < a->directions; k++) {
        if (fast) {
            const Block v = block_of(a, k, b, g, d0, LANES, 1, columns);
            if (a->n_state == 16) vector_block(a, &v, slice, backward, 16, dt, ddt, states, decays);
            else vector_block(a, &v, slice, backward, 1, dt, ddt, states, decays);
        } else {
            const Block v = block_of(a, k, b, g, d0, width, 0, columns);
            if (backward) backward_block(a, &v, slice, width, a->n_state, dt, ddt, states, decays);
            else forward_block(a, &v, width, a->n_state, dt);
        }
    }
}

/* A parallel loop: jobs [0, jobs) cut into `slices` fixed slices (slice s: jobs [jobs s / slices, jobs (s + 1) / slices)),
 * which the threads claim one at a time. A thread that the OS deschedules on a shared machine holds up at most the
 * slice it is on while the others take the rest (an even split up front would leave them waiting for its whole
 * share), and what a slice computes never depends on the thread that ran it, so per-slice sums stay deterministic.
 * The threads are torch's own OpenMP pool in an OpenMP build, else threads of our own with the caller's among them;
 * each has `scratch` Lanes of its own, allocated once. */
typedef void (*SliceRun)(const void *args, int64_t slice, int64_t first, int64_t last, Lanes *scratch);

typedef struct {
    SliceRun run;
    const void *args;
    int64_t jobs, slices, scratch;
    int64_t next; /* the next slice to claim */
} SliceLoop;

static void *claim_slices(void *arg) {
    SliceLoop *loop = arg;
    Lanes *scratch = loop->scratch ? aligned_alloc(sizeof(Lanes), sizeof(Lanes) * loop->scratch) : NULL;
    if (loop->scratch && !scratch) return NULL; /* its slices are left to the other threads */
    for (int64_t s; (s = __atomic_fetch_add(&loop->next, 1, __ATOMIC_RELAXED)) < loop->slices;)
        loop->run(loop->args, s, loop->jobs * s / loop->slices, loop->jobs * (s + 1) / loop->slices, scratch);
    free(scratch);
    return NULL;
}

/* Returns 0, or -2 if no thread could allocate its scratch (slices were left). */
static int parallel_slices(SliceRun run, const void *args, int64_t jobs, int64_t slices, int64_t threads, int64_t scratch) {
    slices = slices < jobs ? slices : jobs;
    if (slices < 1) return 0;
    threads = threads < slices ? threads : slices;
    threads = threads > MAX_THREADS ? MAX_THREADS : threads < 1 ? 1 : threads;
    SliceLoop loop = {run, args, jobs, slices, scratch, 0};
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads)
    claim_slices(&loop);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, claim_slices, &loop) == 0;
    claim_slices(&loop); /* the caller's share, and that of any thread that could not be started */
    for (int64_t i = 1; i < threads; i++)
        if (started[i]) pthread_join(ids[i], NULL);
#endif
    return loop.next < loop.slices ? -2 : 0;
}

/* A scan thread's scratch: dt, ddt, a chunk's states and decays (see run_job), and the column-major tokens. */
INLINE int64_t scan_scratch(const ScanArgs *a) {
    const int64_t columns = any_columns(a) ? (a->length * (int64_t)sizeof(int64_t) + sizeof(Lanes) - 1) / sizeof(Lanes) : 0;
    return 2 * a->length + (2 * a->chunk + 1) * a->n_state + columns;
}

INLINE void scan_slice(const ScanArgs *a, int64_t slice, int64_t first, int64_t last, Lanes *scratch, int backward) {
    int64_t *columns = any_columns(a) ? (int64_t *)(scratch + 2 * a->length + (2 * a->chunk + 1) * a->n_state) : NULL;
    if (columns) fill_columns(a, columns);
    for (int64_t job = first; job < last; job++) run_job(a, job, slice, backward, scratch, columns);
}

static void scan_forward_slice(const void *args, int64_t slice, int64_t first, int64_t last, Lanes *scratch) {
    scan_slice(args, slice, first, last, scratch, 0);
}

static void scan_backward_slice(const void *args, int64_t slice, int64_t first, int64_t last, Lanes *scratch) {
    scan_slice(args, slice, first, last, scratch, 1);
}

/* Every job on up to args->threads threads. Returns 0; -1 if N is over MAX_STATE; -2 if memory ran out. */
static int run(const ScanArgs *args, int backward) {
    if (args->n_state > MAX_STATE) return -1;
    const int64_t jobs = args->batch * args->groups * blocks_per_group(args);
    if (backward) { /* the per-slice sums of dB and dC start at zero, also those of slices not needed */
        const size_t size = sizeof(float) * args->slices * args->directions * args->batch * args->groups * args->n_state * args->length;
        memset(args->dB, 0, size);
        memset(args->dC, 0, size);
    }
    return parallel_slices(backward ? scan_backward_slice : scan_forward_slice, args, jobs, args->slices, args->threads,
                           scan_scratch(args));
}

int vim_scan_forward(const ScanArgs *args) { return run(args, 0); }

int vim_scan_backward(const ScanArgs *args) { return run(args, 1); }

/* ================================================================================================
 * Fused depthwise causal conv + SiLU of both scan directions, forward and backward, for CPU tensors.
 * The contract is in vim/kernels/conv_silu_native.py, the definition in conv_silu_reference.py:
 *
 *     y0[t] = silu(b0 + sum_i w0[i] x[t - (W-1) + i])     direction 0, causal
 *     y1[t] = silu(b1 + sum_i w1[i] x[t + (W-1) - i])     direction 1: the backward scan's causal conv
 *                                                          seen from the original order (anti-causal)
 * with x zero outside the sequence.
 *
 * A job is a block of LANES adjacent channels of one batch element over one segment of the sequence.
 * For each direction it holds the taps in registers (one Lanes value per tap) and walks its rows in
 * order: the rows of x it reads lie within W - 1 of each other, so they come from L1 (and the second
 * direction finds the job's rows of x in cache), and every operation is a vertical SIMD operation across
 * channels (the SiLU uses the polynomial exp2 above, so it vectorises too). Both directions are written
 * straight into their slots of the (K, batch, L, C) output: nothing is stacked or copied afterwards.
 *
 * The backward pass recomputes the pre-activations from x (W multiply-adds are cheaper than a round
 * trip through memory), forms dpre = dy silu'(pre) over the segment and W - 1 rows either side in a
 * per-thread buffer, and gathers dx[t] = sum_i w0[i] dpre0[t + (W-1) - i] + w1[i] dpre1[t - (W-1) + i]
 * from it. The gradients of the taps and biases are summed over the job's rows in registers and
 * written per (batch element, segment), for the caller to sum: deterministic, no atomics.
 */
#define CONV_MAX_WIDTH 8

/* Float32, strides in elements. Keep in step with ConvArgs in conv_silu_native.py. */
typedef struct {
    int64_t batch, length, channels, width, directions, segments, threads;
    const float *x;                   /* (batch, L, C), strided */
    const float *weight[2], *bias[2]; /* per direction: taps (C, W) dense; bias (C) dense or NULL */
    float *out;                       /* forward: (K, batch, L, C) dense */
    const float *dout;                /* backward: (K, batch, L, C), strided */
    float *dx;                        /* backward: (batch, L, C) dense */
    float *dparams;                   /* backward: (batch * segments, K, W + 1, C) dense: the W taps, then the bias */
    int64_t x_stride[3], dout_stride[4];
} ConvArgs;

/* One job: channels [c0, c0 + LANES) (fewer at the end) of batch element b, rows [first, last). */
typedef struct {
    const float *x;                  /* at (b, 0, c0) */
    int64_t x_step, x_lane;          /* strides between rows and between channels */
    int64_t b, c0, first, last, row; /* row: (batch element, segment), the job's row of dparams */
} ConvJob;

INLINE float silu(float p) { return p * sigmoid(p); }

INLINE float silu_grad(float p) {
    const float s = sigmoid(p);
    return s * (1.0f + p * (1.0f - s));
}

/* silu (grad = 0) or its derivative (grad = 1) of every lane. */
INLINE Lanes silu_lanes(const Lanes p, const int grad) {
    float in[LANES], out[LANES];
    memcpy(in, &p, sizeof in);
    for (int j = 0; j < LANES; j++) out[j] = grad ? silu_grad(in[j]) : silu(in[j]);
    Lanes v;
    memcpy(&v, out, sizeof v);
    return v;
}

/* Direction k's taps w[i] and bias (idle lanes of a partial block copy channel c0). */
INLINE void load_taps(const ConvArgs *a, const ConvJob *v, int64_t k, const int W, const int width, Lanes *w, Lanes *bias) {
    float taps[CONV_MAX_WIDTH][LANES], shift[LANES];
    for (int j = 0; j < LANES; j++) {
        const int64_t c = v->c0 + (j < width ? j : 0);
        for (int i = 0; i < W; i++) taps[i][j] = a->weight[k][c * W + i];
        shift[j] = a->bias[k] ? a->bias[k][c] : 0.0f;
    }
    memcpy(w, taps, sizeof(Lanes) * W);
    memcpy(bias, shift, sizeof *bias);
}

/* Source row of tap i for output row t: t - (W-1) + i (causal), t + (W-1) - i (anti-causal). */
INLINE int64_t tap_row(int64_t t, int i, const int W, const int anti) { return anti ? t + (W - 1) - i : t - (W - 1) + i; }

/* The pre-activation of one direction at row t. */
INLINE Lanes conv_row(const ConvJob *v, int64_t length, int64_t t, const int anti, const int W, const int width,
                      const int64_t x_lane, const Lanes *w, const Lanes bias) {
    Lanes pre = bias;
    for (int i = 0; i < W; i++) {
        const int64_t s = tap_row(t, i, W, anti);
        if (s >= 0 && s < length) pre += w[i] * load_lanes(v->x + s * v->x_step, x_lane, width);
    }
    return pre;
}

INLINE void conv_forward_job(const ConvArgs *a, const ConvJob *v, const int W, const int width, const int unit) {
    const int64_t x_lane = unit ? 1 : v->x_lane;
    for (int64_t k = 0; k < a->directions; k++) {
        Lanes w[CONV_MAX_WIDTH], bias;
        load_taps(a, v, k, W, width, w, &bias);
        float *out = a->out + (k * a->batch + v->b) * a->length * a->channels + v->c0;
        for (int64_t t = v->first; t < v->last; t++)
            store_lanes(out + t * a->channels, silu_lanes(conv_row(v, a->length, t, k == 1, W, width, x_lane, w, bias), 0), width);
    }
}

/* Direction k of a job's backward pass: dpre = dy silu'(pre) over rows [lo, hi) into `dpre`, and the gradients of
 * its taps and bias over the job's own rows (the halo belongs to the neighbouring segments) into its row of dparams. */
INLINE void conv_backward_direction(const ConvArgs *a, const ConvJob *v, const int64_t k, const int W, const int width,
                                    const int64_t x_lane, const int64_t dout_lane, int64_t lo, int64_t hi, const Lanes *w,
                                    const Lanes bias, Lanes *restrict dpre) {
    const int64_t length = a->length, *ds = a->dout_stride;
    const float *dy = a->dout + k * ds[0] + v->b * ds[1] + v->c0 * ds[3];
    Lanes dw[CONV_MAX_WIDTH] = {0}, dbias = {0};
    for (int64_t t = lo; t < hi; t++) {
        const Lanes pre = conv_row(v, length, t, k == 1, W, width, x_lane, w, bias);
        const Lanes grad = load_lanes(dy + t * ds[2], dout_lane, width) * silu_lanes(pre, 1);
        dpre[t - lo] = grad;
        if (t < v->first || t >= v->last) continue;
        dbias += grad;
        for (int i = 0; i < W; i++) {
            const int64_t s = tap_row(t, i, W, k == 1);
            if (s >= 0 && s < length) dw[i] += grad * load_lanes(v->x + s * v->x_step, x_lane, width);
        }
    }
    float *dparams = a->dparams + (v->row * a->directions + k) * (W + 1) * a->channels + v->c0;
    for (int i = 0; i < W; i++) store_lanes(dparams + i * a->channels, dw[i], width);
    store_lanes(dparams + W * a->channels, dbias, width);
}

/* `scratch` holds 2 (rows of the longest segment + 2 (W - 1)) Lanes. */
INLINE void conv_backward_job(const ConvArgs *a, const ConvJob *v, const int W, const int width, const int unit,
                              Lanes *restrict scratch) {
    const int64_t length = a->length, x_lane = unit ? 1 : v->x_lane, dout_lane = unit ? 1 : a->dout_stride[3];
    const int64_t lo = v->first - (W - 1) > 0 ? v->first - (W - 1) : 0;
    const int64_t hi = v->last + (W - 1) < length ? v->last + (W - 1) : length;
    Lanes w[2][CONV_MAX_WIDTH], bias[2];
    for (int64_t k = 0; k < a->directions; k++) {
        load_taps(a, v, k, W, width, w[k], &bias[k]);
        conv_backward_direction(a, v, k, W, width, x_lane, dout_lane, lo, hi, w[k], bias[k], scratch + k * (hi - lo));
    }
    for (int64_t t = v->first; t < v->last; t++) { /* through tap i, x[t] fed pre0[t + (W-1) - i] and pre1[t - (W-1) + i] */
        Lanes grad = {0};
        for (int64_t k = 0; k < a->directions; k++)
            for (int i = 0; i < W; i++) {
                const int64_t s = tap_row(t, i, W, k == 0);
                if (s >= 0 && s < length) grad += w[k][i] * scratch[k * (hi - lo) + s - lo];
            }
        store_lanes(a->dx + (v->b * length + t) * a->channels + v->c0, grad, width);
    }
}

INLINE int64_t conv_blocks(const ConvArgs *a) { return (a->channels + LANES - 1) / LANES; }

/* Job `job` of (batch element, segment, block of channels), in that order. */
static void conv_job(const ConvArgs *a, int64_t job, int backward, Lanes *dpre) {
    const int64_t blocks = conv_blocks(a), row = job / blocks, c0 = job % blocks * LANES;
    const int64_t b = row / a->segments, segment = row % a->segments, *xs = a->x_stride;
    const ConvJob v = {
        .x = a->x + b * xs[0] + c0 * xs[2], .x_step = xs[1], .x_lane = xs[2], .b = b, .c0 = c0,
        .first = a->length * segment / a->segments, .last = a->length * (segment + 1) / a->segments, .row = row,
    };
    const int width = (int)(a->channels - c0 < LANES ? a->channels - c0 : LANES);
    const int unit = xs[2] == 1 && (!backward || a->dout_stride[3] == 1);
    if (unit && width == LANES && a->width == 4) { /* compiled with the width, the block and the strides known */
        if (backward) conv_backward_job(a, &v, 4, LANES, 1, dpre);
        else conv_forward_job(a, &v, 4, LANES, 1);
    } else {
        if (backward) conv_backward_job(a, &v, (int)a->width, width, 0, dpre);
        else conv_forward_job(a, &v, (int)a->width, width, 0);
    }
}

static void conv_forward_slice(const void *args, int64_t slice, int64_t first, int64_t last, Lanes *scratch) {
    (void)slice, (void)scratch;
    for (int64_t job = first; job < last; job++) conv_job(args, job, 0, NULL);
}

/* `scratch`: dpre, conv_dpre_rows Lanes per direction. */
static void conv_backward_slice(const void *args, int64_t slice, int64_t first, int64_t last, Lanes *scratch) {
    (void)slice;
    for (int64_t job = first; job < last; job++) conv_job(args, job, 1, scratch);
}

INLINE int64_t conv_dpre_rows(const ConvArgs *a) { return (a->length + a->segments - 1) / a->segments + 2 * (CONV_MAX_WIDTH - 1); }

/* Returns 0; -1 if the width is outside 1..CONV_MAX_WIDTH; -2 if memory ran out. */
static int run_conv(const ConvArgs *args, int backward) {
    if (args->width < 1 || args->width > CONV_MAX_WIDTH) return -1;
    const int64_t jobs = args->batch * args->segments * conv_blocks(args); /* a slice each: nothing is summed per slice */
    if (backward) return parallel_slices(conv_backward_slice, args, jobs, jobs, args->threads, 2 * conv_dpre_rows(args));
    return parallel_slices(conv_forward_slice, args, jobs, jobs, args->threads, 0);
}

int vim_conv_silu_forward(const ConvArgs *args) { return run_conv(args, 0); }

int vim_conv_silu_backward(const ConvArgs *args) { return run_conv(args, 1); }
