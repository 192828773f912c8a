// conv2d.cu: 2-D convolution (PyTorch's cross-correlation, NCHW), forward and backward.
//
//   x (N, C, H, W), w (K, C, R, S), b (K), y (N, K, P, Q),
//   P = (H + 2 pad - R) / stride + 1,  Q = (W + 2 pad - S) / stride + 1
//
//   y[n,k,p,q]  = b[k] + sum_{c,r,s} w[k,c,r,s] x[n, c, p*stride - pad + r, q*stride - pad + s]
//   dw[k,c,r,s] = sum_{n,p,q} dy[n,k,p,q] x[n, c, p*stride - pad + r, q*stride - pad + s]
//   db[k]       = sum_{n,p,q} dy[n,k,p,q]
//   dx[n,c,h,w] = sum_{k,r,s} dy[n,k,p,q] w[k,c,r,s]  over the (r, s) for which
//                 p = (h + pad - r) / stride and q = (w + pad - s) / stride are whole and in range
// (x outside the image reads as 0: that is the zero padding.)
//
// In Stable Diffusion nearly every layer of the UNet and the VAE is a 3x3 convolution
// with padding 1 (SD 1.5's UNet: 320 to 1280 channels on 64x64 down to 8x8 latents);
// stride 2 halves the resolution in the down blocks.
//
// version 1: direct. One thread per output element; each of y, dx, dw and db is its own
//            kernel that loops over the sum in the formula above. Easy to check, slow:
//            every thread reads its inputs straight from global memory.
// version 2: implicit GEMM. Each of the three products is a matrix product C = A B whose
//            operands are never built: A(m, k) and B(k, n) compute their addresses into
//            x, w or dy on the fly. One block of 256 threads computes a 64x64 tile of C,
//            staging 64x16 slices of A and B in shared memory so that each value loaded
//            from global memory is used 64 times; each thread keeps a 4x4 block of the
//            tile in registers, so each value read from shared memory is used 4 times.
//            The three products:
//              forward: C = y,  m = (n,p,q),  n = k,        summed over (c,r,s)
//              dx:      C = dx, m = (n,h,w),  n = c,        summed over (k,r,s)
//              dw:      C = dw, m = k,        n = (c,r,s),  summed over (n,p,q)
//            db is a block reduction per output channel. No atomics anywhere: every
//            output element is written by exactly one thread, so results are deterministic.
//
// Reference: conv2d_forward, conv2d_backward in minisd/backends/naive.py (NumPy, the formulas).
// Launchers (grid, block, shared memory): minisd/backends/cuda_launch.py. Check and time them with:
//   python -m pytest tests/test_kernels.py -k conv2d      (the CPU emulator, every version and order)
//   python -m pytest tests/test_kernels_gpu.py -k conv2d  (a GPU, through CuPy)
//   minisd bench kernels                              (each version against the vendor library)

#include "common.cuh"

// ---------------------------------------------------------------------------------------
// version 1: direct
// ---------------------------------------------------------------------------------------

// One thread per y[n,k,p,q].
extern "C" __global__ void conv2d_forward_kernel1(const float *x, const float *w, const float *b,
                                                  float *y, int N, int C, int H, int W, int K,
                                                  int R, int S, int P, int Q, int stride, int pad) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * K * P * Q) return;
    const int q = i % Q, p = (i / Q) % P, k = (i / (P * Q)) % K, n = i / (K * P * Q);
    float acc = b ? b[k] : 0.0f;
    for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) {
            const int h = p * stride - pad + r;
            if (h < 0 || h >= H) continue;
            for (int s = 0; s < S; ++s) {
                const int v = q * stride - pad + s;
                if (v < 0 || v >= W) continue;
                acc += w[((k * C + c) * R + r) * S + s] * x[((n * C + c) * H + h) * W + v];
            }
        }
    y[i] = acc;
}

// One thread per dx[n,c,h,w]: gather from every output that this input pixel fed.
extern "C" __global__ void conv2d_backward_input_kernel1(const float *dy, const float *w, float *dx,
                                                         int N, int C, int H, int W, int K, int R,
                                                         int S, int P, int Q, int stride, int pad) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C * H * W) return;
    const int v = i % W, h = (i / W) % H, c = (i / (H * W)) % C, n = i / (C * H * W);
    float acc = 0.0f;
    for (int k = 0; k < K; ++k)
        for (int r = 0; r < R; ++r) {
            const int hp = h + pad - r;  // = p * stride, if some output p used row h with tap r
            if (hp < 0 || hp % stride != 0 || hp / stride >= P) continue;
            for (int s = 0; s < S; ++s) {
                const int vq = v + pad - s;
                if (vq < 0 || vq % stride != 0 || vq / stride >= Q) continue;
                acc += dy[((n * K + k) * P + hp / stride) * Q + vq / stride] *
                       w[((k * C + c) * R + r) * S + s];
            }
        }
    dx[i] = acc;
}

