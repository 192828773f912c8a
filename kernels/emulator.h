// emulator.h: run CUDA kernels on the CPU, one fiber per CUDA thread.
//
// The kernels in this folder are plain CUDA C. Compiled with g++ after this header
// (minisd/backends/cuda_build.py does that), they run on the CPU with the same grid, block and
// shared-memory sizes as on a GPU, so that every kernel can be tested where there is
// no GPU. How a launch runs:
//
//   for each block (in the chosen run order):
//       poison shared memory (NaN bytes), so a kernel that reads before it writes
//       gets garbage here just as it might on a GPU;
//       start one fiber per thread; a fiber runs its thread until it reaches a
//       __syncthreads(), a warp operation (__shfl_*_sync, __syncwarp) or the end;
//       in passes over the fibers (forward, reverse or a random order each pass):
//           resume every fiber that may run;
//           a barrier opens when every thread that has not exited waits at it;
//           a warp operation completes when every live lane its mask names is at it;
//       a pass in which no fiber can run is a deadlock: report which thread waits where.
//
// A fiber is a stack of its own. It is created once with ucontext (makecontext), and
// every switch after that is a _setjmp/_longjmp pair (about 11 ns, no system call; glibc's
// swapcontext makes a sigprocmask call each time, about 25 times slower). Fibers are
// kept between launches and reused; each stack has a guard page below it.
//
// Since one OS thread runs every fiber, and a fiber gives the CPU away only at a barrier
// or a warp operation, atomicAdd is a plain read-modify-write and static __shared__
// variables are plain static variables: they all live in one ELF section, "emu_shared",
// which the runtime poisons before each block.
//
// Numerics differ slightly from a GPU: __expf is the exact expf here, and nvcc fuses
// multiply-adds into FMAs where g++ does not. Compare with a tolerance.
#pragma once

#include <cmath>
#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

// ---- CUDA's qualifiers and built-in types ------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("emu_shared")))

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

enum class Order { forward = 0, reverse = 1, random = 2 };
enum class State { ready, at_barrier, at_warp, exited, faulted };

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // what a kernel gets without an opt-in
constexpr size_t kStackBytes = 256 * 1024;      // virtual; only touched pages are committed

struct Fiber {
    int tid = 0;        // linear thread index in the block
    uint3 idx{};        // threadIdx
    State state = State::ready;
    const char *site_file = nullptr;  // where it waits (barrier or warp op)
    int site_line = 0;
    uint32_t warp_mask = 0;  // the lanes named by the warp operation it waits at
    unsigned warp_ops = 0;   // warp operations completed so far, picks the exchange buffer
    char fault[160] = "";    // why it stopped, when state == faulted
    jmp_buf ctx;
    char *stack_lo = nullptr;
    void *asan_fake_stack = nullptr;
};

struct Warp {
    uint32_t live = 0;     // lanes that have not exited, one bit each
    uint32_t waiting = 0;  // lanes waiting at a warp operation
    uint64_t slots[2][kWarpSize];  // values exchanged by shuffles, double-buffered
};

struct Runtime {
    std::vector<Fiber *> fibers;  // the pool, grown on demand, kept between launches
    std::vector<Warp> warps;
    jmp_buf scheduler;
    Fiber *current = nullptr;
    uint3 block_idx{};
    dim3 block_dim, grid_dim;
    unsigned char *dynamic_shared = nullptr;
    void (*body)(void *) = nullptr;  // the kernel call of this launch, with its arguments
    void *body_arg = nullptr;
    Order order = Order::forward;
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    std::string error;
    const void *main_stack_lo = nullptr;  // for AddressSanitizer's stack-switch notes
    size_t main_stack_size = 0;
};

inline Runtime rt;

// ---- switching between the scheduler and a fiber ------------------------------------
// AddressSanitizer must be told about every stack switch, or it mistakes the fiber's
// stack for a wild pointer. The calls compile to nothing without it.
inline void before_switch(void **fake_stack, const void *lo, size_t size) {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(fake_stack, lo, size);
#else
    (void)fake_stack, (void)lo, (void)size;
#endif
}
inline void after_switch(void *fake_stack, const void **old_lo, size_t *old_size) {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_stack, old_lo, old_size);
#else
    (void)fake_stack, (void)old_lo, (void)old_size;
