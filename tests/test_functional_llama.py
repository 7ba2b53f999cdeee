"""The Llama family's ops: RMSNorm, SiLU, rotary embeddings and grouped-query attention.

Each against finite differences (float64, shapes drawn by hypothesis, broadcasting included), against
PyTorch / ``transformers`` on values and gradients, and CuPy against NumPy where a GPU is present.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minirlhf.functional as F
from minirlhf import Tensor
from gradcheck import check_device, check_grad
from test_functional import query_blocks

DEVICE_SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def shape_of(draw, min_dims=0, max_dims=3, max_side=4):
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims)))


def rng_of(draw):
    return np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))


def torch_grads(fn, inputs, c):
    """fn's value and the gradients of (fn · c).sum() in torch float64."""
    import torch
    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in inputs]
    out = fn(*leaves)
    (out * torch.from_numpy(c)).sum().backward()
    return out.detach().numpy(), [leaf.grad.numpy() for leaf in leaves]


def assert_matches_torch(ours, theirs, inputs, atol=1e-10):
    leaves = [Tensor(a, requires_grad=True, dtype=np.float64) for a in inputs]
    out = ours(*leaves)
    c = np.random.default_rng(1).standard_normal(out.shape)
    (out * Tensor(c, dtype=np.float64)).sum().backward()
    want, grads = torch_grads(theirs, inputs, c)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-9, atol=atol)
    for i, (leaf, g) in enumerate(zip(leaves, grads)):
        np.testing.assert_allclose(leaf.grad, g, rtol=1e-9, atol=atol, err_msg=f"gradient of input {i}")


def check_everywhere(fn, inputs, device):
    if device == "cpu":
        check_grad(fn, *inputs)
        check_device(fn, *inputs, device="cpu")  # float32 agrees with float64
    else:
        check_device(fn, *inputs, device=device)


# ------------------------------------------------------------------ RMSNorm
@st.composite
def rms_norm_case(draw):
    rng = rng_of(draw)
    C = draw(st.integers(1, 5))
    x = rng.standard_normal(shape_of(draw) + (C,))
    with_weight = draw(st.booleans())
    inputs = [x, rng.uniform(0.5, 2.0, C)] if with_weight else [x]
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    return inputs, eps


@DEVICE_SETTINGS
@given(case=rms_norm_case())
def test_rms_norm_gradients_match_finite_differences(case, device):
    inputs, eps = case
    check_everywhere(lambda *a: F.rms_norm(*a, eps=eps), inputs, device)


@given(case=rms_norm_case())
def test_rms_norm_matches_torch(case):
    torch = pytest.importorskip("torch")
    inputs, eps = case
    C = inputs[0].shape[-1]
    assert_matches_torch(lambda *a: F.rms_norm(*a, eps=eps),
                         lambda *a: torch.nn.functional.rms_norm(a[0], (C,), a[1] if len(a) > 1 else None, eps),
                         inputs)


def test_rms_norm_is_x_over_its_root_mean_square():
    x = np.array([[3.0, 4.0], [1.0, -1.0]])
    out = F.rms_norm(Tensor(x, dtype=np.float64), eps=0.0).numpy()
    np.testing.assert_allclose(out, x / np.sqrt([[12.5], [1.0]]))


def test_rms_norm_names_a_weight_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"rms_norm: weight has shape \(3,\), expected \(4,\)"):
        F.rms_norm(Tensor(np.ones((2, 4))), Tensor(np.ones(3)))


# --------------------------------------------------------------------- SiLU
@st.composite
def silu_case(draw):
    return [rng_of(draw).standard_normal(shape_of(draw)) * 3]


@DEVICE_SETTINGS
@given(inputs=silu_case())
def test_silu_gradients_match_finite_differences(inputs, device):
    check_everywhere(F.silu, inputs, device)


@given(inputs=silu_case())
def test_silu_matches_torch(inputs):
    torch = pytest.importorskip("torch")
    assert_matches_torch(F.silu, torch.nn.functional.silu, inputs)


