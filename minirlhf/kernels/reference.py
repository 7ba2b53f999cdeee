"""The kernels' algorithms, written with array ops: same tiles, same recurrences, same saved values.

These run on NumPy (and on CuPy arrays, slowly: the tile loops are Python loops). They exist so
the algorithms themselves (the online softmax, the tile-by-tile backward, the streaming
log-sum-exp) are tested on every machine against the plain formulas in ``minirlhf.functional``,
and so the CUDA kernels have a reference with the same intermediate values (lse) to be checked
against. Tile sizes are parameters: the CUDA kernels use 64 × 64.

Shapes: q (..., Hq, T, d), k (..., Hkv, S, d), v (..., Hkv, S, d) with Hkv dividing Hq
(grouped-query attention: query head h reads key/value head h // (Hq / Hkv); Hkv = Hq is plain
multi-head attention, and inputs of shape (T, d) are one head); ``key_mask`` is a boolean array
broadcastable to (..., Hq, S), True where a key may be attended; causal masks are aligned
bottom-right (query i sees keys j <= i + S − T). A query that may attend no key gets output 0
and lse −inf.
"""
import math

import numpy as np

from .. import backend

BLOCK_M = 64  # query rows per tile, as in attention.cu
BLOCK_N = 64  # keys per tile
BLOCK_V = 4096  # vocabulary entries per step of the streaming log-sum-exp


def _group_heads(q, k, v, key_mask):
    """q as (BHkv, G, T, d), k and v as (BHkv, 1, S, d), the key mask as (BHkv, G, S) (or None).

    G = Hq / Hkv query heads share a key/value head: they become an axis that the matrix products
    broadcast k and v over, so k and v are never copied G times.
    """
    xp = backend.get_array_module(q)
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    bh = math.prod(q.shape[:-2])
    bh_kv = math.prod(k.shape[:-2])
    if q.shape[:-3] != k.shape[:-3] or bh % bh_kv or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}: expected q (..., Hq, T, d) and "
                         "k, v (..., Hkv, S, d) with Hkv dividing Hq")
    group = bh // bh_kv
    km = None
    if key_mask is not None:
        km = xp.broadcast_to(xp.asarray(key_mask, dtype=bool), q.shape[:-2] + (S,)).reshape(bh_kv, group, S)
    return (q.reshape(bh_kv, group, T, d), k.reshape(bh_kv, 1, S, d), v.reshape(bh_kv, 1, S, v.shape[-1]), km)


def _allowed(xp, rows, cols, S, T, is_causal, km):
    """(BHkv or 1, G or 1, len(rows), len(cols)) boolean: may query ``rows[i]`` attend key ``cols[j]``."""
    ok = xp.ones((1, 1, len(rows), len(cols)), dtype=bool)
    if is_causal:
        ok = ok & (cols[None, None, None, :] <= rows[None, None, :, None] + (S - T))
    if km is not None:
        ok = ok & km[:, :, None, cols]
    return ok


