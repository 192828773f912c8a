// attention.cu: scaled dot-product attention, forward and backward.
//
// Per batch item and head (b, h), with queries Q (Lq, d), keys K (Lk, d), values
// V (Lk, d_v) (d_v = d in Stable Diffusion) and s = scale (usually 1/sqrt(d)):
//   S = s Q K^T  (Lq, Lk),   P = softmax(S) along each row,   O = P V  (Lq, d_v)
//   L_i = log sum_j exp(S_ij)  (the log-sum-exp of row i; saved for the backward pass)
// With is_causal, key j is masked for query i when j > i (S_ij = -inf, so P_ij = 0),
// PyTorch's top-left alignment. Backward, given dO:
//   dV = P^T dO,   dP = dO V^T,   D_i = sum_j P_ij dP_ij = sum_c dO_ic O_ic,
//   dS = P * (dP - D)  (elementwise, D broadcast along rows),   dQ = s dS K,   dK = s dS^T Q
// and P is recomputed from the saved L as P_ij = exp(S_ij - L_i).
//
// In Stable Diffusion attention runs inside every transformer block of the UNet: self-
// attention over the latent pixels (SD 1.5: Lq = Lk = 4096 at 64x64, 8 heads of d = 40)
// and cross-attention from the pixels to the 77 text tokens (Lq = 4096, Lk = 77); the
// head dims are 40, 80 and 160, not powers of two.
//
// version 1: textbook. S and P are materialised in global memory (B, H, Lq, Lk):
//            a batched matmul kernel (one thread per output element) computes S, O and
//            all the gradients; the softmax is one warp per row (warp_max, warp_sum);
//            the backward recomputes P from L, then dS row by row, one warp per row.
// version 2: flash attention (Dao et al., 2022). Nothing of size Lq x Lk is stored. A
//            block holds a tile of queries (one thread per query row) and walks the keys
//            tile by tile through shared memory, keeping for its row the running max m,
//            the running sum l of exp(S - m) and the unnormalised output, rescaled by
//            exp(m_old - m_new) whenever the max grows; at the end O = acc / l and
//            L = m + log l. The backward recomputes P tile by tile from L: one kernel
//            holds a tile of keys (one thread per key row) and sums dK, dV over all
//            queries, another holds a tile of queries and sums dQ over all keys, so
//            every output has one writer and no atomics are needed. Under a causal mask
//            tiles that are wholly masked are skipped.
//            Tile sizes are chosen at launch (blockDim.x and an argument) so that the
//            shared memory fits in 48 KiB for the head dim at hand.
//
// Reference: attention_forward, attention_backward in minisd/backends/naive.py (NumPy, the formulas).
// Launchers (grid, block, shared memory): minisd/backends/cuda_launch.py. Check and time them with:
//   python -m pytest tests/test_kernels.py -k attention      (the CPU emulator, every version and order)
//   python -m pytest tests/test_kernels_gpu.py -k attention  (a GPU, through CuPy)
//   minisd bench kernels                              (each version against the vendor library)

#include "common.cuh"

// ---------------------------------------------------------------------------------------
// version 1: materialised scores
// ---------------------------------------------------------------------------------------

// C = alpha op(A) op(B) for each of `batch` matrices (blockIdx.y), one thread per element
// of C (M x Ncols, row-major). op(A) is M x Kd, stored as A (M, Kd) or, if trans_a, as
// (Kd, M); likewise op(B) is Kd x Ncols, stored (Kd, Ncols) or, if trans_b, (Ncols, Kd).
extern "C" __global__ void attention_matmul_kernel1(const float *A, const float *B, float *C,
                                                    int M, int Ncols, int Kd, int trans_a,
                                                    int trans_b, float alpha) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * Ncols) return;
    const int m = i / Ncols, n = i % Ncols;
    const long long bA = (long long)blockIdx.y * M * Kd, bB = (long long)blockIdx.y * Kd * Ncols;
    float acc = 0.0f;
    for (int k = 0; k < Kd; ++k) {
        const float a = trans_a ? A[bA + (long long)k * M + m] : A[bA + (long long)m * Kd + k];
        const float b = trans_b ? B[bB + (long long)n * Kd + k] : B[bB + (long long)k * Ncols + n];
        acc += a * b;
    }
    C[(long long)blockIdx.y * M * Ncols + i] = alpha * acc;
}

