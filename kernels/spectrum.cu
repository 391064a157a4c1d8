// Per-event histogram of values (the spectrum function): numpy.histogram's bins
// [e_i, e_i+1), the last one closed; NaN and values outside the edges are not counted.
// One event per blockIdx.y (at most 65535 a launch: gpusmd.cuda splits larger batches);
// each block counts into private shared-memory bins (no global atomics on one hot bin)
// and adds them to the event's row once.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

extern "C" __global__ void spectrum_counts(const float* __restrict__ data,
                                           const long long* __restrict__ pixels,
                                           long long frame, long long npix,
                                           const double* __restrict__ edges,
                                           int nbins, unsigned int* __restrict__ out)
{
    extern __shared__ unsigned int counts[];
    const long long b = blockIdx.y;
    const float* src = data + b * frame;   // frame: values per event; npix: those counted
    for (int i = threadIdx.x; i < nbins; i += blockDim.x) counts[i] = 0u;
    __syncthreads();
    const double first = edges[0], last = edges[nbins];
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < npix; k += stride) {
        const double v = (double)src[pixels ? pixels[k] : k];
        if (!(v >= first && v <= last)) continue;           // also drops NaN
        int lo = 0, hi = nbins;                             // the last edge <= v
        while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (v >= edges[mid]) lo = mid; else hi = mid;
        }
        atomicAdd(counts + lo, 1u);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nbins; i += blockDim.x)
        if (counts[i]) atomicAdd(out + b * nbins + i, counts[i]);
}
