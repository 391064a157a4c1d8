// CsPad common mode per 2x1 segment (DESIGN §6): the CUDA form of
// gpusmd.calib.cm_cspad (mode 1, the histogram peak after psana's findCommonMode, with
// mode 5 as fallback; mode 5, the mean of the unbonded pixels). The kernels find the
// correction of each (event, segment); the caller subtracts it (cm_out as float32 from
// every pixel of the segment, as the NumPy reference does).
//
//   adu       (B, nseg * segpix) float32, read only (segpix = 185 * 388)
//   good      uint8 (0 / non-0), event e at good + e * good_stride (0: one mask for all)
//   cm_out    (B, nseg) float64: the correction, 0 where none is applied
//   flag_out  (B, nseg) uint8: 0 none, 1 mode 1 (the peak), 2 mode 5 (the unbonded mean,
//             as mode 5 itself or as the fallback of mode 1)
//
// Everything follows the reference's arithmetic, so that cm_out is bit-identical to its
// float64 values against the NumPy reference (tests/test_cm_cspad_kernels.py):
//   - unbonded mean: the 36 values (r, r) then (r, r + 194), r = 10..180, as float64,
//     added one after another (NumPy's order for its F-ordered gather of them), divided
//     by 36. Applied when finite and |mean| <= limit (double).
//   - histogram: good values rounded half away from zero exactly as the reference does
//     it in float32 (floor, exact fraction, ties away from zero), counted in 3000 int
//     bins [-1000, 2000) in shared memory (shared atomics).
//   - peak: i0 = the first bin > thresh (a block minimum); then one thread scans as
//     find_peak: running maximum from i0 (the first bin holding it is the peak), right =
//     the first later bin <= running max // 2 (3000 if none), left = the last bin <=
//     peak // 2 at or below the peak (-1 if none), sigma = (right - left) / 2.36.
//   - refinement, twice: centre = (float) mean, half = (float) (2 sigma); the good pixels
//     with |v - centre| <= half (float32) vote; s1 = sum of (v - centre), s2 = sum of
//     (v - centre)^2, both float32 sums in NumPy's pairwise order of the whole segment
//     (non-voters as +0: the reference's float32 sum over a contiguous segment):
//     the leaves of the pairwise tree (<= 128 elements, 8 accumulators) are summed by
//     separate threads into 2^depth slots (a leaf above the deepest level fills its
//     first slot, the others hold +0, and x + 0 = x) and added up level by level in
//     tree order. shift = s1 / n, mean = centre + shift, var = s2 / n - shift^2,
//     sigma = sqrt(max(var, 0)) in float64 (NaN when no pixel votes).
//   - decision: found and mean finite and |mean| <= mean_max and sigma <= rms_max: flag
//     1; otherwise, with fallback, the unbonded mean when finite and <= mean_max: flag 2.
// No FMA contraction: products that feed sums use __fmul_rn / __dmul_rn on the GPU.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif

#define CS_HIST_LOW (-1000)
#define CS_NBINS 3000
#define CS_PW_BLOCK 128          // NumPy's PW_BLOCKSIZE
#define CS_MAX_SLOTS 2048        // 2^depth leaves of the pairwise tree (depth <= 11)
#define CS_COLS 388
#define CS_COLSHALF 194

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CS_FMUL(a, b) __fmul_rn((a), (b))
#define CS_DMUL(a, b) __dmul_rn((a), (b))
#else
#define CS_FMUL(a, b) ((a) * (b))
#define CS_DMUL(a, b) ((a) * (b))
#endif

// Mean of the 36 unbonded pixels of a segment, as the reference's float64 mean over
// them: NumPy gathers view[:, :, offsets] with the pixel axis outermost (F order), so its
// reduction adds the 36 values one after another, in offset order, to 0.
__device__ double cs_unbond_mean(const float* seg)
{
    double res = 0.0;
    for (int k = 0; k < 18; ++k) {
        const int r = 10 + 10 * k;
        res += (double)seg[r * CS_COLS + r];
    }
    for (int k = 0; k < 18; ++k) {
        const int r = 10 + 10 * k;
        res += (double)seg[r * CS_COLS + r + CS_COLSHALF];
    }
    return res / 36.0;
}

