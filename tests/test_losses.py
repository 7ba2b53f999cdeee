"""Identities of the policy-gradient losses in minirlhf/losses.py (SFT, Bradley-Terry, KL, REINFORCE,
GAE, PPO, GRPO, GSPO, REINFORCE++, the adaptive KL controller), each checked on values drawn by
hypothesis in float64, plus: finite-difference gradients of every loss, padding invariance (values
written under the mask change nothing), and argument errors that name the argument.

The preference losses (DPO and family, SimPO, ORPO, KTO) are in test_losses_preference.py.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import minirlhf.functional as F
from minirlhf import Tensor, losses
from gradcheck import check_device, check_grad


def t64(a, grad=False):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=grad, dtype=np.float64)


def floats(lo=-5.0, hi=5.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def vec(n, lo=-5.0, hi=5.0):
    return arrays(np.float64, n, elements=floats(lo, hi))


@st.composite
def token_batch(draw, B=None, T=None, min_len=0):
    """(logp, mask): per-token log-probs (B, T) and a mask of one response span per row
    (a prompt before it, padding after), rows of length >= min_len."""
    B = B or draw(st.integers(1, 4))
    T = T or draw(st.integers(1, 5))
    mask = np.zeros((B, T))
    for i in range(B):
        start = draw(st.integers(0, T - min_len))
        length = draw(st.integers(min_len, T - start))
        mask[i, start:start + length] = 1
    logp = draw(arrays(np.float64, (B, T), elements=floats(-6.0, -0.01)))
    return logp, mask


def grad_of(fn, *arrays_):
    """fn's value (float) and the gradient of its output w.r.t. each array."""
    leaves = [t64(a, grad=True) for a in arrays_]
    out = fn(*leaves)
    out.backward()
    return out.item(), [leaf.grad if leaf.grad is not None else np.zeros_like(leaf.data) for leaf in leaves]


# --------------------------------------------------------------- SFT and log-probs
@given(token_batch(), st.integers(0, 10_000))
def test_sequence_logprobs_is_masked_sum_of_token_logprobs(batch, seed):
    _, mask = batch
    rng = np.random.default_rng(seed)
    B, T, V = *mask.shape, 5
    logits = rng.normal(size=(B, T, V)) * 3
    targets = rng.integers(0, V, size=(B, T))
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    want = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(1)
    got = losses.sequence_logprobs(t64(logits), targets, mask).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_sft_loss_is_token_mean_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 6))
    targets = rng.integers(0, 6, size=(3, 4))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=float)
    want = F.cross_entropy(t64(logits), targets, mask=mask).item()
    assert losses.sft_loss(t64(logits), targets, mask).item() == pytest.approx(want, rel=1e-12)


def test_sft_loss_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)) * 4
    targets = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=float)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits[mask > 0]), torch.tensor(targets[mask > 0]))
    assert losses.sft_loss(t64(logits), targets, mask).item() == pytest.approx(ref.item(), rel=1e-10)


def test_masked_mean_of_an_all_masked_row_is_zero_not_nan():
    x = t64([[1.0, 2.0, 3.0], [np.nan, 5.0, 6.0]], grad=True)
    mask = np.array([[1, 0, 1], [0, 0, 0]])
    out = losses.masked_mean(x, mask, axis=1)
    np.testing.assert_array_equal(out.numpy(), [2.0, 0.0])
    out.sum().backward()
    np.testing.assert_array_equal(x.grad, [[0.5, 0, 0.5], [0, 0, 0]])
    assert losses.masked_mean(x, np.zeros((2, 3))).item() == 0.0


def test_losses_on_an_all_masked_batch_are_zero_not_nan():
    logp = t64(np.full((2, 3), -1.0), grad=True)
    zero = np.zeros((2, 3))
    values = [losses.sft_loss(t64(np.zeros((2, 3, 4))), np.zeros((2, 3), dtype=int), zero),
              losses.ppo_policy_loss(logp, logp.data, np.ones(2), zero)[0],
              losses.ppo_value_loss(logp, logp.data, logp.data, zero),
              losses.entropy(t64(np.zeros((2, 3, 4))), zero)]
    values += [losses.grpo_loss(logp, logp.data, logp.data, np.ones(2), zero, loss_type=k)[0]
               for k in losses.GRPO_LOSS_TYPES]
    for v in values:
        assert v.item() == 0.0


def test_masked_token_logprobs_are_token_logprobs_under_the_mask_and_zero_elsewhere():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 6)) * 3
    targets = rng.integers(0, 6, size=(2, 4))
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=float)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    want = np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask
    got = losses.masked_token_logprobs(t64(logits), targets, mask)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_nan_and_inf_logits_under_the_mask_reach_neither_token_logprobs_nor_their_gradient():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 5))
    mask = np.array([[1, 1, 0], [0, 1, 1]], dtype=float)
    targets = rng.integers(0, 5, size=(2, 3))
    dirty = logits.copy()
    dirty[0, 2] = np.nan
    dirty[1, 0] = [np.inf, -np.inf, np.nan, 1e308, 0]
    results = []
    for x in (logits, dirty):
        leaf = t64(x, grad=True)
        out = losses.masked_token_logprobs(leaf, np.where(mask > 0, targets, -100), mask)
        out.sum().backward()
        results.append((out.numpy(), leaf.grad))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
    assert (results[1][1][mask == 0] == 0).all()


def _whiten_reference(x, mask):
    v = x[mask > 0]
    return np.where(mask > 0, (x - v.mean()) / (v.std(ddof=1) + 1e-8), 0.0)


@given(arrays(np.float64, (3, 4), elements=floats(-100, 100)), arrays(np.float64, (3, 4), elements=st.sampled_from([0.0, 1.0])))
def test_whiten_gives_masked_mean_zero_and_unbiased_std_one(x, mask):
    v = x[mask > 0]
    assume(v.size >= 2 and v.std() > 1e-3)
    w = losses.whiten(x, mask).numpy()
    assert not losses.whiten(t64(x, grad=True), mask).requires_grad
    np.testing.assert_allclose(w, _whiten_reference(x, mask), rtol=1e-9, atol=1e-9)
    assert (w[mask == 0] == 0).all()
    assert w[mask > 0].mean() == pytest.approx(0, abs=1e-9)
    assert w[mask > 0].std(ddof=1) == pytest.approx(1, rel=1e-6)


@given(arrays(np.float64, 8, elements=floats(-10, 10)), floats(0.01, 100), floats(-100, 100))
def test_whiten_is_invariant_to_positive_affine_maps(x, a, b):
    """Exact for eps = 0; a positive eps moves the result by about eps/σ."""
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1.0])
    assume(x[mask > 0].std() > 1e-2)
    np.testing.assert_allclose(losses.whiten(a * x + b, mask, eps=0).numpy(), losses.whiten(x, mask, eps=0).numpy(),
                               rtol=1e-8, atol=1e-8)


def test_whiten_ignores_what_sits_under_the_mask_and_gives_zero_for_a_constant_input():
    rng = np.random.default_rng(4)
    x, mask = rng.normal(size=(3, 5)), (rng.random((3, 5)) < 0.6).astype(float)
    dirty = np.where(mask > 0, x, np.where(rng.random((3, 5)) < 0.5, np.nan, 1e300))
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(losses.whiten(dirty, mask).numpy(), losses.whiten(x, mask).numpy())
    np.testing.assert_array_equal(losses.whiten(np.full((2, 3), 0.1), np.ones((2, 3))).numpy(), 0)
    np.testing.assert_array_equal(losses.whiten(np.array([3.0, np.nan]), np.array([1, 0])).numpy(), 0)
    np.testing.assert_array_equal(losses.whiten(np.ones(3), np.zeros(3)).numpy(), 0)


def test_whiten_of_huge_float32_values_is_finite_and_right():
    x = np.array([1e30, -1e30, 3e30, 0], dtype=np.float32)
    w = losses.whiten(x, np.ones(4)).numpy()
    np.testing.assert_allclose(w, _whiten_reference(x.astype(np.float64), np.ones(4)), rtol=1e-5)


@given(token_batch(min_len=0), st.sampled_from(["k1", "k2", "k3"]), st.integers(0, 10_000))
def test_response_kl_is_the_masked_sum_of_the_per_token_estimator(batch, est, seed):
    logp, mask = batch
    ref = logp + np.random.default_rng(seed).normal(0, 0.5, size=logp.shape)
    k = losses.kl_estimate(logp, ref, est).numpy()
    got = losses.response_kl(logp, ref, mask, est)
    assert got.shape == (logp.shape[0],)
    np.testing.assert_allclose(got.numpy(), (k * mask).sum(axis=1), rtol=1e-12, atol=1e-12)


def test_response_kl_ignores_nan_under_the_mask_and_carries_the_policy_gradient():
    logp = t64([[-1.0, -2.0, np.nan], [-0.5, -0.5, -0.5]], grad=True)
    ref = np.array([[-1.5, np.inf, -1.0], [-0.5, -1.0, -2.0]])
    mask = np.array([[1, 0, 0], [1, 1, 1.0]])
    kl = losses.response_kl(logp, ref, mask, "k1")
    np.testing.assert_allclose(kl.numpy(), [0.5, 2.0])
    kl.sum().backward()
    np.testing.assert_array_equal(logp.grad, mask)


