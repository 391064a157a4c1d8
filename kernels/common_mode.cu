// Common mode per group of pixels (DESIGN §6): the CUDA form of
// gpusmd.calib.common_mode.group_correct, which is its NumPy reference (medians and
// decisions bit for bit, see below).
//
// One block per (group, event): blockIdx.x = group g, blockIdx.y = event b. Group g holds
// the flat pixels starts[g] + o * outer_stride + i * inner_stride (o < n_outer,
// i < n_inner), element k = o * n_inner + i; groups of one launch must not overlap.
// A pixel votes when good and lo < value < hi (so NaN and +-inf never vote).
//
//   adu         (B, npix) float32, corrected in place
//   good        (B, npix) uint8 (0 / 1)
//   starts      (ngroups,) int64
//   stat        0 median (mean of the two middle values for an even count), 1 mean
//   min_count, min_fraction, max_abs, inclusive: the group is corrected when
//               count >= max(min_count, 1), count >= min_fraction * size (in double, as
//               Python does), the statistic is finite and |stat| < max_abs (<= with
//               inclusive); lo / hi / max_abs may be +-inf
//   apply_all   0: subtract from the good pixels of the group, 1: from all of them
//   cm_out      (B, ngroups) float32: the correction, 0 where the group was skipped
//   applied_out (B, ngroups) uint8
//
// Median. Values are mapped to uint32 keys whose unsigned order is the float order
// (-0 before +0, so the result does not depend on the order of arrival).
//   - groups of up to CM_SORT_MAX (1024) pixels: the voters' keys are gathered into
//     shared memory (4 KB), padded with 0xffffffff up to the next power of two of the
//     voter count, and sorted with a bitonic network; the middle keys are read off.
//   - larger groups (ASIC banks of 8448 to 33792 pixels, whole frames): radix select,
//     4 passes of 8 bits with a 256-bin shared histogram over the group (read again
//     from global memory each pass) give the lower middle key and how many voters share
//     it; the upper middle (even counts) is the same key, or the smallest key above it
//     (a block minimum).
// Float arithmetic:
//   median = (lo + hi) / 2 in float32 with lo, hi the two middle values (lo = hi for an
//     odd count), computed as (lo + hi) * 0.5f (the same correctly rounded value), as
//     gpusmd.calib.common_mode.masked_median does: bit-identical to the reference (an
//     odd median above FLT_MAX / 2 overflows to inf there and here, and is not applied).
//     The only possible difference is the sign of a zero median when the data hold
//     both -0 and +0 (np.sort leaves their order open; here -0 sorts first).
//   mean = sum / (float)count in float32 (as the reference), where sum is NumPy's
//     float32 sum of the group held contiguously, non-voters as +0 in place: +0 +
//     pairwise sum (runs of up to 128 elements summed with 8 interleaved accumulators,
//     longer runs split in two at a multiple of 8). Leaves of the pairwise tree are
//     summed by separate threads and added up in tree order by thread 0, subtree by
//     subtree of at most CM_PW_CHUNK elements (exact for any size). The reference
//     gathers the groups of several events with the event axis innermost, so NumPy
//     then sums each group in sequence instead: means agree to float32 rounding, and
//     are bit-identical for one event.
#ifndef __CUDACC__
#include "cuda_host.h"
#endif
#include "cm_median.h"

#define CM_SORT_MAX 1024          // groups up to this size are sorted in shared memory
#define CM_BLOCK_MAX 1024         // most threads a launch uses (whole frames): the register
                                  // budget, 64 a thread on sm_90, is set for it
