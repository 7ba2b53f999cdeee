// Fused scaled-dot-product attention, forward and backward (FlashAttention-2, Dao 2023), fp32.
//
//   out = softmax(q kᵀ · scale + mask) v          q (BH, T, D), k (BHkv, S, D), v (BHkv, S, D)
//
// Memory layout: q, k, v, out, dq, dk, dv are contiguous row-major float32 arrays of shape
// (BH, rows, D) (BH = batch × heads flattened); lse and delta are (BH, T); key_mask, when given,
// is a (BH, S) uint8 array, 1 where a key may be attended (left padding). D is 32, 64 or 128.
// The forward reads k and v with a head stride (k_stride, v_stride floats from one head's first
// row to the next's; S·D when contiguous), so the first S positions of a longer KV-cache buffer
// (B, H, capacity, D) are read where they are, with no copy.
// Grouped-query attention: k and v may have fewer heads, BHkv = BH / group; query head bh reads
// key/value head bh / group (heads are the innermost batch axis, so that is batch b, head h / group).
//
// Mask: query i may attend key j iff j < S, key_mask[j] != 0 (if given) and, when causal,
// j <= i + (S − T) (bottom-right alignment, as F.scaled_dot_product_attention). A query row
// that may attend no key gets out = 0 and lse = −inf.
//
// Forward (one block per BLOCK_M query rows of one (batch, head)):
//   Q tile stays in shared memory; K and V tiles of BLOCK_N keys stream through shared memory,
//   each copied with cp.async while the other is in use (K_{j+1} during the softmax and P·V_j of
//   tile j, V_{j+1} during S_{j+1} = Q K_{j+1}ᵀ). Per tile: S = Q Kᵀ (8×4 register micro-tile per
//   thread, float4 shared-memory loads), then the
//   online softmax: m_new = max(m, rowmax S), acc ← acc·e^(m−m_new) + e^(S−m_new) V,
//   l ← l·e^(m−m_new) + rowsum e^(S−m_new). At the end out = acc / l and lse = m + log l.
//   Key tiles wholly above the causal diagonal are never loaded. The T×S matrix never exists:
//   only a BLOCK_M×BLOCK_N tile of P in shared memory.
//   Exponentials are exp2f (one instruction) of (x − m)·log2(e): m and lse stay in natural units, so
//   the backward's S·scale − lse is exactly 0 at a row's maximum even for scores of 1e4 (a base-2
//   lse would be rounded twice on the way to natural units and back). S·scale is rounded the same
//   way in both passes (__fmul_rn: never fused into an FMA with the subtraction that follows).
//
// Backward (one block per BLOCK_N keys of one key/value head), after delta = rowsum(dO ∘ O):
//   K_j, V_j stay in shared memory; dK_j, dV_j accumulate in registers. For each of the group's
//   query heads and each of its query tiles i at or below the causal diagonal: recompute S = Q_i K_jᵀ and P = exp(S·scale − lse) (no
//   second softmax pass: lse was saved), dP = dO_i V_jᵀ, dS = P ∘ (dP − delta);
//   dV_j += Pᵀ dO_i, dK_j += scale · dSᵀ Q_i, and dQ_i += scale · dS K_j by atomicAdd into
//   a zeroed fp32 dq (every key block adds its share; a float4 atomic on sm_90). S, dP are 4×4
//   micro-tiles per thread;
//   P and dS go through shared memory for the three products that contract over them. The next
//   Q_i, dO_i tiles are copied (cp.async) while the current ones are used, where shared memory
//   allows it (D <= 64).
//
// Scalars must be passed as np.int32 / np.int64 (the strides) / np.float32 (the launcher does not check types).

#define NEG_INF (__int_as_float(0xff800000))
#define POS_INF (__int_as_float(0x7f800000))

constexpr int BLOCK_M = 64;        // query rows per tile
constexpr int BLOCK_N = 64;        // keys per tile
constexpr int PAD = 4;             // floats of padding per shared row of Q/K/V/dO: spreads rows over banks
constexpr int P_LD = BLOCK_N + 16; // row stride of the P / dS tiles: rows r and r+1 fall 16 banks apart
constexpr int FWD_THREADS = 128;   // forward: 8 row groups × 16 column groups, 8×4 scores each
constexpr int BWD_THREADS = 256;   // backward: 16 × 16 groups, 4×4 scores each
constexpr int DELTA_THREADS = 256; // delta = rowsum(dO ∘ O): one warp per row
constexpr float LOG2E = 1.4426950408889634f;

// ------------------------------------------------------------------ PTX instructions
// cp.async (sm_80+): 16 bytes global → shared without a trip through registers, so the copy of
// the next tile overlaps the arithmetic on this one. src_bytes < 16 zero-fills the rest (rows past
// the end of the sequence). A copy is complete, and its data visible to this thread, only after a
// cp.async.wait_group that retires its commit group; other threads see it after a barrier as well.
// The "memory" clobbers keep the compiler from moving shared-memory accesses across them.
// The CPU execution harness (tests/cuda_cpu/cuda_cpu.h) brings its own model of these three.
#ifndef CUDA_CPU_HARNESS
__device__ __forceinline__ void cp_async_16(float* dst, const float* src, int src_bytes) {
#if __CUDA_ARCH__ >= 800
    const unsigned dst_addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src), "r"(src_bytes)
                 : "memory");
#else
    *reinterpret_cast<float4*>(dst) =
        src_bytes ? *reinterpret_cast<const float4*>(src) : make_float4(0.f, 0.f, 0.f, 0.f);
#endif
}

__device__ __forceinline__ void cp_async_commit_group() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `pending` committed groups of this thread are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait_group() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

// cvt.rna.tf32.f32: x rounded (to nearest, ties away from zero) to TF32's 10 mantissa bits.
__device__ __forceinline__ unsigned tf32_round(float x) {
    unsigned r = __float_as_uint(x);
#if __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#endif
    return r;
}

