// cuda_cpu.h: a CUDA thread block executed on the CPU, so the kernels of minirlhf/kernels/*.cu run
// (unmodified) where there is no GPU.
//
// A .cu source is compiled by the host C++ compiler after this header, which supplies what nvcc
// would: the built-in variables (threadIdx, blockIdx, blockDim, gridDim), the qualifiers, the vector
// types, the intrinsics the kernels call, and a model of the PTX instructions they issue (cp.async).
// A source includes its own PTX only `#ifndef CUDA_CPU_HARNESS`.
//
// How a block runs. Every CUDA thread is a fiber (ucontext) with its own stack, all on one OS
// thread. A scheduler resumes the fibers one at a time; a fiber runs until it reaches a barrier
// (__syncthreads, or the warp barrier inside a shuffle) and yields. A barrier opens when every
// live thread of its block (or warp) has reached it; threads waiting at different barriers are a
// deadlock and an error. The blocks of a grid run one after another.
//
// Two schedules, which a correct kernel cannot tell apart:
//   schedule 0: threads resumed in order 0, 1, 2, ...; a cp.async copy lands in shared memory at
//               the cp.async.wait_group that retires it (the latest a GPU may deliver it);
//   schedule 1: the highest-numbered runnable thread first, each warp barrier opened as soon as it
//               can be, so one warp runs ahead to the next __syncthreads before the others start;
//               a cp.async copy lands at once (the earliest).
// A missing wait reads shared memory the copy has not reached (schedule 0); a missing barrier
// lets one thread overwrite or read a tile while another still uses or fills it (one of the two
// orders). Either way the two schedules give different bits, or wrong ones.
//
// Shared memory. Dynamic shared memory is one array (the wrapper that includes a source defines
// it, CUDA_CPU_DYNAMIC_SHARED). Before each block its first `shared_bytes` are filled with NaN; the
// rest is a guard, filled with a marker that is checked after the block and, under
// AddressSanitizer, poisoned, so a read or write past the launch's size is caught.
#pragma once

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define CUDA_CPU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define CUDA_CPU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define CUDA_CPU_POISON(p, n) ((void)0)
#define CUDA_CPU_UNPOISON(p, n) ((void)0)
#endif

#define CUDA_CPU_HARNESS 1

// ------------------------------------------------------------ what nvcc adds to C++
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
using std::max;
using std::min;

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off: never fused

