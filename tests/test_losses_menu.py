"""Identities of the newer estimators and objectives in minirlhf/losses.py: pass@k, ReMax and
REINFORCE++-baseline advantages, groups of any size, CISPO, GMPO, SAPO, Clip-Cov, KL-Cov, the
rollout-correction weights, DAPO's overlong penalty and dynamic sampling, the abs and
straight-through KL estimators, RPO, TRL's IPO, f-DPO and KTO's batch reference point.

Exact facts (the pass@k gradient, which gradient each KL estimator gives) are checked by
enumeration on minirlhf/exact.py. Finite-difference gradients of every function are in
test_losses.py's every-loss check.
"""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minirlhf import Tensor, losses
from minirlhf import exact as E
from test_losses import _padded_batch, floats, grad_of, t64, token_batch


def binary_groups(max_groups=4, max_size=6):
    return st.integers(2, max_size).flatmap(lambda N: st.tuples(
        st.just(N), st.integers(1, max_groups).flatmap(
            lambda P: arrays(np.float64, P * N, elements=st.sampled_from([0.0, 1.0])))))


# ------------------------------------------------------------------- pass@k
def brute_force_pass_at_k(group, k):
    """(R̄, A) from the definition: a sample's score is the mean best reward of the k-subsets that
    hold it; R̄ the mean best reward of all k-subsets."""
    N = len(group)
    subsets = list(itertools.combinations(range(N), k))
    best = {S: max(group[j] for j in S) for S in subsets}
    mean_best = np.mean(list(best.values()))
    score = [np.mean([best[S] for S in subsets if i in S]) for i in range(N)]
    return mean_best, np.array(score) - mean_best