#endif
}

// Called by a fiber: park here and let the scheduler continue.
inline void yield() {
    Fiber *self = rt.current;
    if (!_setjmp(self->ctx)) {
        before_switch(&self->asan_fake_stack, rt.main_stack_lo, rt.main_stack_size);
        _longjmp(rt.scheduler, 1);
    }
    after_switch(self->asan_fake_stack, nullptr, nullptr);
}

// Called by the scheduler: run fiber f until it parks.
inline void resume(Fiber *f) {
    static void *fake_stack = nullptr;
    rt.current = f;
    if (!_setjmp(rt.scheduler)) {
        before_switch(&fake_stack, f->stack_lo, kStackBytes);
        _longjmp(f->ctx, 1);
    }
    after_switch(fake_stack, nullptr, nullptr);
    rt.current = nullptr;
}

// A fiber's whole life: park once (creation), then run the kernel once per block.
// Nothing may throw out of here: there is no frame below to catch it.
inline void fiber_main() {
    Fiber *self = rt.current;
    after_switch(nullptr, &rt.main_stack_lo, &rt.main_stack_size);
    for (;;) {
        yield();
        rt.body(rt.body_arg);
        self->state = State::exited;
    }
}

inline bool grow_pool(int n) {
    while ((int)rt.fibers.size() < n) {
        Fiber *f = new Fiber();
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void *mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) {
            delete f;
            rt.error = "emulator: could not allocate a fiber stack";
            return false;
        }
        mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults here
        f->stack_lo = (char *)mem + page;
        ucontext_t start;  // needed only to enter the fiber this once
        getcontext(&start);
        start.uc_stack.ss_sp = f->stack_lo;
        start.uc_stack.ss_size = kStackBytes;
        start.uc_link = nullptr;
        makecontext(&start, fiber_main, 0);
        // Enter it once with setcontext; it parks at its first yield() and from then
        // on is reached with _longjmp only.
        static void *fake_stack = nullptr;
        rt.current = f;
        if (!_setjmp(rt.scheduler)) {
            before_switch(&fake_stack, f->stack_lo, kStackBytes);
            setcontext(&start);
        }
        after_switch(fake_stack, nullptr, nullptr);
        rt.current = nullptr;
        rt.fibers.push_back(f);
    }
    return true;
}

// ---- run order ----------------------------------------------------------------------
inline uint64_t next_random() {  // xorshift64*
    rt.rng ^= rt.rng >> 12;
    rt.rng ^= rt.rng << 25;
    rt.rng ^= rt.rng >> 27;
    return rt.rng * 2685821657736338717ull;
}

inline void fill_order(std::vector<int> &order, int n) {
    order.resize(n);
    for (int i = 0; i < n; ++i) order[i] = rt.order == Order::reverse ? n - 1 - i : i;
    if (rt.order == Order::random)
        for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random() % (i + 1)]);
}

// ---- shared memory poison -----------------------------------------------------------
extern "C" unsigned char __start_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_emu_shared[] __attribute__((weak));

// Every byte 0xFF: a float reads as NaN, an int as -1. Written without AddressSanitizer's
// checks because the section also holds the sanitizer's red zones between variables.
__attribute__((no_sanitize_address)) inline void poison(unsigned char *lo, unsigned char *hi) {
    for (unsigned char *p = lo; p < hi; ++p) *(volatile unsigned char *)p = 0xFF;
}

// ---- reporting ----------------------------------------------------------------------
inline std::string where(const Fiber *f) {
    char buf[256];
    const Fiber &t = *f;
    switch (t.state) {
        case State::at_barrier:
            snprintf(buf, sizeof buf, "wait at __syncthreads at %s:%d", t.site_file, t.site_line);
            break;
        case State::at_warp:
            snprintf(buf, sizeof buf, "wait at a warp operation at %s:%d", t.site_file, t.site_line);
            break;
        case State::exited: snprintf(buf, sizeof buf, "exited"); break;
        case State::faulted: snprintf(buf, sizeof buf, "stopped (%s)", t.fault); break;
        default: snprintf(buf, sizeof buf, "are runnable"); break;
    }
    return buf;
}

