// Per-run sum images in one read of the calibrated batch (DESIGN §8 "sums", §11).
// NumPy reference: gpusmd.features.sums.RunSums.update; the same numbers bit for bit
// (events are added in order in double precision, as NumPy reduces the event axis).
//
//   calib       (B, npix) float32
//   kinds       (nsums,) int: 0 calib (sum), 1 calib_square (sum of squares),
//               2 calib_thresADU (sum of the values above the threshold),
//               3 calib_nhits (events with a value above the threshold)
//   thresholds  (nsums,) float32 (ignored for kinds 0 and 1)
//   sums        (nsums, npix) float64 accumulators, added to
//   maxima      (npix,) float32 accumulator of calib_max when has_max (NaN sticks, as
//               numpy's max and maximum); any 1-element array otherwise
// One thread per pixel (grid-stride loop); nsums <= RUN_SUMS_MAX (more: several launches).
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define RUN_SUMS_MAX 8

extern "C" __global__ void run_sums(const float* __restrict__ calib, long long nbatch,
                                    long long npix, int nsums, const int* __restrict__ kinds,
                                    const float* __restrict__ thresholds,
                                    double* __restrict__ sums, int has_max,
                                    float* __restrict__ maxima)
{
    if (nsums > RUN_SUMS_MAX) return;
    int kind[RUN_SUMS_MAX];
    float thr[RUN_SUMS_MAX];
    for (int k = 0; k < nsums; ++k) {
        kind[k] = kinds[k];
        thr[k] = thresholds[k];
    }
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < npix; i += stride) {
        double part[RUN_SUMS_MAX];
        long long hits[RUN_SUMS_MAX];
        for (int k = 0; k < nsums; ++k) {
            part[k] = 0.0;
            hits[k] = 0;
        }
        float m = has_max ? maxima[i] : 0.0f;
        for (long long b = 0; b < nbatch; ++b) {
            const float v = calib[b * npix + i];
            for (int k = 0; k < nsums; ++k) {
                if (kind[k] == 0) part[k] += (double)v;
                else if (kind[k] == 1) part[k] += (double)v * (double)v;   // exact product
                else if (kind[k] == 2) part[k] += (double)(v > thr[k] ? v : 0.0f);
                else hits[k] += v > thr[k] ? 1 : 0;
            }
            if (has_max && m == m && (v != v || v > m)) m = v;
        }
        for (int k = 0; k < nsums; ++k)
            sums[(long long)k * npix + i] += kind[k] == 3 ? (double)hits[k] : part[k];
        if (has_max) maxima[i] = m;
    }
}
