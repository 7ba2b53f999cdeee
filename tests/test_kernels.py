"""The GPU kernels and their NumPy references (minirlhf/kernels).

On every machine: the references (the kernels' algorithms in NumPy: tiled online-softmax
attention with grouped-query heads, the tile-by-tile backward, the streaming log-sum-exp)
against the plain formulas of ``minirlhf.functional``, forward and gradients; the chunked
linear + log-prob op; the CUDA sources compile to sm_90 cubins without spills (where nvcc
exists). The kernel tests (the ``cp`` fixture) run the .cu sources on the GPU where cupy sees
one, and everywhere through the CPU execution harness (tests/cuda_cpu): against naive CuPy and
the references, including T = 1, T not a multiple of the tile, padding masks, scores and logits
of ±1e4, NaN and 1e30 logits, grouped-query heads, and the gradients; the attention cases for
the SIMT kernels and for the 3xTF32 tensor-core kernels.
"""
import math
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minirlhf.functional as F
from cuda_cpu import build as harness, cupy_on_cpu
from minirlhf import Tensor, backend, kernels
from minirlhf.kernels import SOURCE_DIR, attention, cu_sources, logprobs, reference


# ------------------------------------------------------------ helpers
def attention_inputs(rng, B, H, T, S, d, pad=False, big=False, dtype=np.float64):
    """q, k, v and a left-padding key mask (B, 1, 1, S) or None; ``big`` gives scores of order 1e4."""
    q, k, v = (rng.standard_normal((B, H, n, d)) for n in (T, S, S))
    if big:
        q = q * (1e4 * math.sqrt(d) / np.abs(q @ np.swapaxes(k, -1, -2)).max())
    mask = None
    if pad:
        mask = np.ones((B, 1, 1, S), dtype=bool)
        mask[0, ..., : S // 3] = False          # batch 0 is left-padded
        if B > 2:
            mask[2] = False                     # batch 2 is all padding: its rows see nothing
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), mask


def plain_attention(q, k, v, mask, causal, c):
    """F.scaled_dot_product_attention's value, lse, and gradients of Σ out·c (float64)."""
    leaves = [Tensor(a, requires_grad=True, dtype=np.float64) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, is_causal=causal)
    (out * Tensor(c, dtype=np.float64)).sum().backward()
    T, S, d = q.shape[-2], k.shape[-2], q.shape[-1]
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(d)
    allowed = np.ones((T, S), dtype=bool)
    if causal:
        allowed = np.tril(allowed, k=S - T)
    if mask is not None:
        allowed = allowed & mask
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0)
    with np.errstate(divide="ignore"):
        lse = (np.log(np.exp(s - m_safe).sum(axis=-1, keepdims=True)) + m_safe)[..., 0]
    return out.numpy(), lse, [t.grad for t in leaves]


def key_mask(mask):
    return None if mask is None else mask[..., 0, :]


def assert_close(got, want, rtol, atol, what):
    """Close, with atol relative to the largest magnitude of ``want`` (scores of 1e4 give large values)."""
    scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(want), want, 0)), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)


# (B, H, T, S, d, causal, pad, big): T = 1; T and S not multiples of the tiles (16 × 8 in the
# reference tests, 64 × 64 in the kernels); S > T (queries after a cache); T > S (the first
# queries see no key); left padding with a fully padded batch; scores of ±1e4.
ATTENTION_CASES = [
    (1, 2, 1, 1, 8, True, False, False),
    (2, 2, 37, 37, 8, True, False, False),
    (1, 3, 20, 45, 4, True, False, False),
    (1, 2, 45, 20, 4, True, False, False),
    (3, 2, 33, 33, 8, False, True, False),
    (3, 1, 40, 40, 8, True, True, False),
    (1, 2, 17, 17, 8, True, False, True),
]


# ------------------------------------------------ attention reference (CPU)
@pytest.mark.parametrize("B, H, T, S, d, causal, pad, big", ATTENTION_CASES)
def test_reference_attention_forward_equals_the_plain_formula(B, H, T, S, d, causal, pad, big):
    rng = np.random.default_rng(T * 100 + S)
    q, k, v, mask = attention_inputs(rng, B, H, T, S, d, pad, big)
    want_out, want_lse, _ = plain_attention(q, k, v, mask, causal, np.zeros((B, H, T, d)))
    out, lse = reference.attention_forward(q, k, v, key_mask(mask), causal, block_m=16, block_n=8)
    assert_close(out, want_out, 1e-10, 1e-10, "out")
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse)), "rows that see no key have lse = -inf"
    assert_close(np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(want_lse), want_lse, 0), 1e-10, 1e-10,
                 "lse")