// Rows of S (rows = B*H*Lq of length Lk) to rows of P, in place, and L; one warp per row.
extern "C" __global__ void attention_softmax_kernel1(float *S, float *lse, int rows, int Lq, int Lk,
                                                     int is_causal) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp leaves together
    float *s = S + (long long)row * Lk;
    const int i = row % Lq;  // the query this row belongs to
    const int last = is_causal ? min(i, Lk - 1) : Lk - 1;  // keys after `last` are masked
    float m = NEG_INF;
    for (int j = lane; j <= last; j += 32) m = fmaxf(m, s[j]);
    m = warp_max(m);
    float l = 0.0f;
    for (int j = lane; j <= last; j += 32) l += __expf(s[j] - m);
    l = warp_sum(l);
    for (int j = lane; j < Lk; j += 32) s[j] = j <= last ? __expf(s[j] - m) / l : 0.0f;
    if (lane == 0) lse[row] = m + __logf(l);
}

// Backward, step 1: S to P again, P_ij = exp(S_ij - L_i) (0 where masked); one thread per element.
extern "C" __global__ void attention_probs_kernel1(float *S, const float *lse, int rows, int Lq,
                                                   int Lk, int is_causal) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)rows * Lk) return;
    const int row = e / Lk, j = e % Lk, i = row % Lq;
    S[e] = (is_causal && j > i) ? 0.0f : __expf(S[e] - lse[row]);
}

// Backward, step 2: dP to dS in place, dS_ij = P_ij (dP_ij - D_i) with D_i = sum_c dO_ic O_ic
// (rows of dO and O have length d_v); one warp per row.
extern "C" __global__ void attention_softmax_backward_kernel1(const float *P, float *dP,
                                                              const float *dO, const float *O,
                                                              int rows, int Lk, int d_v) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    float D = 0.0f;
    for (int c = lane; c < d_v; c += 32)
        D += dO[(long long)row * d_v + c] * O[(long long)row * d_v + c];
    D = warp_sum(D);
    for (int j = lane; j < Lk; j += 32) {
        const long long e = (long long)row * Lk + j;
        dP[e] = P[e] * (dP[e] - D);
    }
}

// ---------------------------------------------------------------------------------------
// version 2: flash attention
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float dot(const float *a, const float *b, int d) {
    float acc = 0.0f;
    for (int c = 0; c < d; ++c) acc += a[c] * b[c];
    return acc;
}

// Copy rows [r0, r0 + n) of a (L, d) matrix into shared memory with row stride `stride`,
// zeros past row L; all threads of the block share the work, neighbours take neighbours.
__device__ __forceinline__ void load_rows(float *dst, int stride, const float *src, int r0, int n,
                                          int L, int d) {
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
        const int r = e / d, c = e % d;
        dst[r * stride + c] = r0 + r < L ? src[(long long)(r0 + r) * d + c] : 0.0f;
    }
}

