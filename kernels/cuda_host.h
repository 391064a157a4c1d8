// cuda_host.h: compile gpusmd's CUDA kernels as plain C++20 on the host (DESIGN §11).
//
// The same kernels/*.cu source that NVRTC compiles for the GPU is compiled with g++
// into a shared library (gpusmd.cuda.host_module), so CI without a GPU runs every
// kernel against its NumPy reference. Under NVRTC / nvcc this header is empty.
//
// Execution model of a host launch (gpusmd_host::launch):
//   - blocks run one after another, so __shared__ can be `static`: all threads of the
//     running block see the same variable, and no two blocks run at once;
//   - kernels that use no block or warp synchronisation run their threads one after
//     another on the calling thread ("sequential");
//   - kernels that use __syncthreads / __syncwarp / warp shuffles / votes run the
//     threads of a block as std::threads ("threaded"): __syncthreads is a barrier over
//     the block's threads, warp functions exchange values through a per-warp slot
//     array between two barriers over the warp's lanes. A thread that returns from the
//     kernel leaves the barriers (as exited threads do on a GPU). Warp functions
//     assume that every live lane of the warp calls them (full-warp masks).
//   - extern __shared__ (dynamic shared memory) is rewritten by the Python loader into
//     a pointer to a per-launch buffer of the launch's shared-memory size.
//
// Kernel sources should use only built-in types (int, long long, unsigned short, ...)
// and the CUDA built-ins defined here: NVRTC has no C++ standard library headers.
#pragma once
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)

#include <math.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---- qualifiers ---------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __shared__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __restrict__ is a g++ keyword already.

// ---- vector types -------------------------------------------------------------------
#define GPUSMD_VEC2(T, N, A)                                                              \
    struct alignas(A) N##2 { T x, y; };                                                   \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define GPUSMD_VEC3(T, N)                                                                 \
    struct N##3 { T x, y, z; };                                                           \
    inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define GPUSMD_VEC4(T, N, A)                                                              \
    struct alignas(A) N##4 { T x, y, z, w; };                                             \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }

GPUSMD_VEC2(float, float, 8)
GPUSMD_VEC3(float, float)
GPUSMD_VEC4(float, float, 16)
GPUSMD_VEC2(double, double, 16)
GPUSMD_VEC2(int, int, 8)
GPUSMD_VEC3(int, int)
GPUSMD_VEC4(int, int, 16)
GPUSMD_VEC2(unsigned int, uint, 8)
GPUSMD_VEC3(unsigned int, uint)
GPUSMD_VEC4(unsigned int, uint, 16)
GPUSMD_VEC2(short, short, 4)
GPUSMD_VEC2(unsigned short, ushort, 4)
GPUSMD_VEC4(unsigned short, ushort, 8)
GPUSMD_VEC2(unsigned char, uchar, 2)
GPUSMD_VEC4(unsigned char, uchar, 4)
GPUSMD_VEC2(long long, longlong, 16)
#undef GPUSMD_VEC2
#undef GPUSMD_VEC3
#undef GPUSMD_VEC4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

// ---- built-in variables ---------------------------------------------------------------
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;
inline constexpr int warpSize = 32;

// ---- loads, math, bit tricks --------------------------------------------------------
template <class T> __forceinline__ T __ldg(const T* p) { return *p; }

