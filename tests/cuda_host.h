// cuda_host.h -- run the CUDA plugin's kernels on the CPU, for the tests.
//
// The generated kernel source (plugins/cuda/rpcserver_cuda/kernels.py) is compiled with g++
// after this header (-include), so the very code NVRTC compiles for a GPU runs here:
//
// * every CUDA thread of a block is a fiber with its own stack, all on the calling OS thread;
//   blocks run one after another (a kernel may not communicate between blocks anyway);
// * __syncthreads() is a barrier over the block's live threads, and each warp shuffle a
//   barrier over the warp's: a fiber that reaches one yields to the scheduler, which resumes
//   it once every other thread of the group has arrived (or exited), as the hardware does
//   for converged code. A barrier no live thread can complete (divergent __syncthreads) is
//   reported as a launch error instead of hanging;
// * __shared__ variables become statics: one instance, shared by the threads of the block that
//   is running; uninitialised at block start, as on a GPU (nothing may rely on their values);
// * threadIdx/blockIdx/blockDim/gridDim read the running fiber's coordinates.
//
// Switching fibers uses _setjmp/_longjmp (no signal-mask system call), and ucontext only to
// start each fiber on its stack. Launches are serialised by a mutex.
//
// What this cannot show: timing, races between warps that the GPU would expose, memory
// errors (an out-of-bounds read is an ordinary host read), and rounding where the GPU
// contracts a*b+c into an FMA that the host compiler keeps as two operations.
#pragma once

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <mutex>
#include <type_traits>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace rpc_emu {

struct Barrier {
    int expected = 0;  // live threads of the group
    int arrived = 0;
    unsigned long long generation = 0;
};

struct Fiber {
    ucontext_t start;          // used once per launch, to enter the fiber on its stack
    jmp_buf restart;           // the top of fiber_entry: where each further block begins
    jmp_buf resume;            // where the fiber continues after a yield
    char *stack = nullptr;
    dim3 thread_idx;
    int warp = 0, lane = 0;
    bool entered = false;      // has run fiber_entry in this launch (then restarts, not starts)
    bool started = false, done = false;
    Barrier *waiting_on = nullptr;
    unsigned long long wait_generation = 0;
};

constexpr size_t kStackBytes = 256 * 1024;

inline Fiber *g_current = nullptr;
inline jmp_buf g_scheduler;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;
inline Barrier g_block_barrier;
inline std::vector<Barrier> g_warp_barriers;
inline std::vector<unsigned long long> g_warp_slots;  // 2 x 32 per warp (double-buffered)
inline void (*g_body)(void *) = nullptr;
inline void *g_body_arg = nullptr;
inline char g_error[512];

inline void yield_to_scheduler() {
    if (!_setjmp(g_current->resume)) _longjmp(g_scheduler, 1);
}

inline void release(Barrier &b) {
    b.arrived = 0;
    ++b.generation;
}

inline void wait(Barrier &b) {
    Fiber *self = g_current;
    const unsigned long long gen = b.generation;
    if (++b.arrived >= b.expected) {
        release(b);
        return;
    }
    self->waiting_on = &b;
    self->wait_generation = gen;
    yield_to_scheduler();  // the scheduler resumes us once b.generation moved on
    self->waiting_on = nullptr;
}

inline void leave(Barrier &b) {  // an exited thread no longer holds the group back
    --b.expected;
    if (b.arrived > 0 && b.arrived >= b.expected) release(b);
}

inline void fiber_entry() {
    // fiber_entry's frame stays on the fiber's stack for the whole launch (the fiber leaves by
    // _longjmp, never by returning), so each new block jumps back here instead of paying
    // getcontext/setcontext's system calls per thread and block
    _setjmp(g_current->restart);
    g_body(g_body_arg);
    Fiber *self = g_current;
    self->done = true;
    leave(g_block_barrier);
    leave(g_warp_barriers[self->warp]);
    _longjmp(g_scheduler, 2);
}

inline bool runnable(const Fiber &f) {
    return !f.done && (f.waiting_on == nullptr || f.waiting_on->generation != f.wait_generation);
}

