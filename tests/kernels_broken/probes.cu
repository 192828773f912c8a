// Correct kernels that probe one emulator feature each, checked by
// tests/test_kernels_emulator.py against what the CUDA Programming Guide specifies.

// Shared memory that is read before it is written holds garbage on a GPU; the emulator
// fills it with NaN (all bytes 0xFF) before every block, static and dynamic alike. Each
// block reads first, then writes: the next block must not see what this one wrote.
extern "C" __global__ void read_unwritten_shared_kernel(float *y) {
    __shared__ float s[64];
    extern __shared__ float dyn[];
    const int t = threadIdx.x, n = blockDim.x;
    y[blockIdx.x * 2 * n + t] = s[t];
    y[blockIdx.x * 2 * n + n + t] = dyn[t];
    s[t] = 1.0f;
    dyn[t] = 1.0f;
}

// The four shuffles, each with segments of `width` lanes; one block, out (4, blockDim.x).
extern "C" __global__ void shuffles_kernel(const float *x, float *out, int src, int delta,
                                           int width) {
    const int t = threadIdx.x, n = blockDim.x;
    const float v = x[t];
    out[0 * n + t] = __shfl_sync(0xffffffffu, v, src, width);
    out[1 * n + t] = __shfl_xor_sync(0xffffffffu, v, delta, width);
    out[2 * n + t] = __shfl_down_sync(0xffffffffu, v, delta, width);
    out[3 * n + t] = __shfl_up_sync(0xffffffffu, v, delta, width);
}

// Sum of x into *total with atomicAdd from every thread of every block.
extern "C" __global__ void atomic_sum_kernel(const float *x, float *total, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(total, x[i]);
}

// Every thread writes its threadIdx, blockIdx, blockDim and gridDim (x, y, z each):
// out (gridDim.x*y*z * blockDim.x*y*z, 12).
extern "C" __global__ void indices_kernel(float *out) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    float *o = out + (block * blockDim.x * blockDim.y * blockDim.z + thread) * 12;
    o[0] = threadIdx.x, o[1] = threadIdx.y, o[2] = threadIdx.z;
    o[3] = blockIdx.x, o[4] = blockIdx.y, o[5] = blockIdx.z;
    o[6] = blockDim.x, o[7] = blockDim.y, o[8] = blockDim.z;
    o[9] = gridDim.x, o[10] = gridDim.y, o[11] = gridDim.z;
}

// Threads leave at different times; a barrier waits only for those still running.
extern "C" __global__ void early_exit_kernel(float *y) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (t >= 40) return;
    s[t] = (float)t;
    __syncthreads();
    y[t] = s[39 - t];
}

// Lanes swap values through shared memory with __syncwarp between the write and the
// read (each warp only talks to itself, so a warp barrier is enough).
extern "C" __global__ void warp_swap_kernel(const float *x, float *y) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = x[t];
    __syncwarp();
    y[t] = s[t ^ 1];
}

// A shuffle among the lower 16 lanes only, named by its mask; the upper lanes skip it.
extern "C" __global__ void half_warp_shuffle_kernel(const float *x, float *y) {
    const int t = threadIdx.x;
    float v = x[t];
    if (t % 32 < 16) v = __shfl_xor_sync(0x0000ffffu, v, 1, 16);
    y[t] = v;
}
