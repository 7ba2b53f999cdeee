// Fused token log-probabilities, forward and backward, fp32.
//
//   out[r] = logits[r, t_r] − lse[r],   lse[r] = log Σ_v exp(logits[r, v])        (forward)
//   grad_logits[r, v] = g[r] · (1[v = t_r] − exp(logits[r, v] − lse[r]))         (backward)
//
// Memory layout: logits and grad_logits are contiguous row-major (N, V) float32; targets (N,)
// int64; out, lse, g (N,) float32. One block per row.
//
// Forward: one pass over the row. Each thread keeps a running maximum m and a running sum
// s = Σ exp(x − m) over the elements it reads (when a larger element arrives, s is rescaled by
// exp(m_old − m_new)); the block then merges the (m, s) pairs by a warp-shuffle tree and
// shared memory. The logits are read exactly once and no (N, V) buffer is written: only lse
// is saved for the backward. out = (x_t − m) − log s, not x_t − lse: with logits of 1e30 the
// rounding of m + log s would swallow log s. A NaN or +inf logit makes the row's out and lse NaN
// (as the plain formula's max-shifted exponentials do); a target outside [0, V) gives out = NaN.
// The block's (m, s) merge uses 2 × 8 floats of dynamic shared memory (the launcher passes them).
//
// Backward: one pass over the row, reading each logit once and writing each gradient once.
// grad_logits may be the logits buffer itself (the gradient overwrites the logits in place).
//
// Loads are float4 over the 16-byte-aligned middle of each row; the few elements before the
// first aligned address and after the last whole float4 are read one by one, so any V works
// (V = 50257 rows start at every alignment).

#define NEG_INF (__int_as_float(0xff800000))
#define POS_INF (__int_as_float(0x7f800000))
#define QUIET_NAN (__int_as_float(0x7fc00000))

constexpr int LOGPROB_THREADS = 256;  // threads per row
constexpr int UNROLL = 4;             // float4 loads in flight per thread
constexpr float LOG2E = 1.4426950408889634f;

// e^(x − m) for the running maximum m; while m is −inf (nothing but −inf seen) the shift is 0,
// so a −inf element adds 0 and a NaN adds NaN (fmaxf ignores NaN, so the sum must carry it).
__device__ __forceinline__ float shifted_exp(float x, float m) {
    return exp2f((x - (m == NEG_INF ? 0.f : m)) * LOG2E);
}

// Fold x into the running (m, s).
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
    const float m_new = fmaxf(m, x);
    s = s * shifted_exp(m, m_new) + shifted_exp(x, m_new);
    m = m_new;
}

__device__ __forceinline__ void online_add4(float& m, float& s, float4 x) {
    const float m_new = fmaxf(fmaxf(m, fmaxf(x.x, x.y)), fmaxf(x.z, x.w));
    s = s * shifted_exp(m, m_new) + shifted_exp(x.x, m_new) + shifted_exp(x.y, m_new) + shifted_exp(x.z, m_new)
        + shifted_exp(x.w, m_new);
    m = m_new;
}

// (m, s) ⊕ (m2, s2): the pair of the union of the two sets of elements.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float m_new = fmaxf(m, m2);
    s = s * shifted_exp(m, m_new) + s2 * shifted_exp(m2, m_new);
    m = m_new;
}

// Number of leading elements of `row` to read one by one before the first 16-byte-aligned address.
__device__ __forceinline__ int unaligned_head(const float* row, int V) {
    const int head = (int)(((16u - ((unsigned)(size_t)row & 15u)) & 15u) / 4u);
    return min(head, V);
}

extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS)
token_logprobs_forward(const float* __restrict__ logits, const long long* __restrict__ targets,
                       float* __restrict__ out, float* __restrict__ lse, int V) {
    extern __shared__ float smem[];
    float* warp_m = smem;                          // (LOGPROB_THREADS / 32,)
    float* warp_s = smem + LOGPROB_THREADS / 32;   // (LOGPROB_THREADS / 32,)
    const long long row = blockIdx.x;
    const float* x = logits + row * V;
    const int head = unaligned_head(x, V);
    const int n_vec = (V - head) / 4;
    const float4* xv = reinterpret_cast<const float4*>(x + head);
    const int tid = threadIdx.x;

    float m = NEG_INF, s = 0.f;
    if (tid < head) online_add(m, s, x[tid]);
    int i = tid;
    for (; i + (UNROLL - 1) * LOGPROB_THREADS < n_vec; i += UNROLL * LOGPROB_THREADS) {
        float4 a[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) a[u] = xv[i + u * LOGPROB_THREADS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) online_add4(m, s, a[u]);
    }
    for (; i < n_vec; i += LOGPROB_THREADS) online_add4(m, s, xv[i]);
    for (int j = head + 4 * n_vec + tid; j < V; j += LOGPROB_THREADS) online_add(m, s, x[j]);

#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        merge(m, s, m2, s2);
    }
    if (tid % 32 == 0) {
        warp_m[tid / 32] = m;
        warp_s[tid / 32] = s;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w = 1; w < LOGPROB_THREADS / 32; ++w) merge(m, s, warp_m[w], warp_s[w]);
        const float log_s = logf(s);  // −inf when every logit is −inf: lse = −inf, out = NaN
        const long long t = targets[row];
        lse[row] = m + log_s;
        out[row] = (t >= 0 && t < V) ? (x[t] - m) - log_s : QUIET_NAN;
    }
}

__device__ __forceinline__ float logprob_grad(float x, float lse, float g, bool is_target) {
    return g * ((is_target ? 1.f : 0.f) - exp2f((x - lse) * LOG2E));
}

extern "C" __global__ void __launch_bounds__(LOGPROB_THREADS)
token_logprobs_backward(const float* logits, const long long* __restrict__ targets, const float* __restrict__ lse,
                        const float* __restrict__ grad_out, float* grad_logits, int V) {
    const long long row = blockIdx.x;
    const float* x = logits + row * V;
    float* dx = grad_logits + row * V;
    const long long t = targets[row];
    const float g = grad_out[row];
    const float row_lse = lse[row] == NEG_INF ? POS_INF : lse[row];  // an all −inf row has p = 0
    const int tid = threadIdx.x;

    // float4 only if the two rows share their alignment (true for fresh arrays, or in place)
    const bool same_alignment = (((size_t)x ^ (size_t)dx) & 15u) == 0;
    const int head = same_alignment ? unaligned_head(x, V) : V;
    const int n_vec = (V - head) / 4;
    for (int j = tid; j < head; j += LOGPROB_THREADS) dx[j] = logprob_grad(x[j], row_lse, g, j == t);
    const float4* xv = reinterpret_cast<const float4*>(x + head);
    float4* dxv = reinterpret_cast<float4*>(dx + head);
    for (int i = tid; i < n_vec; i += LOGPROB_THREADS) {
        const float4 a = xv[i];
        const long long j = head + 4LL * i;
        dxv[i] = make_float4(logprob_grad(a.x, row_lse, g, j == t), logprob_grad(a.y, row_lse, g, j + 1 == t),
                             logprob_grad(a.z, row_lse, g, j + 2 == t), logprob_grad(a.w, row_lse, g, j + 3 == t));
    }
    for (int j = head + 4 * n_vec + tid; j < V; j += LOGPROB_THREADS) dx[j] = logprob_grad(x[j], row_lse, g, j == t);
}