template <class A, class B> __forceinline__ std::common_type_t<A, B> min(A a, B b)
{
    using C = std::common_type_t<A, B>;
    return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B> __forceinline__ std::common_type_t<A, B> max(A a, B b)
{
    using C = std::common_type_t<A, B>;
    return (C)a < (C)b ? (C)b : (C)a;
}

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float a) { return sinf(a); }
inline float __cosf(float a) { return cosf(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline int __float2int_rn(float a) { return (int)nearbyintf(a); }
inline int __float2int_rz(float a) { return (int)a; }
inline int __float2int_rd(float a) { return (int)floorf(a); }
inline int __float2int_ru(float a) { return (int)ceilf(a); }
inline unsigned int __float2uint_rn(float a) { return (unsigned int)nearbyintf(a); }
inline int __double2int_rn(double a) { return (int)nearbyint(a); }
inline float __int2float_rn(int a) { return (float)a; }
inline int __float_as_int(float a) { int r; std::memcpy(&r, &a, 4); return r; }
inline unsigned int __float_as_uint(float a) { unsigned int r; std::memcpy(&r, &a, 4); return r; }
inline float __int_as_float(int a) { float r; std::memcpy(&r, &a, 4); return r; }
inline float __uint_as_float(unsigned int a) { float r; std::memcpy(&r, &a, 4); return r; }
inline long long __double_as_longlong(double a) { long long r; std::memcpy(&r, &a, 8); return r; }
inline double __longlong_as_double(long long a) { double r; std::memcpy(&r, &a, 8); return r; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x)
{
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
inline unsigned int __umulhi(unsigned int a, unsigned int b)
{
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned int __umul24(unsigned int a, unsigned int b) { return a * b; }
[[noreturn]] inline void __trap() { std::fprintf(stderr, "gpusmd host kernel: __trap()\n"); std::abort(); }

// ---- atomics (all threads of a launch share the host's memory) ---------------------
template <class T> __forceinline__ T gpusmd_atomic_update(T* address, T value, int op)
{
    // op: 0 add, 1 min, 2 max (compare-and-swap loop; used for floating point)
    T old;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    for (;;) {
        T desired = op == 0 ? old + value : (op == 1 ? (value < old ? value : old)
                                                      : (old < value ? value : old));
        if (__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_RELAXED))
            return old;
    }
}
#define GPUSMD_INT_ATOMICS(T)                                                             \
    inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }  \
    inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }  \
    inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }  \
    inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }    \
    inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }  \
    inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    inline T atomicMin(T* a, T v) { return gpusmd_atomic_update(a, v, 1); }               \
    inline T atomicMax(T* a, T v) { return gpusmd_atomic_update(a, v, 2); }               \
    inline T atomicCAS(T* a, T compare, T v)                                              \
    {                                                                                     \
        __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST,              \
                                    __ATOMIC_SEQ_CST);                                    \
        return compare;                                                                   \
    }
