// Host emulation of the CUDA runtime/device features the tgvkv kernels use (see ../README.md).
//
// A launch runs its blocks one after another; the blockDim.x threads of a block are fibers
// (ucontext coroutines with their own stacks) on the calling OS thread, switched at every barrier:
// a thread runs until its next __syncthreads / __syncwarp / shuffle, then the next thread runs.
// The run order alternates between passes (thread 0 first, then thread n-1 first), so a missing
// barrier shows up as a wrong result deterministically wherever a later thread's write is read.
// A warp's shuffles go through a per-warp exchange buffer between two warp barriers. A barrier
// that is not reached by every thread (divergent __syncthreads / __syncwarp, an early return
// before a barrier) is reported as a deadlock at once and aborts the process.
//
// C++17 (as the extension); no torch. Only what the kernels use is defined: a kernel using
// something else fails to compile here, which is the cue to extend this file.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <memory>
#include <vector>
#include <stdlib.h>  // posix_memalign
#include <sys/mman.h>
#include <ucontext.h>

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

class Barrier;

// One emulated CUDA thread of the running block.
struct Fiber {
  ucontext_t ctx;
  unsigned t = 0;
  int or_parity = 0;
  const Barrier* waiting = nullptr;  // the barrier it waits at, and that barrier's generation
  uint64_t wait_gen = 0;
  bool done = false;
  void* fake_stack = nullptr;  // AddressSanitizer's fiber bookkeeping
};

inline dim3 tIdx, bIdx, bDim, gDim;
inline Fiber* cur = nullptr;      // the fiber running now (nullptr: the scheduler)
inline ucontext_t sched_ctx;
inline const void* sched_stack = nullptr;  // the scheduler's stack (for ASan's fiber switches)
inline size_t sched_stack_size = 0;

#if defined(__SANITIZE_ADDRESS__)
}  // namespace emu
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                size_t* size_old);
namespace emu {
inline void asan_start(void** save, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(save, bottom, size);
}
inline void asan_finish(void* save, const void** bottom, size_t* size) {
  __sanitizer_finish_switch_fiber(save, bottom, size);
}
#else
inline void asan_start(void**, const void*, size_t) {}
inline void asan_finish(void*, const void**, size_t*) {}
#endif

// From the running fiber back to the scheduler.
inline void yield_to_scheduler() {
  Fiber* f = cur;
  asan_start(&f->fake_stack, sched_stack, sched_stack_size);
  swapcontext(&f->ctx, &sched_ctx);
  asan_finish(f->fake_stack, &sched_stack, &sched_stack_size);
}

// A reusable barrier of n threads: arriving records the arrival and yields; the scheduler resumes
// the waiters once all n have arrived (the generation moved on).
class Barrier {
 public:
  Barrier(int n, const char* what) : n_(n), left_(n), what_(what) {}
  void wait() {
    if (cur == nullptr) std::abort();
    cur->waiting = this;
    cur->wait_gen = gen_;
    if (--left_ == 0) {
      left_ = n_;
      ++gen_;
    }
    yield_to_scheduler();
  }
  bool released(uint64_t gen) const { return gen_ != gen; }
  int arrived() const { return n_ - left_; }
  int size() const { return n_; }
  const char* what() const { return what_; }

 private:
  const int n_;
  int left_;
  uint64_t gen_ = 0;
  const char* what_;
};

inline Barrier* block_bar = nullptr;
inline std::vector<std::unique_ptr<Barrier>> warp_bars;
inline uint64_t warp_buf[32][32];  // [warp][lane] shuffle exchange (<= 1024 threads)
inline std::atomic<int> or_acc[2];
inline int or_parity = 0;          // the running fiber's (saved and restored at each switch)
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

// Per-thread stacks: 256 KiB each (WMMA fragments live on them) with a guard page below, mapped
// once per launch without reserving memory up front.
constexpr size_t kStack = size_t{256} << 10;
constexpr size_t kGuard = 4096;

struct Stacks {
  char* base = nullptr;
  size_t bytes = 0;
  explicit Stacks(unsigned n) : bytes(size_t(n) * (kStack + kGuard)) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) fail("cannot map the fibers' stacks");
    base = static_cast<char*>(p);
    for (unsigned i = 0; i < n; ++i) mprotect(base + i * (kStack + kGuard), kGuard, PROT_NONE);
  }
  ~Stacks() { munmap(base, bytes); }
  char* stack(unsigned i) const { return base + i * (kStack + kGuard) + kGuard; }
};