// mma.sync.m16n8k8 with TF32 inputs and fp32 accumulation (sm_80+), d += A B: a warp-wide
// instruction over the fragments described at "tensor cores" below.
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the launcher uses the tensor-core kernels on sm_80 or newer only
#endif
}
#endif

// ------------------------------------------------------------------ copies

// Rows [row0, row0 + ROWS) of a (rows, D) matrix into shared memory with row stride D + PAD.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async(float* dst, const float* src, int row0, int n_rows) {
    constexpr int CHUNKS = D / 4;  // float4 per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
        int r = c / CHUNKS, col = (c % CHUNKS) * 4;
        bool valid = row0 + r < n_rows;
        const float* from = valid ? src + (size_t)(row0 + r) * D + col : src;
        cp_async_16(dst + r * (D + PAD) + col, from, valid ? 16 : 0);
    }
}

// ------------------------------------------------- per-thread output columns
// A thread owns D/16 of the D output columns: column groups of VEC adjacent floats, so loads
// and stores are float4 (float2 for D = 32) and the 16 threads of a half-warp cover 16·VEC
// contiguous columns.
template <int D>
struct Columns {
    static constexpr int N = D / 16;
    static constexpr int VEC = D >= 64 ? 4 : 2;
    __device__ static __forceinline__ int col(int tx, int e) { return (e / VEC) * (16 * VEC) + tx * VEC + e % VEC; }
};

template <int D>
__device__ __forceinline__ void load_columns(const float* row, int tx, float (&x)[D / 16]) {
    using C = Columns<D>;
#pragma unroll
    for (int g = 0; g < C::N / C::VEC; ++g) {
        if constexpr (C::VEC == 4) {
            float4 t = *reinterpret_cast<const float4*>(row + g * 64 + tx * 4);
            x[4 * g] = t.x; x[4 * g + 1] = t.y; x[4 * g + 2] = t.z; x[4 * g + 3] = t.w;
        } else {
            float2 t = *reinterpret_cast<const float2*>(row + g * 32 + tx * 2);
            x[2 * g] = t.x; x[2 * g + 1] = t.y;
        }
    }
}

template <int D>
__device__ __forceinline__ void store_columns(float* row, int tx, const float (&x)[D / 16], float factor) {
    using C = Columns<D>;
#pragma unroll
    for (int g = 0; g < C::N / C::VEC; ++g) {
        if constexpr (C::VEC == 4) {
            *reinterpret_cast<float4*>(row + g * 64 + tx * 4) =
                make_float4(x[4 * g] * factor, x[4 * g + 1] * factor, x[4 * g + 2] * factor, x[4 * g + 3] * factor);
        } else {
            *reinterpret_cast<float2*>(row + g * 32 + tx * 2) = make_float2(x[2 * g] * factor, x[2 * g + 1] * factor);
        }
    }
}

// row[columns of thread tx] += x · factor, atomically: other blocks add to the same row. One
// vector atomic per VEC adjacent columns on sm_90 (float4 / float2 atomicAdd), VEC scalar ones before.
template <int D>
__device__ __forceinline__ void atomic_add_columns(float* row, int tx, const float (&x)[D / 16], float factor) {
    using C = Columns<D>;
#pragma unroll
    for (int g = 0; g < C::N / C::VEC; ++g) {
        float* at = row + g * 16 * C::VEC + tx * C::VEC;
        const float* xg = x + g * C::VEC;
#if defined(CUDA_CPU_HARNESS) || __CUDA_ARCH__ >= 900
        if constexpr (C::VEC == 4) {
            atomicAdd(reinterpret_cast<float4*>(at), make_float4(xg[0] * factor, xg[1] * factor, xg[2] * factor,
                                                                 xg[3] * factor));
        } else {
            atomicAdd(reinterpret_cast<float2*>(at), make_float2(xg[0] * factor, xg[1] * factor));
        }
#else
#pragma unroll
        for (int u = 0; u < C::VEC; ++u) atomicAdd(at + u, xg[u] * factor);
#endif
    }
}

// at[0] += x, at[1] += y atomically (one float2 atomic on sm_90).
__device__ __forceinline__ void atomic_add2(float* at, float x, float y) {
#if defined(CUDA_CPU_HARNESS) || __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(at), make_float2(x, y));
#else
    atomicAdd(at, x);
    atomicAdd(at + 1, y);
#endif
}

__device__ __forceinline__ float component(const float4& v, int u) {
    return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w;
}

__device__ __forceinline__ float dot4(const float4& a, const float4& b, float acc) {
    return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, fmaf(a.x, b.x, acc))));
}

// Reductions over the 16 lanes of a half-warp (the threads that share a row of scores).
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ bool may_attend(int i, int j, int S, int offset, int causal, const unsigned char* key_mask) {
    return j < S && (!causal || j <= i + offset) && (key_mask == nullptr || key_mask[j] != 0);
}

