// Calibration fused with the common mode (DESIGN §5, §6, §11).
//
// Mode 7 corrects, in ADU before the gain, the banks (bit 4), then the row segments
// (bit 1), then the half-panel columns (bit 2). A row segment is a run of consecutive
// pixels, so when the mode starts with the rows (codes 83 and 85 of the epix10k, 71 and 7
// of the Jungfrau) the first pass is one read of the raw frame:
//
//   calibrate_rows   decode the gain range, subtract the pedestal, take the median of
//                    the segment's voters and subtract it; then either multiply by
//                    mask / gain (finish = 1: the rows were the only pass, the output is
//                    calibrated) or write the ADU and the voting flags for the next pass
//                    (finish = 0). With correct = 0 it only splits (ADU + flags): the
//                    start of a mode that begins with banks or columns.
//   columns_gain     the last pass, the columns of each half panel, fused with the gain:
//                    each column's median subtracted, then adu * (mask / gain) of the
//                    pixel's gain range, decoded again from the raw frame (2 bytes, not a
//                    float). Rows + columns (codes 85 and 7) are two reads of the batch.
//   apply_gain       the gain alone, after other last passes.
//
// NumPy reference: Calibrator.split, group_correct over the row segments with the same
// Rule, then adu * scale (gpusmd.calib.common_mode.mode7); bit for bit the same numbers.
//
// calibrate_rows: one block per (segment, event), blockIdx.x = segment s (pixels
// s * seg_len ... s * seg_len + seg_len - 1 of a frame: the segments tile the frame),
// blockIdx.y = event.
//   raw           (B, npix) uint16 (int16 read with signed_raw = 1)
//   control_bits  (npix,) uint8 epix10k pixel control bits (any 1-element array otherwise)
//   lut           (rows, npix) float2 of (pedestal, mask / gain) (gain_decode.h)
//   vote_ranges   bit g set: pixels in gain range g vote (and are corrected) when
//                 unmasked (DESIGN §6 "good" pixels)
//   vote_mask     (npix,) uint8: 1 where the pixel is unmasked, whatever its gain (psana's
//                 voters); with use_vote_mask = 0 (any 1-element array) a pixel is
//                 unmasked when its mask / gain is not 0 (pixels of gain 0 do not vote)
//   lo, hi, min_count, min_fraction, max_abs, inclusive, apply_all: the median rule of
//                 kernels/common_mode.cu (a pixel votes when good and lo < adu < hi)
//   out           (B, npix) float32: calibrated (finish = 1) or ADU
//   good          (B, npix) uint8 voting flags (written when finish = 0)
//   cm_out        (B, nseg) float32 correction, 0 where skipped (when correct = 1)
//   applied_out   (B, nseg) uint8
#ifndef __CUDACC__
#include "cuda_host.h"
#endif
#include "gain_decode.h"
#include "cm_median.h"

#define CM_SEGMENT_MAX 256        // longest row segment (bank rows: 48 to 96); 13 bytes a pixel of shared memory
#define CM_TILE 16                // adjacent columns of a columns_gain block (rows read coalesced)
#define CM_COLUMN_MAX 512         // longest half-panel column (176 to 352): 32 KB of sort keys