namespace cuda_cpu {

constexpr int MAX_THREADS = 1024;
constexpr size_t MAX_SHARED_BYTES = 227 * 1024;  // opt-in dynamic shared memory per block on sm_90
constexpr size_t DEFAULT_SHARED_BYTES = 48 * 1024;  // without the opt-in attribute
constexpr size_t STACK_BYTES = 256 * 1024;
constexpr uint32_t UNWRITTEN = 0x7fc00000u;  // quiet NaN: shared memory before anything is stored
constexpr uint32_t GUARD = 0x7fbadbadu;      // past the launch's shared memory

enum class State { runnable, at_block_barrier, at_warp_barrier, done };

struct PendingCopy {  // one cp.async: its 16 bytes were read from global memory at issue
    void* dst;
    unsigned char data[16];
};

struct Thread {
    dim3 index;
    int linear = 0;
    State state = State::runnable;
    ucontext_t context;  // where the fiber starts, on its own stack
    jmp_buf resume;      // where it continues after a yield
    bool started = false;
    std::vector<char> stack;
    std::vector<PendingCopy> open_group;               // issued since the last commit_group
    std::vector<std::vector<PendingCopy>> committed;   // oldest first
};

struct MmaFragments {
    unsigned a[4], b[2];
};

struct Block {
    dim3 index, dim, grid;
    int schedule = 0;
    std::vector<Thread> threads;
    std::vector<uint64_t> exchange[2];  // shuffle values, one slot per thread, two by parity
    std::vector<MmaFragments> fragments[2];  // mma.sync operands, likewise
    std::vector<int> collectives;       // per thread: warp collectives done (picks the parity)
    Thread* current = nullptr;
    ucontext_t scheduler;
    jmp_buf scheduler_resume;
    std::function<void()> body;
    std::string error;
};

inline Block& block() {
    static Block b;
    return b;
}
inline Thread& this_thread() { return *block().current; }

struct SharedRegion {  // the dynamic shared memory array of the source being run
    unsigned char* base = nullptr;
    size_t capacity = 0;
};
inline SharedRegion& shared_region() {
    static SharedRegion r;
    return r;
}

// Switching between the scheduler and a fiber. A fiber's first entry goes through its ucontext
// (onto its own stack); after that _setjmp/_longjmp switch, which unlike swapcontext make no system
// call. AddressSanitizer follows swapcontext but not longjmp between stacks: it gets swapcontext only.
#if defined(__SANITIZE_ADDRESS__)
inline void enter_thread(Thread& t) { swapcontext(&block().scheduler, &t.context); }
inline void leave_thread(Thread& t) { swapcontext(&t.context, &block().scheduler); }
#else
inline void enter_thread(Thread& t) {
    if (_setjmp(block().scheduler_resume) == 0) {
        if (!t.started) {
            t.started = true;
            setcontext(&t.context);
        }
        _longjmp(t.resume, 1);
    }
}
inline void leave_thread(Thread& t) {
    if (_setjmp(t.resume) == 0) _longjmp(block().scheduler_resume, 1);
}
#endif

// A fiber that hits an error records it and returns to the scheduler for good.
[[noreturn]] inline void fail(const std::string& message) {
    Block& b = block();
    if (b.error.empty()) b.error = message;
    Thread& t = this_thread();
    t.state = State::done;
    leave_thread(t);
    __builtin_unreachable();
}

inline void yield_to_scheduler(State waiting) {
    Thread& t = this_thread();
    t.state = waiting;
    leave_thread(t);
}

// ------------------------------------------------------------------ cp.async
inline void land(const std::vector<PendingCopy>& group) {
    for (const PendingCopy& c : group) memcpy(c.dst, c.data, 16);
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
    SharedRegion& r = shared_region();
    if ((unsigned char*)dst < r.base || (unsigned char*)dst + 16 > r.base + r.capacity)
        fail("cp.async: destination is not in shared memory");
    if ((uintptr_t)dst % 16 || (uintptr_t)src % 16) fail("cp.async: 16-byte copy from or to an unaligned address");
    PendingCopy c{dst, {}};
    if (src_bytes > 0) memcpy(c.data, src, src_bytes);  // the rest is zero-filled, as the instruction does
    if (block().schedule == 1) {
        memcpy(dst, c.data, 16);
        return;
    }
    this_thread().open_group.push_back(c);
}

inline void cp_async_commit_group() {
    Thread& t = this_thread();
    t.committed.push_back(std::move(t.open_group));
    t.open_group.clear();
}

// Waits until at most `pending` committed groups of this thread are in flight: the older ones land.
template <int pending>
inline void cp_async_wait_group() {
    Thread& t = this_thread();
    while ((int)t.committed.size() > pending) {
        land(t.committed.front());
        t.committed.erase(t.committed.begin());
    }
}

// ------------------------------------------------------------------ barriers
inline void syncthreads() { yield_to_scheduler(State::at_block_barrier); }

// A shuffle is a warp barrier between writing one's value and reading the partner's. Each
// thread alternates between two slot arrays, so a fast lane's next shuffle cannot overwrite a
// value a slow lane has yet to read (both have passed the barrier of the shuffle in between).
template <class T>
inline T shuffle(unsigned mask, T value, int src_lane_of_mine) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
    Block& b = block();
    Thread& t = this_thread();
    if (mask != 0xffffffffu) fail("__shfl_*_sync: only the full-warp mask is modelled");
    const int parity = b.collectives[t.linear]++ & 1;
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    b.exchange[parity][t.linear] = bits;
    yield_to_scheduler(State::at_warp_barrier);
    const int src = t.linear / 32 * 32 + src_lane_of_mine;
    if (src >= (int)b.threads.size()) fail("__shfl_*_sync: the source lane is past the end of the block");
    T out;
    memcpy(&out, &b.exchange[parity][src], sizeof(T));
    return out;
}