// ------------------------------------------------------------------ forward
template <int D>
__device__ __forceinline__ void attention_forward_block(const float* __restrict__ q, const float* __restrict__ k,
                                                        const float* __restrict__ v,
                                                        const unsigned char* __restrict__ key_mask,
                                                        float* __restrict__ out, float* __restrict__ lse, int T, int S,
                                                        long long k_stride, long long v_stride, float scale,
                                                        int causal) {
    constexpr int LD = D + PAD;
    constexpr int TM = BLOCK_M / 8;   // query rows per thread: ty + 8·i
    constexpr int TN = BLOCK_N / 16;  // keys per thread: tx + 16·j
    constexpr int NC = Columns<D>::N; // output columns per thread
    extern __shared__ __align__(16) float smem[];
    float* Qs = smem;               // (BLOCK_M, LD)
    float* Ks = Qs + BLOCK_M * LD;  // (BLOCK_N, LD)
    float* Vs = Ks + BLOCK_N * LD;  // (BLOCK_N, LD)
    float* Ps = Vs + BLOCK_N * LD;  // (BLOCK_M, P_LD)

    // grouped-query: blockIdx.z is the key/value head, blockIdx.y one of the gridDim.y query heads that read it
    const int kv_bh = blockIdx.z;
    const int bh = kv_bh * gridDim.y + blockIdx.y;
    // the last query tiles see the most keys: start them first so the tail of the grid is short
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BLOCK_M;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int offset = S - T;
    const float* qb = q + (size_t)bh * T * D;
    const float* kb = k + (size_t)kv_bh * k_stride;
    const float* vb = v + (size_t)kv_bh * v_stride;
    const unsigned char* mb = key_mask ? key_mask + (size_t)bh * S : nullptr;

    // keys any row of this tile may see: causal tiles past the diagonal are skipped entirely
    int n_keys = S;
    if (causal) n_keys = min(S, max(0, min(q0 + BLOCK_M, T) + offset));
    const int n_tiles = (n_keys + BLOCK_N - 1) / BLOCK_N;

    if (n_tiles > 0) load_tile_async<D, BLOCK_M, FWD_THREADS>(Qs, qb, q0, T);
    cp_async_commit_group();
    if (n_tiles > 0) load_tile_async<D, BLOCK_N, FWD_THREADS>(Ks, kb, 0, S);
    cp_async_commit_group();
    if (n_tiles > 0) load_tile_async<D, BLOCK_N, FWD_THREADS>(Vs, vb, 0, S);
    cp_async_commit_group();

    float m[TM], l[TM], acc[TM][NC];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        m[i] = NEG_INF;
        l[i] = 0.f;
#pragma unroll
        for (int e = 0; e < NC; ++e) acc[i][e] = 0.f;
    }

    for (int t = 0; t < n_tiles; ++t) {
        const int k0 = t * BLOCK_N;
        cp_async_wait_group<1>();  // Q and K_t have landed (V_t may still be in flight)
        __syncthreads();

        float s[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) s[i][j] = 0.f;
#pragma unroll 4
        for (int kk = 0; kk < D; kk += 4) {
            float4 qv[TM], kv[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) qv[i] = *reinterpret_cast<const float4*>(Qs + (ty + 8 * i) * LD + kk);
#pragma unroll
            for (int j = 0; j < TN; ++j) kv[j] = *reinterpret_cast<const float4*>(Ks + (tx + 16 * j) * LD + kk);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) s[i][j] = dot4(qv[i], kv[j], s[i][j]);
        }
        __syncthreads();  // every thread is done with Ks
        if (t + 1 < n_tiles) load_tile_async<D, BLOCK_N, FWD_THREADS>(Ks, kb, k0 + BLOCK_N, S);
        cp_async_commit_group();

        // online softmax
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int row = q0 + ty + 8 * i;
            float tile_max = NEG_INF;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                s[i][j] = may_attend(row, k0 + tx + 16 * j, S, offset, causal, mb) ? __fmul_rn(s[i][j], scale) : NEG_INF;
                tile_max = fmaxf(tile_max, s[i][j]);
            }
            const float m_new = fmaxf(m[i], half_warp_max(tile_max));
            const float m_use = m_new == NEG_INF ? 0.f : m_new;  // a row that has seen no key yet
            const float alpha = exp2f((m[i] - m_use) * LOG2E);
            m[i] = m_new;
            l[i] *= alpha;
#pragma unroll
            for (int e = 0; e < NC; ++e) acc[i][e] *= alpha;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const float p = exp2f((s[i][j] - m_use) * LOG2E);
                l[i] += p;  // a partial sum per thread; the 16 partial sums are added once, at the end
                Ps[(ty + 8 * i) * P_LD + tx + 16 * j] = p;
            }
        }
        cp_async_wait_group<1>();  // V_t has landed (K_{t+1} may still be in flight)
        __syncthreads();  // ... and P is in shared memory

#pragma unroll 2
        for (int c = 0; c < BLOCK_N; c += 4) {
            float4 pv[TM];
#pragma unroll
            for (int i = 0; i < TM; ++i) pv[i] = *reinterpret_cast<const float4*>(Ps + (ty + 8 * i) * P_LD + c);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                float vv[NC];
                load_columns<D>(Vs + (c + u) * LD, tx, vv);
#pragma unroll
                for (int i = 0; i < TM; ++i) {
                    const float p = component(pv[i], u);
#pragma unroll
                    for (int e = 0; e < NC; ++e) acc[i][e] = fmaf(p, vv[e], acc[i][e]);
                }
            }
        }
        __syncthreads();  // every thread is done with Vs and Ps
        if (t + 1 < n_tiles) load_tile_async<D, BLOCK_N, FWD_THREADS>(Vs, vb, k0 + BLOCK_N, S);
        cp_async_commit_group();
    }  // the last tile's two commit groups are empty: no copy is in flight past here

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = q0 + ty + 8 * i;
        const float l_row = half_warp_sum(l[i]);
        if (row < T) {
            const size_t at = (size_t)bh * T + row;
            store_columns<D>(out + at * D, tx, acc[i], l_row > 0.f ? 1.f / l_row : 0.f);
            if (tx == 0) lse[at] = l_row > 0.f ? m[i] + logf(l_row) : NEG_INF;
        }
    }
}

// ---------------------------------------------------------------- backward
// delta[r] = Σ_n dO[r, n] · O[r, n], the row term of the softmax gradient (one warp per row).
extern "C" __global__ void __launch_bounds__(DELTA_THREADS)
attention_backward_delta(const float* __restrict__ out, const float* __restrict__ dout, float* __restrict__ delta,
                         int rows, int D) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * (DELTA_THREADS / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const float4* o = reinterpret_cast<const float4*>(out + row * D);
    const float4* g = reinterpret_cast<const float4*>(dout + row * D);
    float sum = 0.f;
    for (int c = lane; c < D / 4; c += 32) sum = dot4(o[c], g[c], sum);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) delta[row] = sum;
}

