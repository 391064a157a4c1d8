// Fused calibration (DESIGN §5): raw -> gain range -> (adc - pedestal) * mask / gain.
// NumPy reference: gpusmd.calib.calibrate.calibrate_reference.
//
// raw:          (B, npix) 16-bit raw frames (uint16, or int16 read with signed_raw = 1)
// control_bits: (npix,) epix10k pixel control bits (any 1-element array otherwise)
// lut:          (rows, npix) float2 of (pedestal, mask / gain) (gain_decode.h)
// out:          (B, npix) float32
// n = B * npix elements, walked with a grid-stride loop.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif
#include "gain_decode.h"

extern "C" __global__ void calibrate(const unsigned short* __restrict__ raw,
                                     const unsigned char* __restrict__ control_bits,
                                     const float2* __restrict__ lut,
                                     float* __restrict__ out,
                                     long long npix, long long n, int family, int signed_raw)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    // pixel index i = k % npix, advanced by stride % npix without a division per element
    long long i = k % npix;
    const long long step = stride % npix;
    for (; k < n; k += stride) {
        const unsigned short r = __ldg(raw + k);
        int g;
        const float2 e = gpusmd_lut_entry(family, r, i, control_bits, lut, npix, &g);
        out[k] = (gpusmd_adc(family, r, signed_raw) - e.x) * e.y;
        i += step;
        if (i >= npix) i -= npix;
    }
}