// "threads 0-15 wait at __syncthreads at f.cu:12; threads 16-31 exited": runs of equal state.
inline std::string describe_threads(int n) {
    std::string out;
    int start = 0;
    for (int i = 1; i <= n; ++i) {
        if (i < n && where(rt.fibers[i]) == where(rt.fibers[start])) continue;
        char buf[64];
        if (i - 1 == start) snprintf(buf, sizeof buf, "thread %d ", start);
        else snprintf(buf, sizeof buf, "threads %d-%d ", start, i - 1);
        if (!out.empty()) out += "; ";
        out += buf + where(rt.fibers[start]);
        start = i;
    }
    return out;
}

inline void fail(const char *kernel, const char *what, int nthreads) {
    char head[256];
    snprintf(head, sizeof head, "%s in kernel %s, block (%u,%u,%u): ", what, kernel,
             rt.block_idx.x, rt.block_idx.y, rt.block_idx.z);
    rt.error = head + describe_threads(nthreads);
}

// ---- the scheduler --------------------------------------------------------------------
inline bool same_site(const Fiber *a, const Fiber *b) {
    return a->site_line == b->site_line &&
           (a->site_file == b->site_file || !strcmp(a->site_file, b->site_file));
}

// Open the block barrier if every live thread waits at it; they must wait at one line.
inline bool try_open_barrier(const char *kernel, int n, int live, int &waiting) {
    if (waiting == 0 || waiting != live) return true;
    const Fiber *first = nullptr;
    for (int i = 0; i < n; ++i) {
        Fiber *f = rt.fibers[i];
        if (f->state != State::at_barrier) continue;
        if (!first) first = f;
        else if (!same_site(f, first)) {
            fail(kernel, "divergent __syncthreads (threads wait at different barriers)", n);
            return false;
        }
    }
    for (int i = 0; i < n; ++i)
        if (rt.fibers[i]->state == State::at_barrier) rt.fibers[i]->state = State::ready;
    waiting = 0;
    return true;
}

// Complete the warp operations of warp w whose lanes have all arrived. A lane waits for
// the live lanes its mask names; they must wait at the same line with the same mask.
inline bool try_complete_warp(const char *kernel, int n, int w) {
    Warp &warp = rt.warps[w];
    Fiber **lanes = &rt.fibers[w * kWarpSize];
    for (uint32_t pending = warp.waiting; pending;) {
        const Fiber *first = lanes[__builtin_ctz(pending)];
        const uint32_t group = first->warp_mask & warp.live;
        pending &= ~group;
        if ((group & warp.waiting) != group) continue;  // someone it waits for is not there yet
        for (uint32_t m = group; m; m &= m - 1) {
            const Fiber *f = lanes[__builtin_ctz(m)];
            if (f->warp_mask != first->warp_mask || !same_site(f, first)) {
                fail(kernel, "divergent warp operation (lanes of one warp wait at different lines)", n);
                return false;
            }
        }
        for (uint32_t m = group; m; m &= m - 1) lanes[__builtin_ctz(m)]->state = State::ready;
        warp.waiting &= ~group;
    }
    return true;
}