// Query tiles are double-buffered (the next Q, dO tile is copied while this one is used) where
// shared memory allows: D <= 64. For D = 128 one buffer already takes 176 KB.
template <int D>
struct BackwardStages {
    static constexpr int N = D <= 64 ? 2 : 1;
};

template <int D>
__device__ __forceinline__ void attention_backward_block(const float* __restrict__ q, const float* __restrict__ k,
                                                         const float* __restrict__ v,
                                                         const unsigned char* __restrict__ key_mask,
                                                         const float* __restrict__ lse,
                                                         const float* __restrict__ delta,
                                                         const float* __restrict__ dout, float* __restrict__ dq,
                                                         float* __restrict__ dk, float* __restrict__ dv, int T, int S,
                                                         int group, float scale, int causal) {
    constexpr int LD = D + PAD;
    constexpr int TM = BLOCK_M / 16;  // score rows per thread: ty + 16·i
    constexpr int TN = BLOCK_N / 16;  // score columns per thread: tx + 16·j
    constexpr int NC = Columns<D>::N;
    constexpr int TK = BLOCK_N / 16;  // dK/dV rows per thread: ty·4 + i
    constexpr int TQ = BLOCK_M / 16;  // dQ rows per thread: ty + 16·i (ty·4 + i would put the two
                                      // rows a warp reads of dS in the same bank: 4·P_LD ≡ 0 mod 32)
    constexpr int STAGES = BackwardStages<D>::N;
    extern __shared__ __align__(16) float smem[];
    float* Ks = smem;                            // (BLOCK_N, LD), resident
    float* Vs = Ks + BLOCK_N * LD;               // (BLOCK_N, LD), resident
    float* Q_stages = Vs + BLOCK_N * LD;         // STAGES × (BLOCK_M, LD)
    float* dO_stages = Q_stages + STAGES * BLOCK_M * LD;  // STAGES × (BLOCK_M, LD)
    float* Ps = dO_stages + STAGES * BLOCK_M * LD;        // (BLOCK_M, P_LD)
    float* dSs = Ps + BLOCK_M * P_LD;                     // (BLOCK_M, P_LD)

    const int kv_bh = blockIdx.y;  // the query heads kv_bh·group + g (g < group) read these keys
    const int k0 = blockIdx.x * BLOCK_N;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int offset = S - T;
    const float* kb = k + (size_t)kv_bh * S * D;
    const float* vb = v + (size_t)kv_bh * S * D;

    // causal: query i sees key k0 only if i >= k0 − offset; earlier query tiles are skipped.
    // Steps walk the query tiles of each query head of the group in turn.
    const int first_query = causal ? max(0, k0 - offset) : 0;
    const int first_tile = first_query / BLOCK_M;
    const int tiles_per_head = first_query < T ? (T + BLOCK_M - 1) / BLOCK_M - first_tile : 0;
    const int n_steps = group * tiles_per_head;
    auto head_of = [&](int step) { return kv_bh * group + step / tiles_per_head; };
    auto tile_of = [&](int step) { return first_tile + step % tiles_per_head; };
    auto load_query_tile = [&](int step, int stage) {
        const size_t at = (size_t)head_of(step) * T * D;
        load_tile_async<D, BLOCK_M, BWD_THREADS>(Q_stages + stage * BLOCK_M * LD, q + at, tile_of(step) * BLOCK_M, T);
        load_tile_async<D, BLOCK_M, BWD_THREADS>(dO_stages + stage * BLOCK_M * LD, dout + at, tile_of(step) * BLOCK_M,
                                                 T);
    };

    if (n_steps > 0) {  // else no query sees these keys: dK = dV = 0
        load_tile_async<D, BLOCK_N, BWD_THREADS>(Ks, kb, k0, S);
        load_tile_async<D, BLOCK_N, BWD_THREADS>(Vs, vb, k0, S);
    }
    cp_async_commit_group();
    if (STAGES == 2 && n_steps > 0) load_query_tile(0, 0);
    cp_async_commit_group();

    float dk_acc[TK][NC], dv_acc[TK][NC];
#pragma unroll
    for (int i = 0; i < TK; ++i)
#pragma unroll
        for (int e = 0; e < NC; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;

    for (int step = 0; step < n_steps; ++step) {
        const int bh = head_of(step);
        const int q0 = tile_of(step) * BLOCK_M;
        const unsigned char* mb = key_mask ? key_mask + (size_t)bh * S : nullptr;
        const int stage = STAGES == 2 ? step & 1 : 0;
        const float* Qs = Q_stages + stage * BLOCK_M * LD;
        const float* dOs = dO_stages + stage * BLOCK_M * LD;
        if constexpr (STAGES == 2) {
            if (step + 1 < n_steps) load_query_tile(step + 1, stage ^ 1);
            cp_async_commit_group();
            cp_async_wait_group<1>();  // this tile has landed; the next one may still be in flight
        } else {
            load_query_tile(step, 0);
            cp_async_commit_group();
            cp_async_wait_group<0>();
        }
        // lse (+inf where P must be 0: rows past T, rows that attend nothing) and delta
        float row_lse[TM], row_delta[TM];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int row = q0 + ty + 16 * i;
            const float l = row < T ? lse[(size_t)bh * T + row] : NEG_INF;
            row_lse[i] = l == NEG_INF ? POS_INF : l;
            row_delta[i] = row < T ? delta[(size_t)bh * T + row] : 0.f;
        }
        __syncthreads();

        // S = Q Kᵀ and dP = dO Vᵀ on the same 4×4 micro-tile
        float s[TM][TN], dp[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) s[i][j] = dp[i][j] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < D; kk += 4) {
            float4 qv[TM], gv[TM], kv[TN], vv[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                qv[i] = *reinterpret_cast<const float4*>(Qs + (ty + 16 * i) * LD + kk);
                gv[i] = *reinterpret_cast<const float4*>(dOs + (ty + 16 * i) * LD + kk);
            }
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                kv[j] = *reinterpret_cast<const float4*>(Ks + (tx + 16 * j) * LD + kk);
                vv[j] = *reinterpret_cast<const float4*>(Vs + (tx + 16 * j) * LD + kk);
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                    s[i][j] = dot4(qv[i], kv[j], s[i][j]);
                    dp[i][j] = dot4(gv[i], vv[j], dp[i][j]);
                }
        }
        // P = exp(S·scale − lse) and dS = P ∘ (dP − delta), into shared memory
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int r = ty + 16 * i;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int c = tx + 16 * j;
                const float p = may_attend(q0 + r, k0 + c, S, offset, causal, mb)
                                    ? exp2f((__fmul_rn(s[i][j], scale) - row_lse[i]) * LOG2E) : 0.f;
                Ps[r * P_LD + c] = p;
                dSs[r * P_LD + c] = p * (dp[i][j] - row_delta[i]);
            }
        }
        __syncthreads();

        // dV += Pᵀ dO and dK += dSᵀ Q for keys ty·4 + i