#define CM_MAX_SIZE (1 << 24)     // largest group (float(count) is exact up to here)
#define CM_SHARED_WORDS 2048      // 8 KB: sort keys / histogram / pairwise tables
#define CM_PW_BLOCK 128           // NumPy's PW_BLOCKSIZE: leaves of the pairwise tree
#define CM_PW_CHUNK 65536         // subtrees of at most this size are summed at once ...
#define CM_MAX_LEAVES 599         // ... with at most 513 leaves
#define CM_MAX_CHUNKS 848         // a 2^24 group has at most 513 subtrees
__device__ __forceinline__ long long cm_offset(int k, int n_inner, long long outer_stride,
                                               long long inner_stride)
{
    const int o = k / n_inner;
    return (long long)o * outer_stride + (long long)(k - o * n_inner) * inner_stride;
}

// The value element k contributes to the mean (its value if it votes, else +0).
__device__ __forceinline__ float cm_mean_term(const float* frame, const unsigned char* ok,
                                              long long start, int k, int n_inner,
                                              long long outer_stride, long long inner_stride,
                                              float lo, float hi)
{
    const long long p = start + cm_offset(k, n_inner, outer_stride, inner_stride);
    const float v = frame[p];
    return (ok[p] && lo < v && v < hi) ? v : 0.0f;
}

// NumPy's pairwise_sum of elements [first, first + m), m <= CM_PW_BLOCK.
__device__ float cm_leaf_sum(const float* frame, const unsigned char* ok, long long start,
                             int first, int m, int n_inner, long long outer_stride,
                             long long inner_stride, float lo, float hi)
{
#define CM_TERM(k) cm_mean_term(frame, ok, start, (k), n_inner, outer_stride, inner_stride, lo, hi)
    if (m < 8) {
        float res = 0.0f;
        for (int i = 0; i < m; ++i) res += CM_TERM(first + i);
        return res;
    }
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = CM_TERM(first + j);
    int i = 8;
    for (; i < m - (m % 8); i += 8)
        for (int j = 0; j < 8; ++j) r[j] += CM_TERM(first + i + j);
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < m; ++i) res += CM_TERM(first + i);
    return res;
#undef CM_TERM
}

// The split of NumPy's pairwise summation: a run of n > CM_PW_BLOCK elements is summed
// as its first n2 elements plus the rest.
__device__ __forceinline__ int cm_pw_split(int n)
{
    const int n2 = n / 2;
    return n2 - n2 % 8;
}

// Walk NumPy's pairwise tree of n elements down to nodes of at most `leaf` elements:
// calls node(first, length) for each such node, in order. With `combine`, also adds the
// nodes' values (value(i) of the i-th node) up in tree order and returns the sum.
template <class Node, class Value>
__device__ float cm_pw_walk(int n, int leaf, bool combine, Node node, Value value)
{
    int todo[64], ntodo = 0, nvalues = 0, first = 0, index = 0;
    float values[32];
    todo[ntodo++] = n;
    while (ntodo) {
        const int m = todo[--ntodo];
        if (m == 0) {                           // add the two values on top
            const float right = values[--nvalues];
            const float left = values[--nvalues];
            values[nvalues++] = left + right;
        } else if (m <= leaf) {
            if (combine) values[nvalues++] = value(index);
            else node(first, m);
            first += m;
            ++index;
        } else {
            const int m2 = cm_pw_split(m);
            if (combine) todo[ntodo++] = 0;
            todo[ntodo++] = m - m2;
            todo[ntodo++] = m2;
        }
    }
    return combine ? values[0] : 0.0f;
}

struct CmNoValue {
    __device__ float operator()(int) const { return 0.0f; }
};
struct CmNoNode {
    __device__ void operator()(int, int) const {}
};