// Forward. Grid (ceil(Lq / Bq), B*H); block Bq threads, one per query row; key tiles of Bk.
// Shared: q rows (Bq x (d+1); the +1 spreads a column over the banks), output rows
// (Bq x (d_v+1)), a K and a V tile (Bk x d, Bk x d_v; all threads read the same
// element at once: a broadcast), and each thread's Bk scores (Bq x (Bk+1)).
extern "C" __global__ void attention_forward_kernel2(const float *q, const float *k,
                                                     const float *v, float *o, float *lse, int Lq,
                                                     int Lk, int d, int d_v, float scale,
                                                     int is_causal, int Bk) {
    extern __shared__ float smem[];
    const int Bq = blockDim.x, t = threadIdx.x, q0 = blockIdx.x * Bq, i = q0 + t;
    const long long bh = blockIdx.y;
    q += bh * Lq * d, k += bh * Lk * d, v += bh * Lk * d_v, o += bh * Lq * d_v, lse += bh * Lq;
    float *qs = smem, *acc = qs + Bq * (d + 1), *ks = acc + Bq * (d_v + 1), *vs = ks + Bk * d,
          *ps = vs + Bk * d_v;
    float *my_q = qs + t * (d + 1), *my_acc = acc + t * (d_v + 1), *my_p = ps + t * (Bk + 1);

    load_rows(qs, d + 1, q, q0, Bq, Lq, d);
    for (int c = 0; c < d_v; ++c) my_acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    // Under the causal mask no query of this tile sees a key past its last row.
    const int k_end = is_causal ? min(Lk, q0 + Bq) : Lk;
    for (int k0 = 0; k0 < k_end; k0 += Bk) {
        __syncthreads();  // the previous tile is no longer in use
        load_rows(ks, d, k, k0, Bk, Lk, d);
        load_rows(vs, d_v, v, k0, Bk, Lk, d_v);
        __syncthreads();
        if (i >= Lq) continue;
        float tile_max = NEG_INF;
        for (int jj = 0; jj < Bk; ++jj) {
            const int j = k0 + jj;
            const bool masked = j >= Lk || (is_causal && j > i);
            my_p[jj] = masked ? NEG_INF : scale * dot(my_q, ks + jj * d, d);
            tile_max = fmaxf(tile_max, my_p[jj]);
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new == NEG_INF) continue;  // every key so far is masked for this row
        const float correction = __expf(m - m_new);  // exp(-inf) = 0 on the first tile
        l *= correction;
        for (int jj = 0; jj < Bk; ++jj) {
            my_p[jj] = __expf(my_p[jj] - m_new);
            l += my_p[jj];
        }
        for (int c = 0; c < d_v; ++c) {
            float a = my_acc[c] * correction;
            for (int jj = 0; jj < Bk; ++jj) a += my_p[jj] * vs[jj * d_v + c];
            my_acc[c] = a;
        }
        m = m_new;
    }
    if (i >= Lq) return;
    for (int c = 0; c < d_v; ++c) o[(long long)i * d_v + c] = my_acc[c] / l;
    lse[i] = m + __logf(l);
}

// Backward, step 1: D_i = sum_c dO_ic O_ic; one warp per row (rows = B*H*Lq of length d_v).
extern "C" __global__ void attention_backward_dot_kernel2(const float *dO, const float *O, float *D,
                                                          int rows, int d_v) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    float acc = 0.0f;
    for (int c = lane; c < d_v; c += 32)
        acc += dO[(long long)row * d_v + c] * O[(long long)row * d_v + c];
    acc = warp_sum(acc);
    if (lane == 0) D[row] = acc;
}

// Backward, step 2: dK and dV. Grid (ceil(Lk / Bk), B*H); block Bk threads, one per key
// row j, walking the queries in tiles of Bq. For each query i that sees key j:
//   P_ij = exp(s q_i.k_j - L_i),  dV_j += P_ij dO_i,  dS_ij = P_ij (dO_i.v_j - D_i),
//   dK_j += s dS_ij q_i.
// Shared: the thread's k and dk rows (Bk x (d+1) each), v and dv rows (Bk x (d_v+1)
// each), a Q and a dO tile (Bq x d, Bq x d_v), and the tile's L and D (Bq each).
extern "C" __global__ void attention_backward_kv_kernel2(const float *q, const float *k,
                                                         const float *v, const float *dO,
                                                         const float *lse, const float *D,
                                                         float *dk, float *dv, int Lq, int Lk,
                                                         int d, int d_v, float scale,
                                                         int is_causal, int Bq) {
    extern __shared__ float smem[];
    const int Bk = blockDim.x, t = threadIdx.x, k0 = blockIdx.x * Bk, j = k0 + t;
    const long long bh = blockIdx.y;
    q += bh * Lq * d, dO += bh * Lq * d_v, lse += bh * Lq, D += bh * Lq;
    k += bh * Lk * d, dk += bh * Lk * d, v += bh * Lk * d_v, dv += bh * Lk * d_v;
    float *ks = smem, *dks = ks + Bk * (d + 1), *vs = dks + Bk * (d + 1), *dvs = vs + Bk * (d_v + 1),
          *qs = dvs + Bk * (d_v + 1), *dos = qs + Bq * d, *Ls = dos + Bq * d_v, *Ds = Ls + Bq;
    float *my_k = ks + t * (d + 1), *my_dk = dks + t * (d + 1);
    float *my_v = vs + t * (d_v + 1), *my_dv = dvs + t * (d_v + 1);

    load_rows(ks, d + 1, k, k0, Bk, Lk, d);
    load_rows(vs, d_v + 1, v, k0, Bk, Lk, d_v);
    for (int c = 0; c < d; ++c) my_dk[c] = 0.0f;
    for (int c = 0; c < d_v; ++c) my_dv[c] = 0.0f;
    // Under the causal mask queries before k0 see none of these keys.
    const int q_begin = is_causal ? (k0 / Bq) * Bq : 0;
    for (int i0 = q_begin; i0 < Lq; i0 += Bq) {
        __syncthreads();
        load_rows(qs, d, q, i0, Bq, Lq, d);
        load_rows(dos, d_v, dO, i0, Bq, Lq, d_v);
        for (int e = t; e < Bq; e += Bk) {
            Ls[e] = i0 + e < Lq ? lse[i0 + e] : 0.0f;
            Ds[e] = i0 + e < Lq ? D[i0 + e] : 0.0f;
        }
        __syncthreads();
        if (j >= Lk) continue;
        for (int ii = 0; ii < Bq && i0 + ii < Lq; ++ii) {
            if (is_causal && j > i0 + ii) continue;
            const float *qi = qs + ii * d, *doi = dos + ii * d_v;
            const float p = __expf(scale * dot(qi, my_k, d) - Ls[ii]);
            const float ds = p * (dot(doi, my_v, d_v) - Ds[ii]);
            for (int c = 0; c < d_v; ++c) my_dv[c] += p * doi[c];
            for (int c = 0; c < d; ++c) my_dk[c] += scale * ds * qi[c];
        }
    }
    if (j >= Lk) return;
    for (int c = 0; c < d; ++c) dk[(long long)j * d + c] = my_dk[c];
    for (int c = 0; c < d_v; ++c) dv[(long long)j * d_v + c] = my_dv[c];
}