#pragma unroll 2
        for (int r = 0; r < BLOCK_M; ++r) {
            const float4 pr = *reinterpret_cast<const float4*>(Ps + r * P_LD + ty * TK);
            const float4 dsr = *reinterpret_cast<const float4*>(dSs + r * P_LD + ty * TK);
            float gr[NC], qr[NC];
            load_columns<D>(dOs + r * LD, tx, gr);
            load_columns<D>(Qs + r * LD, tx, qr);
#pragma unroll
            for (int i = 0; i < TK; ++i) {
                const float p = component(pr, i), ds = component(dsr, i);
#pragma unroll
                for (int e = 0; e < NC; ++e) {
                    dv_acc[i][e] = fmaf(p, gr[e], dv_acc[i][e]);
                    dk_acc[i][e] = fmaf(ds, qr[e], dk_acc[i][e]);
                }
            }
        }

        // dQ += dS K for queries ty + 16·i, added atomically: other key blocks add to the same rows
        float dq_acc[TQ][NC];
#pragma unroll
        for (int i = 0; i < TQ; ++i)
#pragma unroll
            for (int e = 0; e < NC; ++e) dq_acc[i][e] = 0.f;
#pragma unroll 2
        for (int c = 0; c < BLOCK_N; c += 4) {
            float4 dsv[TQ];
#pragma unroll
            for (int i = 0; i < TQ; ++i) dsv[i] = *reinterpret_cast<const float4*>(dSs + (ty + 16 * i) * P_LD + c);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                float kr[NC];
                load_columns<D>(Ks + (c + u) * LD, tx, kr);
#pragma unroll
                for (int i = 0; i < TQ; ++i) {
                    const float ds = component(dsv[i], u);
#pragma unroll
                    for (int e = 0; e < NC; ++e) dq_acc[i][e] = fmaf(ds, kr[e], dq_acc[i][e]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < TQ; ++i) {
            const int row = q0 + ty + 16 * i;
            if (row < T) atomic_add_columns<D>(dq + ((size_t)bh * T + row) * D, tx, dq_acc[i], scale);
        }
        __syncthreads();  // before the next tile's copies and P, dS overwrite these buffers
    }  // the last step's commit group is empty or already retired: no copy is in flight past here

#pragma unroll
    for (int i = 0; i < TK; ++i) {
        const int key = k0 + ty * TK + i;
        if (key < S) {
            const size_t at = ((size_t)kv_bh * S + key) * D;
            store_columns<D>(dv + at, tx, dv_acc[i], 1.f);
            store_columns<D>(dk + at, tx, dk_acc[i], scale);
        }
    }
}

// ------------------------------------------------------------ tensor cores
// The same two passes with every matrix product on tensor cores: mma.sync.m16n8k8 with TF32
// inputs (sm_80+), one warp computing a 16 × 8 tile of D += A B per instruction, A (16 × 8) and
// B (8 × 8) in registers spread over its 32 lanes. Lane l holds (g = l / 4, c = l % 4):
//   A: a0 = A[g][c], a1 = A[g + 8][c], a2 = A[g][c + 4], a3 = A[g + 8][c + 4]
//   B: b0 = B[c][g], b1 = B[c + 4][g]
//   D: d0 = D[g][2c], d1 = D[g][2c + 1], d2 = D[g + 8][2c], d3 = D[g + 8][2c + 1]
// TF32 keeps 10 of fp32's 23 mantissa bits. 3xTF32 (as PyTorch's fp32 SDPA on tensor cores):
// x = big + small with big = tf32(x), small = tf32(x − big), and A B ≈ big·big + big·small +
// small·big; the dropped small·small term is below fp32 rounding. Operands are read from the same
// shared-memory tiles as the SIMT kernels above, so the copies, barriers and online softmax are
// theirs; only who computes which score changes.
struct Tf32x2 {  // x = big + small, both TF32 bit patterns
    unsigned big, small;
};

__device__ __forceinline__ Tf32x2 split_tf32(float x) {
    const unsigned big = tf32_round(x);
    return {big, tf32_round(x - __uint_as_float(big))};
}

// d += A B in 3xTF32, from the split fragments of A (4 per lane) and B (2 per lane).
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const Tf32x2 (&a)[4], const Tf32x2 (&b)[2]) {
    const unsigned a_big[4] = {a[0].big, a[1].big, a[2].big, a[3].big};
    const unsigned a_small[4] = {a[0].small, a[1].small, a[2].small, a[3].small};
    const unsigned b_big[2] = {b[0].big, b[1].big}, b_small[2] = {b[0].small, b[1].small};
    mma_tf32_m16n8k8(d, a_small, b_big);  // the small terms first: they are added at their own scale
    mma_tf32_m16n8k8(d, a_big, b_small);
    mma_tf32_m16n8k8(d, a_big, b_big);
}