// ------------------------------------------------------------------ tensor cores
// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (NaN, inf unchanged).
inline unsigned tf32_round(float x) {
    unsigned u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;  // adding half a TF32 ulp to the magnitude rounds ties away
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += A B, a warp-wide instruction: each lane
// deposits its fragments, the warp meets at a barrier, and each lane computes its four elements of D
// from the whole of A (16 × 8) and B (8 × 8), gathered by PTX's fragment layout (lane = 4g + c):
//   A[g + 8(r % 2)][c + 4(r / 2)] = a_r,  B[c + 4r][g] = b_r,  D[g + 8(r / 2)][2c + r % 2] = d_r.
// TF32 products are exact in fp32; the sum over k is taken in order (the hardware's order is its own).
inline void mma_tf32_m16n8k8(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    Block& blk = block();
    Thread& t = this_thread();
    const int parity = blk.collectives[t.linear]++ & 1;
    MmaFragments& mine = blk.fragments[parity][t.linear];
    memcpy(mine.a, a, sizeof mine.a);
    memcpy(mine.b, b, sizeof mine.b);
    yield_to_scheduler(State::at_warp_barrier);
    const MmaFragments* warp = &blk.fragments[parity][t.linear / 32 * 32];
    auto A = [&](int i, int k) { return __uint_as_float(warp[(i % 8) * 4 + k % 4].a[i / 8 + 2 * (k / 4)]); };
    auto B = [&](int k, int n) { return __uint_as_float(warp[n * 4 + k % 4].b[k / 4]); };
    const int g = t.linear % 32 / 4, c = t.linear % 4;
    for (int r = 0; r < 4; ++r) {
        const int i = g + 8 * (r / 2), n = 2 * c + r % 2;
        float sum = d[r];
        for (int k = 0; k < 8; ++k) sum += A(i, k) * B(k, n);
        d[r] = sum;
    }
}

// ------------------------------------------------------------------ the scheduler
inline void fiber_main() {
    block().body();
    Thread& t = this_thread();
    bool in_flight = !t.open_group.empty();
    for (const auto& group : t.committed) in_flight = in_flight || !group.empty();
    if (in_flight) fail("a thread exited with cp.async copies in flight");
    t.state = State::done;
    leave_thread(t);
}

// Opens the barrier of the warp whose first lane is `first`, if all its lanes wait there (a lane that
// has exited never reaches it: the warp deadlocks).
inline bool open_warp_barrier(size_t first) {
    Block& b = block();
    const size_t end = std::min(b.threads.size(), first + 32);
    for (size_t i = first; i < end; ++i)
        if (b.threads[i].state != State::at_warp_barrier) return false;
    for (size_t i = first; i < end; ++i) b.threads[i].state = State::runnable;
    return true;
}

// Opens every barrier that all its live threads have reached; false if none could open.
inline bool open_barriers() {
    Block& b = block();
    bool opened = false;
    bool all_at_block_barrier = true, any_at_block_barrier = false;
    for (Thread& t : b.threads) {
        if (t.state == State::at_block_barrier) any_at_block_barrier = true;
        else if (t.state != State::done) all_at_block_barrier = false;
    }
    if (any_at_block_barrier && all_at_block_barrier) {
        for (Thread& t : b.threads)
            if (t.state == State::at_block_barrier) t.state = State::runnable;
        opened = true;
    }
    for (size_t w = 0; w < b.threads.size(); w += 32) opened = open_warp_barrier(w) || opened;
    return opened;
}

inline std::string run_block(dim3 index, size_t shared_bytes) {
    Block& b = block();
    b.index = index;
    b.error.clear();
    SharedRegion& r = shared_region();
    CUDA_CPU_UNPOISON(r.base, r.capacity);
    for (size_t i = 0; i + 4 <= r.capacity; i += 4) memcpy(r.base + i, i < shared_bytes ? &UNWRITTEN : &GUARD, 4);
    CUDA_CPU_POISON(r.base + shared_bytes, r.capacity - shared_bytes);

    const int n = (int)b.threads.size();
    for (int i = 0; i < n; ++i) {
        Thread& t = b.threads[i];
        t.state = State::runnable;
        t.started = false;
        t.open_group.clear();
        t.committed.clear();
        b.collectives[i] = 0;
        getcontext(&t.context);
        t.context.uc_stack.ss_sp = t.stack.data();
        t.context.uc_stack.ss_size = t.stack.size();
        t.context.uc_link = nullptr;
        makecontext(&t.context, fiber_main, 0);
    }
    // schedule 0: sweeps over the threads in order, barriers opened between sweeps (warps in step);
    // schedule 1: always the highest-numbered runnable thread, a warp's barrier opened as soon as its
    // last lane arrives, so the last warp runs ahead to the next block barrier before the others start.
    while (b.error.empty()) {
        bool ran = false, live = false;
        for (int k = 0; k < n && b.error.empty(); ++k) {
            Thread& t = b.threads[b.schedule == 1 ? n - 1 - k : k];
            if (t.state == State::done) continue;
            live = true;
            if (t.state != State::runnable) continue;
            b.current = &t;
            enter_thread(t);
            ran = true;
            if (b.schedule == 1) {
                if (t.state == State::at_warp_barrier) open_warp_barrier(t.linear / 32 * 32);
                break;  // rescan from the top
            }
        }
        if (!live || !b.error.empty()) break;
        if (!ran && !open_barriers()) b.error = "deadlock: the threads of a block wait at different barriers";
        else if (ran && b.schedule == 0) open_barriers();
    }
    CUDA_CPU_UNPOISON(r.base, r.capacity);
    for (size_t i = shared_bytes & ~size_t(3); i + 4 <= r.capacity; i += 4)
        if (i >= shared_bytes && memcmp(r.base + i, &GUARD, 4) != 0)
            return b.error.empty() ? "a store past the launch's dynamic shared memory" : b.error;
    if (!b.error.empty()) {
        char where[96];
        snprintf(where, sizeof where, " (block %u,%u,%u)", index.x, index.y, index.z);
        return b.error + where;
    }
    return "";
}

struct LaunchConfig {
    unsigned grid[3], block[3];
    unsigned long long shared_bytes, max_dynamic_shared_bytes;
    int schedule;
};

// Rejects what the driver would (cudaErrorInvalidConfiguration, ...) and runs the blocks in order.
inline std::string run_grid(const LaunchConfig& c, int max_threads, std::function<void()> body) {
    const unsigned long long threads = (unsigned long long)c.block[0] * c.block[1] * c.block[2];
    if (threads == 0 || threads > MAX_THREADS || c.block[0] > 1024 || c.block[1] > 1024 || c.block[2] > 64)
        return "invalid block dimensions";
    if ((int)threads > max_threads) return "too many threads for the kernel's __launch_bounds__";
    if (c.grid[0] == 0 || c.grid[1] == 0 || c.grid[2] == 0 || c.grid[0] > 2147483647u || c.grid[1] > 65535 ||
        c.grid[2] > 65535)
        return "invalid grid dimensions";
    if (c.shared_bytes > std::min<unsigned long long>(c.max_dynamic_shared_bytes, MAX_SHARED_BYTES))
        return "dynamic shared memory above the kernel's limit (opt in with max_dynamic_shared_size_bytes)";
    if (c.shared_bytes > shared_region().capacity) return "dynamic shared memory larger than the harness array";
    Block& b = block();
    b.dim = {c.block[0], c.block[1], c.block[2]};
    b.grid = {c.grid[0], c.grid[1], c.grid[2]};
    b.schedule = c.schedule;
    b.body = std::move(body);
    b.threads.resize(threads);
    b.exchange[0].assign(threads, 0);
    b.exchange[1].assign(threads, 0);
    b.fragments[0].assign(threads, MmaFragments{});
    b.fragments[1].assign(threads, MmaFragments{});
    b.collectives.assign(threads, 0);
    for (unsigned z = 0, i = 0; z < c.block[2]; ++z)
        for (unsigned y = 0; y < c.block[1]; ++y)
            for (unsigned x = 0; x < c.block[0]; ++x, ++i) {
                b.threads[i].index = {x, y, z};
                b.threads[i].linear = (int)i;
                if (b.threads[i].stack.size() != STACK_BYTES) b.threads[i].stack.assign(STACK_BYTES, 0);
            }
    for (unsigned z = 0; z < c.grid[2]; ++z)
        for (unsigned y = 0; y < c.grid[1]; ++y)
            for (unsigned x = 0; x < c.grid[0]; ++x) {
                std::string error = run_block({x, y, z}, c.shared_bytes);
                if (!error.empty()) return error;
            }
    return "";
}

// A kernel's arguments arrive as cuLaunchKernel takes them: an array of pointers to the values.
template <class... Args, size_t... I>
std::function<void()> bind_arguments(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    return [=] { kernel(*static_cast<std::remove_cv_t<Args>*>(args[I])...); };
}

template <class... Args>
int launch(void (*kernel)(Args...), int max_threads, const LaunchConfig& config, void** args,
           const unsigned long long* arg_bytes, int n_args, char* error, int error_size) {
    const size_t expected[] = {sizeof(Args)..., 0};
    std::string message;
    if (n_args != (int)sizeof...(Args)) message = "expected " + std::to_string(sizeof...(Args)) + " arguments";
    for (int i = 0; message.empty() && i < n_args; ++i)
        if (arg_bytes[i] != expected[i])
            message = "argument " + std::to_string(i) + " has " + std::to_string(arg_bytes[i]) +
                      " bytes, the kernel takes " + std::to_string(expected[i]);
    if (message.empty())
        message = run_grid(config, max_threads, bind_arguments(kernel, args, std::index_sequence_for<Args...>{}));
    snprintf(error, error_size, "%s", message.c_str());
    return message.empty() ? 0 : 1;
}

}  // namespace cuda_cpu