@given(binary_groups(), st.data())
def test_pass_at_k_advantages_are_each_samples_mean_best_of_k_minus_the_groups(groups, data):
    N, rewards = groups
    k = data.draw(st.integers(1, N))
    got_none = losses.pass_at_k_advantages(rewards, N, k, scale="none").numpy()
    got = losses.pass_at_k_advantages(rewards, N, k).numpy()
    for g in range(len(rewards) // N):
        mean_best, A = brute_force_pass_at_k(rewards[g * N:(g + 1) * N], k)
        np.testing.assert_allclose(got_none[g * N:(g + 1) * N], A, atol=1e-12)
        sigma = math.sqrt(mean_best * (1 - mean_best))
        np.testing.assert_allclose(got[g * N:(g + 1) * N], A / sigma if sigma > 0 else 0 * A, atol=1e-9)
        assert abs(A.mean()) < 1e-12


@given(binary_groups())
def test_pass_at_1_advantages_are_grpo_advantages_with_the_population_std(groups):
    N, rewards = groups
    g = rewards.reshape(-1, N)
    centred = g - g.mean(1, keepdims=True)
    std = g.std(1, keepdims=True)
    want = np.where(std > 0, centred / np.where(std > 0, std, 1), 0).reshape(-1)
    np.testing.assert_allclose(losses.pass_at_k_advantages(rewards, N, 1).numpy(), want, atol=1e-12)
    np.testing.assert_allclose(losses.pass_at_k_advantages(rewards, N, 1, scale="none").numpy(),
                               centred.reshape(-1), atol=1e-12)


@pytest.mark.parametrize("N, k", [(4, 1), (4, 2), (3, 2), (4, 3), (3, 3)])
def test_expected_pass_at_k_policy_gradient_is_n_minus_k_over_n_k_times_the_gradient_of_pass_at_k(N, k):
    """E over N i.i.d. samples of (1/N) Σ_i A_i ∇log π(y_i), enumerated exactly over all S^N groups,
    equals (N − k)/(N k) · ∇(1 − (1 − p)^k), p = π(correct), with the unscaled advantage."""
    lang = E.TabularLanguage(vocab_size=3, max_len=3)
    policy = E.TabularPolicy(lang, np.random.default_rng(5).normal(size=(lang.num_prefixes, 3)))
    correct = np.array([2 in y for y in lang.responses], dtype=np.float64)
    S = lang.num_responses
    score = []  # ∇ log π(y) of each response, by autograd
    for s in range(S):
        policy.zero_grad()
        policy.sequence_logprobs([s]).sum().backward()
        score.append(policy.logits.grad.reshape(-1).copy())
    score = np.array(score)
    probs = policy.probs()
    groups = np.array(list(itertools.product(range(S), repeat=N)))
    weight = probs[groups].prod(axis=1)
    A = losses.pass_at_k_advantages(correct[groups].reshape(-1), N, k, scale="none").numpy().reshape(-1, N)
    coefficient = np.bincount(groups.reshape(-1), weights=(weight[:, None] * A).reshape(-1), minlength=S) / N
    expected = coefficient @ score
    policy.zero_grad()
    p = (policy.sequence_logprobs().exp() * correct).sum()
    (1.0 - (1.0 - p) ** k).backward()
    grad_pass_at_k = policy.logits.grad.reshape(-1)
    assert np.abs(grad_pass_at_k).max() > 1e-3
    np.testing.assert_allclose(expected, (N - k) / (N * k) * grad_pass_at_k, atol=1e-12)


def test_pass_at_k_refuses_non_binary_rewards_and_k_beyond_the_group():
    with pytest.raises(ValueError, match="rewards: pass@k needs 0/1"):
        losses.pass_at_k_advantages(np.array([0.0, 0.5]), 2, 1)
    with pytest.raises(ValueError, match=r"k: must be an integer in \[1, 2\]"):
        losses.pass_at_k_advantages(np.array([0.0, 1.0]), 2, 3)


# ------------------------------------------------------- ReMax, REINFORCE++-baseline
@given(arrays(np.float64, 6, elements=floats()), arrays(np.float64, 6, elements=floats()))
def test_remax_advantage_is_the_reward_minus_the_greedy_reward(r, greedy):
    np.testing.assert_array_equal(losses.remax_advantages(r, greedy).numpy(), r - greedy)


@given(st.integers(2, 4), st.integers(1, 4).flatmap(lambda P: st.just(P)), st.data())
def test_reinforce_pp_baseline_is_the_batch_whitened_group_centred_reward(G, P, data):
    r = data.draw(arrays(np.float64, G * P, elements=floats()))
    centred = (r.reshape(P, G) - r.reshape(P, G).mean(1, keepdims=True)).reshape(-1)
    got = losses.reinforce_pp_baseline_advantages(r, G).numpy()
    constant = np.ptp(centred) == 0 or centred.size < 2 or np.allclose(centred, centred[0], atol=0)
    want = 0 * centred if constant else (centred - centred.mean()) / (centred.std(ddof=1) + 1e-8)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_token_level_reinforce_pp_baseline_whitens_over_tokens_as_verl_does():
    r = np.array([1.0, 0.0, 3.0, 1.0])
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=float)
    got = losses.reinforce_pp_baseline_advantages(r, 2, mask=mask).numpy()
    centred = np.array([0.5, -0.5, 1.0, -1.0])[:, None] * mask
    want = losses.whiten(centred, mask).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert (got[mask == 0] == 0).all()


# ----------------------------------------------------------- groups of any size
@st.composite
def ragged_groups(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    index = np.repeat(np.arange(len(sizes)), sizes)
    order = draw(st.permutations(range(index.size)))
    index = index[np.array(order, dtype=int)]
    rewards = draw(arrays(np.float64, index.size, elements=st.sampled_from([0.0, 1.0, 2.5, -1.0])))
    return index, rewards


@given(ragged_groups(), st.sampled_from(["group", "none"]))
def test_advantages_of_unequal_groups_are_each_groups_own_and_zero_for_a_group_of_one(groups, scale):
    index, r = groups
    grpo = losses.grpo_advantages(r, scale=scale, index=index).numpy()
    rloo = losses.rloo_advantages(r, index=index).numpy()
    rpp = losses.reinforce_pp_baseline_advantages(r, index=index).numpy()
    for g in np.unique(index):
        rows = np.flatnonzero(index == g)
        if rows.size == 1:
            assert grpo[rows[0]] == 0 and rloo[rows[0]] == 0 and rpp[rows[0]] == 0
            continue
        np.testing.assert_allclose(grpo[rows], losses.grpo_advantages(r[rows], rows.size, scale=scale).numpy(),
                                   atol=1e-9)
        np.testing.assert_allclose(rloo[rows], losses.rloo_advantages(r[rows], rows.size).numpy(), atol=1e-12)
    assert np.isfinite(grpo).all() and np.isfinite(rpp).all()


def test_an_index_of_consecutive_groups_gives_what_group_size_gives():
    r = np.random.default_rng(0).normal(size=12)
    index = np.arange(12) // 4
    for scale in ("group", "batch", "none"):
        np.testing.assert_allclose(losses.grpo_advantages(r, scale=scale, index=index).numpy(),
                                   losses.grpo_advantages(r, 4, scale=scale).numpy(), atol=1e-12)
    np.testing.assert_allclose(losses.rloo_advantages(r, index=index).numpy(), losses.rloo_advantages(r, 4).numpy(),
                               atol=1e-12)
    with pytest.raises(ValueError, match="group_size: give group_size .* or index"):
        losses.grpo_advantages(r, 4, index=index)
    with pytest.raises(ValueError, match="index: expected shape"):
        losses.grpo_advantages(r, index=index[:5])


# ------------------------------------------------------------- policy objectives
def ratio_batch(seed, B=3, T=4, spread=0.5):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3, (B, T))
    old = logp + rng.normal(0, spread, (B, T))
    mask = np.ones((B, T))
    mask[0, 3] = mask[1, 0] = 0
    return logp, old, rng.normal(size=B), mask


