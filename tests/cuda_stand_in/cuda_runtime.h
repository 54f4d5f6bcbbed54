// A stand-in for the CUDA runtime and the device intrinsics, so that CUDA device code compiles with a
// host C++20 compiler and runs on the CPU, under AddressSanitizer, UndefinedBehaviorSanitizer or
// ThreadSanitizer (tests/test_cuda_emulated.py). Kernels are included unmodified; only what they
// use is here, in the semantics of the CUDA programming guide:
//
// - A CUDA thread is a fiber (ucontext). The threads of a block run on one OS thread, one at a time,
//   each until it waits at a barrier (__syncthreads, __syncwarp, a warp shuffle) or returns; which
//   ready thread runs next is a launch option (forward, reverse, or a seeded shuffle), so results
//   that depend on the order show up as differences between runs.
// - Blocks run concurrently on `slots` worker threads, block i on worker i % slots. `__shared__`
//   variables are `static thread_local`: a worker's thread storage is the shared-memory arena of
//   the block it runs.
// - Global memory is what emu::Memory handed out; `__isGlobal` is true only inside it, and
//   `__builtin_assume` checks its condition. A view's bytes before its start are poisoned for
//   AddressSanitizer, the allocation ends where the view does, so any access outside it is reported.
// - Exited threads leave the block's barriers (as on sm_70 and later); a barrier reached at two
//   different places, a shuffle with exited lanes, or a deadlock is an error.
// - Under ThreadSanitizer every CUDA thread is a TSan fiber, switched without synchronisation: the
//   only happens-before edges are barriers, atomics, fences and kernel boundaries (and the order of
//   the blocks one worker runs), so a missing __syncthreads, or a plain store that other threads or
//   blocks read, is a race report. TSan does not model fences: __threadfence is a release and an
//   acquire on one global object, which orders every fenced access of every block (an
//   over-approximation: fence-based ordering is trusted).
//
// What it cannot show: warp-synchronous behaviour (no lockstep), the GPU's memory model beyond the
// above, PTX or register effects, performance, and the host glue (launchers, streams).
#pragma once

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <bit>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <math.h>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define EMU_TSAN 1
#endif
#endif
#if defined(EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

// Device code takes its device branches (`#if defined(__CUDA_ARCH__)`), with the intrinsics below.
#define __CUDA_ARCH__ 900
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__ static

namespace emu {

inline std::string where();  // the CUDA thread running, if any

[[noreturn]] inline void fail(const char* format, ...) {
  std::fflush(stdout);
  std::fputs("EMU ERROR: ", stderr);
  std::fputs(where().c_str(), stderr);
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  std::abort();
}

struct Dim3 {
  unsigned x, y, z;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr unsigned size() const { return x * y * z; }
  constexpr Dim3 at(unsigned linear) const { return Dim3(linear % x, linear / x % y, linear / (x * y)); }
};

// -- global memory -------------------------------------------------------------------------------

// Device allocations. Made and freed between launches only, so launches read the table without a lock
// (a lock would be a happens-before edge between blocks for ThreadSanitizer).
class Memory {
 public:
  static Memory& get() {
    static Memory memory;
    return memory;
  }
  // `bytes` of device memory whose first byte is `lead` bytes into an allocation that ends with it
  // (a view that starts inside its buffer). The lead is poisoned for AddressSanitizer.
  void* alloc(size_t lead, size_t bytes) {
    void* base = nullptr;
    if (posix_memalign(&base, 256, lead + bytes + (lead + bytes == 0)) != 0) fail("out of host memory");
#if defined(EMU_ASAN)
    if (lead > 0) ASAN_POISON_MEMORY_REGION(base, lead);
#endif
    ranges_.push_back({reinterpret_cast<uintptr_t>(base), lead + bytes});
    std::sort(ranges_.begin(), ranges_.end(), [](const Range& a, const Range& b) { return a.base < b.base; });
    return static_cast<char*>(base) + lead;
  }
  // Inside an allocation, its one-past-the-end address included (as on the GPU, where any address of
  // the global window is global; the allocation is the stricter check).
  bool contains(const void* ptr) const {
    const auto p = reinterpret_cast<uintptr_t>(ptr);
    if (p == 0) return false;
    auto it = std::upper_bound(ranges_.begin(), ranges_.end(), p, [](uintptr_t v, const Range& r) { return v < r.base; });
    if (it == ranges_.begin()) return false;
    --it;
    return p <= it->base + it->bytes;
  }
  void release_all() {
    for (const auto& r : ranges_) {
#if defined(EMU_ASAN)
      ASAN_UNPOISON_MEMORY_REGION(reinterpret_cast<void*>(r.base), r.bytes);
#endif
      std::free(reinterpret_cast<void*>(r.base));
    }
    ranges_.clear();
  }

