"""Fused token log-probabilities on the GPU: CuPy launchers for logprobs.cu, and the chunked LM-head path.

    logp[r] = log softmax(logits[r])[t_r] = logits[r, t_r] − lse[r],   lse[r] = log Σ_v exp(logits[r, v])

Forward: one CUDA block per row streams over the vocabulary once, each thread keeping a running
maximum m and sum s = Σ exp(x − m) (rescaled by exp(m − m') when the maximum grows), then the
block merges the (m, s) pairs. It writes logp and lse, (N,) each, and nothing of size (N, V):
the plain formula keeps the (N, V) softmax alive for its backward.

Backward: one pass per row, d logits = g · (onehot(t) − exp(logits − lse)), optionally written
over the logits themselves (``out=logits``) when they are not needed afterwards.

Chunked linear + log-probs: for hidden (N, C) and an LM head weight (V, C), only a
(chunk_size, V) block of logits exists at a time, in the forward and again (recomputed) in the
backward, so peak memory no longer grows with N·V.

The NumPy twins are ``reference.logprobs_forward`` / ``logprobs_backward`` /
``linear_logprobs_forward`` / ``linear_logprobs_backward``.
"""
import numpy as np

from . import kernel

THREADS = 256  # threads per row (logprobs.cu)
FORWARD_SHARED_BYTES = 4 * 2 * (THREADS // 32)  # the forward's per-warp (m, s) pairs


def supported(logits):
    """True for a float32 CuPy (N, V) array the kernels handle."""
    return logits.dtype == np.float32 and logits.ndim == 2 and 0 < logits.shape[1] < 2 ** 31 \
        and 0 < logits.shape[0] < 2 ** 31


def linear_supported(hidden, weight):
    """True for float32 CuPy hidden (N, C) and weight (V, C): each chunk's logits go through the kernels."""
    return hidden.dtype == weight.dtype == np.float32 and hidden.ndim == weight.ndim == 2 \
        and 0 < weight.shape[0] < 2 ** 31


def _rows(cp, logits):
    return cp.ascontiguousarray(logits, dtype=cp.float32)


def forward(logits, targets):
    """logp (N,) and lse (N,) for logits (N, V) float32 and integer targets (N,); a target outside [0, V) gives
    NaN, and so does a row holding NaN or +inf (as the plain formula)."""
    import cupy as cp
    x = _rows(cp, logits)
    N, V = x.shape
    t = cp.ascontiguousarray(targets, dtype=cp.int64)
    out = cp.empty(N, dtype=cp.float32)
    lse = cp.empty(N, dtype=cp.float32)
    kernel("logprobs.cu", "token_logprobs_forward")((N,), (THREADS,), (x, t, out, lse, np.int32(V)),
                                                     shared_mem=FORWARD_SHARED_BYTES)
    return out, lse


def backward(logits, targets, lse, g, out=None):
    """d logits (N, V) = g · (onehot(targets) − softmax(logits)); ``out=logits`` overwrites the logits."""
    import cupy as cp
    x = _rows(cp, logits)
    N, V = x.shape
    if out is None:
        out = cp.empty_like(x)
    elif out.shape != x.shape or out.dtype != cp.float32 or not out.flags.c_contiguous:
        raise ValueError(f"logprobs.backward: out must be a C-contiguous float32 array of shape {x.shape}, "
                         f"got {out.dtype} {out.shape}")
    t = cp.ascontiguousarray(targets, dtype=cp.int64)
    kernel("logprobs.cu", "token_logprobs_backward")(
        (N,), (THREADS,),
        (x, t, cp.ascontiguousarray(lse, dtype=cp.float32), cp.ascontiguousarray(g, dtype=cp.float32), out,
         np.int32(V)))
    return out


def linear_logprobs_forward(hidden, weight, targets, chunk_size):
    """logp (N,) and lse (N,) of hidden (N, C) @ weight (V, C)ᵀ, a chunk of ``chunk_size`` rows at a time."""
    import cupy as cp
    N = hidden.shape[0]
    out = cp.empty(N, dtype=cp.float32)
    lse = cp.empty(N, dtype=cp.float32)
    for start in range(0, N, chunk_size):
        sl = slice(start, start + chunk_size)
        logits = cp.matmul(hidden[sl], weight.T)  # (chunk, V): the only logits alive
        out[sl], lse[sl] = forward(logits, targets[sl])
    return out, lse


def linear_logprobs_backward(hidden, weight, targets, lse, g, chunk_size, need_hidden=True, need_weight=True):
    """d hidden (N, C) and d weight (V, C) of Σ g · logp, recomputing each chunk's logits (then overwriting
    them with their gradient, in place)."""
    import cupy as cp
    dh = cp.empty_like(hidden) if need_hidden else None
    dw = cp.zeros_like(weight) if need_weight else None
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        h = hidden[sl]
        logits = cp.matmul(h, weight.T)
        dlogits = backward(logits, targets[sl], lse[sl], g[sl], out=logits)
        if need_hidden:
            dh[sl] = cp.matmul(dlogits, weight)
        if need_weight:
            dw += cp.matmul(dlogits.T, h)
    return dh, dw
