// group_norm.cu: group normalisation (Wu & He, 2018), forward and backward.
//
// x (N, C, H, W) with the C channels split into G groups of C/G. For each (n, g), over
// its M = (C/G) H W elements (contiguous in memory, since channels of a group are):
//   mean = (1/M) sum x,   var = (1/M) sum (x - mean)^2  (biased),   rstd = 1/sqrt(var + eps)
//   xhat = (x - mean) rstd,   y[n,c] = gamma[c] xhat + beta[c]
// Backward, with g = dy gamma[c] and means taken over the group's M elements:
//   dx = rstd (g - mean(g) - xhat mean(g xhat))
//   dgamma[c] = sum_{n,h,w} dy xhat,   dbeta[c] = sum_{n,h,w} dy
// The variance is computed in a second pass over (x - mean)^2, not as E[x^2] - E[x]^2,
// which cancels catastrophically in float32 when the mean is large against the spread.
//
// In Stable Diffusion every ResNet block and every transformer block of the UNet and
// the VAE starts with a GroupNorm of 32 groups (SD 1.5: C from 128 to 1280 on up to
// 512x512 pixels in the VAE decoder, M up to 4 * 512 * 512).
//
// version 1: one thread per (n, g) for the statistics and dx, looping over all M
//            elements of its group; one thread per channel for dgamma and dbeta.
//            Only N * G threads: fine to read, far too little parallelism for a GPU.
// version 2: one block per (n, g) (and one block per channel for dgamma, dbeta); the
//            block's threads stride over the group's elements (neighbouring threads
//            read neighbouring addresses) and combine partial sums with block_sum.
// No atomics: every output is written by one thread, so results are deterministic.
// mean, rstd (N, G) are saved by the forward pass for the backward pass.
//
// Reference: group_norm_forward, group_norm_backward in minisd/backends/naive.py (NumPy, the formulas).
// Launchers (grid, block, shared memory): minisd/backends/cuda_launch.py. Check and time them with:
//   python -m pytest tests/test_kernels.py -k group_norm      (the CPU emulator, every version and order)
//   python -m pytest tests/test_kernels_gpu.py -k group_norm  (a GPU, through CuPy)
//   minisd bench kernels                              (each version against the vendor library)

#include "common.cuh"

// ---------------------------------------------------------------------------------------
// version 1: a thread per group
// ---------------------------------------------------------------------------------------

// One thread per (n, g).
extern "C" __global__ void group_norm_forward_kernel1(const float *x, const float *gamma,
                                                     const float *beta, float *y, float *mean,
                                                     float *rstd, int N, int C, int HW, int G,
                                                     float eps) {
    const int ng = blockIdx.x * blockDim.x + threadIdx.x;
    if (ng >= N * G) return;
    const int Cg = C / G, M = Cg * HW, c0 = (ng % G) * Cg;
    const float *xg = x + (long long)ng * M;  // (n, g)'s elements start at (n*C + g*Cg)*HW
    float sum = 0.0f;
    for (int i = 0; i < M; ++i) sum += xg[i];
    const float mu = sum / M;
    float ss = 0.0f;
    for (int i = 0; i < M; ++i) ss += (xg[i] - mu) * (xg[i] - mu);
    const float r = rsqrtf(ss / M + eps);
    for (int i = 0; i < M; ++i) {
        const int c = c0 + i / HW;
        const float xhat = (xg[i] - mu) * r;
        y[(long long)ng * M + i] = (gamma ? gamma[c] : 1.0f) * xhat + (beta ? beta[c] : 0.0f);
    }
    mean[ng] = mu;
    rstd[ng] = r;
}

// One thread per (n, g).
extern "C" __global__ void group_norm_backward_input_kernel1(const float *dy, const float *x,
                                                            const float *gamma, const float *mean,
                                                            const float *rstd, float *dx, int N,
                                                            int C, int HW, int G) {
    const int ng = blockIdx.x * blockDim.x + threadIdx.x;
    if (ng >= N * G) return;
    const int Cg = C / G, M = Cg * HW, c0 = (ng % G) * Cg;
    const long long base = (long long)ng * M;
    const float mu = mean[ng], r = rstd[ng];
    float sum_g = 0.0f, sum_gxhat = 0.0f;
    for (int i = 0; i < M; ++i) {
        const float g = dy[base + i] * (gamma ? gamma[c0 + i / HW] : 1.0f);
        sum_g += g;
        sum_gxhat += g * (x[base + i] - mu) * r;
    }
    const float mean_g = sum_g / M, mean_gxhat = sum_gxhat / M;
    for (int i = 0; i < M; ++i) {
        const float g = dy[base + i] * (gamma ? gamma[c0 + i / HW] : 1.0f);
        const float xhat = (x[base + i] - mu) * r;
        dx[base + i] = r * (g - mean_g - xhat * mean_gxhat);
    }
}