def attention_forward(q, k, v, key_mask=None, is_causal=False, scale=None, block_m=BLOCK_M, block_n=BLOCK_N):
    """FlashAttention-2 forward (Dao 2023, Alg. 1): returns out (..., Hq, T, d) and lse (..., Hq, T).

    For each tile of query rows, stream over key tiles keeping the running row maximum m, the
    running sum l = Σ exp(s − m) and the unnormalised output acc = Σ exp(s − m) v:

        m' = max(m, rowmax S_j),  l ← e^(m − m') l + rowsum e^(S_j − m'),  acc ← e^(m − m') acc + e^(S_j − m') V_j

    and finally out = acc / l, lse = m + log l. Causal key tiles past the diagonal are skipped.
    """
    xp = backend.get_array_module(q)
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q4, k4, v4, km = _group_heads(q, k, v, key_mask)
    heads = q4.shape[:2]
    out = xp.zeros(heads + (T, v.shape[-1]), dtype=q.dtype)
    lse = xp.full(heads + (T,), -np.inf, dtype=q.dtype)
    for q0 in range(0, T, block_m):
        rows = xp.arange(q0, min(q0 + block_m, T))
        qi = q4[:, :, q0:q0 + block_m]
        m = xp.full(heads + (len(rows),), -np.inf, dtype=q.dtype)
        l = xp.zeros(heads + (len(rows),), dtype=q.dtype)
        acc = xp.zeros(heads + (len(rows), v.shape[-1]), dtype=q.dtype)
        n_keys = min(S, max(0, q0 + len(rows) + S - T)) if is_causal else S
        for k0 in range(0, n_keys, block_n):
            cols = xp.arange(k0, min(k0 + block_n, S))
            s = xp.matmul(qi, xp.swapaxes(k4[:, :, k0:k0 + block_n], -1, -2)) * scale
            s = xp.where(_allowed(xp, rows, cols, S, T, is_causal, km), s, -np.inf)
            m_new = xp.maximum(m, s.max(axis=-1))
            m_use = xp.where(m_new == -np.inf, 0, m_new)  # a row that has seen no key yet
            alpha = xp.exp(m - m_use)
            p = xp.exp(s - m_use[..., None])
            l = alpha * l + p.sum(axis=-1)
            acc = alpha[..., None] * acc + xp.matmul(p, v4[:, :, k0:k0 + block_n])
            m = m_new
        seen = l > 0
        out[:, :, q0:q0 + block_m] = acc / xp.where(seen, l, 1)[..., None]
        lse[:, :, q0:q0 + block_m] = xp.where(seen, m + xp.log(xp.where(seen, l, 1)), -np.inf)
    return out.reshape(q.shape[:-1] + (v.shape[-1],)), lse.reshape(q.shape[:-1])