def _micro_batches(rng, sizes, T=5, V=6):
    """Micro-batches whose rows hold very different numbers of response tokens."""
    out = []
    for B in sizes:
        mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, size=(B, 1))).astype(float)
        out.append((rng.normal(size=(B, T, V)), rng.integers(0, V, size=(B, T)), mask))
    return out


def test_sft_micro_batch_losses_over_the_global_token_count_sum_to_the_full_batch_loss():
    """Gradient accumulation must normalise by the token count of the whole batch, not average
    per-micro-batch means (huggingface/transformers#34191, the 2024 gradient-accumulation fix)."""
    rng = np.random.default_rng(5)
    micro = _micro_batches(rng, [1, 3, 2])
    full = [np.concatenate(parts) for parts in zip(*micro)]
    n = int(sum(m.sum() for _, _, m in micro))
    value_full, (grad_full,) = grad_of(lambda x: losses.sft_loss(x, full[1], full[2]), full[0])
    value_sum, grads = 0.0, []
    for logits, targets, mask in micro:
        v, (g,) = grad_of(lambda x: losses.sft_loss(x, targets, mask, num_tokens=n), logits)
        value_sum += v
        grads.append(g)
    assert value_sum == pytest.approx(value_full, rel=1e-12)
    np.testing.assert_allclose(np.concatenate(grads), grad_full, rtol=1e-10, atol=1e-14)
    mean_of_means = np.mean([losses.sft_loss(t64(x), y, m).item() for x, y, m in micro])
    assert mean_of_means != pytest.approx(value_full, rel=1e-3)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_grpo_token_mean_micro_batch_losses_over_the_global_token_count_sum_to_the_full_batch_loss(loss_type):
    """As for SFT: token-mean losses accumulate over the global token count (huggingface/trl#3231: a
    per-micro-batch normaliser is not invariant to how samples fall into accumulation steps;
    allenai/open-instruct#1161 made the token count of the whole accumulated batch the denominator)."""
    rng = np.random.default_rng(6)
    sizes, T = [2, 1, 3], 5
    parts = []
    for B in sizes:
        mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, size=(B, 1))).astype(float)
        logp = -rng.uniform(0.1, 2, size=(B, T))
        parts.append((logp, logp + rng.normal(0, 0.3, (B, T)), logp + rng.normal(0, 0.3, (B, T)),
                      rng.normal(size=B), mask))
    full = [np.concatenate(p) for p in zip(*parts)]
    n = int(full[4].sum())

    def loss(p, **kw):
        return lambda x: losses.grpo_loss(x, p[1], p[2], p[3], p[4], beta=0.1, loss_type=loss_type, **kw)[0]
    value_full, (grad_full,) = grad_of(loss(full), full[0])
    results = [grad_of(loss(p, num_tokens=n), p[0]) for p in parts]
    assert sum(v for v, _ in results) == pytest.approx(value_full, rel=1e-12)
    np.testing.assert_allclose(np.concatenate([g for _, (g,) in results]), grad_full, rtol=1e-10, atol=1e-14)
    mean_of_means = np.mean([loss(p)(t64(p[0])).item() for p in parts])
    assert mean_of_means != pytest.approx(value_full, rel=1e-3)


def test_adaptive_kl_controller_keeps_its_beta_after_refusing_a_nan_measurement():
    """One update(nan) used to make β NaN for every later step."""
    controller = losses.AdaptiveKLController(0.1, 6.0, 100)
    with pytest.raises(ValueError):
        controller.update(float("nan"), 10)
    assert controller.beta == 0.1 and controller.update(6.0, 10) == 0.1


def test_kl_penalty_of_responses_with_no_positions_is_empty_not_an_error():
    out = losses.kl_penalty(np.zeros((2, 0)), np.zeros((2, 0)), np.zeros((2, 0)), np.ones(2), 0.1)
    assert out.shape == (2, 0)


def test_statistics_of_an_empty_batch_are_zero_not_nan():
    """The module's convention for an all-masked row (0, never NaN), extended to a batch of no rows."""
    empty, none = np.zeros(0), np.zeros((0, 3))
    with np.errstate(all="raise"):
        loss, accuracy = losses.bradley_terry_loss(empty, empty)
        assert loss.item() == 0 and float(accuracy) == 0
        for k in losses.GRPO_LOSS_TYPES:
            assert losses.grpo_loss(none, none, none, empty, none, loss_type=k)[0].item() == 0
            flat = np.zeros((2, 0))
            assert losses.grpo_loss(flat, flat, flat, np.ones(2), flat, loss_type=k)[0].item() == 0
        loss, stats = losses.gspo_loss(none, none, none, empty, none, beta=0.1)
        assert loss.item() == 0 and float(stats["clip_fraction"]) == 0 and float(stats["kl"]) == 0
        loss, stats = losses.orpo_loss(none, none, none, none)
        assert loss.item() == 0 and float(stats["log_odds_ratio"]) == 0 and float(stats["odds_ratio_loss"]) == 0
        for k in losses.DPO_LOSS_TYPES:
            assert losses.dpo_loss(empty, empty, empty, empty, loss_type=k)[0].item() == 0
        assert losses.simpo_loss(empty, empty, empty, empty)[0].item() == 0
        assert losses.kto_loss(empty, empty, np.zeros(0, bool), 0.0)[0].item() == 0
        assert losses.reinforce_loss(none, empty, none).item() == 0


def test_gspo_responses_without_tokens_add_nothing_and_are_not_counted_as_clipped():
    """An empty response has no sequence ratio: it added −A_i/B (an all-masked batch gave −mean(A))
    and counted in the clip fraction."""
    logp = -np.ones((3, 2))
    old = logp - np.array([[0.5, 0.5], [0.0, 0.0], [0.0, 0.0]])    # row 0 is clipped
    mask = np.array([[1, 1], [1, 1], [0, 0.0]])
    adv = np.array([1.0, 2.0, 5.0])
    loss, stats = losses.gspo_loss(t64(logp), old, None, adv, mask, clip_eps=0.2, clip_eps_high=0.2)
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + 1.0 * 2.0) / 3, rel=1e-12)
    assert float(stats["clip_fraction"]) == 0.5
    loss, stats = losses.gspo_loss(t64(logp), old, None, adv, np.zeros((3, 2)))
    assert loss.item() == 0 and float(stats["clip_fraction"]) == 0


# ------------------------------------------------------------------ Bradley-Terry
@given(vec(4), vec(4), vec(4, -2, 2))
def test_bradley_terry_loss_is_minus_log_sigmoid_of_reward_gap_minus_margin(rc, rr, margin):
    loss, accuracy = losses.bradley_terry_loss(t64(rc), t64(rr), margin=margin)
    want = np.mean(np.logaddexp(0, -(rc - rr - margin)))
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert float(accuracy) == pytest.approx(np.mean(rc > rr))


@given(floats(), floats(), floats(-3, 3))
def test_bradley_terry_swapping_chosen_and_rejected_with_negated_margin_gives_the_complement(rc, rr, m):
    p_forward = math.exp(-losses.bradley_terry_loss(t64([rc]), t64([rr]), margin=m)[0].item())
    p_swapped = math.exp(-losses.bradley_terry_loss(t64([rr]), t64([rc]), margin=-m)[0].item())
    assert p_forward + p_swapped == pytest.approx(1.0, abs=1e-12)


@given(vec(5), vec(5))
def test_bradley_terry_accuracy_of_swapped_pairs_is_the_complement(rc, rr):
    assume((rc != rr).all())
    _, a = losses.bradley_terry_loss(t64(rc), t64(rr))
    _, b = losses.bradley_terry_loss(t64(rr), t64(rc))
    assert float(a) + float(b) == pytest.approx(1.0)


def test_bradley_terry_loss_is_finite_for_huge_reward_gaps():
    loss, _ = losses.bradley_terry_loss(Tensor([1e4, -1e4]), Tensor([-1e4, 1e4]))
    assert loss.item() == pytest.approx(1e4, rel=1e-6)


# --------------------------------------------------------------------------- KL
@given(arrays(np.float64, (2, 3, 4), elements=floats(-8, 8)), arrays(np.float64, (2, 3, 4), elements=floats(-8, 8)))
def test_kl_exact_equals_sum_p_log_p_over_q_and_is_nonnegative(a, b):
    kl = losses.kl_exact(t64(a), b).numpy()
    la = a - np.logaddexp.reduce(a, -1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, -1, keepdims=True)
    np.testing.assert_allclose(kl, (np.exp(la) * (la - lb)).sum(-1), rtol=1e-10, atol=1e-12)
    assert (kl > -1e-12).all()


def test_kl_exact_is_zero_for_logits_that_differ_by_a_constant_and_finite_at_1e4():
    a = np.random.default_rng(0).normal(size=(2, 3, 5)) * 1e4
    np.testing.assert_allclose(losses.kl_exact(t64(a), a + 7.0).numpy(), 0, atol=1e-9)
    assert np.isfinite(losses.kl_exact(Tensor(a), -a).numpy()).all()