__device__ __forceinline__ bool cs_finite(double x) { return x - x == 0.0; }

__device__ __forceinline__ void cs_term(const float* seg, const unsigned char* ok, int k,
                                        float centre, float half, float& t1, float& t2)
{
    const float d = seg[k] - centre;
    const bool vote = ok[k] != 0 && fabsf(d) <= half;    // false for NaN
    t1 = vote ? d : 0.0f;
    t2 = vote ? CS_FMUL(d, d) : 0.0f;
}

// NumPy's pairwise_sum of the terms of elements [first, first + m), m <= CS_PW_BLOCK,
// for s1 and s2 at once.
__device__ void cs_leaf(const float* seg, const unsigned char* ok, int first, int m,
                        float centre, float half, float& s1, float& s2)
{
    float t1, t2;
    if (m < 8) {
        float r1 = 0.0f, r2 = 0.0f;
        for (int i = 0; i < m; ++i) {
            cs_term(seg, ok, first + i, centre, half, t1, t2);
            r1 += t1;
            r2 += t2;
        }
        s1 = r1;
        s2 = r2;
        return;
    }
    float a[8], b[8];
    for (int j = 0; j < 8; ++j) cs_term(seg, ok, first + j, centre, half, a[j], b[j]);
    int i = 8;
    for (; i < m - (m % 8); i += 8)
        for (int j = 0; j < 8; ++j) {
            cs_term(seg, ok, first + i + j, centre, half, t1, t2);
            a[j] += t1;
            b[j] += t2;
        }
    float r1 = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    float r2 = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
    for (; i < m; ++i) {
        cs_term(seg, ok, first + i, centre, half, t1, t2);
        r1 += t1;
        r2 += t2;
    }
    s1 = r1;
    s2 = r2;
}

// Slot s of the pairwise tree of n elements at depth `depth`: the leaf [first, first + m)
// whose first slot it is, or m = 0 when the slot is a +0 filler.
__device__ __forceinline__ void cs_slot(int s, int depth, int n, int& first, int& m)
{
    first = 0;
    m = n;
    for (int l = 0; l < depth; ++l) {
        const int bit = (s >> (depth - 1 - l)) & 1;
        if (m <= CS_PW_BLOCK) {
            if (bit) { m = 0; return; }
            continue;
        }
        int n2 = m / 2;
        n2 -= n2 % 8;
        if (bit) { first += n2; m -= n2; } else { m = n2; }
    }
}