@pytest.mark.parametrize("B, H, T, S, d, causal, pad, big", ATTENTION_CASES)
def test_reference_attention_backward_equals_autograd_of_the_plain_formula(B, H, T, S, d, causal, pad, big):
    rng = np.random.default_rng(T * 100 + S + 1)
    q, k, v, mask = attention_inputs(rng, B, H, T, S, d, pad, big)
    c = rng.standard_normal((B, H, T, d))
    _, _, want = plain_attention(q, k, v, mask, causal, c)
    out, lse = reference.attention_forward(q, k, v, key_mask(mask), causal, block_m=16, block_n=8)
    got = reference.attention_backward(q, k, v, out, lse, c, key_mask(mask), causal, block_m=16, block_n=8)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, 1e-9, 1e-9, name)


@given(T=st.integers(1, 40), S=st.integers(1, 40), d=st.integers(1, 6), block_m=st.integers(1, 17),
       block_n=st.integers(1, 17), causal=st.booleans(), pad=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_reference_attention_equals_the_plain_formula_for_any_shape_and_tiling(T, S, d, block_m, block_n, causal,
                                                                               pad, seed):
    rng = np.random.default_rng(seed)
    q, k, v, mask = attention_inputs(rng, 3, 1, T, S, d, pad)
    c = rng.standard_normal((3, 1, T, d))
    want_out, _, want = plain_attention(q, k, v, mask, causal, c)
    out, lse = reference.attention_forward(q, k, v, key_mask(mask), causal, block_m=block_m, block_n=block_n)
    got = reference.attention_backward(q, k, v, out, lse, c, key_mask(mask), causal, block_m=block_m,
                                       block_n=block_n)
    assert_close(out, want_out, 1e-10, 1e-10, "out")
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, 1e-9, 1e-9, name)


def test_reference_attention_forward_never_reads_keys_above_the_causal_diagonal():
    # NaN in every key and value past the first tile: the first query tile must not touch them
    rng = np.random.default_rng(0)
    q, k, v, _ = attention_inputs(rng, 1, 2, 48, 48, 8)
    k[..., 16:, :] = np.nan
    v[..., 16:, :] = np.nan
    out, lse = reference.attention_forward(q, k, v, None, True, block_m=16, block_n=16)
    assert np.isfinite(out[..., :16, :]).all() and np.isfinite(lse[..., :16]).all()
    assert np.isnan(out[..., 16:, :]).all()


def test_reference_attention_backward_never_reads_queries_above_the_causal_diagonal():
    # NaN in the first query tile: key tiles it cannot see (keys >= 16) must not touch it
    rng = np.random.default_rng(1)
    q, k, v, _ = attention_inputs(rng, 1, 2, 48, 48, 8)
    out, lse = reference.attention_forward(q, k, v, None, True, block_m=16, block_n=16)
    dout = rng.standard_normal(out.shape)
    q[..., :16, :] = np.nan
    dout[..., :16, :] = np.nan
    _, dk, dv = reference.attention_backward(q, k, v, out, lse, dout, None, True, block_m=16, block_n=16)
    assert np.isfinite(dk[..., 16:, :]).all() and np.isfinite(dv[..., 16:, :]).all()
    assert np.isnan(dk[..., :16, :]).any()