def test_kl_exact_and_entropy_are_finite_with_banned_tokens():
    """A token banned with a −inf logit has π(v) = 0 and adds 0 (it gave 0·(−inf) = NaN)."""
    logits = t64([[[0.0, 1.0, -np.inf], [-np.inf, 2.0, 2.0]]], grad=True)
    ref = np.array([[[1.0, 0.0, 3.0], [-np.inf, 0.0, 1.0]]])
    mask = np.ones((1, 2))
    kl = losses.kl_exact(logits, ref, mask)
    H = losses.entropy(logits, mask)
    (kl.sum() + H).backward()
    def softmax(z):
        e = np.exp(np.asarray(z) - np.max(z))
        return e / e.sum()
    p = [softmax([0.0, 1.0]), softmax([2.0, 2.0])]
    q = [softmax([1.0, 0.0, 3.0])[:2], softmax([0.0, 1.0])]
    want_kl = [(pi * np.log(pi / qi)).sum() for pi, qi in zip(p, q)]
    want_H = np.mean([-(pi * np.log(pi)).sum() for pi in p])
    np.testing.assert_allclose(kl.numpy()[0], want_kl, rtol=1e-12)
    assert H.item() == pytest.approx(want_H, rel=1e-12)
    assert np.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 2] == 0 and logits.grad[0, 1, 0] == 0