// Mode 1 (mode = 1) with its fallback. One block per (segment, event):
// blockIdx.x = segment, blockIdx.y = event.
extern "C" __global__ void cspad_mode1(const float* adu, const unsigned char* good,
                                       long long good_stride, int nseg, int segpix,
                                       double mean_max, double rms_max, int thresh,
                                       int fallback, int depth, double* cm_out,
                                       unsigned char* flag_out)
{
    __shared__ int hist[CS_NBINS];
    __shared__ float sum1[CS_MAX_SLOTS];
    __shared__ float sum2[CS_MAX_SLOTS];
    __shared__ int s_i0, s_count;
    __shared__ float s_centre, s_half;
    __shared__ double s_mean, s_sigma;

    const int tid = threadIdx.x, nt = blockDim.x;
    const int seg = blockIdx.x;
    const long long ev = blockIdx.y;
    const float* x = adu + (ev * nseg + seg) * (long long)segpix;
    const unsigned char* ok = good + ev * good_stride + (long long)seg * segpix;

    for (int i = tid; i < CS_NBINS; i += nt) hist[i] = 0;
    if (tid == 0) s_i0 = CS_NBINS;
    __syncthreads();
    for (int k = tid; k < segpix; k += nt) {
        if (!ok[k]) continue;
        const float v = x[k];
        const float f = floorf(v);
        const float fr = v - f;                                  // exact
        const bool up = fr > 0.5f || (fr == 0.5f && v >= 0.0f);  // ties away from zero
        const float r = f + (up ? 1.0f : 0.0f);
        if (r >= (float)CS_HIST_LOW && r < (float)(CS_HIST_LOW + CS_NBINS))
            atomicAdd(&hist[(int)r - CS_HIST_LOW], 1);
    }
    __syncthreads();
    int first_above = CS_NBINS;
    for (int i = tid; i < CS_NBINS; i += nt)
        if (hist[i] > thresh) { first_above = i; break; }
    if (first_above < CS_NBINS) atomicMin(&s_i0, first_above);
    __syncthreads();
    const int i0 = s_i0;
    const bool found = i0 < CS_NBINS;
    if (tid == 0 && found) {
        int pc = hist[i0], peak = i0, right = CS_NBINS;
        for (int i = i0 + 1; i < CS_NBINS; ++i) {
            const int h = hist[i];
            if (h <= pc / 2) { right = i; break; }
            if (h > pc) { pc = h; peak = i; }
        }
        int left = -1;
        for (int i = peak; i >= 0; --i)
            if (hist[i] <= pc / 2) { left = i; break; }
        const double sigma = (double)(right - left) / 2.36;
        s_centre = (float)(double)(peak + CS_HIST_LOW);
        s_half = (float)(2.0 * sigma);
    }
    __syncthreads();

    double mean = 0.0, sigma = 0.0;
    if (found) {        // uniform over the block
        const int nslots = 1 << depth;
        for (int pass = 0; pass < 2; ++pass) {
            const float centre = s_centre, half = s_half;
            if (tid == 0) s_count = 0;
            __syncthreads();
            int count = 0;
            for (int k = tid; k < segpix; k += nt) {
                const float d = x[k] - centre;
                count += (ok[k] != 0 && fabsf(d) <= half);
            }
            atomicAdd(&s_count, count);
            for (int s = tid; s < nslots; s += nt) {
                int first, m;
                cs_slot(s, depth, segpix, first, m);
                float a = 0.0f, b = 0.0f;
                if (m > 0) cs_leaf(x, ok, first, m, centre, half, a, b);
                sum1[s] = a;
                sum2[s] = b;
            }
            __syncthreads();
            for (int step = 1; step < nslots; step *= 2) {
                for (int i = 2 * step * tid; i < nslots; i += 2 * step * nt) {
                    sum1[i] = sum1[i] + sum1[i + step];
                    sum2[i] = sum2[i] + sum2[i + step];
                }
                __syncthreads();
            }
            if (tid == 0) {
                const double n = (double)s_count;
                const float s1 = 0.0f + sum1[0], s2 = 0.0f + sum2[0];
                const double shift = (double)s1 / n;
                const double mu = (double)centre + shift;
                const double var = (double)s2 / n - CS_DMUL(shift, shift);
                const double sg = var != var ? var : sqrt(var > 0.0 ? var : 0.0);
                s_mean = mu;
                s_sigma = sg;
                s_centre = (float)mu;
                s_half = (float)(2.0 * sg);
            }
            __syncthreads();
        }
        mean = s_mean;
        sigma = s_sigma;
    }
    if (tid == 0) {
        const long long o = ev * nseg + seg;
        double cm = 0.0;
        unsigned char flag = 0;
        if (found && cs_finite(mean) && fabs(mean) <= mean_max && sigma <= rms_max) {
            cm = mean;
            flag = 1;
        } else if (fallback) {
            const double u = cs_unbond_mean(x);
            if (cs_finite(u) && fabs(u) <= mean_max) {
                cm = u;
                flag = 2;
            }
        }
        cm_out[o] = cm;
        flag_out[o] = flag;
    }
}

// Mode 5: one thread per (segment, event): segment blockIdx.x * blockDim.x + threadIdx.x,
// event blockIdx.y. Applied when finite and |mean| <= maxcorr.
extern "C" __global__ void cspad_mode5(const float* adu, int nseg, int segpix, double maxcorr,
                                       double* cm_out, unsigned char* flag_out)
{
    const int seg = blockIdx.x * blockDim.x + threadIdx.x;
    if (seg >= nseg) return;
    const long long o = (long long)blockIdx.y * nseg + seg;
    const double u = cs_unbond_mean(adu + o * segpix);
    const bool applied = cs_finite(u) && fabs(u) <= maxcorr;
    cm_out[o] = applied ? u : 0.0;
    flag_out[o] = applied ? 2 : 0;
}