 private:
  struct Range {
    uintptr_t base;
    size_t bytes;
  };
  std::vector<Range> ranges_;
};

// -- launch options ------------------------------------------------------------------------------

enum class Order { Forward, Reverse, Shuffle };

struct Options {
  unsigned slots = 1;  // blocks that run at the same time
  Order order = Order::Forward;
  uint64_t seed = 0;  // of Order::Shuffle
  size_t stack_bytes = 64 * 1024;  // per CUDA thread
};
inline Options& options() {
  static Options o;
  return o;
}

// -- threads as fibers ---------------------------------------------------------------------------
//
// Workers are OS threads that live as long as the process: each runs blocks, one at a time, with a
// fiber per CUDA thread (their contexts, stacks and TSan fiber states are kept and reused). What a
// block's threads read of the block (indices, dimensions, the kernel) is set up fresh for each
// block and freed only after the kernel boundary.
//
// ThreadSanitizer's view. A worker's scheduler is ordered with the host (launch and completion),
// never with its fibers: it switches to them without synchronisation and reads their requests
// through relaxed atomics. A CUDA thread starts after the launch (`launch_start`) and after the
// setup of its block; the kernel boundary follows every thread's exit (`launch_end`). Blocks run by
// the same worker are ordered (`slot`, which makes the reuse of its stacks and of its shared-memory
// arena clean), so races between two blocks show when they run on different workers; within a
// block, only barriers order the threads.

enum class Request : int { None, Block, Warp, Exit };

struct Worker;

// Sync objects of ThreadSanitizer annotations; never read or written as data.
struct SyncPair {
  char at[2];
};

// What a CUDA thread of a block knows of itself; written by the scheduler before the block starts,
// then by the thread only.
struct ThreadInfo {
  Dim3 tid;
  unsigned linear = 0;
  unsigned block_syncs = 0;  // barriers passed: which of two sync objects the next one uses
  unsigned warp_syncs = 0;
  const void* sched_bottom = nullptr;  // the scheduler's stack (AddressSanitizer's fiber switches)
  size_t sched_size = 0;
};

struct Block {
  Dim3 idx, dim, grid;
  const void* kernel = nullptr;  // the launch (a Launch<...>)
  void (*call)(const void*) = nullptr;
  std::vector<ThreadInfo> threads;
  SyncPair block_sync;
  std::vector<SyncPair> warp_sync;
  std::vector<uint64_t> shuffle;  // [warp][2][32] values of the warp shuffles
  unsigned parity = 0;            // of the block's rank among its worker's blocks
  char setup = 0;                 // sync object: the setup above happens before the threads start
};

// A worker's fiber for thread index i of whatever block it runs.
struct Fiber {
  ucontext_t context;
  Worker* worker = nullptr;
  char* stack = nullptr;
  void* tsan = nullptr;
  std::atomic<int> request{0};
  std::atomic<const char*> file{nullptr};
  std::atomic<int> line{0};
};

inline thread_local std::atomic<Fiber*> current_fiber{nullptr};
inline thread_local std::atomic<ThreadInfo*> current_thread{nullptr};
inline thread_local std::atomic<Block*> current_block{nullptr};

inline char launch_start, launch_end;  // sync objects of the kernel boundaries

inline ThreadInfo& self() {
  ThreadInfo* t = current_thread.load(std::memory_order_relaxed);
  if (t == nullptr) fail("device code called outside a kernel launch");
  return *t;
}
inline Block& this_block() { return *current_block.load(std::memory_order_relaxed); }

inline std::string where() {
  const ThreadInfo* t = current_thread.load(std::memory_order_relaxed);
  if (t == nullptr) return "";
  const Block& b = this_block();
  char text[96];
  std::snprintf(text, sizeof text, "block (%u,%u,%u), thread (%u,%u,%u): ", b.idx.x, b.idx.y, b.idx.z, t->tid.x, t->tid.y,
                t->tid.z);
  return text;
}

inline void tsan_release(void* p) {
#if defined(EMU_TSAN)
  __tsan_release(p);
#else
  (void)p;
#endif
}
inline void tsan_acquire(void* p) {
#if defined(EMU_TSAN)
  __tsan_acquire(p);
#else
  (void)p;
#endif
}

// A worker's fiber stacks, one mapping with a guard page below each stack.
class Stacks {
 public:
  Stacks(unsigned count, size_t bytes) : count_(count), stride_(round(bytes) + page()) {
    size_ = count_ * stride_;
    void* mem = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) fail("cannot map %zu bytes of fiber stacks", size_);
    base_ = static_cast<char*>(mem);
    for (unsigned i = 0; i < count_; ++i) mprotect(base_ + i * stride_, page(), PROT_NONE);
  }
  ~Stacks() { munmap(base_, size_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  unsigned count() const { return count_; }
  char* bottom(unsigned i) const { return base_ + i * stride_ + page(); }
  size_t bytes() const { return stride_ - page(); }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  static size_t round(size_t b) { return (b + page() - 1) / page() * page(); }
  unsigned count_;
  size_t stride_, size_ = 0;
  char* base_ = nullptr;
};

// The blocks of one launch: block i runs on worker i % slots (neighbouring blocks, such as those of
// one tensor, on different workers, the same ones on every run).
struct Grid {
  Dim3 grid, block;
  const void* kernel;
  void (*call)(const void*);
  unsigned slots;
  std::vector<std::vector<std::unique_ptr<Block>>> done;  // per worker, freed after the boundary
};

void run_block(Worker& w, Block& b);

struct Worker {
  explicit Worker(unsigned index_) : index(index_), thread([this] { loop(); }) {}
  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    wake.notify_all();
    thread.join();
  }
  void start(Grid* g) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      grid = g;
      busy = true;
    }
    wake.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    wake.wait(lock, [&] { return !busy; });
  }

  // Fibers and stacks for blocks of `threads` threads (between launches, on the worker's thread).
  void prepare(unsigned threads) {
    if (stacks && stacks->count() >= threads && stacks->bytes() >= options().stack_bytes) return;
    stacks.reset();
    stacks = std::make_unique<Stacks>(std::max(threads, 32u), options().stack_bytes);
    while (fibers.size() < stacks->count()) {
      auto f = std::make_unique<Fiber>();
      f->worker = this;
#if defined(EMU_TSAN)
      f->tsan = __tsan_create_fiber(0);
#endif
      fibers.push_back(std::move(f));
    }
    for (unsigned i = 0; i < stacks->count(); ++i) fibers[i]->stack = stacks->bottom(i);
  }

  void loop() {
#if defined(EMU_TSAN)
    sched_tsan = __tsan_get_current_fiber();
#endif
    for (;;) {
      Grid* g;
      {
        std::unique_lock<std::mutex> lock(mutex);
        wake.wait(lock, [&] { return stop || grid != nullptr; });
        if (stop) return;
        g = grid;
      }
      prepare(g->block.size());
      const unsigned blocks = g->grid.size();
      for (unsigned i = index; i < blocks; i += g->slots) {
        auto b = std::make_unique<Block>();
        b->idx = g->grid.at(i);
        b->dim = g->block;
        b->grid = g->grid;
        b->kernel = g->kernel;
        b->call = g->call;
        b->parity = blocks_run++ & 1u;
        run_block(*this, *b);
        g->done[index].push_back(std::move(b));
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        grid = nullptr;
        busy = false;
      }
      wake.notify_all();
    }
  }

  unsigned index;
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::unique_ptr<Stacks> stacks;
  ucontext_t sched;
  void* sched_tsan = nullptr;
  // Sync objects ordering the blocks this worker runs: the threads of a block release one at their
  // exit and acquire the other at their start, so a block follows the blocks before it on this
  // worker, while its own threads stay unordered with one another.
  SyncPair slot;
  unsigned blocks_run = 0;
  std::mutex mutex;
  std::condition_variable wake;
  Grid* grid = nullptr;
  bool busy = false, stop = false;
  std::thread thread;
};

