// Host emulation of the CUDA runtime/device features the tgvkv kernels use (see ../README.md).
//
// A launch runs its blocks one after another; the blockDim.x threads of a block are real
// std::threads (created once per launch and reused for every block), __syncthreads is a real
// barrier, a warp's shuffles go through a per-warp exchange buffer between two warp barriers.
// A barrier that is not reached by every thread (divergent __syncthreads / __syncwarp, an early
// return before a barrier) is reported as a deadlock and aborts the process.
//
// C++17 (as the extension); no torch. Only what the kernels use is defined: a kernel using
// something else fails to compile here, which is the cue to extend this file.
#pragma once
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#include <stdlib.h>  // posix_memalign
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <climits>
#include <ctime>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) alignas(n)
// Static shared memory: a function-local static is one object per kernel instantiation, shared by
// every thread; blocks run one at a time, so it is per block. (`extern __shared__` arrays are
// rewritten by build.py into pointers to the launch's dynamic shared memory.)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = 132; return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return 0; }
// Device memory is host memory here, and a launch runs to completion before it returns.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return 0;
}

namespace emu {

// Seconds a thread may wait at a barrier before the emulator declares a deadlock.
constexpr int kDeadlockSeconds = 60;

// A reusable barrier of n threads. On Linux the waiters sleep on a futex of the generation word
// (woken all at once, no mutex to re-acquire: 256 threads on 2 cores stay cheap); elsewhere a
// mutex + condition variable.
class Barrier {
 public:
  Barrier(int n, const char* what) : n_(n), left_(n), what_(what) {}
  void wait() {
    const uint32_t gen = gen_.load(std::memory_order_acquire);  // read before arriving
    if (left_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      left_.store(n_, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      wake_all();
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    while (gen_.load(std::memory_order_acquire) == gen) {
      sleep_while(gen);
      if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(kDeadlockSeconds)) {
        std::fprintf(stderr, "emu: deadlock at a %s barrier (%d of %d threads arrived): a "
                     "barrier not reached by every thread\n", what_, n_ - left_.load(), n_);
        std::abort();
      }
    }
  }

 private:
#ifdef __linux__
  void wake_all() {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
  }
  void sleep_while(uint32_t gen) {
    timespec ts{1, 0};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, gen, &ts, nullptr, 0);
  }
#else
  void wake_all() {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
  void sleep_while(uint32_t gen) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait_for(lk, std::chrono::seconds(1), [&] { return gen_.load() != gen; });
  }
  std::mutex mu_;
  std::condition_variable cv_;
#endif
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");
  const int n_;
  std::atomic<int> left_;
  std::atomic<uint32_t> gen_{0};
  const char* what_;
};

inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline Barrier* block_bar = nullptr;
inline std::vector<std::unique_ptr<Barrier>> warp_bars;
inline uint64_t warp_buf[32][32];  // [warp][lane] shuffle exchange (<= 1024 threads)
inline std::atomic<int> or_acc[2];
inline thread_local int or_parity = 0;
inline char* dyn_smem = nullptr;   // the launch's dynamic shared memory (128-byte aligned)

inline void fail(const char* msg) {
  std::fprintf(stderr, "emu: %s\n", msg);
  std::abort();
}
}  // namespace emu

#define threadIdx (emu::tIdx)
#define blockIdx (emu::bIdx)
#define blockDim (emu::bDim)
#define gridDim (emu::gDim)
#define emu_dyn_smem (emu::dyn_smem)

inline void __syncthreads() { emu::block_bar->wait(); }
inline int __syncthreads_or(int p) {
  // two accumulators used alternately, so the reset of one never races with the next call
  const int k = emu::or_parity;
  emu::or_parity ^= 1;
  if (p) emu::or_acc[k].fetch_or(1);
  emu::block_bar->wait();
  const int r = emu::or_acc[k].load();
  emu::block_bar->wait();
  if (threadIdx.x == 0) emu::or_acc[k].store(0);
  return r;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::warp_bars[threadIdx.x / 32]->wait();
}

template <typename T>
inline T emu_shfl(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu) emu::fail("shuffle with a partial mask is not emulated");
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  emu::warp_buf[w][lane] = u;
  emu::warp_bars[w]->wait();
  const uint64_t r = emu::warp_buf[w][src];
  emu::warp_bars[w]->wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int o, int width = 32) {
  const int lane = threadIdx.x % 32, src = lane ^ o;
  // a source outside the caller's width-segment returns the caller's own value (as CUDA)
  return emu_shfl(mask, v, (src / width == lane / width) ? src : lane);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned o, int width = 32) {
  const int lane = threadIdx.x % 32;
  return emu_shfl(mask, v, (lane % width) >= int(o) ? lane - int(o) : lane);
}

// Read-only global loads; vector loads must be aligned to their size (checked, as the hardware
// would fault on a misaligned 16-byte load).
template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::fail("misaligned __ldg");
  return *p;
}
// L2 loads (bypassing L1): plain loads here, where there is no cache to bypass.
template <typename T>
inline T __ldcg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::fail("misaligned __ldcg");
  return *p;
}
// Device-wide memory fence (blocks run one at a time here; the threads of a block are real
// threads, so it is a real fence).
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;  // never contracted into an FMA
  return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  unsigned long long cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return cur;
}

namespace emu {

// kernel<<<grid, block, smem>>>: runs body() for every block of the grid (x fastest), block.x
// threads each (1-d blocks only). The dynamic shared memory is poisoned (0x7f bytes) before every
// block, so reading it before writing gives garbage, not zeros.
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F body) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid launched (a launch error on CUDA)");
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024) fail("unsupported block shape");
  if (grid.y > 65535 || grid.z > 65535) fail("grid.y / grid.z above 65535");
  gDim = grid;
  bDim = block;
  const unsigned nt = block.x;
  const size_t smem_alloc = smem > 0 ? smem : 1;  // exact: a sanitizer build sees overruns
  void* mem = nullptr;
  if (posix_memalign(&mem, 128, smem_alloc) != 0) fail("out of memory");
  std::unique_ptr<char, void (*)(void*)> dyn(static_cast<char*>(mem), std::free);
  dyn_smem = dyn.get();
  Barrier bar(int(nt), "__syncthreads"), edge(int(nt), "block-end");
  block_bar = &bar;
  warp_bars.clear();
  for (unsigned w = 0; w < (nt + 31) / 32; ++w)
    warp_bars.emplace_back(new Barrier(int(std::min(32u, nt - 32 * w)), "warp"));
  std::vector<std::thread> th;
  th.reserve(nt);
  for (unsigned t = 0; t < nt; ++t)
    th.emplace_back([&, t] {
      tIdx = dim3(t, 0, 0);
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            if (t == 0) {
              std::memset(dyn_smem, 0x7f, smem_alloc);
              or_acc[0] = 0;
              or_acc[1] = 0;
            }
            edge.wait();  // the block's setup is done
            bIdx = dim3(x, y, z);
            or_parity = 0;
            body();
            edge.wait();  // every thread of the block has returned
          }
    });
  for (auto& t : th) t.join();
  dyn_smem = nullptr;
}

// `kernel<<<grid, block, smem, stream>>>(args);` as build.py rewrites it in the staged headers:
// `emu::Launch(grid, block, smem, stream) << [&] { kernel(args); };` (the stream is ignored:
// launches run in program order anyway).
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
  template <typename F>
  void operator<<(F body) const { launch(grid, block, smem, body); }
};
}  // namespace emu