// One thread per channel c; dgamma or dbeta may be null (not needed).
extern "C" __global__ void group_norm_backward_params_kernel1(const float *dy, const float *x,
                                                             const float *mean, const float *rstd,
                                                             float *dgamma, float *dbeta, int N,
                                                             int C, int HW, int G) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int g = c / (C / G);
    float sum_dy = 0.0f, sum_dy_xhat = 0.0f;
    for (int n = 0; n < N; ++n) {
        const float mu = mean[n * G + g], r = rstd[n * G + g];
        const float *dyc = dy + ((long long)n * C + c) * HW, *xc = x + ((long long)n * C + c) * HW;
        for (int i = 0; i < HW; ++i) {
            sum_dy += dyc[i];
            sum_dy_xhat += dyc[i] * (xc[i] - mu) * r;
        }
    }
    if (dgamma) dgamma[c] = sum_dy_xhat;
    if (dbeta) dbeta[c] = sum_dy;
}

// ---------------------------------------------------------------------------------------
// version 2: a block per group, block reductions
// ---------------------------------------------------------------------------------------

// One block per (n, g).
extern "C" __global__ void group_norm_forward_kernel2(const float *x, const float *gamma,
                                                     const float *beta, float *y, float *mean,
                                                     float *rstd, int N, int C, int HW, int G,
                                                     float eps) {
    __shared__ float scratch[32];
    const int ng = blockIdx.x, Cg = C / G, M = Cg * HW, c0 = (ng % G) * Cg;
    const float *xg = x + (long long)ng * M;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < M; i += blockDim.x) sum += xg[i];
    const float mu = block_sum(sum, scratch) / M;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < M; i += blockDim.x) ss += (xg[i] - mu) * (xg[i] - mu);
    const float r = rsqrtf(block_sum(ss, scratch) / M + eps);
    for (int i = threadIdx.x; i < M; i += blockDim.x) {
        const int c = c0 + i / HW;
        y[(long long)ng * M + i] = (gamma ? gamma[c] : 1.0f) * (xg[i] - mu) * r + (beta ? beta[c] : 0.0f);
    }
    if (threadIdx.x == 0) {
        mean[ng] = mu;
        rstd[ng] = r;
    }
}

// One block per (n, g).
extern "C" __global__ void group_norm_backward_input_kernel2(const float *dy, const float *x,
                                                            const float *gamma, const float *mean,
                                                            const float *rstd, float *dx, int N,
                                                            int C, int HW, int G) {
    __shared__ float scratch[32];
    const int ng = blockIdx.x, Cg = C / G, M = Cg * HW, c0 = (ng % G) * Cg;
    const long long base = (long long)ng * M;
    const float mu = mean[ng], r = rstd[ng];
    float sum_g = 0.0f, sum_gxhat = 0.0f;
    for (int i = threadIdx.x; i < M; i += blockDim.x) {
        const float g = dy[base + i] * (gamma ? gamma[c0 + i / HW] : 1.0f);
        sum_g += g;
        sum_gxhat += g * (x[base + i] - mu) * r;
    }
    const float mean_g = block_sum(sum_g, scratch) / M;
    const float mean_gxhat = block_sum(sum_gxhat, scratch) / M;
    for (int i = threadIdx.x; i < M; i += blockDim.x) {
        const float g = dy[base + i] * (gamma ? gamma[c0 + i / HW] : 1.0f);
        dx[base + i] = r * (g - mean_g - (x[base + i] - mu) * r * mean_gxhat);
    }
}

// One block per channel c; the threads stride over (n, h, w).
extern "C" __global__ void group_norm_backward_params_kernel2(const float *dy, const float *x,
                                                             const float *mean, const float *rstd,
                                                             float *dgamma, float *dbeta, int N,
                                                             int C, int HW, int G) {
    __shared__ float scratch[32];
    const int c = blockIdx.x, g = c / (C / G);
    float sum_dy = 0.0f, sum_dy_xhat = 0.0f;
    for (int i = threadIdx.x; i < N * HW; i += blockDim.x) {
        const int n = i / HW;
        const long long at = ((long long)n * C + c) * HW + i % HW;
        sum_dy += dy[at];
        sum_dy_xhat += dy[at] * (x[at] - mean[n * G + g]) * rstd[n * G + g];
    }
    sum_dy = block_sum(sum_dy, scratch);
    sum_dy_xhat = block_sum(sum_dy_xhat, scratch);
    if (threadIdx.x == 0) {
        if (dgamma) dgamma[c] = sum_dy_xhat;
        if (dbeta) dbeta[c] = sum_dy;
    }
}
