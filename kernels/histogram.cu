// Per-event weighted histogram (DESIGN §8 azimuthal integration,
// gpusmd.features.azimuthal.AzimuthalIntegration.process): for every event b and every
// counted pixel p,  out[b, bin[p]] += (double)(t(data[b, p]) * weight[p])  (float32 product),
// t() zeroing values below lo (HIST_LO) / above hi (HIST_HI).
//
// The summation order is fixed by a plan (gpusmd.cuda.hist_plan), not by the launch:
// the counted pixels sorted by bin (ascending pixel within a bin), `perm`, each bin's
// entries cut into chunks, a chunk into `lanes` interleaved slices (entries
// slice_start[s], + lanes, ... below slice_stop[s]; neighbouring threads read
// neighbouring entries). hist_slices sums each slice in entry order into partial[b, s]
// (float64); hist_bins sums each bin's slices (bin_slices[k] .. bin_slices[k+1]) in slice
// order. No atomics: the result does not depend on the grid, the block size or the
// batch, and gpusmd.cuda.histogram_numpy adds in the same order (np.bincount is
// sequential), so both agree bit for bit.
//
// data: (B, npix) float32; perm: (nent,) int32 pixel of each sorted entry;
// wsorted: (nent,) float32 weight of each entry; partial: (B, nslices) float64;
// out: (B, nbins) float64. Grids (blocks_x, B), grid-stride over slices / bins.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define HIST_LO 1
#define HIST_HI 2

// the float32 product, rounded as NumPy rounds it (never fused into the sum)
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define HIST_FMUL(a, b) __fmul_rn((a), (b))
#else
#define HIST_FMUL(a, b) ((a) * (b))
#endif

extern "C" __global__ void hist_slices(const float* __restrict__ data,
                                       const int* __restrict__ perm,
                                       const float* __restrict__ wsorted,
                                       const int* __restrict__ slice_start,
                                       const int* __restrict__ slice_stop,
                                       double* __restrict__ partial,
                                       long long npix, int nslices, int lanes, float lo,
                                       float hi, int flags)
{
    const long long b = blockIdx.y;
    const float* src = data + b * npix;
    double* dst = partial + b * (long long)nslices;
    const int stride = blockDim.x * gridDim.x;
    for (int s = blockIdx.x * blockDim.x + threadIdx.x; s < nslices; s += stride) {
        double acc = 0.0;
        const int end = __ldg(slice_stop + s);
        for (int e = __ldg(slice_start + s); e < end; e += lanes) {
            float v = __ldg(src + __ldg(perm + e));
            if ((flags & HIST_LO) && v < lo) v = 0.0f;
            if ((flags & HIST_HI) && v > hi) v = 0.0f;
            acc += (double)HIST_FMUL(v, __ldg(wsorted + e));
        }
        dst[s] = acc;
    }
}

extern "C" __global__ void hist_bins(const double* __restrict__ partial,
                                     const int* __restrict__ bin_slices,
                                     double* __restrict__ out, int nslices, int nbins)
{
    const long long b = blockIdx.y;
    const double* src = partial + b * (long long)nslices;
    double* dst = out + b * (long long)nbins;
    const int stride = blockDim.x * gridDim.x;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < nbins; k += stride) {
        double acc = 0.0;
        const int end = __ldg(bin_slices + k + 1);
        for (int s = __ldg(bin_slices + k); s < end; ++s) acc += src[s];
        dst[k] = acc;
    }
}
