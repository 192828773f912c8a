// A shuffle with a segment width that is not a power of 2: undefined on a GPU; the
// emulator stops the launch and says which line did it.

extern "C" __global__ void shuffle_bad_width_kernel(const float *x, float *y, int width) {
    const int t = threadIdx.x;
    y[t] = __shfl_down_sync(0xffffffffu, x[t], 1, width);
}