def test_silu_stays_finite_at_extremes():
    out = F.silu(Tensor(np.array([-1e4, -50.0, 0.0, 50.0, 1e4]))).numpy()
    np.testing.assert_allclose(out, [0.0, -50.0 / (1 + np.exp(50.0)), 0.0, 50.0, 1e4], rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------- rotary embedding
@st.composite
def rotary_case(draw):
    """x (B, H, T, d) and cos, sin of HF's layout: (B, T, d) angles, unsqueezed over heads."""
    rng = rng_of(draw)
    B, H, T = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    d = 2 * draw(st.integers(1, 3))
    positions = rng.integers(0, 50, (B, T))
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    angles = positions[..., None] * inv_freq
    emb = np.concatenate([angles, angles], axis=-1)  # (B, T, d)
    return rng.standard_normal((B, H, T, d)), np.cos(emb), np.sin(emb)


@DEVICE_SETTINGS
@given(case=rotary_case())
def test_rotary_embedding_gradients_match_finite_differences(case, device):
    x, cos, sin = case
    check_everywhere(lambda t: F.rotary_embedding(t, t.xp.asarray(cos[:, None]), t.xp.asarray(sin[:, None])),
                     [x], device)


@given(case=rotary_case())
def test_rotary_embedding_matches_transformers_apply_rotary_pos_emb(case):
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, cos, sin = case

    def theirs(t):
        q, _ = llama.apply_rotary_pos_emb(t, t, torch.from_numpy(cos), torch.from_numpy(sin), unsqueeze_dim=1)
        return q
    assert_matches_torch(lambda t: F.rotary_embedding(t, cos[:, None], sin[:, None]), theirs, [x])


def test_rotary_embedding_keeps_norms_and_makes_scores_depend_on_relative_position():
    rng = np.random.default_rng(0)
    d = 8
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)

    def rotate(x, position):
        emb = np.concatenate([position * inv_freq] * 2)
        return F.rotary_embedding(Tensor(x, dtype=np.float64), np.cos(emb), np.sin(emb)).numpy()
    q, k = rng.standard_normal(d), rng.standard_normal(d)
    np.testing.assert_allclose(np.linalg.norm(rotate(q, 7)), np.linalg.norm(q))
    np.testing.assert_allclose(rotate(q, 5) @ rotate(k, 3), rotate(q, 12) @ rotate(k, 10))
    assert not np.isclose(rotate(q, 5) @ rotate(k, 3), rotate(q, 5) @ rotate(k, 4))


def test_rotary_embedding_names_an_odd_head_dimension():
    with pytest.raises(ValueError, match="must be even"):
        F.rotary_embedding(Tensor(np.ones((2, 3))), np.ones(3), np.ones(3))


# ------------------------------------------------- grouped-query attention
@st.composite
def gqa_case(draw):
    """q (B, H, T, d), k and v (B, H_kv, S, d) with H = G · H_kv, and a key mask or none."""
    rng = rng_of(draw)
    B, H_kv, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 3))
    T, d = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    S = T + draw(st.integers(0, 3))
    causal = draw(st.booleans())
    mask_kind = draw(st.sampled_from(["none", "keys", "per_head"]))
    mask = None
    if mask_kind == "keys":      # (B, 1, 1, S), as a padded batch gives; the last key is always real
        mask = rng.random((B, 1, 1, S)) < 0.7
        mask[..., -1] = True
    elif mask_kind == "per_head":  # (B, H, T, S): each query head its own pattern
        mask = rng.random((B, G * H_kv, T, S)) < 0.7
        mask[..., -1] = True
    q = rng.standard_normal((B, G * H_kv, T, d))
    k, v = rng.standard_normal((B, H_kv, S, d)), rng.standard_normal((B, H_kv, S, d))
    return [q, k, v], mask, causal


def _gqa(mask, causal):
    def fn(q, k, v):
        m = None if mask is None else q.xp.asarray(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
    return fn


@DEVICE_SETTINGS
@given(case=gqa_case())
def test_grouped_query_attention_gradients_match_finite_differences(case, device):
    inputs, mask, causal = case
    check_everywhere(_gqa(mask, causal), inputs, device)


def _torch_gqa(case):
    """torch's scaled_dot_product_attention with enable_gqa on the same case (causal mask and key mask as one)."""
    torch = pytest.importorskip("torch")
    inputs, mask, causal = case
    T, S = inputs[0].shape[-2], inputs[1].shape[-2]
    allowed = np.tril(np.ones((T, S), dtype=bool), k=S - T) if causal else np.ones((T, S), dtype=bool)
    if mask is not None:
        allowed = allowed & mask

    def theirs(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(allowed),
                                                                enable_gqa=True)
    return theirs


@given(case=gqa_case())
def test_grouped_query_attention_matches_torch_enable_gqa(case):
    inputs, mask, causal = case
    assert_matches_torch(_gqa(mask, causal), _torch_gqa(case), inputs)


@given(case=gqa_case())
def test_grouped_query_attention_equals_attention_over_repeated_kv_heads(case):
    inputs, mask, causal = case
    q, k, v = inputs
    G = q.shape[1] // k.shape[1]
    grouped = _gqa(mask, causal)(*(Tensor(a, dtype=np.float64) for a in inputs)).numpy()
    repeated = _gqa(mask, causal)(*(Tensor(a, dtype=np.float64) for a in (q, np.repeat(k, G, 1),
                                                                          np.repeat(v, G, 1)))).numpy()
    np.testing.assert_allclose(grouped, repeated, rtol=1e-12, atol=1e-12)


@given(case=gqa_case(), n=st.integers(1, 3))
def test_grouped_query_attention_in_blocks_of_queries_matches_torch(case, n):
    """Causal attention runs over blocks of queries, each over the keys it sees: with blocks of 1–3 queries
    the values and gradients are torch's (the default block holds every query of these small cases)."""
    inputs, mask, causal = case
    theirs = _torch_gqa(case)

    def ours(q, k, v):
        with query_blocks(n):
            return _gqa(mask, causal)(q, k, v)
    assert_matches_torch(ours, theirs, inputs)


def test_grouped_query_attention_names_heads_that_do_not_divide():
    q, kv = Tensor(np.ones((1, 3, 2, 4))), Tensor(np.ones((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="H a multiple of H_kv"):
        F.scaled_dot_product_attention(q, kv, kv)