extern "C" __global__ void calibrate_rows(const unsigned short* __restrict__ raw,
                                          const unsigned char* __restrict__ control_bits,
                                          const float2* __restrict__ lut,
                                          long long npix, int seg_len, int nseg, int family,
                                          int signed_raw, int vote_ranges,
                                          const unsigned char* __restrict__ vote_mask,
                                          int use_vote_mask, int correct,
                                          float lo, float hi, int min_count,
                                          double min_fraction, float max_abs, int inclusive,
                                          int apply_all, int finish, float* __restrict__ out,
                                          unsigned char* __restrict__ good, float* cm_out,
                                          unsigned char* applied_out)
{
    __shared__ unsigned int keys[CM_SEGMENT_MAX];
    __shared__ float value[CM_SEGMENT_MAX];
    __shared__ float scale[CM_SEGMENT_MAX];
    __shared__ unsigned char votes[CM_SEGMENT_MAX];
    __shared__ int s_count;

    const int s = blockIdx.x;
    if (s >= nseg || seg_len < 1 || seg_len > CM_SEGMENT_MAX) return;   // uniform
    const long long event = blockIdx.y;
    const long long pix0 = (long long)s * seg_len;
    const long long first = event * npix + pix0;
    const int tid = threadIdx.x, nt = blockDim.x;

    // 1. decode, subtract the pedestal, gather the voters' keys
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int k = tid; k < seg_len; k += nt) {
        const unsigned short r = raw[first + k];
        int g;
        const float2 e = gpusmd_lut_entry(family, r, pix0 + k, control_bits, lut, npix, &g);
        const float v = gpusmd_adc(family, r, signed_raw) - e.x;
        const bool unmasked = use_vote_mask ? vote_mask[pix0 + k] != 0 : e.y != 0.0f;
        const bool ok = g >= 0 && unmasked && ((vote_ranges >> g) & 1);
        value[k] = v;
        scale[k] = e.y;
        votes[k] = ok ? 1 : 0;
        if (correct && ok && lo < v && v < hi) keys[atomicAdd(&s_count, 1)] = cm_key(v);
    }
    __syncthreads();

    // 2. the segment's median and the decision (block-uniform: count is shared)
    float cm = 0.0f;
    bool applied = false;
    if (correct) {
        const int count = s_count;
        const bool enough = count >= max(min_count, 1) &&
                            (double)count >= min_fraction * (double)seg_len;
        if (enough) {
            cm_sort_keys(keys, count);
            cm = cm_sorted_median(keys, count);
        }
        applied = cm_applies(enough, cm, max_abs, inclusive);
        if (!applied) cm = 0.0f;
        if (tid == 0) {
            cm_out[event * nseg + s] = cm;
            applied_out[event * nseg + s] = applied ? 1 : 0;
        }
    }

    // 3. subtract (as the reference: value - cm * target, target 1 or 0), write
    for (int k = tid; k < seg_len; k += nt) {
        float v = value[k];
        if (applied) v = v - cm * ((apply_all || votes[k]) ? 1.0f : 0.0f);
        if (finish) {
            out[first + k] = v * scale[k];
        } else {
            out[first + k] = v;
            good[first + k] = votes[k];
        }
    }
}

// The gain factor mask / gain of raw value r at pixel i (gpusmd_lut_entry's where none).
__device__ __forceinline__ float cc_factor(unsigned short r, long long i,
                                           const unsigned char* control_bits,
                                           const float2* lut, long long npix, int family)
{
    int g;
    return gpusmd_lut_entry(family, r, i, control_bits, lut, npix, &g).y;
}