def test_reference_attention_of_a_fully_padded_sequence_is_zero_with_zero_gradient():
    rng = np.random.default_rng(2)
    q, k, v, mask = attention_inputs(rng, 3, 2, 21, 21, 8, pad=True)
    out, lse = reference.attention_forward(q, k, v, key_mask(mask), True, block_m=16, block_n=8)
    dq, dk, dv = reference.attention_backward(q, k, v, out, lse, np.ones_like(out), key_mask(mask), True,
                                              block_m=16, block_n=8)
    assert (out[2] == 0).all() and np.isneginf(lse[2]).all()
    assert (dq[2] == 0).all() and (dk[2] == 0).all() and (dv[2] == 0).all()
    assert (dk[0, :, :21 // 3] == 0).all(), "padded keys get no gradient"


# ------------------------------------------------- log-prob reference (CPU)
# (N, V, block_v, logit scale): V = 1; V not a multiple of the chunk; one chunk larger than V; ±1e4
LOGPROB_CASES = [(1, 1, 4, 3.0), (5, 37, 8, 3.0), (3, 50, 64, 3.0), (6, 100, 7, 1e4)]


@pytest.mark.parametrize("N, V, block_v, scale", LOGPROB_CASES)
def test_reference_logprobs_equal_token_logprobs_and_its_gradient(N, V, block_v, scale):
    rng = np.random.default_rng(V)
    x = rng.standard_normal((N, V)) * scale
    t = rng.integers(0, V, N)
    g = rng.standard_normal(N)
    leaf = Tensor(x, requires_grad=True, dtype=np.float64)
    want = F.token_logprobs(leaf, t)
    (want * Tensor(g, dtype=np.float64)).sum().backward()
    out, lse = reference.logprobs_forward(x, t, block_v=block_v)
    assert_close(out, want.numpy(), 1e-12, 1e-12, "log-probs")
    assert_close(lse, F.logsumexp(Tensor(x, dtype=np.float64), axis=-1).numpy(), 1e-12, 1e-12, "lse")
    assert_close(reference.logprobs_backward(x, t, lse, g), leaf.grad, 1e-12, 1e-12, "gradient")


def test_reference_logprob_of_an_out_of_range_target_is_nan():
    out, _ = reference.logprobs_forward(np.zeros((3, 4)), np.array([0, 4, -1]))
    assert out[0] == pytest.approx(-math.log(4)) and np.isnan(out[1:]).all()


# ------------------------------------------- chunked linear + log-probs (CPU)
@pytest.mark.parametrize("shape, chunk_size", [((7,), 1), ((7,), 3), ((2, 5), 4), ((2, 5), 100)])
def test_linear_token_logprobs_equals_token_logprobs_of_the_full_logits(shape, chunk_size):
    rng = np.random.default_rng(len(shape) * 10 + chunk_size)
    C, V = 6, 23
    h0, w0 = rng.standard_normal(shape + (C,)), rng.standard_normal((V, C))
    t = rng.integers(0, V, shape)
    c = rng.standard_normal(shape)
    results = []
    for fn in (lambda h, w: F.linear_token_logprobs(h, w, t, chunk_size=chunk_size),
               lambda h, w: F.token_logprobs(F.linear(h, w), t)):
        h, w = Tensor(h0, requires_grad=True, dtype=np.float64), Tensor(w0, requires_grad=True, dtype=np.float64)
        out = fn(h, w)
        (out * Tensor(c, dtype=np.float64)).sum().backward()
        results.append((out.numpy(), h.grad, w.grad))
    for name, got, want in zip(("log-probs", "d hidden", "d weight"), *results):
        assert got.shape == want.shape, name
        assert_close(got, want, 1e-12, 1e-12, name)


def test_linear_token_logprobs_gives_no_gradient_to_a_frozen_weight():
    rng = np.random.default_rng(3)
    h = Tensor(rng.standard_normal((4, 3)), requires_grad=True, dtype=np.float64)
    w = Tensor(rng.standard_normal((9, 3)), dtype=np.float64)
    t = rng.integers(0, 9, 4)
    F.linear_token_logprobs(h, w, t, chunk_size=3).sum().backward()
    ref = Tensor(h.data, requires_grad=True, dtype=np.float64)
    F.token_logprobs(F.linear(ref, w), t).sum().backward()
    assert w.grad is None
    assert_close(h.grad, ref.grad, 1e-12, 1e-12, "d hidden")


def test_linear_token_logprobs_peak_memory_is_a_fraction_of_the_full_logits_path():
    rng = np.random.default_rng(4)
    N, C, V, chunk = 512, 16, 2000, 32
    h0, w0 = rng.standard_normal((N, C)).astype(np.float32), rng.standard_normal((V, C)).astype(np.float32)
    t = rng.integers(0, V, N)

    def peak(fn):
        h, w = Tensor(h0, requires_grad=True), Tensor(w0, requires_grad=True)
        tracemalloc.start()
        fn(h, w).sum().backward()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    chunked = peak(lambda h, w: F.linear_token_logprobs(h, w, t, chunk_size=chunk))
    full = peak(lambda h, w: F.token_logprobs(F.linear(h, w), t))
    logits_bytes = N * V * 4
    assert full >= logits_bytes, "the full path holds at least the (N, V) logits"
    assert chunked < full / 4, f"chunked peak {chunked} bytes vs full {full}"


def test_linear_token_logprobs_names_the_bad_argument():
    h, w = Tensor(np.ones((2, 3))), Tensor(np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"linear_token_logprobs: chunk_size must be a positive integer, got 0"):
        F.linear_token_logprobs(h, w, np.zeros(2, dtype=int), chunk_size=0)
    with pytest.raises(ValueError, match=r"linear_token_logprobs: hidden of shape \(2, 3\) and weight of shape "
                                         r"\(5, 4\) do not fit"):
        F.linear_token_logprobs(h, Tensor(np.ones((5, 4))), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"linear_token_logprobs: targets shape \(3,\) must equal"):
        F.linear_token_logprobs(h, w, np.zeros(3, dtype=int))
    with pytest.raises(IndexError, match=r"linear_token_logprobs: targets must lie in \[0, 5\), got min 0 max 5"):
        F.linear_token_logprobs(h, w, np.array([0, 5]))


# ------------------------------------------------ sources and dispatch (CPU)
def test_importing_minirlhf_and_its_kernels_never_imports_cupy():
    code = ("import sys, numpy as np\n"
            "import minirlhf, minirlhf.functional as F\n"
            "import minirlhf.kernels, minirlhf.kernels.attention, minirlhf.kernels.logprobs, "
            "minirlhf.kernels.reference\n"
            "q = minirlhf.Tensor(np.ones((1, 2, 4)))\n"
            "F.scaled_dot_product_attention(q, q, q, is_causal=True); F.token_logprobs(q, np.zeros((1, 2), int))\n"
            "assert 'cupy' not in sys.modules, 'cupy was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr


def _ptxas_report(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nvcc (the CUDA toolkit) is missing: CI must compile-check the kernels")
        pytest.skip("needs nvcc (the CUDA toolkit) to compile-check the kernels")
    result = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", str(source),
                             "-o", str(tmp_path / "out.cubin")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.parametrize("source", cu_sources(), ids=lambda p: p.name)
def test_cu_sources_compile_for_sm90_without_register_spills_or_stack(source, tmp_path):
    report = _ptxas_report(source, tmp_path)
    functions = re.findall(r"Function properties for (\w+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                           r"(\d+) bytes spill loads", report)
    assert functions, report
    if harness.compiler() is not None:  # every entry point, those a macro makes included, was reported
        assert {name for _, name in harness.kernels_of(source.read_text())} == {f[0] for f in functions}
    for name, stack, stores, loads in functions:
        assert (int(stack), int(stores), int(loads)) == (0, 0, 0), f"{name}: {stack} B stack, {stores} B spilled"


def _constants(source):
    return {name: int(value) for name, value in
            re.findall(r"constexpr int (\w+) = (\d+);", source.read_text())}


def test_tile_sizes_of_the_cuda_source_match_its_launcher():
    # the launcher sizes the grid and the shared memory from these: a mismatch corrupts memory
    c = _constants(SOURCE_DIR / "attention.cu")
    assert (c["BLOCK_M"], c["BLOCK_N"], c["PAD"], c["FWD_THREADS"], c["BWD_THREADS"], c["DELTA_THREADS"]) == (
        attention.BLOCK_M, attention.BLOCK_N, attention.PAD, attention.FWD_THREADS, attention.BWD_THREADS,
        attention.DELTA_THREADS)
    assert "constexpr int P_LD = BLOCK_N + 16;" in (SOURCE_DIR / "attention.cu").read_text()
    assert attention.P_LD == attention.BLOCK_N + 16
    assert _constants(SOURCE_DIR / "logprobs.cu")["LOGPROB_THREADS"] == logprobs.THREADS


@pytest.mark.parametrize("d", attention.HEAD_DIMS)
def test_attention_shared_memory_fits_an_h100_block(d):
    limit = 227 * 1024  # opt-in shared memory per block on sm_80 / sm_90
    assert attention.forward_shared_bytes(d) <= limit
    assert attention.backward_shared_bytes(d) <= limit


def test_fused_attention_supports_exactly_the_documented_cases():
    def arrays(d=64, dtype=np.float32, kv_batch=(2, 3), T=20):
        return (np.zeros((2, 3, T, d), dtype), np.zeros(kv_batch + (7, d), dtype), np.zeros(kv_batch + (7, d), dtype))
    assert attention.supported(*arrays())
    assert all(attention.supported(*arrays(d)) for d in (32, 64, 128))
    assert not attention.supported(*arrays(d=48))
    assert not attention.supported(*arrays(dtype=np.float64))
    assert not attention.supported(*arrays(kv_batch=(1, 3)))                   # broadcast batch
    assert attention.supported(*arrays(kv_batch=(2, 1)))                       # grouped-query: 3 heads read 1
    assert not attention.supported(*arrays(kv_batch=(2, 2)))                   # 3 query heads over 2
    assert not attention.supported(*arrays(T=attention.MIN_QUERY_ROWS - 1))   # decoding: the plain path
    assert attention.supported(*arrays(T=attention.MIN_QUERY_ROWS))
    assert attention.supported(*arrays(), np.ones((2, 1, 1, 7), bool))          # key padding
    assert attention.supported(*arrays(), np.ones(7, bool))
    assert not attention.supported(*arrays(), np.ones((2, 1, 5, 7), bool))      # differs per query
    assert not attention.supported(*arrays(), np.zeros((2, 1, 1, 7), np.float32))  # additive bias
    assert not attention.supported(*arrays(), np.ones((4, 1, 1, 7), bool))      # does not broadcast
    assert not attention.supported(*arrays(), np.ones((5, 2, 1, 1, 7), bool))   # adds a batch axis
    assert not attention.supported(*arrays(), np.ones((1, 2, 1, 1, 7), bool))   # adds one of size 1
    assert logprobs.supported(np.zeros((3, 5), np.float32)) and not logprobs.supported(np.zeros((3, 5)))


# --------------------------------------------- grouped-query attention (CPU)
def _expand_heads(x, group):
    return np.repeat(x, group, axis=-3)


@pytest.mark.parametrize("Hq, Hkv, T, S, causal, pad", [(4, 2, 21, 21, True, False), (6, 2, 9, 30, True, True),
                                                        (3, 1, 30, 12, False, True), (2, 2, 17, 17, True, False)])
def test_reference_grouped_query_attention_equals_attention_over_repeated_heads(Hq, Hkv, T, S, causal, pad):
    # query head h reads key/value head h // (Hq / Hkv); dk, dv sum over the query heads that read a head
    rng = np.random.default_rng(Hq * 100 + S)
    q = rng.standard_normal((2, Hq, T, 8))
    k, v = rng.standard_normal((2, Hkv, S, 8)), rng.standard_normal((2, Hkv, S, 8))
    mask = None
    if pad:
        mask = np.ones((2, 1, 1, S), dtype=bool)
        mask[1, ..., : S // 2] = False
    c = rng.standard_normal(q.shape)
    group = Hq // Hkv
    want_out, _, (want_dq, want_dk, want_dv) = plain_attention(q, _expand_heads(k, group), _expand_heads(v, group),
                                                               mask, causal, c)
    out, lse = reference.attention_forward(q, k, v, key_mask(mask), causal, block_m=16, block_n=8)
    dq, dk, dv = reference.attention_backward(q, k, v, out, lse, c, key_mask(mask), causal, block_m=16, block_n=8)
    assert dk.shape == k.shape and dv.shape == v.shape
    assert_close(out, want_out, 1e-10, 1e-10, "out")
    assert_close(dq, want_dq, 1e-9, 1e-9, "dq")
    assert_close(dk, want_dk.reshape(2, Hkv, group, S, 8).sum(axis=2), 1e-9, 1e-9, "dk")
    assert_close(dv, want_dv.reshape(2, Hkv, group, S, 8).sum(axis=2), 1e-9, 1e-9, "dv")


def test_reference_grouped_query_attention_names_heads_that_do_not_fit():
    q, k = np.zeros((1, 3, 4, 8)), np.zeros((1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"expected q \(\.\.\., Hq, T, d\) and k, v \(\.\.\., Hkv, S, d\) with Hkv "
                                         r"dividing Hq"):
        reference.attention_forward(q, k, k)


def test_reference_logprobs_keep_their_answer_beside_huge_logits_and_carry_nan():
    x = np.array([[1e30, 1e30, 0.0], [np.nan, 0.0, 1.0], [np.inf, 0.0, 1.0], [-np.inf] * 3], dtype=np.float32)
    out, lse = reference.logprobs_forward(x, np.array([0, 1, 1, 0]))
    assert out[0] == pytest.approx(-math.log(2))  # x_t − lse would give 0: lse rounds to 1e30
    assert np.isnan(out[1:]).all() and np.isnan(lse[1:3]).all() and lse[3] == -np.inf


# ------------------------------------------------------------------ GPU
# Each test below runs on the GPU ("cuda", where cupy sees one) and on the CPU execution harness
# ("cuda_cpu": the same .cu sources compiled by the C++ compiler and run thread by thread under two
# schedules that must agree bit for bit, tests/cuda_cpu), at the same tolerances.
@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "cuda_cpu"])
def cp(request, monkeypatch):
    """The cupy module of this case: the real one, or the CPU execution harness's stand-in."""
    if request.param == "cuda":
        if harness.sanitizing():
            pytest.skip("the sanitizer run covers the CPU execution harness only")
        if not backend.gpu_available():
            pytest.skip("needs cupy and a CUDA GPU")
        import cupy
        return cupy
    if harness.compiler() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no C++ compiler: CI must run the kernels through the CPU execution harness")
        pytest.skip("needs a C++ compiler (g++) for the CPU execution harness")
    cupy = cupy_on_cpu.install(monkeypatch)
    if os.environ.get("MINIRLHF_KERNEL_SOURCES"):  # tests/cuda_cpu/mutate.py runs altered sources
        monkeypatch.setattr(kernels, "SOURCE_DIR", Path(os.environ["MINIRLHF_KERNEL_SOURCES"]))
    return cupy


def naive_cupy_attention(cp, q, k, v, mask, causal, c):
    """Plain CuPy attention (matmul + softmax, float64 through F's non-fused path): out and gradients."""
    leaves = [Tensor(cp.asarray(a), requires_grad=True, dtype=np.float64) for a in (q, k, v)]
    m = None if mask is None else cp.asarray(mask)
    out = F.scaled_dot_product_attention(*leaves, attn_mask=m, is_causal=causal)
    assert out._op == "scaled_dot_product_attention", "float64 must take the plain path"
    (out * Tensor(cp.asarray(c), dtype=np.float64)).sum().backward()
    return out.numpy(), [backend.to_numpy(t.grad) for t in leaves]


def reference_attention(q, k, v, km, causal, c):
    """reference.attention_forward / backward in float64: out, lse, (dq, dk, dv)."""
    q, k, v, c = (a.astype(np.float64) for a in (q, k, v, c))
    out, lse = reference.attention_forward(q, k, v, km, causal)
    return out, lse, reference.attention_backward(q, k, v, out, lse, c, km, causal)


def fused_attention(cp, q, k, v, km, causal, c, tensor_cores):
    km = None if km is None else cp.asarray(km)
    out, lse = attention.forward(cp.asarray(q), cp.asarray(k), cp.asarray(v), km, causal, tensor_cores=tensor_cores)
    grads = attention.backward(cp.asarray(q), cp.asarray(k), cp.asarray(v), out, lse, cp.asarray(c), km, causal,
                               tensor_cores=tensor_cores)
    return out, lse, grads


# the SIMT kernels, and the 3xTF32 tensor-core kernels (mma.sync), at the same fp32 tolerances
tensor_cores = pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "tf32x3"])


def assert_lse_close(lse, ref_lse):
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert_close(np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(ref_lse), ref_lse, 0), 1e-5, 1e-5, "lse")


# the kernels' tiles are 64 × 64: T = 1, T = S = 64·k ± 1, S ≠ T, padding, ±1e4, all head dims
GPU_ATTENTION_CASES = [
    (1, 2, 1, 1, 64, True, False, False),
    (2, 2, 65, 65, 64, True, False, False),
    (1, 2, 130, 130, 32, True, True, False),
    (3, 1, 127, 127, 128, True, True, False),
    (1, 2, 63, 150, 64, True, False, False),
    (1, 1, 150, 70, 32, True, False, False),
    (3, 2, 100, 100, 64, False, True, False),
    (1, 2, 129, 129, 64, True, False, True),
]


@tensor_cores
@pytest.mark.parametrize("B, H, T, S, d, causal, pad, big", GPU_ATTENTION_CASES)
def test_fused_attention_matches_naive_cupy_and_the_reference(cp, tensor_cores, B, H, T, S, d, causal, pad, big):
    rng = np.random.default_rng(T + 7 * S + d)
    q, k, v, mask = attention_inputs(rng, B, H, T, S, d, pad, big, dtype=np.float32)
    c = rng.standard_normal((B, H, T, d)).astype(np.float32)
    naive_out, naive_grads = naive_cupy_attention(cp, q, k, v, mask, causal, c)
    km = key_mask(mask)
    out, lse, grads = fused_attention(cp, q, k, v, km, causal, c, tensor_cores)
    ref_out, ref_lse, ref_grads = reference_attention(q, k, v, km, causal, c)
    assert_close(out.get(), naive_out, 1e-4, 1e-5, "out vs naive CuPy")
    assert_close(out.get(), ref_out, 1e-4, 1e-5, "out vs reference")
    assert_lse_close(lse.get(), ref_lse)
    # with scores of 1e4, q and k hold entries of order 1e3 and the (near-zero) gradients carry fp32
    # rounding of products with them: tolerances scale with the inputs there
    atol = 1e-5 * max(np.abs(q).max(), np.abs(k).max()) if big else 1e-4
    for name, g, w, r in zip(("dq", "dk", "dv"), grads, naive_grads, ref_grads):
        assert_close(g.get(), w, 1e-4, atol, f"{name} vs naive CuPy")
        assert_close(g.get(), r, 1e-4, atol, f"{name} vs reference")


# (B, Hq, Hkv, T, S, d, causal, pad): several query heads per key/value head, over tile edges
GPU_GQA_CASES = [(2, 4, 2, 70, 70, 64, True, True), (1, 6, 2, 65, 130, 32, True, False),
                 (1, 3, 1, 40, 40, 128, False, True)]


@tensor_cores
@pytest.mark.parametrize("B, Hq, Hkv, T, S, d, causal, pad", GPU_GQA_CASES)
def test_fused_grouped_query_attention_matches_the_reference(cp, tensor_cores, B, Hq, Hkv, T, S, d, causal, pad):
    rng = np.random.default_rng(Hq + T + S)
    q, _, _, mask = attention_inputs(rng, B, Hq, T, S, d, pad, dtype=np.float32)
    _, k, v, _ = attention_inputs(rng, B, Hkv, T, S, d, dtype=np.float32)
    c = rng.standard_normal(q.shape).astype(np.float32)
    km = key_mask(mask)
    assert attention.supported(cp.asarray(q), cp.asarray(k), cp.asarray(v), None if mask is None else cp.asarray(mask))
    out, lse, grads = fused_attention(cp, q, k, v, km, causal, c, tensor_cores)
    ref_out, ref_lse, ref_grads = reference_attention(q, k, v, km, causal, c)
    assert_close(out.get(), ref_out, 1e-4, 1e-5, "out vs reference")
    assert_lse_close(lse.get(), ref_lse)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.shape == r.shape, name
        assert_close(g.get(), r, 1e-4, 1e-4, f"{name} vs reference")


@tensor_cores
def test_fused_attention_never_reads_tiles_above_the_causal_diagonal(cp, tensor_cores):
    rng = np.random.default_rng(5)
    q, k, v, _ = attention_inputs(rng, 1, 2, 192, 192, 64, dtype=np.float32)
    k[..., 64:, :] = np.nan
    v[..., 64:, :] = np.nan
    out, lse = attention.forward(cp.asarray(q), cp.asarray(k), cp.asarray(v), None, True, tensor_cores=tensor_cores)
    assert np.isfinite(out.get()[..., :64, :]).all() and np.isfinite(lse.get()[..., :64]).all()
    assert np.isnan(out.get()[..., 64:, :]).all()
    q, k, v, _ = attention_inputs(rng, 1, 2, 192, 192, 64, dtype=np.float32)
    out, lse = attention.forward(cp.asarray(q), cp.asarray(k), cp.asarray(v), None, True, tensor_cores=tensor_cores)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    q[..., :64, :] = np.nan
    dout[..., :64, :] = np.nan
    _, dk, dv = attention.backward(cp.asarray(q), cp.asarray(k), cp.asarray(v), out, lse, cp.asarray(dout), None,
                                   True, tensor_cores=tensor_cores)
    assert np.isfinite(dk.get()[..., 64:, :]).all() and np.isfinite(dv.get()[..., 64:, :]).all()


# (N, V, offset, scale): V = 1; rows starting at every 16-byte alignment (V odd, a sliced buffer);
# GPT-2's vocabulary; logits of ±1e4
GPU_LOGPROB_CASES = [(3, 1, 0, 3.0), (7, 5, 1, 3.0), (9, 1027, 3, 3.0), (4, 50257, 0, 3.0), (6, 4096, 2, 1e4)]


@pytest.mark.parametrize("N, V, offset, scale", GPU_LOGPROB_CASES)
def test_fused_logprobs_match_naive_cupy_and_the_reference(cp, N, V, offset, scale):
    rng = np.random.default_rng(V + offset)
    x = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    t = rng.integers(0, V, N)
    g = rng.standard_normal(N).astype(np.float32)
    buf = cp.zeros(N * V + offset, dtype=cp.float32)   # rows that start off the 16-byte grid
    buf[offset:] = cp.asarray(x.reshape(-1))
    xg = buf[offset:].reshape(N, V)
    out, lse = logprobs.forward(xg, cp.asarray(t))
    grad = logprobs.backward(xg, cp.asarray(t), lse, cp.asarray(g))
    leaf = Tensor(cp.asarray(x), requires_grad=True, dtype=np.float64)  # naive CuPy: the float64 plain path
    naive = F.token_logprobs(leaf, cp.asarray(t))
    assert naive._op == "token_logprobs"
    (naive * Tensor(cp.asarray(g), dtype=np.float64)).sum().backward()
    ref_out, ref_lse = reference.logprobs_forward(x.astype(np.float64), t)
    ref_grad = reference.logprobs_backward(x.astype(np.float64), t, ref_lse, g.astype(np.float64))
    assert_close(out.get(), naive.numpy(), 1e-5, 1e-6, "log-probs vs naive CuPy")
    assert_close(out.get(), ref_out, 1e-5, 1e-6, "log-probs vs reference")
    assert_close(lse.get(), ref_lse, 1e-6, 1e-6, "lse vs reference")
    assert_close(grad.get(), backend.to_numpy(leaf.grad), 1e-5, 1e-6, "gradient vs naive CuPy")
    assert_close(grad.get(), ref_grad, 1e-5, 1e-6, "gradient vs reference")


def test_fused_logprobs_give_nan_where_the_plain_path_does(cp):
    # NaN before the aligned middle, inside it (a float4 of NaN), in the tail; +inf; a row of −inf
    V = 1027
    x = np.random.default_rng(8).standard_normal((7, V)).astype(np.float32)
    x[0, 1] = np.nan
    x[1, 500:504] = np.nan
    x[2, V - 1] = np.nan
    x[3, :] = np.nan
    x[4, 7] = np.inf
    x[5, :] = -np.inf
    t = np.full(7, 3)
    with np.errstate(invalid="ignore"):
        want = F.token_logprobs(Tensor(x), t).numpy()
    out, _ = logprobs.forward(cp.asarray(x), cp.asarray(t))
    np.testing.assert_array_equal(np.isnan(out.get()), np.isnan(want))
    assert np.isnan(out.get()[:6]).all() and np.isfinite(out.get()[6])


def test_fused_logprobs_keep_their_answer_beside_huge_logits(cp):
    x = np.zeros((2, 1027), dtype=np.float32)
    x[0, [3, 600]] = 1e30
    x[1, :] = 1e30
    out, lse = logprobs.forward(cp.asarray(x), cp.asarray(np.array([600, 5])))
    np.testing.assert_allclose(out.get(), [-math.log(2), -math.log(1027)], rtol=1e-6)


def test_fused_logprobs_backward_can_overwrite_the_logits_in_place(cp):
    rng = np.random.default_rng(6)
    x = cp.asarray(rng.standard_normal((5, 301)).astype(np.float32))
    t, g = cp.asarray(rng.integers(0, 301, 5)), cp.asarray(rng.standard_normal(5).astype(np.float32))
    _, lse = logprobs.forward(x, t)
    want = logprobs.backward(x, t, lse, g).get()
    got = logprobs.backward(x, t, lse, g, out=x)
    assert got is x
    np.testing.assert_array_equal(x.get(), want)


def test_fused_logprob_of_an_out_of_range_target_is_nan(cp):
    out, _ = logprobs.forward(cp.zeros((3, 4), dtype=cp.float32), cp.asarray([0, 4, -1]))
    out = out.get()
    assert out[0] == pytest.approx(-math.log(4)) and np.isnan(out[1:]).all()


def test_linear_token_logprobs_on_gpu_matches_numpy(cp):
    rng = np.random.default_rng(7)
    h0, w0, t = rng.standard_normal((2, 37, 32)), rng.standard_normal((1000, 32)) * 0.3, rng.integers(0, 1000, (2, 37))
    results = []
    for device in ("cpu", "cuda"):
        h = Tensor(h0, requires_grad=True, device=device)
        w = Tensor(w0, requires_grad=True, device=device)
        out = F.linear_token_logprobs(h, w, Tensor(t, device=device), chunk_size=16)
        out.sum().backward()
        results.append((out.numpy(), backend.to_numpy(h.grad), backend.to_numpy(w.grad)))
    for name, got, want in zip(("log-probs", "d hidden", "d weight"), results[1], results[0]):
        assert_close(got, want, 1e-4, 1e-5, name)


def test_functional_uses_the_fused_kernels_for_supported_cupy_inputs_only(cp):
    q = Tensor(cp.zeros((2, 3, 20, 64), dtype=cp.float32))
    kv = Tensor(cp.zeros((2, 1, 20, 64), dtype=cp.float32))
    pad = cp.ones((2, 1, 1, 20), dtype=bool)
    assert F.scaled_dot_product_attention(q, q, q, attn_mask=pad, is_causal=True)._op == "fused_attention"
    assert F.scaled_dot_product_attention(q, kv, kv, is_causal=True)._op == "fused_attention"
    per_query = cp.ones((2, 1, 20, 20), dtype=bool)
    assert F.scaled_dot_product_attention(q, q, q, attn_mask=per_query)._op == "scaled_dot_product_attention"
    assert F.scaled_dot_product_attention(q.astype(np.float64), q, q)._op == "scaled_dot_product_attention"
    step = Tensor(cp.zeros((2, 3, 1, 64), dtype=cp.float32))  # one decoded token after a cache
    assert F.scaled_dot_product_attention(step, q, q, is_causal=True)._op == "scaled_dot_product_attention"
    logits = Tensor(cp.zeros((2, 3, 7), dtype=cp.float32))
    assert F.token_logprobs(logits, cp.zeros((2, 3), dtype=cp.int64))._op == "fused_token_logprobs"