// Fiber -> its scheduler, after posting a request.
inline void yield(Fiber& f, ThreadInfo& t, Request r) {
  Worker& w = *f.worker;
  void* const sched_tsan = w.sched_tsan;
  f.request.store(static_cast<int>(r), std::memory_order_relaxed);
  if (r == Request::Exit) {  // after the thread's last access to what the host frees at the boundary
    tsan_release(&w.slot.at[this_block().parity]);
    tsan_release(&launch_end);
  }
#if defined(EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(r == Request::Exit ? nullptr : &fake, t.sched_bottom, t.sched_size);
#else
  (void)t;
#endif
#if defined(EMU_TSAN)
  __tsan_switch_to_fiber(sched_tsan, __tsan_switch_to_fiber_no_sync);
#else
  (void)sched_tsan;
#endif
  swapcontext(&f.context, &w.sched);
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void fiber_main(unsigned hi, unsigned lo) {
  Fiber& f = *reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
  ThreadInfo& t = *current_thread.load(std::memory_order_relaxed);
  Block& b = *current_block.load(std::memory_order_relaxed);
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &t.sched_bottom, &t.sched_size);
#endif
  tsan_acquire(&b.setup);
  tsan_acquire(&launch_start);
  tsan_acquire(&f.worker->slot.at[b.parity ^ 1u]);  // the blocks this worker ran before
  b.call(b.kernel);
  yield(f, t, Request::Exit);
  fail("a finished CUDA thread was resumed");
}