def test_kl_exact_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
    ta, tb = torch.tensor(a).log_softmax(-1), torch.tensor(b).log_softmax(-1)
    want = torch.nn.functional.kl_div(tb, ta, log_target=True, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(losses.kl_exact(t64(a), b).numpy(), want, rtol=1e-10)


@given(arrays(np.float64, 6, elements=floats(-30, 0)), arrays(np.float64, 6, elements=floats(-30, 0)))
def test_kl_estimators_follow_their_formulas(logp, ref_logp):
    lr = logp - ref_logp
    k1 = losses.kl_estimate(t64(logp), ref_logp, "k1").numpy()
    k2 = losses.kl_estimate(t64(logp), ref_logp, "k2").numpy()
    k3 = losses.kl_estimate(t64(logp), ref_logp, "k3").numpy()
    np.testing.assert_allclose(k1, lr, atol=1e-12)
    np.testing.assert_allclose(k2, 0.5 * lr ** 2, rtol=1e-12)
    x = np.minimum(-lr, losses.MAX_LOG_RATIO)
    np.testing.assert_allclose(k3, np.exp(x) - 1 - x, rtol=1e-9, atol=1e-12)


@given(st.one_of(floats(-50, 50), st.floats(-1e-6, 1e-6)), st.sampled_from([np.float32, np.float64]))
def test_k3_is_nonnegative_and_finite_for_every_log_ratio(log_ratio, dtype):
    k3 = losses.kl_estimate(Tensor([log_ratio], dtype=dtype), np.zeros(1), "k3")
    assert k3.data[0] >= 0 and np.isfinite(k3.data[0])


@given(st.one_of(floats(-50, -1e-5), floats(1e-5, 50)), st.sampled_from([np.float32, np.float64]))
def test_k3_is_positive_away_from_ratio_one(log_ratio, dtype):
    assert losses.kl_estimate(Tensor([log_ratio], dtype=dtype), np.zeros(1), "k3").data[0] > 0


def test_k3_of_ratio_one_is_exactly_zero_with_zero_gradient():
    logp = t64([-0.3, -2.0], grad=True)
    k3 = losses.kl_estimate(logp, np.array([-0.3, -2.0]), "k3")
    k3.sum().backward()
    assert k3.numpy().tolist() == [0.0, 0.0] and logp.grad.tolist() == [0.0, 0.0]


@given(token_batch(), floats(0, 1), st.sampled_from(["k1", "k2", "k3"]), st.integers(0, 10_000))
def test_kl_penalty_is_minus_beta_k_per_token_plus_score_at_each_last_response_token(batch, beta, est, seed):
    logp, mask = batch
    rng = np.random.default_rng(seed)
    ref = logp + rng.normal(size=logp.shape)
    scores = rng.normal(size=logp.shape[0])
    got = losses.kl_penalty(t64(logp), ref, mask, scores, beta, estimator=est).numpy()
    want = -beta * losses.kl_estimate(t64(logp), ref, est).numpy() * mask
    for i in range(mask.shape[0]):
        on = np.flatnonzero(mask[i])
        if on.size:
            want[i, on[-1]] += scores[i]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- REINFORCE
@given(arrays(np.float64, 12, elements=floats()), st.sampled_from([2, 3, 4, 6]))
def test_rloo_baseline_of_each_sample_is_the_mean_of_the_others_in_its_group(rewards, G):
    adv = losses.rloo_advantages(t64(rewards), G).numpy()
    for i, r in enumerate(rewards):
        group = rewards[i // G * G:(i // G + 1) * G]
        others = np.delete(group, i % G)
        assert adv[i] == pytest.approx(r - others.mean(), abs=1e-9)
    # the baseline r_i − A_i does not move when r_i moves
    bumped = rewards.copy()
    bumped[0] += 3.0
    b_before = rewards - adv
    b_after = bumped - losses.rloo_advantages(t64(bumped), G).numpy()
    assert b_after[0] == pytest.approx(b_before[0], abs=1e-9)


@given(arrays(np.float64, 12, elements=floats()), st.sampled_from([2, 3, 4, 6]))
def test_rloo_advantages_are_g_over_g_minus_1_times_unscaled_grpo_advantages(rewards, G):
    rloo = losses.rloo_advantages(t64(rewards), G).numpy()
    grpo = losses.grpo_advantages(t64(rewards), G, scale="none").numpy()
    np.testing.assert_allclose(rloo, G / (G - 1) * grpo, atol=1e-9)


@given(token_batch(B=4), vec(4), st.sampled_from([None, "mean", "rloo"]))
def test_reinforce_gradient_is_minus_advantage_over_batch_on_every_response_token(batch, rewards, baseline):
    logp, mask = batch
    _, (g,) = grad_of(lambda lp: losses.reinforce_loss(lp, rewards, mask, baseline=baseline, group_size=2), logp)
    if baseline is None:
        A = rewards
    elif baseline == "mean":
        A = rewards - np.repeat(rewards.reshape(2, 2).mean(1), 2)
    else:
        A = losses.rloo_advantages(t64(rewards), 2).numpy()
    np.testing.assert_allclose(g, -A[:, None] * mask / 4, atol=1e-12)


# -------------------------------------------------------------------------- GAE
@st.composite
def rewards_values_mask(draw):
    logp, mask = draw(token_batch())
    rewards = draw(arrays(np.float64, mask.shape, elements=floats()))
    values = draw(arrays(np.float64, mask.shape, elements=floats()))
    return rewards, values, mask


def gae_reference(rewards, values, mask, gamma, lam):
    """The textbook recursion on each row's response tokens, written out on their own."""
    adv = np.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        on = np.flatnonzero(mask[i])
        r, v = rewards[i, on], values[i, on]
        a, running = np.zeros(len(on)), 0.0
        for t in reversed(range(len(on))):
            next_v = v[t + 1] if t + 1 < len(on) else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            a[t] = running
        adv[i, on] = a
    return adv


@given(rewards_values_mask())
def test_gae_with_lambda_one_and_gamma_one_is_return_to_go_minus_value(rvm):
    rewards, values, mask = rvm
    adv, returns = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1)
    np.testing.assert_allclose(adv.numpy(), (to_go - values) * mask, atol=1e-9)
    np.testing.assert_allclose(returns.numpy(), to_go * mask, atol=1e-9)


@given(rewards_values_mask(), floats(0, 1))
def test_gae_with_lambda_zero_is_the_one_step_td_error(rvm, gamma):
    rewards, values, mask = rvm
    adv, _ = losses.gae(rewards, values, mask, gamma=gamma, lam=0.0)
    want = np.zeros_like(rewards)
    for i in range(mask.shape[0]):
        on = np.flatnonzero(mask[i])
        next_v = np.append(values[i, on][1:], 0.0)
        want[i, on] = rewards[i, on] + gamma * next_v - values[i, on]
    np.testing.assert_allclose(adv.numpy(), want, atol=1e-9)


@given(rewards_values_mask(), floats(0, 1), floats(0, 1))
def test_gae_equals_the_textbook_recursion_and_returns_are_advantages_plus_values(rvm, gamma, lam):
    rewards, values, mask = rvm
    adv, returns = losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
    np.testing.assert_allclose(adv.numpy(), gae_reference(rewards, values, mask, gamma, lam), atol=1e-9)
    np.testing.assert_allclose(returns.numpy(), (adv.numpy() + values) * mask, atol=1e-12)


# -------------------------------------------------------------------------- PPO
def per_token_ppo_loss(logp, old, adv, **kw):
    """PPO's per-token loss ℓ_t, read off by masking in one token at a time."""
    out = np.zeros(logp.shape)
    for idx in np.ndindex(*logp.shape):
        one = np.zeros(logp.shape)
        one[idx] = 1
        out[idx] = losses.ppo_policy_loss(t64(logp), old, adv, one, **kw)[0].item()
    return out


@given(token_batch(B=2, T=3, min_len=1), st.integers(0, 10_000), floats(0.05, 0.5))
def test_ppo_clipped_objective_equals_ratio_times_advantage_inside_the_trust_region(batch, seed, eps):
    logp, mask = batch
    rng = np.random.default_rng(seed)
    ratio = rng.uniform(1 - eps, 1 + eps, size=logp.shape)
    old = logp - np.log(ratio)
    adv = rng.normal(size=logp.shape)
    loss, stats = losses.ppo_policy_loss(t64(logp), old, adv, mask, clip_eps=eps)
    want = (-ratio * adv * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert float(stats["clip_fraction"]) == 0.0


@given(token_batch(B=3, T=3, min_len=1), st.integers(0, 10_000), floats(0.05, 0.4))
def test_ppo_gradient_is_zero_where_it_clips(batch, seed, eps):
    logp, mask = batch
    rng = np.random.default_rng(seed)
    # every ratio strictly outside the trust region, on the side where the clip binds for its advantage
    adv = rng.choice([-1.0, 1.0], size=logp.shape) * rng.uniform(0.1, 2, size=logp.shape)
    ratio = np.where(adv > 0, 1 + eps + rng.uniform(0.01, 1, size=logp.shape),
                     1 - eps - rng.uniform(0.01, 0.5, size=logp.shape) * (1 - eps))
    old = logp - np.log(ratio)
    (_, stats), (_, (g,)) = (losses.ppo_policy_loss(t64(logp), old, adv, mask, clip_eps=eps),
                             grad_of(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=eps)[0], logp))
    np.testing.assert_array_equal(g, 0.0)
    assert float(stats["clip_fraction"]) == pytest.approx(1.0)


@given(token_batch(B=4, min_len=1), vec(4))
def test_ppo_gradient_at_ratio_one_equals_the_reinforce_gradient(batch, adv):
    logp, mask = batch
    n_tokens, B = mask.sum(), mask.shape[0]
    _, (g_ppo,) = grad_of(lambda lp: losses.ppo_policy_loss(lp, logp, adv, mask)[0], logp)
    _, (g_pg,) = grad_of(lambda lp: losses.reinforce_loss(lp, adv, mask), logp)
    np.testing.assert_allclose(g_ppo * n_tokens, g_pg * B, atol=1e-12)


@given(arrays(np.float64, (2, 3), elements=floats(-3, 3)), arrays(np.float64, (2, 3), elements=floats()),
       st.sampled_from([None, 0.3]))
def test_ppo_clipped_loss_is_never_below_minus_ratio_times_advantage(log_ratio, adv, eps_high):
    logp = np.full((2, 3), -1.0)
    per_token = per_token_ppo_loss(logp, logp - log_ratio, adv, clip_eps_high=eps_high)
    assert (per_token >= -np.exp(log_ratio) * adv - 1e-12).all()


@given(arrays(np.float64, (2, 3), elements=floats(-3, 3)), arrays(np.float64, (2, 3), elements=floats(0, 5)),
       floats(1.01, 5))
def test_dual_clip_changes_nothing_for_nonnegative_advantages(log_ratio, adv, c):
    logp = np.full((2, 3), -1.0)
    mask = np.ones((2, 3))
    plain = losses.ppo_policy_loss(t64(logp), logp - log_ratio, adv, mask)[0].item()
    dual = losses.ppo_policy_loss(t64(logp), logp - log_ratio, adv, mask, dual_clip=c)[0].item()
    assert dual == plain


@given(arrays(np.float64, (2, 3), elements=floats(-3, 3)), arrays(np.float64, (2, 3), elements=floats(-5, -0.01)),
       floats(1.01, 5))
def test_dual_clip_bounds_each_negative_advantage_token_loss_by_minus_c_times_advantage(log_ratio, adv, c):
    logp = np.full((2, 3), -1.0)
    dual = per_token_ppo_loss(logp, logp - log_ratio, adv, dual_clip=c)
    plain = per_token_ppo_loss(logp, logp - log_ratio, adv)
    np.testing.assert_allclose(dual, np.minimum(plain, -c * adv), rtol=1e-12)


def test_asymmetric_clip_bounds_the_ratio_by_eps_low_below_and_eps_high_above():
    logp = np.full((1, 2), -1.0)
    ratio = np.array([[0.5, 2.0]])
    # A < 0 below 1 and A > 0 above 1: the clip is what the loss sees
    adv = np.array([[-1.0, 1.0]])
    per_token = per_token_ppo_loss(logp, logp - np.log(ratio), adv, clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(per_token, [[0.8, -1.28]], rtol=1e-12)


def test_ppo_clip_fraction_and_approx_kl_report_the_clipped_share_and_k3_of_the_ratio():
    logp = np.full((1, 4), -1.0)
    ratio = np.array([[1.0, 1.1, 1.5, 0.5]])
    adv = np.array([[1.0, 1.0, 1.0, 1.0]])  # A > 0: only ratio > 1.2 clips
    _, stats = losses.ppo_policy_loss(t64(logp), logp - np.log(ratio), adv, np.ones((1, 4)))
    assert float(stats["clip_fraction"]) == pytest.approx(0.25)
    assert float(stats["approx_kl"]) == pytest.approx(np.mean(ratio - 1 - np.log(ratio)))


@given(token_batch(B=2, T=3, min_len=1), st.integers(0, 10_000), floats(0.05, 1.0))
def test_ppo_value_loss_is_half_the_larger_of_clipped_and_unclipped_squared_errors(batch, seed, eps):
    _, mask = batch
    rng = np.random.default_rng(seed)
    v, old, R = (rng.normal(size=mask.shape) for _ in range(3))
    v_clip = old + np.clip(v - old, -eps, eps)
    want = 0.5 * (np.maximum((v - R) ** 2, (v_clip - R) ** 2) * mask).sum() / mask.sum()
    assert losses.ppo_value_loss(t64(v), old, R, mask, clip_eps=eps).item() == pytest.approx(want, rel=1e-12)


def test_ppo_value_gradient_is_zero_where_the_clipped_error_is_larger():
    old, R, mask = np.zeros((1, 1)), np.full((1, 1), -1.0), np.ones((1, 1))

    def grad_at(v):
        return grad_of(lambda x: losses.ppo_value_loss(x, old, R, mask, clip_eps=0.2), np.full((1, 1), v))[1][0].item()
    assert grad_at(-0.5) == 0.0  # V_clip = −0.2 is farther from R = −1 than V = −0.5: the clipped branch wins
    assert grad_at(0.5) == pytest.approx(1.5)  # V_clip = 0.2 is nearer than V = 0.5: gradient V − R


def test_entropy_of_uniform_logits_is_log_vocab_and_of_a_peaked_one_is_near_zero():
    mask = np.ones((2, 3))
    assert losses.entropy(t64(np.zeros((2, 3, 7))), mask).item() == pytest.approx(math.log(7))
    peaked = np.zeros((2, 3, 7))
    peaked[..., 0] = 1e4
    assert losses.entropy(t64(peaked), mask).item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------- GRPO
@given(arrays(np.float64, 12, elements=floats()), st.sampled_from([2, 3, 4, 6]))
def test_grpo_advantages_have_zero_mean_per_group_and_unit_sample_std_when_not_constant(rewards, G):
    adv = losses.grpo_advantages(t64(rewards), G, scale="group", eps=0.0).numpy().reshape(-1, G)
    groups = rewards.reshape(-1, G)
    np.testing.assert_allclose(adv.mean(1), 0, atol=1e-9)
    for a, g in zip(adv, groups):
        if np.ptp(g) > 1e-6:
            assert a.std(ddof=1) == pytest.approx(1.0, rel=1e-9)


@given(arrays(np.float64, 8, elements=floats(0.05, 1)), st.sampled_from([2, 4]))
def test_grpo_advantages_with_eps_have_std_s_over_s_plus_eps(rewards, G):
    eps = 1e-2
    adv = losses.grpo_advantages(t64(rewards), G, eps=eps).numpy().reshape(-1, G)
    for a, g in zip(adv, rewards.reshape(-1, G)):
        s = g.std(ddof=1)
        if np.ptp(g) > 0:
            assert a.std(ddof=1) == pytest.approx(s / (s + eps), rel=1e-9)


@given(floats(), st.sampled_from(["group", "batch", "none"]), st.sampled_from([2, 3, 5]))
def test_grpo_advantages_of_identical_rewards_are_exactly_zero(r, scale, G):
    adv = losses.grpo_advantages(t64(np.full(2 * G, r)), G, scale=scale).numpy()
    assert (adv == 0).all()


@given(arrays(np.float64, 8, elements=floats()), floats(0.01, 100), floats(-100, 100),
       st.sampled_from(["group", "batch"]))
@example(rewards=np.array([1.15e-102, 0, 0, 0, 0, 0, 0, 0]), a=1.0, b=1.0, scale="group")
def test_std_scaled_grpo_advantages_are_invariant_to_positive_affine_maps_of_the_rewards(rewards, a, b, scale):
    """Holds where the map keeps each group's spread: a·r + b must still tell the rewards of a
    group apart in float64 (1.15e-102 + 1 rounds to 1, which makes the group constant)."""
    mapped = a * rewards + b
    for g, h in zip(rewards.reshape(-1, 4), mapped.reshape(-1, 4)):
        if np.ptp(g) > 0:
            assume(np.ptp(h) > 1e-6 * np.abs(h).max())
    before = losses.grpo_advantages(t64(rewards), 4, scale=scale, eps=0.0).numpy()
    after = losses.grpo_advantages(t64(mapped), 4, scale=scale, eps=0.0).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_an_affine_map_that_rounds_a_group_to_one_value_gives_that_group_zero_advantages():
    """The draw that broke the invariance above: outside its domain, the constant-group rule holds."""
    rewards = np.array([1.15e-102, 0, 0, 0, 1.0, 2.0, 3.0, 5.0])
    assert (losses.grpo_advantages(rewards, 4, eps=0.0).numpy()[:4] != 0).all()
    assert (losses.grpo_advantages(rewards + 1.0, 4, eps=0.0).numpy()[:4] == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_grpo_advantages_refuse_non_finite_rewards(scale, bad):
    """A NaN reward zeroed its group's advantages or, with scale="batch", left every group unscaled."""
    rewards = np.array([1.0, 0.0, bad, 2.0, 0.5, 0.25])
    with pytest.raises(ValueError, match=r"rewards: must be finite.*at rows \[2\]"):
        losses.grpo_advantages(rewards, 2, scale=scale)


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_grpo_advantages_of_huge_float32_rewards_are_right(scale):
    """float32 rewards of ±1e20 square to inf: the std must not (it gave all-zero advantages)."""
    r = np.array([1e20, -1e20, 3e20, -3e20], dtype=np.float32)
    adv = losses.grpo_advantages(r, 2, scale=scale).numpy()
    r64 = r.astype(np.float64)
    g = r64.reshape(2, 2)
    std = g.std(axis=1, ddof=1, keepdims=True) if scale == "group" else r64.std(ddof=1)
    np.testing.assert_allclose(adv, ((g - g.mean(1, keepdims=True)) / std).reshape(-1), rtol=1e-6)


def test_batch_scaled_grpo_advantages_divide_group_centred_rewards_by_the_batch_std():
    r = np.array([1.0, 0.0, 3.0, 5.0])
    adv = losses.grpo_advantages(t64(r), 2, scale="batch", eps=0.0).numpy()
    np.testing.assert_allclose(adv, np.array([0.5, -0.5, -1.0, 1.0]) / r.std(ddof=1))


@given(token_batch(B=4, T=4), st.integers(1, 4), st.integers(0, 10_000), floats(0, 0.5))
def test_every_grpo_aggregation_mode_agrees_when_all_responses_have_the_same_length(batch, length, seed, beta):
    logp, _ = batch
    T = logp.shape[1]
    rng = np.random.default_rng(seed)
    mask = np.zeros_like(logp)
    for i in range(4):
        start = rng.integers(0, T - length + 1)
        mask[i, start:start + length] = 1
    old, ref = logp + rng.normal(0, 0.3, logp.shape), logp + rng.normal(0, 0.3, logp.shape)
    adv = rng.normal(size=4)
    value = {k: losses.grpo_loss(t64(logp), old, ref, adv, mask, beta=beta, loss_type=k)[0].item()
             for k in losses.GRPO_LOSS_TYPES}
    assert value["bnpo"] == pytest.approx(value["grpo"], rel=1e-9, abs=1e-12)
    assert value["dapo"] == pytest.approx(value["grpo"], rel=1e-9, abs=1e-12)
    # Dr. GRPO's constant normaliser B·T: the same when responses fill T, length/T of it otherwise
    assert value["dr_grpo"] == pytest.approx(value["grpo"] * length / T, rel=1e-9, abs=1e-12)


@given(token_batch(B=3, min_len=1), st.integers(0, 10_000), floats(0, 0.5),
       st.sampled_from(losses.GRPO_LOSS_TYPES))
def test_grpo_loss_is_clipped_surrogate_plus_beta_k3_aggregated_as_named(batch, seed, beta, loss_type):
    logp, mask = batch
    rng = np.random.default_rng(seed)
    old, ref = logp + rng.normal(0, 0.3, logp.shape), logp + rng.normal(0, 0.3, logp.shape)
    adv = rng.normal(size=3)[:, None]
    ratio = np.exp(logp - old)
    x = ref - logp
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv) + beta * (np.exp(x) - 1 - x)
    per_token *= mask
    want = {"grpo": (per_token.sum(1) / mask.sum(1)).mean(), "bnpo": per_token.sum() / mask.sum(),
            "dr_grpo": per_token.sum() / mask.size, "dapo": per_token.sum() / mask.sum()}[loss_type]
    loss, stats = losses.grpo_loss(t64(logp), old, ref, adv[:, 0], mask, beta=beta, loss_type=loss_type)
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert float(stats["kl"]) == pytest.approx(((np.exp(x) - 1 - x) * mask).sum() / mask.sum(), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------- GSPO
@given(token_batch(B=1, min_len=1), st.integers(0, 10_000))
def test_gspo_sequence_ratio_is_exp_of_the_mean_token_log_ratio(batch, seed):
    logp, mask = batch
    old = logp - np.random.default_rng(seed).normal(0, 0.5, logp.shape)
    mean_log_ratio = ((logp - old) * mask).sum() / mask.sum()
    # with A = −1 and s above 1 − ε the loss is s itself (the unclipped branch)
    loss, _ = losses.gspo_loss(t64(logp), old, None, np.array([-1.0]), mask, clip_eps=0.99, clip_eps_high=0.99)
    if mean_log_ratio > math.log(0.01):
        assert loss.item() == pytest.approx(math.exp(mean_log_ratio), rel=1e-12)


@given(token_batch(B=3, min_len=1), vec(3, -1, 1), vec(3), floats(0.05, 0.5))
def test_gspo_equals_grpo_when_every_token_of_a_response_has_the_same_ratio(batch, log_ratio, adv, eps):
    logp, mask = batch
    old = logp - log_ratio[:, None]
    gspo = losses.gspo_loss(t64(logp), old, None, adv, mask, clip_eps=eps, clip_eps_high=eps)[0].item()
    grpo = losses.grpo_loss(t64(logp), old, None, adv, mask, beta=0.0, clip_eps=eps)[0].item()
    assert gspo == pytest.approx(grpo, rel=1e-9, abs=1e-12)


# -------------------------------------------------------------------- REINFORCE++
@given(token_batch(B=4, min_len=1), st.integers(0, 10_000), floats(0, 0.2), floats(0.5, 1))
def test_reinforce_pp_advantages_are_batch_whitened_discounted_returns_of_kl_shaped_rewards(batch, seed, beta, gamma):
    logp, mask = batch
    rng = np.random.default_rng(seed)
    ref, scores = logp + rng.normal(0, 0.3, logp.shape), rng.normal(size=4)
    rewards = losses.kl_penalty(t64(logp), ref, mask, scores, beta).numpy()
    G = np.zeros_like(rewards)
    for i in range(4):
        running = 0.0
        for t in reversed(np.flatnonzero(mask[i])):
            running = rewards[i, t] + gamma * running
            G[i, t] = running
    on = mask > 0
    want = np.where(on, (G - G[on].mean()) / (G[on].std(ddof=1) + 1e-8), 0)
    got = losses.reinforce_pp_advantages(scores, t64(logp), ref, mask, beta=beta, gamma=gamma).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)


def test_reinforce_pp_without_kl_gives_every_token_of_a_response_its_whitened_score():
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=float)
    logp = np.full(mask.shape, -1.0)
    scores = np.array([1.0, 0.0, 2.0])
    adv = losses.reinforce_pp_advantages(scores, t64(logp), logp, mask, beta=0.0, eps=0.0).numpy()
    on = mask > 0
    assert np.ptp(adv[0, on[0]]) == 0 and np.ptp(adv[1, on[1]]) == 0 and adv[2, 0] > adv[0, 0] > adv[1, 1]
    assert adv[on].mean() == pytest.approx(0, abs=1e-12) and adv[on].std(ddof=1) == pytest.approx(1)


# -------------------------------------------------------------------- adaptive KL
@given(floats(0.01, 1), floats(0.1, 20), floats(0, 50), st.integers(1, 512))
def test_adaptive_kl_beta_increases_iff_measured_kl_is_above_target(beta0, target, kl, n_steps):
    controller = losses.AdaptiveKLController(beta0, target, horizon=10_000)
    beta = controller.update(kl, n_steps)
    assert (beta > beta0) == (kl > target)
    assert (beta < beta0) == (kl < target)


def test_adaptive_kl_moves_beta_by_at_most_20_percent_of_n_steps_over_horizon():
    controller = losses.AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert controller.update(1000.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert controller.update(1.1, 10) == pytest.approx(0.1 * 1.02 * (1 + 0.1 * 10 / 100))


# ----------------------------------------------------- gradients: finite differences
def _gradient_cases():
    rng = np.random.default_rng(7)
    B, T, V = 4, 3, 5
    mask = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=float)
    targets = rng.integers(0, V, size=(B, T))
    logits = rng.normal(size=(B, T, V))
    ref_logits = rng.normal(size=(B, T, V))
    logp = -rng.uniform(0.2, 3, size=(B, T))
    old = logp + rng.normal(0, 0.4, size=(B, T))
    ref = logp + rng.normal(0, 0.4, size=(B, T))
    adv_tok, adv = rng.normal(size=(B, T)), rng.normal(size=B)
    rewards = rng.normal(size=B)
    returns, old_values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    values = old_values + rng.normal(0, 0.3, size=(B, T))
    seq = [rng.normal(size=B) - 5 for _ in range(4)]
    cases = {
        "sequence_logprobs": (lambda x: losses.sequence_logprobs(x, targets, mask), [logits]),
        "sft_loss": (lambda x: losses.sft_loss(x, targets, mask), [logits]),
        "masked_mean": (lambda x: losses.masked_mean(x, mask, axis=1), [logp]),
        "masked_token_logprobs": (lambda x: losses.masked_token_logprobs(x, targets, mask), [logits]),
        "sft_loss_num_tokens": (lambda x: losses.sft_loss(x, targets, mask, num_tokens=17), [logits]),
        "bradley_terry_loss": (lambda a, b: losses.bradley_terry_loss(a, b, margin=0.3)[0], seq[:2]),
        "kl_exact": (lambda x: losses.kl_exact(x, ref_logits, mask), [logits]),
        "entropy": (lambda x: losses.entropy(x, mask), [logits]),
        "ppo_value_loss": (lambda v: losses.ppo_value_loss(v, old_values, returns, mask, clip_eps=0.2), [values]),
        "ppo_policy_loss": (lambda x: losses.ppo_policy_loss(x, old, adv_tok, mask)[0], [logp]),
        "ppo_policy_loss_asymmetric_dual_clip": (
            lambda x: losses.ppo_policy_loss(x, old, adv_tok, mask, clip_eps_high=0.3, dual_clip=1.3)[0], [logp]),
        "gspo_loss": (lambda x: losses.gspo_loss(x, old, ref, adv, mask, beta=0.1, clip_eps=0.2,
                                                 clip_eps_high=0.2)[0], [logp]),
        "orpo_loss": (lambda a, b: losses.orpo_loss(a, b, mask, np.ones((B, T)), lam=0.5)[0], [logp, old]),
        "kto_loss": (lambda a: losses.kto_loss(a, seq[1], [True, False, True, False], 0.2, beta=0.5)[0], [seq[0]]),
        "simpo_loss": (lambda a, b: losses.simpo_loss(a, b, [3, 4, 5, 6], [2, 2, 7, 1])[0], seq[:2]),
    }
    for est in ("k1", "k2", "k3"):
        cases[f"kl_estimate_{est}"] = (lambda x, est=est: losses.kl_estimate(x, ref, est), [logp])
        cases[f"response_kl_{est}"] = (lambda x, est=est: losses.response_kl(x, ref, mask, est), [logp])
    for baseline in (None, "mean", "rloo"):
        cases[f"reinforce_loss_{baseline}"] = (
            lambda x, b=baseline: losses.reinforce_loss(x, rewards, mask, baseline=b, group_size=2), [logp])
    for loss_type in losses.GRPO_LOSS_TYPES:
        cases[f"grpo_loss_{loss_type}"] = (
            lambda x, k=loss_type: losses.grpo_loss(x, old, ref, adv, mask, beta=0.1, loss_type=k)[0], [logp])
    for loss_type in losses.DPO_LOSS_TYPES:
        smoothing = 0.2 if loss_type in ("cdpo", "robust") else 0.0
        cases[f"dpo_loss_{loss_type}"] = (
            lambda a, b, k=loss_type, s=smoothing: losses.dpo_loss(a, b, seq[2], seq[3], beta=0.5, loss_type=k,
                                                                 label_smoothing=s)[0], seq[:2])
    lengths_w, lengths_l = [3, 4, 5, 6], [2, 2, 7, 1]
    # The straight-through estimators and CISPO stop part of their value's gradient: their backward is
    # checked against the finite differences of the function whose gradient they carry (k2; PPO's
    # unclipped surrogate), and CISPO's also where every weight is clipped, so its value is that function.
    def with_value_of(fn, value_fn):
        return lambda *xs: fn(*xs) + (value_fn(*xs) - fn(*xs)).detach()

    cases["kl_estimate_abs"] = (lambda x: losses.kl_estimate(x, ref, "abs"), [logp])
    cases["response_kl_abs"] = (lambda x: losses.response_kl(x, ref, mask, "abs"), [logp])
    for est in ("k1+", "k3+"):
        cases[f"kl_estimate_{est}"] = (with_value_of(lambda x, est=est: losses.kl_estimate(x, ref, est),
                                                     lambda x: losses.kl_estimate(x, ref, "k2")), [logp])
        cases[f"response_kl_{est}"] = (with_value_of(lambda x, est=est: losses.response_kl(x, ref, mask, est),
                                                     lambda x: losses.response_kl(x, ref, mask, "k2")), [logp])
    cases["cispo_loss"] = (with_value_of(
        lambda x: losses.cispo_loss(x, old, ref, adv, mask, beta=0.1, clip_eps_high=1e6)[0],
        lambda x: losses.grpo_loss(x, old, ref, adv, mask, beta=0.1, clip_eps=0.999, clip_eps_high=1e6,
                                   loss_type="bnpo")[0]), [logp])
    cases["cispo_loss_clipped_high"] = (
        lambda x: losses.cispo_loss(x, logp - 1, ref, adv, mask, beta=0.1, clip_eps_high=0.3)[0], [logp])
    cases["cispo_loss_clipped_low"] = (
        lambda x: losses.cispo_loss(x, logp + 1, ref, adv, mask, beta=0.1, clip_eps=0.2)[0], [logp])
    for name, options in {"gmpo_loss": {"beta": 0.1, "clip_eps": 0.3}, "sapo_loss": {"beta": 0.1},
                          "clip_cov_loss": {"beta": 0.1, "clip_ratio": 0.2, "cov_low": -10.0, "cov_high": 10.0},
                          "kl_cov_loss": {"beta": 0.1, "top_ratio": 0.2}}.items():
        cases[name] = (lambda x, fn=getattr(losses, name), o=options: fn(x, old, ref, adv, mask, **o)[0], [logp])
    for f in losses.F_DIVERGENCES:
        cases[f"dpo_loss_{f}"] = (lambda a, b, f=f: losses.dpo_loss(a, b, seq[2], seq[3], beta=0.5, f_divergence=f)[0],
                                  seq[:2])
    cases["dpo_loss_ipo_norm"] = (lambda a, b: losses.dpo_loss(a, b, seq[2], seq[3], beta=0.5, loss_type="ipo_norm",
                                                               len_chosen=lengths_w, len_rejected=lengths_l)[0], seq[:2])
    cases["dpo_loss_rpo"] = (lambda a, b: losses.dpo_loss(a, b, seq[2], seq[3], beta=0.5, rpo_alpha=0.7,
                                                          len_chosen=lengths_w)[0], seq[:2])
    cases["kto_loss_batch_reference_point"] = (
        lambda a: losses.kto_loss(a, seq[1], [True, False, True, False], losses.kto_reference_point(seq[2], seq[3] - 1),
                                  beta=0.5)[0], [seq[0]])
    return cases


GRADIENT_CASES = _gradient_cases()


@pytest.mark.parametrize("name", sorted(GRADIENT_CASES))
def test_every_loss_gradient_matches_finite_differences(name):
    fn, inputs = GRADIENT_CASES[name]
    check_grad(fn, *inputs)


@pytest.mark.parametrize("name", ["sft_loss", "kl_exact", "ppo_policy_loss", "grpo_loss_grpo", "dpo_loss_sigmoid",
                                  "orpo_loss", "ppo_value_loss"])
def test_losses_in_float32_on_each_device_match_numpy_float64(name, device):
    fn, inputs = GRADIENT_CASES[name]
    check_device(fn, *inputs, device=device)  # constant arrays follow the inputs to the device


# ------------------------------------------------------------------ padding
def _padded_batch(garbage):
    """A batch with a prompt, padding and an empty row; under the mask, either ordinary values
    or garbage (NaN, ±1e30, invalid target ids)."""
    rng = np.random.default_rng(3)
    B, T, V = 3, 5, 4
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=float)
    d = {"logits": rng.normal(size=(B, T, V)), "ref_logits": rng.normal(size=(B, T, V)),
         "logp": -rng.uniform(0.1, 3, (B, T)), "targets": rng.integers(0, V, (B, T))}
    for k in ("old", "ref", "values", "old_values", "returns", "rewards", "adv"):
        d[k] = d["logp"] + rng.normal(0, 0.3, (B, T)) if k in ("old", "ref") else rng.normal(size=(B, T))
    if garbage:
        off = mask == 0
        junk = np.where(rng.random((B, T)) < 0.5, np.nan, 1e30)
        for k in ("logp", "old", "ref", "values", "old_values", "returns", "rewards", "adv"):
            d[k] = np.where(off, junk, d[k])
        d["logits"] = np.where(off[..., None], np.nan, d["logits"])
        d["ref_logits"] = np.where(off[..., None], -1e30, d["ref_logits"])
        d["targets"] = np.where(off, -100, d["targets"])
    return d, mask


