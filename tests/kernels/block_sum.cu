// Test kernels for the host shim (kernels/cuda_host.h): block and warp reductions that
// use __shared__, dynamic shared memory, __syncthreads, warp shuffles, votes and
// atomics, plus an index map. Not shipped: tests/test_kernels.py builds it by path.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define BLOCK_SUM_THREADS 256

// total += sum(x); blocks_done counts the blocks. Launch with 256 threads per block.
extern "C" __global__ void block_sum(const float* __restrict__ x, float* total,
                                     unsigned int* blocks_done, long long n)
{
    __shared__ float partial[BLOCK_SUM_THREADS];
    const unsigned int t = threadIdx.x;
    float acc = 0.0f;
    for (long long k = (long long)blockIdx.x * blockDim.x + t; k < n;
         k += (long long)blockDim.x * gridDim.x)
        acc += x[k];
    partial[t] = acc;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) partial[t] += partial[t + half];
        __syncthreads();
    }
    if (t == 0) {
        atomicAdd(total, partial[0]);
        atomicAdd(blocks_done, 1u);
    }
}

// Warp-shuffle reduction with one dynamic-shared slot per warp; any block size that is
// a multiple of 32. counts[0] += number of x > threshold (ballot), totals[0] += sum.
extern "C" __global__ void warp_sum(const float* __restrict__ x, double* totals,
                                    int* counts, long long n, float threshold)
{
    extern __shared__ float warp_partial[];
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const float v = k < n ? x[k] : 0.0f;
    float s = v;
    for (int offset = 16; offset > 0; offset /= 2)
        s += __shfl_down_sync(0xffffffffu, s, offset);
    const unsigned int above = __ballot_sync(0xffffffffu, k < n && v > threshold);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        warp_partial[warp] = s;
        atomicAdd(counts, __popc(above));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double block_total = 0.0;
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) block_total += warp_partial[w];
        atomicAdd(totals, block_total);
    }
}

// out[global linear thread] = linear block * 10000 + linear thread in block.
extern "C" __global__ void index_map(int* out)
{
    const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned int per_block = blockDim.x * blockDim.y * blockDim.z;
    out[block * per_block + thread] = (int)(block * 10000u + thread);
}