// The A fragment of the 16 × 8 block at (row0, k0) of a row-major shared tile with row stride ld,
// or of its transpose (A[i][k] = tile[k][i]) when TRANSPOSED.
template <bool TRANSPOSED>
__device__ __forceinline__ void load_a(Tf32x2 (&a)[4], const float* tile, int ld, int row0, int k0, int g, int c) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int i = row0 + g + 8 * (r % 2), k = k0 + c + 4 * (r / 2);
        a[r] = split_tf32(TRANSPOSED ? tile[k * ld + i] : tile[i * ld + k]);
    }
}

// The B fragment of the 8 × 8 block at (k0, n0) of B, where B[k][n] = tile[n][k] (K_TIMES_N false:
// a tile whose rows are B's columns, as K for S = Q Kᵀ) or tile[k][n] (K_TIMES_N true, as V for P V).
template <bool K_TIMES_N>
__device__ __forceinline__ void load_b(Tf32x2 (&b)[2], const float* tile, int ld, int k0, int n0, int g, int c) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int k = k0 + c + 4 * r, n = n0 + g;
        b[r] = split_tf32(K_TIMES_N ? tile[k * ld + n] : tile[n * ld + k]);
    }
}

// Forward: warp w owns query rows 16w .. 16w + 15 of the tile; lane (g, c) holds, of each row g and
// g + 8, the scores of keys 8j + 2c, 8j + 2c + 1 (j < 8) and the output columns 8n + 2c, 8n + 2c + 1.
template <int D>
__device__ __forceinline__ void attention_forward_tc_block(const float* __restrict__ q, const float* __restrict__ k,
                                                           const float* __restrict__ v,
                                                           const unsigned char* __restrict__ key_mask,
                                                           float* __restrict__ out, float* __restrict__ lse, int T,
                                                           int S, long long k_stride, long long v_stride,
                                                           float scale, int causal) {
    constexpr int LD = D + PAD;
    constexpr int NT = BLOCK_N / 8;  // 8-key column tiles of S
    constexpr int NO = D / 8;        // 8-column tiles of the output
    extern __shared__ __align__(16) float smem[];
    float* Qs = smem;               // (BLOCK_M, LD)
    float* Ks = Qs + BLOCK_M * LD;  // (BLOCK_N, LD)
    float* Vs = Ks + BLOCK_N * LD;  // (BLOCK_N, LD)
    float* Ps = Vs + BLOCK_N * LD;  // (BLOCK_M, P_LD)

    const int kv_bh = blockIdx.z;
    const int bh = kv_bh * gridDim.y + blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BLOCK_M;
    const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
    const int row0 = 16 * warp;  // this warp's first row in the tile
    const int offset = S - T;
    const float* qb = q + (size_t)bh * T * D;
    const float* kb = k + (size_t)kv_bh * k_stride;
    const float* vb = v + (size_t)kv_bh * v_stride;
    const unsigned char* mb = key_mask ? key_mask + (size_t)bh * S : nullptr;

    int n_keys = S;
    if (causal) n_keys = min(S, max(0, min(q0 + BLOCK_M, T) + offset));
    const int n_tiles = (n_keys + BLOCK_N - 1) / BLOCK_N;

    if (n_tiles > 0) load_tile_async<D, BLOCK_M, FWD_THREADS>(Qs, qb, q0, T);
    cp_async_commit_group();
    if (n_tiles > 0) load_tile_async<D, BLOCK_N, FWD_THREADS>(Ks, kb, 0, S);
    cp_async_commit_group();
    if (n_tiles > 0) load_tile_async<D, BLOCK_N, FWD_THREADS>(Vs, vb, 0, S);
    cp_async_commit_group();

    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, acc[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[n][r] = 0.f;

    for (int t = 0; t < n_tiles; ++t) {
        const int k0 = t * BLOCK_N;
        cp_async_wait_group<1>();  // Q and K_t have landed (V_t may still be in flight)
        __syncthreads();

        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[j][r] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < D; kk += 8) {
            Tf32x2 a[4];
            load_a<false>(a, Qs, LD, row0, kk, g, c);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                Tf32x2 b[2];
                load_b<false>(b, Ks, LD, kk, 8 * j, g, c);
                mma_3xtf32(s[j], a, b);
            }
        }
        __syncthreads();  // every warp is done with Ks
        if (t + 1 < n_tiles) load_tile_async<D, BLOCK_N, FWD_THREADS>(Ks, kb, k0 + BLOCK_N, S);
        cp_async_commit_group();

        // online softmax of rows g (h = 0) and g + 8 (h = 1); the 4 lanes of a row hold 16 scores each
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = q0 + row0 + g + 8 * h;
            float tile_max = NEG_INF;
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = s[j][2 * h + e];
                    x = may_attend(row, k0 + 8 * j + 2 * c + e, S, offset, causal, mb) ? __fmul_rn(x, scale) : NEG_INF;
                    tile_max = fmaxf(tile_max, x);
                }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float m_new = fmaxf(m[h], tile_max);
            const float m_use = m_new == NEG_INF ? 0.f : m_new;
            const float alpha = exp2f((m[h] - m_use) * LOG2E);
            m[h] = m_new;
            l[h] *= alpha;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                acc[n][2 * h] *= alpha;
                acc[n][2 * h + 1] *= alpha;
            }
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f((s[j][2 * h + e] - m_use) * LOG2E);
                    l[h] += p;
                    Ps[(row0 + g + 8 * h) * P_LD + 8 * j + 2 * c + e] = p;
                }
        }
        cp_async_wait_group<1>();  // V_t has landed (K_{t+1} may still be in flight)
        __syncthreads();           // ... and P is in shared memory