// One thread per dw[k,c,r,s]: a sum over every batch item and output position.
extern "C" __global__ void conv2d_backward_weight_kernel1(const float *dy, const float *x, float *dw,
                                                          int N, int C, int H, int W, int K, int R,
                                                          int S, int P, int Q, int stride, int pad) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= K * C * R * S) return;
    const int s = i % S, r = (i / S) % R, c = (i / (R * S)) % C, k = i / (C * R * S);
    float acc = 0.0f;
    for (int n = 0; n < N; ++n)
        for (int p = 0; p < P; ++p) {
            const int h = p * stride - pad + r;
            if (h < 0 || h >= H) continue;
            for (int q = 0; q < Q; ++q) {
                const int v = q * stride - pad + s;
                if (v < 0 || v >= W) continue;
                acc += dy[((n * K + k) * P + p) * Q + q] * x[((n * C + c) * H + h) * W + v];
            }
        }
    dw[i] = acc;
}

// One thread per db[k].
extern "C" __global__ void conv2d_backward_bias_kernel1(const float *dy, float *db, int N, int K,
                                                        int P, int Q) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    float acc = 0.0f;
    for (int n = 0; n < N; ++n)
        for (int j = 0; j < P * Q; ++j) acc += dy[(n * K + k) * P * Q + j];
    db[k] = acc;
}

// ---------------------------------------------------------------------------------------
// version 2: implicit GEMM with shared-memory tiles
// ---------------------------------------------------------------------------------------

#define TILE 64     // a block computes a TILE x TILE tile of C (minisd/backends/cuda_launch.py's CONV_TILE) ...
#define TILE_K 16   // ... walking the sum TILE_K terms at a time
#define THREADS 256 // 16 x 16 threads ...
#define SUB 4       // ... each computing SUB x SUB elements of the tile (16 * SUB = TILE)

struct ConvShape {
    int N, C, H, W, K, R, S, P, Q, stride, pad;
};

// The operands of the forward product: A(m, j) = x at output pixel m = (n,p,q) and tap
// j = (c,r,s); B(j, k) = w[k, c, r, s]; C(m, k) = y[n, k, p, q] (plus the bias).
struct ForwardOperands {
    const float *x, *w, *b;
    float *y;
    ConvShape d;
    __device__ int rows() const { return d.N * d.P * d.Q; }
    __device__ int cols() const { return d.K; }
    __device__ int depth() const { return d.C * d.R * d.S; }
    __device__ float load_a(int m, int j) const {
        const int q = m % d.Q, p = (m / d.Q) % d.P, n = m / (d.P * d.Q);
        const int s = j % d.S, r = (j / d.S) % d.R, c = j / (d.R * d.S);
        const int h = p * d.stride - d.pad + r, v = q * d.stride - d.pad + s;
        if (h < 0 || h >= d.H || v < 0 || v >= d.W) return 0.0f;
        return x[((n * d.C + c) * d.H + h) * d.W + v];
    }
    __device__ float load_b(int j, int k) const { return w[k * depth() + j]; }
    __device__ void store(int m, int k, float value) const {
        const int q = m % d.Q, p = (m / d.Q) % d.P, n = m / (d.P * d.Q);
        y[((n * d.K + k) * d.P + p) * d.Q + q] = value + (b ? b[k] : 0.0f);
    }
};

// dx: A(m, j) = dy at input pixel m = (n,h,w) and j = (k,r,s), zero where no output used
// that tap; B(j, c) = w[k, c, r, s]; C(m, c) = dx[n, c, h, w].
struct InputGradOperands {
    const float *dy, *w;
    float *dx;
    ConvShape d;
    __device__ int rows() const { return d.N * d.H * d.W; }
    __device__ int cols() const { return d.C; }
    __device__ int depth() const { return d.K * d.R * d.S; }
    __device__ float load_a(int m, int j) const {
        const int v = m % d.W, h = (m / d.W) % d.H, n = m / (d.H * d.W);
        const int s = j % d.S, r = (j / d.S) % d.R, k = j / (d.R * d.S);
        const int hp = h + d.pad - r, vq = v + d.pad - s;
        if (hp < 0 || vq < 0 || hp % d.stride || vq % d.stride) return 0.0f;
        const int p = hp / d.stride, q = vq / d.stride;
        if (p >= d.P || q >= d.Q) return 0.0f;
        return dy[((n * d.K + k) * d.P + p) * d.Q + q];
    }
    __device__ float load_b(int j, int c) const {
        const int rs = j % (d.R * d.S), k = j / (d.R * d.S);
        return w[(k * d.C + c) * d.R * d.S + rs];
    }
    __device__ void store(int m, int c, float value) const {
        const int hw = m % (d.H * d.W), n = m / (d.H * d.W);
        dx[(n * d.C + c) * d.H * d.W + hw] = value;
    }
};