inline bool run_block(const char *kernel, int n) {
    const size_t shared = __stop_emu_shared - __start_emu_shared;
    if (shared) poison(__start_emu_shared, __stop_emu_shared);
    const int nwarps = (n + kWarpSize - 1) / kWarpSize;
    for (int w = 0; w < nwarps; ++w) {
        const int lanes = (w + 1) * kWarpSize <= n ? kWarpSize : n - w * kWarpSize;
        rt.warps[w].live = lanes == kWarpSize ? 0xffffffffu : (1u << lanes) - 1;
        rt.warps[w].waiting = 0;
    }
    for (int i = 0; i < n; ++i) {
        Fiber *f = rt.fibers[i];
        f->tid = i;
        f->idx = {i % rt.block_dim.x, (i / rt.block_dim.x) % rt.block_dim.y,
                  i / (rt.block_dim.x * rt.block_dim.y)};
        f->state = State::ready;
        f->warp_ops = 0;
    }
    int live = n, at_barrier = 0;
    std::vector<int> order;
    while (live > 0) {
        bool progressed = false;
        fill_order(order, n);
        for (int i : order) {
            Fiber *f = rt.fibers[i];
            if (f->state != State::ready) continue;
            resume(f);
            progressed = true;
            const int w = i / kWarpSize;
            const uint32_t bit = 1u << (i % kWarpSize);
            if (f->state == State::faulted) {
                fail(kernel, "a thread stopped", n);
                return false;
            }
            if (f->state == State::exited) {
                --live;
                rt.warps[w].live &= ~bit;
            }
            if (f->state == State::at_warp) rt.warps[w].waiting |= bit;
            if (f->state == State::at_barrier) ++at_barrier;
            if (!try_complete_warp(kernel, n, w)) return false;
            if (!try_open_barrier(kernel, n, live, at_barrier)) return false;
        }
        if (!progressed && live > 0) {
            fail(kernel, "deadlock (a barrier or warp operation that not every thread reaches)", n);
            return false;
        }
    }
    return true;
}

template <class Call>
void call_body(void *arg) {
    (*static_cast<Call *>(arg))();
}

// Launch `call` (the kernel with its arguments bound) over grid x block.
// Returns 0, or -1 with rt.error set.
template <class Call>
int launch(const char *kernel, dim3 grid, dim3 block, size_t shared_bytes, Call call) {
    rt.error.clear();
    const long long n = (long long)block.x * block.y * block.z;
    const long long blocks = (long long)grid.x * grid.y * grid.z;
    char msg[256];
    if (n < 1 || n > kMaxThreadsPerBlock || block.z > 64) {
        snprintf(msg, sizeof msg, "kernel %s: block (%u,%u,%u) has %lld threads; a block holds 1 to %d",
                 kernel, block.x, block.y, block.z, n, kMaxThreadsPerBlock);
        rt.error = msg;
        return -1;
    }
    if (blocks < 1 || blocks > 0x7fffffff || grid.y > 65535 || grid.z > 65535) {
        snprintf(msg, sizeof msg, "kernel %s: invalid grid (%u,%u,%u)", kernel, grid.x, grid.y, grid.z);
        rt.error = msg;
        return -1;
    }
    if (shared_bytes > kMaxSharedBytes) {
        snprintf(msg, sizeof msg, "kernel %s: %zu bytes of dynamic shared memory; at most %zu",
                 kernel, shared_bytes, kMaxSharedBytes);
        rt.error = msg;
        return -1;
    }
    if (!grow_pool((int)n)) return -1;
    rt.warps.resize((n + kWarpSize - 1) / kWarpSize);
    rt.block_dim = block;
    rt.grid_dim = grid;
    rt.body = call_body<Call>;
    rt.body_arg = &call;
    // A fresh allocation each launch, so that AddressSanitizer sees its exact end.
    rt.dynamic_shared = shared_bytes ? (unsigned char *)malloc(shared_bytes) : nullptr;

    std::vector<int> block_order;
    fill_order(block_order, (int)blocks);
    bool ok = true;
    for (int b : block_order) {
        rt.block_idx = {b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
        if (rt.dynamic_shared) poison(rt.dynamic_shared, rt.dynamic_shared + shared_bytes);
        if (!(ok = run_block(kernel, (int)n))) break;
    }
    if (!ok) {
        // The fibers of the failed block are parked mid-kernel; start them afresh.
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        for (Fiber *f : rt.fibers) {
            munmap(f->stack_lo - page, kStackBytes + page);
            delete f;
        }
        rt.fibers.clear();
    }
    free(rt.dynamic_shared);
    rt.dynamic_shared = nullptr;
    return ok ? 0 : -1;
}

// ---- what kernels call ------------------------------------------------------------------
inline void wait_at(State s, const char *file, int line) {
    Fiber *self = rt.current;
    self->state = s;
    self->site_file = file;
    self->site_line = line;
    yield();
}

inline void syncthreads(const char *file, int line) { wait_at(State::at_barrier, file, line); }

// Stop this thread for good with a message; the launch fails and reports it. (A fiber
// must never throw: there is no frame below it to catch an exception.)
inline void fault(const char *file, int line, const char *what) {
    Fiber *self = rt.current;
    snprintf(self->fault, sizeof self->fault, "%s at %s:%d", what, file, line);
    self->state = State::faulted;
    yield();
}

// A shuffle: every lane publishes its value, waits for its warp, then reads lane `src`'s.
// src < 0 means "keep my own value" (a source outside the lane's segment).
template <class T>
T exchange(unsigned mask, T value, int (*source)(int lane, int arg, int width), int arg, int width,
           const char *file, int line) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "warp shuffles move at most 8 bytes");
    Fiber *self = rt.current;
    const int lane = self->tid % kWarpSize;
    if (width < 1 || width > kWarpSize || (width & (width - 1)))
        fault(file, line, "a warp shuffle's width must be a power of 2 from 1 to 32");
    if (!(mask >> lane & 1u)) fault(file, line, "a warp operation's mask leaves out the calling lane");
    Warp &warp = rt.warps[self->tid / kWarpSize];
    uint64_t *slots = warp.slots[self->warp_ops & 1];
    memcpy(&slots[lane], &value, sizeof(T));
    self->warp_mask = mask;
    wait_at(State::at_warp, file, line);
    ++self->warp_ops;
    const int src = source(lane, arg, width);
    if (src < 0) return value;
    T out;
    memcpy(&out, &slots[src], sizeof(T));
    return out;
}