PADDING_CASES = {
    "sequence_logprobs": lambda d, m: losses.sequence_logprobs(d["logits"], d["targets"], m).sum(),
    "sft_loss": lambda d, m: losses.sft_loss(d["logits"], d["targets"], m),
    "masked_mean": lambda d, m: losses.masked_mean(d["logp"], m),
    "kl_exact": lambda d, m: losses.kl_exact(d["logits"], d["ref_logits"], m).sum(),
    "entropy": lambda d, m: losses.entropy(d["logits"], m),
    "kl_penalty": lambda d, m: losses.kl_penalty(d["logp"], d["ref"], m, np.ones(3), 0.1, "k3").sum(),
    "reinforce_loss": lambda d, m: losses.reinforce_loss(d["logp"], np.arange(3.0), m, baseline="rloo"),
    "gae": lambda d, m: sum(x.sum() for x in losses.gae(d["rewards"], d["values"], m, 0.9, 0.8)),
    "reinforce_pp_advantages": lambda d, m: losses.reinforce_pp_advantages(np.ones(3), d["logp"], d["ref"], m).sum(),
    "ppo_policy_loss": lambda d, m: losses.ppo_policy_loss(d["logp"], d["old"], d["adv"], m, dual_clip=2.0)[0],
    "ppo_value_loss": lambda d, m: losses.ppo_value_loss(d["values"], d["old_values"], d["returns"], m),
    "grpo_loss": lambda d, m: sum(losses.grpo_loss(d["logp"], d["old"], d["ref"], np.arange(3.0), m, loss_type=k)[0]
                                  for k in losses.GRPO_LOSS_TYPES),
    "gspo_loss": lambda d, m: losses.gspo_loss(d["logp"], d["old"], d["ref"], np.arange(3.0), m, beta=0.1)[0],
    "orpo_loss": lambda d, m: losses.orpo_loss(d["logp"], d["old"], m, m)[0],
    "masked_token_logprobs": lambda d, m: losses.masked_token_logprobs(d["logits"], d["targets"], m).sum(),
    "whiten": lambda d, m: losses.whiten(d["rewards"], m).sum(),
    "response_kl": lambda d, m: sum(losses.response_kl(d["logp"], d["ref"], m, k).sum() for k in ("k1", "k2", "k3")),
}