@given(st.integers(0, 10_000), st.floats(0.05, 0.5))
def test_cispo_gradient_is_minus_the_clipped_stopped_ratio_times_the_advantage_over_n(seed, eps_high):
    logp, old, A, mask = ratio_batch(seed)
    _, (g,) = grad_of(lambda x: losses.cispo_loss(x, old, None, A, mask, clip_eps_high=eps_high)[0], logp)
    w = np.minimum(np.exp(logp - old), 1 + eps_high)
    np.testing.assert_allclose(g, -w * A[:, None] * mask / mask.sum(), atol=1e-12)


@given(st.integers(0, 10_000))
def test_cispo_sapo_and_gmpo_at_ratio_one_give_the_policy_gradient(seed):
    logp, _, A, mask = ratio_batch(seed)
    _, (bnpo,) = grad_of(lambda x: losses.grpo_loss(x, x.data, None, A, mask, beta=0, loss_type="bnpo")[0], logp)
    _, (grpo,) = grad_of(lambda x: losses.grpo_loss(x, x.data, None, A, mask, beta=0)[0], logp)
    _, (cispo,) = grad_of(lambda x: losses.cispo_loss(x, x.data, None, A, mask)[0], logp)
    _, (sapo,) = grad_of(lambda x: losses.sapo_loss(x, x.data, None, A, mask)[0], logp)
    _, (gmpo,) = grad_of(lambda x: losses.gmpo_loss(x, x.data, None, A, mask)[0], logp)
    np.testing.assert_allclose(cispo, bnpo, atol=1e-12)
    np.testing.assert_allclose(sapo, grpo, atol=1e-12)
    np.testing.assert_allclose(gmpo, grpo, atol=1e-12)


def test_cispo_keeps_the_gradient_of_tokens_that_ppo_clips():
    logp, mask = np.array([[-0.5, -0.5]]), np.ones((1, 2))
    old = logp - np.array([[1.0, 0.0]])  # ρ = e on the first token, 1 on the second
    _, (ppo,) = grad_of(lambda x: losses.grpo_loss(x, old, None, [1.0], mask, beta=0, loss_type="bnpo")[0], logp)
    _, (cispo,) = grad_of(lambda x: losses.cispo_loss(x, old, None, [1.0], mask, clip_eps_high=0.2)[0], logp)
    assert ppo[0, 0] == 0 and cispo[0, 0] == pytest.approx(-1.2 / 2)


@given(st.integers(0, 10_000), st.floats(0.1, 1.0))
def test_gmpo_is_minus_advantage_times_exp_of_the_mean_clipped_token_log_ratio(seed, eps):
    logp, old, A, mask = ratio_batch(seed, spread=1.0)
    log_ratio = logp - old
    sign = np.sign(A)[:, None]
    per_token = sign * np.minimum(sign * log_ratio, sign * np.clip(log_ratio, -eps, eps))
    s = np.exp((per_token * mask).sum(1) / mask.sum(1))
    want = np.mean(-A * s)
    assert losses.gmpo_loss(t64(logp), old, None, A, mask, clip_eps=eps)[0].item() == pytest.approx(want, rel=1e-12)


