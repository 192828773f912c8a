// An out-of-bounds write: the launch rounds n up to whole blocks and the kernel forgets
// the `if (i < n)` guard, so the last block writes past the end of y. A GPU often lets
// this pass silently; AddressSanitizer stops it on the emulator.

extern "C" __global__ void fill_unguarded_kernel(float *y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    // BUG: if (i >= n) return;
    y[i] = 1.0f;
}