@pytest.mark.parametrize("name", sorted(PADDING_CASES))
def test_values_under_the_mask_change_no_loss_and_no_gradient(name):
    results = []
    for garbage in (False, True):
        d, mask = _padded_batch(garbage)
        leaves = {k: t64(d[k], grad=True) for k in ("logits", "logp", "values")}
        inputs = {**d, **leaves}
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            out = PADDING_CASES[name](inputs, mask)
            if out.requires_grad:
                out.backward()
        grads = {k: (v.grad if v.grad is not None else np.zeros(v.shape)) for k, v in leaves.items()}
        results.append((out.item(), grads))
    (clean, clean_grads), (dirty, dirty_grads) = results
    assert np.isfinite(dirty) and dirty == pytest.approx(clean, rel=1e-12, abs=1e-12)
    for k in clean_grads:
        np.testing.assert_allclose(dirty_grads[k], clean_grads[k], rtol=1e-12, atol=1e-15, err_msg=k)
        off = (mask == 0)[..., None] if clean_grads[k].ndim == 3 else mask == 0
        assert (np.broadcast_to(off, clean_grads[k].shape) <= (clean_grads[k] == 0)).all()


# ------------------------------------------------------------------ argument errors
_lp = t64(np.full((2, 3), -1.0), grad=True)
_m = np.ones((2, 3))
INVALID = [
    (lambda: losses.kl_estimate(_lp, _lp.data, "k4"), "estimator.*'k1', 'k2', 'k3'"),
    (lambda: losses.kl_penalty(_lp, _lp.data, _m, np.ones(2), beta=-0.1), "beta.*>= 0"),
    (lambda: losses.reinforce_loss(_lp, np.ones(2), _m, baseline="median"), "baseline.*None, 'mean', 'rloo'"),
    (lambda: losses.reinforce_loss(_lp, np.ones(2), np.ones((2, 4))), "mask.*shape"),
    (lambda: losses.rloo_advantages(np.ones(6), 4), "group_size.*4 does not divide.*6"),
    (lambda: losses.rloo_advantages(np.ones(6), 1), "group_size.*>= 2"),
    (lambda: losses.grpo_advantages(np.ones(6), 3, scale="global"), "scale.*'group', 'batch', 'none'"),
    (lambda: losses.grpo_advantages(np.ones(5), 2), "group_size.*does not divide"),
    (lambda: losses.grpo_loss(_lp, _lp.data, _lp.data, np.ones(2), _m, loss_type="sum"), "loss_type.*'dr_grpo'"),
    (lambda: losses.grpo_loss(_lp, _lp.data, _lp.data, np.ones(2), _m, beta=-1), "beta"),
    (lambda: losses.grpo_loss(_lp, _lp.data, None, np.ones(2), _m, beta=0.1), "ref_logp"),
    (lambda: losses.grpo_loss(_lp, _lp.data, _lp.data, np.ones(2), _m, clip_eps=1.0), r"clip_eps.*\(0, 1\)"),
    (lambda: losses.ppo_policy_loss(_lp, _lp.data, np.ones(2), _m, clip_eps=0.0), r"clip_eps.*\(0, 1\)"),
    (lambda: losses.ppo_policy_loss(_lp, _lp.data, np.ones(2), _m, clip_eps_high=-0.1), "clip_eps_high"),
    (lambda: losses.ppo_policy_loss(_lp, _lp.data, np.ones(2), _m, dual_clip=0.5), "dual_clip.*> 1"),
    (lambda: losses.ppo_policy_loss(_lp, _lp.data, np.ones(3), _m), "advantages.*shape"),
    (lambda: losses.ppo_policy_loss(_lp, np.ones((3, 3)), np.ones(2), _m), "old_logp.*shape"),
    (lambda: losses.ppo_value_loss(_lp, _lp.data, _lp.data, _m, clip_eps=0), "clip_eps.*> 0"),
    (lambda: losses.gae(np.ones((2, 3)), np.ones((2, 3)), _m, lam=1.5), "lam"),
    (lambda: losses.gae(np.ones((2, 3)), np.ones((2, 3)), _m, gamma=-0.5), "gamma"),
    (lambda: losses.AdaptiveKLController(0.1, target=0, horizon=100), "target.*> 0"),
    (lambda: losses.bradley_terry_loss(np.ones(2), np.ones(3)), "r_rejected.*shape"),
    (lambda: losses.bradley_terry_loss(np.ones(2), np.ones(2), margin=np.ones(3)), "margin.*shape"),
    (lambda: losses.sft_loss(t64(np.zeros((2, 3, 4))), np.zeros((2, 3), int), np.ones((2, 2))), "mask.*shape"),
    (lambda: losses.sft_loss(t64(np.zeros((2, 3, 4))), np.zeros((2, 3), int), _m, num_tokens=0), "num_tokens"),
    (lambda: losses.sft_loss(t64(np.zeros((2, 3, 4))), np.zeros((2, 3), int), _m, num_tokens=np.inf),
     "num_tokens.*positive finite"),
    (lambda: losses.grpo_loss(_lp, _lp.data, _lp.data, np.ones(2), _m, num_tokens=6), "num_tokens.*'bnpo'"),
    (lambda: losses.whiten(np.ones(3), np.ones(4)), "mask.*shape"),
    (lambda: losses.response_kl(_lp, _lp.data, _m, "k5"), "estimator"),
    (lambda: losses.kl_penalty(_lp, _lp.data, _m, np.ones(2), beta=np.inf), "beta.*finite"),
    (lambda: losses.kl_penalty(_lp, _lp.data, _m, np.ones(2), beta=np.nan), "beta.*finite"),
    (lambda: losses.grpo_loss(_lp, _lp.data, _lp.data, np.ones(2), _m, beta=np.inf), "beta.*finite"),
    (lambda: losses.grpo_loss(_lp, _lp.data, _lp.data, np.ones(2), _m, clip_eps_high=np.inf), "clip_eps_high.*finite"),
    (lambda: losses.grpo_loss(_lp, _lp.data, _lp.data, np.ones(2), _m, clip_eps=np.nan), "clip_eps"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), beta=np.inf), "beta.*finite"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), beta=np.nan), "beta.*finite"),
    (lambda: losses.simpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), gamma=np.nan), "gamma.*finite"),
    (lambda: losses.ppo_policy_loss(_lp, _lp.data, np.ones(2), _m, dual_clip=np.inf), "dual_clip"),
    (lambda: losses.AdaptiveKLController(0.1, 6.0, 100).update(np.nan, 10), "measured_kl.*finite"),
    (lambda: losses.AdaptiveKLController(0.1, 6.0, 100).update(np.inf, 10), "measured_kl.*finite"),
    (lambda: losses.AdaptiveKLController(np.inf, 6.0, 100), "init_beta.*finite"),
    (lambda: losses.sft_loss(t64(np.zeros((2, 3, 4))), np.zeros((2, 2), int), _m), r"targets: expected shape \(2, 3\)"),
    (lambda: losses.sft_loss(t64(np.zeros((2, 4))), np.zeros(2, int), _m), r"logits: expected shape \(B, T, V\)"),
    (lambda: losses.sequence_logprobs(t64(np.zeros((2, 3, 4))), np.zeros((3, 3), int), _m), "targets: expected shape"),
    (lambda: losses.gae(np.ones(3), np.ones(3), np.ones(3)), r"values: expected per-token values of shape \(B, T\)"),
    (lambda: losses.kl_penalty(np.ones(3), np.ones(3), np.ones(3), np.ones(3), 0.1), r"logp: expected .*\(B, T\)"),
]


