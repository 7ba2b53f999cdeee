"""Identities of the preference losses in minirlhf/losses.py: DPO and its variants (IPO, hinge,
robust, conservative), SimPO, ORPO and KTO, on values drawn by hypothesis in float64.
Finite-difference checks of their gradients are in test_losses.py with the rest."""
import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minirlhf import Tensor, losses


def t64(a, grad=False):
    return Tensor(np.asarray(a, dtype=np.float64), requires_grad=grad, dtype=np.float64)


def floats(lo=-5.0, hi=5.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def logps(n=4, lo=-30.0, hi=-0.1):
    return arrays(np.float64, n, elements=floats(lo, hi))


def smoothing_for(loss_type, eps):
    return eps if loss_type in ("cdpo", "robust") else 0.0


betas = floats(0.01, 2.0)
dpo_types = st.sampled_from(losses.DPO_LOSS_TYPES)


# ------------------------------------------------------------------------- DPO
@given(logps(), logps(), logps(), logps(), betas)
def test_dpo_equals_bt_on_implicit_rewards(pc, pr, rc, rr, beta):
    loss, chosen_rewards, rejected_rewards = losses.dpo_loss(t64(pc), t64(pr), rc, rr, beta=beta)
    bt, _ = losses.bradley_terry_loss(chosen_rewards, rejected_rewards)
    assert loss.item() == pytest.approx(bt.item(), rel=1e-12, abs=1e-12)


@given(logps(), logps(), logps(), logps(), betas)
def test_dpo_implicit_rewards_are_beta_log_ratios(pc, pr, rc, rr, beta):
    _, chosen_rewards, rejected_rewards = losses.dpo_loss(t64(pc), t64(pr), rc, rr, beta=beta)
    np.testing.assert_allclose(chosen_rewards.numpy(), beta * (pc - rc), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rejected_rewards.numpy(), beta * (pr - rr), rtol=1e-12, atol=1e-12)
    assert not chosen_rewards.requires_grad


@given(logps(), logps(), logps(), logps(), arrays(np.float64, 4, elements=floats(-20, 20)), betas, dpo_types,
       floats(0, 0.45))
def test_dpo_is_unchanged_when_a_constant_is_added_to_both_log_ratios_of_a_pair(pc, pr, rc, rr, c, beta, kind, eps):
    kw = dict(beta=beta, loss_type=kind, label_smoothing=smoothing_for(kind, eps))
    before = losses.dpo_loss(t64(pc), t64(pr), rc, rr, **kw)[0].item()
    after = losses.dpo_loss(t64(pc + c), t64(pr + c), rc, rr, **kw)[0].item()
    assert after == pytest.approx(before, rel=1e-9, abs=1e-9)


@given(logps(), logps(), logps(), logps(), betas)
def test_dpo_gradient_weight_is_sigmoid_of_minus_the_implicit_reward_margin(pc, pr, rc, rr, beta):
    chosen, rejected = t64(pc, grad=True), t64(pr, grad=True)
    losses.dpo_loss(chosen, rejected, rc, rr, beta=beta)[0].backward()
    margin = beta * ((pc - rc) - (pr - rr))
    weight = 1 / (1 + np.exp(margin))  # σ(−margin)
    np.testing.assert_allclose(chosen.grad, -beta * weight / 4, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(rejected.grad, beta * weight / 4, rtol=1e-9, atol=1e-15)


@given(logps(), betas, floats(0, 0.45))
def test_every_dpo_loss_takes_its_known_value_when_the_policy_is_the_reference(lp, beta, eps):
    known = {"sigmoid": math.log(2), "cdpo": math.log(2), "robust": math.log(2), "hinge": 1.0,
             "ipo": 1 / (4 * beta ** 2)}
    for kind, value in known.items():
        loss, _, _ = losses.dpo_loss(t64(lp), t64(lp[::-1]), lp, lp[::-1], beta=beta, loss_type=kind,
                                     label_smoothing=smoothing_for(kind, eps))
        assert loss.item() == pytest.approx(value, rel=1e-12), kind


@given(logps(1), logps(1), logps(1), logps(1), betas, floats(0, 0.45))
def test_robust_dpo_averaged_over_a_label_flip_with_rate_eps_equals_the_clean_sigmoid_loss(pc, pr, rc, rr, beta, eps):
    def loss(a, b, ra, rb, kind, s):
        return losses.dpo_loss(t64(a), t64(b), ra, rb, beta=beta, loss_type=kind, label_smoothing=s)[0].item()
    kept, flipped = loss(pc, pr, rc, rr, "robust", eps), loss(pr, pc, rr, rc, "robust", eps)
    clean = loss(pc, pr, rc, rr, "sigmoid", 0.0)
    assert (1 - eps) * kept + eps * flipped == pytest.approx(clean, rel=1e-9, abs=1e-12)


@given(logps(1), logps(1), logps(1), logps(1), betas, floats(0, 0.45))
def test_cdpo_is_the_sigmoid_loss_averaged_over_a_label_flip_with_rate_eps(pc, pr, rc, rr, beta, eps):
    def loss(a, b, ra, rb, kind, s):
        return losses.dpo_loss(t64(a), t64(b), ra, rb, beta=beta, loss_type=kind, label_smoothing=s)[0].item()
    expected = (1 - eps) * loss(pc, pr, rc, rr, "sigmoid", 0.0) + eps * loss(pr, pc, rr, rc, "sigmoid", 0.0)
    assert loss(pc, pr, rc, rr, "cdpo", eps) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(logps(), logps(), logps(), logps(), betas)
def test_ipo_and_hinge_follow_their_formulas(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    ipo = losses.dpo_loss(t64(pc), t64(pr), rc, rr, beta=beta, loss_type="ipo")[0].item()
    hinge = losses.dpo_loss(t64(pc), t64(pr), rc, rr, beta=beta, loss_type="hinge")[0].item()
    assert ipo == pytest.approx(np.mean((h - 1 / (2 * beta)) ** 2), rel=1e-9)
    assert hinge == pytest.approx(np.mean(np.maximum(0, 1 - beta * h)), rel=1e-9, abs=1e-12)


def test_dpo_is_finite_for_extreme_log_ratios():
    for kind in losses.DPO_LOSS_TYPES:
        s = 0.1 if kind in ("cdpo", "robust") else 0.0
        loss, _, _ = losses.dpo_loss(Tensor([-1e4, 0.0]), Tensor([0.0, -1e4]), [0.0, -1e4], [-1e4, 0.0], beta=1.0,
                                     loss_type=kind, label_smoothing=s)
        assert np.isfinite(loss.item()), kind


@pytest.mark.parametrize("call, message", [
    (lambda: losses.dpo_loss(t64([0.0]), t64([0.0]), [0.0], [0.0], beta=0.0), "beta.*> 0"),
    (lambda: losses.dpo_loss(t64([0.0]), t64([0.0]), [0.0], [0.0], loss_type="kto"), "loss_type.*'sigmoid'"),
    (lambda: losses.dpo_loss(t64([0.0]), t64([0.0]), [0.0], [0.0], label_smoothing=0.1), "label_smoothing.*'cdpo'"),
    (lambda: losses.dpo_loss(t64([0.0]), t64([0.0]), [0.0], [0.0], loss_type="robust", label_smoothing=0.5),
     r"label_smoothing.*\[0, 0.5\)"),
    (lambda: losses.dpo_loss(t64([0.0]), t64([0.0, 1.0]), [0.0], [0.0]), "pi_rejected.*shape"),
    (lambda: losses.dpo_loss(t64([0.0]), t64([0.0]), [0.0, 1.0], [0.0]), "ref_chosen.*shape"),
    (lambda: losses.simpo_loss(t64([0.0]), t64([0.0]), [1], [1], beta=-1.0), "beta"),
    (lambda: losses.kto_loss(t64([0.0]), [0.0], [True, False], 0.0), "desirable.*shape"),
    (lambda: losses.orpo_loss(t64(np.zeros((2, 3))), t64(np.zeros((2, 3))), np.ones((2, 3)), np.ones((2, 2))),
     "mask_rejected.*shape"),
])
def test_invalid_preference_arguments_raise_errors_that_name_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------- SimPO
@given(logps(), logps(), arrays(np.int64, 4, elements=st.integers(1, 50)),
       arrays(np.int64, 4, elements=st.integers(1, 50)), floats(0.1, 5), floats(0, 3))
def test_simpo_equals_bt_on_length_normalised_rewards_with_margin_gamma(pc, pr, lc, lr, beta, gamma):
    loss, chosen, rejected = losses.simpo_loss(t64(pc), t64(pr), lc, lr, beta=beta, gamma=gamma)
    np.testing.assert_allclose(chosen.numpy(), beta * pc / lc, rtol=1e-12)
    bt, _ = losses.bradley_terry_loss(t64(beta * pc / lc), t64(beta * pr / lr), margin=gamma)
    assert loss.item() == pytest.approx(bt.item(), rel=1e-12, abs=1e-12)


@given(logps(1), arrays(np.int64, 1, elements=st.integers(1, 20)), st.integers(2, 5))
def test_simpo_is_unchanged_when_a_response_is_repeated_k_times(lp, length, k):
    # same per-token average, so the same reward: SimPO has no length bias
    one, _, _ = losses.simpo_loss(t64(lp), t64(lp - 1), length, length)
    many, _, _ = losses.simpo_loss(t64(k * lp), t64(lp - 1), k * length, length)
    assert many.item() == pytest.approx(one.item(), rel=1e-12)


# ------------------------------------------------------------------------ ORPO
def log1mexp_reference(x):
    """log(1 − e^x) in 50-digit decimal arithmetic."""
    getcontext().prec = 50
    return float((1 - Decimal(x).exp()).ln())


@given(st.integers(0, 10_000), floats(0, 2))
def test_orpo_loss_is_chosen_nll_plus_lambda_times_the_odds_ratio_loss(seed, lam):
    rng = np.random.default_rng(seed)
    lw, ll = -rng.uniform(0.01, 3, (3, 4)), -rng.uniform(0.01, 3, (3, 4))
    mw = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=float)
    ml = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=float)

    def log_odds(lp, m):
        p = np.exp((lp * m).sum(1) / m.sum(1))
        return np.log(p / (1 - p))
    nll = -(lw * mw).sum() / mw.sum()
    odds = np.mean(np.logaddexp(0, -(log_odds(lw, mw) - log_odds(ll, ml))))
    loss, stats = losses.orpo_loss(t64(lw), t64(ll), mw, ml, lam=lam)
    assert loss.item() == pytest.approx(nll + lam * odds, rel=1e-10)
    assert float(stats["nll"]) == pytest.approx(nll, rel=1e-12)


def test_orpo_log_odds_are_accurate_for_a_response_of_probability_near_one():
    mask = np.ones((1, 3))
    _, stats = losses.orpo_loss(t64(np.full((1, 3), -1e-10)), t64(np.full((1, 3), -1.0)), mask, mask)
    # log1mexp itself is checked against a 50-digit reference in test_functional.py
    want = (-1e-10 - log1mexp_reference(-1e-10)) - (-1.0 - log1mexp_reference(-1.0))
    assert float(stats["log_odds_ratio"]) == pytest.approx(want, rel=1e-13)


def test_orpo_loss_and_gradient_stay_finite_when_a_response_has_probability_one():
    for dtype in (np.float32, np.float64):
        lw = Tensor(np.zeros((2, 3)), requires_grad=True, dtype=dtype)
        loss, _ = losses.orpo_loss(lw, Tensor(np.full((2, 3), -2.0), dtype=dtype), np.ones((2, 3)), np.ones((2, 3)))
        loss.backward()
        assert np.isfinite(loss.item()) and np.isfinite(lw.grad).all()


# ------------------------------------------------------------------------- KTO
@given(logps(), logps(), arrays(np.bool_, 4), floats(0, 3), betas, floats(0, 2), floats(0, 2))
def test_kto_follows_its_formula(lp, ref, desirable, z0, beta, wd, wu):
    r = lp - ref
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    value = np.where(desirable, wd * sig(beta * (r - z0)), wu * sig(beta * (z0 - r)))
    want = np.mean(np.where(desirable, wd, wu) - value)
    loss, rewards = losses.kto_loss(t64(lp), ref, desirable, z0, beta=beta, desirable_weight=wd,
                                    undesirable_weight=wu)
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(rewards.numpy(), beta * r, rtol=1e-12, atol=1e-12)


def test_kto_with_z0_detached_has_no_gradient_through_z0():
    lp = t64([-1.0, -2.0, -3.0], grad=True)
    kl_pi = t64([-1.5, -2.5], grad=True)  # log-probs of mismatched (prompt, response) pairs
    z0 = (kl_pi - Tensor(np.array([-2.0, -3.0]), dtype=np.float64)).mean()
    loss, _ = losses.kto_loss(lp, np.array([-1.5, -1.5, -1.5]), [True, False, True], z0)
    loss.backward()
    assert kl_pi.grad is None and np.abs(lp.grad).sum() > 0


@given(logps(), arrays(np.bool_, 4), floats(0, 2), floats(0, 2), betas)
def test_kto_at_the_reference_with_z0_zero_is_half_the_class_weight(lp, desirable, wd, wu, beta):
    loss, _ = losses.kto_loss(t64(lp), lp, desirable, 0.0, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert loss.item() == pytest.approx(np.mean(np.where(desirable, wd, wu)) / 2, rel=1e-12, abs=1e-15)


def test_kto_clamps_a_negative_kl_anchor_at_zero():
    lp, ref = t64([-1.0, -2.0]), np.array([-1.2, -1.7])
    negative, zero = (losses.kto_loss(lp, ref, [True, False], z0)[0].item() for z0 in (-0.5, 0.0))
    assert negative == zero