@given(st.integers(0, 10_000), st.floats(0.5, 2.0), st.floats(0.5, 2.0))
def test_sapo_is_the_sigmoid_gate_times_the_advantage_aggregated_as_grpo(seed, tau_pos, tau_neg):
    logp, old, A, mask = ratio_batch(seed, spread=1.0)
    tau = np.where(A > 0, tau_pos, tau_neg)[:, None]
    gate = 4 / tau / (1 + np.exp(-tau * (np.exp(logp - old) - 1)))
    want = np.mean((-gate * A[:, None] * mask).sum(1) / mask.sum(1))
    got = losses.sapo_loss(t64(logp), old, None, A, mask, tau_pos=tau_pos, tau_neg=tau_neg)[0].item()
    assert got == pytest.approx(want, rel=1e-12)


def test_sapo_gradient_fades_smoothly_where_ppo_drops_it_at_the_clip_edge():
    mask, A = np.ones((1, 3)), [1.0]
    logp = np.zeros((1, 3))
    old = -np.array([[0.15, 0.25, 3.0]])  # ρ inside the clip, just beyond it, far beyond it
    _, (ppo,) = grad_of(lambda x: losses.grpo_loss(x, old, None, A, mask, beta=0)[0], logp)
    _, (sapo,) = grad_of(lambda x: losses.sapo_loss(x, old, None, A, mask)[0], logp)
    ratio = np.exp(-old[0])
    sig = 1 / (1 + np.exp(-(ratio - 1)))
    np.testing.assert_allclose(sapo[0], -4 * sig * (1 - sig) * ratio / 3, rtol=1e-12)
    assert ppo[0, 1] == 0 and sapo[0, 1] < 0 and abs(sapo[0, 2]) < 1e-5 * abs(sapo[0, 0])


def test_clip_cov_without_candidates_is_ppo_and_cut_tokens_lie_in_the_covariance_band():
    logp, old, A, mask = ratio_batch(3, B=6, T=5, spread=0.01)  # no token clipped by PPO
    ppo = losses.ppo_policy_loss(t64(logp), old, A, mask)[0].item()
    none = losses.clip_cov_loss(t64(logp), old, None, A, mask, cov_low=1e9, cov_high=2e9)
    assert none[0].item() == pytest.approx(ppo, rel=1e-12) and float(none[1]["cov_fraction"]) == 0
    lp, m = logp * mask, mask
    n = m.sum()
    cov = (lp - lp.sum() / n) * (A[:, None] * m - (A[:, None] * m).sum() / n) * m
    band = (cov >= 0.05) & (cov <= 10) & (m > 0)
    assert band.sum() >= 3
    _, (g,) = grad_of(lambda x: losses.clip_cov_loss(x, old, None, A, mask, clip_ratio=0.1, cov_low=0.05,
                                                     cov_high=10, seed=1)[0], logp)
    _, (g_ppo,) = grad_of(lambda x: losses.ppo_policy_loss(x, old, A, mask)[0], logp)
    cut = (g == 0) & (g_ppo != 0)
    assert (g_ppo[mask > 0] != 0).all()
    assert cut.sum() == min(max(int(0.1 * n), 1), band.sum()) and band[cut].all()
    np.testing.assert_allclose(g[~cut], g_ppo[~cut], atol=1e-12)


def test_kl_cov_penalises_only_the_highest_covariance_token_with_the_abs_log_ratio():
    logp, old, A, mask = ratio_batch(4, B=4, T=5)
    plain = losses.kl_cov_loss(t64(logp), old, None, A, mask, kl_coef=0.0)[0].item()
    n = mask.sum()
    assert plain == pytest.approx((-A[:, None] * np.exp(logp - old) * mask).sum() / n, rel=1e-12)
    _, (g0,) = grad_of(lambda x: losses.kl_cov_loss(x, old, None, A, mask, kl_coef=0.0)[0], logp)
    _, (g1,) = grad_of(lambda x: losses.kl_cov_loss(x, old, None, A, mask, kl_coef=0.7)[0], logp)
    lp = logp * mask
    cov = np.where(mask > 0, (lp - lp.sum() / n) * (A[:, None] * mask - (A[:, None] * mask).sum() / n), -np.inf)
    top = np.unravel_index(np.argmax(cov), cov.shape)
    diff = g1 - g0
    assert diff[top] == pytest.approx(0.7 * np.sign(logp - old)[top] / n)
    diff[top] = 0
    assert (diff == 0).all()