// Scheduler -> fiber; returns when the fiber waits or exits.
inline void resume(Worker& w, Block& b, unsigned i) {
  Fiber& f = *w.fibers[i];
  current_fiber.store(&f, std::memory_order_relaxed);
  current_thread.store(&b.threads[i], std::memory_order_relaxed);
  current_block.store(&b, std::memory_order_relaxed);
#if defined(EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, w.stacks->bytes());
#endif
#if defined(EMU_TSAN)
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&w.sched, &f.context);
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  current_fiber.store(nullptr, std::memory_order_relaxed);
  current_thread.store(nullptr, std::memory_order_relaxed);
}

// Runs block `b` to completion on worker `w`. Every scheduling decision is made here; the threads
// post requests and switch back.
inline void run_block(Worker& w, Block& b) {
  const unsigned n = b.dim.size();
  const unsigned warps = (n + 31) / 32;
  b.threads.resize(n);
  b.warp_sync.assign(warps, SyncPair{});
  b.shuffle.assign(static_cast<size_t>(warps) * 64, 0);
  for (unsigned i = 0; i < n; ++i) {
    b.threads[i].tid = b.dim.at(i);
    b.threads[i].linear = i;
    Fiber& f = *w.fibers[i];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = w.stacks->bytes();
    f.context.uc_link = nullptr;
    const auto address = reinterpret_cast<uintptr_t>(&f);
    makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_main), 2, static_cast<unsigned>(address >> 32),
                static_cast<unsigned>(address & 0xFFFFFFFFu));
  }
  tsan_release(&b.setup);
  const Options& o = options();
  std::mt19937_64 rng(o.seed * 0x9E3779B97F4A7C15ull + b.grid.x * (b.idx.z * b.grid.y + b.idx.y) + b.idx.x + 1);
  std::deque<unsigned> ready;
  // Threads that wait for the same barrier become ready together, in the launch's order.
  auto wake = [&](std::vector<unsigned>& who) {
    if (o.order == Order::Shuffle) {
      std::shuffle(who.begin(), who.end(), rng);
    } else {
      std::sort(who.begin(), who.end());
      if (o.order == Order::Reverse) std::reverse(who.begin(), who.end());
    }
    for (unsigned i : who) ready.push_back(i);
    who.clear();
  };
  {
    std::vector<unsigned> all(n);
    for (unsigned i = 0; i < n; ++i) all[i] = i;
    wake(all);
  }
  unsigned live = n;
  std::vector<unsigned> live_lanes(warps, 0);
  for (unsigned i = 0; i < n; ++i) ++live_lanes[i / 32];
  std::vector<unsigned> at_block;
  std::vector<std::vector<unsigned>> at_warp(warps);
  const char* site_file = nullptr;
  int site_line = 0;
  auto check_block_barrier = [&] {
    if (!at_block.empty() && at_block.size() == live) {
      wake(at_block);
      site_file = nullptr;
    }
  };
  auto check_warp_barrier = [&](unsigned warp) {
    const unsigned lanes = std::min(32u, n - 32 * warp);
    if (!at_warp[warp].empty() && at_warp[warp].size() == live_lanes[warp]) {
      if (live_lanes[warp] != lanes)
        fail("block (%u,%u,%u): warp %u shuffles or syncs with %u of its %u lanes exited", b.idx.x, b.idx.y, b.idx.z,
             warp, lanes - live_lanes[warp], lanes);
      wake(at_warp[warp]);
    }
  };
  while (!ready.empty()) {
    const unsigned i = ready.front();
    ready.pop_front();
    resume(w, b, i);
    Fiber& f = *w.fibers[i];
    const auto r = static_cast<Request>(f.request.load(std::memory_order_relaxed));
    if (r == Request::Exit) {
      --live;
      --live_lanes[i / 32];
      check_block_barrier();
      check_warp_barrier(i / 32);
    } else if (r == Request::Block) {
      const char* file = f.file.load(std::memory_order_relaxed);
      const int line = f.line.load(std::memory_order_relaxed);
      if (site_file == nullptr) {
        site_file = file;
        site_line = line;
      } else if (line != site_line || std::strcmp(file, site_file) != 0) {
        fail("block (%u,%u,%u): thread %u reached __syncthreads at %s:%d, others at %s:%d (a divergent barrier)",
             b.idx.x, b.idx.y, b.idx.z, i, file, line, site_file, site_line);
      }
      at_block.push_back(i);
      check_block_barrier();
    } else if (r == Request::Warp) {
      at_warp[i / 32].push_back(i);
      check_warp_barrier(i / 32);
    } else {
      fail("a CUDA thread switched back without a request");
    }
  }
  if (live != 0) {
    unsigned at_warps = 0;
    for (const auto& v : at_warp) at_warps += static_cast<unsigned>(v.size());
    fail("block (%u,%u,%u) deadlocked: %zu threads wait at __syncthreads, %u at warp barriers, %u exited", b.idx.x,
         b.idx.y, b.idx.z, at_block.size(), at_warps, n - live);
  }
}

