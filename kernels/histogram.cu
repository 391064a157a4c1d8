// Per-event weighted histogram (DESIGN §8 azimuthal integration,
// gpusmd.features.azimuthal.AzimuthalIntegration.process): for every event b and pixel p
// with bin[p] >= 0,  out[b, bin[p]] += t(data[b, p]) * weight[p],
// t() zeroing values below lo (HIST_LO) / above hi (HIST_HI).
// NumPy reference: np.bincount over (event, bin) flat indices.
//
// data:   (B, npix) float32;  bin: (npix,) int32, -1 = not counted;  weight: (npix,) float32
// out:    (B, nbins) float64, zeroed by the caller (accumulated with atomics)
// Grid (blocks_x, B): the blocks of row b share event b's pixels (grid-stride loop).
// With HIST_SHARED each block first accumulates into a private copy of the bins in
// dynamic shared memory (nbins float32), then adds its non-zero bins to `out`: one global
// atomic per (block, bin) instead of one per pixel, so no hot global bin. Without it
// (too many bins for shared memory) pixels go straight to global double atomics.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define HIST_LO 1
#define HIST_HI 2
#define HIST_SHARED 4

extern "C" __global__ void hist_weighted(const float* __restrict__ data,
                                         const int* __restrict__ bin,
                                         const float* __restrict__ weight,
                                         double* __restrict__ out,
                                         long long npix, int nbins, float lo, float hi,
                                         int flags)
{
    extern __shared__ float hist_private[];
    const long long b = blockIdx.y;
    const float* src = data + b * npix;
    double* dst = out + b * (long long)nbins;
    const bool priv = (flags & HIST_SHARED) != 0;      // uniform over the block
    if (priv) {
        for (int i = threadIdx.x; i < nbins; i += blockDim.x) hist_private[i] = 0.0f;
        __syncthreads();
    }
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < npix; p += stride) {
        const int k = __ldg(bin + p);
        if (k < 0) continue;
        float v = __ldg(src + p);
        if ((flags & HIST_LO) && v < lo) v = 0.0f;
        if ((flags & HIST_HI) && v > hi) v = 0.0f;
        v *= __ldg(weight + p);
        if (priv) atomicAdd(hist_private + k, v);
        else atomicAdd(dst + k, (double)v);
    }
    if (priv) {
        __syncthreads();
        for (int i = threadIdx.x; i < nbins; i += blockDim.x) {
            const float s = hist_private[i];
            if (s != 0.0f) atomicAdd(dst + i, (double)s);
        }
    }
}