NEW_OBJECTIVES = {
    "cispo": lambda d, m: losses.cispo_loss(d["logp"], d["old"], d["ref"], np.arange(3.0), m, beta=0.1)[0],
    "cispo_low": lambda d, m: losses.cispo_loss(d["logp"], d["old"], None, d["adv"], m, clip_eps=0.2)[0],
    "gmpo": lambda d, m: losses.gmpo_loss(d["logp"], d["old"], d["ref"], np.arange(3.0) - 1, m, beta=0.1)[0],
    "sapo": lambda d, m: losses.sapo_loss(d["logp"], d["old"], d["ref"], d["adv"], m, beta=0.1)[0],
    "clip_cov": lambda d, m: losses.clip_cov_loss(d["logp"], d["old"], d["ref"], d["adv"], m, beta=0.1,
                                                  clip_ratio=0.3, cov_low=-10, cov_high=10)[0],
    "kl_cov": lambda d, m: losses.kl_cov_loss(d["logp"], d["old"], d["ref"], d["adv"], m, top_ratio=0.3)[0],
    "rollout_correction": lambda d, m: sum(losses.rollout_correction_weights(d["old"], d["ref"], m, k).sum()
                                           for k in losses.ROLLOUT_CORRECTIONS),
    "reinforce_pp_baseline": lambda d, m: losses.reinforce_pp_baseline_advantages(np.arange(3.0), 3, mask=m).sum(),
    "kl_estimate": lambda d, m: sum(losses.response_kl(d["logp"], d["ref"], m, k).sum() for k in ("abs", "k1+", "k3+")),
}


@pytest.mark.parametrize("name", sorted(NEW_OBJECTIVES))
def test_values_under_the_mask_change_neither_the_new_losses_nor_their_gradients(name):
    results = []
    for garbage in (False, True):
        d, mask = _padded_batch(garbage)
        leaf = t64(d["logp"], grad=True)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            out = NEW_OBJECTIVES[name]({**d, "logp": leaf}, mask)
            if out.requires_grad:
                out.backward()
        results.append((out.item(), np.zeros(leaf.shape) if leaf.grad is None else leaf.grad))
    (clean, g_clean), (dirty, g_dirty) = results
    assert np.isfinite(dirty) and dirty == pytest.approx(clean, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-12, atol=1e-15)
    assert (g_clean[mask == 0] == 0).all()


@pytest.mark.parametrize("name", sorted(losses.POLICY_OBJECTIVES))
@pytest.mark.parametrize("log_ratio", [0.0, 1000.0, -1000.0])
def test_new_objectives_are_zero_on_an_all_masked_batch_and_finite_at_extreme_ratios(name, log_ratio):
    fn = losses.POLICY_OBJECTIVES[name]
    logp = t64(np.full((2, 3), -1.0), grad=True)
    assert fn(logp, logp.data, logp.data, np.ones(2), np.zeros((2, 3)), beta=0.1)[0].item() == 0
    loss, _ = fn(logp, logp.data - log_ratio, logp.data + log_ratio, np.array([1.0, -1.0]), np.ones((2, 3)),
                 beta=0.1)
    loss.backward()
    assert np.isfinite(loss.item()) and np.isfinite(logp.grad).all()


# ----------------------------------------------------------- rollout correction
@given(token_batch(min_len=1), st.integers(0, 10_000), st.floats(1.1, 5.0))
def test_rollout_correction_weights_follow_their_formulas(batch, seed, C):
    old, mask = batch
    sampler = old + np.random.default_rng(seed).normal(0, 0.7, old.shape)
    rho = np.exp(old - sampler)
    rho_seq = np.exp(((old - sampler) * mask).sum(1, keepdims=True))
    w = {k: losses.rollout_correction_weights(old, sampler, mask, k, high=C).numpy() for k in losses.ROLLOUT_CORRECTIONS}
    np.testing.assert_allclose(w["tis"], np.minimum(rho, C) * mask, rtol=1e-12)
    np.testing.assert_allclose(w["tis_seq"], np.minimum(rho_seq, C) * mask, rtol=1e-12)
    np.testing.assert_allclose(w["mis"], np.where(rho_seq <= C, rho_seq, 0) * mask, rtol=1e-12)
    np.testing.assert_allclose(w["icepop"], np.where((rho >= 0.5) & (rho <= C), rho, 0) * mask, rtol=1e-12)