inline void (*body_fn)(void*) = nullptr;
inline void* body_arg = nullptr;

inline void fiber_entry() {
  Fiber* f = cur;
  asan_finish(nullptr, &sched_stack, &sched_stack_size);
  body_fn(body_arg);
  f->done = true;
  asan_start(nullptr, sched_stack, sched_stack_size);  // this fiber's stack is finished
  swapcontext(&f->ctx, &sched_ctx);
  fail("a finished fiber was resumed");
}

[[noreturn]] inline void report_deadlock(const std::vector<Fiber>& fibers) {
  int done = 0;
  const Barrier* b = nullptr;
  for (const Fiber& f : fibers) {
    if (f.done) ++done;
    else if (b == nullptr) b = f.waiting;
  }
  std::fprintf(stderr, "emu: deadlock at a %s barrier (%d of %d threads arrived, %d of the block's "
               "%zu threads returned): a barrier not reached by every thread\n",
               b ? b->what() : "?", b ? b->arrived() : 0, b ? b->size() : 0, done, fibers.size());
  std::abort();
}

// kernel<<<grid, block, smem>>>: runs body() for every block of the grid (x fastest), block.x
// threads each (1-d blocks only). The dynamic shared memory is poisoned (0x7f bytes) before every
// block, so reading it before writing gives garbage, not zeros.
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, F body) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid launched (a launch error on CUDA)");
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024) fail("unsupported block shape");
  if (grid.y > 65535 || grid.z > 65535) fail("grid.y / grid.z above 65535");
  if (cur != nullptr) fail("a launch from inside a kernel");
  gDim = grid;
  bDim = block;
  const unsigned nt = block.x;
  const size_t smem_alloc = smem > 0 ? smem : 1;  // exact: a sanitizer build sees overruns
  void* mem = nullptr;
  if (posix_memalign(&mem, 128, smem_alloc) != 0) fail("out of memory");
  std::unique_ptr<char, void (*)(void*)> dyn(static_cast<char*>(mem), std::free);
  dyn_smem = dyn.get();
  Barrier bar(int(nt), "__syncthreads");
  block_bar = &bar;
  warp_bars.clear();
  for (unsigned w = 0; w < (nt + 31) / 32; ++w)
    warp_bars.emplace_back(new Barrier(int(std::min(32u, nt - 32 * w)), "warp"));
  Stacks stacks(nt);
  std::vector<Fiber> fibers(nt);
  body_fn = [](void* p) { (*static_cast<F*>(p))(); };
  body_arg = &body;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(dyn_smem, 0x7f, smem_alloc);
        or_acc[0] = 0;
        or_acc[1] = 0;
        bIdx = dim3(x, y, z);
        for (unsigned t = 0; t < nt; ++t) {
          Fiber& f = fibers[t];
          f = Fiber();
          f.t = t;
          if (getcontext(&f.ctx) != 0) fail("getcontext failed");
          f.ctx.uc_stack.ss_sp = stacks.stack(t);
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        unsigned left = nt;
        for (unsigned pass = 0; left > 0; ++pass) {
          bool progressed = false;
          for (unsigned k = 0; k < nt; ++k) {
            Fiber& f = fibers[pass % 2 == 0 ? k : nt - 1 - k];
            if (f.done || (f.waiting != nullptr && !f.waiting->released(f.wait_gen))) continue;
            f.waiting = nullptr;
            cur = &f;
            tIdx = dim3(f.t, 0, 0);
            or_parity = f.or_parity;
            void* sched_fake = nullptr;
            asan_start(&sched_fake, f.ctx.uc_stack.ss_sp, kStack);
            swapcontext(&sched_ctx, &f.ctx);
            asan_finish(sched_fake, nullptr, nullptr);
            f.or_parity = or_parity;
            cur = nullptr;
            progressed = true;
            if (f.done) --left;
          }
          if (!progressed) report_deadlock(fibers);
        }
      }
  block_bar = nullptr;
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
