/* Fused selective-scan forward for CPU tensors: one pass over the sequence, state in registers.
 *
 * Built on first use by vim/kernels/scan_native.py with the machine's C compiler (plain C, no
 * Python or PyTorch headers) and called through ctypes; see that module for the contract.
 *
 * Rows are the batch * dim channels. A block of LANES rows is scanned together: the state is held
 * as h[n][lane] so that every operation is a vertical SIMD operation across rows (no horizontal
 * sums), and the decays exp2(delta * A * log2 e) are formed in registers, never stored.
 *
 * Inputs are float32, time-major and dense: delta (before bias and softplus), u (L, R); z (L, R)
 * or NULL; B, C (L, S, N) with S the (batch, group) pairs; A2 (R, N) = A * log2(e) of each row;
 * D, bias (R,); group (R,) the pair of each row. Outputs: y (L, R) = (C . h + D u) * silu(z);
 * checkpoints (ceil(L / chunk), R, N), the state after the last step of each chunk of `chunk`
 * scan steps. A reversed scan visits t = L - 1 down to 0.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define MAX_STATE 64

/* log(1 + e^x), linear above 20 as in PyTorch's softplus (logf and expf have SIMD versions, log1pf not). */
static inline float softplus(float x) { return x > 20.0f ? x : logf(1.0f + expf(x)); }

static inline __attribute__((always_inline)) void scan_block(
    int64_t length, int64_t rows, int64_t pairs, int64_t n_state, int64_t chunk, int reverse, int delta_softplus,
    const float *restrict delta, const float *restrict u, const float *restrict z, const float *restrict B, const float *restrict C, const float *restrict A2,
    const float *restrict D, const float *restrict bias, const int64_t *restrict group, float *restrict y, float *restrict checkpoints, int64_t r0,
    const int width, const int shared)
{
    /* Sized by the caller's constant: 16 lets the specialised copy keep the state in registers. */
    float h[n_state <= 16 ? 16 : MAX_STATE][LANES];
    float a2[n_state <= 16 ? 16 : MAX_STATE][LANES];
    int64_t pair[LANES];
    for (int j = 0; j < width; j++) pair[j] = group[r0 + j] * n_state;
    for (int64_t n = 0; n < n_state; n++) {
        for (int j = 0; j < width; j++) {
            h[n][j] = 0.0f;
            a2[n][j] = A2[(r0 + j) * n_state + n];
        }
    }
    for (int64_t step = 0; step < length; step++) {
        const int64_t t = reverse ? length - 1 - step : step;
        const float *ut = u + t * rows + r0;
        const float *Bt = B + t * pairs * n_state;
        const float *Ct = C + t * pairs * n_state;
        float dt[LANES], drive[LANES], acc[LANES];
        for (int j = 0; j < width; j++) dt[j] = delta[t * rows + r0 + j] + bias[r0 + j];
        if (delta_softplus)
            for (int j = 0; j < width; j++) dt[j] = softplus(dt[j]);
        for (int j = 0; j < width; j++) {
            drive[j] = dt[j] * ut[j];
            acc[j] = D[r0 + j] * ut[j];
        }
        for (int64_t n = 0; n < n_state; n++) {
            if (shared) { /* every row of the block reads the same B and C */
                const float b = Bt[pair[0] + n], c = Ct[pair[0] + n];
                for (int j = 0; j < width; j++) {
                    h[n][j] = exp2f(dt[j] * a2[n][j]) * h[n][j] + drive[j] * b;
                    acc[j] += h[n][j] * c;
                }
            } else {
                for (int j = 0; j < width; j++) {
                    h[n][j] = exp2f(dt[j] * a2[n][j]) * h[n][j] + drive[j] * Bt[pair[j] + n];
                    acc[j] += h[n][j] * Ct[pair[j] + n];
                }
            }
        }
        float *yt = y + t * rows + r0;
        if (z) {
            const float *zt = z + t * rows + r0;
            for (int j = 0; j < width; j++) yt[j] = acc[j] * zt[j] / (1.0f + expf(-zt[j]));
        } else {
            for (int j = 0; j < width; j++) yt[j] = acc[j];
        }
        if ((step + 1) % chunk == 0 || step == length - 1) {
            float *saved = checkpoints + (step / chunk) * rows * n_state;
            for (int j = 0; j < width; j++)
                for (int64_t n = 0; n < n_state; n++) saved[(r0 + j) * n_state + n] = h[n][j];
        }
    }
}

/* Scan rows [row_begin, row_end) of one direction; returns 0, or -1 if n_state is too large. */
int vim_scan_forward(
    int64_t length, int64_t rows, int64_t pairs, int64_t n_state, int64_t chunk, int reverse, int delta_softplus,
    const float *restrict delta, const float *restrict u, const float *restrict z, const float *restrict B, const float *restrict C, const float *restrict A2,
    const float *restrict D, const float *restrict bias, const int64_t *restrict group, float *restrict y, float *restrict checkpoints,
    int64_t row_begin, int64_t row_end)
{
    if (n_state > MAX_STATE) return -1;
    int64_t r0 = row_begin;
    for (; r0 + LANES <= row_end; r0 += LANES) {
        /* The common case, specialised so the compiler unrolls it: N = 16, one (batch, group) per block. */
        if (n_state == 16 && group[r0] == group[r0 + LANES - 1])
            scan_block(length, rows, pairs, 16, chunk, reverse, delta_softplus, delta, u, z, B, C, A2, D, bias, group, y,
                       checkpoints, r0, LANES, 1);
        else
            scan_block(length, rows, pairs, n_state, chunk, reverse, delta_softplus, delta, u, z, B, C, A2, D, bias, group, y,
                       checkpoints, r0, LANES, 0);
    }
    if (r0 < row_end)
        scan_block(length, rows, pairs, n_state, chunk, reverse, delta_softplus, delta, u, z, B, C, A2, D, bias, group, y,
                       checkpoints, r0,
                   (int)(row_end - r0), 0);
    return 0;
}
