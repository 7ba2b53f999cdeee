"""Fused scaled-dot-product attention on the GPU (FlashAttention-2, Dao 2023): CuPy launchers for attention.cu.

    out = softmax(q kᵀ · scale + mask) v,   q (..., Hq, T, d), k (..., Hkv, S, d), v (..., Hkv, S, d)

Forward: one CUDA block per 64 query rows of one (batch, head). Keys and values stream through
shared memory 64 at a time; each thread holds an 8 × 4 patch of the 64 × 64 score tile in
registers and keeps, per query row, the running maximum m and sum l of the online softmax
(acc ← e^(m−m')·acc + e^(S−m')·V). Only out and the row log-sum-exp lse = m + log l are
written: memory O(T·d) instead of the O(T·S) probabilities the plain formula keeps for its
backward. Causal key tiles past the diagonal are not even loaded (about half the work at T = S).

Backward: delta = rowsum(dO ∘ O), then one block per 64 keys of a key/value head: for every
query tile (of each query head that reads the head) that can see them, P = exp(q kᵀ·scale − lse)
is recomputed, dV += Pᵀ dO, dS = P ∘ (dO vᵀ − delta), dK += scale·dSᵀ q, and scale·dS k is added
atomically into dq.

Grouped-query attention (Ainslie et al. 2023): k and v may have fewer heads than q, Hq = group·Hkv;
query head h reads key/value head h // group, by index in the kernel (no expanded copy of k, v).

Supported (else ``minirlhf.functional`` uses its plain path): float32; head dim 32, 64 or 128
(with the shared memory that needs: up to 176 KB per block at d = 128, so sm_80 or newer there);
q, k, v with the same batch axes and Hq a multiple of Hkv; at least ``MIN_QUERY_ROWS`` query rows
(decoding one token after a KV cache would leave 63 of a tile's 64 query rows idle: the plain
path's two small matrix products are the better kernel there); no mask, ``is_causal`` (aligned
bottom-right), and/or a boolean key-padding mask that is the same for every query (shape
(..., 1, S) or (S,), True = may attend) and broadcasts to q's batch axes without adding any.
Rows that may attend nothing give zeros. The forward reads k and v where they are when each head's
rows are contiguous and the heads evenly spaced (:func:`head_stride`): a block of queries appended
to a KV cache reads the cache's slice in place, not a copy of it per layer per call.

Tensor cores (``tensor_cores=True``, sm_80+): the same passes with every matrix product on
mma.sync.m16n8k8 TF32 tensor-core instructions, each product split in three (3xTF32: x = big +
small, A B ≈ big·big + big·small + small·big) for fp32-level accuracy, as PyTorch's fp32 SDPA.
They are tested through the CPU execution harness (which models the instruction's fragment layout)
against the references at the fp32 tolerances; they become the default once measured faster on a GPU.
The NumPy twin of both passes is ``reference.attention_forward`` / ``attention_backward``.
"""
import functools
import math

import numpy as np

from . import kernel
from .. import backend

BLOCK_M = 64        # query rows per tile (attention.cu)
BLOCK_N = 64        # keys per tile
PAD = 4             # floats of padding per shared-memory row
P_LD = BLOCK_N + 16  # row stride of the shared P and dS tiles
FWD_THREADS = 128
BWD_THREADS = 256
DELTA_THREADS = 256
HEAD_DIMS = (32, 64, 128)
MIN_QUERY_ROWS = 16  # fewer query rows (decoding) take the plain path
TENSOR_CORES = False  # the 3xTF32 mma.sync kernels by default? Not until a GPU has timed them against these
_NULL = np.uint64(0)  # a null pointer argument (no key mask)
_MAX_GRID_YZ = 65535


def forward_shared_bytes(d):
    """Q, K, V tiles (64 × (d + PAD) each) and the P tile (64 × P_LD), float32."""
    return 4 * (3 * BLOCK_M * (d + PAD) + BLOCK_M * P_LD)