// Source lanes, as the CUDA Programming Guide defines them for a segment of `width` lanes.
inline int src_idx(int lane, int arg, int width) { return (lane & ~(width - 1)) + (arg & (width - 1)); }
inline int src_xor(int lane, int arg, int width) {
    const int s = lane ^ arg;
    return (s & ~(width - 1)) > (lane & ~(width - 1)) ? -1 : s;
}
inline int src_down(int lane, int arg, int width) {
    const int s = lane + arg;
    return (s & ~(width - 1)) != (lane & ~(width - 1)) ? -1 : s;
}
inline int src_up(int lane, int arg, int width) {
    const int s = lane - arg;
    return s < (lane & ~(width - 1)) ? -1 : s;
}

}  // namespace emu

// ---- the names kernels use ------------------------------------------------------------------
#define threadIdx (emu::rt.current->idx)
#define blockIdx (emu::rt.block_idx)
#define blockDim (emu::rt.block_dim)
#define gridDim (emu::rt.grid_dim)
#define warpSize 32

#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) \
    ((void)emu::exchange<int>(emu_mask(__VA_ARGS__), 0, emu::src_idx, 0, 32, __FILE__, __LINE__))
#define __shfl_sync(mask, v, src, ...) \
    emu::exchange((mask), (v), emu::src_idx, (src), emu_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
    emu::exchange((mask), (v), emu::src_xor, (m), emu_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
    emu::exchange((mask), (v), emu::src_down, (d), emu_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
    emu::exchange((mask), (v), emu::src_up, (d), emu_width(__VA_ARGS__), __FILE__, __LINE__)
inline int emu_width(int width = 32) { return width; }
inline unsigned emu_mask(unsigned mask = 0xffffffffu) { return mask; }

// One OS thread runs every fiber, and fibers switch only at barriers: a plain update is atomic.
template <class T>
inline T atomicAdd(T *address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}

// Dynamic shared memory: cuda_build.py rewrites `extern __shared__ T name[];` to this pointer.
#define EMU_DYNAMIC_SHARED(T, name) T *name = reinterpret_cast<T *>(emu::rt.dynamic_shared)

// Math intrinsics: the exact functions stand in for the fast approximate ones.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- the controls minisd/backends/cuda_build.py calls through ctypes (defined in one file only)
#ifdef EMU_DEFINE_CONTROLS
// Order in which fibers are resumed in each pass, and blocks run: 0 forward, 1 reverse,
// 2 random (reshuffled each pass from `seed`).
extern "C" void emu_set_order(int order, unsigned long long seed) {
    emu::rt.order = static_cast<emu::Order>(order);
    emu::rt.rng = seed * 2 + 1;  // xorshift must not start at 0
}
extern "C" const char *emu_last_error() { return emu::rt.error.c_str(); }
#endif