// Backward, step 3: dQ. Grid (ceil(Lq / Bq), B*H); block Bq threads, one per query row i,
// walking the keys in tiles of Bk:  dQ_i += s dS_ij k_j  with dS_ij as in step 2.
// Shared: the thread's q and dq rows (Bq x (d+1) each) and dO row (Bq x (d_v+1)), a K
// and a V tile (Bk x d, Bk x d_v).
extern "C" __global__ void attention_backward_q_kernel2(const float *q, const float *k,
                                                        const float *v, const float *dO,
                                                        const float *lse, const float *D,
                                                        float *dq, int Lq, int Lk, int d, int d_v,
                                                        float scale, int is_causal, int Bk) {
    extern __shared__ float smem[];
    const int Bq = blockDim.x, t = threadIdx.x, q0 = blockIdx.x * Bq, i = q0 + t;
    const long long bh = blockIdx.y;
    q += bh * Lq * d, dq += bh * Lq * d, dO += bh * Lq * d_v, lse += bh * Lq, D += bh * Lq;
    k += bh * Lk * d, v += bh * Lk * d_v;
    float *qs = smem, *dqs = qs + Bq * (d + 1), *dos = dqs + Bq * (d + 1), *ks = dos + Bq * (d_v + 1),
          *vs = ks + Bk * d;
    float *my_q = qs + t * (d + 1), *my_dq = dqs + t * (d + 1), *my_do = dos + t * (d_v + 1);

    load_rows(qs, d + 1, q, q0, Bq, Lq, d);
    load_rows(dos, d_v + 1, dO, q0, Bq, Lq, d_v);
    for (int c = 0; c < d; ++c) my_dq[c] = 0.0f;
    const float L_i = i < Lq ? lse[i] : 0.0f, D_i = i < Lq ? D[i] : 0.0f;
    const int k_end = is_causal ? min(Lk, q0 + Bq) : Lk;
    for (int k0 = 0; k0 < k_end; k0 += Bk) {
        __syncthreads();
        load_rows(ks, d, k, k0, Bk, Lk, d);
        load_rows(vs, d_v, v, k0, Bk, Lk, d_v);
        __syncthreads();
        if (i >= Lq) continue;
        for (int jj = 0; jj < Bk && k0 + jj < Lk; ++jj) {
            if (is_causal && k0 + jj > i) break;
            const float *kj = ks + jj * d;
            const float p = __expf(scale * dot(my_q, kj, d) - L_i);
            const float ds = p * (dot(my_do, vs + jj * d_v, d_v) - D_i);
            for (int c = 0; c < d; ++c) my_dq[c] += scale * ds * kj[c];
        }
    }
    if (i >= Lq) return;
    for (int c = 0; c < d; ++c) dq[(long long)i * d + c] = my_dq[c];
}