def backward_shared_bytes(d):
    """K, V tiles, Q and dO tiles (double-buffered for d <= 64), and the P and dS tiles, float32."""
    stages = 2 if d <= 64 else 1
    return 4 * (2 * BLOCK_N * (d + PAD) + 2 * stages * BLOCK_M * (d + PAD) + 2 * BLOCK_M * P_LD)


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(device_id):
    """Bytes of shared memory a block may opt in to on this GPU (227 KB on sm_80/sm_90, 64 KB on sm_75)."""
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return props.get("sharedMemPerBlockOptin") or props.get("sharedMemPerBlock", 48 * 1024)


def key_mask_of(attn_mask, n_keys):
    """The key-padding mask (..., S) that ``attn_mask`` amounts to, or None if it is not one.

    A boolean mask of shape (S,) or (..., 1, S) lets every query see the same keys; that is the
    only kind the kernel supports (an additive float mask, or one that differs per query, is not).
    """
    if attn_mask is None or getattr(attn_mask, "dtype", None) != np.bool_ or attn_mask.shape[-1] != n_keys:
        return None
    if attn_mask.ndim == 1:
        return attn_mask
    if attn_mask.shape[-2] != 1:
        return None
    return attn_mask[..., 0, :]


def heads_group(q, k):
    """Hq // Hkv, the query heads that share one key/value head, or None if the heads do not fit."""
    if q.ndim < 3:
        return 1 if q.shape[:-2] == k.shape[:-2] else None
    if q.shape[:-3] != k.shape[:-3] or k.shape[-3] < 1 or q.shape[-3] % k.shape[-3]:
        return None
    return q.shape[-3] // k.shape[-3]