// NumPy's pairwise sum of the mean terms of elements [first, first + n), n <= CM_PW_CHUNK,
// by the whole block: thread 0 lists the leaves, threads sum them, thread 0 adds them up
// in tree order. Returns the sum in thread 0 (other threads: 0).
__device__ float cm_pw_chunk(const float* frame, const unsigned char* ok, long long start,
                             int first, int n, int n_inner, long long outer_stride,
                             long long inner_stride, float lo, float hi, unsigned int* sh,
                             int* s_nleaves)
{
    int* leaf_first = (int*)sh;                            // CM_MAX_LEAVES + 1 words
    unsigned int* leaf_sum = sh + (CM_MAX_LEAVES + 1);     // CM_MAX_LEAVES words (float bits)
    if (threadIdx.x == 0) {
        int nleaves = 0;
        cm_pw_walk(n, CM_PW_BLOCK, false,
                   [&](int f, int) { leaf_first[nleaves++] = first + f; }, CmNoValue());
        leaf_first[nleaves] = first + n;
        *s_nleaves = nleaves;
    }
    __syncthreads();
    const int nleaves = *s_nleaves;
    for (int l = threadIdx.x; l < nleaves; l += blockDim.x)
        leaf_sum[l] = __float_as_uint(cm_leaf_sum(frame, ok, start, leaf_first[l],
                                                  leaf_first[l + 1] - leaf_first[l], n_inner,
                                                  outer_stride, inner_stride, lo, hi));
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.x == 0)
        total = cm_pw_walk(n, CM_PW_BLOCK, true, CmNoNode(),
                           [&](int i) { return __uint_as_float(leaf_sum[i]); });
    __syncthreads();   // the tables are reused by the next chunk
    return total;
}

// Radix select over a large group: the key of rank `rank` among the voters, and (in
// *equal / *rank_in_key) how many voters have exactly that key and the rank among them.
// Called by every thread of the block.
__device__ unsigned int cm_select(const float* frame, const unsigned char* ok, long long start,
                                  int size, int n_inner, long long outer_stride,
                                  long long inner_stride, float lo, float hi, int rank,
                                  unsigned int* hist, unsigned int* s_prefix, int* s_rank,
                                  int* s_equal, int* equal, int* rank_in_key)
{
    const int tid = threadIdx.x, nt = blockDim.x;
    unsigned int prefix = 0u, mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += nt) hist[d] = 0u;
        __syncthreads();
        for (int k = tid; k < size; k += nt) {
            const long long p = start + cm_offset(k, n_inner, outer_stride, inner_stride);
            const float v = frame[p];
            if (ok[p] && lo < v && v < hi) {
                const unsigned int key = cm_key(v);
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
        }
        __syncthreads();
        if (tid == 0) {
            int below = 0, d = 0;
            while (below + (int)hist[d] <= rank) below += (int)hist[d++];
            *s_rank = rank - below;
            *s_prefix = prefix | ((unsigned int)d << shift);
            *s_equal = (int)hist[d];
        }
        __syncthreads();
        rank = *s_rank;
        prefix = *s_prefix;
        mask |= 255u << shift;
    }
    *equal = *s_equal;
    *rank_in_key = rank;
    return prefix;
}