inline std::vector<std::unique_ptr<Worker>>& workers() {
  static std::vector<std::unique_ptr<Worker>> all;
  return all;
}

// Stops the workers (call before exit).
inline void shutdown() { workers().clear(); }

// The arguments of a launch, copied once (kernel parameters are passed by value).
template <class... P>
struct Launch {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;
  static void call(const void* self) {
    const auto& l = *static_cast<const Launch*>(self);
    std::apply(l.kernel, l.args);
  }
};

inline void run_grid(Dim3 grid, Dim3 block, const void* kernel, void (*call)(const void*)) {
  const unsigned blocks = grid.size();
  if (blocks == 0 || block.size() == 0) return;
  if (block.size() > 1024) fail("%u threads per block (at most 1024)", block.size());
  const unsigned slots = std::max(1u, std::min(options().slots, blocks));
  auto& pool = workers();
  while (pool.size() < slots) pool.push_back(std::make_unique<Worker>(static_cast<unsigned>(pool.size())));
  Grid g{grid, block, kernel, call, slots};
  g.done.resize(pool.size());
  tsan_release(&launch_start);
  for (unsigned s = 0; s < slots; ++s) pool[s]->start(&g);
  for (unsigned s = 0; s < slots; ++s) pool[s]->wait();
  tsan_acquire(&launch_end);  // the kernel boundary: what the grid wrote is visible to what follows
}

inline void barrier_arrive(Request r, const char* file, int line) {
  Fiber& f = *current_fiber.load(std::memory_order_relaxed);
  f.file.store(file, std::memory_order_relaxed);
  f.line.store(line, std::memory_order_relaxed);
  yield(f, self(), r);
}

inline void syncthreads(const char* file, int line) {
  ThreadInfo& t = self();
  char* sync = &this_block().block_sync.at[t.block_syncs++ & 1];
  tsan_release(sync);
  barrier_arrive(Request::Block, file, line);
  tsan_acquire(sync);
}

// One exchange among the 32 lanes of a warp: every lane posts `value`, then reads lane `source(lane)`'s
// (its own where the source is out of range). Two buffers alternate: a lane can post the next value
// only after every lane has passed the barrier after this one, so no value is overwritten unread.
template <class T, class Source>
T warp_exchange(unsigned mask, T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "32- or 64-bit shuffles only");
  if (mask != 0xFFFFFFFFu) fail("warp shuffle with mask %#x: only full-warp masks are emulated", mask);
  ThreadInfo& t = self();
  Block& b = this_block();
  const unsigned lane = t.linear & 31u, warp = t.linear >> 5;
  const unsigned k = t.warp_syncs++ & 1u;
  uint64_t* slots = b.shuffle.data() + (static_cast<size_t>(warp) * 2 + k) * 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  slots[lane] = bits;
  char* sync = &b.warp_sync[warp].at[k];
  tsan_release(sync);
  barrier_arrive(Request::Warp, "warp shuffle", 0);
  tsan_acquire(sync);
  const unsigned from = source(lane);
  if (from < 32) {
    bits = slots[from];
    std::memcpy(&value, &bits, sizeof(T));
  }
  return value;
}