// dw: A(k, j) = dy[n, k, p, q] with j = (n,p,q); B(j, i) = x at output pixel (n,p,q) and
// tap i = (c,r,s); C(k, i) = dw[k, c, r, s].
struct WeightGradOperands {
    const float *dy, *x;
    float *dw;
    ConvShape d;
    __device__ int rows() const { return d.K; }
    __device__ int cols() const { return d.C * d.R * d.S; }
    __device__ int depth() const { return d.N * d.P * d.Q; }
    __device__ float load_a(int k, int j) const {
        const int pq = j % (d.P * d.Q), n = j / (d.P * d.Q);
        return dy[(n * d.K + k) * d.P * d.Q + pq];
    }
    __device__ float load_b(int j, int i) const {
        const ForwardOperands fwd{x, nullptr, nullptr, nullptr, d};
        return fwd.load_a(j, i);  // the same gather as the forward pass's A
    }
    __device__ void store(int k, int i, float value) const { dw[k * cols() + i] = value; }
};

// C = A B for the tile at block (blockIdx.y, blockIdx.x). Tails: rows, columns and terms
// past the end load as 0 and are not stored, so any size works. Thread (tx, ty) owns
// rows ty + 16 a and columns tx + 16 b of the tile (a, b < SUB): in a warp, the 16
// threads of a row read 16 neighbouring columns of Bs (no bank conflicts) and one
// element of As (a broadcast).
template <class Operands>
__device__ void gemm_tile(const Operands &op) {
    __shared__ float As[TILE_K][TILE];  // As[j][m]: a slice of A, transposed
    __shared__ float Bs[TILE_K][TILE];
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;
    const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    const int M = op.rows(), Ncols = op.cols(), depth = op.depth();
    float acc[SUB][SUB] = {};
    for (int j0 = 0; j0 < depth; j0 += TILE_K) {
        // Each thread loads TILE * TILE_K / THREADS = 4 elements of each slice;
        // neighbouring threads take neighbouring rows (m) or columns (n).
        for (int e = t; e < TILE * TILE_K; e += THREADS) {
            const int i = e % TILE, j = j0 + e / TILE;
            As[e / TILE][i] = (m0 + i < M && j < depth) ? op.load_a(m0 + i, j) : 0.0f;
            Bs[e / TILE][i] = (n0 + i < Ncols && j < depth) ? op.load_b(j, n0 + i) : 0.0f;
        }
        __syncthreads();
        for (int jj = 0; jj < TILE_K; ++jj) {
            float a[SUB], b[SUB];
            for (int s = 0; s < SUB; ++s) {
                a[s] = As[jj][ty + 16 * s];
                b[s] = Bs[jj][tx + 16 * s];
            }
            for (int r = 0; r < SUB; ++r)
                for (int s = 0; s < SUB; ++s) acc[r][s] += a[r] * b[s];
        }
        __syncthreads();  // everyone is done with this slice before the next overwrites it
    }
    for (int r = 0; r < SUB; ++r)
        for (int s = 0; s < SUB; ++s) {
            const int m = m0 + ty + 16 * r, n = n0 + tx + 16 * s;
            if (m < M && n < Ncols) op.store(m, n, acc[r][s]);
        }
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_forward_kernel2(const float *x, const float *w, const float *b, float *y, int N, int C,
                       int H, int W, int K, int R, int S, int P, int Q, int stride, int pad) {
    gemm_tile(ForwardOperands{x, w, b, y, {N, C, H, W, K, R, S, P, Q, stride, pad}});
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_input_kernel2(const float *dy, const float *w, float *dx, int N, int C, int H,
                              int W, int K, int R, int S, int P, int Q, int stride, int pad) {
    gemm_tile(InputGradOperands{dy, w, dx, {N, C, H, W, K, R, S, P, Q, stride, pad}});
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_weight_kernel2(const float *dy, const float *x, float *dw, int N, int C, int H,
                               int W, int K, int R, int S, int P, int Q, int stride, int pad) {
    gemm_tile(WeightGradOperands{dy, x, dw, {N, C, H, W, K, R, S, P, Q, stride, pad}});
}

// One block per output channel k: the block's threads stride over (n, p, q), then sum.
extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_bias_kernel2(const float *dy, float *db, int N, int K, int P, int Q) {
    __shared__ float scratch[32];
    const int k = blockIdx.x;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < N * P * Q; i += blockDim.x)
        acc += dy[((i / (P * Q)) * K + k) * P * Q + i % (P * Q)];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) db[k] = acc;
}