// columns_gain: one block per (tile of CM_TILE adjacent columns of a half panel, event):
// blockIdx.x = (segment * 2 + half) * (cols / CM_TILE) + tile, blockIdx.y = event. The
// groups are those of gpusmd.calib.common_mode.half_columns: group (segment * 2 + half)
// * cols + column of cm_out / applied_out (B, nseg * 2 * cols).
//   adu   (B, npix) float32 ADU in, calibrated out;  good (B, npix) uint8 voting flags
//   raw, control_bits, lut, family: as calibrate_rows, for the gain
//   nseg, rows, cols: the segment shape (rows = 2 x half_rows; cols % CM_TILE == 0)
extern "C" __global__ void columns_gain(float* __restrict__ adu,
                                        const unsigned char* __restrict__ good,
                                        const unsigned short* __restrict__ raw,
                                        const unsigned char* __restrict__ control_bits,
                                        const float2* __restrict__ lut, int nseg, int rows,
                                        int cols, int family, float lo, float hi,
                                        int min_count, double min_fraction, float max_abs,
                                        int inclusive, int apply_all, float* cm_out,
                                        unsigned char* applied_out)
{
    __shared__ unsigned int keys[CM_TILE * CM_COLUMN_MAX];
    __shared__ int counts[CM_TILE];
    __shared__ float cms[CM_TILE];
    __shared__ int applied[CM_TILE];

    const int half_rows = rows / 2, tiles = cols / CM_TILE;
    if (half_rows < 1 || half_rows > CM_COLUMN_MAX || cols % CM_TILE) return;   // uniform
    const int panel = blockIdx.x / tiles;                 // segment * 2 + half
    if (panel >= 2 * nseg) return;
    const int c0 = (blockIdx.x - panel * tiles) * CM_TILE;
    const long long npix = (long long)nseg * rows * cols;
    const long long event = blockIdx.y;
    // pixel (r, j) of the tile: row r of the half panel, column c0 + j
    const long long first = event * npix + (long long)(panel / 2) * rows * cols
                            + (long long)(panel % 2) * half_rows * cols + c0;
    const long long pix0 = first - event * npix;
    const int tid = threadIdx.x, nt = blockDim.x, size = half_rows * CM_TILE;
    const int n = cm_pow2(half_rows);

    // 1. gather each column's voters (consecutive threads: consecutive columns of a row)
    if (tid < CM_TILE) counts[tid] = 0;
    __syncthreads();
    for (int k = tid; k < size; k += nt) {
        const int r = k / CM_TILE, j = k - r * CM_TILE;
        const long long p = first + (long long)r * cols + j;
        const float v = adu[p];
        if (good[p] && lo < v && v < hi) keys[j * n + atomicAdd(&counts[j], 1)] = cm_key(v);
    }
    __syncthreads();
    for (int k = tid; k < CM_TILE * n; k += nt) {
        const int j = k / n, r = k - j * n;
        if (r >= counts[j]) keys[k] = CM_PAD_KEY;
    }
    __syncthreads();

    // 2. sort every column, decide
    cm_sort_runs(keys, n, CM_TILE);
    if (tid < CM_TILE) {
        const int count = counts[tid];
        const bool enough = count >= max(min_count, 1) &&
                            (double)count >= min_fraction * (double)half_rows;
        const float cm = enough ? cm_sorted_median(keys + tid * n, count) : 0.0f;
        const bool ok = cm_applies(enough, cm, max_abs, inclusive);
        cms[tid] = ok ? cm : 0.0f;
        applied[tid] = ok;
        const long long group = event * (2LL * nseg * cols) + (long long)panel * cols + c0 + tid;
        cm_out[group] = ok ? cm : 0.0f;
        applied_out[group] = ok ? 1 : 0;
    }
    __syncthreads();

    // 3. subtract (as the reference: value - cm * target), then the gain
    for (int k = tid; k < size; k += nt) {
        const int r = k / CM_TILE, j = k - r * CM_TILE;
        const long long p = first + (long long)r * cols + j;
        float v = adu[p];
        if (applied[j]) v = v - cms[j] * ((apply_all || good[p]) ? 1.0f : 0.0f);
        adu[p] = v * cc_factor(raw[p], pix0 + (long long)r * cols + j, control_bits, lut, npix,
                               family);
    }
}

// data (B, npix) float32 ADU -> calibrated, in place; n = B * npix, grid-stride loop.
extern "C" __global__ void apply_gain(const unsigned short* __restrict__ raw,
                                      const unsigned char* __restrict__ control_bits,
                                      const float2* __restrict__ lut, float* __restrict__ data,
                                      long long npix, long long n, int family)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    long long i = k % npix;
    const long long step = stride % npix;
    for (; k < n; k += stride) {
        data[k] = data[k] * cc_factor(__ldg(raw + k), i, control_bits, lut, npix, family);
        i += step;
        if (i >= npix) i -= npix;
    }
}