GPUSMD_INT_ATOMICS(int)
GPUSMD_INT_ATOMICS(unsigned int)
GPUSMD_INT_ATOMICS(long long)
GPUSMD_INT_ATOMICS(unsigned long long)
#undef GPUSMD_INT_ATOMICS
inline float atomicAdd(float* a, float v) { return gpusmd_atomic_update(a, v, 0); }
inline double atomicAdd(double* a, double v) { return gpusmd_atomic_update(a, v, 0); }
inline float atomicMin(float* a, float v) { return gpusmd_atomic_update(a, v, 1); }
inline float atomicMax(float* a, float v) { return gpusmd_atomic_update(a, v, 2); }
inline float atomicExch(float* a, float v)
{
    float old;
    __atomic_exchange(a, &v, &old, __ATOMIC_SEQ_CST);
    return old;
}
inline unsigned int atomicInc(unsigned int* a, unsigned int limit)
{
    unsigned int old = *a, desired;
    do {
        desired = old >= limit ? 0u : old + 1u;
    } while (!__atomic_compare_exchange_n(a, &old, desired, false, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
    return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- the execution engine -----------------------------------------------------------
namespace gpusmd_host {

// A barrier whose party count shrinks as threads leave (exit the kernel). Arrivals are
// counted under a mutex; waiters sleep on the generation counter (futex), so a release
// wakes them without a mutex hand-off.
class Barrier {
  public:
    void reset(int parties)
    {
        std::lock_guard<std::mutex> lock(m_);
        expected_ = parties;
        arrived_ = 0;
    }
    void wait()
    {
        std::unique_lock<std::mutex> lock(m_);
        const unsigned int generation = generation_.load(std::memory_order_relaxed);
        if (++arrived_ >= expected_) {
            release(lock, generation);
            return;
        }
        lock.unlock();
        generation_.wait(generation, std::memory_order_acquire);
    }
    void leave()
    {
        std::unique_lock<std::mutex> lock(m_);
        --expected_;
        if (arrived_ > 0 && arrived_ >= expected_)
            release(lock, generation_.load(std::memory_order_relaxed));
    }

  private:
    void release(std::unique_lock<std::mutex>& lock, unsigned int generation)
    {
        arrived_ = 0;
        generation_.store(generation + 1, std::memory_order_release);
        lock.unlock();
        generation_.notify_all();
    }
    std::mutex m_;
    int expected_ = 0;
    int arrived_ = 0;
    std::atomic<unsigned int> generation_{0};
};

struct Warp {
    Barrier barrier;
    unsigned long long slot[32];
    bool live[32];    // false once a lane has exited the kernel
    int lanes = 32;   // lanes at block start (the last warp may be partial)
};

struct Block {
    Barrier barrier;
    std::vector<Warp> warps;
};

struct ThreadContext {
    Block* block = nullptr;
    int linear = 0;   // linear thread index in the block
};

inline thread_local ThreadContext context;
inline void* dynamic_shared = nullptr;   // extern __shared__ arrays point here
inline std::mutex launch_mutex;          // one launch at a time per module
inline std::string last_error;

[[noreturn]] inline void no_sync_context(const char* what)
{
    std::fprintf(stderr,
                 "gpusmd host kernel: %s called in a sequential launch; the loader "
                 "did not see the kernel synchronise (launch it threaded)\n",
                 what);
    std::abort();
}

inline Warp& my_warp(const char* what)
{
    if (!context.block) no_sync_context(what);
    return context.block->warps[context.linear / 32];
}

template <class T> inline T exchange(T value, int (*source)(int lane, int arg), int arg,
                                     const char* what)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                  "warp shuffles of types up to 8 bytes");
    Warp& w = my_warp(what);
    const int lane = context.linear % 32;
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    w.slot[lane] = bits;
    w.barrier.wait();
    const int src = source(lane, arg);
    T result = value;
    if (src >= 0 && src < w.lanes && w.live[src]) std::memcpy(&result, &w.slot[src], sizeof(T));
    w.barrier.wait();
    return result;
}

inline unsigned int vote(int predicate, const char* what)
{
    Warp& w = my_warp(what);
    const int lane = context.linear % 32;
    w.slot[lane] = predicate ? 1ull : 0ull;
    w.barrier.wait();
    unsigned int mask = 0;
    for (int l = 0; l < w.lanes; ++l)
        if (w.live[l] && w.slot[l]) mask |= 1u << l;
    w.barrier.wait();
    return mask;
}

inline unsigned int lanes_mask(int lanes)
{
    return lanes >= 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}

inline uint3 unflatten(unsigned long long i, dim3 d)
{
    return uint3{(unsigned int)(i % d.x), (unsigned int)((i / d.x) % d.y),
                 (unsigned int)(i / ((unsigned long long)d.x * d.y))};
}

// Run `kernel` (a callable that calls the __global__ function) over grid x block.
template <class Kernel>
void launch(dim3 grid, dim3 block, size_t shared_bytes, bool threaded, Kernel&& kernel)
{
    std::lock_guard<std::mutex> guard(launch_mutex);
    last_error.clear();
    try {
        const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
        const int nthreads = (int)((unsigned long long)block.x * block.y * block.z);
        if (nblocks == 0 || nthreads == 0) return;
        gridDim = grid;
        blockDim = block;
        std::vector<std::max_align_t> shared((shared_bytes + sizeof(std::max_align_t) - 1) /
                                             sizeof(std::max_align_t) + 1);
        dynamic_shared = shared.data();
        if (!threaded) {
            context = ThreadContext{};
            for (unsigned long long b = 0; b < nblocks; ++b) {
                blockIdx = unflatten(b, grid);
                for (int t = 0; t < nthreads; ++t) {
                    threadIdx = unflatten((unsigned long long)t, block);
                    kernel();
                }
            }
            dynamic_shared = nullptr;
            return;
        }
        Block blk;
        blk.warps = std::vector<Warp>((nthreads + 31) / 32);
        auto reset = [&]() noexcept {
            blk.barrier.reset(nthreads);
            for (size_t w = 0; w < blk.warps.size(); ++w) {
                blk.warps[w].lanes = std::min(32, nthreads - 32 * (int)w);
                blk.warps[w].barrier.reset(blk.warps[w].lanes);
                std::fill(std::begin(blk.warps[w].live), std::end(blk.warps[w].live), true);
            }
        };
        reset();
        std::barrier block_end(nthreads, reset);
        auto worker = [&](int t) {
            context = ThreadContext{&blk, t};
            threadIdx = unflatten((unsigned long long)t, block);
            for (unsigned long long b = 0; b < nblocks; ++b) {
                blockIdx = unflatten(b, grid);
                kernel();
                // the thread has exited the kernel: stop counting it at the barriers
                blk.warps[t / 32].live[t % 32] = false;
                blk.warps[t / 32].barrier.leave();
                blk.barrier.leave();
                block_end.arrive_and_wait();
            }
            context = ThreadContext{};
        };
        std::vector<std::thread> threads;
        threads.reserve(nthreads - 1);
        for (int t = 1; t < nthreads; ++t) threads.emplace_back(worker, t);
        worker(0);
        for (auto& th : threads) th.join();
        dynamic_shared = nullptr;
    } catch (const std::exception& e) {
        last_error = e.what();
    }
}

}  // namespace gpusmd_host

// ---- synchronisation and warp built-ins ----------------------------------------------
inline void __syncthreads()
{
    if (!gpusmd_host::context.block) gpusmd_host::no_sync_context("__syncthreads");
    gpusmd_host::context.block->barrier.wait();
}
inline int __syncthreads_count(int predicate)
{
    static std::atomic<int> count;   // shared by the block: reset, count, read
    if (!gpusmd_host::context.block) gpusmd_host::no_sync_context("__syncthreads_count");
    auto& bar = gpusmd_host::context.block->barrier;
    if (gpusmd_host::context.linear == 0) count = 0;
    bar.wait();
    if (predicate) ++count;
    bar.wait();
    const int result = count;
    bar.wait();
    return result;
}
inline int __syncthreads_or(int predicate) { return __syncthreads_count(predicate) != 0; }
inline int __syncthreads_and(int predicate)
{
    const int n = (int)(blockDim.x * blockDim.y * blockDim.z);
    return __syncthreads_count(predicate) == n;
}
inline void __syncwarp(unsigned int = 0xffffffffu)
{
    gpusmd_host::my_warp("__syncwarp").barrier.wait();
}
inline unsigned int __activemask()
{
    return gpusmd_host::lanes_mask(gpusmd_host::my_warp("__activemask").lanes);
}
inline unsigned int __ballot_sync(unsigned int, int predicate)
{
    return gpusmd_host::vote(predicate, "__ballot_sync");
}
inline int __any_sync(unsigned int, int predicate)
{
    return gpusmd_host::vote(predicate, "__any_sync") != 0;
}
inline int __all_sync(unsigned int, int predicate)
{
    const unsigned int m = gpusmd_host::vote(predicate, "__all_sync");
    return m == gpusmd_host::lanes_mask(gpusmd_host::my_warp("__all_sync").lanes);
}
// Shuffles: `width` splits the warp into segments, as on the GPU; a source lane out of
// the segment (or past the live lanes of a partial warp) returns the caller's value.
template <class T> inline T __shfl_sync(unsigned int, T var, int src, int width = 32)
{
    return gpusmd_host::exchange(var, [](int lane, int a) {
        const int w = a >> 8, s = a & 0xff;
        return (lane / w) * w + (s % w);
    }, (width << 8) | (src & 0xff), "__shfl_sync");
}
template <class T> inline T __shfl_up_sync(unsigned int, T var, unsigned int delta, int width = 32)
{
    return gpusmd_host::exchange(var, [](int lane, int a) {
        const int w = a >> 8, d = a & 0xff;
        return (lane % w) >= d ? lane - d : lane;
    }, (width << 8) | (int)(delta & 0xff), "__shfl_up_sync");
}
template <class T> inline T __shfl_down_sync(unsigned int, T var, unsigned int delta, int width = 32)
{
    return gpusmd_host::exchange(var, [](int lane, int a) {
        const int w = a >> 8, d = a & 0xff;
        return (lane % w) + d < w ? lane + d : lane;
    }, (width << 8) | (int)(delta & 0xff), "__shfl_down_sync");
}
template <class T> inline T __shfl_xor_sync(unsigned int, T var, int mask, int width = 32)
{
    return gpusmd_host::exchange(var, [](int lane, int a) {
        const int w = a >> 8, m = a & 0xff;
        const int src = lane ^ m;
        return (src / w) == (lane / w) ? src : lane;
    }, (width << 8) | (mask & 0xff), "__shfl_xor_sync");
}

#endif  // !__CUDACC__ && !__CUDACC_RTC__
