// A missing __syncthreads: each thread stores its value in shared memory and reads its
// left neighbour's. Without the barrier between the store and the load, a thread may
// read before its neighbour has stored. On the emulator the forward order happens to
// run thread t-1 before thread t (so the bug hides); the reverse order exposes it.
// shift_fixed_kernel is the same kernel with the barrier: right in every order.

extern "C" __global__ void shift_missing_sync_kernel(const float *x, float *y, int n) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = x[t];
    // BUG: __syncthreads() belongs here.
    y[t] = t > 0 ? s[t - 1] : 0.0f;
}

extern "C" __global__ void shift_fixed_kernel(const float *x, float *y, int n) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = x[t];
    __syncthreads();
    y[t] = t > 0 ? s[t - 1] : 0.0f;
}