extern "C" __global__ void __launch_bounds__(CM_BLOCK_MAX) group_correct(float* adu, const unsigned char* good,
                                         const long long* starts, int n_outer,
                                         long long outer_stride, int n_inner,
                                         long long inner_stride, long long npix, int ngroups,
                                         int stat, float lo, float hi, int min_count,
                                         double min_fraction, float max_abs, int inclusive,
                                         int apply_all, float* cm_out,
                                         unsigned char* applied_out)
{
    __shared__ unsigned int sh[CM_SHARED_WORDS];
    __shared__ int s_count;
    __shared__ int s_nleaves;
    __shared__ unsigned int s_prefix;
    __shared__ unsigned int s_next;
    __shared__ int s_rank;
    __shared__ int s_equal;
    __shared__ float s_sum;

    const int g = blockIdx.x;
    if (g >= ngroups || n_outer < 1 || n_inner < 1 ||
        (long long)n_outer * n_inner > CM_MAX_SIZE) return;   // uniform
    const int size = n_outer * n_inner;
    const long long event = blockIdx.y;
    float* frame = adu + event * npix;
    const unsigned char* ok = good + event * npix;
    const long long start = starts[g];
    const int tid = threadIdx.x, nt = blockDim.x;
    const bool median = stat == 0;
    const bool sorted = median && size <= CM_SORT_MAX;

    // 1. count the voters (small medians: gather their keys)
    if (tid == 0) s_count = 0;
    __syncthreads();
    int mine = 0;
    for (int k = tid; k < size; k += nt) {
        const long long p = start + cm_offset(k, n_inner, outer_stride, inner_stride);
        const float v = frame[p];
        if (ok[p] && lo < v && v < hi) {
            if (sorted) sh[atomicAdd(&s_count, 1)] = cm_key(v);
            else ++mine;
        }
    }
    if (mine) atomicAdd(&s_count, mine);
    __syncthreads();
    const int count = s_count;
    const bool enough = count >= max(min_count, 1) && (double)count >= min_fraction * (double)size;

    // 2. the statistic (block-uniform branches: count is shared)
    float cm = 0.0f;
    if (enough && median) {
        const int r_lo = (count - 1) / 2, r_hi = count / 2;
        unsigned int k_lo, k_hi;
        if (sorted) {
            cm_sort_keys(sh, count);
            k_lo = sh[r_lo];
            k_hi = sh[r_hi];
        } else {
            int equal, rank_in_key;
            k_lo = cm_select(frame, ok, start, size, n_inner, outer_stride, inner_stride, lo, hi,
                             r_lo, sh, &s_prefix, &s_rank, &s_equal, &equal, &rank_in_key);
            k_hi = k_lo;
            if (r_hi != r_lo && rank_in_key + 1 >= equal) {
                // the smallest voter key above k_lo
                if (tid == 0) s_next = CM_PAD_KEY;
                __syncthreads();
                unsigned int best = CM_PAD_KEY;
                for (int k = tid; k < size; k += nt) {
                    const long long p = start + cm_offset(k, n_inner, outer_stride, inner_stride);
                    const float v = frame[p];
                    if (ok[p] && lo < v && v < hi) {
                        const unsigned int key = cm_key(v);
                        if (key > k_lo && key < best) best = key;
                    }
                }
                if (best != CM_PAD_KEY) atomicMin(&s_next, best);
                __syncthreads();
                k_hi = s_next;
            }
        }
        cm = (cm_value(k_lo) + cm_value(k_hi)) * 0.5f;
    } else if (enough) {
        // NumPy's pairwise tree, summed subtree by subtree (groups over CM_PW_CHUNK)
        unsigned int* chunk_sum = sh + (2 * CM_MAX_LEAVES + 1);   // CM_MAX_CHUNKS words
        int nchunks = 0;
        cm_pw_walk(size, CM_PW_CHUNK, false, [&](int first, int n) {
            const float part = cm_pw_chunk(frame, ok, start, first, n, n_inner, outer_stride,
                                           inner_stride, lo, hi, sh, &s_nleaves);
            if (tid == 0) chunk_sum[nchunks] = __float_as_uint(part);
            ++nchunks;
        }, CmNoValue());
        if (tid == 0)
            s_sum = 0.0f + cm_pw_walk(size, CM_PW_CHUNK, true, CmNoNode(),
                                      [&](int i) { return __uint_as_float(chunk_sum[i]); });
        __syncthreads();
        cm = s_sum / (float)count;
    }

    // 3. decide, record, subtract
    const bool applied = cm_applies(enough, cm, max_abs, inclusive);
    if (!applied) cm = 0.0f;
    if (tid == 0) {
        cm_out[event * ngroups + g] = cm;
        applied_out[event * ngroups + g] = applied ? 1 : 0;
    }
    if (applied) {
        // as the reference: value - cm * target, target 1 or 0 (keeps its signed zeros)
        for (int k = tid; k < size; k += nt) {
            const long long p = start + cm_offset(k, n_inner, outer_stride, inner_stride);
            const float target = (apply_all || ok[p]) ? 1.0f : 0.0f;
            frame[p] = frame[p] - cm * target;
        }
    }
}
