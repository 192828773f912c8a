// Barriers that not every thread reaches.
//
// divergent_barrier_kernel: the two halves of the block wait at two different
// __syncthreads; on a GPU that is undefined behaviour (it may hang, or silently
// mismatch the barriers). The emulator reports it with the threads and lines.
// shuffle_deadlock_kernel: half a warp waits at a block barrier while the other half
// waits for it in a shuffle; neither can go on.

extern "C" __global__ void divergent_barrier_kernel(float *y) {
    const int t = threadIdx.x;
    if (t < 16) {
        y[t] = 1.0f;
        __syncthreads();
    } else {
        y[t] = 2.0f;
        __syncthreads();
    }
}

extern "C" __global__ void shuffle_deadlock_kernel(float *y) {
    const int t = threadIdx.x;
    float v = (float)t;
    if (t < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    y[t] = v;
}