@pytest.mark.parametrize("mode", losses.ROLLOUT_CORRECTIONS)
def test_a_sampler_that_agrees_with_the_trainer_gets_weight_one(mode):
    old, mask = -np.random.default_rng(0).uniform(0.1, 2, (3, 4)), np.array([[1, 1, 0, 0]] * 3, dtype=float)
    np.testing.assert_array_equal(losses.rollout_correction_weights(old, old, mask, mode).numpy(), mask)


@given(token_batch(min_len=1), st.integers(0, 10_000))
def test_weighting_advantages_is_weighting_each_tokens_clipped_loss(batch, seed):
    logp, mask = batch
    rng = np.random.default_rng(seed)
    old, sampler, A = logp + rng.normal(0, 0.3, logp.shape), logp + rng.normal(0, 0.5, logp.shape), rng.normal(
        size=logp.shape[0])
    w = losses.rollout_correction_weights(old, sampler, mask, "tis").numpy()
    got = losses.grpo_loss(t64(logp), old, None, A[:, None] * w, mask, beta=0, loss_type="bnpo")[0].item()
    ratio = np.exp(logp - old)
    per_token = -np.minimum(ratio * A[:, None], np.clip(ratio, 0.8, 1.2) * A[:, None])
    assert got == pytest.approx((w * per_token * mask).sum() / mask.sum(), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------- DAPO
@given(st.integers(1, 40), st.data(), st.floats(0.0, 3.0))
def test_overlong_penalty_is_zero_then_linear_then_minus_the_penalty(L_max, data, penalty):
    L_cache = data.draw(st.integers(1, L_max))
    n = np.arange(0, L_max + 5)
    got = losses.overlong_penalty(n, L_max, L_cache, penalty)
    want = np.where(n <= L_max - L_cache, 0.0,
                    np.where(n <= L_max, penalty * (L_max - L_cache - n) / L_cache, -penalty))
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert (np.diff(got) <= 0).all()


@given(binary_groups())
def test_dynamic_sampling_keeps_exactly_the_groups_with_unequal_rewards(groups):
    N, r = groups
    keep = losses.informative_groups(r, N)
    g = r.reshape(-1, N)
    np.testing.assert_array_equal(keep.reshape(-1, N).all(1), g.min(1) != g.max(1))
    assert (keep.reshape(-1, N).all(1) == keep.reshape(-1, N).any(1)).all()
    assert not losses.grpo_advantages(r[~keep], N).numpy().any() if (~keep).any() else True


# ------------------------------------------------------------------- KL
@given(arrays(np.float64, (2, 3), elements=floats(-4, -0.1)), arrays(np.float64, (2, 3), elements=floats(-4, -0.1)))
def test_abs_and_straight_through_estimators_have_their_values_and_k2s_gradient(logp, ref):
    lr = logp - ref
    values = {"abs": np.abs(lr), "k1+": lr, "k3+": np.expm1(-lr) + lr}
    for est, want in values.items():
        value, (g,) = grad_of(lambda x: losses.kl_estimate(x, ref, est).sum(), logp)
        assert value == pytest.approx(want.sum(), rel=1e-10, abs=1e-12)
        if est != "abs":
            np.testing.assert_allclose(g, lr, atol=1e-12)


def test_which_kl_each_estimators_gradient_follows_by_enumeration_on_a_one_token_language():
    """One token is the whole response: E_{y~π}[∇k(y)] with y held fixed, exactly."""
    lang = E.TabularLanguage(vocab_size=4, max_len=1)
    rng = np.random.default_rng(8)
    ref = E.TabularPolicy(lang, rng.normal(size=(1, 4))).sequence_logprobs().numpy()
    policy = E.TabularPolicy(lang, rng.normal(size=(1, 4)))
    probs = policy.probs()

    def expected_grad(est):
        policy.zero_grad()
        k = losses.kl_estimate(policy.sequence_logprobs(), ref, est)
        (k * probs).sum().backward()  # the weights π(y) are constants: only the pathwise gradient
        return policy.logits.grad.copy(), float((k.numpy() * probs).sum())

    def kl_grad(forward):
        policy.zero_grad()
        logp = policy.sequence_logprobs()
        p, q = logp.exp(), Tensor(np.exp(ref), dtype=np.float64)
        kl = (p * (logp - ref)).sum() if forward else (q * (Tensor(ref, dtype=np.float64) - logp)).sum()
        kl.backward()
        return policy.logits.grad.copy()

    kl = E.sequence_kl(np.log(probs), ref)
    forward, reverse = kl_grad(True), kl_grad(False)
    np.testing.assert_allclose(expected_grad("k1")[0], 0, atol=1e-14)
    np.testing.assert_allclose(expected_grad("k2")[0], forward, atol=1e-12)
    np.testing.assert_allclose(expected_grad("k3")[0], reverse, atol=1e-12)
    for est in ("k1+", "k3+"):
        grad, value = expected_grad(est)
        np.testing.assert_allclose(grad, forward, atol=1e-12)
        assert value == pytest.approx(kl, rel=1e-12)
    assert np.abs(forward - reverse).max() > 1e-3


# ------------------------------------------------------------------- preference
@given(arrays(np.float64, 3, elements=floats(-20, -1)), arrays(np.float64, 3, elements=floats(-20, -1)),
       arrays(np.float64, 3, elements=st.integers(1, 30).map(float)), st.floats(0.0, 2.0))
def test_rpo_adds_alpha_times_the_length_normalised_nll_of_the_chosen(pc, pr, n, alpha):
    ref = pc + 0.3
    dpo = losses.dpo_loss(t64(pc), pr, ref, pr - 0.2)[0].item()
    rpo, (g_c, _) = grad_of(lambda a, b: losses.dpo_loss(a, b, ref, pr - 0.2, rpo_alpha=alpha, len_chosen=n)[0], pc, pr)
    assert rpo == pytest.approx(dpo + alpha * np.mean(-pc / n), rel=1e-12)
    _, (g_dpo, _) = grad_of(lambda a, b: losses.dpo_loss(a, b, ref, pr - 0.2)[0], pc, pr)
    np.testing.assert_allclose(g_c - g_dpo, -alpha / (3 * n), atol=1e-12)


@given(arrays(np.float64, 3, elements=floats(-20, -1)), arrays(np.float64, 3, elements=floats(-20, -1)),
       arrays(np.float64, 3, elements=st.integers(1, 30).map(float)),
       arrays(np.float64, 3, elements=st.integers(1, 30).map(float)), st.floats(0.05, 1.0))
def test_trls_ipo_is_our_ipo_on_length_averaged_log_ratios(pc, pr, nc, nr, beta):
    rc, rr = pc + 0.4, pr - 0.7
    got = losses.dpo_loss(t64(pc), pr, rc, rr, beta, "ipo_norm", len_chosen=nc, len_rejected=nr)[0].item()
    want = losses.dpo_loss(t64(pc / nc), pr / nr, rc / nc, rr / nr, beta, "ipo")[0].item()
    assert got == pytest.approx(want, rel=1e-10)
    ones = np.ones(3)
    assert (losses.dpo_loss(t64(pc), pr, rc, rr, beta, "ipo_norm", len_chosen=ones, len_rejected=ones)[0].item()
            == pytest.approx(losses.dpo_loss(t64(pc), pr, rc, rr, beta, "ipo")[0].item(), rel=1e-12))


@given(arrays(np.float64, 3, elements=floats(-3, 3)), arrays(np.float64, 3, elements=floats(-3, 3)),
       st.floats(0.05, 2.0), st.sampled_from(losses.F_DIVERGENCES))
def test_f_dpo_logit_is_the_difference_of_f_prime_and_the_loss_falls_as_the_chosen_rises(uw, ul, beta, f):
    zero = np.zeros(3)
    loss, (g_w, g_l) = grad_of(lambda a, b: losses.dpo_loss(a, b, zero, zero, beta, f_divergence=f)[0], uw, ul)
    f_prime = {"reverse_kl": np.log, "forward_kl": lambda x: -1 / x,
               "js_divergence": lambda x: np.log(2 * x / (1 + x)),
               "alpha_divergence": lambda x: (1 - x ** -0.5) / 0.5}[f]
    z = beta * (f_prime(np.exp(uw)) - f_prime(np.exp(ul)))
    assert loss == pytest.approx(np.mean(np.logaddexp(0, -z)), rel=1e-10)
    assert (g_w < 0).all() and (g_l > 0).all()
    same = losses.dpo_loss(t64(uw), uw, zero, zero, beta, f_divergence=f)[0].item()
    assert same == pytest.approx(math.log(2), rel=1e-12)


def test_alpha_divergence_runs_from_reverse_kl_to_forward_kl():
    uw, ul, zero = np.array([0.7, -1.2]), np.array([-0.3, 0.4]), np.zeros(2)
    loss = {f: losses.dpo_loss(t64(uw), ul, zero, zero, 0.5, f_divergence=f)[0].item() for f in losses.F_DIVERGENCES}
    near0 = losses.dpo_loss(t64(uw), ul, zero, zero, 0.5, f_divergence="alpha_divergence", alpha=1e-7)[0].item()
    near1 = losses.dpo_loss(t64(uw), ul, zero, zero, 0.5, f_divergence="alpha_divergence", alpha=1 - 1e-9)[0].item()
    assert near0 == pytest.approx(loss["reverse_kl"], rel=1e-6)
    assert near1 == pytest.approx(loss["forward_kl"], rel=1e-7)


@given(arrays(np.float64, 5, elements=floats(-20, -1)), arrays(np.float64, 5, elements=floats(-20, -1)))
def test_kto_batch_reference_point_is_the_clamped_mean_log_ratio_and_carries_no_gradient(pi, ref):
    leaf = t64(pi, grad=True)
    z0 = losses.kto_reference_point(leaf, ref)
    assert z0.item() == pytest.approx(max(0.0, np.mean(pi - ref)), abs=1e-12) and not z0.requires_grad
    desirable = [True, False, True, True, False]
    a = losses.kto_loss(t64(pi), ref, desirable, z0)[0].item()
    b = losses.kto_loss(t64(pi), ref, desirable, float(z0.item()))[0].item()
    assert a == b


# ------------------------------------------------------------------ argument errors
_lp, _m = t64(np.full((2, 3), -1.0), grad=True), np.ones((2, 3))
INVALID = [
    (lambda: losses.cispo_loss(_lp, _lp.data, None, np.ones(2), _m, clip_eps_high=0), "clip_eps_high.*> 0"),
    (lambda: losses.gmpo_loss(_lp, _lp.data, None, np.ones(2), _m, clip_eps=-1), "clip_eps.*> 0"),
    (lambda: losses.sapo_loss(_lp, _lp.data, None, np.ones(2), _m, tau_neg=0), "tau_neg.*> 0"),
    (lambda: losses.clip_cov_loss(_lp, _lp.data, None, np.ones(2), _m, cov_low=2, cov_high=1), "cov_high.*>= cov_low"),
    (lambda: losses.kl_cov_loss(_lp, _lp.data, None, np.ones(2), _m, kl_coef=-1), "kl_coef.*>= 0"),
    (lambda: losses.rollout_correction_weights(_lp, _lp.data, _m, "is"), "mode.*'tis', 'tis_seq', 'mis', 'icepop'"),
    (lambda: losses.rollout_correction_weights(_lp, _lp.data, _m, "icepop", low=3, high=2), "low.*<= high"),
    (lambda: losses.rollout_correction_weights(_lp, np.ones((2, 2)), _m), "sampler_logp.*shape"),
    (lambda: losses.overlong_penalty([3], 4, 5), r"buffer_length.*\[1, 4\]"),
    (lambda: losses.informative_groups(np.ones(5), 2), "group_size.*does not divide"),
    (lambda: losses.kl_estimate(_lp, _lp.data, "k2+"), "estimator.*'k1\\+', 'k3\\+'"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), loss_type="ipo_norm"), "len_chosen"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), rpo_alpha=1.0), "len_chosen"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), rpo_alpha=1.0, len_chosen=[0, 1]),
     "len_chosen.*>= 1"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), f_divergence="tv"), "f_divergence"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), loss_type="ipo", f_divergence="js_divergence"),
     "f_divergence.*not to loss_type 'ipo'"),
    (lambda: losses.dpo_loss(np.ones(2), np.ones(2), np.ones(2), np.ones(2), f_divergence="alpha_divergence", alpha=1.0),
     r"alpha.*\(0, 1\)"),
    (lambda: losses.remax_advantages(np.ones(2), np.ones(3)), "greedy_rewards.*shape"),
    (lambda: losses.reinforce_pp_baseline_advantages(np.ones(4), 2, mask=np.ones((3, 2))), r"mask.*\(4, T\)"),
    (lambda: losses.grpo_advantages(np.ones(3), index=np.array([0.5, 1, 1])), "index: expected integer"),
]


@pytest.mark.parametrize("call, message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_arguments_raise_errors_that_name_them(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