#pragma unroll 2
        for (int kk = 0; kk < BLOCK_N; kk += 8) {
            Tf32x2 a[4];
            load_a<false>(a, Ps, P_LD, row0, kk, g, c);
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                Tf32x2 b[2];
                load_b<true>(b, Vs, LD, kk, 8 * n, g, c);
                mma_3xtf32(acc[n], a, b);
            }
        }
        __syncthreads();  // every warp is done with Vs and Ps
        if (t + 1 < n_tiles) load_tile_async<D, BLOCK_N, FWD_THREADS>(Vs, vb, k0 + BLOCK_N, S);
        cp_async_commit_group();
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l_row = l[h] + __shfl_xor_sync(0xffffffffu, l[h], 1);
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
        const int row = q0 + row0 + g + 8 * h;
        if (row < T) {
            const size_t at = (size_t)bh * T + row;
            const float factor = l_row > 0.f ? 1.f / l_row : 0.f;
#pragma unroll
            for (int n = 0; n < NO; ++n)
                *reinterpret_cast<float2*>(out + at * D + 8 * n + 2 * c) =
                    make_float2(acc[n][2 * h] * factor, acc[n][2 * h + 1] * factor);
            if (c == 0) lse[at] = l_row > 0.f ? m[h] + logf(l_row) : NEG_INF;
        }
    }
}

// Backward: 8 warps. For S, dP and dQ, warp w owns query rows 16 (w % 4) .. + 15 of the tile, and
// keys 32 (w / 4) .. + 31 (S, dP) or columns (D / 2)(w / 4) .. of dQ; for dK, dV it owns keys
// 16 (w % 4) .. + 15 and columns (D / 2)(w / 4) ..: the products over queries read P and dS transposed.
template <int D>
__device__ __forceinline__ void attention_backward_tc_block(const float* __restrict__ q,
                                                            const float* __restrict__ k,
                                                            const float* __restrict__ v,
                                                            const unsigned char* __restrict__ key_mask,
                                                            const float* __restrict__ lse,
                                                            const float* __restrict__ delta,
                                                            const float* __restrict__ dout, float* __restrict__ dq,
                                                            float* __restrict__ dk, float* __restrict__ dv, int T,
                                                            int S, int group, float scale, int causal) {
    constexpr int LD = D + PAD;
    constexpr int NT = BLOCK_N / 2 / 8;  // 8-key column tiles of S per warp
    constexpr int NO = D / 2 / 8;        // 8-column tiles of dQ, dK, dV per warp
    constexpr int STAGES = BackwardStages<D>::N;
    extern __shared__ __align__(16) float smem[];
    float* Ks = smem;
    float* Vs = Ks + BLOCK_N * LD;
    float* Q_stages = Vs + BLOCK_N * LD;
    float* dO_stages = Q_stages + STAGES * BLOCK_M * LD;
    float* Ps = dO_stages + STAGES * BLOCK_M * LD;
    float* dSs = Ps + BLOCK_M * P_LD;

    const int kv_bh = blockIdx.y;
    const int k0 = blockIdx.x * BLOCK_N;
    const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
    const int row0 = 16 * (warp % 4);        // query rows (S, dP, dQ) or keys (dK, dV) of this warp
    const int key0 = (BLOCK_N / 2) * (warp / 4);
    const int col0 = (D / 2) * (warp / 4);
    const int offset = S - T;
    const float* kb = k + (size_t)kv_bh * S * D;
    const float* vb = v + (size_t)kv_bh * S * D;

    const int first_query = causal ? max(0, k0 - offset) : 0;
    const int first_tile = first_query / BLOCK_M;
    const int tiles_per_head = first_query < T ? (T + BLOCK_M - 1) / BLOCK_M - first_tile : 0;
    const int n_steps = group * tiles_per_head;
    auto head_of = [&](int step) { return kv_bh * group + step / tiles_per_head; };
    auto tile_of = [&](int step) { return first_tile + step % tiles_per_head; };
    auto load_query_tile = [&](int step, int stage) {
        const size_t at = (size_t)head_of(step) * T * D;
        load_tile_async<D, BLOCK_M, BWD_THREADS>(Q_stages + stage * BLOCK_M * LD, q + at, tile_of(step) * BLOCK_M, T);
        load_tile_async<D, BLOCK_M, BWD_THREADS>(dO_stages + stage * BLOCK_M * LD, dout + at, tile_of(step) * BLOCK_M,
                                                 T);
    };

    if (n_steps > 0) {
        load_tile_async<D, BLOCK_N, BWD_THREADS>(Ks, kb, k0, S);
        load_tile_async<D, BLOCK_N, BWD_THREADS>(Vs, vb, k0, S);
    }
    cp_async_commit_group();
    if (STAGES == 2 && n_steps > 0) load_query_tile(0, 0);
    cp_async_commit_group();

    float dk_acc[NO][4], dv_acc[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) dk_acc[n][r] = dv_acc[n][r] = 0.f;

    for (int step = 0; step < n_steps; ++step) {
        const int bh = head_of(step);
        const int q0 = tile_of(step) * BLOCK_M;
        const unsigned char* mb = key_mask ? key_mask + (size_t)bh * S : nullptr;
        const int stage = STAGES == 2 ? step & 1 : 0;
        const float* Qs = Q_stages + stage * BLOCK_M * LD;
        const float* dOs = dO_stages + stage * BLOCK_M * LD;
        if constexpr (STAGES == 2) {
            if (step + 1 < n_steps) load_query_tile(step + 1, stage ^ 1);
            cp_async_commit_group();
            cp_async_wait_group<1>();
        } else {
            load_query_tile(step, 0);
            cp_async_commit_group();
            cp_async_wait_group<0>();
        }
        float row_lse[2], row_delta[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = q0 + row0 + g + 8 * h;
            const float l = row < T ? lse[(size_t)bh * T + row] : NEG_INF;
            row_lse[h] = l == NEG_INF ? POS_INF : l;
            row_delta[h] = row < T ? delta[(size_t)bh * T + row] : 0.f;
        }
        __syncthreads();

        // S = Q Kᵀ and dP = dO Vᵀ for this warp's 16 queries × 32 keys
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) s[j][r] = dp[j][r] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < D; kk += 8) {
            Tf32x2 aq[4], ag[4];
            load_a<false>(aq, Qs, LD, row0, kk, g, c);
            load_a<false>(ag, dOs, LD, row0, kk, g, c);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                Tf32x2 bk[2], bv[2];
                load_b<false>(bk, Ks, LD, kk, key0 + 8 * j, g, c);
                load_b<false>(bv, Vs, LD, kk, key0 + 8 * j, g, c);
                mma_3xtf32(s[j], aq, bk);
                mma_3xtf32(dp[j], ag, bv);
            }
        }
        // P = exp(S·scale − lse) and dS = P ∘ (dP − delta), into shared memory
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int h = r / 2, i = row0 + g + 8 * h, col = key0 + 8 * j + 2 * c + r % 2;
                const float p = may_attend(q0 + i, k0 + col, S, offset, causal, mb)
                                    ? exp2f((__fmul_rn(s[j][r], scale) - row_lse[h]) * LOG2E) : 0.f;
                Ps[i * P_LD + col] = p;
                dSs[i * P_LD + col] = p * (dp[j][r] - row_delta[h]);
            }
        __syncthreads();

        // dV += Pᵀ dO and dK += dSᵀ Q for keys row0 .. row0 + 15, columns col0 .. col0 + D/2 − 1