// kernel<<<grid, block>>>(args...): returns when the grid has finished.
template <class... P, class... Args>
void launch(Dim3 grid, Dim3 block, void (*kernel)(P...), Args&&... args) {
  static_assert(sizeof...(P) == sizeof...(Args), "a kernel launch takes one argument per parameter");
  Launch<P...> l{kernel, std::tuple<std::decay_t<P>...>(std::forward<Args>(args)...)};
  run_grid(grid, block, &l, &Launch<P...>::call);
}

}  // namespace emu

using dim3 = emu::Dim3;
using uint3 = emu::Dim3;

// -- built-in variables --------------------------------------------------------------------------

#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::this_block().idx)
#define blockDim (::emu::this_block().dim)
#define gridDim (::emu::this_block().grid)
constexpr int warpSize = 32;

// -- synchronisation -----------------------------------------------------------------------------

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  ::emu::warp_exchange(mask, 0u, [](unsigned) { return 32u; });
}

template <class T>
T __shfl_sync(unsigned mask, T value, int lane, int width = 32) {
  return ::emu::warp_exchange(mask, value, [=](unsigned me) {
    return (me & ~static_cast<unsigned>(width - 1)) + (static_cast<unsigned>(lane) & static_cast<unsigned>(width - 1));
  });
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::emu::warp_exchange(mask, value, [=](unsigned me) {
    const unsigned w = static_cast<unsigned>(width);
    return (me % w) + delta < w ? me + delta : 32u;
  });
}
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::emu::warp_exchange(mask, value, [=](unsigned me) {
    return (me % static_cast<unsigned>(width)) >= delta ? me - delta : 32u;
  });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::emu::warp_exchange(mask, value, [=](unsigned me) {
    const unsigned other = me ^ static_cast<unsigned>(lane_mask);
    return other / static_cast<unsigned>(width) == me / static_cast<unsigned>(width) ? other : 32u;
  });
}
inline unsigned __activemask() { return 0xFFFFFFFFu; }

inline void __threadfence() {
  static char fence;
  ::emu::tsan_release(&fence);
#if !defined(EMU_TSAN)  // GCC's ThreadSanitizer does not support fences (-Wtsan); annotated above
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
  ::emu::tsan_acquire(&fence);
}
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }

// Device-scope atomics are relaxed read-modify-writes (ordering comes from fences).
template <class T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
template <class T>
T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value, std::memory_order_relaxed);
}
template <class T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value, std::memory_order_relaxed);
}
template <class T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value, std::memory_order_relaxed);
  return compare;
}
template <class T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load(std::memory_order_relaxed);
  while (old < value && !a.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}
template <class T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load(std::memory_order_relaxed);
  while (value < old && !a.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}

// -- memory ----------------------------------------------------------------------------------------

inline bool __isGlobal(const void* ptr) { return ::emu::Memory::get().contains(ptr); }
inline bool __isShared(const void*) { return false; }

// An assumption that does not hold is undefined behaviour on the GPU: here it is an error.
#define __builtin_assume(cond) \
  ((cond) ? (void)0 : ::emu::fail("%s:%d: __builtin_assume(%s) does not hold", __FILE__, __LINE__, #cond))

template <class T>
T __ldg(const T* p) {
  return *p;
}
template <class T>
T __ldcg(const T* p) {
  return *p;
}
template <class T>
T __ldcs(const T* p) {
  return *p;
}
template <class T>
void __stcg(T* p, T v) {
  *p = v;
}
template <class T>
void __stcs(T* p, T v) {
  *p = v;
}

// -- vector types and bit casts ---------------------------------------------------------------------

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }

// -- correctly rounded fp32 arithmetic (compile with -ffp-contract=off: nothing fuses) ---------------

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// -- host API stubs the device headers may name ------------------------------------------------------

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
