// Fused projection (DESIGN §8, gpusmd.features.projection): threshold -> single photon
// -> mask -> sum (or mean) over one axis, in one pass over the frames.
// NumPy reference: gpusmd.features.projection.Projection.process.
//
// data:      (B, outer, len, inner) float32, the axis to project is `len`
// mask:      (outer, len, inner) float32 0 / 1, read only with PJ_MASK
// inv_count: (outer, inner) float64 1 / good pixels along the axis (NaN for none); read
//            only with PJ_MEAN
// out:       (B, outer, inner) float32
// flags:     PJ_LO | PJ_HI | PJ_SINGLE | PJ_MEAN | PJ_MASK; values below lo / above hi count as 0,
//            with PJ_SINGLE a value left above 0 counts as 1.
// One thread per output element (grid-stride loop over B * outer * inner); neighbouring
// threads read neighbouring `inner` elements, so the loads coalesce unless inner == 1.
// Sums in double, as the array version.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define PJ_LO 1
#define PJ_HI 2
#define PJ_SINGLE 4
#define PJ_MEAN 8
#define PJ_MASK 16

extern "C" __global__ void project(const float* __restrict__ data,
                                   const float* __restrict__ mask,
                                   const double* __restrict__ inv_count,
                                   float* __restrict__ out,
                                   long long nbatch, long long outer, long long len,
                                   long long inner, float lo, float hi, int flags)
{
    const long long nout = outer * inner;
    const long long n = nbatch * nout;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
        const long long b = k / nout;
        const long long o = k - b * nout;           // (outer, inner) index of the output
        const long long io = o / inner;
        const long long ii = o - io * inner;
        const long long base_m = io * len * inner + ii;
        const float* src = data + b * outer * len * inner + base_m;
        double acc = 0.0;
        for (long long j = 0; j < len; ++j) {
            float v = __ldg(src + j * inner);
            if ((flags & PJ_LO) && v < lo) v = 0.0f;
            if ((flags & PJ_HI) && v > hi) v = 0.0f;
            if (flags & PJ_SINGLE) v = v > 0.0f ? 1.0f : 0.0f;
            if (flags & PJ_MASK) v *= __ldg(mask + base_m + j * inner);
            acc += (double)v;
        }
        if (flags & PJ_MEAN) acc *= __ldg(inv_count + o);
        out[k] = (float)acc;
    }
}