// Runs body(arg) as every thread of every block; 0 on success, else g_error says why.
inline int launch(dim3 grid, dim3 block, void (*body)(void *), void *arg) {
    static std::mutex serialise;
    std::lock_guard<std::mutex> guard(serialise);
    g_error[0] = 0;
    const unsigned long long n_threads = (unsigned long long)block.x * block.y * block.z;
    if (n_threads == 0 || n_threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        snprintf(g_error, sizeof g_error, "bad launch geometry: grid (%u, %u, %u), block (%u, %u, %u)",
                 grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return 1;
    }
    const int n_warps = (int)((n_threads + 31) / 32);
    std::vector<Fiber> fibers(n_threads);
    // stacks are kept from launch to launch (untouched pages cost nothing)
    static std::vector<char *> stacks;
    while (stacks.size() < n_threads) stacks.push_back((char *)malloc(kStackBytes));
    for (unsigned long long t = 0; t < n_threads; ++t) fibers[t].stack = stacks[t];
    g_warp_barriers.assign(n_warps, Barrier{});
    g_warp_slots.assign((size_t)n_warps * 64, 0);
    g_body = body;
    g_body_arg = arg;
    g_grid_dim = grid;
    g_block_dim = block;
    int status = 0;
    for (unsigned bz = 0; bz < grid.z && !status; ++bz)
    for (unsigned by = 0; by < grid.y && !status; ++by)
    for (unsigned bx = 0; bx < grid.x && !status; ++bx) {
        g_block_idx = dim3{bx, by, bz};
        g_block_barrier = Barrier{};
        g_block_barrier.expected = (int)n_threads;
        for (int w = 0; w < n_warps; ++w) {
            g_warp_barriers[w] = Barrier{};
            g_warp_barriers[w].expected = (int)(w + 1 < n_warps ? 32 : n_threads - 32ull * w);
        }
        for (unsigned long long t = 0; t < n_threads; ++t) {
            Fiber &f = fibers[t];
            f.thread_idx = dim3{(unsigned)(t % block.x), (unsigned)(t / block.x % block.y),
                                (unsigned)(t / ((unsigned long long)block.x * block.y))};
            f.warp = (int)(t / 32);
            f.lane = (int)(t % 32);
            f.started = f.done = false;
            f.waiting_on = nullptr;
        }
        size_t live = n_threads;
        while (live > 0) {
            bool progressed = false;
            for (auto &f : fibers) {
                if (!runnable(f)) continue;
                progressed = true;
                g_current = &f;
                if (_setjmp(g_scheduler)) {  // back from the fiber: yielded or finished
                    if (f.done) --live;
                    continue;
                }
                if (f.started) _longjmp(f.resume, 1);
                f.started = true;
                if (f.entered) _longjmp(f.restart, 1);
                f.entered = true;
                getcontext(&f.start);
                f.start.uc_stack.ss_sp = f.stack;
                f.start.uc_stack.ss_size = kStackBytes;
                f.start.uc_link = nullptr;
                makecontext(&f.start, fiber_entry, 0);
                setcontext(&f.start);
            }
            if (!progressed) {
                snprintf(g_error, sizeof g_error,
                         "deadlock in block (%u, %u, %u): %zu live threads wait at barriers no "
                         "other thread can reach (__syncthreads or a shuffle in divergent code)",
                         bx, by, bz, live);
                status = 2;
                break;
            }
        }
    }
    g_current = nullptr;
    return status;
}

template <class T>
inline T shuffle(T v, int source_of_lane_xor, bool is_xor, int delta_kind) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    Fiber *self = g_current;
    Barrier &b = g_warp_barriers[self->warp];
    unsigned long long *slots = &g_warp_slots[(size_t)self->warp * 64 + 32 * (b.generation & 1)];
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    slots[self->lane] = bits;
    wait(b);
    int src;
    if (is_xor) src = self->lane ^ source_of_lane_xor;
    else if (delta_kind > 0) src = self->lane + source_of_lane_xor;   // down
    else if (delta_kind < 0) src = self->lane - source_of_lane_xor;   // up
    else src = source_of_lane_xor;                                    // indexed
    if (src < 0 || src >= 32) src = self->lane;
    T r;
    memcpy(&r, &slots[src], sizeof(T));
    return r;
}

}  // namespace rpc_emu

// ---- the CUDA names the kernels use -------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__ static const
#define __shared__ static
#define threadIdx (rpc_emu::g_current->thread_idx)
#define blockIdx (rpc_emu::g_block_idx)
#define blockDim (rpc_emu::g_block_dim)
#define gridDim (rpc_emu::g_grid_dim)

inline void __syncthreads() { rpc_emu::wait(rpc_emu::g_block_barrier); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    rpc_emu::wait(rpc_emu::g_warp_barriers[rpc_emu::g_current->warp]);
}

template <class T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    return rpc_emu::shuffle(v, lane_mask, true, 0);
}
template <class T> inline T __shfl_sync(unsigned, T v, int src_lane, int = 32) {
    return rpc_emu::shuffle(v, src_lane, false, 0);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return rpc_emu::shuffle(v, (int)delta, false, 1);
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
    return rpc_emu::shuffle(v, (int)delta, false, -1);
}

inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
// the _rn intrinsics are the plain IEEE operations, which is what keeps the host from fusing
// them (it compiles without FMA contraction anyway)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T> inline T __ldg(const T *p) { return *p; }
inline float atomicAdd(float *p, float v) { float old = *p; *p = old + v; return old; }
inline int atomicAdd(int *p, int v) { int old = *p; *p = old + v; return old; }

// CUDA's integer/float min and max, by value (the common type, as CUDA's overloads give)
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