@pytest.mark.parametrize("call, message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_arguments_raise_errors_that_name_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------- bug classes RLHF frameworks shipped
@st.composite
def ragged_batch(draw, B=4, T=5):
    """Per-token log-probs with rows of every length, 0 included, and per-row advantages."""
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(float)
    logp = draw(arrays(np.float64, (B, T), elements=floats(-4.0, -0.05)))
    adv = draw(arrays(np.float64, B, elements=floats(-2, 2)))
    return logp, mask, adv


@given(ragged_batch(), st.integers(20, 40))
def test_every_loss_aggregation_mode_equals_its_formula(batch, num_tokens):
    """At ratio 1 and β = 0 every token's loss is −A_i, so each mode has a closed form: a mode that
    quietly normalises by the wrong count (huggingface/trl#2995, the token mean that was not the
    paper's; huggingface/trl#3256, which named "grpo", "bnpo" and "dr_grpo") fails here."""
    logp, mask, adv = batch
    B, T = mask.shape
    n = mask.sum(axis=1)
    want = {"grpo": -np.mean(np.where(n > 0, adv, 0.0)),
            "bnpo": -(adv * n).sum() / max(n.sum(), 1),
            "dr_grpo": -(adv * n).sum() / (B * T),
            "dapo": -(adv * n).sum() / max(n.sum(), 1)}
    for loss_type, value in want.items():
        got = losses.grpo_loss(t64(logp), logp, None, adv, mask, beta=0.0, loss_type=loss_type)[0].item()
        assert got == pytest.approx(value, rel=1e-12, abs=1e-12), loss_type
    for loss_type in ("bnpo", "dapo"):
        got = losses.grpo_loss(t64(logp), logp, None, adv, mask, beta=0.0, loss_type=loss_type,
                               num_tokens=num_tokens)[0].item()
        assert got == pytest.approx(-(adv * n).sum() / num_tokens, rel=1e-12, abs=1e-12), loss_type
    ppo, _ = losses.ppo_policy_loss(t64(logp), logp, adv, mask)
    assert ppo.item() == pytest.approx(want["bnpo"], rel=1e-12, abs=1e-12)
    gspo, _ = losses.gspo_loss(t64(logp), logp, None, adv, mask)
    assert gspo.item() == pytest.approx(want["grpo"], rel=1e-12, abs=1e-12)
    reinforce = losses.reinforce_loss(t64(logp), adv, mask)
    assert reinforce.item() == pytest.approx(-np.mean(adv * (logp * mask).sum(axis=1)), rel=1e-12, abs=1e-12)


def _categorical(seed, V=6):
    logits = np.random.default_rng(seed).normal(size=V) * 1.5
    return logits - np.logaddexp.reduce(logits)


@given(st.integers(0, 10_000), st.sampled_from(["k1", "k3"]))
def test_kl_penalty_has_the_right_sign_and_direction_and_is_counted_once_under_masks(seed, estimator):
    """The KL term is KL(π ‖ π_ref) (samples from π, log π − log π_ref), it lowers the reward, and a
    token's KL is counted once (marin-community/marin#1708, a KL penalty of the wrong form;
    huggingface/blog#1208, the sign and direction of the KL penalty in the RLHF diagram)."""
    log_p, log_q = _categorical(seed), _categorical(seed + 1)
    # direction: the expectation under π of the per-token estimator is KL(π ‖ π_ref), not KL(π_ref ‖ π)
    tokens = np.arange(len(log_p))
    per_token = losses.response_kl(log_p[tokens, None], log_q[tokens, None], np.ones((len(tokens), 1)), estimator)
    forward = (np.exp(log_p) * (log_p - log_q)).sum()
    backward = (np.exp(log_q) * (log_q - log_p)).sum()
    assert (np.exp(log_p) * per_token.numpy()).sum() == pytest.approx(forward, rel=1e-10)
    assume(abs(forward - backward) > 1e-3)
    assert (np.exp(log_p) * per_token.numpy()).sum() != pytest.approx(backward, rel=1e-4)
    # sign and count: with score 0 each response token's reward is exactly −β k, summing to −β · response_kl
    logp = np.array([[log_p[0], log_p[1], log_p[2], 0.0], [log_p[3], log_p[4], 0.0, 0.0]])
    ref = np.array([[log_q[0], log_q[1], log_q[2], 5.0], [log_q[3], log_q[4], -5.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0.0]])
    beta = 0.3
    rewards = losses.kl_penalty(logp, ref, mask, np.zeros(2), beta, estimator).numpy()
    k = losses.kl_estimate(logp, ref, estimator).numpy()
    np.testing.assert_allclose(rewards, -beta * k * mask, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rewards.sum(axis=1), -beta * losses.response_kl(logp, ref, mask, estimator).numpy(),
                               rtol=1e-12, atol=1e-15)
    # in GRPO's loss the k3 term is added once and pulls log π toward log π_ref
    leaf = t64(logp, grad=True)
    loss, stats = losses.grpo_loss(leaf, logp, ref, np.zeros(2), mask, beta=beta, loss_type="bnpo")
    k3 = losses.kl_estimate(logp, ref, "k3").numpy()
    assert loss.item() == pytest.approx(beta * (k3 * mask).sum() / mask.sum(), rel=1e-12)
    assert float(stats["kl"]) == pytest.approx((k3 * mask).sum() / mask.sum(), rel=1e-12)
    loss.backward()
    above = (mask > 0) & (logp > ref + 1e-9)
    below = (mask > 0) & (logp < ref - 1e-9)
    assert (leaf.grad[above] > 0).all() and (leaf.grad[below] < 0).all()   # descent moves log π toward log π_ref


NONFINITE = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("fill", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(PADDING_CASES))
def test_zero_times_nan_never_leaks_through_a_mask_in_any_loss(name, fill):
    """Masking by multiplication lets 0·NaN = NaN (and 0·inf) through into the loss and its gradient
    (NVIDIA-NeMo/RL#4120 and NVIDIA-NeMo/Megatron-Bridge#3117 switched to a select): every
    per-token input, logits included, holds ``fill`` under the mask and nothing changes."""
    results = []
    for dirty in (False, True):
        d, mask = _padded_batch(False)
        if dirty:
            off = mask == 0
            for k in ("logp", "old", "ref", "values", "old_values", "returns", "rewards", "adv"):
                d[k] = np.where(off, fill, d[k])
            d["logits"] = np.where(off[..., None], fill, d["logits"])
            d["ref_logits"] = np.where(off[..., None], fill, d["ref_logits"])
        leaves = {k: t64(d[k], grad=True) for k in ("logits", "logp", "values")}
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            out = PADDING_CASES[name]({**d, **leaves}, mask)
            if out.requires_grad:
                out.backward()
        results.append((out.item(), {k: v.grad for k, v in leaves.items() if v.grad is not None}))
    (clean, clean_grads), (dirty, dirty_grads) = results
    assert np.isfinite(dirty) and dirty == clean
    assert clean_grads.keys() == dirty_grads.keys()
    for k in clean_grads:
        np.testing.assert_array_equal(dirty_grads[k], clean_grads[k], err_msg=k)


@given(token_batch(B=6, T=4, min_len=1), st.integers(0, 10_000), floats(0.0, 0.5),
       st.sampled_from(losses.GRPO_LOSS_TYPES), st.sampled_from(["group", "batch", "none"]))
def test_an_all_equal_reward_group_contributes_only_the_kl_term(batch, seed, beta, loss_type, scale):
    """A group whose rewards are all equal has advantage 0: its policy-gradient term vanishes and only
    β·k3 moves its tokens (huggingface/trl#7068: with β > 0 the KL term still acts on such groups;
    a NaN from std = 0 would instead poison the whole batch)."""
    logp, mask = batch
    rng = np.random.default_rng(seed)
    rewards = np.concatenate([np.full(3, rng.normal()), rng.normal(size=3)])
    adv = losses.grpo_advantages(rewards, 3, scale=scale).numpy()
    assert (adv[:3] == 0).all()
    old = logp + rng.normal(0, 0.3, logp.shape)
    ref = logp + rng.normal(0, 0.3, logp.shape)
    leaf = t64(logp, grad=True)
    losses.grpo_loss(leaf, old, ref, adv, mask, beta=beta, loss_type=loss_type)[0].backward()
    B, T = mask.shape
    weight = {"grpo": mask / (mask.sum(axis=1, keepdims=True) * B), "bnpo": mask / mask.sum(),
              "dr_grpo": mask / (B * T), "dapo": mask / mask.sum()}[loss_type]
    d_k3 = 1 - np.exp(ref - logp)   # d/d log π of k3 = e^x − 1 − x at x = log π_ref − log π
    np.testing.assert_allclose(leaf.grad[:3], (beta * weight * d_k3)[:3], rtol=1e-10, atol=1e-14)


def test_the_clipped_share_splits_into_its_low_and_high_sides():
    """clip_low counts ρ < 1 − ε with A < 0, clip_high ρ > 1 + ε_high with A > 0; together the clipped share."""
    logp = np.log(np.array([[0.5, 1.0, 1.5, 0.5, 1.5, 1.0]]))
    A = np.array([[-1.0, 1.0, 1.0, 1.0, -1.0, -1.0]])
    mask = np.ones((1, 6))
    for loss_fn in (lambda: losses.ppo_policy_loss(logp, np.zeros((1, 6)), A, mask, clip_eps=0.2),
                    lambda: losses.grpo_loss(logp, np.zeros((1, 6)), None, A, mask, beta=0.0, clip_eps=0.2)):
        _, stats = loss_fn()
        assert float(stats["clip_low"]) == pytest.approx(1 / 6) and float(stats["clip_high"]) == pytest.approx(1 / 6)
        assert float(stats["clip_low"]) + float(stats["clip_high"]) == pytest.approx(float(stats["clip_fraction"]))
