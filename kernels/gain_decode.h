// Gain-range decoding and ADC extraction shared by the calibration and common-mode
// kernels. The NumPy reference is DetectorModel.gain_index / DetectorModel.adc in
// gpusmd/detectors.py; family codes are gpusmd.calib.calibrate.FAMILY_*.
#pragma once
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define GPUSMD_FAMILY_SINGLE 0
#define GPUSMD_FAMILY_JUNGFRAU 1
#define GPUSMD_FAMILY_EPIX10K 2

#define GPUSMD_ADC_MASK 0x3fff

// Gain range of one raw value, -1 when the gain bits are invalid.
//   single:   always 0
//   Jungfrau: raw >> 14: 0 -> G0, 1 -> G1, 3 -> G2, 2 -> invalid
//   epix10k:  cb = pixel control bits (g 4, ga 8, trbit 16) | raw bit 14 moved to 32;
//             first match wins: FH, FM, FL, AHL_H, AML_M, AHL_L, AML_L
__device__ __forceinline__ int gpusmd_gain_index(int family, unsigned short raw,
                                                 unsigned char control_bits)
{
    if (family == GPUSMD_FAMILY_JUNGFRAU) {
        const unsigned bits = (unsigned)raw >> 14;
        return bits == 2u ? -1 : (bits == 3u ? 2 : (int)bits);
    }
    if (family == GPUSMD_FAMILY_EPIX10K) {
        const unsigned cb = (unsigned)control_bits | (((unsigned)raw & 0x4000u) >> 9);
        if ((cb & 28u) == 28u) return 0;   // FH
        if ((cb & 28u) == 12u) return 1;   // FM
        if ((cb & 12u) == 8u) return 2;    // FL
        if ((cb & 60u) == 16u) return 3;   // AHL_H
        if ((cb & 60u) == 0u) return 4;    // AML_M
        if ((cb & 60u) == 48u) return 5;   // AHL_L
        if ((cb & 60u) == 32u) return 6;   // AML_L
        return -1;
    }
    return 0;
}

// ADC value as float: the low 14 bits for multi-gain detectors, the whole 16-bit word
// otherwise (read as signed for int16 detectors such as the CsPad).
__device__ __forceinline__ float gpusmd_adc(int family, unsigned short raw, int signed_raw)
{
    if (family == GPUSMD_FAMILY_JUNGFRAU || family == GPUSMD_FAMILY_EPIX10K)
        return (float)((unsigned)raw & GPUSMD_ADC_MASK);
    return signed_raw ? (float)(short)raw : (float)raw;
}

// The look-up entry (pedestal, mask / gain) of raw value r at pixel i of a (rows, npix)
// float2 table, and its gain range in *g (-1: none). A pixel in no gain range (psana's
// defaults): the epix10k's row GPUSMD_EPIX10K_NGAIN holds (0, mask), its raw ADU x mask;
// the Jungfrau's is (0, 0). control_bits: the epix10k per-pixel bits (not read for other
// families).
#define GPUSMD_EPIX10K_NGAIN 7

__device__ __forceinline__ float2 gpusmd_lut_entry(int family, unsigned short r, long long i,
                                                   const unsigned char* control_bits,
                                                   const float2* lut, long long npix, int* g)
{
    const unsigned char cb = family == GPUSMD_FAMILY_EPIX10K ? __ldg(control_bits + i)
                                                             : (unsigned char)0;
    *g = gpusmd_gain_index(family, r, cb);
    if (*g >= 0) return __ldg(lut + ((long long)*g * npix + i));
    return family == GPUSMD_FAMILY_EPIX10K ? __ldg(lut + (GPUSMD_EPIX10K_NGAIN * npix + i))
                                           : make_float2(0.0f, 0.0f);
}