// The PTX instructions a source issues through functions of these names when CUDA_CPU_HARNESS is set.
using cuda_cpu::cp_async_16;
using cuda_cpu::cp_async_commit_group;
using cuda_cpu::cp_async_wait_group;
using cuda_cpu::mma_tf32_m16n8k8;
using cuda_cpu::tf32_round;

#define threadIdx (cuda_cpu::this_thread().index)
#define blockIdx (cuda_cpu::block().index)
#define blockDim (cuda_cpu::block().dim)
#define gridDim (cuda_cpu::block().grid)

inline void __syncthreads() { cuda_cpu::syncthreads(); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    const int lane = cuda_cpu::this_thread().linear % 32;
    return cuda_cpu::shuffle(mask, value, (lane ^ lane_mask) % width + lane / width * width);
}

template <class T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
    const int lane = cuda_cpu::this_thread().linear % 32;
    return cuda_cpu::shuffle(mask, value, src_lane % width + lane / width * width);
}

// One OS thread runs every CUDA thread, so an atomic is a plain read-modify-write.
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
inline float2 atomicAdd(float2* p, float2 v) {  // sm_90: vector atomics on global memory
    const float2 old = *p;
    *p = make_float2(old.x + v.x, old.y + v.y);
    return old;
}
inline float4 atomicAdd(float4* p, float4 v) {
    const float4 old = *p;
    *p = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
    return old;
}

// The wrapper that includes a .cu after this header names its dynamic shared array and exports
// each kernel as `launch_<name>`.
#define CUDA_CPU_DYNAMIC_SHARED(type, name)                                                        \
    alignas(128) type name[cuda_cpu::MAX_SHARED_BYTES / sizeof(type) + 64];                        \
    static const bool name##_registered = [] {                                                     \
        cuda_cpu::shared_region() = {reinterpret_cast<unsigned char*>(name), sizeof(name)};        \
        return true;                                                                               \
    }();

#define CUDA_CPU_EXPORT(name, max_threads)                                                         \
    extern "C" __attribute__((visibility("default"))) int launch_##name(const cuda_cpu::LaunchConfig* config, void** args,                \
                                 const unsigned long long* arg_bytes, int n_args, char* error,     \
                                 int error_size) {                                                 \
        return cuda_cpu::launch(name, max_threads, *config, args, arg_bytes, n_args, error, error_size); \
    }