#pragma unroll 2
        for (int kk = 0; kk < BLOCK_M; kk += 8) {
            Tf32x2 ap[4], ads[4];
            load_a<true>(ap, Ps, P_LD, row0, kk, g, c);
            load_a<true>(ads, dSs, P_LD, row0, kk, g, c);
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                Tf32x2 bg[2], bq[2];
                load_b<true>(bg, dOs, LD, kk, col0 + 8 * n, g, c);
                load_b<true>(bq, Qs, LD, kk, col0 + 8 * n, g, c);
                mma_3xtf32(dv_acc[n], ap, bg);
                mma_3xtf32(dk_acc[n], ads, bq);
            }
        }

        // dQ += dS K for queries row0 .. row0 + 15, columns col0 .., added atomically
        float dq_acc[NO][4];
#pragma unroll
        for (int n = 0; n < NO; ++n)
#pragma unroll
            for (int r = 0; r < 4; ++r) dq_acc[n][r] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < BLOCK_N; kk += 8) {
            Tf32x2 ads[4];
            load_a<false>(ads, dSs, P_LD, row0, kk, g, c);
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                Tf32x2 bk[2];
                load_b<true>(bk, Ks, LD, kk, col0 + 8 * n, g, c);
                mma_3xtf32(dq_acc[n], ads, bk);
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = q0 + row0 + g + 8 * h;
            if (row < T) {
                float* dq_row = dq + ((size_t)bh * T + row) * D + col0 + 2 * c;
#pragma unroll
                for (int n = 0; n < NO; ++n)
                    atomic_add2(dq_row + 8 * n, dq_acc[n][2 * h] * scale, dq_acc[n][2 * h + 1] * scale);
            }
        }
        __syncthreads();  // before the next tile's copies and P, dS overwrite these buffers
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int key = k0 + row0 + g + 8 * h;
        if (key < S) {
            const size_t at = ((size_t)kv_bh * S + key) * D + col0 + 2 * c;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                *reinterpret_cast<float2*>(dv + at + 8 * n) = make_float2(dv_acc[n][2 * h], dv_acc[n][2 * h + 1]);
                *reinterpret_cast<float2*>(dk + at + 8 * n) =
                    make_float2(dk_acc[n][2 * h] * scale, dk_acc[n][2 * h + 1] * scale);
            }
        }
    }
}

// --------------------------------------------------------- entry points
// Grid: forward (ceil(T / BLOCK_M), group, BHkv) × FWD_THREADS, backward (ceil(S / BLOCK_N), BHkv) × BWD_THREADS;
// dynamic shared memory as computed by minirlhf/kernels/attention.py.
#define ATTENTION_ENTRY_POINTS(D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS)                                                     \
    attention_forward_d##D(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v, \
                           const unsigned char* __restrict__ key_mask, float* __restrict__ out,                   \
                           float* __restrict__ lse, int T, int S, long long k_stride, long long v_stride,        \
                           float scale, int causal) {                                                             \
        attention_forward_block<D>(q, k, v, key_mask, out, lse, T, S, k_stride, v_stride, scale, causal);         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS)                                                     \
    attention_backward_d##D(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,\
                            const unsigned char* __restrict__ key_mask, const float* __restrict__ lse,            \
                            const float* __restrict__ delta, const float* __restrict__ dout,                      \
                            float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, int T, int S, \
                            int group, float scale, int causal) {                                                 \
        attention_backward_block<D>(q, k, v, key_mask, lse, delta, dout, dq, dk, dv, T, S, group, scale, causal); \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS)                                                     \
    attention_forward_tc_d##D(const float* __restrict__ q, const float* __restrict__ k,                           \
                              const float* __restrict__ v, const unsigned char* __restrict__ key_mask,            \
                              float* __restrict__ out, float* __restrict__ lse, int T, int S, long long k_stride, \
                              long long v_stride, float scale, int causal) {                                      \
        attention_forward_tc_block<D>(q, k, v, key_mask, out, lse, T, S, k_stride, v_stride, scale, causal);      \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS)                                                     \
    attention_backward_tc_d##D(const float* __restrict__ q, const float* __restrict__ k,                          \
                               const float* __restrict__ v, const unsigned char* __restrict__ key_mask,           \
                               const float* __restrict__ lse, const float* __restrict__ delta,                    \
                               const float* __restrict__ dout, float* __restrict__ dq, float* __restrict__ dk,    \
                               float* __restrict__ dv, int T, int S, int group, float scale, int causal) {        \
        attention_backward_tc_block<D>(q, k, v, key_mask, lse, delta, dout, dq, dk, dv, T, S, group, scale,       \
                                       causal);                                                                   \
    }

ATTENTION_ENTRY_POINTS(32)
ATTENTION_ENTRY_POINTS(64)
ATTENTION_ENTRY_POINTS(128)