def attention_backward(q, k, v, out, lse, dout, key_mask=None, is_causal=False, scale=None,
                       block_m=BLOCK_M, block_n=BLOCK_N):
    """FlashAttention-2 backward (Dao 2023, Alg. 2): returns dq, dk, dv.

    delta = rowsum(dO ∘ O) first; then for each key tile j (dK_j, dV_j accumulate) and each
    query tile i at or below the causal diagonal, recompute P = exp(S·scale − lse) and

        dV_j += Pᵀ dO_i,  dP = dO_i V_jᵀ,  dS = P ∘ (dP − delta),
        dK_j += scale · dSᵀ Q_i,  dQ_i += scale · dS K_j.

    dK_j and dV_j also sum over the query heads that share the key/value head.
    """
    xp = backend.get_array_module(q)
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q4, k4, v4, km = _group_heads(q, k, v, key_mask)
    o4 = out.reshape(q4.shape[:3] + (-1,))
    do4 = dout.reshape(q4.shape[:3] + (-1,))
    delta = (do4 * o4).sum(axis=-1)
    lse4 = lse.reshape(q4.shape[:3])
    lse_use = xp.where(lse4 == -np.inf, np.inf, lse4)  # P = 0 on rows that see nothing
    dq, dk, dv = xp.zeros_like(q4), xp.zeros_like(k4), xp.zeros_like(v4)
    for k0 in range(0, S, block_n):
        cols = xp.arange(k0, min(k0 + block_n, S))
        kj, vj = k4[:, :, k0:k0 + block_n], v4[:, :, k0:k0 + block_n]
        first_query = max(0, k0 - (S - T)) if is_causal else 0
        for q0 in range(first_query // block_m * block_m, T, block_m):
            rows = xp.arange(q0, min(q0 + block_m, T))
            qi, doi = q4[:, :, q0:q0 + block_m], do4[:, :, q0:q0 + block_m]
            s = xp.matmul(qi, xp.swapaxes(kj, -1, -2)) * scale
            s = xp.where(_allowed(xp, rows, cols, S, T, is_causal, km), s, -np.inf)
            p = xp.exp(s - lse_use[:, :, q0:q0 + block_m, None])
            dv[:, :, k0:k0 + block_n] += xp.matmul(xp.swapaxes(p, -1, -2), doi).sum(axis=1, keepdims=True)
            dp = xp.matmul(doi, xp.swapaxes(vj, -1, -2))
            ds = p * (dp - delta[:, :, q0:q0 + block_m, None])
            dk[:, :, k0:k0 + block_n] += xp.matmul(xp.swapaxes(ds, -1, -2), qi).sum(axis=1, keepdims=True) * scale
            dq[:, :, q0:q0 + block_m] += xp.matmul(ds, kj) * scale
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def logprobs_forward(logits, targets, block_v=BLOCK_V):
    """Streaming log-sum-exp over vocabulary chunks: returns log softmax(logits)[targets] and lse, (N,) each.

    Per row, with the running maximum m and running sum s = Σ exp(x − m) over the chunks read so far:
    m' = max(m, max x_chunk),  s ← s·e^(m − m') + Σ e^(x_chunk − m');  lse = m + log s,
    and the log-prob is (x_t − m) − log s (x_t − lse would lose log s beside logits of 1e30). A target
    outside [0, V) gives NaN, and so does a row holding NaN or +inf.
    """
    xp = backend.get_array_module(logits)
    N, V = logits.shape
    m = xp.full(N, -np.inf, dtype=logits.dtype)
    s = xp.zeros(N, dtype=logits.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):  # +inf − +inf is NaN, and log 0 = −inf: both meant
        for v0 in range(0, V, block_v):
            x = logits[:, v0:v0 + block_v]
            m_new = xp.maximum(m, x.max(axis=-1))
            m_use = xp.where(m_new == -np.inf, 0, m_new)
            s = s * xp.exp(m - m_use) + xp.exp(x - m_use[:, None]).sum(axis=-1)
            m = m_new
        log_s = xp.log(s)
        lse = m + log_s
        valid = (targets >= 0) & (targets < V)
        picked = xp.take_along_axis(logits, xp.where(valid, targets, 0)[:, None], axis=1)[:, 0]
        out = xp.where(valid, (picked - m) - log_s, np.nan)
    return out.astype(logits.dtype, copy=False), lse


def logprobs_backward(logits, targets, lse, g):
    """One pass: d logits = g · (onehot(targets) − exp(logits − lse)), (N, V)."""
    xp = backend.get_array_module(logits)
    lse_use = xp.where(lse == -np.inf, np.inf, lse)  # a row of −inf logits has p = 0
    grad = -xp.exp(logits - lse_use[:, None]) * g[:, None]
    grad[xp.arange(logits.shape[0]), targets] += g
    return grad


def linear_logprobs_forward(hidden, weight, targets, chunk_size):
    """log softmax(hidden @ weightᵀ)[targets] for hidden (N, C), weight (V, C), a chunk of rows at a time.

    Only a (chunk_size, V) block of logits exists at once; returns out and lse, (N,) each.
    """
    xp = backend.get_array_module(hidden)
    N = hidden.shape[0]
    out = xp.empty(N, dtype=hidden.dtype)
    lse = xp.empty(N, dtype=hidden.dtype)
    for start in range(0, N, chunk_size):
        logits = xp.matmul(hidden[start:start + chunk_size], weight.T)  # (chunk, V)
        out[start:start + chunk_size], lse[start:start + chunk_size] = logprobs_forward(
            logits, targets[start:start + chunk_size])
    return out, lse


def linear_logprobs_backward(hidden, weight, targets, lse, g, chunk_size, need_hidden=True, need_weight=True):
    """Gradients of Σ g · linear_logprobs w.r.t. hidden (N, C) and weight (V, C), chunk by chunk.

    Each chunk's logits are recomputed (one more matrix product than the unchunked backward, in
    exchange for never holding (N, V)): dlogits = g · (onehot − softmax),
    dhidden = dlogits · weight, dweight += dlogitsᵀ · hidden.
    """
    xp = backend.get_array_module(hidden)
    dh = xp.empty_like(hidden) if need_hidden else None
    dw = xp.zeros_like(weight) if need_weight else None
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start:start + chunk_size]
        sl = slice(start, start + chunk_size)
        dlogits = logprobs_backward(xp.matmul(h, weight.T), targets[sl], lse[sl], g[sl])
        if need_hidden:
            dh[sl] = xp.matmul(dlogits, weight)
        if need_weight:
            dw += xp.matmul(dlogits.T, h)
    return dh, dw
