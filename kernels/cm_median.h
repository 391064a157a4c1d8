// Median pieces shared by the common-mode kernels (common_mode.cu, calibrate_cm.cu).
//
// Values are mapped to uint32 keys whose unsigned order is the float order (-0 before
// +0, so a result does not depend on the order of arrival); the voters' keys are
// sorted in shared memory with a bitonic network, padded with CM_PAD_KEY up to a power
// of two. The median is (lo + hi) * 0.5f of the two middle values (lo = hi for an odd
// count): the correctly rounded float32 mean of two, as numpy's median gives.
#pragma once
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define CM_FLT_MAX 3.402823466e+38f
#define CM_PAD_KEY 0xffffffffu    // above every key of a non-NaN float

__device__ __forceinline__ unsigned int cm_key(float v)
{
    const unsigned int u = __float_as_uint(v);
    return u ^ ((unsigned int)(-(int)(u >> 31)) | 0x80000000u);
}

__device__ __forceinline__ float cm_value(unsigned int key)
{
    return __uint_as_float(key ^ (((key >> 31) - 1u) | 0x80000000u));
}

// Sorts nruns independent runs of keys, keys[r * n, (r + 1) * n), each ascending, n a
// power of two. Called by every thread of the block; keys are in shared memory.
__device__ void cm_sort_runs(unsigned int* keys, int n, int nruns)
{
    const int tid = threadIdx.x, nt = blockDim.x, half = n >> 1;
    for (int len = 2; len <= n; len <<= 1) {
        for (int j = len >> 1; j > 0; j >>= 1) {
            for (int t = tid; t < nruns * half; t += nt) {
                const int r = t / half, u = t - r * half;
                const int i = 2 * u - (u & (j - 1));   // partner i + j
                unsigned int* run = keys + (long long)r * n;
                const unsigned int a = run[i], b = run[i + j];
                if ((a > b) == ((i & len) == 0)) {
                    run[i] = b;
                    run[i + j] = a;
                }
            }
            __syncthreads();
        }
    }
}

// The next power of two of count (at least 1).
__device__ __forceinline__ int cm_pow2(int count)
{
    int n = 1;
    while (n < count) n <<= 1;
    return n;
}

// Pads keys[count, n) with CM_PAD_KEY, n the next power of two of count, and sorts
// keys[0, n) ascending. Called by every thread of the block; keys are in shared memory.
__device__ void cm_sort_keys(unsigned int* keys, int count)
{
    const int n = cm_pow2(count);
    for (int k = count + threadIdx.x; k < n; k += blockDim.x) keys[k] = CM_PAD_KEY;
    __syncthreads();
    cm_sort_runs(keys, n, 1);
}

// The median of `count` sorted keys.
__device__ __forceinline__ float cm_sorted_median(const unsigned int* keys, int count)
{
    return (cm_value(keys[(count - 1) / 2]) + cm_value(keys[count / 2])) * 0.5f;
}

// Whether a group's correction is applied: enough voters, finite, and |cm| below
// max_abs (or equal to it, with inclusive).
__device__ __forceinline__ bool cm_applies(bool enough, float cm, float max_abs, int inclusive)
{
    const float mag = fabsf(cm);
    const bool big = inclusive ? mag > max_abs : mag >= max_abs;
    return enough && !big && mag <= CM_FLT_MAX;
}