def supported(q, k, v, attn_mask=None):
    """True if the fused kernels handle these CuPy arrays (see the module docstring)."""
    if not (q.dtype == k.dtype == v.dtype == np.float32):
        return False
    if q.ndim < 2 or q.ndim != k.ndim or k.ndim != v.ndim:
        return False
    d = q.shape[-1]
    if d not in HEAD_DIMS or k.shape[-1] != d or v.shape[-1] != d:
        return False
    group = heads_group(q, k)
    if group is None or k.shape != v.shape:
        return False
    T, S = q.shape[-2], k.shape[-2]
    bh = math.prod(q.shape[:-2])
    if T < MIN_QUERY_ROWS or min(S, bh) < 1 or max(group, bh // group) > _MAX_GRID_YZ \
            or bh * max(T, S) * d >= 2 ** 31:
        return False
    if backend.is_cupy_array(q):
        import cupy
        limit = _shared_memory_limit(cupy.cuda.runtime.getDevice())
        if max(forward_shared_bytes(d), backward_shared_bytes(d)) > limit:
            return False
    if attn_mask is not None:
        if backend.is_cupy_array(q) != backend.is_cupy_array(attn_mask):
            return False  # the plain path names the device mismatch
        km = key_mask_of(attn_mask, S)
        if km is None:
            return False
        batch = q.shape[:-2] + (S,)
        try:
            if np.broadcast_shapes(km.shape, batch) != batch:
                return False  # the mask adds batch axes: the plain path's output has them too
        except ValueError:
            return False
    return True


def _as_rows(cp, x):
    """x as a C-contiguous, 16-byte-aligned float32 array of shape (heads, rows, d), heads = prod(batch)."""
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    if x.data.ptr % 16:
        x = x.copy()
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def head_stride(x):
    """Floats from one head's first row to the next's if the forward can read ``x`` (..., S, d) where it is
    (float32, 16-byte aligned, each head's rows contiguous, heads evenly spaced), else None.

    The first S positions of a KV-cache buffer (B, H, capacity, d) are such a view, heads capacity·d
    floats apart: the forward reads the cache in place instead of copying it whole per layer per call.
    """
    if x.dtype != np.float32 or x.data.ptr % 16 or x.strides[-1] != 4 or x.strides[-2] != 4 * x.shape[-1]:
        return None
    axes = [(n, s // 4) for n, s in zip(x.shape[:-2], x.strides[:-2]) if n > 1]  # the batch axes that step
    for (_, outer), (n, inner) in zip(axes, axes[1:]):
        if outer != n * inner:
            return None
    stride = axes[-1][1] if axes else x.shape[-2] * x.shape[-1]
    return stride if stride >= 0 and stride % 4 == 0 else None


def _head_rows(cp, x):
    """(x's memory, its head stride) as the forward reads keys or values: in place where it can, else a copy."""
    stride = head_stride(x)
    if stride is None:
        x = _as_rows(cp, x)
        stride = x.shape[-2] * x.shape[-1]
    return x, np.int64(stride)


def _key_mask_rows(cp, key_mask, batch, S):
    if key_mask is None:
        return _NULL
    km = cp.broadcast_to(cp.asarray(key_mask, dtype=cp.bool_), batch + (S,))
    return cp.ascontiguousarray(km.reshape(-1, S).astype(cp.uint8))


def _kernel_name(pass_name, d, tensor_cores):
    return f"attention_{pass_name}{'_tc' if tensor_cores else ''}_d{d}"


def forward(q, k, v, key_mask=None, is_causal=False, scale=None, tensor_cores=TENSOR_CORES):
    """out (..., Hq, T, d) and lse (..., Hq, T) of the fused forward; k, v (..., Hkv, S, d) with Hkv
    dividing Hq, read in place where :func:`head_stride` allows (a KV-cache slice), else copied first;
    ``key_mask`` broadcastable to (..., Hq, S). ``tensor_cores``: the 3xTF32 kernels (sm_80+)."""
    import cupy as cp
    batch, (T, d), S = q.shape[:-2], q.shape[-2:], k.shape[-2]
    bh, group = math.prod(batch), heads_group(q, k)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q3 = _as_rows(cp, q)
    (k_rows, k_stride), (v_rows, v_stride) = _head_rows(cp, k), _head_rows(cp, v)
    out = cp.empty((bh, T, d), dtype=cp.float32)
    lse = cp.empty((bh, T), dtype=cp.float32)
    shared = forward_shared_bytes(d)
    kernel("attention.cu", _kernel_name("forward", d, tensor_cores), shared)(
        ((T + BLOCK_M - 1) // BLOCK_M, group, bh // group), (FWD_THREADS,),
        (q3, k_rows, v_rows, _key_mask_rows(cp, key_mask, batch, S), out, lse,
         np.int32(T), np.int32(S), k_stride, v_stride, np.float32(scale), np.int32(bool(is_causal))),
        shared_mem=shared)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward(q, k, v, out, lse, dout, key_mask=None, is_causal=False, scale=None, tensor_cores=TENSOR_CORES):
    """dq, dk, dv of the fused attention, from the forward's ``out`` and ``lse`` and the output gradient
    (dk, dv sum over the query heads that share a key/value head)."""
    import cupy as cp
    batch, (T, d), S = q.shape[:-2], q.shape[-2:], k.shape[-2]
    bh, group = math.prod(batch), heads_group(q, k)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q3, k3, v3 = _as_rows(cp, q), _as_rows(cp, k), _as_rows(cp, v)
    o3, do3 = _as_rows(cp, out), _as_rows(cp, dout)
    lse2 = cp.ascontiguousarray(lse, dtype=cp.float32).reshape(bh, T)
    delta = cp.empty((bh, T), dtype=cp.float32)
    rows = bh * T
    warps_per_block = DELTA_THREADS // 32
    kernel("attention.cu", "attention_backward_delta")(
        ((rows + warps_per_block - 1) // warps_per_block,), (DELTA_THREADS,),
        (o3, do3, delta, np.int32(rows), np.int32(d)))
    dq = cp.zeros((bh, T, d), dtype=cp.float32)  # key blocks add into it atomically
    dk = cp.empty(k3.shape, dtype=cp.float32)
    dv = cp.empty(k3.shape, dtype=cp.float32)
    shared = backward_shared_bytes(d)
    kernel("attention.cu", _kernel_name("backward", d, tensor_cores), shared)(
        ((S + BLOCK_N - 1) // BLOCK_N, bh // group), (BWD_THREADS,),
        (q3, k3, v3, _key_mask_rows(cp, key_mask, batch, S), lse2, delta, do3, dq, dk, dv,
         np.int32(T), np.int32(S), np.int32(group), np.float32(scale), np.int32(bool(is_causal))),
        shared_mem=shared)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
