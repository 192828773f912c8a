// common.cuh: small helpers shared by conv2d.cu, group_norm.cu and attention.cu.
//
// These sources are compiled three ways: by NVRTC through cupy.RawModule (no host
// headers at all, so no <cfloat> and no INFINITY), by nvcc to PTX in CI, and by g++
// against emulator.h for the CPU. Only CUDA built-ins are used below.
#pragma once

// -infinity, the score of a masked key: exp(-inf) = 0 exactly.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Sum of v over the 32 lanes of a warp, by butterfly exchanges: after the step with
// offset o every lane holds the sum of a group of 2*o lanes; after 5 steps, of all 32.
// Every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum of v over the whole block (blockDim.x a multiple of 32, y = z = 1): each warp
// sums its lanes, warp 0 sums the per-warp totals. Every thread gets the total.
// `scratch` is 32 floats of shared memory; every thread of the block must call this
// (it holds barriers), and it may be called again right away with the same scratch.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)blockDim.x / 32 ? scratch[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    return scratch[0];
}
